"""The twin's images look like the sky: finite values in MJy/sr, a smooth background with noise of the
stated amplitude, sources where the header WCS puts the catalog's positions, the NGC 3132 ring, DQ/ERR
consistent with SCI, previews of the same scene, and every byte range equal to the whole file's."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS
from PIL import Image

from mastfs.twin.catalog import Catalog

OBS = "jw02733-o002_t001_miri_f1130w"
NGC_3132 = (151.7553, -40.4368)


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return Catalog(scale=0.01)


def whole(catalog: Catalog, filename: str) -> bytes:
    product = catalog.product(f"mast:JWST/product/{filename}")
    return catalog.read(product.uri, 0, product.size)


@pytest.fixture(scope="module")
def i2d(catalog):
    with fits.open(io.BytesIO(whole(catalog, f"{OBS}_i2d.fits"))) as hdus:
        yield {hdu.name: (hdu.header.copy(), None if hdu.data is None else np.array(hdu.data)) for hdu in hdus}


def robust_std(values: np.ndarray) -> float:
    """Standard deviation estimated from the median absolute deviation (ignores the few stars)."""
    return float(1.4826 * np.median(np.abs(values - np.median(values))))


def test_mosaic_is_finite_mjy_per_sr_background_with_noise(i2d):
    header, sci = i2d["SCI"]
    assert header["BUNIT"] == "MJy/sr" and sci.dtype == np.dtype(">f4") and np.isfinite(sci).all()
    background = np.median(sci)
    assert 5 < background < 100  # MIRI F1130W's sky is tens of MJy/sr
    corner = sci[:60, -60:]
    noise = robust_std(corner)
    assert 0.005 * background < noise < 0.1 * background


def test_the_ring_nebula_is_where_the_wcs_puts_ngc_3132(i2d):
    header, sci = i2d["SCI"]
    x, y = WCS(header).world_to_pixel_values(*NGC_3132)
    arcsec = abs(header["CDELT1"]) * 3600
    yy, xx = np.mgrid[: sci.shape[0], : sci.shape[1]]
    distance = np.hypot(xx - x, yy - y) * arcsec
    ring = sci[(distance > 24) & (distance < 28)]  # on the shell, 0.75 of the 30-42" semi-axes
    outside = sci[(distance > 150) & (distance < 200)]
    assert np.median(ring) > 5 * np.median(outside)


def test_err_dq_and_variances_agree_with_sci(i2d):
    _, sci = i2d["SCI"]
    _, err = i2d["ERR"]
    variance = sum(i2d[name][1].astype(np.float64) for name in ("VAR_POISSON", "VAR_RNOISE", "VAR_FLAT"))
    assert np.allclose(err.astype(np.float64) ** 2, variance, rtol=1e-4)
    corner = slice(0, 60), slice(-60, None)
    pulls = (sci[corner] - np.median(sci[corner])) / err[corner]
    assert 0.8 < robust_std(pulls) < 1.2  # the noise is what ERR says
    assert (i2d["WHT"][1] > 0).all() and (i2d["CON"][1] >= 1).all()


def test_catalog_sources_are_bright_in_the_mosaic_and_labelled_in_the_segmentation_map(catalog, i2d):
    header, sci = i2d["SCI"]
    table = Table.read(whole(catalog, f"{OBS}_cat.ecsv").decode(), format="ascii.ecsv")
    wcs = WCS(header)
    background, noise = np.median(sci), robust_std(sci[:60, -60:])
    with fits.open(io.BytesIO(whole(catalog, f"{OBS}_segm.fits"))) as segm:
        segm_wcs, labels = WCS(segm["SCI"].header), segm["SCI"].data
        for source in table[:15]:
            x, y = wcs.world_to_pixel_values(source["sky_centroid.ra"], source["sky_centroid.dec"])
            assert abs(x - source["xcentroid"]) < 0.05 and abs(y - source["ycentroid"]) < 0.05
            assert sci[int(round(float(y))), int(round(float(x)))] > background + 10 * noise, source["label"]
            sx, sy = segm_wcs.world_to_pixel_values(source["sky_centroid.ra"], source["sky_centroid.dec"])
            assert labels[int(round(float(sy))), int(round(float(sx)))] in (source["label"], *table["label"][:15]), source["label"]


def test_preview_shows_the_mosaics_scene(catalog, i2d):
    _, sci = i2d["SCI"]
    preview = np.asarray(Image.open(io.BytesIO(whole(catalog, f"{OBS}_i2d.jpg"))).convert("L"), dtype=float)
    thumb = np.asarray(Image.open(io.BytesIO(whole(catalog, f"{OBS}_i2d_thumb.jpg"))).convert("L"), dtype=float)
    for picture in (preview, thumb):
        height, width = picture.shape
        assert abs(height / width - sci.shape[0] / sci.shape[1]) < 0.02
        binned = np.asarray(Image.fromarray(np.arcsinh(sci[::-1] - np.median(sci))).resize((width, height)))
        assert np.corrcoef(binned.ravel(), picture.ravel())[0, 1] > 0.6


@pytest.mark.parametrize("filename", [f"{OBS}_i2d.fits", "jw02733002001_02103_00001_mirimage_rateints.fits",
                                      "jw02733002001_02103_00001_mirimage_uncal.fits", f"{OBS}_segm.fits"])
def test_every_range_equals_the_whole_files_bytes(catalog, filename):
    data = whole(catalog, filename)
    uri = f"mast:JWST/product/{filename}"
    chooser = random.Random(filename)
    for _ in range(40):
        offset = chooser.randrange(len(data))
        length = chooser.choice([1, 3, 2880, 4097, 65536, 1 << 20])
        assert catalog.read(uri, offset, length) == data[offset : offset + length]
    with fits.open(io.BytesIO(data)) as hdus:
        for hdu in hdus:
            if hdu.data is not None and hdu.is_image:
                assert np.isfinite(hdu.data).all(), hdu.name
