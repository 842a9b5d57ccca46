"""Versions, true sizes and FITS checksums through a real FUSE mount of a twin of its own (these tests
reprocess and alter products): a product reprocessed under an open file fails that file with EIO and
the next open reads the new version whole; sizes misstated by rows either way and a product with no size
at all read whole and shown true; a 206 body from another offset caught by the HDU checksums."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import sys

import pytest
from mountutil import endpoint_requests, mounted

from mastfs.twin import catalog as twin_catalog
from mastfs.twin.server import Twin

pytestmark = pytest.mark.mount

OBS = twin_catalog.OBS_2733_MIRI_F1130W
PRODUCTS = f"program/{twin_catalog.PROGRAM_2733}/{OBS}"


@pytest.fixture(scope="module")
def own_twin():
    with Twin.start(scale=0.001) as handle:
        yield handle


@pytest.fixture
def fresh(own_twin):
    own_twin.faults.clear()
    own_twin.reset_stats()
    yield own_twin
    own_twin.faults.clear()


def path_of(mount, uri: str) -> str:
    """The file of ``uri`` in OBS, found through the mount's products.csv."""
    import csv

    obs_dir = mount.join(PRODUCTS)
    with open(os.path.join(obs_dir, "products.csv"), encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle):
            if row["dataURI"] == uri and row["mastfs_path"]:
                return os.path.join(obs_dir, row["mastfs_path"])
    raise AssertionError(f"{uri} not shown in {OBS}")


def uris_of(twin, suffix: str) -> list[str]:
    obsid = next(r["obsid"] for r in twin.catalog.observation_rows() if r["obs_id"] == OBS)
    return sorted({r["dataURI"] for r in twin.catalog.product_rows(obsid) if r["dataURI"].endswith(suffix)})


