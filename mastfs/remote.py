"""``mast://``: the mount's view of the archive as an fsspec filesystem, for processes without FUSE.

``fsspec.filesystem("mast", mast_url=..., cache_dir=...)`` or ``fsspec.open("mast://program/2733/...")``:
the same tree (:mod:`mastfs.tree`, :mod:`mastfs.namespace`), the same services (``services.open_services``:
archive with its metadata cache, block cache, reader, fetchers) and the same settings as ``mastfs mount``
(storage options named like the keys of ``config.OPTIONS``, then ``MASTFS_*`` variables, the config
file, the defaults; the token from the same sources).

The trio core runs on ONE background thread per process (:class:`_Core`), started by the first call
and stopped at exit; a forked child starts its own. Every configuration in use gets its services once
per process. A filesystem pickles as its options only (fsspec's ``storage_options``), never a token.

Errors are Python's: FileNotFoundError (impossible names without any network request),
PermissionError (exclusive-access data without a token, with the how-to-login text), IsADirectoryError,
OSError(EIO) naming the cause once the deadline has passed, OSError(EROFS) from every write method.
"""

from __future__ import annotations

import atexit
import errno
import hashlib
import io
import json
import logging
import os
import threading
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from datetime import datetime, timezone
from typing import Any, TypeVar

import trio
from fsspec.callbacks import DEFAULT_CALLBACK
from fsspec.spec import AbstractBufferedFile, AbstractFileSystem

from . import namespace
from .auth import find_token, install_redaction
from .blockcache import BLOCK_SIZE, block_index
from .config import OPTIONS, Settings, load_settings
from .errors import InvalidName, MastfsError, NameTooLong, NotFound, NotPermitted, Unauthorized
from .tree import OpenFile

log = logging.getLogger(__name__)
T = TypeVar("T")

STOP_WAIT = 10.0
"""Seconds the exit handler waits for the core to let fetched blocks reach the disk."""
DEFAULT_BLOCK_SIZE = 16 * BLOCK_SIZE
"""How far an open file reads ahead of a sequential reader by default: 64 MiB, the mount's window (the
reader caps every stream's at what its memory holds, :func:`mastfs.reader.readahead_limit`)."""
DOWNLOAD_CHUNK = 8 * 1024 * 1024
"""Bytes per cross-thread read of :meth:`MastFileSystem.get_file`."""
_FSSPEC_OPTIONS = ("use_listings_cache", "listings_expiry_time", "max_paths", "asynchronous", "loop")
_SETTING_NAMES = frozenset(option.name for option in OPTIONS)


# ------------------------------------------------------------------------------------------- the core


