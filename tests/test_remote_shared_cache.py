"""One cache directory, three processes at once: a mount and two Python processes using mast://."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
import threading

import pytest
from mountutil import mounted

from mastfs.blockcache import block_count
from mastfs.twin import catalog as twin_catalog

URI = twin_catalog.BENCH_2GIB_URI
OBS_DIR = "program/2733/jw02733-o001_t001_nircam_clear-f356w"
READER = """
import hashlib, json, sys
from mastfs.remote import MastFileSystem
options, path, go = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
fs = MastFileSystem(**options)
fs.info(path)  # metadata first, so the three readers' byte transfers overlap
open(go + ".ready." + sys.argv[4], "w").close()
import os, time
while not os.path.exists(go):
    time.sleep(0.01)
digest = hashlib.sha256()
with fs.open(path) as handle:
    while chunk := handle.read(1 << 20):
        digest.update(chunk)
print(digest.hexdigest())
"""


@pytest.fixture(scope="module")
def paced_twin():
    """A twin at scale 0.01 (the 2 GiB mosaic is 25 MB, 7 blocks) over a paced link, so that readers
    starting together overlap for most of the transfer."""
    from mastfs.twin.server import Twin

    with Twin.start(scale=0.01) as handle:
        handle.link.set(30, 40)
        yield handle


def file_bytes_sent(stats):
    return sum(stats["endpoints"].get(key, {}).get("bytes_sent", 0) for key in ("s3:GetObject", "download"))


@pytest.mark.mount
def test_a_mount_and_two_processes_share_one_cache_with_one_transfer_per_block(paced_twin, tmp_path):
    cache_dir = tmp_path / "cache"
    size = paced_twin.catalog.product(URI).size
    assert block_count(size) >= 6
    options = {"mast_url": paced_twin.mast_url, "resolver_url": paced_twin.resolver_url,
               "s3_endpoint": paced_twin.s3_endpoint, "cache_dir": str(cache_dir)}
    with mounted(paced_twin, tmp_path, cache_dir=cache_dir) as mount:
        with open(mount.join(*OBS_DIR.split("/"), "products.csv"), encoding="utf-8", newline="") as handle:
            relative = next(row["mastfs_path"] for row in csv.DictReader(handle) if row["dataURI"] == URI)
        mount_path = mount.join(*OBS_DIR.split("/"), relative)
        path = f"{OBS_DIR}/{relative}"
        os.stat(mount_path)
        go = str(tmp_path / "go")
        readers = [subprocess.Popen([sys.executable, "-c", READER, json.dumps(options), path, go, str(n)],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n in (1, 2)]
        try:
            for n in (1, 2):
                while not os.path.exists(f"{go}.ready.{n}"):
                    assert readers[n - 1].poll() is None, readers[n - 1].communicate()
                    threading.Event().wait(0.01)
            paced_twin.reset_stats()
            mount_digest: list[str] = []

            def read_mount() -> None:
                digest = hashlib.sha256()
                with open(mount_path, "rb") as handle:
                    while chunk := handle.read(1 << 20):
                        digest.update(chunk)
                mount_digest.append(digest.hexdigest())

            through_mount = threading.Thread(target=read_mount)
            open(go, "w").close()
            through_mount.start()
            outputs = [reader.communicate(timeout=120) for reader in readers]
            through_mount.join(120)
        finally:
            for reader in readers:
                reader.kill()
        expected = paced_twin.catalog.sha256(URI)
        assert [reader.returncode for reader in readers] == [0, 0], outputs
        assert [out.strip() for out, _ in outputs] == [expected, expected]
        assert mount_digest == [expected]
        assert file_bytes_sent(paced_twin.stats()) == size  # each block crossed the wire once, for all three
