"""mast:// (mastfs.remote): the fsspec filesystem over the shared tree and services, against the twin."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import pickle
import subprocess
import sys
import time
import warnings

import fsspec
import pytest

from mastfs.blockcache import block_index, block_span
from mastfs.remote import MastFileSystem
from mastfs.twin import catalog as twin_catalog

PROGRAM = twin_catalog.PROGRAM_2733
OBS = twin_catalog.OBS_2733_MIRI_F1130W
OBS_DIR = f"program/{PROGRAM}/{OBS}"
MOSAIC = twin_catalog.BENCH_1GIB_URI


def options(twin, cache_dir, **more):
    return {"mast_url": twin.mast_url, "resolver_url": twin.resolver_url, "s3_endpoint": twin.s3_endpoint,
            "cache_dir": str(cache_dir), **more}


def file_bytes_sent(stats):
    """Bytes of archive files the twin sent (S3 GetObject and HTTPS downloads)."""
    return sum(stats["endpoints"].get(key, {}).get("bytes_sent", 0) for key in ("s3:GetObject", "download"))


def path_of(fs, uri, obs_dir=OBS_DIR):
    """The mast:// path of product ``uri`` in observation directory ``obs_dir``."""
    for group in fs.ls(obs_dir):
        if group["type"] == "directory":
            for entry in fs.ls(group["name"]):
                if entry.get("uri") == uri:
                    return entry["name"]
    raise AssertionError(f"{uri} not in {obs_dir}")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("remote-cache")


@pytest.fixture
def fs(twin, cache_dir):
    return fsspec.filesystem("mast", **options(twin, cache_dir))


def test_protocol_is_registered_through_the_entry_point():
    assert fsspec.get_filesystem_class("mast") is MastFileSystem


def test_ls_shows_the_mounts_names_with_every_mast_field(fs, twin):
    assert OBS in [name.rsplit("/", 1)[1] for name in fs.ls(f"mast://program/{PROGRAM}", detail=False)]
    assert set(fs.ls("", detail=False)) == {"README.txt", "program", "obs", "target", "cone"}
    groups = {entry["name"].rsplit("/", 1)[1]: entry for entry in fs.ls(OBS_DIR)}
    assert {"level2", "level3", "observation.json", "products.csv"} <= set(groups)
    assert groups["level3"]["type"] == "directory"
    assert groups["observation.json"]["type"] == "file" and groups["observation.json"]["size"] > 0
    entry = fs.info(path_of(fs, MOSAIC))
    product = twin.catalog.product(MOSAIC)
    assert entry["type"] == "file" and entry["size"] == product.size
    assert entry["mast_dataURI"] == MOSAIC and entry["mast_productType"] == "SCIENCE"
    assert entry["mast_calib_level"] == 3 and entry["mtime"] > 0
    assert fs.info(OBS_DIR)["mast_obs_id"] == OBS  # an observation directory carries its fields


def test_obs_target_and_cone_grammar_is_the_mounts(fs):
    assert fs.isdir(f"obs/{OBS}")
    assert "level3" in [name.rsplit("/", 1)[1] for name in fs.ls(f"obs/{OBS}", detail=False)]
    assert fs.ls("target/NGC 3132", detail=False)
    with pytest.raises(FileNotFoundError):
        fs.ls("cone/400,0")


def test_impossible_names_are_not_found_without_a_network_request(fs, clean_twin):
    fs.ls(f"program/{PROGRAM}")  # warm
    clean_twin.reset_stats()
    for path in ("program/02733", "obs/.hidden", "program/2733/x;y", "target/a--b", "cone/1,2,3,4"):
        with pytest.raises(FileNotFoundError):
            fs.info(path)
        assert not fs.exists(path)
    assert clean_twin.stats()["total_requests"] == 0


def test_glob_and_find_walk_the_tree(fs):
    cal = fs.glob(f"{OBS_DIR}/level2/*_cal.fits")
    assert cal and all(name.endswith("_cal.fits") and "/level2/" in name for name in cal)
    found = fs.find(f"{OBS_DIR}/level3")
    assert path_of(fs, MOSAIC) in found and all(fs.isfile(name) for name in found[:3])


