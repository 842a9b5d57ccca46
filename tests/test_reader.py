"""ByteReader end to end against the MAST twin: exact bytes, sources and fallback, single flight,
readahead, header reads, persistence, corruption, faults, cancellation, prefetch."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os

import httpx
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mastfs.blockcache import (
    HEADER_BLOCK_SIZE,
    HEADER_SIZE,
    LAYOUT,
    BlockCache,
    ProductRef,
    block_count,
    block_span,
    block_start,
)
from mastfs.config import Settings
from mastfs.errors import IntegrityError, MastfsError, Unauthorized, Unavailable, errno_for
from mastfs.fetch.http import HttpFetcher
from mastfs.fetch.s3 import S3Fetcher
from mastfs.reader import ByteReader
from mastfs.retry import RetryPolicy
from mastfs.twin import catalog as twin_catalog

MiB = 1024 * 1024
FAST = RetryPolicy(attempts=4, base_delay=0.01, max_delay=0.05, deadline=10.0)
FUSE_READ = 128 * 1024


def ref_of(product, **changes) -> ProductRef:
    fields = {"uri": product.uri, "size": product.size, "s3_key": product.s3_key, "exclusive": product.exclusive}
    fields.update(changes)
    return ProductRef(**fields)


@pytest.fixture(scope="module")
def products(twin):
    """Public products in the cloud, largest first (the largest span three blocks at scale 0.001)."""
    found = [p for p in twin.catalog.products() if p.s3_key and not p.exclusive and p.send_content_length]
    return sorted(found, key=lambda p: p.size, reverse=True)


@pytest.fixture(scope="module")
def big(products):
    assert block_count(products[0].size) >= 3
    return ref_of(products[0])


@contextlib.asynccontextmanager
async def open_reader(twin, directory, *, source="auto", token=None, policy=FAST, size_limit=1024 * MiB,
                      **options):
    async with httpx.AsyncClient(timeout=5) as client:
        cache = BlockCache(str(directory), size_limit, 0)
        http = HttpFetcher(client, twin.mast_url, token, policy)
        s3 = S3Fetcher(Settings.defaults(s3_endpoint=twin.s3_endpoint, bucket=twin.bucket), policy=policy)
        async with ByteReader(cache, http, s3, source=source, **options) as reader:
            yield reader


def wire(twin) -> dict[str, int]:
    endpoints = twin.stats()["endpoints"]
    return {name: endpoints.get(key, {}).get("bytes_sent", 0)
            for name, key in (("http", "download"), ("s3", "s3:GetObject"))}


def requests(twin, key) -> int:
    return twin.stats()["endpoints"].get(key, {}).get("requests", 0)


async def read_all(reader, ref, chunk=FUSE_READ) -> bytes:
    stream = reader.open_stream(ref)
    parts = []
    for offset in range(0, ref.size, chunk):
        parts.append(await reader.read(stream, offset, chunk))
    return b"".join(parts)


def block_files(directory) -> list[str]:
    return sorted(os.path.join(d, n) for d, _, names in os.walk(os.path.join(directory, LAYOUT))
                  for n in names if n.isdigit())


def corrupt(path: str) -> None:
    with open(path, "r+b") as handle:
        handle.seek(HEADER_SIZE + 10)
        handle.write(b"corrupt!")


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_reads_match_the_catalog(twin, products, tmp_path_factory, data):
    product = data.draw(st.sampled_from(products[:8]), label="product")
    source = data.draw(st.sampled_from(["auto", "http", "s3"]), label="source")
    reads = data.draw(st.lists(st.tuples(st.integers(0, product.size + 100), st.integers(0, 5 * MiB)),
                               min_size=1, max_size=4), label="reads")
    directory = tmp_path_factory.mktemp("cache")

    async def main():
        async with open_reader(twin, directory, source=source) as reader:
            stream = reader.open_stream(ref_of(product))
            for offset, length in reads:
                got = await reader.read(stream, offset, length)
                assert got == twin.catalog.read(product.uri, offset, length)
                assert len(got) == max(0, min(length, product.size - offset))

    trio.run(main)


@pytest.mark.parametrize("source", ["http", "s3"])
def test_sequential_read_fetches_each_block_once_from_the_chosen_source(clean_twin, big, tmp_path, source):
    async def main():
        async with open_reader(clean_twin, tmp_path, source=source) as reader:
            assert await read_all(reader, big) == clean_twin.catalog.read(big.uri, 0, big.size)
            stats = reader.stats()
        assert stats["cache"]["readahead_blocks"] >= 1
        assert stats["bytes_fetched"][source] == big.size

    trio.run(main)
    other = "s3" if source == "http" else "http"
    assert wire(clean_twin) == {source: big.size, other: 0}


@pytest.mark.parametrize(("offset", "length", "ahead"), [
    (0, FUSE_READ, 1),  # from the start past the header block: a reader of the whole file (cp, cat)
    (0, 4096, 0),  # within the header block (astropy reading a header)
    (block_start(1), FUSE_READ, 0),  # a first read elsewhere (a cutout)
])
def test_only_a_first_read_from_the_start_past_the_header_block_reads_ahead(clean_twin, big, tmp_path, offset,
                                                                            length, ahead):
    async def main():
        async with open_reader(clean_twin, tmp_path, source="http") as reader:
            await reader.read(reader.open_stream(big), offset, length)
            return reader.stats()["cache"]["readahead_blocks"]

    assert trio.run(main) == ahead


def test_header_read_costs_one_small_block(clean_twin, big, tmp_path):
    async def main():
        async with open_reader(clean_twin, tmp_path) as reader:
            stream = reader.open_stream(big)
            assert await reader.read(stream, 0, 2880) == clean_twin.catalog.read(big.uri, 0, 2880)
            # what the kernel's readahead adds for a small first read: more of the first block
            await reader.read(stream, 0, 16384)
            await reader.read(stream, 16384, 32768)
            await reader.read(stream, 2880, 2880)

    trio.run(main)
    assert sum(wire(clean_twin).values()) == HEADER_BLOCK_SIZE


def test_auto_falls_back_to_https_when_not_in_the_cloud_and_remembers(clean_twin, big, tmp_path):
    ghost = ProductRef(big.uri, big.size, s3_key="jwst/public/no/such/object.fits")
    http_only = clean_twin.catalog.product(twin_catalog.HTTP_ONLY_URI)

    async def main():
        async with open_reader(clean_twin, tmp_path) as reader:
            assert await reader.read(reader.open_stream(ghost), 0, 2880) == clean_twin.catalog.read(big.uri, 0, 2880)
            assert await read_all(reader, ghost) == clean_twin.catalog.read(big.uri, 0, big.size)
            assert await read_all(reader, ref_of(http_only)) == clean_twin.catalog.read(http_only.uri, 0, http_only.size)
            assert reader.stats()["bytes_fetched"] == {"s3": 0, "http": big.size + http_only.size}

    trio.run(main)
    assert requests(clean_twin, "s3:GetObject") == 1  # after the first miss, blocks go straight to HTTPS


def test_source_of_is_the_source_reads_use(clean_twin, big, tmp_path):
    """The reader's answer to "where do these bytes come from" (user.mastfs.source) follows its own
    choice: S3 for public products with a key, HTTPS for exclusive ones, for ones found missing from
    S3, and under --source http; nothing under --source s3 without a key."""
    https = f"{clean_twin.mast_url.rstrip('/')}/api/v0.1/Download/file?uri={big.uri}"
    ghost = ProductRef(big.uri, big.size, s3_key="jwst/public/no/such/object.fits")
    exclusive = ProductRef(big.uri, big.size, s3_key=big.s3_key, exclusive=True)
    keyless = ProductRef(big.uri, big.size)

    async def main():
        async with open_reader(clean_twin, tmp_path) as reader:
            assert reader.source_of(big) == f"s3://{clean_twin.bucket}/{big.s3_key}"
            assert reader.source_of(exclusive) == https
            assert reader.source_of(keyless) == https
            assert reader.source_of(ghost) == f"s3://{clean_twin.bucket}/{ghost.s3_key}"
            await reader.read(reader.open_stream(ghost), 0, 2880)  # S3 says 404: HTTPS from now on
            assert reader.source_of(ghost) == https
        async with open_reader(clean_twin, tmp_path / "http", source="http") as reader:
            assert reader.source_of(big) == https
        async with open_reader(clean_twin, tmp_path / "s3", source="s3") as reader:
            assert reader.source_of(big) == f"s3://{clean_twin.bucket}/{big.s3_key}"
            assert reader.source_of(keyless) is None

    trio.run(main)


def test_s3_only_source_reports_what_s3_cannot_serve_as_eio_not_enoent(clean_twin, big, tmp_path):
    """The file exists (MAST lists it): S3 refusing it, or MAST listing no cloud copy, is not ENOENT."""
    async def main():
        async with open_reader(clean_twin, tmp_path, source="s3") as reader:
            for ref in (ProductRef(big.uri, big.size, s3_key="jwst/public/no/such/object.fits"),
                        ProductRef(big.uri, big.size)):
                with pytest.raises(Unavailable, match="source is s3 only") as caught:
                    await reader.read(reader.open_stream(ref), 0, 100)
                assert errno_for(caught.value) == errno.EIO

    trio.run(main)
    assert wire(clean_twin)["http"] == 0


def test_concurrent_readers_of_one_block_share_one_transfer(clean_twin, big, tmp_path):
    clean_twin.faults.add("s3", "latency", seconds=0.3)
    expected = clean_twin.catalog.read(big.uri, HEADER_BLOCK_SIZE + 1000, 5000)

    async def main():
        async with open_reader(clean_twin, tmp_path) as reader:
            results = []

            async def one():
                stream = reader.open_stream(big)
                results.append(await reader.read(stream, HEADER_BLOCK_SIZE + 1000, 5000))

            async with trio.open_nursery() as nursery:
                for _ in range(12):
                    nursery.start_soon(one)
            assert results == [expected] * 12

    trio.run(main)
    assert requests(clean_twin, "s3:GetObject") == 1
    _, end = block_span(1, big.size)
    assert wire(clean_twin)["s3"] == end - HEADER_BLOCK_SIZE


def test_reopened_cache_serves_without_the_network(clean_twin, big, tmp_path):
    expected = clean_twin.catalog.read(big.uri, 0, big.size)

    async def fill():
        async with open_reader(clean_twin, tmp_path) as reader:
            assert await read_all(reader, big) == expected

    async def reread():
        async with open_reader(clean_twin, tmp_path) as reader:
            assert await read_all(reader, big) == expected
            assert await read_all(reader, big, chunk=1_000_003) == expected
            assert reader.stats()["cache"]["misses"] == 0

    trio.run(fill)
    clean_twin.reset_stats()
    trio.run(reread)
    assert wire(clean_twin) == {"http": 0, "s3": 0}


def test_a_fits_product_read_whole_is_marked_verified_and_not_summed_again(clean_twin, big, tmp_path, monkeypatch):
    from mastfs import reader as reader_module

    assert big.uri.endswith(".fits") and big.checks()["fits"] and not big.sha256  # checked by its FITS sums only
    expected = clean_twin.catalog.read(big.uri, 0, big.size)
    summed: list[int] = []
    real_add = reader_module.FitsCheck.add

    def counting_add(self, start, data, more=b""):
        summed.append(start)
        return real_add(self, start, data, more)

    monkeypatch.setattr(reader_module.FitsCheck, "add", counting_add)

    async def read_twice():
        async with open_reader(clean_twin, tmp_path) as reader:
            assert await read_all(reader, big) == expected
        assert summed, "the first read checks the FITS sums"
        cache = BlockCache(str(tmp_path), 1024 * MiB, 0)
        await cache.open()
        assert cache.is_verified(big)  # the mark is on disk, for the next mount
        summed.clear()
        async with open_reader(clean_twin, tmp_path) as reader:
            assert await read_all(reader, big) == expected
            assert reader.stats()["cache"]["misses"] == 0
        assert summed == []  # blocks of a verified version are not summed again
        await cache.discard(big, 1)
        assert not cache.is_verified(big)  # a block lost: the mark goes with it

    trio.run(read_twice)


def test_corrupt_block_on_disk_is_fetched_again(clean_twin, big, tmp_path):
    expected = clean_twin.catalog.read(big.uri, 0, big.size)

    async def fill():
        async with open_reader(clean_twin, tmp_path) as reader:
            assert await read_all(reader, big) == expected

    trio.run(fill)
    files = block_files(tmp_path)
    assert len(files) == block_count(big.size)
    small = min(files, key=os.path.getsize)  # block 0
    corrupt(small)
    clean_twin.reset_stats()

    async def reread():
        async with open_reader(clean_twin, tmp_path) as reader:
            assert await read_all(reader, big) == expected
            assert reader.stats()["cache"]["corrupt_blocks"] == 1

    trio.run(reread)
    assert sum(wire(clean_twin).values()) == HEADER_BLOCK_SIZE


def test_eviction_keeps_the_cache_under_its_limit(clean_twin, products, tmp_path):
    limit = 6 * MiB

    async def main():
        async with open_reader(clean_twin, tmp_path, size_limit=limit) as reader:
            for product in products[:4]:
                ref = ref_of(product)
                assert await read_all(reader, ref) == clean_twin.catalog.read(ref.uri, 0, ref.size)
                assert reader.stats()["cache"]["disk_bytes"] <= limit

    async def usage():
        cache = BlockCache(str(tmp_path), limit, 0)
        await cache.open()
        return cache.usage()[0]

    trio.run(main)
    assert sum(os.path.getsize(path) for path in block_files(tmp_path)) == trio.run(usage) <= limit


FAULTS = [
    ("status", {"code": 503}),
    ("status", {"code": 429, "retry_after": 0}),
    ("html_504", {}),
    ("reset", {"after_bytes": 5000}),
    ("truncate", {}),
    ("wrong_range", {}),
    ("ignore_range", {}),
]


@pytest.mark.parametrize("source", ["http", "s3"])
@pytest.mark.parametrize(("kind", "params"), FAULTS)
def test_faults_are_retried_and_nothing_bad_is_cached(clean_twin, big, tmp_path, source, kind, params):
    endpoint = "download" if source == "http" else "s3"
    clean_twin.faults.add(endpoint, kind, count=2, **params)
    expected = clean_twin.catalog.read(big.uri, 0, big.size)

    async def main():
        async with open_reader(clean_twin, tmp_path, source=source) as reader:
            assert await read_all(reader, big) == expected

    trio.run(main)
    clean_twin.faults.clear()
    clean_twin.reset_stats()

    async def reread():  # every block on disk is the right one: no byte on the wire
        async with open_reader(clean_twin, tmp_path, source=source) as reader:
            assert await read_all(reader, big, chunk=3 * MiB) == expected

    trio.run(reread)
    assert sum(wire(clean_twin).values()) == 0


@pytest.mark.parametrize("source", ["http", "s3"])
def test_persistent_fault_is_unavailable_and_caches_nothing(clean_twin, big, tmp_path, source):
    clean_twin.faults.add("download" if source == "http" else "s3", "truncate")
    policy = RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.02, deadline=3.0)

    async def main():
        async with open_reader(clean_twin, tmp_path, source=source, policy=policy) as reader:
            stream = reader.open_stream(big)
            for offset in (0, HEADER_BLOCK_SIZE):
                with pytest.raises(Unavailable):
                    await reader.read(stream, offset, FUSE_READ)
            assert reader.stats()["errors"]["Unavailable"] >= 2

    async def cached_blocks():  # a truncated run may deliver its first blocks whole: only those are kept
        cache = BlockCache(str(tmp_path), 1024 * MiB, 0)
        await cache.open()
        found = {}
        for index in range(block_count(big.size)):
            if cache.contains(big, index):
                found[index] = await cache.load(big, index)
        return found

    trio.run(main)
    cached = trio.run(cached_blocks)
    assert 1 not in cached
    for index, data in cached.items():
        start, end = block_span(index, big.size)
        assert data == clean_twin.catalog.read(big.uri, start, end - start)


def test_cancelled_read_returns_promptly_and_leaves_nothing_unverified(clean_twin, big, tmp_path):
    clean_twin.faults.add("s3", "stall")

    async def main():
        async with open_reader(clean_twin, tmp_path) as reader:
            stream = reader.open_stream(big)
            with trio.move_on_after(0.3) as scope:
                await reader.read(stream, 0, 2880)
            assert scope.cancelled_caught
            for _ in range(200):  # the run may still be claiming its blocks on a busy machine
                if reader.stats()["in_flight"]:
                    break
                await trio.sleep(0.05)
            in_flight = reader.stats()["in_flight"]
            assert [(entry["uri"], entry["source"]) for entry in in_flight] == [(big.uri, "s3")]
            clean_twin.faults.clear()  # the stalled transfer now fails and is retried
            assert await reader.read(stream, 0, 2880) == clean_twin.catalog.read(big.uri, 0, 2880)

    trio.run(main)


def test_exclusive_product_needs_the_token(twin, tmp_path):
    product = twin.catalog.product(twin_catalog.EXCLUSIVE_URI)
    ref = ref_of(product)

    async def without_token():
        async with open_reader(twin, tmp_path / "a") as reader:
            with pytest.raises(Unauthorized):
                await reader.read(reader.open_stream(ref), 0, 2880)

    async def with_token():
        async with open_reader(twin, tmp_path / "b", token=twin_catalog.VALID_TOKEN) as reader:
            assert await read_all(reader, ref) == twin.catalog.read(ref.uri, 0, ref.size)

    trio.run(without_token)
    trio.run(with_token)


def test_prefetch_fills_and_verifies_the_whole_product(clean_twin, big, tmp_path):
    digest = hashlib.sha256(clean_twin.catalog.read(big.uri, 0, big.size)).hexdigest()
    good = ProductRef(big.uri, big.size, sha256=digest, s3_key=big.s3_key)
    bad = ProductRef(big.uri, big.size, sha256="0" * 64, s3_key=big.s3_key)
    seen: list[int] = []

    async def header_only():
        async with open_reader(clean_twin, tmp_path) as reader:
            await reader.read(reader.open_stream(good), 0, 100)

    async def main():
        async with open_reader(clean_twin, tmp_path) as reader:
            await reader.prefetch(good, seen.append)
            assert await reader._cache.verify_product(good) is True
            with pytest.raises(IntegrityError):
                await reader.prefetch(bad)
            assert not any(reader._cache.contains(bad, i) for i in range(block_count(bad.size)))
            with pytest.raises(MastfsError):
                async with open_reader(clean_twin, tmp_path / "tiny", size_limit=MiB) as small:
                    await small.prefetch(good)

    trio.run(header_only)
    trio.run(main)
    assert seen[0] == HEADER_BLOCK_SIZE and seen[-1] == big.size and seen == sorted(seen)
    assert len(block_files(tmp_path)) == block_count(big.size)


def test_reads_past_the_end_and_empty_files(twin, big, tmp_path):
    async def main():
        async with open_reader(twin, tmp_path) as reader:
            stream = reader.open_stream(big)
            assert await reader.read(stream, big.size, 10) == b""
            assert await reader.read(stream, big.size + 5, 10) == b""
            assert await reader.read(stream, big.size - 3, 10) == twin.catalog.read(big.uri, big.size - 3, 3)
            assert await reader.read(reader.open_stream(ProductRef("mast:X/empty.fits", 0)), 0, 10) == b""

    trio.run(main)


def test_failed_readahead_does_not_fail_the_current_read(clean_twin, big, tmp_path):
    policy = RetryPolicy(attempts=2, base_delay=0.01, max_delay=0.02, deadline=3.0)

    async def main():
        async with open_reader(clean_twin, tmp_path, source="http", policy=policy) as reader:
            await reader.read(reader.open_stream(big), 0, 4096)  # block 0: a read within it reads no further
            await reader.read(reader.open_stream(big), block_start(1), 4096)  # block 1: not from the start
            clean_twin.faults.add("download", "status", code=503)
            stream = reader.open_stream(big)
            first = await reader.read(stream, 0, FUSE_READ)  # blocks 0 and 1; starts readahead of block 2: fails
            assert first == clean_twin.catalog.read(big.uri, 0, FUSE_READ)
            start, _ = block_span(2, big.size)
            with pytest.raises(Unavailable):  # joins (or repeats) the failed readahead of block 2
                await reader.read(stream, start, FUSE_READ)
            assert reader.stats()["errors"]["Unavailable"] >= 1
            clean_twin.faults.clear()
            assert await reader.read(stream, start, FUSE_READ) == clean_twin.catalog.read(big.uri, start, FUSE_READ)

    trio.run(main)
