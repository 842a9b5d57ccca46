"""Reading files through a real FUSE mount of the twin: bytes equal the twin's (S3, HTTPS-only, S3 ->
HTTPS fallback, null size, no Content-Length), the cache identity shared across observations, header
reads, exclusive data with a token, byte-path outages, the control channel, and umount during reads."""

from __future__ import annotations

import csv
import errno
import hashlib
import os
import signal
import stat
import subprocess
import sys
import threading
import time

import pytest
from mountutil import endpoint_requests, mounted

from mastfs.twin import catalog as twin_catalog

pytestmark = pytest.mark.mount

PROGRAM = twin_catalog.PROGRAM_2733
OBS = twin_catalog.OBS_2733_MIRI_F1130W
SHARED_URI = "mast:JWST/product/jw02733001001_gs-id_1_image-cal.fits"  # listed under six observations


@pytest.fixture(scope="module")
def mount(twin, tmp_path_factory):
    with mounted(twin, tmp_path_factory.mktemp("read")) as live:
        yield live


def path_of(mount, uri, obs_id, program=PROGRAM):
    """The file of ``uri`` in observation ``obs_id``, located through the mount's products.csv."""
    obs_dir = mount.join("program", program, obs_id)
    with open(os.path.join(obs_dir, "products.csv"), encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle):
            if row["dataURI"] == uri and row["mastfs_path"]:
                return os.path.join(obs_dir, row["mastfs_path"])
    raise AssertionError(f"{uri} not shown in {obs_id}")


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def errno_of(call, *args):
    with pytest.raises(OSError) as info:
        call(*args)
    return info.value.errno


def s3_gets(stats):
    return endpoint_requests(stats, "s3:GetObject")


# ------------------------------------------------------------------------------------------ bytes


def test_s3_product_matches_the_twin(mount, clean_twin):
    uri = twin_catalog.BENCH_1GIB_URI
    path = path_of(mount, uri, OBS)
    clean_twin.reset_stats()
    assert sha256_of(path) == clean_twin.catalog.sha256(uri)
    stats = clean_twin.stats()
    assert s3_gets(stats) >= 1
    assert endpoint_requests(stats, "download") == 0
    assert os.getxattr(path, "user.mastfs.source").decode() == \
        f"s3://stpubdata/{clean_twin.catalog.product(uri).s3_key}"
    assert eventually_cached(path) == os.stat(path).st_size


def uncached_mosaic(mount, twin):
    """(uri, path) of a multi-block public mosaic of the program whose bytes the mount has not cached, so
    a test measuring the wire does not depend on which tests ran before."""
    mosaics = sorted((p for p in twin.catalog.products() if p.s3_key and not p.exclusive
                      and p.program == PROGRAM and p.filename.endswith("_i2d.fits")),
                     key=lambda p: p.size, reverse=True)
    for product in mosaics:
        path = mount.join("program", PROGRAM, product.filename.rsplit("_", 1)[0], "level3", product.filename)
        if product.size > 2 * 65536 and os.path.exists(path) \
                and int(os.getxattr(path, "user.mastfs.cached_bytes")) == 0:
            return product.uri, path
    raise AssertionError("every mosaic of the program is cached already")


def test_reads_over_a_slow_link_are_right_and_fetched_once(mount, clean_twin):
    """Over a link like S3's (latency and per-connection bandwidth), a sequential read gets exact bytes,
    each fetched once: the header block, then the rest in range requests (readahead)."""
    uri, path = uncached_mosaic(mount, clean_twin)
    clean_twin.link.set(first_byte_ms=20, stream_mb_s=20)
    assert sha256_of(path) == clean_twin.catalog.sha256(uri)
    sent = clean_twin.stats()["endpoints"]["s3:GetObject"]
    assert sent["requests"] >= 2 and sent["bytes_sent"] == clean_twin.catalog.product(uri).size


