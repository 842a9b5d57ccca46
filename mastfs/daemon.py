"""The mastfs daemon: builds the services in one place, mounts, serves, and unmounts cleanly.

Entry points for the CLI: :func:`mount_command` (foreground or detached), :func:`umount_command`,
:func:`control_socket_path` and :func:`control_request` (the control channel client).

Control channel: a unix socket (mode 0600, in a 0700 directory of the mounting user) whose path derives
from the mountpoint. A client sends one JSON object on one line and reads JSON lines until one holds
``"end": true``:

- ``{"op": "status"}`` -> one line: ``mountpoint``, ``version``, ``mast_url``, ``source``, ``cache``
  (dir, used, limit, blocks), ``reader`` (ByteReader.stats(): transfers in flight, bytes fetched per
  source, hits and misses, reads and runs waiting, transfer slots, errors by type), ``mast`` (API requests
  and failures, and ``queries``: the metadata queries in flight with ``what``, ``seconds``, ``pages``,
  ``pages_total``, ``rows``, ``polls``, ``transient_errors``), ``interrupted`` (requests whose wait ended
  because a signal interrupted the requester) and ``token`` (TokenKeeper.status(): source, state, MAST
  user, last check; never the token).
- ``{"op": "refresh", "path": P}`` -> one line: drops cached metadata at and below P (``invalidated``:
  how many inodes the kernel was told to forget).
- ``{"op": "prefetch", "path": P, "level": N?, "type": T?, "jobs": J?, "recommended": bool?}`` ->
  ``{"event": "start", "files", "bytes"}``; ``{"event": "progress", "bytes_cached", "bytes", "files_finished"}`` every 0.5 s;
  ``{"event": "file", "path", "size", "status": "done"|"skipped"|"failed", "reason", "fetched"}`` per
  product as it finishes; last ``{"event": "summary", "ok", "done", "skipped", "failed", "bytes",
  "end": true}``.
Paths are absolute paths under the mountpoint or paths inside the mount (``/program/2733``). Failures
answer ``{"ok": false, "error": "...", "end": true}``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import gc
import hashlib
import json
import logging
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from . import __version__, namespace
from .auth import TokenKeeper, find_token_and_source
from .config import Settings
from .errors import BadResponse, MastfsError, Unavailable
from .tree import Tree

if TYPE_CHECKING:
    from .archive import Archive
    from .blockcache import BlockCache
    from .mast.client import MastClient
    from .reader import ByteReader

log = logging.getLogger(__name__)

MOUNT_WAIT = 30.0
PROBE_WAIT = 5.0
"""Seconds the one probe of MAST after mounting may take (``mastfs mount`` waits this long at most for it)."""
"""Seconds a background mount may take to become live before ``mount`` gives up."""
UMOUNT_BUSY_WAIT = 2.0
"""Seconds ``umount`` retries a busy unmount before detaching lazily."""
READ_AHEAD_KB = 256
"""The mount's bdi read-ahead: the kernel sends reads of up to 256 KiB (its default, 128 KiB, is slower per
byte). Not more: the kernel's readahead window starts at 16 KiB and grows 4x at once when it is under a
sixteenth of this, so with 512 KiB or more the third 4 KiB read of a file (astropy reading a FITS header)
already asks for bytes up to 80 KiB, past the 64 KiB a header read may cost on the wire; with 256 KiB it
stops at 48 KiB (measured: docs/benchmarks.md)."""
MALLOC_MMAP_THRESHOLD = 32 * 1024 * 1024
"""glibc malloc serves allocations below this from its heaps (reused memory) instead of fresh mmaps."""
MALLOC_TRIM_THRESHOLD = 64 * 1024 * 1024
"""glibc malloc keeps up to this much freed memory at the top of a heap instead of returning it."""
MALLOC_ARENA_MAX = 1
"""glibc malloc arenas: one for every thread, so a block freed by one thread is reused by another (with a
second arena for the worker threads, the daemon's RSS crept up by a few MB per GiB read; measured no
slower)."""
QUIET_LOGGERS = ("httpx", "httpcore", "botocore", "boto3", "urllib3", "s3transfer", "hpack", "filelock")
PROGRESS_INTERVAL = 0.5
"""Seconds between progress lines of a prefetch."""
_CONTROL_LINE_MAX = 1 << 20


# --------------------------------------------------------------------------------------------- logging


def configure_logging(settings: Settings) -> None:
    """Root logger at ``settings.log_level`` to ``settings.log_file`` (else stderr); third-party loggers
    at WARNING unless debugging. Idempotent."""
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    if settings.log_file:
        os.makedirs(os.path.dirname(os.path.abspath(settings.log_file)), exist_ok=True)
        handler: logging.Handler = logging.FileHandler(settings.log_file)
    else:
        handler = logging.StreamHandler(sys.stderr)
    under_journal = bool(os.environ.get("JOURNAL_STREAM")) and not settings.log_file
    fmt = "%(levelname)s %(name)s: %(message)s" if under_journal else \
        "%(asctime)s %(levelname)s %(name)s: %(message)s"
    handler.setFormatter(logging.Formatter(fmt))
    root.addHandler(handler)
    root.setLevel(settings.log_level)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if settings.log_level == "DEBUG" else logging.WARNING)
    logging.getLogger("pyfuse3").setLevel(logging.INFO if settings.log_level == "DEBUG" else logging.WARNING)


# ------------------------------------------------------------------------------------------- services


@dataclass
class Services:
    """Everything a mount needs, built by :func:`open_services`."""

    tree: Tree
    archive: Archive
    reader: ByteReader
    cache: BlockCache
    client: MastClient
    tokens: TokenKeeper
    mast_probe: MastProbe = field(default_factory=lambda: MastProbe())


class MastProbe:
    """Whether MAST answered the one probe made after mounting: ``state`` is "pending", "ok" or
    "unreachable" (then ``problem`` says why)."""

    def __init__(self) -> None:
        self.state = "pending"
        self.problem = ""

    async def run(self, client: Any, mast_url: str) -> None:
        """Probe MAST once; log one WARNING when it cannot be reached. Never raises (but cancellation)."""
        try:
            await client.probe(PROBE_WAIT)
        except (Unavailable, BadResponse) as exc:
            self.state, self.problem = "unreachable", str(exc)
            log.warning("MAST cannot be reached at %s (%s); listings and reads that need it fail "
                        "with EIO until it can (mastfs status shows the errors)", mast_url, exc)
        except MastfsError:
            self.state = "ok"  # it answered, if only to refuse
        else:
            self.state = "ok"

    def as_dict(self) -> dict[str, str]:
        return {"state": self.state, "problem": self.problem}


@contextlib.asynccontextmanager
async def open_services(settings: Settings, token: str | TokenKeeper | None) -> AsyncIterator[Services]:
    """Build the HTTP client, MastClient, Archive, BlockCache, fetchers and ByteReader, and the Tree over
    them; close them all on exit. ``token`` is the mount's TokenKeeper (a plain token: one that is never
    re-read). Raises OSError when the cache directory is unusable."""
    from .archive import Archive
    from .blockcache import BlockCache, ProductRef
    from .fetch.http import HttpFetcher
    from .fetch.s3 import S3Fetcher
    from .mast.client import MastClient, make_http_client
    from .reader import ByteReader
    from .retry import RetryPolicy

    os.makedirs(settings.cache_dir, mode=0o700, exist_ok=True)
    os.chmod(settings.cache_dir, 0o700)  # blocks of exclusive-access data may live here
    policy = RetryPolicy.from_settings(settings)
    tokens = token if isinstance(token, TokenKeeper) else TokenKeeper(settings, token, "given" if token else "none",
                                                                        renewable=False)
    async with make_http_client(settings) as http:
        client = MastClient(http, settings, token_provider=tokens.current)
        archive = Archive(client, settings)
        cache = BlockCache(settings.blocks_dir, settings.cache_size, settings.min_free_space,
                           peer_wait=settings.deadline)
        http_fetcher = HttpFetcher(http, settings.mast_url, tokens, policy, settings.token_hosts)
        s3_fetcher = S3Fetcher(settings, policy) if settings.source != "http" else None
        try:
            async with ByteReader(cache, http_fetcher, s3_fetcher, settings.source,
                                  settings.transfers, deadline=settings.deadline) as reader:
                tree = Tree(archive, reader, settings, has_token=tokens.current() is not None,
                            product_ref=ProductRef, cache_usage=cache.usage,
                            cached_bytes=functools.partial(cached_bytes, cache))
                yield Services(tree, archive, reader, cache, client, tokens)
        finally:
            await archive.aclose()


def cached_bytes(cache: BlockCache, uri: str) -> int:
    """How many bytes of the product ``uri`` the block cache holds (blocks on disk, not yet re-verified)."""
    return cache.product_bytes(uri)


# ------------------------------------------------------------------------------------------ mounting


def _mount_entry(mountpoint: str) -> tuple[str, str] | None:
    """``(major:minor, fstype)`` of the mount at ``mountpoint`` from /proc/self/mountinfo (no stat, so it
    never waits on a FUSE server, ours included), or None when nothing is mounted there."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return None
    found = None
    for line in lines:
        fields = line.split()
        if len(fields) < 10:
            continue
        point = fields[4].encode().decode("unicode_escape")
        if point == mountpoint:
            separator = fields.index("-")
            found = (fields[2], fields[separator + 1])  # the last one is on top
    return found


