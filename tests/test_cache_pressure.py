"""Cache pressure through a real mount: a workload five times the cache limit keeps the block cache under
``--cache-size`` at every step with every read correct, and the minimum-free-space guard (set above the
disk's free space) keeps the cache from growing at all while reads stay correct.

Uses the scale-0.01 twin, whose mosaics span many 4 MiB blocks (one is larger than the whole cache).
"""

from __future__ import annotations

import os
import shutil

import pytest
from mountutil import mounted
from reliability_util import (
    block_files,
    bounded,
    bytes_sent,
    drop_page_cache,
    layout_of,
    sha256_of,
    shared_big_twin,
    tree_bytes,
)

from mastfs.config import parse_size
from mastfs.reader import MEMORY_LIMIT

pytestmark = pytest.mark.mount

CACHE_SIZE = "8M"
LIMIT = parse_size(CACHE_SIZE)
OBSERVATIONS = ["jw02733-o001_t001_nircam_clear-f090w", "jw02733-o001_t001_nircam_f405n-f444w",
                "jw02733-o002_t001_miri_f1130w", "jw02733-o002_t001_miri_f1280w", "jw02733-o002_t001_miri_f1800w"]


@pytest.fixture(scope="module")
def big_twin():
    twin = shared_big_twin()
    twin.faults.clear()
    return twin


def workload(twin, total: int) -> list[tuple[str, str]]:
    """(uri, path under the mount) of public S3 products, 1-20 MB each (one bigger than the cache), of
    about ``total`` bytes in all."""
    chosen: list[tuple[str, str]] = []
    volume = 0
    for obs_id in OBSERVATIONS:
        layout = layout_of(twin, obs_id)
        for uri, path in sorted(layout.paths.items()):
            product = twin.catalog.product(uri)
            if product.exclusive or not product.s3_key or not 1_000_000 <= product.size <= 20_000_000:
                continue
            chosen.append((uri, os.path.join("obs", obs_id, path)))
            volume += product.size
            if volume >= total:
                return chosen
    raise AssertionError(f"the twin has only {volume} bytes of such products")


def blocks_bytes(cache_dir: str) -> int:
    return tree_bytes(os.path.join(cache_dir, "blocks"))


def test_a_workload_five_times_the_cache_keeps_the_limit(big_twin, tmp_path):
    # Five times the disk cache, and more than the reader's in-memory blocks too, so that the second
    # round must fetch again what was evicted.
    products = workload(big_twin, max(5 * LIMIT, 2 * MEMORY_LIMIT))
    assert any(big_twin.catalog.product(uri).size > LIMIT for uri, _ in products)
    total = sum(big_twin.catalog.product(uri).size for uri, _ in products)
    most = 0
    with mounted(big_twin, tmp_path, cache_size=CACHE_SIZE) as mount:
        for round_number in range(2):  # the second round re-reads what was evicted, through the daemon
            big_twin.reset_stats()
            for uri, rel in products:
                drop_page_cache(mount.join(rel))
                outcome = bounded(lambda r=rel: sha256_of(mount.join(r)))
                assert outcome.ok and outcome.value == big_twin.catalog.sha256(uri), (round_number, rel)
                most = max(most, blocks_bytes(mount.cache_dir))
                assert blocks_bytes(mount.cache_dir) <= LIMIT
            assert bytes_sent(big_twin, "s3:GetObject") >= total - LIMIT - MEMORY_LIMIT
        assert block_files(mount.cache_dir), "nothing was cached at all"
    assert 0 < most <= LIMIT
    print(f"\nPRESSURE: {total} bytes read twice through a {LIMIT}-byte cache; at most {most} bytes on disk")


def test_the_free_space_guard_keeps_the_cache_from_growing(big_twin, tmp_path):
    free = shutil.disk_usage(tmp_path).free
    products = workload(big_twin, 2 * LIMIT)
    with mounted(big_twin, tmp_path, min_free_space=str(free + 2**30)) as mount:
        for uri, rel in products:
            outcome = bounded(lambda r=rel: sha256_of(mount.join(r)))
            assert outcome.ok and outcome.value == big_twin.catalog.sha256(uri)
            assert not block_files(mount.cache_dir)
        assert blocks_bytes(mount.cache_dir) == 0
