"""HttpFetcher and S3Fetcher against the MAST twin on loopback: exact bytes, errors, every fault kind."""

from __future__ import annotations

import httpx
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability_util import twin_requests

from mastfs.auth import LOGIN_HINT, REFUSED_HINT, TokenKeeper, token_may_go_to
from mastfs.config import Settings
from mastfs.errors import BadResponse, NotFound, Unauthorized, Unavailable
from mastfs.fetch.http import HttpFetcher
from mastfs.fetch.s3 import S3Fetcher
from mastfs.retry import RetryPolicy
from mastfs.twin import catalog as twin_catalog

FAST = RetryPolicy(attempts=4, base_delay=0.01, max_delay=0.05, deadline=10.0)


@pytest.fixture(scope="module")
def big(twin):
    """The largest product that is in the cloud (several blocks at scale 0.001)."""
    return max((p for p in twin.catalog.products() if p.s3_key and not p.exclusive and p.send_content_length),
               key=lambda p: p.size)


async def fetch_range(fetcher, name, start, end):
    """Bytes [start, end) of ``name`` through ``fetcher.fetch_blocks`` as one block."""
    blocks: list[bytes] = []

    async def keep(block: bytes) -> None:
        blocks.append(block)

    await fetcher.fetch_blocks(name, (start, end), keep)
    assert len(blocks) == 1
    return blocks[0]


def http_fetch(twin, uri, start, end, token=None, policy=FAST, timeout=5.0):
    async def main():
        async with httpx.AsyncClient(timeout=timeout) as client:
            return await fetch_range(HttpFetcher(client, twin.mast_url, token, policy), uri, start, end)

    return trio.run(main)


def s3_fetch(twin, key, start, end, policy=FAST):
    async def main():
        fetcher = S3Fetcher(Settings.defaults(s3_endpoint=twin.s3_endpoint, bucket=twin.bucket), policy=policy)
        return await fetch_range(fetcher, key, start, end)

    return trio.run(main)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_ranges_match_the_catalog_over_http_and_s3(twin, big, data):
    start = data.draw(st.integers(0, big.size - 1), label="start")
    end = data.draw(st.integers(start + 1, min(big.size, start + 3 * 1024 * 1024)), label="end")
    expected = twin.catalog.read(big.uri, start, end - start)
    assert http_fetch(twin, big.uri, start, end) == expected
    assert s3_fetch(twin, big.s3_key, start, end) == expected


def test_range_request_costs_only_the_range_on_the_wire(clean_twin, big):
    assert http_fetch(clean_twin, big.uri, 0, 2880) == clean_twin.catalog.read(big.uri, 0, 2880)
    assert s3_fetch(clean_twin, big.s3_key, 0, 2880) == clean_twin.catalog.read(big.uri, 0, 2880)
    endpoints = clean_twin.stats()["endpoints"]
    assert endpoints["download"]["bytes_sent"] == 2880
    assert endpoints["s3:GetObject"]["bytes_sent"] == 2880


def test_token_goes_in_the_authorization_header_only(twin):
    seen: list[httpx.Request] = []

    async def record(request: httpx.Request) -> None:
        seen.append(request)

    async def main():
        async with httpx.AsyncClient(event_hooks={"request": [record]}) as client:
            fetcher = HttpFetcher(client, twin.mast_url, twin_catalog.VALID_TOKEN, FAST)
            return await fetch_range(fetcher, twin_catalog.EXCLUSIVE_URI, 0, 100)

    assert trio.run(main) == twin.catalog.read(twin_catalog.EXCLUSIVE_URI, 0, 100)
    assert seen and all(twin_catalog.VALID_TOKEN not in str(request.url) for request in seen)
    assert seen[0].headers["Authorization"] == f"token {twin_catalog.VALID_TOKEN}"


def test_exclusive_file_needs_a_valid_token(twin):
    uri = twin_catalog.EXCLUSIVE_URI
    with pytest.raises(Unauthorized) as missing:
        http_fetch(twin, uri, 0, 100)
    assert missing.value.reason == LOGIN_HINT
    with pytest.raises(Unauthorized) as refused:
        http_fetch(twin, uri, 0, 100, token=twin_catalog.EXPIRED_TOKEN)
    assert refused.value.reason == REFUSED_HINT
    assert http_fetch(twin, uri, 0, 100, token=twin_catalog.VALID_TOKEN) == twin.catalog.read(uri, 0, 100)


