"""FITS DATASUM/CHECKSUM verification block by block (mastfs.fitscheck) against files astropy wrote."""

from __future__ import annotations

import io

import numpy as np
import pytest
from astropy.io import fits
from hypothesis import given, settings
from hypothesis import strategies as st

from mastfs.blockcache import block_count, block_span
from mastfs.fitscheck import FitsCheck, HduMismatch, applies_to


def fits_bytes(checksum: bool = True) -> bytes:
    rng = np.random.default_rng(7)
    primary = fits.PrimaryHDU()
    primary.header["TELESCOP"] = "JWST"
    sci = fits.ImageHDU(rng.normal(size=(300, 200)).astype(np.float32), name="SCI")
    dq = fits.ImageHDU(rng.integers(0, 2**31, size=(300, 200), dtype=np.int32), name="DQ")
    table = fits.BinTableHDU.from_columns([fits.Column(name="x", format="D", array=rng.normal(size=5000))])
    buffer = io.BytesIO()
    fits.HDUList([primary, sci, dq, table]).writeto(buffer, checksum=checksum)
    return buffer.getvalue()


def blocks(data: bytes) -> list[tuple[int, bytes]]:
    return [(start, data[start:end]) for start, end in (block_span(i, len(data)) for i in range(block_count(len(data))))]


GOOD = fits_bytes()


def test_every_hdu_of_an_astropy_file_passes_in_file_order():
    check = FitsCheck(len(GOOD))
    passed = [hdu.number for start, data in blocks(GOOD) for hdu in check.add(start, data)]
    assert passed == [0, 1, 2, 3] and check.complete and check.verified == 4


@settings(max_examples=30, deadline=None)
@given(st.permutations(range(block_count(len(GOOD)))))
def test_block_order_does_not_matter_once_headers_are_handed_again(order):
    check = FitsCheck(len(GOOD))
    parts = blocks(GOOD)
    for index in order:
        check.add(*parts[index])
    for start, data in parts:  # the reader hands a block again when a header was found inside it later
        check.add(start, data)
    assert check.complete and check.verified == 4


@pytest.mark.parametrize("offset", [100, 2880 * 3 + 7, len(GOOD) - 5000])
def test_a_changed_byte_fails_its_hdu(offset):
    bad = bytearray(GOOD)
    bad[offset] ^= 0x40
    check = FitsCheck(len(bad))
    with pytest.raises(HduMismatch) as info:
        for start, data in blocks(bytes(bad)):
            check.add(start, data)
    assert info.value.span[0] <= offset < info.value.span[1]


def test_bytes_from_another_offset_are_not_a_header():
    shifted = GOOD[2880:] + bytes(2880)
    with pytest.raises(HduMismatch, match="not a FITS header"):
        FitsCheck(len(shifted)).add(0, shifted[:65536])


def test_files_without_checksums_pass_unchecked():
    plain = fits_bytes(checksum=False)
    check = FitsCheck(len(plain))
    for start, data in blocks(plain):
        check.add(start, data)
    assert check.complete and check.verified == 0


def test_only_fits_names_of_whole_records_are_checked():
    assert applies_to("x_cal.fits", 2880 * 3) and not applies_to("x.jpg", 2880) and not applies_to("x.fits", 100)


def test_cache_verify_checks_the_hdus_of_cached_fits_files(tmp_path):
    import trio

    from mastfs.blockcache import BlockCache, ProductRef

    bad = bytearray(GOOD)
    bad[len(GOOD) - 3000] ^= 1  # in the table's data: blocks are sound, the HDU's DATASUM is not
    good_ref = ProductRef("mast:TEST/good_cal.fits", len(GOOD))
    bad_ref = ProductRef("mast:TEST/bad_cal.fits", len(bad))

    async def main():
        cache = BlockCache(str(tmp_path), 1 << 30, 0)
        await cache.open()
        for ref, content in ((good_ref, GOOD), (bad_ref, bytes(bad))):
            for start, data in blocks(content):
                await cache.store(ref, block_count(start + 1) - 1, data)
        offline = BlockCache(str(tmp_path), 1 << 30, 0)
        await offline.open()
        report = await offline.verify()
        assert (report.products_checked, report.products_failed) == (2, 1)
        assert offline.contains(good_ref, 0) and not offline.contains(bad_ref, 0)

    trio.run(main)
