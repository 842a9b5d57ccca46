"""BlockCache: the persistent, bounded, crash-safe on-disk store of file blocks.

Geometry (shared with :mod:`mastfs.reader`): block 0 holds bytes [0, 64 KiB) so reading a FITS header costs
at most 64 KiB on the wire; block i >= 1 holds [64 KiB + (i-1) * 4 MiB, 64 KiB + i * 4 MiB), clipped to the
file size. See docs/caching.md for the on-disk layout.

Keys: a product is ``sha256(uri)`` and one version of it ``sha256(uri, size, sha256, server version tag)``
in hex (:attr:`ProductRef.product_key`, :attr:`ProductRef.version_key`); a version's blocks live in a
directory under its product's, so the blocks of superseded versions are found and dropped when a new
version is stored (:meth:`BlockCache.drop_superseded`); file names never contain the uri. Every block file starts with a 64-byte header (magic, block index, data length,
crc32 of the data, the raw version key, a crc32 of the header) that is checked on every read: a short,
missing or corrupt block is a miss (deleted), never served.

Writes go to a temporary file in ``<dir>/tmp`` (same filesystem) and are renamed into place, so a crash
mid-write leaves at most a temporary file, removed by :meth:`BlockCache.open`. Blocks are not fsynced: the
per-block checksum makes a block torn by a power loss a miss. Block files are written and read with
``O_DIRECT`` where the filesystem allows it (through reused, page-aligned buffers), so storing or loading a
block neither fills the page cache with fresh pages nor pays the kernel's copy into them (the biggest CPU
cost of a cold read otherwise); on a filesystem that refuses direct I/O, the page cache is used.

Concurrency: every method is called from the trio thread; the in-memory index (LRU order, sizes, verified
products) is only mutated there. File work runs in worker threads under the cache's own limiter, one thread
hop per block.

Shared directory: several processes (a mount, fsspec users, Dask workers) may use one cache directory at
once. Before fetching a block, a reader :meth:`BlockCache.claim` s it: an exclusive POSIX record lock
(``lockf``) on one byte of ``<dir>/locks`` chosen by a hash of (version, block), held until the block is
stored (:meth:`BlockCache.release`), and a look on disk for the block another process stored meanwhile
(adopted into the index, then loaded instead of fetched). So one transfer per block across processes;
a peer that holds a lock longer than ``peer_wait`` seconds is not waited for any more (the block may
then be fetched twice, never served unverified). Each process's index is a view: it is rebuilt from the
directory at most every :data:`RESCAN_INTERVAL` seconds while storing (blocks others wrote count against
the size limit, blocks others evicted leave), a block file found gone is a plain miss, and a temporary
file (named ``<pid>-<random>``) is removed only when its writer is gone or it is older than
:data:`STALE_TMP_AGE`.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import mmap
import os
import queue
import shutil
import struct
import threading
import time
import uuid
import zlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property, partial
from typing import Any, TypeVar

import trio

from .fitscheck import FitsCheck, HduMismatch, applies_to
from .versions import ObjectVersion

log = logging.getLogger(__name__)

HEADER_BLOCK_SIZE = 64 * 1024
"""Size of block 0: the first read of a file (a FITS header) never costs more on the wire."""
BLOCK_SIZE = 4 * 1024 * 1024
"""Size of every later block."""

LAYOUT = "blocks-v2"
"""Directory name of the current layout; a change of geometry or header format gets a new name."""
_MAGIC = b"MFB1"
_HEADER = struct.Struct("<4sQQI32sI")  # magic, index, data length, crc32(data), version key, crc32(header)
HEADER_SIZE = 64
_HEADER_PAD = HEADER_SIZE - _HEADER.size
_VERIFIED_MARKER = "verified"
_VERSION_FILE = "version"
"""Per version directory: JSON of what can be checked offline (size, plain-MD5 ETag, S3 checksums,
sha256); written with the version's first block."""
_LOCK_FILE = "locks"
RESCAN_INTERVAL = 30.0
"""Seconds between rebuilds of the index from the directory (other processes store and evict too)."""
STALE_TMP_AGE = 600.0
"""A temporary file older than this (seconds) is a crashed write; younger ones may be another process's."""
_CLAIM_POLL = 0.02
_THREADS = 4
_DIRECT_TRANSFERS = 2
"""Most block files written or read with ``O_DIRECT`` at once (each needs a block-sized aligned buffer)."""
_DIRECT_ALIGN = 4096
"""Alignment of ``O_DIRECT`` writes (memory address, file offset and length): a page, which covers every
logical block size in use."""
T = TypeVar("T")


