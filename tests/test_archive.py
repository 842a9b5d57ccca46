"""Archive against the MAST twin: request economy, TTL by data age, negative cache, stale-if-error,
single flight, persistence across instances. Time is a fake wall clock."""

from __future__ import annotations

import gc
import logging
import math
import os
import time
import weakref
from contextlib import asynccontextmanager

import pytest
import trio
from asyncutil import trio_test

from mastfs import archive as archive_module
from mastfs.archive import RELEASED_AGE_DAYS, STALE_RETRY_INTERVAL, Archive
from mastfs.config import Settings
from mastfs.errors import NotFound, Unavailable
from mastfs.mast.client import PATH_LOOKUP_BATCH, MastClient, make_http_client
from mastfs.mast.models import Product
from mastfs.twin import catalog as twin_catalog

TTL_RECENT, TTL_RELEASED, TTL_NEGATIVE = 3600.0, 7 * 86400.0, 600.0


class FakeClock:
    """Wall-clock seconds that only move when a test says so."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def settings_for(twin, cache_dir, **changes) -> Settings:
    values = {"mast_url": twin.mast_url, "resolver_url": twin.resolver_url, "cache_dir": str(cache_dir),
              "deadline": 5.0, "retries": 2, "collections": ["JWST"], "ttl_recent": TTL_RECENT,
              "ttl_released": TTL_RELEASED, "ttl_negative": TTL_NEGATIVE}
    values.update(changes)
    return Settings.defaults(**values)


@asynccontextmanager
async def open_archive(twin, cache_dir, clock=None, token=None, **changes):
    settings = settings_for(twin, cache_dir, **changes)
    async with make_http_client(settings) as http:
        archive = Archive(MastClient(http, settings, token_provider=lambda: token), settings,
                          clock=clock or FakeClock())
        try:
            yield archive
        finally:
            await archive.aclose()


def requests(twin, key: str = "invoke") -> int:
    return twin.stats()["endpoints"].get(key, {}).get("requests", 0)


# --- request economy ---------------------------------------------------------------------------------


@trio_test
async def test_program_listing_economy_and_persistence(clean_twin, tmp_path):
    clock = FakeClock()
    async with open_archive(clean_twin, tmp_path, clock) as archive:
        first = await archive.program(twin_catalog.PROGRAM_2733)
        assert requests(clean_twin, "invoke:Mast.Caom.Filtered") == 1
        again = await archive.program(twin_catalog.PROGRAM_2733)
        one = await archive.observation(twin_catalog.OBS_2733_MIRI_F1130W)  # known from the listing
        assert await archive.programs_seen() == [twin_catalog.PROGRAM_2733]
    assert requests(clean_twin) == 1
    assert len(first) == 11 and again == first  # 10 executed, 1 planned (the tree leaves it out)
    assert one.obs_id == twin_catalog.OBS_2733_MIRI_F1130W

    async with open_archive(clean_twin, tmp_path, clock) as reopened:
        assert await reopened.program(twin_catalog.PROGRAM_2733) == first
        assert await reopened.programs_seen() == [twin_catalog.PROGRAM_2733]
    assert requests(clean_twin) == 1


@trio_test
async def test_products_economy(clean_twin, tmp_path):
    async with open_archive(clean_twin, tmp_path) as archive:
        obs = await archive.observation(twin_catalog.OBS_2733_MIRI_F1130W)
        clean_twin.reset_stats()
        products = await archive.products(obs)
        assert await archive.products(obs) == products
    assert requests(clean_twin, "invoke:Mast.Caom.Products") == 1 and requests(clean_twin) == 1
    assert len(products) >= 3000
    async with open_archive(clean_twin, tmp_path) as reopened:
        assert await reopened.products(obs) == products
    assert requests(clean_twin) == 1


@trio_test
async def test_memory_keeps_small_answers_decoded_and_big_listings_on_disk(clean_twin, tmp_path, monkeypatch):
    """The decoded entries in front of the disk cache weigh by the rows they hold: a product table
    beyond the memory's share is the same object while its caller holds it, and is not kept once
    nobody does (then loaded from disk: equal, no request); a program's listing stays decoded."""
    monkeypatch.setattr(archive_module, "MEMORY_ROWS_PER_ENTRY", 1)  # the 3,000-row table outweighs ...
    monkeypatch.setattr(archive_module, "MEMORY_ENTRIES", 1000)  # ... the whole memory
    async with open_archive(clean_twin, tmp_path) as archive:
        program = await archive.program(twin_catalog.PROGRAM_2733)
        obs = await archive.observation(twin_catalog.OBS_2733_MIRI_F1130W)
        products = await archive.products(obs)
        assert await archive.products(obs) is products and len(products) >= 3000
        packed = products.to_json()
        held = weakref.ref(products)
        del products
        gc.collect()
        assert held() is None
        assert (await archive.products(obs)).to_json() == packed
        assert await archive.program(twin_catalog.PROGRAM_2733) is program
    assert requests(clean_twin, "invoke:Mast.Caom.Products") == 1


