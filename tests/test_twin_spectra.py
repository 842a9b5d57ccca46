"""Spectra that look like the sky: the twin's MIRI LRS observation of NGC 3132 (SPECTRA_PROGRAM) has x1d
files whose EXTRACT1D table shows a continuum and the nebula's emission lines at their rest wavelengths, in
JWST's units, and s2d files showing the same spectrum as a trace; through a real mount they carry the
documented kinds, and `fitscheck` passes over their level-2 and level-3 directories."""

from __future__ import annotations

import csv
import glob
import io
import os
import subprocess
import warnings

import astropy.units as u
import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from mountutil import mounted
from test_fits_checksums import fitscheck_path

from mastfs.twin import spectra
from mastfs.twin.catalog import SPECTRA_OBS_ID, SPECTRA_PROGRAM, X1D_URI, Catalog

NOD1 = "jw04498001001_03101_00001_mirimage"
LEVEL3_S2D_URI = f"mast:JWST/product/{SPECTRA_OBS_ID}_s2d.fits"
ISOLATED_LINES = ("[Ar III]", "H2 0-0 S(3)", "[S IV]", "[Ne II]")
"""Lines with no other line within 0.4 um: their peak can be compared with the continuum beside them."""
X1D_UNITS = {"WAVELENGTH": "um", "FLUX": "Jy", "FLUX_ERROR": "Jy", "SURF_BRIGHT": "MJy/sr", "SB_ERROR": "MJy/sr",
             "BACKGROUND": "MJy/sr", "FLUX_VAR_POISSON": "Jy^2", "SB_VAR_FLAT": "MJy^2/sr^2"}


@pytest.fixture(scope="module")
def catalog():
    return Catalog(scale=0.001)


def open_product(catalog: Catalog, uri: str) -> fits.HDUList:
    """The product's bytes opened by astropy, checksums verified (a wrong one fails the test)."""
    data = catalog.read(uri, 0, catalog.product(uri).size)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fits.open(io.BytesIO(data), checksum=True)


def assert_continuum_and_lines(table) -> None:
    """Every value finite; each isolated line's peak stands clearly (10 errors and 30%) above the
    continuum 0.25-0.4 um either side; the continuum itself is positive and well measured."""
    wavelength, flux, error = (np.asarray(table[name], dtype=float) for name in ("WAVELENGTH", "FLUX", "FLUX_ERROR"))
    for name in (column.name for column in table.columns):
        assert np.isfinite(np.asarray(table[name], dtype=float)).all(), name
    assert np.all(np.diff(wavelength) > 0) and wavelength[0] < 5.5 and wavelength[-1] > 13.5
    rest = {species: microns for species, microns, _ in spectra.LINES}
    for species in ISOLATED_LINES:
        at_line = np.abs(wavelength - rest[species]) <= 0.05
        beside = (np.abs(wavelength - rest[species]) >= 0.25) & (np.abs(wavelength - rest[species]) <= 0.4)
        continuum = np.median(flux[beside])
        assert continuum > 20 * np.median(error[beside]) > 0, species
        assert flux[at_line].max() > continuum * 1.3 + 10 * error[at_line].max(), species
        assert abs(wavelength[at_line][np.argmax(flux[at_line])] - rest[species]) <= 0.03, species


def test_the_spectroscopic_observation_and_its_product_rows(catalog):
    (row,) = [r for r in catalog.observation_rows() if r["proposal_id"] == SPECTRA_PROGRAM]
    assert row["obs_id"] == SPECTRA_OBS_ID and row["dataproduct_type"] == "spectrum"
    assert row["instrument_name"] == "MIRI/SLIT" and row["filters"] == "P750L"
    assert row["dataURL"] == X1D_URI and row["target_name"] == "NGC-3132"
    products = {r["productFilename"]: r for r in catalog.product_rows(row["obsid"])}
    for name, subgroup, level in ((f"{NOD1}_x1d.fits", "X1D", 2), (f"{NOD1}_s2d.fits", "S2D", 2),
                                  (f"{SPECTRA_OBS_ID}_x1d.fits", "X1D", 3), (f"{SPECTRA_OBS_ID}_s2d.fits", "S2D", 3)):
        product = products[name]
        assert (product["productSubGroupDescription"], product["calib_level"]) == (subgroup, level), name
        assert product["productType"] == "SCIENCE" and product["dataproduct_type"] == "spectrum"
        twin_product = catalog.product(product["dataURI"])
        assert product["size"] == twin_product.size == len(catalog.read(product["dataURI"], 0, 1 << 30))
        folder = f"jw0{SPECTRA_PROGRAM}/L3/t/o001" if level == 3 else f"jw0{SPECTRA_PROGRAM}/jw04498001001"
        assert twin_product.s3_key == f"jwst/public/{folder}/{name}"
    assert any(name.endswith("_spec2_00001_asn.json") for name in products)
    assert any(name.endswith("_spec3_00047_asn.json") for name in products)
    assert {r["productSubGroupDescription"] for r in products.values()} >= {"UNCAL", "RATE", "CAL", "CRF", "POOL"}