class _Core:
    """The process's trio thread: runs the services of each configuration in use, and every call.

    :meth:`call` runs an async function there from any other thread (``trio.from_thread.run``) and
    returns its result or raises its exception. Not usable from the core thread itself.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._trio_token: Any = None
        self._stop: trio.Event | None = None
        self._nursery: trio.Nursery | None = None
        self._services: dict[str, Any] = {}
        self._opening: dict[str, trio.Event] = {}

    def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        return trio.from_thread.run(fn, *args, trio_token=self._started())

    def _started(self) -> Any:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                ready = threading.Event()
                self._thread = threading.Thread(target=trio.run, args=(self._main, ready), name="mastfs-core",
                                                daemon=True)
                self._thread.start()
                ready.wait()
            return self._trio_token

    async def _main(self, ready: threading.Event) -> None:
        self._stop = trio.Event()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._trio_token = trio.lowlevel.current_trio_token()
                ready.set()
                await self._stop.wait()  # then every _hold leaves its services, letting blocks reach disk
        finally:
            self._services.clear()
            self._nursery = None

    def stop(self) -> None:
        """End the core thread (blocks fetched reach the disk first, for at most STOP_WAIT seconds)."""
        with self._lock:
            thread = self._thread
            if thread is None or not thread.is_alive() or self._stop is None:
                return
            try:
                trio.from_thread.run_sync(self._stop.set, trio_token=self._trio_token)
            except trio.RunFinishedError:
                return
            thread.join(STOP_WAIT)

    async def services(self, key: str, settings: Settings, token: str | None) -> Any:
        """The services of the configuration ``key`` names (:func:`services_key`), built on first use
        (once, even for concurrent callers). Raises OSError when the cache directory is unusable."""
        while key not in self._services:
            opening = self._opening.get(key)
            if opening is not None:
                await opening.wait()
                continue
            opening = self._opening[key] = trio.Event()
            try:
                assert self._nursery is not None
                self._services[key] = await self._nursery.start(self._hold, settings, token)
            finally:
                del self._opening[key]
                opening.set()
        return self._services[key]

    async def _hold(self, settings: Settings, token: str | None,
                    task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        from .services import open_services

        async with open_services(settings, token) as services:
            task_status.started(services)
            assert self._stop is not None
            await self._stop.wait()


_core = _Core()


def services_key(settings: Settings, token: str | None) -> str:
    """What tells configurations apart: every setting and (a digest of) the token."""
    return json.dumps(asdict(settings), sort_keys=True) + hashlib.sha256((token or "").encode()).hexdigest()


def _new_core_after_fork() -> None:
    global _core
    _core = _Core()  # the parent's thread does not exist here


os.register_at_fork(after_in_child=_new_core_after_fork)
atexit.register(lambda: _core.stop())


# ------------------------------------------------------------------------------------------ errors


def _python_error(exc: MastfsError, path: str) -> OSError:
    """The Python exception for a mastfs error about ``path``."""
    if isinstance(exc, NameTooLong):
        return OSError(errno.ENAMETOOLONG, str(exc), path)
    if isinstance(exc, NotFound | InvalidName):
        return FileNotFoundError(errno.ENOENT, str(exc), path)
    if isinstance(exc, Unauthorized):
        return PermissionError(errno.EACCES, f"{exc}: {exc.reason}" if exc.reason else str(exc), path)
    if isinstance(exc, NotPermitted):
        return IsADirectoryError(errno.EISDIR, str(exc), path)
    return OSError(exc.errno, f"{type(exc).__name__}: {exc}", path)


def _read_only(*args: Any, **kwargs: Any) -> None:
    raise OSError(errno.EROFS, "mast:// is read-only")


# -------------------------------------------------------------------------------------- filesystem


class MastFileSystem(AbstractFileSystem):  # type: ignore[misc]  # fsspec has no type hints
    """The MAST archive as an fsspec filesystem (protocol ``mast``); see the module docstring.

    Storage options: any key of ``mastfs.config.OPTIONS`` (``mast_url``, ``s3_endpoint``, ``cache_dir``,
    ``collections``, ``token_file``, ``deadline``, ...), parsed like the flags of ``mastfs mount``.
    Raises TypeError for an unknown option, ValueError for a bad value, PermissionError when the
    ``token_file`` is unusable.
    """

    protocol = "mast"
    root_marker = ""
    cachable = False  # each instance reads the token sources anew; services are shared per configuration
    blocksize = DEFAULT_BLOCK_SIZE

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        settings_options = {k: v for k, v in options.items() if k not in _FSSPEC_OPTIONS}
        unknown = set(settings_options) - _SETTING_NAMES
        if unknown:
            raise TypeError(f"unknown mast:// options {', '.join(sorted(unknown))} "
                            f"(known: {', '.join(sorted(_SETTING_NAMES))})")
        self.settings = load_settings(flags=settings_options)
        try:
            token = find_token(self.settings)
        except Unauthorized as exc:
            raise _python_error(exc, self.settings.token_file) from None
        install_redaction(token)
        self._token = token  # fsspec pickles a filesystem as its storage options: never the token
        self._services_key = services_key(self.settings, token)

    # ------------------------------------------------------------------ plumbing

    def _call(self, path: str, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run ``fn(tree, *args)`` on the core; mastfs errors become Python's (about ``path``)."""

        async def with_tree() -> T:
            services = await _core.services(self._services_key, self.settings, self._token)
            return await fn(services.tree, *args)

        try:
            return _core.call(with_tree)
        except MastfsError as exc:
            raise _python_error(exc, path) from None

    @staticmethod
    def _inner(path: str) -> str:
        return "/" + str(MastFileSystem._strip_protocol(path)).strip("/")

    @staticmethod
    def _describe(name: str, node: Any, attributes: Any) -> dict[str, Any]:
        info = {"name": name, "size": attributes.size, "type": "directory" if attributes.is_dir else "file",
                "mtime": attributes.mtime, "mode": attributes.mode}
        fields = getattr(node, "product", None) or getattr(node, "observation", None)
        if fields is not None:
            info.update(namespace.mast_fields(fields.fields))
        if hasattr(node, "product"):
            info["uri"] = node.product.data_uri
        return info

    # ------------------------------------------------------------------ reading the tree

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        """Size, type, mtime (unix seconds), mode and every ``mast_*`` field of ``path``."""
        name = self._strip_protocol(path)

        async def describe(tree: Any) -> dict[str, Any]:
            node = await tree.resolve_path(self._inner(path))
            return self._describe(name, node, await tree.attributes(node))

        return self._call(path, describe)

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        """The entries of directory ``path`` (of a file: the file itself), as :meth:`info` dicts or names."""
        base = self._strip_protocol(path).strip("/")

        async def listing(tree: Any) -> list[dict[str, Any]]:
            node = await tree.resolve_path(self._inner(path))
            if not node.is_dir:
                return [self._describe(base, node, await tree.attributes(node))]
            return [self._describe(f"{base}/{child.name}" if base else child.name, child,
                                   await tree.attributes(child))
                    for child in await tree.children_of(node)]

        entries = self._call(path, listing)
        return entries if detail else [entry["name"] for entry in entries]

    def modified(self, path: str) -> datetime:
        return datetime.fromtimestamp(self.info(path)["mtime"], tz=timezone.utc)

    created = modified

    # ------------------------------------------------------------------ reading bytes

    def _open(self, path: str, mode: str = "rb", block_size: int | str | None = None, autocommit: bool = True,
              cache_options: dict[str, Any] | None = None, **kwargs: Any) -> MastFile:
        if mode != "rb":
            _read_only()
        readahead = self.blocksize if block_size is None or block_size == "default" else int(block_size)
        return MastFile(self, path, block_size=readahead, cache_type=kwargs.get("cache_type", "none"),
                        cache_options=cache_options)

    def open_product(self, path: str, readahead_blocks: int | None = None) -> Any:
        """An OpenFile of ``path`` (tree.open_node) whose stream reads ahead at most ``readahead_blocks``
        (None: not at all; reads of one caller arrive in order, so only contiguous reads are sequential)."""

        async def opening(tree: Any) -> Any:
            node = await tree.resolve_path(self._inner(path))
            return await tree.open_node(node, slack=0, max_readahead=readahead_blocks or 0)

        return self._call(path, opening)

    def read_open(self, path: str, open_file: Any, offset: int, length: int) -> bytes:
        """``length`` bytes of an :meth:`open_product` file at ``offset`` (fewer at its end)."""

        async def reading(tree: Any) -> bytes:
            return bytes(await tree.read_open(open_file, offset, length))

        return self._call(path, reading)

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        """Bytes ``[start, end)`` of ``path`` (negative: from the end; None: the whole file); a long range
        is read in DOWNLOAD_CHUNK pieces by a stream reading ahead (the cache's memory stays bounded)."""
        open_file = self.open_product(path, readahead_blocks=DEFAULT_BLOCK_SIZE // BLOCK_SIZE)
        size = _size_of(open_file)
        first, last = _position(start, size, 0), _position(end, size, size)
        if last - first <= DOWNLOAD_CHUNK:
            return self.read_open(path, open_file, first, max(0, last - first))
        buffer = io.BytesIO()
        self._copy(path, open_file, buffer, first, last, DEFAULT_CALLBACK)
        return buffer.getvalue()

    def cat_ranges(self, paths: list[str], starts: list[int | None] | int | None,
                   ends: list[int | None] | int | None, max_gap: int | None = None,
                   on_error: str = "return", **kwargs: Any) -> list[Any]:
        """Bytes of each ``(path, start, end)`` (an exception in its place on failure, unless ``on_error``
        is "raise"), all read concurrently in one call to the core. Ranges are coalesced into the cache's
        blocks: ranges of one file whose blocks overlap or adjoin are read as one span, so each block is
        fetched once and consecutive missing blocks go in one ranged request; ``max_gap`` is not needed
        (a block never touched is never fetched)."""
        count = len(paths)
        starts = starts if isinstance(starts, list) else [starts] * count
        ends = ends if isinstance(ends, list) else [ends] * count
        if not (len(starts) == len(ends) == count):
            raise ValueError("paths, starts and ends must have the same length")
        inner = [self._inner(path) for path in paths]

        async def read_all(tree: Any) -> list[Any]:
            results: list[Any] = [None] * count

            async def read_group(open_file: Any, group: list[tuple[int, int, int]]) -> None:
                start, end = group[0][0], max(last for _, last, _ in group)
                try:
                    data = await tree.read_open(open_file, start, end - start)
                except MastfsError as exc:
                    data = exc
                for first, last, position in group:
                    results[position] = data if isinstance(data, MastfsError) else bytes(
                        data[first - start:last - start])

            async with trio.open_nursery() as nursery:
                for path in dict.fromkeys(inner):
                    positions = [p for p in range(count) if inner[p] == path]
                    try:
                        open_file = await tree.open_node(await tree.resolve_path(path), slack=0, max_readahead=0)
                    except MastfsError as exc:
                        for position in positions:
                            results[position] = exc
                        continue
                    size = _size_of(open_file)
                    wanted = sorted((_position(starts[p], size, 0), _position(ends[p], size, size), p)
                                    for p in positions)
                    for group in _adjoining(wanted):
                        nursery.start_soon(read_group, open_file, group)
            failures = [(p, r) for p, r in enumerate(results) if isinstance(r, MastfsError)]
            if failures and on_error != "return":
                raise failures[0][1]
            for position, failure in failures:
                results[position] = _python_error(failure, paths[position])
            return results

        return self._call(paths[0] if paths else "", read_all)

    def get_file(self, rpath: str, lpath: str, callback: Any = DEFAULT_CALLBACK, outfile: Any = None,
                 **kwargs: Any) -> None:
        """Download ``rpath`` to ``lpath`` (a directory: made), reading ahead; ``callback`` learns the
        size and each chunk written. Resumable: bytes go to ``<lpath>.<version>.part`` first (renamed
        when complete), and an interrupted download of the same product version continues there."""
        if self.isdir(rpath):
            os.makedirs(lpath, exist_ok=True)
            return
        open_file = self.open_product(rpath, readahead_blocks=DEFAULT_BLOCK_SIZE // BLOCK_SIZE)
        size = _size_of(open_file)
        version = open_file.ref.version_key[:16] if open_file.ref is not None else "virtual"
        callback.set_size(size)
        if outfile is not None:
            self._copy(rpath, open_file, outfile, 0, size, callback)
            return
        os.makedirs(os.path.dirname(os.path.abspath(lpath)), exist_ok=True)
        partial = f"{lpath}.{version}.part"
        done = os.path.getsize(partial) if os.path.exists(partial) else 0
        if done > size:
            done = 0
        with open(partial, "r+b" if done else "wb") as local:
            local.seek(done)
            local.truncate()
            callback.relative_update(done)
            self._copy(rpath, open_file, local, done, size, callback)
        os.replace(partial, lpath)

    def _copy(self, rpath: str, open_file: Any, local: Any, offset: int, end: int, callback: Any) -> None:
        """Write bytes ``[offset, end)`` of an :meth:`open_product` file to ``local``, chunk by chunk."""
        while offset < end:
            data = self.read_open(rpath, open_file, offset, min(DOWNLOAD_CHUNK, end - offset))
            local.write(data)
            offset += len(data)
            callback.relative_update(len(data))

    # ------------------------------------------------------------------ writing: never

    mkdir = makedirs = rmdir = rm_file = _rm = rm = touch = cp_file = mv = _read_only
    put_file = pipe_file = copy = move = rename = _read_only


def _position(value: int | None, size: int, default: int) -> int:
    """A start or end offset made absolute (negative: from the end), clipped to ``[0, size]``."""
    if value is None:
        return default
    return max(0, size + value) if value < 0 else min(value, size)


def _adjoining(ranges: list[tuple[int, int, int]]) -> list[list[tuple[int, int, int]]]:
    """``(start, end, position)`` ranges sorted by start, grouped where the cache blocks they touch
    overlap or adjoin (an empty range joins any group)."""
    groups: list[list[tuple[int, int, int]]] = []
    last_block = -2
    for first, last, position in ranges:
        if groups and (last <= first or block_index(first) <= last_block + 1):
            groups[-1].append((first, max(first, last), position))
        else:
            groups.append([(first, max(first, last), position)])
        if last > first:
            last_block = max(last_block, block_index(last - 1))
    return groups


def _size_of(open_file: OpenFile) -> int:
    if open_file.ref is not None:
        return open_file.ref.size
    assert open_file.content is not None  # a virtual file
    return open_file.content.size


class MastFile(AbstractBufferedFile):  # type: ignore[misc]
    """A read-only random-access file of ``mast://``. Reads go to the process's block cache (64 KiB
    first block, 4 MiB blocks after it, a memory LRU of recent ones). ``block_size`` is how far it reads
    ahead of a sequential reader, in whole cache blocks (0: never; contiguous reads are sequential,
    others are not, so a sparse ``.section`` cutout fetches only the blocks it touches). fsspec's own
    cache stays off unless ``cache_type`` asks for one."""

    def __init__(self, fs: MastFileSystem, path: str, block_size: int, cache_type: str,
                 cache_options: dict[str, Any] | None) -> None:
        self._product = fs.open_product(path, readahead_blocks=-(-int(block_size) // BLOCK_SIZE))
        super().__init__(fs, path, mode="rb", block_size=block_size, cache_type=cache_type,
                         cache_options=cache_options, size=_size_of(self._product))

    def _fetch_range(self, start: int, end: int) -> bytes:
        data: bytes = self.fs.read_open(self.path, self._product, start, end - start)
        return data