def test_missing_file_and_unsatisfiable_range(twin, big):
    with pytest.raises(NotFound):
        http_fetch(twin, "mast:JWST/product/no_such_file.fits", 0, 10)
    with pytest.raises(BadResponse):
        http_fetch(twin, big.uri, big.size + 10, big.size + 20)
    with pytest.raises(NotFound):
        s3_fetch(twin, "jwst/public/no/such/key.fits", 0, 10)
    with pytest.raises(BadResponse):
        s3_fetch(twin, big.s3_key, big.size + 10, big.size + 20)


def test_ignored_range_keeps_only_the_window(clean_twin, big):
    start, end = 1_000_000, 1_000_000 + 70_000
    expected = clean_twin.catalog.read(big.uri, start, end - start)
    clean_twin.faults.add("download", "ignore_range", count=1)
    clean_twin.faults.add("s3", "ignore_range", count=1)
    assert http_fetch(clean_twin, big.uri, start, end) == expected
    assert s3_fetch(clean_twin, big.s3_key, start, end) == expected


def test_file_served_without_length_or_ranges(twin):
    product = twin.catalog.product(twin_catalog.NO_LENGTH_URI)
    expected = twin.catalog.read(product.uri, 100, product.size - 200)
    assert http_fetch(twin, product.uri, 100, product.size - 100) == expected


FAULTS = [
    ("status", {"code": 503}),
    ("status", {"code": 500}),
    ("status", {"code": 429, "retry_after": 0}),
    ("html_504", {}),
    ("reset", {"after_bytes": 1000}),
    ("truncate", {}),
    ("wrong_range", {}),
    ("wrong_range", {"shift": 1}),
    ("latency", {"seconds": 0.2}),
]


@pytest.mark.parametrize("endpoint", ["download", "s3"])
@pytest.mark.parametrize(("kind", "params"), FAULTS)
def test_transient_faults_are_retried_to_the_exact_bytes(clean_twin, big, endpoint, kind, params):
    start, end = 65536, 65536 + 500_000
    clean_twin.faults.add(endpoint, kind, count=2, **params)
    if endpoint == "download":
        data = http_fetch(clean_twin, big.uri, start, end)
    else:
        data = s3_fetch(clean_twin, big.s3_key, start, end)
    assert data == clean_twin.catalog.read(big.uri, start, end - start)
    expected_hits = 1 if kind == "latency" else 2  # latency only delays: the first try succeeds
    assert [fault["hits"] for fault in clean_twin.faults.list()] == [expected_hits]


def test_reset_before_any_body_byte_is_retried(clean_twin, big):
    clean_twin.faults.add("download", "reset", count=2)
    assert http_fetch(clean_twin, big.uri, 0, 100_000) == clean_twin.catalog.read(big.uri, 0, 100_000)


@pytest.mark.parametrize("endpoint", ["download", "s3"])
@pytest.mark.parametrize(("kind", "params"), [("status", {"code": 503}), ("reset", {"after_bytes": 10}),
                                              ("truncate", {}),
                                              ("wrong_range", {})])
def test_persistent_faults_end_in_unavailable(clean_twin, big, endpoint, kind, params):
    clean_twin.faults.add(endpoint, kind, **params)
    policy = RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.02, deadline=5.0)
    with pytest.raises(Unavailable):
        if endpoint == "download":
            http_fetch(clean_twin, big.uri, 0, 100_000, policy=policy)
        else:
            s3_fetch(clean_twin, big.s3_key, 0, 100_000, policy=policy)


@pytest.mark.parametrize("endpoint", ["download", "s3"])
def test_a_stalled_server_is_abandoned_at_the_deadline(clean_twin, big, endpoint):
    clean_twin.faults.add(endpoint, "stall")
    policy = RetryPolicy(attempts=5, base_delay=0.01, max_delay=0.02, deadline=1.0)

    async def main():
        with trio.move_on_after(10) as guard:
            with pytest.raises(Unavailable):
                if endpoint == "download":
                    async with httpx.AsyncClient(timeout=30) as client:
                        await fetch_range(HttpFetcher(client, clean_twin.mast_url, None, policy), big.uri, 0, 1000)
                else:
                    fetcher = S3Fetcher(Settings.defaults(s3_endpoint=clean_twin.s3_endpoint, deadline=60.0),
                                        policy=policy)
                    await fetch_range(fetcher, big.s3_key, 0, 1000)
        assert not guard.cancelled_caught

    trio.run(main)


def test_a_stall_once_is_retried_after_the_client_timeout(clean_twin, big):
    clean_twin.faults.add("download", "stall", count=1)
    assert http_fetch(clean_twin, big.uri, 0, 5000, timeout=0.5) == clean_twin.catalog.read(big.uri, 0, 5000)


