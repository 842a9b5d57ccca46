"""The mastfs daemon process: mounts, serves until unmounted or signalled, and unmounts cleanly.

:func:`mount_command` (``mastfs mount``) checks the mount point (:mod:`mastfs.mounts`), then serves in
the foreground (:func:`run_foreground`) or starts a detached child (:func:`start_background`: this module
run as ``mastfs.daemon MOUNTPOINT``, settings as JSON on stdin) and waits until its mount is live. Serving
wires the services (:mod:`mastfs.services`) to the FUSE adapter (:mod:`mastfs.fuse_adapter`), the control
socket (:mod:`mastfs.control`), memory hand-back (:mod:`mastfs.memory_tuning`) and systemd's readiness
protocol (:mod:`mastfs.systemd_notify`).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict

import trio

from . import __version__
from .auth import TokenKeeper, find_token_and_source
from .config import Settings
from .control import control_request, control_socket_path, serve_control
from .errors import MastfsError
from .logging_setup import configure_logging
from .memory_tuning import hand_back_memory, tune_malloc
from .mounts import mount_entry, prepare_mountpoint, raise_max_background, raise_read_ahead
from .services import PROBE_WAIT, open_services
from .systemd_notify import sd_notify

log = logging.getLogger(__name__)

MOUNT_WAIT = 30.0
"""Seconds a background mount may take to become live before ``mount`` gives up."""


def python_module_command(module: str, *args: str) -> list[str]:
    """``python -m module args`` with this interpreter, except that the child never imports from its
    current directory (where a folder named ``mastfs``, e.g. a clone of the repository, would shadow the
    installed package)."""
    bootstrap = ("import runpy, sys; sys.path[:] = [p for p in sys.path if p not in ('', '.')]; "
                 "runpy.run_module(sys.argv.pop(1), run_name='__main__', alter_sys=True)")
    return [sys.executable, "-c", bootstrap, module, *args]  # the module stays visible in ps


async def _serve(settings: Settings, mountpoint: str, token: TokenKeeper) -> int:
    """Mount, serve until unmounted or signalled, and unmount; returns the exit status (1 when the kernel
    refused the mount or the mount never answered)."""
    from . import fuse_adapter  # here, not above: the CLI imports this module without mounting

    async with open_services(settings, token) as services:
        operations = fuse_adapter.Operations(services.tree)
        options = fuse_adapter.mount_options(settings.allow_other)
        # Computed before mounting: realpath stats the mountpoint, which once mounted is served by this
        # very thread (a self-deadlock). Likewise this process never touches its own mount: a thread of
        # it waiting on the mount could not be killed (not even by SIGKILL) once the main loop is gone.
        control_path = control_socket_path(mountpoint)
        try:
            fuse_adapter.init(operations, mountpoint, options)
        except RuntimeError as exc:
            log.error("cannot mount %s: %s (see the lines above from fusermount3)", mountpoint, exc)
            return 1
        raise_max_background(mountpoint)  # before the first request: no read may queue in the kernel
        stop = _Stop()
        try:
            async with trio.open_nursery() as nursery:

                async def serve_fuse() -> None:
                    # Returns when the kernel ends the session (fusermount3 -u) or after stop.request().
                    await fuse_adapter.serve()
                    stop.kernel_ended = not stop.requested
                    nursery.cancel_scope.cancel()

                nursery.start_soon(serve_fuse)
                nursery.start_soon(operations.interrupts.run)
                nursery.start_soon(services.tokens.watch, services.client.whoami)
                nursery.start_soon(hand_back_memory, services)
                nursery.start_soon(_watch_signals, stop)
                await nursery.start(serve_control, control_path, settings, mountpoint, services, operations)
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
                sd_notify("READY=1")
                nursery.start_soon(services.mast_probe.run, services.client, settings.mast_url)
        finally:
            sd_notify("STOPPING=1")
            # After the kernel ended the session there is nothing left to unmount.
            fuse_adapter.close(unmount=not stop.kernel_ended)
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
            from . import fuse_adapter

            fuse_adapter.terminate()


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
        if mount_entry(mountpoint) is not None and os.path.ismount(mountpoint):
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