@trio_test
async def test_single_flight(clean_twin, tmp_path):
    clean_twin.faults.add("invoke", "latency", count=1, seconds=0.3)
    results = []
    async with open_archive(clean_twin, tmp_path) as archive:

        async def list_program():
            results.append(await archive.program(twin_catalog.PROGRAM_2733))

        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(list_program)
    assert requests(clean_twin) == 1
    assert len(results) == 5 and all(result == results[0] for result in results)


@trio_test
async def test_s3_keys_one_batch_per_listing_then_cached(clean_twin, tmp_path):
    async with open_archive(clean_twin, tmp_path) as archive:
        obs = await archive.observation(twin_catalog.OBS_2733_MIRI_F1130W)
        products = (await archive.products(obs))[:130]
        clean_twin.reset_stats()
        keys = await archive.s3_keys(products)
        assert await archive.s3_keys(products) == keys
    assert requests(clean_twin, "path_lookup") == math.ceil(130 / PATH_LOOKUP_BATCH)
    assert keys == {p.data_uri: clean_twin.catalog.product(p.data_uri).s3_key for p in products}
    async with open_archive(clean_twin, tmp_path) as reopened:
        http_only = next(p for p in clean_twin.catalog.products() if p.uri == twin_catalog.HTTP_ONLY_URI)
        assert await reopened.s3_keys(products) == keys
        assert requests(clean_twin, "path_lookup") == math.ceil(130 / PATH_LOOKUP_BATCH)
        single = Product.from_row({"dataURI": http_only.uri})
        assert await reopened.s3_keys([single]) == {http_only.uri: None}


@trio_test
async def test_resolved_size_heads_once(clean_twin, tmp_path):
    null_size = Product.from_row({"dataURI": twin_catalog.NULL_SIZE_URI, "size": None})
    sized = Product.from_row({"dataURI": twin_catalog.NULL_SIZE_URI, "size": 1234})
    async with open_archive(clean_twin, tmp_path) as archive:
        assert await archive.resolved_size(sized) == 1234
        assert requests(clean_twin, "download") == 0
        size = await archive.resolved_size(null_size)
        assert await archive.resolved_size(null_size) == size
    async with open_archive(clean_twin, tmp_path) as reopened:
        assert await reopened.resolved_size(null_size) == size
    assert size == clean_twin.catalog.product(twin_catalog.NULL_SIZE_URI).size
    assert requests(clean_twin, "download") == 1


# --- TTL policy ------------------------------------------------------------------------------------------


@trio_test
async def test_released_data_use_the_long_ttl(clean_twin, tmp_path):
    clock = FakeClock()
    async with open_archive(clean_twin, tmp_path, clock) as archive:
        obs = await archive.observation(twin_catalog.OBS_2733_MIRI_F1130W)
        now_mjd = clock() / 86400 + 40587
        assert now_mjd - obs.t_obs_release > RELEASED_AGE_DAYS
        clock.advance(TTL_RECENT + 60)
        await archive.observation(twin_catalog.OBS_2733_MIRI_F1130W)
        assert requests(clean_twin) == 1
        clock.advance(TTL_RELEASED)
        await archive.observation(twin_catalog.OBS_2733_MIRI_F1130W)
        assert requests(clean_twin) == 2


@trio_test
async def test_exclusive_data_use_the_short_ttl(clean_twin, tmp_path):
    clock = FakeClock()
    async with open_archive(clean_twin, tmp_path, clock) as archive:
        observations = await archive.program(twin_catalog.EXCLUSIVE_PROGRAM)
        assert any(obs.is_exclusive for obs in observations)
        clock.advance(TTL_RECENT - 60)
        await archive.program(twin_catalog.EXCLUSIVE_PROGRAM)
        assert requests(clean_twin) == 1
        clock.advance(120)
        await archive.program(twin_catalog.EXCLUSIVE_PROGRAM)
        assert requests(clean_twin) == 2


@trio_test
async def test_negative_cache(clean_twin, tmp_path):
    clock = FakeClock()
    async with open_archive(clean_twin, tmp_path, clock) as archive:
        for _ in range(3):
            with pytest.raises(NotFound):
                await archive.program("99999")
            with pytest.raises(NotFound):
                await archive.observation("jw99999-o001_t001_miri_f1130w")
            with pytest.raises(NotFound):
                await archive.target(twin_catalog.UNRESOLVABLE_NAME)
        assert requests(clean_twin) == 2 and requests(clean_twin, "resolver") == 1
        clock.advance(TTL_NEGATIVE + 1)
        with pytest.raises(NotFound):
            await archive.program("99999")
        assert requests(clean_twin) == 3


