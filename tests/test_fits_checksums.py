"""Every FITS HDU the twin generates carries a correct CHECKSUM and DATASUM (the FITS checksum
convention), as astropy verifies them: in memory, and with `fitscheck` over a level-3 directory read
through a real mount."""

from __future__ import annotations

import glob
import io
import os
import subprocess
import sys
import warnings

import pytest
from astropy.io import fits
from mountutil import mounted

from mastfs.twin import fitsgen
from mastfs.twin.catalog import Catalog

LEVEL3_OBS = "jw02733-o002_t001_miri_f770w"


def fitscheck_path() -> str:
    return os.path.join(os.path.dirname(sys.executable), "fitscheck")


def test_checksums_match_astropys_and_are_computed_once_per_product():
    catalog = Catalog(scale=0.001)
    fits_products = [p for p in catalog.products() if p.filename.endswith(".fits")]
    for product in fits_products[:: max(1, len(fits_products) // 25)]:
        data = catalog.read(product.uri, 0, product.size)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # astropy warns (not raises) on a wrong checksum
            with fits.open(io.BytesIO(data), checksum=True) as hdus:
                for hdu in hdus:
                    assert hdu.header["CHECKSUM"] and hdu.header["DATASUM"], product.filename
                    assert hdu.verify_checksum() == 1 and hdu.verify_datasum() == 1, product.filename


def test_a_data_sum_is_computed_once_even_when_the_file_is_rebuilt():
    images = (fitsgen.ImageExt("SCI", -32),)
    spec = fitsgen.FitsSpec(primary_cards=(), images=images, base_shape=(20, 30))
    size = fitsgen.fits_natural_size(images, (20, 30), 3000)
    memo = fitsgen.ChecksumMemo()
    fitsgen.build_fits(spec, size, 7, memo).read(0, size)
    assert len(memo.datasums) == 3  # primary, SCI, filler
    sci_data_start = sorted(memo.datasums)[1]
    memo.datasums[sci_data_start] = 12345  # a rebuilt file must take the memo's value, not recompute
    rebuilt = fits.open(io.BytesIO(fitsgen.build_fits(spec, size, 7, memo).read(0, size)))
    assert rebuilt["SCI"].header["DATASUM"] == "12345"


def test_ones_complement_sums_combine_per_chunk():
    data = bytes(range(256)) * 64 + b"\xff" * 4096
    whole = fitsgen.ones_complement_sum(data)
    assert fitsgen.ones_complement_sum(data[4000:], fitsgen.ones_complement_sum(data[:4000])) == whole
    assert fitsgen.ones_complement_sum(b"\xff\xff\xff\xff" * 2) == 0xFFFFFFFF


@pytest.mark.mount
def test_fitscheck_passes_over_a_level3_directory_through_the_mount(twin, clean_twin, tmp_path):
    with mounted(twin, tmp_path) as live:
        level3 = live.join("obs", LEVEL3_OBS, "level3")
        files = sorted(glob.glob(os.path.join(level3, "*.fits")))
        assert any(f.endswith("_i2d.fits") for f in files)
        result = subprocess.run([fitscheck_path(), *files], capture_output=True, text=True, timeout=240)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "MISSING" not in result.stdout + result.stderr