def eventually_cached(path, wait=10.0):
    """``user.mastfs.cached_bytes`` of ``path`` once it reaches the file's size, or after ``wait``
    seconds (blocks are stored in the background just after they are served)."""
    deadline = time.monotonic() + wait
    cached = int(os.getxattr(path, "user.mastfs.cached_bytes"))
    while cached < os.stat(path).st_size and time.monotonic() < deadline:
        time.sleep(0.05)
        cached = int(os.getxattr(path, "user.mastfs.cached_bytes"))
    return cached


def test_http_only_product_matches_the_twin(mount, clean_twin):
    uri = twin_catalog.HTTP_ONLY_URI
    path = path_of(mount, uri, OBS)
    clean_twin.reset_stats()
    assert sha256_of(path) == clean_twin.catalog.sha256(uri)
    stats = clean_twin.stats()
    assert endpoint_requests(stats, "download") >= 1
    assert endpoint_requests(stats, "s3") == 0
    assert b"/api/v0.1/Download/file?uri=" in os.getxattr(path, "user.mastfs.source")


def test_product_missing_from_s3_falls_back_to_https(mount, clean_twin):
    uri = "mast:JWST/product/jw02733002001_02103_00002_mirimage_cal.fits"
    path = path_of(mount, uri, OBS)
    clean_twin.faults.add("s3", "status", code=404, match="jw02733002001_02103_00002_mirimage_cal")
    assert sha256_of(path) == clean_twin.catalog.sha256(uri)
    assert endpoint_requests(clean_twin.stats(), "download") >= 1
    assert "not in the cloud" in mount.log_text()
    # the xattr names the source the reads actually used, not the S3 key the archive lists
    source = subprocess.run(["getfattr", "--only-values", "-n", "user.mastfs.source", path],
                            capture_output=True, text=True, check=True).stdout
    assert source.startswith(f"{clean_twin.mast_url.rstrip('/')}/api/v0.1/Download/file?uri="), source


@pytest.mark.parametrize("uri", [twin_catalog.NULL_SIZE_URI, twin_catalog.NO_LENGTH_URI])
def test_odd_products_match_the_twin(mount, twin, uri):
    obs_id = "jw02733-o002_t001_miri_f1800w" if uri == twin_catalog.NULL_SIZE_URI else OBS
    path = path_of(mount, uri, obs_id)
    assert os.stat(path).st_size == twin.catalog.product(uri).size
    assert sha256_of(path) == twin.catalog.sha256(uri)


def test_header_read_costs_at_most_64_kib(mount, clean_twin):
    _uri, path = uncached_mosaic(mount, clean_twin)
    clean_twin.reset_stats()
    with open(path, "rb") as handle:
        header = handle.read(2880)
    assert header.startswith(b"SIMPLE  =")
    stats = clean_twin.stats()["endpoints"]
    file_bytes = sum(stats.get(key, {}).get("bytes_sent", 0) for key in ("s3", "download"))
    assert 0 < file_bytes <= 64 * 1024


def file_bytes_sent(stats):
    """Bytes of archive files the twin sent (S3 GetObject and HTTPS downloads)."""
    return sum(stats["endpoints"].get(key, {}).get("bytes_sent", 0) for key in ("s3:GetObject", "download"))


def test_getheader_of_a_real_size_mosaic_costs_at_most_64_kib(tmp_path):
    """astropy reads a primary header 4 KiB at a time; the kernel's readahead must not pull in the
    block after the first one (1 MiB of read-ahead did: 4 MiB more on the wire)."""
    from astropy.io import fits

    from mastfs.twin.server import Twin

    uri = twin_catalog.BENCH_1GIB_URI
    with Twin.start(scale=1.0) as real_size, mounted(real_size, tmp_path) as live:
        path = path_of(live, uri, OBS)
        assert os.stat(path).st_size >= 2**30
        real_size.reset_stats()
        header = fits.getheader(path)
        time.sleep(0.5)  # readahead, if any, runs in the background
        assert header["SIMPLE"] is True and header["TELESCOP"] == "JWST"
        assert 0 < file_bytes_sent(real_size.stats()) <= 64 * 1024