@dataclass(frozen=True)
class ProductRef:
    """One version of one archive file: what the cache keys on and the reader fetches.

    ``uri`` is the MAST dataURI, ``size`` its length in bytes, ``sha256`` its whole-file hex digest when
    known (verified once every block is cached), ``s3_key`` its key in the public bucket (None: not in the
    cloud), ``exclusive`` whether it needs a token, ``version`` what the server stated about the copy being
    read (None until the reader pins one: see :meth:`mastfs.reader.ByteReader.pin`).
    """

    uri: str
    size: int
    sha256: str | None = None
    s3_key: str | None = None
    exclusive: bool = False
    version: ObjectVersion | None = None

    @cached_property
    def product_key(self) -> str:
        """Hex sha256 of the uri: the directory of all the product's versions on disk."""
        return hashlib.sha256(self.uri.encode()).hexdigest()

    @cached_property
    def version_key(self) -> str:
        """Hex sha256 of uri, size, sha256 (when known) and the server's version tag: the version's name
        on disk and in memory."""
        tag = self.version.tag if self.version is not None else ""
        identity = f"{self.uri}\0{self.size}\0{self.sha256 or ''}\0{tag}"
        return hashlib.sha256(identity.encode()).hexdigest()

    def checks(self) -> dict[str, Any]:
        """What a complete copy can be checked against: size, and when known sha256, the content MD5
        (a plain-MD5 ETag), S3 additional checksums (name -> base64), and whether it is FITS (HDU
        DATASUM/CHECKSUM, checked by ``mastfs cache verify``)."""
        version = self.version
        return {
            "size": self.size,
            "fits": applies_to(self.uri, self.size),
            "version": None if version is None else {
                "etag": version.etag, "last_modified": version.last_modified, "version_id": version.version_id},
            "sha256": self.sha256,
            "md5": version.content_md5 if version is not None else None,
            "s3": dict(version.checksums) if version is not None else {},
        }


