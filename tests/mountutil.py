"""Mount mastfs for real (a ``python -m mastfs mount --foreground`` subprocess) against a twin.

``with mounted(twin, tmp_path, deadline="3s") as mount: os.listdir(mount.path)``. Keyword settings
become flags (``source="http"`` -> ``--source http``; True booleans -> bare flags). On exit the mount is
unmounted, the daemon waited for (killed if it hangs), and the test FAILS if the daemon's log shows an
exception that escaped (a traceback) or the daemon did not exit cleanly.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mastfs.config import OPTIONS
from mastfs.errors import MastfsError

MOUNT_TIMEOUT = 30.0
EXIT_TIMEOUT = 20.0
_FLAGS = {option.name: option for option in OPTIONS}
MOUNT_MARKED = True
"""Whether the running test carries ``@pytest.mark.mount`` (conftest sets it before each test):
:func:`start_mount` fails a test that mounts without the marker, so ``-m "not mount"`` never mounts."""


class Mount:
    """A live mount: ``path`` (str), ``cache_dir``, ``log_path``, the daemon ``process``."""

    def __init__(self, path: str, cache_dir: str, log_path: Path, process: subprocess.Popen) -> None:
        self.path = path
        self.cache_dir = cache_dir
        self.log_path = log_path
        self.process = process

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def join(self, *parts: str) -> str:
        return os.path.join(self.path, *parts)

    def control(self, message: dict) -> list[dict]:
        """Every answer of the daemon's control socket to ``message``."""
        from mastfs.control import control_request

        return list(control_request(self.path, message))


def _flags(settings: dict) -> list[str]:
    flags = []
    for name, value in settings.items():
        option = _FLAGS[name]
        if isinstance(value, bool):
            if value:
                flags.append(option.cli_flag)
            continue
        flags += [option.cli_flag, ",".join(value) if isinstance(value, list) else str(value)]
    return flags


def _is_mounted(path: str) -> bool:
    with open("/proc/self/mountinfo", encoding="utf-8") as handle:
        return any(line.split()[4] == path for line in handle)


def start_mount(twin, mountpoint: Path, cache_dir: Path, log_path: Path, env: dict | None = None,
                **settings) -> Mount:
    """Start the daemon and wait (bounded) until the mount is live; fails the test otherwise."""
    if not MOUNT_MARKED:
        pytest.fail("this test mounts a filesystem: mark it @pytest.mark.mount")
    try:
        mountpoint.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a dead mount left by a crashed daemon: `mastfs mount` recovers it
        if exc.errno != errno.ENOTCONN:
            raise
    command = [
        sys.executable, "-m", "mastfs", "mount", "--foreground", str(mountpoint),
        "--mast-url", twin.mast_url, "--resolver-url", twin.resolver_url, "--s3-endpoint", twin.s3_endpoint,
        "--cache-dir", str(cache_dir), *_flags(settings),
    ]
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("MASTFS_") and k != "MAST_API_TOKEN"}
    child_env.update(env or {})
    child_env["MASTFS_CONFIG"] = "/nonexistent/mastfs-test-config.toml"
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=child_env)
    mount = Mount(str(mountpoint), str(cache_dir), log_path, process)
    deadline = time.monotonic() + MOUNT_TIMEOUT
    while not _answers(str(mountpoint)) or _probing(mount):
        if process.poll() is not None or time.monotonic() > deadline:
            stop_mount(mount, check_log=False)
            pytest.fail(f"mastfs did not mount (exit {process.poll()}):\n{mount.log_text()}")
        time.sleep(0.05)
    return mount


def _probing(mount: Mount) -> bool:
    """True while the daemon's one probe of MAST after mounting (a whoami) is in flight: tests start
    counting the twin's requests after it."""
    try:
        return mount.control({"op": "status"})[-1].get("mast_probe", {}).get("state") == "pending"
    except (OSError, MastfsError, IndexError):  # the control socket is not up yet
        return True


def _answers(path: str) -> bool:
    """True once the mount at ``path`` is live and its daemon answers (statvfs always reaches it)."""
    if not _is_mounted(path):
        return False
    try:
        os.statvfs(path)
    except OSError:
        return False
    return True


def stop_mount(mount: Mount, check_log: bool = True) -> None:
    """Unmount, wait for the daemon (SIGTERM, then SIGKILL if it hangs), and check its log."""
    if _is_mounted(mount.path):
        subprocess.run(["fusermount3", "-u", mount.path], capture_output=True, check=False)
    try:
        mount.process.wait(timeout=EXIT_TIMEOUT)
    except subprocess.TimeoutExpired:
        mount.process.send_signal(signal.SIGTERM)
        try:
            mount.process.wait(timeout=EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            mount.process.kill()
            mount.process.wait()
    if _is_mounted(mount.path):
        subprocess.run(["fusermount3", "-u", "-z", mount.path], capture_output=True, check=False)
    if check_log:
        text = mount.log_text()
        if "Traceback" in text or "Exception" in text:
            pytest.fail(f"an exception escaped in the mastfs daemon:\n{text}")
        if mount.process.returncode != 0:
            pytest.fail(f"mastfs exited with {mount.process.returncode}:\n{text}")


@contextlib.contextmanager
def mounted(twin, tmp_path: Path, *, cache_dir: Path | None = None, name: str = "mnt",
            env: dict | None = None, **settings) -> Iterator[Mount]:
    """A live mount of the twin at ``tmp_path/name`` for the ``with`` block (see the module docstring).

    ``cache_dir`` defaults to ``tmp_path/cache`` (reuse it across mounts to test persistence).
    """
    cache_dir = cache_dir or tmp_path / "cache"
    mount = start_mount(twin, tmp_path / name, cache_dir, tmp_path / f"{name}.log", env=env, **settings)
    try:
        yield mount
    finally:
        stop_mount(mount)


def endpoint_requests(stats: dict, key: str) -> int:
    """Requests the twin counted for endpoint ``key`` (0 when absent)."""
    return stats["endpoints"].get(key, {}).get("requests", 0)

