"""Versions at the fetcher level, against a twin of its own (it reprocesses): what HeadObject / HEAD state,
conditional ranged reads that refuse another version (412 or another ETag), whole downloads of files
that state no length, and the pure ObjectVersion rules."""

from __future__ import annotations

import hashlib

import httpx
import pytest
import trio

from mastfs.config import Settings
from mastfs.errors import BadResponse, MastfsError
from mastfs.fetch.http import HttpFetcher
from mastfs.fetch.s3 import S3Fetcher
from mastfs.retry import RetryPolicy
from mastfs.twin import catalog as twin_catalog
from mastfs.versions import ObjectVersion, VersionChanged, content_range_total, from_s3

FAST = RetryPolicy(attempts=4, base_delay=0.01, max_delay=0.05, deadline=10.0)
URI = "mast:JWST/product/jw02733-o002_t001_miri_f1130w_segm.fits"



def with_fetchers(twin, body):
    """Run ``body(http_fetcher, s3_fetcher)`` under trio."""

    async def main():
        async with httpx.AsyncClient(timeout=10) as client:
            http = HttpFetcher(client, twin.mast_url, None, FAST)
            s3 = S3Fetcher(Settings.defaults(s3_endpoint=twin.s3_endpoint, bucket=twin.bucket), policy=FAST)
            return await body(http, s3)

    return trio.run(main)


async def read(fetcher, name, bounds, version):
    blocks: list[bytes] = []

    async def keep(block: bytes) -> None:
        blocks.append(block)

    await fetcher.fetch_blocks(name, bounds, keep, version)
    return b"".join(blocks)


def test_both_copies_state_one_version_and_reads_pinned_to_it_fail_after_reprocessing(own_twin):
    key = own_twin.catalog.product(URI).s3_key
    size = own_twin.catalog.product(URI).size

    async def body(http, s3):
        over_s3, over_http = await s3.stat(key), await http.stat(URI)
        assert over_s3.etag == over_http.etag and over_s3.tag == over_http.tag  # shown equal
        assert over_s3.size == over_http.size == size
        assert over_s3.content_md5 == hashlib.md5(own_twin.catalog.read(URI, 0, size, "s3")).hexdigest()
        assert await read(s3, key, (0, 100, 5000), over_s3) == own_twin.catalog.read(URI, 0, 5000, "s3")
        assert await read(http, URI, (0, 5000), over_http) == own_twin.catalog.read(URI, 0, 5000)
        own_twin.catalog.reprocess(URI)
        own_twin.reset_stats()
        with pytest.raises(VersionChanged):
            await read(s3, key, (0, 5000), over_s3)
        with pytest.raises(VersionChanged):
            await read(http, URI, (0, 5000), over_http)
        stats = own_twin.stats()["endpoints"]
        assert stats["s3:GetObject"]["requests"] == 1 and stats["download"]["requests"] == 1  # never retried
        assert (await s3.stat(key)).etag != over_s3.etag

    with_fetchers(own_twin, body)


def test_a_file_stating_no_length_is_downloaded_whole_within_a_bound(own_twin):
    uri = twin_catalog.NO_LENGTH_URI
    size = own_twin.catalog.product(uri).size

    async def body(http, _s3):
        version = await http.stat(uri)
        assert version.size is None and version.tag.startswith("date:")
        assert await http.fetch_whole(uri, size) == own_twin.catalog.read(uri, 0, size)
        with pytest.raises(MastfsError, match="larger than the block cache"):
            await http.fetch_whole(uri, size - 1)

    with_fetchers(own_twin, body)


def test_validators_of_an_answer_must_be_the_pinned_ones():
    tagged = ObjectVersion(size=10, etag='"abc"')
    tagged.check('"abc"', None, "x")
    tagged.check('W/"abc"', None, "x")
    tagged.check(None, "whenever", "x")  # an answer without an ETag is not held against it
    with pytest.raises(VersionChanged):
        tagged.check('"abd"', None, "x")
    dated = ObjectVersion(size=10, last_modified="Mon, 01 Jan 2024 00:00:00 GMT")
    assert dated.conditions() == {"If-Unmodified-Since": "Mon, 01 Jan 2024 00:00:00 GMT"}
    with pytest.raises(VersionChanged):
        dated.check(None, "Tue, 02 Jan 2024 00:00:00 GMT", "x")
    assert tagged.conditions() == {"If-Match": '"abc"'}
    assert ObjectVersion(size=1).tag == "" and ObjectVersion(size=1).conditions() == {}


def test_content_md5_only_for_plain_md5_etags_and_the_range_total():
    md5 = hashlib.md5(b"x").hexdigest()
    assert ObjectVersion(size=1, etag=f'"{md5}"').content_md5 == md5
    assert ObjectVersion(size=1, etag=f'"{md5}-3"').content_md5 is None
    assert ObjectVersion(size=1, etag='"opaque"').content_md5 is None
    assert content_range_total("bytes 0-0/1234") == 1234 and content_range_total("bytes 0-0/*") is None
    with pytest.raises(BadResponse):
        content_range_total("items 0-0/5")
    version = from_s3({"ContentLength": 5, "ETag": '"e"', "VersionId": "v1", "ChecksumSHA256": "aaa=",
                       "ChecksumCRC32": "bbb=-2"})
    assert version.tag == '"e"#v1' and dict(version.checksums) == {"ChecksumSHA256": "aaa="}