@pytest.mark.parametrize("uri", [X1D_URI, f"mast:JWST/product/{NOD1}_x1d.fits"])
def test_x1d_has_a_continuum_and_the_nebulas_lines_in_jwst_units(catalog, uri):
    with open_product(catalog, uri) as hdus:
        assert [hdu.name for hdu in hdus] == ["PRIMARY", "EXTRACT1D", "ASDF"]
        table = hdus["EXTRACT1D"].data
        for name, unit in X1D_UNITS.items():
            assert hdus["EXTRACT1D"].columns[name].unit == unit, name
        assert [c.name for c in hdus["EXTRACT1D"].columns] == [name for name, _, _ in spectra.X1D_COLUMNS]
        assert_continuum_and_lines(table)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # every unit parses as a FITS unit
            assert Table.read(hdus, hdu="EXTRACT1D")["SB_VAR_FLAT"].unit == u.MJy ** 2 / u.sr ** 2
        assert np.all(table["DQ"] == 0) and np.all(table["NPIXELS"] > 1)
        assert np.all(table["BACKGROUND"] > 0)
        # tenths of a mJy: a knot of a planetary nebula as LRS sees it, not 1e38
        assert 1e-5 < np.median(table["FLUX"]) < 1e-2


def test_s2d_shows_the_x1d_spectrum_as_a_trace(catalog):
    with open_product(catalog, LEVEL3_S2D_URI) as s2d, open_product(catalog, X1D_URI) as x1d:
        science, wavelength = s2d["SCI"].data, s2d["WAVELENGTH"].data
        assert s2d["SCI"].header["BUNIT"] == "MJy/sr" and "CTYPE1" not in s2d["SCI"].header
        assert np.isfinite(science).all() and np.all(s2d["DQ"].data == 0)
        table = x1d["EXTRACT1D"].data
        assert np.allclose(wavelength[:, 0], table["WAVELENGTH"], atol=1e-5)
        profile = np.median(science, axis=0)
        trace = int(np.argmax(profile))
        assert abs(trace - (science.shape[1] - 1) / 2) <= 1  # level 3: the nods combined, source centred
        assert profile[trace] > 3 * np.median(profile)
        row_sums = (science[:, trace - 3:trace + 4] - table["BACKGROUND"][:, None]).sum(axis=1)
        assert np.corrcoef(row_sums, table["FLUX"])[0, 1] > 0.99  # the same lines at the same rows


def test_the_two_nods_put_the_trace_at_two_places_on_the_slit(catalog):
    traces = []
    for nod in (1, 2):
        with open_product(catalog, f"mast:JWST/product/jw04498001001_03101_0000{nod}_mirimage_s2d.fits") as s2d:
            traces.append(int(np.argmax(np.median(s2d["SCI"].data, axis=0))))
    assert traces[1] - traces[0] >= 10


def test_a_reprocessed_x1d_is_still_a_valid_spectrum():
    catalog = Catalog(scale=0.001)
    before = catalog.sha256(X1D_URI)
    catalog.reprocess(X1D_URI)
    assert catalog.sha256(X1D_URI) != before
    with open_product(catalog, X1D_URI) as hdus:
        assert_continuum_and_lines(hdus["EXTRACT1D"].data)


@pytest.mark.mount
def test_spectra_through_the_mount_kinds_lines_and_fitscheck(twin, clean_twin, tmp_path):
    with mounted(twin, tmp_path) as live:
        observation = live.join("program", SPECTRA_PROGRAM, SPECTRA_OBS_ID)
        x1d = os.path.join(observation, "level3", f"{SPECTRA_OBS_ID}_x1d.fits")
        with fits.open(x1d, checksum=True) as hdus:
            assert hdus["EXTRACT1D"].columns["FLUX"].unit == "Jy"
            assert hdus["EXTRACT1D"].columns["WAVELENGTH"].unit == "um"
            assert_continuum_and_lines(hdus["EXTRACT1D"].data)
        assert os.getxattr(x1d, "user.mastfs.kind") == b"table"
        assert os.getxattr(os.path.join(observation, "level2", f"{NOD1}_x1d.fits"), "user.mastfs.kind") == b"table"
        assert os.getxattr(os.path.join(observation, "level3", f"{SPECTRA_OBS_ID}_s2d.fits"),
                           "user.mastfs.kind") == b"image"
        assert os.getxattr(os.path.join(observation, "level2", f"{NOD1}_s2d.fits"), "user.mastfs.kind") == b"image"
        with open(os.path.join(observation, "products.csv"), encoding="utf-8", newline="") as handle:
            rows = {r["productFilename"]: r for r in csv.DictReader(handle)}
        assert rows[f"{SPECTRA_OBS_ID}_x1d.fits"]["mastfs_kind"] == "table"
        assert rows[f"{SPECTRA_OBS_ID}_x1d.fits"]["dataproduct_type"] == "spectrum"
        assert rows[f"{NOD1}_s2d.fits"]["mastfs_kind"] == "image"
        for level in ("level2", "level3"):
            files = sorted(glob.glob(os.path.join(observation, level, "*.fits")))
            assert any(f.endswith("_x1d.fits") for f in files) and any(f.endswith("_s2d.fits") for f in files)
            result = subprocess.run([fitscheck_path(), *files], capture_output=True, text=True, timeout=240)
            assert result.returncode == 0, result.stdout + result.stderr
            assert "MISSING" not in result.stdout + result.stderr
