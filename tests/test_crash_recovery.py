"""Crash recovery: kill -9 the daemon in the middle of a transfer, mount again on the same (dead) mountpoint
and cache: the mountpoint is recovered and only verified bytes are served. Then corrupt the cache on disk
on purpose (flipped bytes, a truncated block, a block of another product, leftover temporary files, a
garbage metadata database): detected, rebuilt or fetched again, never served.

Uses its own twin at scale 0.01 so that products span many 4 MiB blocks.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import threading
import time

import pytest
from mountutil import start_mount, stop_mount
from reliability_util import (
    SLACK_LIMIT,
    block_files,
    bounded,
    bytes_sent,
    cache_verify,
    layout_of,
    sha256_of,
    shared_big_twin,
    total_requests,
)

from mastfs.blockcache import HEADER_SIZE, LAYOUT, ProductRef, block_count, block_span

pytestmark = pytest.mark.mount

OBS = "jw02733-o001_t001_nircam_clear-f356w"  # its i2d: 25 MB, 7 blocks at scale 0.01
OTHER_OBS = "jw02733-o001_t001_nircam_f444w-f470n"  # its i2d: 16 MB, 5 blocks
MOUNT_SETTINGS = {"deadline": "10s", "retries": 3}


@pytest.fixture(scope="module")
def big_twin():
    twin = shared_big_twin()
    twin.faults.clear()
    yield twin
    twin.faults.clear()


def largest_product(twin, obs_id: str) -> tuple[str, str]:
    """(uri, path under the mount) of the largest public S3 product of ``obs_id``."""
    layout = layout_of(twin, obs_id)
    candidates = [twin.catalog.product(uri) for uri in layout.paths]
    product = max((p for p in candidates if p.s3_key and not p.exclusive and p.send_content_length),
                  key=lambda p: p.size)
    return product.uri, os.path.join("obs", obs_id, layout.paths[product.uri])


def block_path(cache_dir: str, uri: str, size: int, index: int) -> str:
    """Where the block cache keeps block ``index`` of a product (docs/caching.md): under its product key,
    in the directory of its one cached version."""
    product = ProductRef(uri, size).product_key
    product_dir = os.path.join(cache_dir, "blocks", LAYOUT, product[:2], product)
    (version,) = os.listdir(product_dir)
    return os.path.join(product_dir, version, str(index))


@pytest.fixture
def no_dead_mount_left(tmp_path):
    """Whatever happens, the mountpoint of the killed daemon is not left behind."""
    yield
    with open("/proc/self/mountinfo", encoding="utf-8") as mounts:
        left = str(tmp_path / "mnt") in mounts.read()
    if left:
        subprocess.run(["fusermount3", "-u", "-z", str(tmp_path / "mnt")], capture_output=True, check=False)


def test_kill_9_mid_transfer_then_remount_on_the_dead_mountpoint(big_twin, tmp_path, no_dead_mount_left):
    big_twin.faults.clear()
    uri, rel = largest_product(big_twin, OBS)
    size = big_twin.catalog.product(uri).size
    mount = start_mount(big_twin, tmp_path / "mnt", tmp_path / "cache", tmp_path / "first.log", **MOUNT_SETTINGS)
    try:
        assert bounded(lambda: os.listdir(mount.join(os.path.dirname(rel)))).ok
        big_twin.faults.add("s3", "latency", seconds=1.0)  # slow every ranged GET: a long transfer
        reader = {}

        def read() -> None:
            try:
                reader["sha"] = sha256_of(mount.join(rel))
            except OSError as exc:
                reader["errno"] = exc.errno

        thread = threading.Thread(target=read, daemon=True)
        thread.start()
        deadline = time.monotonic() + SLACK_LIMIT
        while not block_files(mount.cache_dir) and time.monotonic() < deadline:
            time.sleep(0.05)
        stored_before_kill = len(block_files(mount.cache_dir))
        assert 0 < stored_before_kill < block_count(size) and thread.is_alive(), "not mid-transfer"
        os.kill(mount.process.pid, signal.SIGKILL)
        mount.process.wait(timeout=SLACK_LIMIT)
        thread.join(SLACK_LIMIT)
        assert not thread.is_alive(), "a reader of the killed mount hung"
        assert reader.get("errno") in (errno.ENOTCONN, errno.ECONNABORTED, errno.EIO), reader
        with pytest.raises(OSError) as dead:
            os.listdir(mount.path)
        assert dead.value.errno == errno.ENOTCONN
    finally:
        big_twin.faults.clear()

    # `mastfs mount` recovers the dead mountpoint by itself, then serves from the same cache
    big_twin.reset_stats()
    again = start_mount(big_twin, tmp_path / "mnt", tmp_path / "cache", tmp_path / "second.log", **MOUNT_SETTINGS)
    try:
        assert not os.listdir(os.path.join(again.cache_dir, "blocks", "tmp"))  # unfinished writes removed
        reused = len(block_files(again.cache_dir))
        outcome = bounded(lambda: sha256_of(again.join(rel)))
        assert outcome.ok and outcome.value == big_twin.catalog.sha256(uri)
        # the blocks that reached the disk before the kill were reused, the others fetched again
        assert 0 < reused and bytes_sent(big_twin, "s3:GetObject") < size
        print(f"\nCRASH: {stored_before_kill}/{block_count(size)} blocks on disk at the kill; {reused} reused, "
              f"{bytes_sent(big_twin, 's3:GetObject')} of {size} bytes fetched again")
    finally:
        stop_mount(again)


def corrupt_count(verify_output: str) -> int:
    """The number of corrupt blocks ``mastfs cache verify`` reports ("... N corrupt ...")."""
    found = re.search(r"(\d+) corrupt", verify_output)
    assert found, verify_output
    return int(found.group(1))


def flip_byte(path: str, offset: int) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        value = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([value[0] ^ 0xFF]))


def test_a_corrupted_cache_is_detected_and_fetched_again(big_twin, tmp_path):
    big_twin.faults.clear()
    (first, first_rel), (second, second_rel) = largest_product(big_twin, OBS), largest_product(big_twin, OTHER_OBS)
    sizes = {uri: big_twin.catalog.product(uri).size for uri in (first, second)}
    cache = tmp_path / "cache"
    mount = start_mount(big_twin, tmp_path / "mnt", cache, tmp_path / "fill.log", **MOUNT_SETTINGS)
    try:
        for rel, uri in ((first_rel, first), (second_rel, second)):
            assert sha256_of(mount.join(rel)) == big_twin.catalog.sha256(uri)
    finally:
        stop_mount(mount)
    assert block_count(sizes[first]) >= 4 and block_count(sizes[second]) >= 3

    # 1. damage blocks and the metadata database, then read through a fresh mount
    flipped = block_path(str(cache), first, sizes[first], 1)
    flip_byte(flipped, HEADER_SIZE + 12345)
    truncated = block_path(str(cache), first, sizes[first], 2)
    os.truncate(truncated, os.path.getsize(truncated) // 2)
    header_hit = block_path(str(cache), second, sizes[second], 0)
    flip_byte(header_hit, 5)  # inside the block header (its index)
    swapped = block_path(str(cache), second, sizes[second], 2)
    with open(block_path(str(cache), second, sizes[second], 1), "rb") as source:
        other_block = source.read()
    with open(swapped, "wb") as target:  # a whole, valid block, but of another index
        target.write(other_block)
    os.makedirs(cache / "blocks" / "tmp", exist_ok=True)
    (cache / "blocks" / "tmp" / "leftover").write_bytes(b"half a block")
    meta = cache / "meta"
    for name in os.listdir(meta):
        if name.endswith(".db"):
            (meta / name).write_bytes(os.urandom(8192))
    damaged_bytes = sum(block_span(index, sizes[uri])[1] - block_span(index, sizes[uri])[0]
                        for uri, index in ((first, 1), (first, 2), (second, 0), (second, 2)))

    big_twin.reset_stats()
    mount = start_mount(big_twin, tmp_path / "mnt", cache, tmp_path / "damaged.log", **MOUNT_SETTINGS)
    try:
        for rel, uri in ((first_rel, first), (second_rel, second)):
            outcome = bounded(lambda r=rel: sha256_of(mount.join(r)))
            assert outcome.ok and outcome.value == big_twin.catalog.sha256(uri)
        # exactly the damaged blocks crossed the wire again; the metadata was asked again (rebuilt db)
        assert bytes_sent(big_twin, "s3:GetObject") == damaged_bytes
        assert total_requests(big_twin) > 0
        assert not os.path.exists(cache / "blocks" / "tmp" / "leftover")
        log = mount.log_text()
        assert "corrupt" in log
    finally:
        stop_mount(mount)

    # 2. `mastfs cache verify` finds damage too, and removes it
    flip_byte(block_path(str(cache), first, sizes[first], 3), HEADER_SIZE + 1)
    os.truncate(block_path(str(cache), second, sizes[second], 1), HEADER_SIZE + 10)
    report = cache_verify(str(cache))
    assert report.returncode == 1 and corrupt_count(report.stdout) == 2, report.stdout + report.stderr
    report = cache_verify(str(cache))
    assert report.returncode == 0 and corrupt_count(report.stdout) == 0, report.stdout + report.stderr

    big_twin.reset_stats()
    mount = start_mount(big_twin, tmp_path / "mnt", cache, tmp_path / "verified.log", **MOUNT_SETTINGS)
    try:
        for rel, uri in ((first_rel, first), (second_rel, second)):
            assert sha256_of(mount.join(rel)) == big_twin.catalog.sha256(uri)
        refetched = sum(block_span(index, sizes[uri])[1] - block_span(index, sizes[uri])[0]
                        for uri, index in ((first, 3), (second, 1)))
        assert bytes_sent(big_twin, "s3:GetObject") == refetched
    finally:
        stop_mount(mount)