def test_one_product_under_several_observations_is_fetched_once(mount, clean_twin):
    first = path_of(mount, SHARED_URI, "jw02733-o001_t001_nircam_clear-f090w")
    second = path_of(mount, SHARED_URI, "jw02733-o001_t001_nircam_clear-f187n")
    assert os.stat(first).st_ino != os.stat(second).st_ino
    expected = clean_twin.catalog.sha256(SHARED_URI)
    assert sha256_of(first) == expected
    clean_twin.reset_stats()
    assert sha256_of(second) == expected
    stats = clean_twin.stats()
    assert endpoint_requests(stats, "s3") + endpoint_requests(stats, "download") == 0


def test_random_reads_match(mount, twin):
    uri = twin_catalog.BENCH_2GIB_URI
    path = path_of(mount, uri, "jw02733-o001_t001_nircam_clear-f356w")
    size = twin.catalog.product(uri).size
    fd = os.open(path, os.O_RDONLY)
    try:
        for offset, length in ((0, 1), (2879, 2), (65535, 70000), (size - 10, 100), (size, 10),
                               (4 * 2**20 + 12345, 3 * 2**20)):
            assert os.pread(fd, length, offset) == twin.catalog.read(uri, offset, min(length, max(0, size - offset)))
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------ exclusive data


def exclusive_path(mount):
    uri = twin_catalog.EXCLUSIVE_URI
    obs_id = uri.rsplit("/", 1)[1].rsplit("_", 1)[0]
    return path_of(mount, uri, obs_id, program=twin_catalog.EXCLUSIVE_PROGRAM)


def test_exclusive_product_is_readable_with_a_token(twin, clean_twin, tmp_path):
    with mounted(twin, tmp_path, env={"MAST_API_TOKEN": twin_catalog.VALID_TOKEN}) as live:
        path = exclusive_path(live)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o400
        assert sha256_of(path) == twin.catalog.sha256(twin_catalog.EXCLUSIVE_URI)
        assert twin_catalog.VALID_TOKEN not in live.log_text()
        # exclusive data is read over HTTPS (with the token), whatever S3 key the archive lists
        assert b"/api/v0.1/Download/file?uri=" in os.getxattr(path, "user.mastfs.source")
        assert twin_catalog.VALID_TOKEN.encode() not in os.getxattr(path, "user.mastfs.source")


def test_refused_token_is_eacces(twin, clean_twin, tmp_path):
    with mounted(twin, tmp_path, env={"MAST_API_TOKEN": twin_catalog.EXPIRED_TOKEN}) as live:
        path = exclusive_path(live)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o400  # a token is configured: MAST decides
        for _ in range(2):
            assert errno_of(sha256_of, path) == errno.EACCES
        lines = [line for line in live.log_text().splitlines() if "access refused" in line]
        assert len(lines) == 1 and twin_catalog.EXPIRED_TOKEN not in live.log_text()


# ------------------------------------------------------------------------------------------- outages


def test_stalled_byte_path_is_eio(twin, clean_twin, tmp_path):
    uri = "mast:JWST/product/jw02733002001_02103_00003_mirimage_cal.fits"
    with mounted(twin, tmp_path, deadline="2s") as live:
        path = path_of(live, uri, OBS)
        clean_twin.faults.add("s3", "stall")
        clean_twin.faults.add("download", "stall")
        assert errno_of(sha256_of, path) == errno.EIO
        clean_twin.faults.clear()
        assert sha256_of(path) == twin.catalog.sha256(uri)


def test_source_http_never_touches_s3(twin, clean_twin, tmp_path):
    uri = twin_catalog.BENCH_1GIB_URI
    with mounted(twin, tmp_path, source="http") as live:
        path = path_of(live, uri, OBS)
        assert sha256_of(path) == twin.catalog.sha256(uri)
    stats = clean_twin.stats()
    assert endpoint_requests(stats, "s3") == 0 and endpoint_requests(stats, "path_lookup") == 0


# ------------------------------------------------------------------------------- control, umount