def test_open_reads_at_random_and_cat_ranges_match_the_archive(fs, twin):
    path = path_of(fs, MOSAIC)
    size = twin.catalog.product(MOSAIC).size
    with fs.open(f"mast://{path}", "rb") as handle:
        for offset, length in ((0, 1), (2879, 2), (65535, 70000), (size - 10, 100), (5000, 0)):
            handle.seek(offset)
            assert handle.read(length) == twin.catalog.read(MOSAIC, offset, max(0, min(length, size - offset)))
    assert fs.cat_file(path, -100) == twin.catalog.read(MOSAIC, size - 100, 100)
    assert fs.cat_file(path, 10, 20) == twin.catalog.read(MOSAIC, 10, 10)
    starts = [0, 70_000, size - 5]
    got = fs.cat_ranges([path] * 3 + [f"{OBS_DIR}/nope"], starts + [0], [10, 80_000, size, 1])
    assert got[:3] == [twin.catalog.read(MOSAIC, s, e - s) for s, e in zip(starts, [10, 80_000, size], strict=True)]
    assert isinstance(got[3], FileNotFoundError)


@pytest.fixture(scope="module")
def real_size():
    """A twin serving the real sizes (bytes generated per read: a 1.16 GB mosaic costs nothing unread)."""
    from mastfs.twin.server import Twin

    with Twin.start(scale=1.0) as handle:
        yield handle


@pytest.mark.parametrize("block_size", [0, 8 * 2**20])
def test_block_size_is_how_far_a_sequential_reader_reads_ahead(real_size, tmp_path, block_size):
    fs = MastFileSystem(**options(real_size, tmp_path))
    path = path_of(fs, MOSAIC)
    size = real_size.catalog.product(MOSAIC).size
    real_size.reset_stats()
    with fs.open(path, block_size=block_size) as handle:
        chunks = [handle.read(2**20) for _ in range(3)]  # sequential, from block 0 into block 1
        assert handle.blocksize == block_size
        touched = block_span(1, size)[1]
        ahead = block_span(2, size)[1] - touched if block_size else 0  # 8 MiB: the window reaches block 2
        deadline = time.monotonic() + 10
        while file_bytes_sent(real_size.stats()) < touched + ahead and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # anything more would be on its way by now
    assert b"".join(chunks) == real_size.catalog.read(MOSAIC, 0, 3 * 2**20)
    assert file_bytes_sent(real_size.stats()) == touched + ahead


def test_cat_ranges_are_coalesced_into_the_blocks_they_touch(real_size, tmp_path):
    fs = MastFileSystem(**options(real_size, tmp_path))
    path = path_of(fs, MOSAIC)
    size = real_size.catalog.product(MOSAIC).size
    two, three, ten = block_span(2, size), block_span(3, size), block_span(10, size)
    ranges = [(three[0] + 10, three[0] + 20), (100, 200), (two[1] - 10, two[1] - 5), (ten[0] + 1, ten[0] + 2),
              (150, 160), (two[0], two[0] + 1000)]
    real_size.reset_stats()
    got = fs.cat_ranges([path] * len(ranges), [r[0] for r in ranges], [r[1] for r in ranges])
    assert got == [real_size.catalog.read(MOSAIC, start, end - start) for start, end in ranges]
    stats = real_size.stats()
    blocks = (0, 2, 3, 10)
    assert file_bytes_sent(stats) == sum(block_span(i, size)[1] - block_span(i, size)[0] for i in blocks)
    assert stats["endpoints"]["s3:GetObject"]["requests"] == 3  # block 0; blocks 2-3 in one; block 10


def test_astropy_reads_a_header_for_64_kib_and_a_section_for_the_blocks_it_touches(real_size, tmp_path):
    from astropy.io import fits

    fs_options = options(real_size, tmp_path)
    path = path_of(MastFileSystem(**fs_options), MOSAIC)
    size = real_size.catalog.product(MOSAIC).size
    assert size >= 2**30
    real_size.reset_stats()
    with fits.open(f"mast://{path}", use_fsspec=True, fsspec_kwargs=fs_options) as hdul:
        assert hdul[0].header["TELESCOP"] == "JWST"
        assert 0 < file_bytes_sent(real_size.stats()) <= 64 * 1024
        sci = hdul[1]
        ny, nx = sci.shape
        itemsize = abs(sci.header["BITPIX"]) // 8
        cutout = sci.section[100:200, 100:200]
        offset = sci._data_offset
    assert cutout.shape == (100, 100)
    rows = [(offset + (row * nx + 100) * itemsize, offset + (row * nx + 200) * itemsize) for row in range(100, 200)]
    expected = b"".join(real_size.catalog.read(MOSAIC, start, end - start) for start, end in rows)
    assert cutout.astype(cutout.dtype.newbyteorder(">")).tobytes() == expected
    blocks = {0} | {index for start, end in rows for index in range(block_index(start), block_index(end - 1) + 1)}
    assert len(blocks) < 4  # a cutout of a 1.16 GB mosaic
    assert file_bytes_sent(real_size.stats()) == sum(block_span(i, size)[1] - block_span(i, size)[0] for i in blocks)


