"""A real file manager (pcmanfm, under Xvfb) browsing a mount of the twin: it lists /program/2733, an
observation's level3/ (FITS files, 19 MB at scale 0.01) and its thumbnail/ folder (JPEGs it makes
thumbnails of), and a screenshot shows the window. Browsing must not download the files it lists: the
twin counts every byte sent for downloads and S3."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from desktoputil import WAIT, Desktop
from mountutil import mounted

from mastfs.twin import catalog as twin_catalog

pytestmark = pytest.mark.mount

PROGRAM = twin_catalog.PROGRAM_2733
OBS = twin_catalog.OBS_2733_MIRI_F1130W


@pytest.fixture(scope="module")
def twin():
    from mastfs.twin.server import Twin

    with Twin.start(scale=0.01) as handle:
        yield handle


def wire_bytes(twin) -> int:
    endpoints = twin.stats()["endpoints"]
    return sum(endpoints.get(key, {}).get("bytes_sent", 0) for key in ("download", "s3"))


def listed_bytes(directory: str) -> int:
    return sum(os.stat(os.path.join(directory, name)).st_size for name in os.listdir(directory))


def colours(image: Path) -> int:
    """How many distinct colours the image holds (1 for a blank screen)."""
    return int(subprocess.run(["identify", "-format", "%k", str(image)], capture_output=True, text=True,
                              timeout=WAIT, check=True).stdout)


def test_pcmanfm_browses_program_2733_without_downloading(twin, tmp_path):
    assert shutil.which("pcmanfm") and shutil.which("Xvfb"), "run ./run install (DEB_PACKAGES) first"
    with mounted(twin, tmp_path) as mount:
        program = mount.join("program", PROGRAM)
        desktop = Desktop(tmp_path / "home")
        try:
            twin.reset_stats()
            desktop.start("pcmanfm", program)
            window = desktop.wait_for_window(PROGRAM)
            desktop.x("xdotool", "windowmove", window, "0", "0")
            desktop.x("xdotool", "windowsize", window, "1024", "720")
            time.sleep(1.5)  # let it list and draw
            first = desktop.screenshot(tmp_path / "program-2733.png")
            assert wire_bytes(twin) == 0  # a listing costs metadata queries only

            visited = []
            for folder in ("level3", "thumbnail"):
                path = os.path.join(program, OBS, folder)
                desktop.x("xdotool", "key", "--window", window, "ctrl+l")
                desktop.x("xdotool", "type", "--window", window, "--delay", "2", path)
                desktop.x("xdotool", "key", "--window", window, "Return")
                desktop.wait_for_window(folder)
                time.sleep(2.0)  # let it sniff types and make thumbnails
                visited.append(path)
            last = desktop.screenshot(tmp_path / "thumbnail.png")
        finally:
            desktop.close()
        listed = sum(listed_bytes(path) for path in visited)
        fetched = wire_bytes(twin)
    for image in (first, last):
        assert image.stat().st_size > 10_000 and colours(image) > 20, f"{image} looks blank"
    assert listed > 10_000_000
    assert fetched < listed / 100, f"browsing fetched {fetched} of the {listed} bytes listed"