def tune_malloc() -> bool:
    """Make glibc malloc reuse the memory of freed blocks (best effort; a no-op elsewhere). Returns
    whether every setting was taken.

    By default glibc serves each 4 MiB block buffer with a fresh mmap, and returns it to the kernel when
    it is freed: every block then costs page faults and zeroing of 1,024 new pages, and on a VM that hands
    freed memory back to its host, fetching those pages again. With a higher mmap threshold, a high trim
    threshold and a single arena, block buffers come from heap memory the daemon already holds (its peak
    stays bounded by the reader's memory limits).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    settings = ((_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD),
                (_M_ARENA_MAX, MALLOC_ARENA_MAX))
    taken = [mallopt(option, value) == 1 for option, value in settings]
    log.debug("malloc tuning taken: %s", taken)
    return all(taken)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # glibc's <malloc.h>

METADATA_SWING = 10_000
"""Inodes in memory gained or lost, product rows of expired listings let go, or MAST query pages received
(a thousandth), after which freed heap memory is handed back to the kernel (malloc_trim): a 300,000-product
listing leaves its pages' garbage behind, the kernel forgetting its inodes frees their nodes, and its
layout goes when its memo expires."""
TRIM_CHECK_INTERVAL = 2.0


async def hand_back_memory(services: Services, interval: float = TRIM_CHECK_INTERVAL) -> None:
    """Forever: after a large swing of metadata memory (see :data:`METADATA_SWING`), call glibc's
    ``malloc_trim(0)`` so the daemon's RSS follows what it holds (the malloc tuning above keeps freed
    memory otherwise). A no-op without glibc."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return
    trim.argtypes = [ctypes.c_size_t]
    last_nodes, last_rows, last_pages = 0, 0, 0
    while True:
        await trio.sleep(interval)
        services.tree.sweep_memos()
        held = services.tree.stats()
        nodes, rows = held["nodes"], held["memo_rows"]
        pages = services.client.stats()["requests"].get("invoke", 0)
        if (abs(nodes - last_nodes) >= METADATA_SWING or last_rows - rows >= METADATA_SWING
                or pages - last_pages >= METADATA_SWING // 1000):
            services.tree.compact()
            gc.collect()
            trim(0)
            last_nodes, last_pages = nodes, pages
        last_rows = rows


def raise_read_ahead(mountpoint: str, kilobytes: int = READ_AHEAD_KB) -> bool:
    """Set the mount's bdi ``read_ahead_kb`` (root only; best effort). Returns whether it was set."""
    entry = _mount_entry(mountpoint)
    if entry is None:
        return False
    path = f"/sys/class/bdi/{entry[0]}/read_ahead_kb"
    try:
        with open(path, "w", encoding="ascii") as handle:
            handle.write(str(kilobytes))
    except OSError as exc:
        log.debug("cannot set %s (%s); the kernel keeps 128 KiB reads", path, exc.strerror)
        return False
    log.debug("read_ahead_kb of %s set to %d", mountpoint, kilobytes)
    return True


FUSECTL = "/sys/fs/fuse/connections"
MAX_BACKGROUND = 64
"""FUSE requests the kernel lets wait on the daemon at once in the background (page-cache reads and
readahead are background requests). The kernel's default, 12, queues the 13th concurrent read in the
kernel until another ends, so it could take two deadlines; the daemon bounds the waits itself."""


def raise_max_background(mountpoint: str, value: int = MAX_BACKGROUND) -> bool:
    """Let ``value`` background requests of the mount reach the daemon at once (and start congestion at
    three quarters of it), through the fusectl filesystem at :data:`FUSECTL` (root only, and only where it
    is mounted, as systemd does at boot; best effort). Returns whether it was set."""
    entry = _mount_entry(mountpoint)
    if entry is None or entry[0].split(":")[0] != "0":
        return False
    directory = os.path.join(FUSECTL, entry[0].split(":")[1])
    try:
        for name, number in (("max_background", value), ("congestion_threshold", value * 3 // 4)):
            with open(os.path.join(directory, name), "w", encoding="ascii") as handle:
                handle.write(str(number))
    except OSError as exc:
        log.debug("cannot raise the FUSE background limit in %s (%s); the kernel lets 12 reads wait at once",
                  directory, exc.strerror)
        return False
    log.debug("FUSE background limit of %s raised to %d", mountpoint, value)
    return True


def _sd_notify(state: str) -> None:
    """Send ``state`` to systemd's $NOTIFY_SOCKET, if any (Type=notify)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("cannot notify systemd (%s): %s", state, exc)


def _fusermount(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["fusermount3", *args], capture_output=True, text=True, check=False)


def python_module_command(module: str, *args: str) -> list[str]:
    """``python -m module args`` with this interpreter, except that the child never imports from its
    current directory (where a folder named ``mastfs``, e.g. a clone of the repository, would shadow the
    installed package)."""
    bootstrap = ("import runpy, sys; sys.path[:] = [p for p in sys.path if p not in ('', '.')]; "
                 "runpy.run_module(sys.argv.pop(1), run_name='__main__', alter_sys=True)")
    return [sys.executable, "-c", bootstrap, module, *args]  # the module stays visible in ps


def prepare_mountpoint(mountpoint: str) -> str | None:
    """Check ``mountpoint`` is an empty directory, creating it (with a note on stderr) when missing and
    unmounting the dead remains of a crashed daemon ("Transport endpoint is not connected") first.
    Returns a message naming what is wrong (a missing parent, a file in the way, ...), or None."""
    if not os.path.lexists(mountpoint):
        parent = os.path.dirname(mountpoint.rstrip("/")) or "/"
        if not os.path.exists(parent):
            return f"cannot create the mount point {mountpoint}: its parent directory {parent} does not exist"
        if not os.path.isdir(parent):
            return f"cannot create the mount point {mountpoint}: {parent} is a file, not a directory"
        try:
            os.mkdir(mountpoint)
        except OSError as exc:
            return f"cannot create the mount point {mountpoint}: {exc.strerror}"
        print(f"mastfs: created the mount point {mountpoint}", file=sys.stderr)
        return None
    if _mount_entry(mountpoint) is not None:
        try:
            os.statvfs(mountpoint)  # always answered by the filesystem's server (no kernel cache)
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:
                return f"cannot use {mountpoint}: {exc.strerror}"
            log.warning("%s is the dead mount of a crashed daemon (Transport endpoint is not connected): "
                        "unmounting it", mountpoint)
            result = _fusermount("-u", "-z", mountpoint)
            if result.returncode != 0:
                return f"{mountpoint} is a dead mount and fusermount3 -uz failed: {result.stderr.strip()}"
        else:
            return f"{mountpoint} is already a mount point (mastfs umount {mountpoint} first?)"
    if not os.path.isdir(mountpoint):
        return f"{mountpoint} is a file, not a directory: mount on an empty directory"
    if os.listdir(mountpoint):
        return f"{mountpoint} is not empty; mount on an empty directory so no files are hidden"
    return None


async def _serve(settings: Settings, mountpoint: str, token: TokenKeeper) -> int:
    """Mount, serve until unmounted or signalled, and unmount; returns the exit status (1 when the kernel
    refused the mount or the mount never answered)."""
    from . import fuse_ops  # here, not above: mast:// users of open_services need no FUSE library

    async with open_services(settings, token) as services:
        operations = fuse_ops.Operations(services.tree)
        options = fuse_ops.mount_options(settings.allow_other)
        # Computed before mounting: realpath stats the mountpoint, which once mounted is served by this
        # very thread (a self-deadlock). Likewise this process never touches its own mount: a thread of
        # it waiting on the mount could not be killed (not even by SIGKILL) once the main loop is gone.
        control_path = control_socket_path(mountpoint)
        try:
            fuse_ops.init(operations, mountpoint, options)
        except RuntimeError as exc:
            log.error("cannot mount %s: %s (see the lines above from fusermount3)", mountpoint, exc)
            return 1
        raise_max_background(mountpoint)  # before the first request: no read may queue in the kernel
        stop = _Stop()
        try:
            async with trio.open_nursery() as nursery:

                async def serve_fuse() -> None:
                    # Returns when the kernel ends the session (fusermount3 -u) or after stop.request().
                    await fuse_ops.serve()
                    stop.kernel_ended = not stop.requested
                    nursery.cancel_scope.cancel()

                nursery.start_soon(serve_fuse)
                nursery.start_soon(operations.interrupts.run)
                nursery.start_soon(services.tokens.watch, services.client.whoami)
                nursery.start_soon(hand_back_memory, services)
                nursery.start_soon(_watch_signals, stop)
                await nursery.start(_serve_control, control_path, settings, mountpoint, services, operations)
                # A statfs through the kernel, from another process, proves the mount answers (served by
                # serve_fuse above).
                with trio.move_on_after(MOUNT_WAIT) as waited:
                    probe = await trio.run_process(["stat", "--file-system", "--", mountpoint], check=False,
                                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                if waited.cancelled_caught or probe.returncode != 0:
                    log.error("the mount at %s did not answer within %gs; giving up", mountpoint, MOUNT_WAIT)
                    stop.request()
                    return 1
                raise_read_ahead(mountpoint)
                log.info("mastfs %s mounted %s at %s (cache %s)", __version__, settings.mast_url, mountpoint,
                         settings.cache_dir)
                _sd_notify("READY=1")
                nursery.start_soon(services.mast_probe.run, services.client, settings.mast_url)
        finally:
            _sd_notify("STOPPING=1")
            # After the kernel ended the session there is nothing left to unmount.
            fuse_ops.close(unmount=not stop.kernel_ended)
            log.info("unmounted %s", mountpoint)
    return 0


class _Stop:
    """Graceful stop: end the FUSE loop (requests in progress finish), then unmount."""

    def __init__(self) -> None:
        self.requested = False
        self.kernel_ended = False

    def request(self) -> None:
        if not self.requested:
            self.requested = True
            from . import fuse_ops

            fuse_ops.terminate()


async def _watch_signals(stop: _Stop) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("%s: unmounting", signal.Signals(signum).name)
            stop.request()


def run_foreground(settings: Settings, mountpoint: str) -> int:
    """Mount in this process and serve until unmounted or SIGTERM/SIGINT; returns the exit status."""
    configure_logging(settings)
    tune_malloc()
    try:
        token, source = find_token_and_source(settings)
    except MastfsError as exc:
        log.error("%s (%s)", exc, getattr(exc, "reason", ""))
        return 1
    try:
        return trio.run(_serve, settings, mountpoint, TokenKeeper(settings, token, source))
    except OSError as exc:  # the cache directory cannot be created or read
        log.error("cannot start: %s", exc)
        return 1


def _log_path(settings: Settings) -> str:
    return settings.log_file or os.path.join(settings.cache_dir, "mastfs.log")


def start_background(settings: Settings, mountpoint: str) -> int:
    """Start the daemon detached (new session, log to the log file) and return 0 once the mount is
    live, or 1 (printing the daemon's last log lines) if it dies or takes longer than MOUNT_WAIT."""
    log_path = _log_path(settings)
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    child_settings = settings.replace(log_file=log_path)
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    start_offset = os.path.getsize(log_path) if os.path.exists(log_path) else 0
    with open(log_path, "ab") as log_file:
        child = subprocess.Popen(
            python_module_command("mastfs.daemon", mountpoint),
            stdin=subprocess.PIPE, stdout=log_file, stderr=log_file, env=env, start_new_session=True,
        )
    assert child.stdin is not None
    child.stdin.write(json.dumps(asdict(child_settings)).encode())
    child.stdin.close()
    deadline = time.monotonic() + MOUNT_WAIT
    while time.monotonic() < deadline:
        if child.poll() is not None:
            break
        if _mount_entry(mountpoint) is not None and os.path.ismount(mountpoint):
            print(f"mastfs: mounted at {mountpoint} (log: {log_path})", file=sys.stderr)
            _report_probe(mountpoint, settings.mast_url)
            return 0
        time.sleep(0.05)
    else:
        child.terminate()
    with open(log_path, encoding="utf-8", errors="replace") as handle:
        handle.seek(start_offset)
        lines = handle.read().splitlines()[-15:]
    print(f"mastfs: mounting {mountpoint} failed; last log lines ({log_path}):", file=sys.stderr)
    print("\n".join(lines), file=sys.stderr)
    return 1


def mount_command(settings: Settings, mountpoint: str, foreground: bool) -> int:
    """``mastfs mount``: check the mountpoint, then mount in the foreground or start the daemon detached.
    Returns the process exit status (0 once the mount is live / after a clean foreground unmount)."""
    mountpoint = os.path.abspath(mountpoint)
    problem = prepare_mountpoint(mountpoint)
    if problem:
        print(f"mastfs: {problem}", file=sys.stderr)
        return 1
    if foreground:
        return run_foreground(settings, mountpoint)
    return start_background(settings, mountpoint)


def _report_probe(mountpoint: str, mast_url: str) -> None:
    """Print the daemon's WARNING when its probe found MAST unreachable (waiting for the probe at most
    PROBE_WAIT plus a second; the mount is already live)."""
    deadline = time.monotonic() + PROBE_WAIT + 1.0
    while time.monotonic() < deadline:
        try:
            status = list(control_request(mountpoint, {"op": "status"}, timeout=2.0))[-1]
        except (MastfsError, IndexError):  # the control socket may come up just after the mount
            time.sleep(0.1)
            continue
        probe = status.get("mast_probe") or {}
        if probe.get("state") == "unreachable":
            print(f"mastfs: WARNING: MAST cannot be reached at {mast_url} ({probe.get('problem')}); listings "
                  "and reads that need it fail with EIO until it can", file=sys.stderr)
            return
        if probe.get("state") != "pending":
            return
        time.sleep(0.1)


def umount_command(mountpoint: str) -> int:
    """``mastfs umount``: unmount (retrying a busy mount for UMOUNT_BUSY_WAIT, then detaching it lazily
    so reads in flight finish). Returns 0 when unmounted, 1 with a message otherwise."""
    mountpoint = os.path.abspath(mountpoint)
    if _mount_entry(mountpoint) is None:
        print(f"mastfs: {mountpoint} is not mounted", file=sys.stderr)
        return 1
    deadline = time.monotonic() + UMOUNT_BUSY_WAIT
    while True:
        result = _fusermount("-u", mountpoint)
        if result.returncode == 0:
            return 0
        if "busy" not in result.stderr.lower() or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if "busy" in result.stderr.lower():
        lazy = _fusermount("-u", "-z", mountpoint)
        if lazy.returncode == 0:
            print(f"mastfs: {mountpoint} was busy; detached it (open files keep working until closed)",
                  file=sys.stderr)
            return 0
        result = lazy
    print(f"mastfs: cannot unmount {mountpoint}: {result.stderr.strip()}", file=sys.stderr)
    return 1


# ------------------------------------------------------------------------------------ control channel


def _control_dirs() -> list[str]:
    dirs = []
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        dirs.append(os.path.join(runtime, "mastfs"))
    dirs.append(f"/tmp/mastfs-{os.getuid()}")
    return dirs


def control_socket_path(mountpoint: str) -> str:
    """The control socket of the daemon serving ``mountpoint``:
    ``$XDG_RUNTIME_DIR/mastfs/<id>.sock`` (else ``/tmp/mastfs-<uid>/<id>.sock``), where ``<id>`` is the
    first 16 hex digits of the sha1 of the mountpoint's real path."""
    digest = hashlib.sha1(os.path.realpath(mountpoint).encode()).hexdigest()[:16]
    return os.path.join(_control_dirs()[0], f"{digest}.sock")


def remove_stale_sockets(directory: str) -> list[str]:
    """Remove the control sockets in ``directory`` that no daemon listens on any more (a killed daemon
    leaves its socket behind); returns their paths. Sockets that answer, or whose state is unclear, stay."""
    removed = []
    for entry in os.scandir(directory):
        if not entry.name.endswith(".sock") or not stat.S_ISSOCK(entry.stat(follow_symlinks=False).st_mode):
            continue
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.setblocking(False)
        try:
            probe.connect(entry.path)
        except ConnectionRefusedError:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                removed.append(entry.path)
        except OSError:  # busy (EAGAIN), gone meanwhile, ...: leave it
            pass
        finally:
            probe.close()
    if removed:
        log.info("removed %d control socket(s) of daemons that are gone", len(removed))
    return removed


def _private_dir(path: str) -> None:
    """Create ``path`` mode 0700, refusing one that is a symlink or someone else's."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise OSError(errno.EPERM, f"{path} is not a directory of uid {os.getuid()}")
    if stat.S_IMODE(info.st_mode) != 0o700:
        os.chmod(path, 0o700)


def control_request(mountpoint: str, message: dict[str, Any], timeout: float | None = 30.0) -> Iterator[dict[str, Any]]:
    """Send ``message`` to the daemon serving ``mountpoint`` and yield its answers until the last one
    (``"end": true``). Raises Unavailable when no daemon answers there. ``timeout`` bounds each wait for
    a line (None: wait as long as it takes, e.g. for a long prefetch)."""
    digest = os.path.basename(control_socket_path(mountpoint))
    candidates = [os.path.join(directory, digest) for directory in _control_dirs()]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        for path in candidates:
            try:
                sock.connect(path)
                break
            except OSError:
                continue
        else:
            raise Unavailable(f"no mastfs daemon answers for {mountpoint} (is it mounted?)")
        sock.sendall(json.dumps(message).encode() + b"\n")
        with sock.makefile("rb") as stream:
            for line in stream:
                answer = json.loads(line)
                yield answer
                if answer.get("end"):
                    return
        raise Unavailable(f"the mastfs daemon for {mountpoint} closed the connection early")
    except TimeoutError as exc:
        raise Unavailable(f"the mastfs daemon for {mountpoint} did not answer in time") from exc
    finally:
        sock.close()


async def _serve_control(path: str, settings: Settings, mountpoint: str, services: Services, operations: Any,
                         task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the control socket at ``path`` (best effort: without it the mount still works)."""
    listener_socket = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        _private_dir(os.path.dirname(path))
        await trio.to_thread.run_sync(remove_stale_sockets, os.path.dirname(path))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        old_umask = os.umask(0o177)  # the socket is created mode 0600
        try:
            await listener_socket.bind(path)
        finally:
            os.umask(old_umask)
        listener_socket.listen(16)
    except OSError as exc:
        log.warning("no control socket at %s (%s): status, refresh and prefetch will not work", path, exc)
        listener_socket.close()
        task_status.started()
        return
    listener = trio.SocketListener(listener_socket)
    handler = ControlHandler(settings, mountpoint, services, operations)
    try:
        task_status.started()
        await trio.serve_listeners(handler.handle, [listener])
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)


class ControlHandler:
    """Answers control-channel requests (one request per connection)."""

    def __init__(self, settings: Settings, mountpoint: str, services: Services, operations: Any) -> None:
        self.settings = settings
        self.mountpoint = mountpoint
        self.services = services
        self.operations = operations

    async def handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            try:
                message = json.loads(await _read_line(stream))
                if not isinstance(message, dict):
                    raise ValueError("a request is a JSON object")
                op = message.get("op")
                if op == "status":
                    await _send(stream, {"ok": True, "end": True, **self.status()})
                elif op == "refresh":
                    inodes = await self.services.tree.refresh(self.inner_path(message))
                    # in a worker thread: invalidating from the trio thread deadlocks against a read
                    # the kernel holds a lock for (pyfuse3.invalidate_inode waits on the kernel)
                    await trio.to_thread.run_sync(self.operations.invalidate, inodes)
                    await _send(stream, {"ok": True, "end": True, "invalidated": len(inodes)})
                elif op == "prefetch":
                    await self.prefetch(stream, message)
                else:
                    raise ValueError(f"unknown op {op!r}")
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                log.debug("control client went away")
            except (MastfsError, ValueError) as exc:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await _send(stream, {"ok": False, "end": True, "error": str(exc)})
            except Exception as exc:
                log.error("control request failed", exc_info=exc)
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await _send(stream, {"ok": False, "end": True, "error": f"internal error: {exc!r}"})

    def inner_path(self, message: dict[str, Any]) -> str:
        """The path inside the mount of ``message["path"]`` (absolute under the mountpoint, or already
        inside: ``/program/2733``)."""
        text = str(message.get("path") or "/")
        path = os.path.normpath(text if text.startswith("/") else "/" + text)
        if path == self.mountpoint:
            return "/"
        if path.startswith(self.mountpoint + os.sep):
            return path[len(self.mountpoint):]
        return path

    def status(self) -> dict[str, Any]:
        used, limit = self.services.cache.usage()
        return {
            "mountpoint": self.mountpoint,
            "version": __version__,
            "mast_url": self.settings.mast_url,
            "source": self.settings.source,
            "cache": {"dir": self.settings.cache_dir, "used": used, "limit": limit,
                      "blocks": self.services.cache.entries},
            "reader": self.services.reader.stats(),
            "mast": self.services.client.stats(),
            "mast_probe": self.services.mast_probe.as_dict(),
            "interrupted": self.operations.interrupts.interrupted,
            "token": self.services.tokens.status(),
            "tree": self.services.tree.stats(),
        }

    async def prefetch(self, stream: trio.SocketStream, message: dict[str, Any]) -> None:
        """Warm the cache for every product below a path, streaming one line per file and a summary."""
        tree = self.services.tree
        level = message.get("level")
        wanted_type = (message.get("type") or "").upper() or None
        jobs = max(1, min(int(message.get("jobs") or self.settings.transfers), 32))
        files = []
        async for path, node in tree.walk_products(self.inner_path(message)):
            if level is not None and node.product.level != int(level):
                continue
            if message.get("recommended") and not namespace.is_recommended(node.product):
                continue
            if wanted_type is not None and node.product.product_type != wanted_type:
                continue
            files.append((path, node))
        sizes = [await node.size(tree) for _, node in files]
        total = sum(sizes)
        await _send(stream, {"event": "start", "files": len(files), "bytes": total})
        summary = {"done": 0, "skipped": 0, "failed": 0, "bytes": 0}
        cached_now: dict[str, int] = {}  # path -> bytes of it in the cache, as prefetch reports them
        limiter = trio.CapacityLimiter(jobs)
        send_lock = trio.Lock()
        everything = trio.CancelScope()
        client_gone = False

        async def tell(line: dict[str, Any]) -> None:
            """Send one line; a client that went away (Ctrl-C) stops the whole prefetch, quietly."""
            nonlocal client_gone
            async with send_lock:
                try:
                    await _send(stream, line)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    client_gone = True
                    everything.cancel()

        async def report_progress() -> None:
            while True:
                await trio.sleep(PROGRESS_INTERVAL)
                await tell({"event": "progress", "bytes_cached": sum(cached_now.values()), "bytes": total,
                            "files_finished": sum(summary[k] for k in ("done", "skipped", "failed"))})

        async def one(path: str, node: Any, size: int) -> None:
            async with limiter:
                record: dict[str, Any] = {"event": "file", "path": path, "size": size}
                try:
                    if node.exclusive and not tree.has_token:
                        record.update(status="skipped", reason="exclusive-access data needs a token")
                    else:
                        ref = await tree.product_ref(node)
                        progress: list[int] = []

                        def note(cached: int) -> None:
                            progress.append(cached)
                            cached_now[path] = cached

                        await self.services.reader.prefetch(ref, note)
                        fetched = progress[-1] - progress[0] if progress else 0
                        already = bool(progress) and progress[0] >= size
                        record.update(status="skipped" if already else "done", fetched=fetched,
                                      reason="already cached" if already else None)
                        summary["bytes"] += fetched
                except MastfsError as exc:
                    why = getattr(exc, "reason", None)
                    record.update(status="failed", reason=f"{exc} ({why})" if why else str(exc))
                summary[record["status"]] += 1
                await tell(record)

        with everything:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(report_progress)
                async with trio.open_nursery() as workers:
                    for (path, node), size in zip(files, sizes, strict=True):
                        workers.start_soon(one, path, node, size)
                nursery.cancel_scope.cancel()
        if client_gone:
            log.info("prefetch %s interrupted by its client after %d files; a rerun resumes",
                     message.get("path"), sum(summary[k] for k in ("done", "skipped", "failed")))
            return
        await _send(stream, {"event": "summary", "ok": summary["failed"] == 0, "end": True, **summary})


async def _read_line(stream: trio.SocketStream) -> bytes:
    data = b""
    while b"\n" not in data:
        chunk = await stream.receive_some(65536)
        if not chunk:
            break
        data += chunk
        if len(data) > _CONTROL_LINE_MAX:
            raise ValueError("request too long")
    return data.split(b"\n", 1)[0]


async def _send(stream: trio.SocketStream, message: dict[str, Any]) -> None:
    await stream.send_all(json.dumps(message, default=str).encode() + b"\n")


# ------------------------------------------------------------------------------------ detached child


def _child_main(argv: list[str]) -> int:
    """Body of the detached daemon (``mastfs.daemon MOUNTPOINT`` run as a module, settings as JSON on stdin,
    so nothing sensitive shows on the command line)."""
    values = json.loads(sys.stdin.read())
    sys.stdin.close()
    settings = Settings(**values)
    return run_foreground(settings, argv[0])


if __name__ == "__main__":
    # Run the copy imported under its real name, so log records say "mastfs.daemon", not "__main__".
    from mastfs.daemon import _child_main as child_main

    raise SystemExit(child_main(sys.argv[1:]))
