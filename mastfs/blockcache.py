"""BlockCache: the persistent, bounded, crash-safe on-disk store of file blocks.

Geometry (shared with :mod:`mastfs.reader`): block 0 holds bytes [0, 64 KiB) so reading a FITS header costs
at most 64 KiB on the wire; block i >= 1 holds [64 KiB + (i-1) * 4 MiB, 64 KiB + i * 4 MiB), clipped to the
file size. See docs/caching.md for the on-disk layout.

Keys: a product version is ``sha256(uri, size[, sha256])`` in hex (:attr:`ProductRef.version_key`); file
names never contain the uri. Every block file starts with a 64-byte header (magic, block index, data length,
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
hop per block. One process per cache directory at a time.
"""

from __future__ import annotations

import errno
import hashlib
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
from functools import cached_property
from typing import Any, TypeVar

import trio

log = logging.getLogger(__name__)

HEADER_BLOCK_SIZE = 64 * 1024
"""Size of block 0: the first read of a file (a FITS header) never costs more on the wire."""
BLOCK_SIZE = 4 * 1024 * 1024
"""Size of every later block."""

LAYOUT = "blocks-v1"
"""Directory name of the current layout; a change of geometry or header format gets a new name."""
_MAGIC = b"MFB1"
_HEADER = struct.Struct("<4sQQI32sI")  # magic, index, data length, crc32(data), version key, crc32(header)
HEADER_SIZE = 64
_HEADER_PAD = HEADER_SIZE - _HEADER.size
_VERIFIED_MARKER = "verified"
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
    cloud), ``exclusive`` whether it needs a token.
    """

    uri: str
    size: int
    sha256: str | None = None
    s3_key: str | None = None
    exclusive: bool = False

    @cached_property
    def version_key(self) -> str:
        """Hex sha256 of uri, size and (when known) sha256: the product version's name on disk."""
        identity = f"{self.uri}\0{self.size}\0{self.sha256 or ''}"
        return hashlib.sha256(identity.encode()).hexdigest()


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
    stray_files: int = 0
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

    def __init__(self, directory: str, size_limit: int, min_free: int, *, direct_io: bool = True) -> None:
        self.directory = os.path.abspath(directory)
        self.size_limit = size_limit
        self.min_free = min_free
        self._blocks_dir = os.path.join(self.directory, LAYOUT)
        self._tmp_dir = os.path.join(self.directory, "tmp")
        self._limiter = trio.CapacityLimiter(_THREADS)
        self._lru: OrderedDict[BlockKey, int] = OrderedDict()  # key -> bytes on disk, oldest first
        self._by_version: dict[str, set[int]] = {}
        self._verified: set[str] = set()
        self._bytes_used = 0
        self._free_estimate: int | None = None
        self._opened = False
        self._files = _BlockFiles(direct_io)
        self.corrupt_blocks = 0

    # ----------------------------------------------------------------- public API

    async def open(self) -> None:
        """Create the directories, delete leftover temporary files and load the index from disk.

        Idempotent. Raises OSError when the directory cannot be created or read.
        """
        if self._opened:
            return
        entries, verified, free = await self._run(self._scan_sync)
        for key, size in entries:
            self._lru[key] = size
            self._by_version.setdefault(key[0], set()).add(key[1])
            self._bytes_used += size
        self._verified = {vk for vk in verified if vk in self._by_version}
        self._free_estimate = free
        self._opened = True
        log.debug("block cache %s: %d blocks, %d bytes", self.directory, len(self._lru), self._bytes_used)

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
        data = await self._run(self._read_sync, self._path(vk, index), bytes.fromhex(vk), index, end - start)
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
        try:
            stored, free = await self._run(self._write_sync, self._path(vk, index), index, bytes.fromhex(vk),
                                           data, doomed, empty_dirs)
        except OSError as exc:
            self._bytes_used -= need
            log.warning("cannot write block %d of %s to the cache: %s", index, ref.uri, exc)
            return False
        self._free_estimate = free
        if not stored:
            self._bytes_used -= need
            log.warning("cache disk has less than %d bytes free; block %d of %s not cached",
                        self.min_free, index, ref.uri)
            return False
        self._lru[key] = need
        self._by_version.setdefault(vk, set()).add(index)
        return True

    async def verify_product(self, ref: ProductRef) -> bool | None:
        """Check a complete product against ``ref.sha256``.

        Returns None when there is nothing to check (no sha256 known, or blocks missing), True when the
        blocks match (remembered on disk, so later instances need not re-hash), False when they do not:
        then every block of the product is deleted. A block found corrupt on the way is deleted and the
        answer is None (the product is no longer complete).
        """
        if not ref.sha256 or not self.is_complete(ref):
            return None
        vk = ref.version_key
        if vk in self._verified:
            return True
        paths = [self._path(vk, index) for index in range(block_count(ref.size))]
        marker = os.path.join(self._version_dir(vk), _VERIFIED_MARKER)
        outcome, bad_index = await self._run(self._hash_product_sync, paths, bytes.fromhex(vk), ref.size,
                                             ref.sha256, marker)
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
        log.error("%s: cached blocks do not match its sha256 %s; dropping them", ref.uri, ref.sha256)
        await self.drop(ref)
        return False

    async def drop(self, ref: ProductRef) -> None:
        """Delete every block of ``ref`` from disk."""
        vk = ref.version_key
        for index in list(self._by_version.get(vk, ())):
            self._forget((vk, index))
        self._verified.discard(vk)
        await self._run(shutil.rmtree, self._version_dir(vk), True)

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
            ok, length = await self._run(self._check_file_sync, path, bytes.fromhex(vk), index)
            if ok:
                report.blocks += 1
                report.bytes += length
            elif key in self._lru:
                report.corrupt += 1
                report.corrupt_paths.append(path)
                self.corrupt_blocks += 1
                await self._run(_unlink_all, self._forget(key))
        report.stray_files = await self._run(self._clean_tmp_sync)
        return report

    # ----------------------------------------------------------------- trio-side helpers

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    def _version_dir(self, vk: str) -> str:
        return os.path.join(self._blocks_dir, vk[:2], vk)

    def _path(self, vk: str, index: int) -> str:
        return os.path.join(self._blocks_dir, vk[:2], vk, str(index))

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

    def _scan_sync(self) -> tuple[list[tuple[BlockKey, int]], set[str], int]:
        os.makedirs(self._blocks_dir, exist_ok=True)
        removed = self._clean_tmp_sync()
        if removed:
            log.info("removed %d unfinished block writes from %s", removed, self._tmp_dir)
        found: list[tuple[float, BlockKey, int]] = []
        verified: set[str] = set()
        for prefix in os.scandir(self._blocks_dir):
            if not prefix.is_dir(follow_symlinks=False):
                continue
            for version in os.scandir(prefix.path):
                if not version.is_dir(follow_symlinks=False):
                    continue
                for entry in os.scandir(version.path):
                    if entry.name == _VERIFIED_MARKER:
                        verified.add(version.name)
                        continue
                    stat = entry.stat(follow_symlinks=False)
                    if not entry.name.isdigit() or stat.st_size <= HEADER_SIZE:
                        _unlink_all([entry.path])
                        continue
                    found.append((stat.st_mtime, (version.name, int(entry.name)), stat.st_size))
        found.sort(key=lambda item: item[0])
        return [(key, size) for _, key, size in found], verified, _free_bytes(self.directory)

    def _clean_tmp_sync(self) -> int:
        os.makedirs(self._tmp_dir, exist_ok=True)
        leftovers = [entry.path for entry in os.scandir(self._tmp_dir)]
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
            try:
                os.rmdir(directory)
            except OSError:
                pass  # not empty (a newer block arrived) or already gone

    def _write_sync(self, path: str, index: int, raw_vk: bytes, data: bytes, doomed: list[str],
                    empty_dirs: list[str]) -> tuple[bool, int]:
        self._remove_sync(doomed, empty_dirs)
        free = _free_bytes(self.directory)
        if free - HEADER_SIZE - len(data) < self.min_free:
            return False, free
        header = _pack_header(index, data, raw_vk)
        tmp = os.path.join(self._tmp_dir, uuid.uuid4().hex)
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
        return True, free - HEADER_SIZE - len(data)

    def _read_sync(self, path: str, raw_vk: bytes, index: int, length: int) -> bytes | None:
        try:
            header, data = self._files.read(path, length + 1)  # one byte more reveals a too-long file
        except FileNotFoundError:
            return None
        if len(data) != length or not _header_ok(header, raw_vk, index, data):
            _unlink_all([path])
            return None
        try:
            _stamp(path)
        except OSError:
            pass
        return data

    @staticmethod
    def _check_file_sync(path: str, raw_vk: bytes, index: int) -> tuple[bool, int]:
        try:
            with open(path, "rb") as handle:
                header = handle.read(HEADER_SIZE)
                data = handle.read()
        except FileNotFoundError:
            return False, 0
        return _header_ok(header, raw_vk, index, data), len(data)

    def _hash_product_sync(self, paths: list[str], raw_vk: bytes, size: int, expected: str,
                           marker: str) -> tuple[str, int]:
        digest = hashlib.sha256()
        for index, path in enumerate(paths):
            start, end = block_span(index, size)
            data = self._read_sync(path, raw_vk, index, end - start)
            if data is None:
                return "unreadable", index
            digest.update(data)
        if digest.hexdigest() != expected.lower():
            return "mismatch", -1
        with open(marker, "wb"):
            pass
        return "match", -1


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


def _unlink_all(paths: list[str]) -> None:
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