def block_count(size: int) -> int:
    """Number of blocks of a file of ``size`` bytes."""
    if size <= 0:
        return 0
    if size <= HEADER_BLOCK_SIZE:
        return 1
    return 1 + -(-(size - HEADER_BLOCK_SIZE) // BLOCK_SIZE)


def block_index(offset: int) -> int:
    """Index of the block holding byte ``offset``."""
    if offset < HEADER_BLOCK_SIZE:
        return 0
    return 1 + (offset - HEADER_BLOCK_SIZE) // BLOCK_SIZE


def block_start(index: int) -> int:
    """Offset of the first byte of block ``index``."""
    return 0 if index == 0 else HEADER_BLOCK_SIZE + (index - 1) * BLOCK_SIZE


def block_span(index: int, size: int) -> tuple[int, int]:
    """``(start, end)`` (end exclusive) of block ``index`` of a file of ``size`` bytes."""
    start = block_start(index)
    end = HEADER_BLOCK_SIZE if index == 0 else start + BLOCK_SIZE
    return start, min(end, size)


@dataclass
class VerifyReport:
    """What :meth:`BlockCache.verify` found: blocks checked and kept, bad blocks removed, stray files removed."""

    blocks: int = 0
    bytes: int = 0
    corrupt: int = 0
    mixed: int = 0
    """Blocks whose header names another version than their directory (never expected; removed)."""
    stray_files: int = 0
    products_checked: int = 0
    """Complete cached versions checked whole (sha256, plain-MD5 ETag, S3 checksums)."""
    products_failed: int = 0
    """Of those, versions that failed a whole-file check (all their blocks removed)."""
    corrupt_paths: list[str] = field(default_factory=list)


BlockKey = tuple[str, int]


class BlockCache:
    """Blocks of product versions on disk, bounded by ``size_limit`` bytes and keeping ``min_free`` bytes
    free on the filesystem, least recently used first out, persistent across instances on one directory.
    ``direct_io`` writes and reads block files with ``O_DIRECT`` while the filesystem accepts it (False:
    always through the page cache).

    Call :meth:`open` once before anything else (it creates the directory, removes temporary files left by
    a crash and loads the index). No I/O happens in the constructor.
    """

    def __init__(self, directory: str, size_limit: int, min_free: int, *, direct_io: bool = True,
                 peer_wait: float = 30.0) -> None:
        self.directory = os.path.abspath(directory)
        self.size_limit = size_limit
        self.min_free = min_free
        self._blocks_dir = os.path.join(self.directory, LAYOUT)
        self._tmp_dir = os.path.join(self.directory, "tmp")
        self._limiter = trio.CapacityLimiter(_THREADS)
        self._lru: OrderedDict[BlockKey, int] = OrderedDict()  # key -> bytes on disk, oldest first
        self._by_version: dict[str, set[int]] = {}
        self._product_of: dict[str, str] = {}  # version key -> product key
        self._versions_of: dict[str, set[str]] = {}  # product key -> version keys on disk
        self._verified: set[str] = set()
        self._bytes_used = 0
        self._free_estimate: int | None = None
        self._opened = False
        self._files = _BlockFiles(direct_io)
        self.corrupt_blocks = 0
        self.peer_wait = peer_wait
        self._lock_fd = -1
        self._claimed: set[BlockKey] = set()
        self._reserved = 0  # bytes of block writes in progress
        self._scanned_at = 0.0
        self._rescanned: trio.Event | None = None  # set while the index is rebuilt: stores wait for it

    # ----------------------------------------------------------------- public API

    async def open(self) -> None:
        """Create the directories, delete leftover temporary files and load the index from disk.

        Idempotent. Raises OSError when the directory cannot be created or read.
        """
        if self._opened:
            return
        await self._load_index()
        self._lock_fd = await self._run(os.open, os.path.join(self.directory, _LOCK_FILE),
                                        os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._opened = True
        log.debug("block cache %s: %d blocks, %d bytes", self.directory, len(self._lru), self._bytes_used)

    async def _load_index(self) -> None:
        """(Re)build the index from the directory, the truth shared with other processes."""
        self._scanned_at = time.monotonic()
        entries, verified, owners, free = await self._run(self._scan_sync)
        for vk, pk in owners.items():
            self._note_version(vk, pk)
        self._lru.clear()
        self._by_version.clear()
        self._bytes_used = self._reserved
        for key, size in entries:
            self._lru[key] = size
            self._by_version.setdefault(key[0], set()).add(key[1])
            self._bytes_used += size
        self._verified = {vk for vk in verified if vk in self._by_version}
        self._free_estimate = free

    def close(self) -> None:
        """Release every block lock this cache holds (closing the lock file). Idempotent."""
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
            self._claimed.clear()

    async def claim(self, ref: ProductRef, indexes: list[int]) -> list[int]:
        """Take the shared directory's lock of each block (in order, so processes never deadlock),
        waiting at most ``peer_wait`` seconds for another process fetching it; then adopt into the index
        the blocks another process stored meanwhile and return their indexes (load them instead of
        fetching). Release each claimed block with :meth:`release` once stored or failed."""
        vk = ref.version_key
        try:
            for index in indexes:
                await self._lock((vk, index))
        except BaseException:
            for index in indexes:
                self.release(ref, index)
            raise
        unknown = [index for index in indexes if (vk, index) not in self._lru]
        directory = self._version_dir_of(ref.product_key, vk)
        sizes = await self._run(_sizes_sync, [os.path.join(directory, str(index)) for index in unknown])
        found = []
        for index, size in zip(unknown, sizes, strict=True):
            start, end = block_span(index, ref.size)
            if size == HEADER_SIZE + end - start and (vk, index) not in self._lru:
                self._note_version(vk, ref.product_key)  # another process made the directory (and its checks)
                self._lru[(vk, index)] = size
                self._by_version.setdefault(vk, set()).add(index)
                self._bytes_used += size
                found.append(index)
        return found

    def release(self, ref: ProductRef, index: int) -> None:
        """Release the lock of a block taken by :meth:`claim` (no-op when not held)."""
        key = (ref.version_key, index)
        if key in self._claimed:
            self._claimed.discard(key)
            if self._lock_fd >= 0:
                with contextlib.suppress(OSError):
                    fcntl.lockf(self._lock_fd, fcntl.LOCK_UN, 1, _lock_offset(key))

    async def _lock(self, key: BlockKey) -> None:
        if key in self._claimed or self._lock_fd < 0:
            return
        give_up = trio.current_time() + self.peer_wait
        while True:
            try:
                fcntl.lockf(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, _lock_offset(key))
            except OSError as exc:  # EAGAIN or EACCES: another process fetches this block
                if exc.errno not in (errno.EAGAIN, errno.EACCES):  # e.g. ENOLCK: no locks on this filesystem
                    log.warning("cannot lock blocks in %s (%s): processes sharing it may fetch a block twice",
                                self.directory, exc.strerror)
                    os.close(self._lock_fd)
                    self._lock_fd = -1
                    return
                if trio.current_time() >= give_up:
                    log.info("block %d of version %s: another process has fetched it for %gs; fetching "
                             "it here too", key[1], key[0][:12], self.peer_wait)
                    return
                await trio.sleep(_CLAIM_POLL)
                continue
            self._claimed.add(key)
            return

    @property
    def direct_io(self) -> bool:
        """Whether block files are written and read with ``O_DIRECT`` (False once the filesystem refused it)."""
        return self._files.direct

    @property
    def entries(self) -> int:
        """Number of blocks on disk."""
        return len(self._lru)

    def usage(self) -> tuple[int, int]:
        """``(bytes used on disk, size limit)``."""
        return self._bytes_used, self.size_limit

    def contains(self, ref: ProductRef, index: int) -> bool:
        """True when block ``index`` of ``ref`` is on disk (not yet verified: :meth:`load` may still miss)."""
        return (ref.version_key, index) in self._lru

    def touch(self, ref: ProductRef, index: int) -> None:
        """Mark a block as just used (LRU order), e.g. when served from a memory copy."""
        key = (ref.version_key, index)
        if key in self._lru:
            self._lru.move_to_end(key)

    def is_complete(self, ref: ProductRef) -> bool:
        """True when every block of ``ref`` is on disk."""
        present = self._by_version.get(ref.version_key)
        return present is not None and len(present) == block_count(ref.size)

    def is_verified(self, ref: ProductRef) -> bool:
        """True when the product's blocks on disk passed its whole-file checks and none changed since
        (the reader then skips its per-HDU FITS sums)."""
        return ref.version_key in self._verified

    async def load(self, ref: ProductRef, index: int) -> bytes | None:
        """The verified bytes of block ``index`` of ``ref``, or None (a miss).

        Reads the whole block in one thread hop and checks its header and crc32 against the expected
        index, length and version; a missing, short or corrupt file is deleted and counts as a miss.
        """
        vk = ref.version_key
        key = (vk, index)
        if key not in self._lru:
            return None
        start, end = block_span(index, ref.size)
        try:
            data = await self._run(self._read_sync, self._path(vk, index), bytes.fromhex(vk), index, end - start)
        except FileNotFoundError:  # evicted by another process using this directory
            if key in self._lru:
                await self._run(_unlink_all, self._forget(key))
            return None
        if data is None:
            self.corrupt_blocks += 1
            log.warning("block %d of %s was missing or corrupt on disk; fetching it again", index, ref.uri)
            if key in self._lru:
                await self._run(_unlink_all, self._forget(key))
            return None
        if key in self._lru:
            self._lru.move_to_end(key)
        return data

    async def store(self, ref: ProductRef, index: int, data: bytes) -> bool:
        """Write block ``index`` of ``ref`` (already verified by the caller) atomically, evicting least
        recently used blocks to stay under the size limit and above the free-space floor.

        Returns False (nothing stored) when the block cannot fit or the filesystem refuses the write
        (logged). Raises ValueError when ``data`` is not exactly the block's length.
        """
        vk = ref.version_key
        start, end = block_span(index, ref.size)
        if len(data) != end - start:
            raise ValueError(f"block {index} of {ref.uri} must be {end - start} bytes, not {len(data)}")
        key = (vk, index)
        while self._rescanned is not None:  # a store landing mid-rebuild would be lost from the index
            await self._rescanned.wait()
        if self._reserved == 0 and time.monotonic() - self._scanned_at > RESCAN_INTERVAL:
            self._rescanned = trio.Event()
            try:
                await self._load_index()  # what other processes stored and evicted meanwhile
            finally:
                self._rescanned.set()
                self._rescanned = None
        if key in self._lru:
            self._lru.move_to_end(key)
            return True
        need = HEADER_SIZE + len(data)
        if need > self.size_limit:
            return False
        doomed, versions = self._choose_victims(need)
        empty_dirs = [self._version_dir(v) for v in versions if v not in self._by_version and v != vk]
        if self._bytes_used + need > self.size_limit:  # the rest is being written by concurrent stores
            await self._run(self._remove_sync, doomed, empty_dirs)
            return False
        self._bytes_used += need  # reserved while the write runs
        first = vk not in self._product_of
        self._note_version(vk, ref.product_key)
        self._reserved += need
        try:
            stored, free = await self._run(self._write_sync, self._path(vk, index), index, bytes.fromhex(vk),
                                           data, doomed, empty_dirs, ref.checks() if first else None)
        except OSError as exc:
            self._bytes_used -= need
            log.warning("cannot write block %d of %s to the cache: %s", index, ref.uri, exc)
            return False
        finally:
            self._reserved -= need
        self._free_estimate = free
        if not stored:
            self._bytes_used -= need
            log.warning("cache disk has less than %d bytes free; block %d of %s not cached",
                        self.min_free, index, ref.uri)
            return False
        self._lru[key] = need
        self._by_version.setdefault(vk, set()).add(index)
        return True

    async def mark_verified(self, ref: ProductRef) -> bool:
        """Remember, on disk for every later instance, that the complete cached product passed the checks
        its reader ran over every block (its FITS DATASUM/CHECKSUM, for products without a whole-file
        digest), so :meth:`is_verified` holds and later reads skip those checks. Losing a block drops the
        mark, as for :meth:`verify_product`. Returns False, marking nothing, when a block is missing."""
        vk = ref.version_key
        if vk in self._verified:
            return True
        if not self.is_complete(ref):
            return False
        marker = os.path.join(self._version_dir(vk), _VERIFIED_MARKER)
        await self._run(_write_marker, marker)
        if not self.is_complete(ref):  # a block was evicted meanwhile
            await self._run(_unlink_all, [marker])
            return False
        self._verified.add(vk)
        return True

    async def verify_product(self, ref: ProductRef) -> bool | None:
        """Check a complete product against every whole-file digest known for it (``ref.sha256``, the
        content MD5 of a plain-MD5 ETag, S3 additional checksums: :meth:`ProductRef.checks`).

        Returns None when there is nothing to check (no digest known, or blocks missing), True when the
        blocks match (remembered on disk, so later instances need not re-hash), False when they do not:
        then every block of the product is deleted. A block found corrupt on the way is deleted and the
        answer is None (the product is no longer complete).
        """
        checks = ref.checks()
        if not _has_digest(checks) or not self.is_complete(ref):
            return None
        vk = ref.version_key
        if vk in self._verified:
            return True
        paths = [self._path(vk, index) for index in range(block_count(ref.size))]
        marker = os.path.join(self._version_dir(vk), _VERIFIED_MARKER)
        outcome, bad_index = await self._run(self._hash_product_sync, paths, bytes.fromhex(vk), ref.size,
                                             checks, marker)
        if outcome == "match":
            if self.is_complete(ref):
                self._verified.add(vk)
                return True
            await self._run(_unlink_all, [marker])  # a block was evicted meanwhile
            return None
        if outcome == "unreadable":
            if (vk, bad_index) in self._lru:
                self.corrupt_blocks += 1
                await self._run(_unlink_all, self._forget((vk, bad_index)))
            return None
        log.error("%s: cached blocks do not match the file's %s; dropping them", ref.uri, outcome)
        await self.drop(ref)
        return False

    async def discard(self, ref: ProductRef, index: int) -> None:
        """Delete block ``index`` of ``ref`` from disk (nothing when it is not there)."""
        key = (ref.version_key, index)
        if key in self._lru:
            await self._run(_unlink_all, self._forget(key))

    async def drop(self, ref: ProductRef) -> None:
        """Delete every block of ``ref`` from disk."""
        await self._drop_version(ref.version_key)

    async def drop_superseded(self, ref: ProductRef) -> int:
        """Delete the blocks of every other version of ``ref``'s product (the server now states
        ``ref.version``); returns how many versions went."""
        others = [vk for vk in self._versions_of.get(ref.product_key, ()) if vk != ref.version_key]
        for vk in others:
            await self._drop_version(vk)
        return len(others)

    async def _drop_version(self, vk: str) -> None:
        if vk not in self._product_of:
            return
        directory = self._version_dir(vk)
        for index in list(self._by_version.get(vk, ())):
            self._forget((vk, index))
        self._verified.discard(vk)
        pk = self._product_of.pop(vk)
        versions = self._versions_of.get(pk)
        if versions is not None:
            versions.discard(vk)
            if not versions:
                del self._versions_of[pk]
        await self._run(shutil.rmtree, directory, True)

    async def last_known(self, ref: ProductRef) -> ProductRef | None:
        """``ref`` as it was last pinned, from the version on disk holding most of its blocks (when the
        server cannot be asked: stale-if-error); None when no version of it is cached."""
        versions = [vk for vk in self._versions_of.get(ref.product_key, ()) if vk in self._by_version]
        if not versions:
            return None
        vk = max(versions, key=lambda v: len(self._by_version[v]))
        checks = await self._run(_read_checks, self._version_dir(vk))
        if checks is None or not isinstance(checks.get("version"), dict):
            return None
        stated = checks["version"]
        known = ProductRef(ref.uri, checks["size"], sha256=checks.get("sha256"), s3_key=ref.s3_key,
                           exclusive=ref.exclusive, version=ObjectVersion(
                               size=checks["size"], etag=stated.get("etag"), last_modified=stated.get("last_modified"),
                               version_id=stated.get("version_id"), checksums=tuple((checks.get("s3") or {}).items())))
        return known if known.version_key == vk else None

    def product_bytes(self, uri: str) -> int:
        """Bytes of ``uri`` on disk, over its versions (normally one: superseded ones are dropped)."""
        pk = hashlib.sha256(uri.encode()).hexdigest()
        return sum(self._lru.get((vk, index), HEADER_SIZE) - HEADER_SIZE
                   for vk in self._versions_of.get(pk, ()) for index in self._by_version.get(vk, ()))

    async def clear(self) -> None:
        """Delete every block (and leftover temporary file) of this cache directory."""
        self._lru.clear()
        self._by_version.clear()
        self._verified.clear()
        self._bytes_used = 0
        await self._run(self._clear_sync)

    async def verify(self) -> VerifyReport:
        """Read and check every block on disk (for ``mastfs cache verify``); delete corrupt ones and any
        leftover temporary file.

        Returns a :class:`VerifyReport`. Products that lose a block lose their verified mark.
        """
        report = VerifyReport()
        for key in list(self._lru):
            if key not in self._lru:
                continue
            vk, index = key
            path = self._path(vk, index)
            state, length = await self._run(self._check_file_sync, path, bytes.fromhex(vk), index)
            if state == "ok":
                report.blocks += 1
                report.bytes += length
            elif key in self._lru:
                report.corrupt += 1
                report.mixed += state == "mixed"
                report.corrupt_paths.append(path)
                self.corrupt_blocks += 1
                await self._run(_unlink_all, self._forget(key))
        for vk in list(self._by_version):
            checks = await self._run(_read_checks, self._version_dir(vk))
            if checks is None or not (_has_digest(checks) or checks.get("fits")) or vk in self._verified:
                continue
            if len(self._by_version.get(vk, ())) != block_count(checks["size"]):
                continue
            paths = [self._path(vk, index) for index in range(block_count(checks["size"]))]
            marker = os.path.join(self._version_dir(vk), _VERIFIED_MARKER)
            outcome, _ = await self._run(self._hash_product_sync, paths, bytes.fromhex(vk), checks["size"], checks,
                                         marker, bool(checks.get("fits")))
            if outcome == "unreadable":
                continue
            report.products_checked += 1
            if outcome == "match":
                self._verified.add(vk)
            else:
                report.products_failed += 1
                log.error("cached version %s does not match the file's %s; dropping it", vk[:16], outcome)
                await self._drop_version(vk)
        report.stray_files = await self._run(self._clean_tmp_sync)
        return report

    # ----------------------------------------------------------------- trio-side helpers

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    def _note_version(self, vk: str, pk: str) -> None:
        self._product_of[vk] = pk
        self._versions_of.setdefault(pk, set()).add(vk)

    def _version_dir(self, vk: str) -> str:
        return self._version_dir_of(self._product_of[vk], vk)

    def _version_dir_of(self, pk: str, vk: str) -> str:
        return os.path.join(self._blocks_dir, pk[:2], pk, vk)

    def _path(self, vk: str, index: int) -> str:
        return os.path.join(self._version_dir(vk), str(index))

    def _forget(self, key: BlockKey) -> list[str]:
        """Remove one block from the index; returns the files to delete (the block and, when its product
        was verified, the now stale verified marker)."""
        vk, index = key
        self._bytes_used -= self._lru.pop(key)
        present = self._by_version.get(vk)
        if present is not None:
            present.discard(index)
            if not present:
                del self._by_version[vk]
        doomed = [self._path(vk, index)]
        if vk in self._verified:
            self._verified.discard(vk)
            doomed.append(os.path.join(self._version_dir(vk), _VERIFIED_MARKER))
        return doomed

    def _choose_victims(self, need: int) -> tuple[list[str], set[str]]:
        """Forget least recently used blocks until ``need`` more bytes fit under the limit and the free
        space (as last measured) stays above ``min_free``. Returns the files to delete and the versions
        the victims belonged to."""
        doomed: list[str] = []
        versions: set[str] = set()
        freed = 0
        free = self._free_estimate
        while self._lru:
            over_limit = self._bytes_used + need > self.size_limit
            short_of_space = free is not None and free + freed - need < self.min_free
            if not (over_limit or short_of_space):
                break
            key = next(iter(self._lru))
            freed += self._lru[key]
            doomed += self._forget(key)
            versions.add(key[0])
        return doomed, versions

    # ----------------------------------------------------------------- worker-thread functions

    def _scan_sync(self) -> tuple[list[tuple[BlockKey, int]], set[str], dict[str, str], int]:
        os.makedirs(self._blocks_dir, exist_ok=True)
        removed = self._clean_tmp_sync()
        if removed:
            log.info("removed %d unfinished block writes from %s", removed, self._tmp_dir)
        found: list[tuple[float, BlockKey, int]] = []
        verified: set[str] = set()
        owners: dict[str, str] = {}
        for prefix in _subdirs(self._blocks_dir):
            for product in _subdirs(prefix.path):
                for version in _subdirs(product.path):
                    owners[version.name] = product.name
                    for entry in _scan_quietly(version.path):
                        if entry.name == _VERIFIED_MARKER:
                            verified.add(version.name)
                            continue
                        if entry.name == _VERSION_FILE:
                            continue
                        try:
                            stat = entry.stat(follow_symlinks=False)
                        except FileNotFoundError:  # evicted by another process meanwhile
                            continue
                        if not entry.name.isdigit() or stat.st_size <= HEADER_SIZE:
                            _unlink_all([entry.path])
                            continue
                        found.append((stat.st_mtime, (version.name, int(entry.name)), stat.st_size))
        found.sort(key=lambda item: item[0])
        return [(key, size) for _, key, size in found], verified, owners, _free_bytes(self.directory)

    def _clean_tmp_sync(self) -> int:
        os.makedirs(self._tmp_dir, exist_ok=True)
        leftovers = [entry.path for entry in os.scandir(self._tmp_dir) if _abandoned(entry)]
        _unlink_all(leftovers)
        return len(leftovers)

    def _clear_sync(self) -> None:
        shutil.rmtree(self._blocks_dir, ignore_errors=True)
        os.makedirs(self._blocks_dir, exist_ok=True)
        self._clean_tmp_sync()

    @staticmethod
    def _remove_sync(doomed: list[str], empty_dirs: list[str]) -> None:
        _unlink_all(doomed)
        for directory in empty_dirs:
            _unlink_all([os.path.join(directory, _VERSION_FILE), os.path.join(directory, _VERIFIED_MARKER)])
            for leaf in (directory, os.path.dirname(directory)):
                try:
                    os.rmdir(leaf)
                except OSError:
                    break  # not empty (a newer block or version arrived) or already gone

    def _write_sync(self, path: str, index: int, raw_vk: bytes, data: bytes, doomed: list[str],
                    empty_dirs: list[str], checks: dict[str, Any] | None) -> tuple[bool, int]:
        self._remove_sync(doomed, empty_dirs)
        free = _free_bytes(self.directory)
        if free - HEADER_SIZE - len(data) < self.min_free:
            return False, free
        header = _pack_header(index, data, raw_vk)
        tmp = os.path.join(self._tmp_dir, f"{os.getpid()}-{uuid.uuid4().hex}")
        self._files.write(tmp, header, data)
        try:
            try:
                os.rename(tmp, path)
            except FileNotFoundError:  # first block of this version, or its directory was just removed
                os.makedirs(os.path.dirname(path), exist_ok=True)
                os.rename(tmp, path)
        except OSError:
            _unlink_all([tmp])
            raise
        if checks is not None:
            _write_checks(os.path.dirname(path), checks)
        return True, free - HEADER_SIZE - len(data)

    def _read_sync(self, path: str, raw_vk: bytes, index: int, length: int) -> bytes | None:
        header, data = self._files.read(path, length + 1)  # one byte more reveals a too-long file
        if len(data) != length or not _header_ok(header, raw_vk, index, data):
            _unlink_all([path])
            return None
        try:
            _stamp(path)
        except OSError:
            pass
        return data

    @staticmethod
    def _check_file_sync(path: str, raw_vk: bytes, index: int) -> tuple[str, int]:
        """``("ok" | "mixed" | "corrupt", data length)``: "mixed" is a sound block of another version."""
        try:
            with open(path, "rb") as handle:
                header = handle.read(HEADER_SIZE)
                data = handle.read()
        except FileNotFoundError:
            return "corrupt", 0
        if _header_ok(header, raw_vk, index, data):
            return "ok", len(data)
        if len(header) == HEADER_SIZE and _header_ok(header, _HEADER.unpack_from(header)[4], index, data):
            return "mixed", len(data)
        return "corrupt", len(data)

    def _hash_product_sync(self, paths: list[str], raw_vk: bytes, size: int, checks: dict[str, Any],
                           marker: str, fits: bool = False) -> tuple[str, int]:
        """``("match" | "unreadable" | name of the failed check, bad block index)``; with ``fits`` also
        each HDU's DATASUM and CHECKSUM; writes ``marker`` on a match."""
        hashers = _whole_file_hashers(checks)
        hdus = FitsCheck(size) if fits else None
        previous: tuple[int, bytes] | None = None
        for index, path in enumerate(paths):
            start, end = block_span(index, size)
            try:
                data = self._read_sync(path, raw_vk, index, end - start)
            except FileNotFoundError:
                data = None
            if data is None:
                return "unreadable", index
            for hasher in hashers.values():
                hasher.update(data)
            if hdus is not None:
                try:
                    if previous is not None and hdus.next_header < start:  # a header across the boundary
                        hdus.add(*previous, more=data)
                    hdus.add(start, data)
                except HduMismatch as exc:
                    return f"FITS {exc}", index
                previous = (start, data)
        for name, hasher in hashers.items():
            if hasher.result() != hasher.expected:
                return name, -1
        _write_marker(marker)
        return "match", -1


class _Digest:
    """One whole-file digest being computed and the value it must reach."""

    def __init__(self, expected: str, update: Callable[[bytes], None], result: Callable[[], str]) -> None:
        self.expected = expected
        self.update = update
        self.result = result


def _whole_file_hashers(checks: dict[str, Any]) -> dict[str, _Digest]:
    """The digests to compute for ``checks`` (see :meth:`ProductRef.checks`), by check name."""
    digests: dict[str, _Digest] = {}
    for name, algorithm in (("sha256", "sha256"), ("md5", "md5")):
        if checks.get(name):
            hasher = hashlib.new(algorithm, usedforsecurity=False)
            digests[name] = _Digest(checks[name].lower(), hasher.update, hasher.hexdigest)
    for name, value in (checks.get("s3") or {}).items():
        if name == "ChecksumCRC32":
            digests[name] = _crc32_digest(value)
        elif name in ("ChecksumSHA256", "ChecksumSHA1"):
            hasher = hashlib.new(name[len("Checksum"):].lower())
            digests[name] = _Digest(value, hasher.update, partial(_b64_digest, hasher))
    return digests


def _b64_digest(hasher: Any) -> str:
    return base64.b64encode(hasher.digest()).decode()


def _crc32_digest(expected: str) -> _Digest:
    """A running CRC32 of the bytes, as S3 states it (base64 of the big-endian 32-bit value)."""
    state = [0]

    def update(data: bytes) -> None:
        state[0] = zlib.crc32(data, state[0])

    def result() -> str:
        return base64.b64encode(state[0].to_bytes(4, "big")).decode()

    return _Digest(expected, update, result)


def _has_digest(checks: dict[str, Any]) -> bool:
    return bool(checks.get("sha256") or checks.get("md5") or checks.get("s3"))


def _write_checks(directory: str, checks: dict[str, Any]) -> None:
    tmp = os.path.join(directory, f".{_VERSION_FILE}.{uuid.uuid4().hex}")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(checks, handle)
    os.rename(tmp, os.path.join(directory, _VERSION_FILE))


def _read_checks(directory: str) -> dict[str, Any] | None:
    """The checks a version directory recorded, or None when it has none (or they are unreadable)."""
    try:
        with open(os.path.join(directory, _VERSION_FILE), encoding="utf-8") as handle:
            checks = json.load(handle)
    except (OSError, ValueError):
        return None
    return checks if isinstance(checks, dict) and isinstance(checks.get("size"), int) else None


def _subdirs(path: str) -> list[os.DirEntry[str]]:
    """The subdirectories of ``path``; none when another process removed it meanwhile."""
    return [entry for entry in _scan_quietly(path) if entry.is_dir(follow_symlinks=False)]


def _lock_offset(key: BlockKey) -> int:
    """The byte of the lock file standing for block ``key`` (a 56-bit hash: collisions are harmless)."""
    digest = hashlib.blake2b(f"{key[0]}/{key[1]}".encode(), digest_size=7).digest()
    return int.from_bytes(digest, "little")


def _abandoned(entry: os.DirEntry[str]) -> bool:
    """Whether a temporary file is a write nobody will finish: its writer (the pid its name starts with)
    is gone, or it is older than STALE_TMP_AGE (pids are reused, and not shared across containers)."""
    pid_text = entry.name.split("-", 1)[0]
    try:
        if entry.stat(follow_symlinks=False).st_mtime < time.time() - STALE_TMP_AGE:
            return True
    except FileNotFoundError:  # its write just finished
        return False
    if not pid_text.isdigit():
        return True
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's live process
        pass
    return False


def _sizes_sync(paths: list[str]) -> list[int]:
    """The size of each file, -1 for a missing one."""
    sizes = []
    for path in paths:
        try:
            sizes.append(os.stat(path).st_size)
        except FileNotFoundError:
            sizes.append(-1)
    return sizes


def _scan_quietly(path: str) -> list[os.DirEntry[str]]:
    """The entries of directory ``path``; none when another process removed it meanwhile."""
    try:
        with os.scandir(path) as entries:
            return list(entries)
    except FileNotFoundError:
        return []


def _pack_header(index: int, data: bytes, raw_vk: bytes) -> bytes:
    body = _MAGIC, index, len(data), zlib.crc32(data), raw_vk
    head = _HEADER.pack(*body, 0)[: _HEADER.size - 4]
    return head + struct.pack("<I", zlib.crc32(head)) + b"\0" * _HEADER_PAD


def _header_ok(header: bytes, raw_vk: bytes, index: int, data: bytes) -> bool:
    if len(header) != HEADER_SIZE:
        return False
    magic, got_index, length, crc, got_vk, header_crc = _HEADER.unpack_from(header)
    return bool(
        magic == _MAGIC
        and header_crc == zlib.crc32(header[: _HEADER.size - 4])
        and got_index == index
        and got_vk == raw_vk
        and length == len(data)
        and crc == zlib.crc32(data)
    )


def _free_bytes(directory: str) -> int:
    stat = os.statvfs(directory)
    return stat.f_bavail * stat.f_frsize


class _BlockFiles:
    """Writes and reads whole block files, with ``O_DIRECT`` when ``direct`` and while the filesystem
    accepts it (else through the page cache).

    Thread-safe: each direct transfer borrows a page-aligned scratch buffer, kept for reuse; at most
    ``_DIRECT_TRANSFERS`` run at once, so there are at most that many buffers, each as big as the largest
    block file handled so far.
    """

    def __init__(self, direct: bool) -> None:
        self.direct = direct and hasattr(os, "O_DIRECT")
        self._buffers: queue.SimpleQueue[mmap.mmap] = queue.SimpleQueue()
        self._slots = threading.BoundedSemaphore(_DIRECT_TRANSFERS)

    def write(self, path: str, header: bytes, data: bytes) -> None:
        """Create ``path`` (exclusively, mode 0600) holding ``header`` then ``data``, with its modification
        time set to now. Raises OSError; a partial file may be left behind (the caller removes it)."""
        if self.direct:
            try:
                with self._slots:
                    self._write_direct(path, header, data)
                return
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self._refused()
                _unlink_all([path])
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            _write_all(fd, [header, data])
            _stamp(fd)
        finally:
            os.close(fd)

    def read(self, path: str, most: int) -> tuple[bytes, bytes]:
        """``(header, data)`` of the block file ``path``: its first HEADER_SIZE bytes (fewer if it is
        shorter) and up to ``most`` bytes after them. Raises FileNotFoundError or another OSError."""
        if self.direct:
            try:
                with self._slots:
                    return self._read_direct(path, most)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self._refused()
        fd = os.open(path, os.O_RDONLY)
        try:
            return os.pread(fd, HEADER_SIZE, 0), os.pread(fd, most, HEADER_SIZE)
        finally:
            os.close(fd)

    def _refused(self) -> None:
        if self.direct:
            log.info("the cache filesystem refuses direct I/O; using the page cache for block files")
        self.direct = False

    def _write_direct(self, path: str, header: bytes, data: bytes) -> None:
        length = len(header) + len(data)
        padded = _aligned(length)
        buffer = self._borrow(padded)
        try:
            buffer[:len(header)] = header
            buffer[len(header):length] = data
            buffer[length:padded] = bytes(padded - length)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o600)
            try:
                written = os.write(fd, memoryview(buffer)[:padded])
                if written != padded:  # only a full disk cuts a direct write short
                    raise OSError(errno.ENOSPC, f"short write of a block file ({written} of {padded} bytes)")
                if padded != length:
                    os.ftruncate(fd, length)
                _stamp(fd)
            finally:
                os.close(fd)
        finally:
            self._buffers.put(buffer)

    def _read_direct(self, path: str, most: int) -> tuple[bytes, bytes]:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:
            padded = _aligned(HEADER_SIZE + most)
            buffer = self._borrow(padded)
            try:
                got = os.preadv(fd, [memoryview(buffer)[:padded]], 0)  # a short read ends at the file's end
                return buffer[:min(got, HEADER_SIZE)], buffer[HEADER_SIZE:min(got, HEADER_SIZE + most)]
            finally:
                self._buffers.put(buffer)
        finally:
            os.close(fd)

    def _borrow(self, size: int) -> mmap.mmap:
        try:
            buffer = self._buffers.get_nowait()
        except queue.Empty:
            return mmap.mmap(-1, size)
        if len(buffer) < size:
            buffer.close()
            return mmap.mmap(-1, size)
        return buffer


def _aligned(length: int) -> int:
    """``length`` rounded up to the direct I/O alignment."""
    return -(-length // _DIRECT_ALIGN) * _DIRECT_ALIGN


def _write_all(fd: int, buffers: list[bytes]) -> None:
    views = [memoryview(buffer) for buffer in buffers]
    while views:
        written = os.writev(fd, views)
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if views and written:
            views[0] = views[0][written:]


def _stamp(target: int | str) -> None:
    """Set the modification time to now, finer than the kernel's clock tick: the LRU order on disk,
    which survives a remount."""
    now = time.time_ns()
    os.utime(target, ns=(now, now))


def _write_marker(path: str) -> None:
    with open(path, "wb"):
        pass


def _unlink_all(paths: list[str]) -> None:
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
