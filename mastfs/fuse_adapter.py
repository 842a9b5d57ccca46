"""The FUSE adapter: the only module importing pyfuse3.

Maps each kernel request to :class:`mastfs.tree.Tree` and converts its answers to pyfuse3 types. Every
handler is wrapped in :func:`boundary`: a mastfs error becomes its errno (``errors.errno_for``), anything
else is logged with its traceback and becomes EIO, so no exception ever reaches pyfuse3 (which would end
the mount). Every write operation is EROFS.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, NoReturn, TypeVar

import pyfuse3

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

from .errors import (
    Interrupted,
    InvalidName,
    MastfsError,
    NotFound,
    NotPermitted,
    ReadOnly,
    Unauthorized,
    errno_for,
)
from .interrupts import InterruptWatch
from .tree import MEMO_TTL, STAT_BLOCK_SIZE, Attributes, Tree

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

RETRIED_READ_WINDOW = 1.0
"""Seconds after a failed read during which the kernel's own retry on the same handle fails at once."""
NEGATIVE_TIMEOUT = 10.0
"""Seconds the kernel may remember that a name does not exist."""
_INODE_HANDLERS = frozenset({"lookup", "getattr", "opendir", "open", "getxattr", "listxattr"})
_HANDLE_HANDLERS = frozenset({"read", "release"})
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_TRUNC | os.O_CREAT


def _leaf_errors(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaf_errors(inner)]
    return [exc]


def boundary(handler: F) -> F:
    """Wrap a handler: FUSEError passes; a MastfsError (alone or as the only kind in an exception
    group) becomes FUSEError(its errno), logged at DEBUG for "does not exist" and at WARNING otherwise;
    anything else is logged with its traceback and becomes EIO. Cancellation passes through."""

    @functools.wraps(handler)
    async def wrapper(self: Operations, *args: Any) -> Any:
        try:
            return await handler(self, *args)
        except pyfuse3.FUSEError:
            raise
        except Exception as exc:
            leaves = _leaf_errors(exc)
            if all(isinstance(leaf, MastfsError) for leaf in leaves):
                first = leaves[0]
                code = errno_for(first)
                if isinstance(first, NotFound | NotPermitted | ReadOnly | Unauthorized | Interrupted) or (
                        code in (errno.ENODATA, errno.EOPNOTSUPP)):
                    if log.isEnabledFor(logging.DEBUG):  # where() costs a path walk: not for every probe
                        log.debug("%s %s: %s", handler.__name__, self.where(handler.__name__, args), first)
                else:
                    log.warning("%s %s failed (%s): %s", handler.__name__, self.where(handler.__name__, args),
                                errno.errorcode.get(code, code), first)
                raise pyfuse3.FUSEError(code) from None
            log.error("%s %s failed unexpectedly (EIO)", handler.__name__, self.where(handler.__name__, args),
                      exc_info=exc)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper  # type: ignore[return-value]




def _refusal(name: str, error: type[MastfsError], message: str) -> Callable[..., Coroutine[Any, Any, NoReturn]]:
    """A handler named ``name`` that refuses every request with ``error(message)`` (through
    :func:`boundary`, so it is logged like any other refusal)."""

    async def refuse(self: Operations, *args: Any) -> NoReturn:
        raise error(message)

    refuse.__name__ = refuse.__qualname__ = name
    return boundary(refuse)


def _pid(ctx: Any) -> int:
    """The requesting thread's pid from a request context (0 when unknown)."""
    return getattr(ctx, "pid", 0) or 0


def _decode(name: bytes) -> str:
    try:
        return name.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidName("name is not valid UTF-8") from None


def entry_attributes(attributes: Attributes) -> pyfuse3.EntryAttributes:
    """pyfuse3's view of :class:`~mastfs.tree.Attributes`, with the kernel cache timeouts."""
    entry = pyfuse3.EntryAttributes()
    entry.st_ino = attributes.ino
    entry.generation = 0
    entry.entry_timeout = MEMO_TTL  # the kernel keeps entries exactly as long as the tree keeps listings
    entry.attr_timeout = MEMO_TTL
    entry.st_mode = attributes.mode
    entry.st_nlink = attributes.nlink
    entry.st_uid = attributes.uid
    entry.st_gid = attributes.gid
    entry.st_rdev = 0
    entry.st_size = attributes.size
    entry.st_blksize = STAT_BLOCK_SIZE
    entry.st_blocks = (attributes.size + 511) // 512
    mtime_ns = int(attributes.mtime * 1e9)
    entry.st_atime_ns = entry.st_mtime_ns = entry.st_ctime_ns = mtime_ns
    return entry


