"""A virtual desktop for tests of graphical programs: Xvfb on a free display with a private HOME."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

WAIT = 20.0
SCREEN = "1024x720"


class Desktop:
    """Xvfb on a free display, with a private HOME and runtime dir; :meth:`close` stops what it started."""

    def __init__(self, home: Path, screen: str = SCREEN) -> None:
        home.mkdir(parents=True, exist_ok=True)
        runtime = home / "runtime"
        runtime.mkdir(mode=0o700, exist_ok=True)
        read_end, write_end = os.pipe()
        self.xvfb = subprocess.Popen(
            ["Xvfb", "-displayfd", str(write_end), "-screen", "0", f"{screen}x24", "-nolisten", "tcp"],
            pass_fds=(write_end,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(write_end)
        with os.fdopen(read_end) as display_number:
            number = display_number.readline().strip()
        assert number, "Xvfb did not start"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("MASTFS_", "DBUS_", "WAYLAND"))}
        self.env.update(DISPLAY=f":{number}", HOME=str(home), XDG_RUNTIME_DIR=str(runtime),
                        XDG_CONFIG_HOME=str(home / ".config"), XDG_CACHE_HOME=str(home / ".cache"),
                        NO_AT_BRIDGE="1")
        self.apps: list[subprocess.Popen] = []

    def start(self, *command: str) -> subprocess.Popen:
        app = subprocess.Popen(command, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.apps.append(app)
        return app

    def x(self, *command: str, check: bool = True) -> str:
        return subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=WAIT,
                              check=check).stdout

    def wait_for_window(self, title: str) -> str:
        """The id of a window named exactly ``title``, once it is shown."""
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            found = self.x("xdotool", "search", "--onlyvisible", "--name", f"^{title}$", check=False).split()
            if found:
                return found[0]
            time.sleep(0.1)
        pytest.fail(f"no window titled {title!r}")

    def screenshot(self, path: Path) -> Path:
        self.x("import", "-window", "root", str(path))
        return path

    def close(self) -> None:
        for process in [*self.apps, self.xvfb]:
            process.terminate()
            try:
                process.wait(timeout=WAIT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
