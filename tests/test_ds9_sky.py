"""An astronomer's first look: SAOImage ds9 (under Xvfb) opens a level-3 mosaic of NGC 3132 from a mount
of the twin, and the screenshot shows the sky, not noise: the Southern Ring's shell, where the header's
WCS puts it, is much brighter than the background around it. `fitscheck` passes over the same level-3
directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS
from desktoputil import Desktop
from mountutil import mounted
from PIL import Image

from mastfs.twin import catalog as twin_catalog

pytestmark = pytest.mark.mount

OBS = twin_catalog.OBS_2733_MIRI_F1130W
NGC_3132 = (151.7553, -40.4368)
SHELL_ARCSEC = (0.6 * 30.0, 0.9 * 42.0)  # the shell lies at 0.75 of the ring's 30" x 42" semi-axes
LOAD_WAIT = 90.0


@pytest.fixture(scope="module")
def twin():
    from mastfs.twin.server import Twin

    with Twin.start(scale=0.01) as handle:
        yield handle


def displayed_image(screenshot: np.ndarray, shape: tuple[int, int]) -> tuple[int, int] | None:
    """(left, bottom) pixel of ds9's 1:1 view of an image of `shape` (ny, nx) in a shot of its window:
    the block of rows and columns that are mostly sky-black (ds9 draws it on white), once it is drawn."""
    dark = screenshot < 60
    rows = np.flatnonzero(dark.mean(axis=1) > 0.4)
    if not shape[0] - 2 <= len(rows) <= shape[0] + 2:
        return None
    columns = np.flatnonzero(dark[rows].mean(axis=0) > 0.8)
    if not shape[1] - 2 <= len(columns) <= shape[1] + 2:
        return None
    return int(columns.min()), int(rows.max())


def test_ds9_shows_the_ring_nebula_in_the_mosaic_read_through_the_mount(twin, tmp_path):
    assert shutil.which("ds9") and shutil.which("Xvfb"), "run ./run install (DEB_PACKAGES has saods9) first"
    with mounted(twin, tmp_path) as live:
        level3 = live.join("obs", OBS, "level3")
        path = os.path.join(level3, f"{OBS}_i2d.fits")
        with fits.open(path) as hdus:
            header, shape = hdus["SCI"].header, hdus["SCI"].data.shape
        desktop = Desktop(tmp_path / "home", screen="1280x1024")
        try:
            desktop.start("ds9", "-width", "900", "-height", "900", f"{path}[SCI]", "-zoom", "1")
            window = desktop.wait_for_window("SAOImage ds9")
            deadline = time.monotonic() + LOAD_WAIT
            while True:
                desktop.x("import", "-window", window, str(tmp_path / "ds9.png"))  # the ds9 window only
                screen = np.asarray(Image.open(tmp_path / "ds9.png").convert("L"), dtype=float)
                corner = displayed_image(screen, shape)
                if corner is not None:
                    break
                assert time.monotonic() < deadline, "ds9 never showed the image (see ds9.png)"
                time.sleep(1.0)
        finally:
            desktop.close()
        x, y = WCS(header).world_to_pixel_values(*NGC_3132)
        left, bottom = corner
        centre_column, centre_row = left + float(x), bottom - float(y)  # FITS rows go up, screen rows down
        arcsec = abs(header["CDELT1"]) * 3600
        rows, columns = np.mgrid[: screen.shape[0], : screen.shape[1]]
        radius = np.hypot(columns - centre_column, rows - centre_row) * arcsec
        shell = screen[(radius > SHELL_ARCSEC[0]) & (radius < SHELL_ARCSEC[1])]
        around = screen[(radius > 100) & (radius < 200)]
        assert shell.mean() > around.mean() + 40, (shell.mean(), around.mean())
        assert np.median(around) < 40 and (around > 200).mean() < 0.02  # dark sky with a few stars, not noise

        result = subprocess.run([os.path.join(os.path.dirname(sys.executable), "fitscheck"),
                                 *sorted(os.path.join(level3, name) for name in os.listdir(level3)
                                         if name.endswith(".fits"))[:40]],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