def whole(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


def refresh(path: str) -> None:
    result = subprocess.run([sys.executable, "-m", "mastfs", "refresh", path], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr


def test_reprocessing_under_an_open_file_fails_it_and_the_next_open_reads_the_new_version(fresh, tmp_path):
    uri = twin_catalog.BENCH_1GIB_URI  # over 1 MB at this scale: block 0 and a 4 MiB block 1
    with mounted(fresh, tmp_path) as mount:
        path = path_of(mount, uri)
        old = fresh.catalog.describe(uri)
        with open(path, "rb", buffering=0) as handle:
            assert handle.read(2880) == fresh.catalog.read(uri, 0, 2880)
            new = fresh.catalog.reprocess(uri)
            handle.seek(old["http"]["size"] - 4096)
            with pytest.raises(OSError) as info:
                handle.read(4096)
            assert info.value.errno == errno.EIO
        assert "changed on MAST" in mount.log_text()
        refresh(path)
        assert hashlib.sha256(whole(path)).hexdigest() == new["s3"]["sha256"] != old["s3"]["sha256"]
        assert int(os.stat(path).st_mtime) == int(new["s3"]["mtime"])


def test_a_new_size_shows_at_once_after_refresh_and_old_blocks_are_dropped(fresh, tmp_path):
    uri = uris_of(fresh, "_cal.fits")[1]
    with mounted(fresh, tmp_path) as mount:
        path = path_of(mount, uri)
        assert hashlib.sha256(whole(path)).hexdigest() == fresh.catalog.sha256(uri, "s3")
        new = fresh.catalog.reprocess(uri, resize=2 * 2880)
        refresh(path)
        assert os.stat(path).st_size == new["s3"]["size"]
        assert hashlib.sha256(whole(path)).hexdigest() == new["s3"]["sha256"]
        assert int(os.getxattr(path, "user.mastfs.cached_bytes")) <= new["s3"]["size"]


def test_only_the_s3_copy_reprocessed_is_read_from_s3_whole(fresh, tmp_path):
    uri = uris_of(fresh, "_cal.fits")[2]
    with mounted(fresh, tmp_path) as mount:
        path = path_of(mount, uri)
        new = fresh.catalog.reprocess(uri, copies="s3")
        assert hashlib.sha256(whole(path)).hexdigest() == new["s3"]["sha256"] != new["http"]["sha256"]


@pytest.mark.parametrize("error", [+100, -100])
def test_a_size_misstated_by_the_row_is_read_true_and_shown_true(fresh, tmp_path, error):
    uri = uris_of(fresh, "_rate.fits")[0 if error > 0 else 1]
    true_size = fresh.catalog.product(uri).size
    fresh.catalog.misreport_size(uri, error)
    try:
        with mounted(fresh, tmp_path) as mount:
            path = path_of(mount, uri)
            assert os.stat(path).st_size == true_size + error  # what the row says, until the file is opened
            data = whole(path)
            assert len(data) == true_size and hashlib.sha256(data).hexdigest() == fresh.catalog.sha256(uri)
            assert os.stat(path).st_size == true_size
            warnings = [line for line in mount.log_text().splitlines() if "MAST lists" in line and uri in line]
            assert len(warnings) == 1 and "WARNING" in warnings[0]
    finally:
        fresh.catalog.misreport_size(uri, 0)


def test_a_product_with_no_size_and_no_length_is_read_whole_then_sized(fresh, tmp_path):
    uri = uris_of(fresh, "_i2d.jpg")[0] if uris_of(fresh, "_i2d.jpg") else uris_of(fresh, ".jpg")[0]
    fresh.catalog.make_dynamic(uri)
    true_size = fresh.catalog.product(uri).size
    with mounted(fresh, tmp_path) as mount:
        path = path_of(mount, uri)
        assert os.stat(path).st_size == 0  # nothing states a size before the file is read
        data = whole(path)
        assert len(data) == true_size and hashlib.sha256(data).hexdigest() == fresh.catalog.sha256(uri)
        assert os.stat(path).st_size == true_size
        assert endpoint_requests(fresh.stats(), "s3:GetObject") == 0


def test_a_206_body_from_another_offset_is_caught_by_the_hdu_checksums(fresh, tmp_path):
    segm = "mast:JWST/product/jw02733-o002_t001_miri_f1130w_segm.fits"  # block 0 and a 100 kB block 1
    uncal = twin_catalog.BENCH_1GIB_URI  # 1.1 MB: reading its first bytes asks for block 0 alone
    key = {uri: fresh.catalog.product(uri).s3_key for uri in (segm, uncal)}
    cache = tmp_path / "cache"
    with mounted(fresh, tmp_path, cache_dir=cache, name="one") as mount:
        path = path_of(mount, segm)
        with open(path, "rb") as handle:
            assert os.pread(handle.fileno(), 2880, 0) == fresh.catalog.read(segm, 0, 2880, "s3")  # block 0 only
            fault = fresh.faults.add("s3", "wrong_body", count=1, match=key[segm])  # block 1 from 2880 bytes back
            assert hashlib.sha256(handle.read()).hexdigest() == fresh.catalog.sha256(segm, "s3")
        assert fault.hits == 1
        assert "fails its DATASUM" in mount.log_text() and "fetched again" in mount.log_text()

        fresh.faults.add("s3", "wrong_body", count=None, match=key[uncal])  # the archive keeps serving it wrong
        with open(path_of(mount, uncal), "rb") as handle:
            with pytest.raises(OSError) as info:
                os.pread(handle.fileno(), 2880, 0)
        assert info.value.errno == errno.EIO
        assert "not a FITS header) again after fetching it again" in mount.log_text()
        fresh.faults.clear()
    with mounted(fresh, tmp_path, cache_dir=cache, name="two") as mount:  # the cache kept only good bytes
        fresh.reset_stats()
        assert hashlib.sha256(whole(path_of(mount, segm))).hexdigest() == fresh.catalog.sha256(segm, "s3")
        # block 1 came from the cache; block 0 shared the failed HDU, so it was dropped and is fetched again
        assert fresh.stats()["total_bytes_sent"] <= 65536