def _negative_entry() -> pyfuse3.EntryAttributes:
    entry = pyfuse3.EntryAttributes()
    entry.st_ino = 0
    entry.entry_timeout = NEGATIVE_TIMEOUT
    return entry


class Operations(pyfuse3.Operations):
    """pyfuse3 handlers over a :class:`~mastfs.tree.Tree`."""

    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, tree: Tree) -> None:
        super().__init__()
        self.tree = tree
        self.interrupts = InterruptWatch()
        """Ends the waits of requesters interrupted by a signal (run ``interrupts.run()`` beside serving)."""
        self._openers: dict[int, int] = {}
        self._failed_reads: dict[int, tuple[float, MastfsError]] = {}
        self._dir_handles: dict[int, tuple[list[tuple[str, Attributes]], list[Any]]] = {}
        self._next_dir_handle = 1

    def where(self, handler: str, args: tuple[Any, ...]) -> str:
        """The path a request is about, for log lines (best effort, never raises)."""
        try:
            if handler in _HANDLE_HANDLERS:
                return self.tree.handle_path(args[0])
            if handler in _INODE_HANDLERS:
                path = self.tree.node(args[0]).path_text
                if handler == "lookup":
                    path = path.rstrip("/") + "/" + os.fsdecode(args[1])
                return path
        except Exception:  # a log helper must never fail the request it describes
            pass
        return repr(args[:2])

    # ------------------------------------------------------------------------------------- names

    @boundary
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        try:
            attributes = await self.interrupts.call(_pid(ctx), lambda: self.tree.lookup(parent_inode, _decode(name)))
            return entry_attributes(attributes)
        except NotFound as exc:
            if errno_for(exc) != errno.ENOENT:  # ENAMETOOLONG
                raise
            log.debug("lookup %r in %d: %s", name, parent_inode, exc)
            return _negative_entry()  # ENOENT, remembered by the kernel for NEGATIVE_TIMEOUT

    @boundary
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return entry_attributes(await self.tree.getattr(inode))

    @boundary
    async def forget(self, inode_list: Any) -> None:
        """The kernel dropped references; nodes it no longer knows leave memory (numbers stay per path)."""
        for inode, count in inode_list:
            self.tree.forget(inode, count)

    # ------------------------------------------------------------------------------- directories

    @boundary
    async def opendir(self, inode: int, ctx: Any) -> int:
        """Snapshot the listing once per open, so readdir continuations page through one consistent list;
        ``.`` and ``..`` come first, as on a local disk. The snapshot holds the nodes, not their
        attributes (made as readdir hands each out)."""

        async def listing() -> tuple[list[tuple[str, Attributes]], list[Any]]:
            return await self.tree.dot_entries(inode), await self.tree.listdir(inode)

        entries = await self.interrupts.call(_pid(ctx), listing)
        handle = self._next_dir_handle
        self._next_dir_handle += 1
        self._dir_handles[handle] = entries
        return handle

    @boundary
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        listing = self._dir_handles.get(fh)
        if listing is None:
            raise NotFound(f"no open directory handle {fh}")
        dots, nodes = listing
        for index in range(start_id, len(dots) + len(nodes)):
            if index < len(dots):
                name, attributes = dots[index]
            else:
                node = nodes[index - len(dots)]
                name, attributes = node.name, await self.tree.attributes(node)
            if not pyfuse3.readdir_reply(token, name.encode("utf-8"), entry_attributes(attributes), index + 1):
                break
            if index >= len(dots):  # the kernel takes a reference to each entry but . and ..
                self.tree.remember(attributes.ino)

    @boundary
    async def releasedir(self, fh: int) -> None:
        _dots, nodes = self._dir_handles.pop(fh, None) or ((), [])
        self.tree.release_listing([node.ino for node in nodes])

    # ------------------------------------------------------------------------------------- files

    @boundary
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        if flags & _WRITE_FLAGS:
            raise ReadOnly("mastfs is read-only")
        opener = _pid(ctx)
        handle = await self.interrupts.call(opener, lambda: self.tree.open(inode))
        self._openers[handle] = opener
        if self.tree.opened_changed(handle):
            # The file's version or size is not what the kernel was shown: it must ask for the
            # attributes again (attributes only: no page lock is involved, so this cannot deadlock
            # inside open) and drop the pages it cached of the old version (keep_cache off).
            self._invalidate_attributes(inode)
            return pyfuse3.FileInfo(fh=handle, keep_cache=False)
        return pyfuse3.FileInfo(fh=handle, keep_cache=True)

    @boundary
    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:  # type: ignore[override]  # any buffer suits pyfuse3
        """Reads carry no requester, so the process that opened ``fh`` stands for it (interruptions).

        When a page-cache read fails, the kernel at once asks again for the page the reader needs, as a
        new request on the same handle; that request fails at once with the same error (once, within
        RETRIED_READ_WINDOW), so a read(2) ends within one deadline, not two."""
        failed = self._failed_reads.pop(fh, None)
        if failed is not None and time.monotonic() - failed[0] < RETRIED_READ_WINDOW:
            raise failed[1]
        try:
            return await self.interrupts.call(self._openers.get(fh, 0), lambda: self.tree.read(fh, off, size))
        except MastfsError as exc:
            if errno_for(exc) == errno.EIO:
                self._failed_reads[fh] = (time.monotonic(), exc)
            raise

    @boundary
    async def release(self, fh: int) -> None:
        self._openers.pop(fh, None)
        self._failed_reads.pop(fh, None)
        self.tree.release(fh)

    @boundary
    async def flush(self, fh: int) -> None:
        """Nothing is ever buffered for writing."""

    # ------------------------------------------------------------------------------------ xattrs

    @boundary
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        return await self.tree.getxattr(inode, _decode(name))

    @boundary
    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        return [name.encode("utf-8") for name in await self.tree.listxattr(inode)]

    setxattr = _refusal("setxattr", NotPermitted, "extended attributes are read-only")
    removexattr = _refusal("removexattr", NotPermitted, "extended attributes are read-only")

    # -------------------------------------------------------------------------------- filesystem

    @boundary
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        stats = self.tree.statfs()
        data = pyfuse3.StatvfsData()
        data.f_bsize = stats.block_size
        data.f_frsize = stats.block_size
        data.f_blocks = stats.blocks
        data.f_bfree = stats.blocks_free
        data.f_bavail = stats.blocks_free
        data.f_files = stats.files
        data.f_ffree = 0
        data.f_favail = 0
        data.f_namemax = stats.name_max
        return data

    # ------------------------------------------------------------------------- writes: all EROFS

    setattr = _refusal("setattr", ReadOnly, "mastfs is read-only")
    mknod = _refusal("mknod", ReadOnly, "mastfs is read-only")
    mkdir = _refusal("mkdir", ReadOnly, "mastfs is read-only")
    unlink = _refusal("unlink", ReadOnly, "mastfs is read-only")
    rmdir = _refusal("rmdir", ReadOnly, "mastfs is read-only")
    symlink = _refusal("symlink", ReadOnly, "mastfs is read-only")
    rename = _refusal("rename", ReadOnly, "mastfs is read-only")
    link = _refusal("link", ReadOnly, "mastfs is read-only")
    create = _refusal("create", ReadOnly, "mastfs is read-only")
    write = _refusal("write", ReadOnly, "mastfs is read-only")

    @boundary
    async def fsync(self, fh: int, datasync: bool) -> None:
        """Nothing to flush: the filesystem is read-only."""

    @boundary
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        """Nothing to flush: the filesystem is read-only."""

    # ---------------------------------------------------------------------------- kernel caches

    def invalidate(self, inodes: list[int]) -> None:
        """Ask the kernel to drop what it cached about ``inodes`` (after a refresh); best effort."""
        for inode in inodes:
            self._invalidate_attributes(inode, attr_only=False)

    @staticmethod
    def _invalidate_attributes(inode: int, attr_only: bool = True) -> None:
        try:
            pyfuse3.invalidate_inode(inode, attr_only=attr_only)
        except OSError as exc:
            if exc.errno != errno.ENOENT:  # the kernel had nothing cached for it
                log.debug("invalidate inode %d: %s", inode, exc)


def mount_options(allow_other: bool) -> set[str]:
    """The mount options: read-only, the kernel checks modes (default_permissions), shown as ``mastfs``
    (type ``fuse.mastfs``); ``allow_other`` when asked. (``max_read`` is not used: pyfuse3 rejects it.)"""
    options = {"fsname=mastfs", "subtype=mastfs", "ro", "default_permissions", "noatime"}
    if allow_other:
        options.add("allow_other")
    return options


def init(operations: Operations, mountpoint: str, options: set[str]) -> None:
    """Mount (``pyfuse3.init``). Raises RuntimeError when the kernel refuses."""
    pyfuse3.init(operations, mountpoint, options)


async def serve() -> None:
    """Serve kernel requests until the filesystem is unmounted or :func:`terminate` is called."""
    await pyfuse3.main()


def terminate() -> None:
    """End :func:`serve` from the trio thread."""
    pyfuse3.terminate()


def close(unmount: bool) -> None:
    """Release the session; unmount too when ``unmount`` (the kernel has not already done it)."""
    pyfuse3.close(unmount=unmount)