@trio_test
async def test_target_resolves_then_cones(clean_twin, tmp_path):
    async with open_archive(clean_twin, tmp_path) as archive:
        observations = await archive.target("NGC 3132")
        again = await archive.target("  ngc   3132 ")
    assert {obs.obs_id for obs in observations} >= {twin_catalog.OBS_2733_MIRI_F1130W}
    assert again == observations
    assert requests(clean_twin, "resolver") == 1 and requests(clean_twin) == 1


@trio_test
async def test_forget(clean_twin, tmp_path):
    async with open_archive(clean_twin, tmp_path) as archive:
        await archive.program(twin_catalog.PROGRAM_2733)
        await archive.forget("program", twin_catalog.PROGRAM_2733)
        await archive.program(twin_catalog.PROGRAM_2733)
        assert requests(clean_twin) == 2
        await archive.forget_all()
        await archive.program(twin_catalog.PROGRAM_2733)
        assert requests(clean_twin) == 3
        with pytest.raises(ValueError):
            await archive.forget("everything", "x")
        await archive.target("NGC 3132")
        await archive.forget("target", "NGC 3132")
        await archive.target("NGC 3132")
        assert requests(clean_twin, "resolver") == 2
        assert requests(clean_twin, "invoke:Mast.Caom.Filtered.Position") == 2


# --- outages ---------------------------------------------------------------------------------------------


@trio_test
async def test_stale_if_error(clean_twin, tmp_path, caplog):
    clock = FakeClock()
    async with open_archive(clean_twin, tmp_path, clock) as archive:
        listing = await archive.program(twin_catalog.EXCLUSIVE_PROGRAM)
        clock.advance(TTL_RECENT + 1)
        clean_twin.faults.add("invoke", "status", code=503)
        with caplog.at_level(logging.WARNING, logger="mastfs.archive"):
            assert await archive.program(twin_catalog.EXCLUSIVE_PROGRAM) == listing
            assert await archive.program(twin_catalog.EXCLUSIVE_PROGRAM) == listing
        outage_requests = requests(clean_twin)
        assert outage_requests == 1 + 2  # one fresh fetch, one failed refresh (2 attempts), no more
        assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
        with pytest.raises(Unavailable):  # never seen: EIO, never ENOENT
            await archive.program("99999")
        clock.advance(STALE_RETRY_INTERVAL + 1)
        clean_twin.faults.clear()
        assert await archive.program(twin_catalog.EXCLUSIVE_PROGRAM) == listing
        assert requests(clean_twin) == outage_requests + 2 + 1


@trio_test
async def test_stale_if_error_across_restarts(clean_twin, tmp_path):
    clock = FakeClock()
    async with open_archive(clean_twin, tmp_path, clock) as archive:
        listing = await archive.program(twin_catalog.PROGRAM_2733)
    clock.advance(TTL_RELEASED + 1)
    clean_twin.faults.add("invoke", "reset")
    async with open_archive(clean_twin, tmp_path, clock) as reopened:
        assert await reopened.program(twin_catalog.PROGRAM_2733) == listing
        with pytest.raises(Unavailable):
            await reopened.observation("jw99999-o001_t001_miri_f1130w")


@trio_test
async def test_s3_keys_degrade_during_outage(clean_twin, tmp_path):
    products = [Product.from_row({"dataURI": p.uri}) for p in list(clean_twin.catalog.products())[:5]]
    clean_twin.faults.add("path_lookup", "status", code=503)
    async with open_archive(clean_twin, tmp_path) as archive:
        assert await archive.s3_keys(products) == {}  # unsettled: neither a key nor "not in S3"
        clean_twin.faults.clear()
        keys = await archive.s3_keys(products)  # the outage answer was not cached
    assert keys == {p.data_uri: clean_twin.catalog.product(p.data_uri).s3_key for p in products}


@trio_test
async def test_corrupt_cache_is_rebuilt(clean_twin, tmp_path):
    meta = tmp_path / "meta"
    meta.mkdir()
    (meta / "cache.db").write_bytes(b"this is not a sqlite database" * 100)
    async with open_archive(clean_twin, tmp_path) as archive:
        assert len(await archive.program(twin_catalog.PROGRAM_2733)) == 11
    assert any(name.startswith("meta.corrupt-") for name in os.listdir(tmp_path))