def test_upath_iterates_a_programs_observations(twin, cache_dir):
    from upath import UPath

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the entry point gives upath an implementation: no fallback warning
        program = UPath(f"mast://program/{PROGRAM}", **options(twin, cache_dir))
    assert type(program).__name__ == "MastPath"
    names = [child.name for child in program.iterdir()]
    assert OBS in names and len(names) >= 10
    level3 = program / OBS / "level3"
    assert level3.is_dir() and any(child.name.endswith("_i2d.fits") for child in level3.iterdir())
    assert (program / OBS / "observation.json").read_bytes().startswith(b"{")


def test_get_downloads_with_progress_and_resumes_a_partial_download(twin, clean_twin, tmp_path):
    fs = MastFileSystem(**options(twin, tmp_path / "cache"))
    path = path_of(fs, MOSAIC)
    size = twin.catalog.product(MOSAIC).size
    expected = twin.catalog.read(MOSAIC, 0, size)

    class Progress(fsspec.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.updates = []

        def call(self, *args, **kwargs):
            self.updates.append(self.value)

    # an interrupted earlier download left its first block behind
    local = tmp_path / "out" / "mosaic.fits"
    local.parent.mkdir()
    version = fs.open_product(path).ref.version_key[:16]
    partial = f"{local}.{version}.part"
    first = block_span(0, size)[1]
    with open(partial, "wb") as handle:
        handle.write(expected[:first])
    clean_twin.reset_stats()
    progress = Progress()
    fs.get_file(f"mast://{path}", str(local), callback=progress)
    assert local.read_bytes() == expected and not os.path.exists(partial)
    moved = [value for value in progress.updates if value]  # (set_size reports 0 first)
    assert progress.size == size and moved[0] == first and moved[-1] == size
    assert file_bytes_sent(clean_twin.stats()) == size - first  # the first block was not fetched again


def test_every_write_method_is_read_only(fs):
    path = f"{OBS_DIR}/new.fits"
    for call in (lambda: fs.open(path, "wb"), lambda: fs.mkdir(f"{OBS_DIR}/d"), lambda: fs.rm(f"{OBS_DIR}/products.csv"),
                 lambda: fs.touch(path), lambda: fs.pipe_file(path, b"x"), lambda: fs.put_file(__file__, path),
                 lambda: fs.cp_file(f"{OBS_DIR}/products.csv", path), lambda: fs.mv(f"{OBS_DIR}/products.csv", path),
                 lambda: fs.makedirs(f"{OBS_DIR}/a/b"), lambda: fs.rmdir(OBS_DIR)):
        with pytest.raises(OSError) as refused:
            call()
        assert refused.value.errno == errno.EROFS


def test_exclusive_data_raises_permission_error_saying_how_to_log_in(twin, cache_dir, monkeypatch):
    monkeypatch.delenv("MAST_API_TOKEN", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", "/nonexistent")
    monkeypatch.setattr("mastfs.auth._keyring_token", lambda: None)
    fs = MastFileSystem(**options(twin, cache_dir))
    uri = twin_catalog.EXCLUSIVE_URI
    obs_id = uri.rsplit("/", 1)[1].rsplit("_", 1)[0]
    path = path_of(fs, uri, f"program/{twin_catalog.EXCLUSIVE_PROGRAM}/{obs_id}")
    with pytest.raises(PermissionError) as refused:
        fs.cat_file(path, 0, 10)
    assert "auth.mast.stsci.edu/token" in str(refused.value) and "MAST_API_TOKEN" in str(refused.value)
    monkeypatch.setenv("MAST_API_TOKEN", twin_catalog.VALID_TOKEN)
    entitled = MastFileSystem(**options(twin, cache_dir))
    assert entitled.cat_file(path, 0, 6) == b"SIMPLE"


def test_outage_is_eio_naming_the_cause_after_the_deadline(twin, clean_twin, tmp_path):
    fs = MastFileSystem(**options(twin, tmp_path, deadline="2s", retries=2))
    clean_twin.faults.add("invoke", "status", code=503)
    with pytest.raises(OSError) as failed:
        fs.ls("program/1234")
    assert failed.value.errno == errno.EIO and not isinstance(failed.value, FileNotFoundError)
    assert "Unavailable" in str(failed.value) and "503" in str(failed.value)


def test_a_stalled_download_is_eio_not_a_hang(twin, clean_twin, tmp_path):
    fs = MastFileSystem(**options(twin, tmp_path, deadline="2s", retries=2, source="s3"))
    path = path_of(fs, MOSAIC)
    clean_twin.faults.add("s3", "stall")
    with pytest.raises(OSError) as failed:
        fs.cat_file(path, 0, 100)
    assert failed.value.errno == errno.EIO and "Unavailable" in str(failed.value)


def test_options_are_the_mount_settings(twin, cache_dir, monkeypatch, tmp_path):
    config = tmp_path / "config.toml"
    config.write_text('deadline = "45s"\ntransfers = 3\n')
    monkeypatch.setenv("MASTFS_CONFIG", str(config))
    monkeypatch.setenv("MASTFS_TRANSFERS", "5")
    fs = MastFileSystem(**options(twin, cache_dir, collections="JWST,HST", source="http"))
    assert fs.settings.deadline == 45.0 and fs.settings.transfers == 5  # file < environment
    assert fs.settings.collections == ["JWST", "HST"] and fs.settings.source == "http"
    assert fs.settings.cache_dir == str(cache_dir)
    with pytest.raises(TypeError, match="unknown mast:// options"):
        MastFileSystem(mast_ur="x")
    with pytest.raises(ValueError, match="source"):
        MastFileSystem(source="ftp")


def test_pickles_as_its_options_only(twin, cache_dir, monkeypatch):
    monkeypatch.setenv("MAST_API_TOKEN", twin_catalog.VALID_TOKEN)
    fs = MastFileSystem(**options(twin, cache_dir))
    data = pickle.dumps(fs)
    assert twin_catalog.VALID_TOKEN.encode() not in data
    again = pickle.loads(data)
    assert again.settings == fs.settings
    assert again.ls(f"program/{PROGRAM}", detail=False) == fs.ls(f"program/{PROGRAM}", detail=False)


CORE_CHILD = """
import json, sys, threading
from mastfs.remote import MastFileSystem
options, other, path = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
def cores():
    return [t.name for t in threading.enumerate()].count("mastfs-core")
fs = MastFileSystem(**options)
before = cores()
data = fs.cat_file(path)
MastFileSystem(**other).ls("program/2733")
print(json.dumps({"before": before, "after": cores(), "bytes": len(data)}))
"""


def test_one_core_thread_per_process_started_lazily_and_stopped_at_exit(twin, clean_twin, tmp_path):
    fs = MastFileSystem(**options(twin, tmp_path / "a"))
    path = path_of(fs, MOSAIC)
    size = twin.catalog.product(MOSAIC).size
    child = subprocess.run([sys.executable, "-c", CORE_CHILD, json.dumps(options(twin, tmp_path / "b")),
                            json.dumps(options(twin, tmp_path / "c")), path],
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr
    assert json.loads(child.stdout) == {"before": 0, "after": 1, "bytes": size}
    # the child's exit let every fetched block reach the disk: read again, nothing crosses the wire
    clean_twin.reset_stats()
    assert MastFileSystem(**options(twin, tmp_path / "b")).cat_file(path) == twin.catalog.read(MOSAIC, 0, size)
    assert file_bytes_sent(clean_twin.stats()) == 0


def _read_in_child(fs, path, queue):
    queue.put(fs.cat_file(path, 0, 100))


def test_a_forked_child_starts_its_own_core(fs, twin):
    path = path_of(fs, MOSAIC)
    assert fs.cat_file(path, 0, 10) == twin.catalog.read(MOSAIC, 0, 10)  # the parent's core is running
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_read_in_child, args=(fs, path, queue))
    child.start()
    got = queue.get(timeout=60)
    child.join(30)
    assert child.exitcode == 0 and got == twin.catalog.read(MOSAIC, 0, 100)
