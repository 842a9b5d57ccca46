"""The control channel of a mount: its client (:func:`control_request`, used by the CLI verbs and tests)
and its server in the daemon (:func:`serve_control`, :class:`ControlHandler`).

The channel is a unix socket (mode 0600, in a 0700 directory of the mounting user) whose path derives
from the mountpoint. A client sends one JSON object on one line and reads JSON lines until one holds
``"end": true``:

- ``{"op": "status"}`` -> one line: ``mountpoint``, ``version``, ``mast_url``, ``source``, ``cache``
  (dir, used, limit, blocks), ``reader`` (ByteReader.stats(): transfers in flight, bytes fetched per
  source, hits and misses, reads and runs waiting, transfer slots, errors by type), ``mast`` (API requests
  and failures, and ``queries``: the metadata queries in flight with ``what``, ``seconds``, ``pages``,
  ``pages_total``, ``rows``, ``polls``, ``transient_errors``), ``interrupted`` (requests whose wait ended
  because a signal interrupted the requester), ``mast_probe`` (MastProbe: ``state``, ``problem``),
  ``token`` (TokenKeeper.status(): source, state, MAST user, last check; never the token) and ``tree``
  (Tree.stats(): nodes in memory).
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
import errno
import hashlib
import json
import logging
import os
import socket
import stat
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import trio

from . import __version__
from .config import Settings
from .errors import MastfsError, Unavailable

if TYPE_CHECKING:
    from .fuse_adapter import Operations
    from .services import Services
    from .tree import PrefetchCandidate

log = logging.getLogger(__name__)

PROGRESS_INTERVAL = 0.5
"""Seconds between progress lines of a prefetch."""
_CONTROL_LINE_MAX = 1 << 20


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


async def serve_control(path: str, settings: Settings, mountpoint: str, services: Services, operations: Operations,
                        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the control socket at ``path`` (best effort: without it the mount still works) until
    cancelled; reports started once it listens (or gave up)."""
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

    def __init__(self, settings: Settings, mountpoint: str, services: Services, operations: Operations) -> None:
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
        files = await tree.prefetch_candidates(self.inner_path(message),
                                               level=None if level is None else int(level),
                                               product_type=wanted_type,
                                               recommended=bool(message.get("recommended")))
        total = sum(file.size for file in files)
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

        async def one(file: PrefetchCandidate) -> None:
            async with limiter:
                record: dict[str, Any] = {"event": "file", "path": file.path, "size": file.size}
                try:
                    if file.refusal is not None:
                        record.update(status="skipped", reason=file.refusal)
                    else:
                        ref = await tree.product_ref(file.file)
                        progress: list[int] = []

                        def note(cached: int) -> None:
                            progress.append(cached)
                            cached_now[file.path] = cached

                        await self.services.reader.prefetch(ref, note)
                        fetched = progress[-1] - progress[0] if progress else 0
                        already = bool(progress) and progress[0] >= file.size
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
                    for file in files:
                        workers.start_soon(one, file)
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