def test_control_status_refresh_and_prefetch(mount, clean_twin):
    level3 = mount.join("program", PROGRAM, "jw02733-o002_t001_miri_f770w", "level3")
    os.listdir(level3)
    (status,) = mount.control({"op": "status"})
    assert status["ok"] and status["mountpoint"] == mount.path
    assert {"in_flight", "bytes_fetched", "errors"} <= set(status["reader"])

    answers = mount.control({"op": "prefetch", "path": level3, "jobs": 4})
    start, *files, summary = [a for a in answers if a.get("event") != "progress"]
    assert start["event"] == "start" and start["files"] == len(files) == len(os.listdir(level3))
    assert summary["end"] and summary["ok"] and summary["failed"] == 0
    assert summary["done"] + summary["skipped"] == len(files)
    for name in os.listdir(level3):
        path = os.path.join(level3, name)
        assert int(os.getxattr(path, "user.mastfs.cached_bytes")) == os.stat(path).st_size
    again = mount.control({"op": "prefetch", "path": level3})
    assert again[-1]["skipped"] == len(files) and again[-1]["bytes"] == 0

    clean_twin.reset_stats()
    (refreshed,) = mount.control({"op": "refresh", "path": level3})
    assert refreshed["ok"]
    os.listdir(level3)
    assert endpoint_requests(clean_twin.stats(), "invoke:Mast.Caom.Products") == 1

    (bad,) = mount.control({"op": "refresh", "path": "/program/abc"})
    assert not bad["ok"] and bad["end"]


def test_umount_while_a_read_is_in_flight(twin, clean_twin, tmp_path):
    uri = "mast:JWST/product/jw02733002001_02103_00004_mirimage_cal.fits"
    with mounted(twin, tmp_path) as live:
        path = path_of(live, uri, OBS)
        clean_twin.faults.add("s3", "latency", seconds=1)
        result = {}
        handle = open(path, "rb")  # noqa: SIM115 - closed by the reader thread

        def read_all():
            with handle:
                result["sha"] = hashlib.sha256(handle.read()).hexdigest()

        reader = threading.Thread(target=read_all)
        reader.start()
        umount = subprocess.run([sys.executable, "-m", "mastfs", "umount", live.path], capture_output=True,
                                text=True, timeout=60)
        reader.join(timeout=60)
        clean_twin.faults.clear()
        assert umount.returncode == 0, umount.stderr
        assert result["sha"] == twin.catalog.sha256(uri)
        live.process.wait(timeout=30)
        assert live.process.returncode == 0


def test_cache_survives_a_remount(twin, clean_twin, tmp_path):
    uri = "mast:JWST/product/jw02733002001_02103_00005_mirimage_cal.fits"
    cache = tmp_path / "cache"
    with mounted(twin, tmp_path, cache_dir=cache, name="one") as first:
        first_path = path_of(first, uri, OBS)
        assert sha256_of(first_path) == twin.catalog.sha256(uri)
        assert eventually_cached(first_path) == os.stat(first_path).st_size
    with mounted(twin, tmp_path, cache_dir=cache, name="two") as second:
        path = path_of(second, uri, OBS)
        assert int(os.getxattr(path, "user.mastfs.cached_bytes")) == os.stat(path).st_size
        clean_twin.reset_stats()
        assert sha256_of(path) == twin.catalog.sha256(uri)
        stats = clean_twin.stats()
        # the open revalidates the cached version with one HeadObject; no byte crosses the network
        assert endpoint_requests(stats, "s3:HeadObject") == endpoint_requests(stats, "s3") == 1
        assert endpoint_requests(stats, "download") == 0 and stats["total_bytes_sent"] == 0


def test_sigterm_unmounts_cleanly(twin, tmp_path):
    with mounted(twin, tmp_path) as live:
        os.listdir(live.join("program", PROGRAM))
        live.process.send_signal(signal.SIGTERM)
        assert live.process.wait(timeout=30) == 0
        assert not os.path.ismount(live.path)
        assert "unmounted" in live.log_text()