def test_unauthorized_fault_is_not_retried(clean_twin, big):
    clean_twin.faults.add("download", "unauthorized", count=1)
    with pytest.raises(Unauthorized):
        http_fetch(clean_twin, big.uri, 0, 100, token="some-token")
    assert clean_twin.stats()["endpoints"]["download"]["requests"] == 1


# ------------------------------------------------------------------------------ redirects and the token


@pytest.mark.parametrize(("url", "allowed"), [
    ("https://mast.stsci.edu/api/v0.1/Download/file", True),
    ("https://archive.stsci.edu/x", True),  # *.stsci.edu
    ("https://stsci.edu/x", True),
    ("https://mirror.example.org/x", True),  # --token-hosts *.example.org
    ("https://example.org/x", True),
    ("https://evil-stsci.edu/x", False),
    ("https://stsci.edu.evil.com/x", False),
    ("https://elsewhere.net/x", False),
    ("http://archive.stsci.edu/x", False),  # plain http to a host that is not loopback
    ("http://127.0.0.2:8080/x", False),  # loopback, but neither the MAST host nor listed
    ("http://127.0.0.1:9999/x", True),  # the MAST host (any port), loopback: http allowed
    ("ftp://mast.stsci.edu/x", False),
])
def test_the_token_goes_only_to_allowed_hosts(url, allowed):
    mast = "https://mast.stsci.edu" if "127.0.0.1" not in url else "http://127.0.0.1:8000"
    assert token_may_go_to(url, mast, ["*.example.org"]) is allowed


def test_a_download_follows_redirects_with_its_range_and_the_allowlist(clean_twin, big):
    clean_twin.faults.add("download", "redirect", hops=3)
    assert http_fetch(clean_twin, big.uri, 1000, 5000, token=twin_catalog.VALID_TOKEN) == \
        clean_twin.catalog.read(big.uri, 1000, 4000)
    hops = [r for r in twin_requests(clean_twin) if r["endpoint"] == "download"]
    assert [r["host"] for r in hops] == ["127.0.0.1", "127.0.0.2", "127.0.0.2", "127.0.0.2"]
    assert [r["with_token"] for r in hops] == [True, False, False, False]
    assert all(r["range"] == "bytes=1000-4999" for r in hops)


def test_more_than_five_redirects_is_a_bad_response(clean_twin, big):
    clean_twin.faults.add("download", "redirect", hops=6, to="mast")
    with pytest.raises(BadResponse, match="more than 5 redirects"):
        http_fetch(clean_twin, big.uri, 0, 100)


def test_a_refused_token_is_read_again_from_its_file_once(clean_twin, tmp_path):
    uri = twin_catalog.EXCLUSIVE_URI
    token_file = tmp_path / "token"
    token_file.write_text(twin_catalog.EXPIRED_TOKEN)
    token_file.chmod(0o600)
    settings = Settings.defaults(token_file=str(token_file))

    async def main():
        keeper = TokenKeeper(settings, twin_catalog.EXPIRED_TOKEN, f"file {token_file}", env={})
        async with httpx.AsyncClient() as client:
            fetcher = HttpFetcher(client, clean_twin.mast_url, keeper, FAST)
            with pytest.raises(Unauthorized):
                await fetch_range(fetcher, uri, 0, 100)
            token_file.write_text(twin_catalog.VALID_TOKEN)
            data = await fetch_range(fetcher, uri, 0, 100)
        return data, keeper.status()

    data, status = trio.run(main)
    assert data == clean_twin.catalog.read(uri, 0, 100)
    assert status["renewals"] == 1 and status["source"] == f"file {token_file}"
    tries = [r["with_token"] for r in twin_requests(clean_twin) if r["endpoint"] == "download"]
    assert tries == [True, True, True]  # refused, refused again after an unchanged re-read, then the new one


def test_token_check_states(clean_twin):
    from mastfs.mast.client import MastClient, make_http_client

    async def state_of(token):
        settings = Settings.defaults(mast_url=clean_twin.mast_url, deadline=5.0)
        keeper = TokenKeeper(settings, token, "given", env={}, renewable=False)
        async with make_http_client(settings) as http:
            await keeper.check(MastClient(http, settings, token_provider=keeper.current).whoami)
        return keeper.status()

    valid = trio.run(state_of, twin_catalog.VALID_TOKEN)
    assert valid["state"] == "valid" and valid["ezid"] == "twinuser" and valid["last_check"]
    assert trio.run(state_of, twin_catalog.EXPIRED_TOKEN)["state"] == "refused"
    assert trio.run(state_of, None)["state"] == "none"
    assert twin_catalog.VALID_TOKEN not in str(valid)
