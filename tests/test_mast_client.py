"""MastClient and auth against the MAST twin over loopback (real HTTP, injected faults)."""

from __future__ import annotations

import logging
import math
import os
from contextlib import asynccontextmanager

import keyring
import keyring.backend
import pytest
from asyncutil import trio_test

from mastfs import auth
from mastfs.config import Settings
from mastfs.errors import BadResponse, NotFound, Unauthorized, Unavailable
from mastfs.mast.client import PATH_LOOKUP_BATCH, PATH_LOOKUP_PARALLEL, MastClient, make_http_client
from mastfs.twin import catalog as twin_catalog

PROGRAM_2733_OBS = {
    "jw02733-o001_t001_nircam_clear-f090w", "jw02733-o001_t001_nircam_clear-f187n",
    "jw02733-o001_t001_nircam_clear-f212n", "jw02733-o001_t001_nircam_clear-f356w",
    "jw02733-o001_t001_nircam_f405n-f444w", "jw02733-o001_t001_nircam_f444w-f470n",
    "jw02733-o002_t001_miri_f770w", "jw02733-o002_t001_miri_f1130w", "jw02733-o002_t001_miri_f1280w",
    "jw02733-o002_t001_miri_f1800w",
}


def twin_settings(twin, **changes) -> Settings:
    values = {"mast_url": twin.mast_url, "resolver_url": twin.resolver_url, "deadline": 10.0,
              "retries": 4, "collections": ["JWST"]}
    values.update(changes)
    return Settings.defaults(**values)


@asynccontextmanager
async def mast_client(twin, token=None, pagesizes=None, **changes):
    settings = twin_settings(twin, **changes)
    async with make_http_client(settings) as http:
        yield MastClient(http, settings, token_provider=lambda: token, **(pagesizes or {}))


def requests(twin, key: str) -> int:
    return twin.stats()["endpoints"].get(key, {}).get("requests", 0)


# --- queries ---------------------------------------------------------------------------------------------


@trio_test
async def test_program_2733_one_query(clean_twin):
    async with mast_client(clean_twin, collections=["JWST", "OPO"]) as client:
        observations = await client.observations_by_program(twin_catalog.PROGRAM_2733, ["JWST", "OPO"])
    assert len(observations) == 12  # 10 JWST, 1 OPO, 1 planned JWST (the client keeps it; the tree does not)
    jwst = {obs.obs_id for obs in observations if obs.obs_collection == "JWST"}
    assert jwst == PROGRAM_2733_OBS | {twin_catalog.PLANNED_2733_OBS_ID}
    assert all(obs.proposal_id == "2733" and obs.obsid for obs in observations)
    assert requests(clean_twin, "invoke:Mast.Caom.Filtered") == 1
    assert requests(clean_twin, "invoke") == 1


@trio_test
async def test_collections_filter_and_count(clean_twin):
    async with mast_client(clean_twin) as client:
        jwst_only = await client.observations_by_program(twin_catalog.PROGRAM_2733, ["JWST"])
        counted = await client.count(MastClient.program_filters(twin_catalog.PROGRAM_2733, ["JWST", "OPO"]))
        unknown = await client.observations_by_program("99999", ["JWST"])
    assert {obs.obs_id for obs in jwst_only} == PROGRAM_2733_OBS | {twin_catalog.PLANNED_2733_OBS_ID}
    assert counted == 12
    assert unknown == []


@trio_test
async def test_observation_by_obs_id(clean_twin):
    async with mast_client(clean_twin) as client:
        obs = await client.observation(twin_catalog.OBS_2733_MIRI_F1130W, ["JWST"])
        with pytest.raises(NotFound):
            await client.observation("jw99999-o001_t001_miri_f1130w", ["JWST"])
    assert obs.obs_id == twin_catalog.OBS_2733_MIRI_F1130W
    assert obs.instrument_name and "MIRI" in obs.instrument_name.upper()


@trio_test
async def test_products_thousands_with_paging(clean_twin):
    async with mast_client(clean_twin) as client:
        obs = await client.observation(twin_catalog.OBS_2733_MIRI_F1130W, ["JWST"])
        clean_twin.reset_stats()
        whole = await client.products([obs.obsid])
    assert requests(clean_twin, "invoke:Mast.Caom.Products") == 1
    rows = len(clean_twin.catalog.product_rows(obs.obsid))
    assert rows >= 3000
    assert len(whole) == len({product.data_uri for product in whole})
    science_l2 = [p for p in whole if p.product_type == "SCIENCE" and p.level == 2]
    assert len(science_l2) >= 80

    clean_twin.reset_stats()
    async with mast_client(clean_twin, pagesizes={"product_pagesize": 700}) as client:
        paged = await client.products([obs.obsid])
    assert requests(clean_twin, "invoke:Mast.Caom.Products") == math.ceil(rows / 700)
    assert [p.data_uri for p in paged] == [p.data_uri for p in whole]


@trio_test
async def test_cone_and_position(clean_twin):
    async with mast_client(clean_twin) as client:
        everything = await client.cone(151.755, -40.437, 0.1)
        jwst = await client.cone(151.755, -40.437, 0.1, ["JWST"])
    assert PROGRAM_2733_OBS <= {obs.obs_id for obs in everything}
    assert {obs.obs_id for obs in jwst} >= PROGRAM_2733_OBS
    assert all(obs.obs_collection == "JWST" for obs in jwst)
    assert all(obs.fields["distance"] <= 360 for obs in jwst)
    assert requests(clean_twin, "invoke:Mast.Caom.Cone") == 1
    assert requests(clean_twin, "invoke:Mast.Caom.Filtered.Position") == 1


@trio_test
async def test_service_error_is_bad_response(clean_twin):
    async with mast_client(clean_twin) as client:
        with pytest.raises(BadResponse, match="Unknown service"):
            await client.invoke("Mast.No.Such.Service", {}, 10)


# --- faults ----------------------------------------------------------------------------------------------


@trio_test
async def test_executing_is_polled_with_the_same_body(clean_twin):
    clean_twin.faults.add("invoke", "executing", count=1, polls=3)
    async with mast_client(clean_twin) as client:
        observations = await client.observations_by_program(twin_catalog.PROGRAM_2733, ["JWST"])
    assert {obs.obs_id for obs in observations} == PROGRAM_2733_OBS | {twin_catalog.PLANNED_2733_OBS_ID}
    # three EXECUTING answers, then COMPLETE: the twin only completes an identical re-sent body
    assert requests(clean_twin, "invoke") == 4


@trio_test
async def test_executing_forever_hits_the_query_timeout(clean_twin):
    clean_twin.faults.add("invoke", "executing", count=1, polls=10_000)
    async with mast_client(clean_twin, deadline=0.5, query_timeout=1.5) as client:
        with pytest.raises(Unavailable, match="query timeout"):
            await client.observations_by_program(twin_catalog.PROGRAM_2733, ["JWST"])


@pytest.mark.parametrize("kind,params", [
    ("status", {"code": 503}),
    ("status", {"code": 429, "retry_after": 0}),
    ("html_504", {}),
    ("reset", {}),
    ("truncate", {}),
])
@trio_test
async def test_transient_failures_are_retried(clean_twin, kind, params):
    clean_twin.faults.add("invoke", kind, count=2, **params)
    async with mast_client(clean_twin) as client:
        observations = await client.observations_by_program(twin_catalog.PROGRAM_2733, ["JWST"])
    assert {obs.obs_id for obs in observations} == PROGRAM_2733_OBS | {twin_catalog.PLANNED_2733_OBS_ID}
    assert requests(clean_twin, "invoke") == 3


@trio_test
async def test_persistent_503_becomes_unavailable(clean_twin):
    clean_twin.faults.add("invoke", "status", code=503)
    async with mast_client(clean_twin, retries=3) as client:
        with pytest.raises(Unavailable):
            await client.observations_by_program(twin_catalog.PROGRAM_2733, ["JWST"])
    assert requests(clean_twin, "invoke") == 3


@trio_test
async def test_persistent_truncation_never_yields_partial_rows(clean_twin):
    clean_twin.faults.add("invoke", "truncate")
    async with mast_client(clean_twin, retries=3) as client:
        with pytest.raises((Unavailable, BadResponse)):
            await client.products(["1"])


@trio_test
async def test_stall_becomes_unavailable_within_the_query_timeout(clean_twin):
    clean_twin.faults.add("invoke", "stall")
    async with mast_client(clean_twin, deadline=0.5, query_timeout=2.0) as client:
        with pytest.raises(Unavailable):
            await client.observations_by_program(twin_catalog.PROGRAM_2733, ["JWST"])
    clean_twin.faults.clear()  # release the stalled server threads


@trio_test
async def test_html_200_is_a_bad_response(clean_twin):
    clean_twin.faults.add("invoke", "status", code=200)
    async with mast_client(clean_twin) as client:
        with pytest.raises(BadResponse, match="not JSON"):
            await client.observations_by_program(twin_catalog.PROGRAM_2733, ["JWST"])
    assert requests(clean_twin, "invoke") == 3  # retried twice, then given up


@trio_test
async def test_unauthorized_answer(clean_twin):
    clean_twin.faults.add("invoke", "unauthorized", count=1)
    async with mast_client(clean_twin) as client:
        with pytest.raises(Unauthorized) as caught:
            await client.observations_by_program(twin_catalog.PROGRAM_2733, ["JWST"])
    assert "token" in caught.value.reason


# --- resolver, path_lookup, HEAD, whoami ----------------------------------------------------------------


@trio_test
async def test_resolve_name(clean_twin):
    async with mast_client(clean_twin) as client:
        ngc3132 = await client.resolve_name("NGC 3132")
        unknown = await client.resolve_name(twin_catalog.UNRESOLVABLE_NAME)
    assert ngc3132 == pytest.approx((151.755, -40.437), abs=0.01)
    assert unknown is None
    assert requests(clean_twin, "resolver") == 2


@trio_test
async def test_path_lookup_batches_and_404(clean_twin):
    uris = [product.uri for product in clean_twin.catalog.products()][:120]
    uris.append(twin_catalog.HTTP_ONLY_URI)
    async with mast_client(clean_twin) as client:
        keys = await client.path_lookup(uris)
    assert set(keys) == set(uris)
    assert keys[twin_catalog.HTTP_ONLY_URI] is None
    for uri in uris:
        expected = clean_twin.catalog.product(uri).s3_key
        assert keys[uri] == expected
        assert keys[uri] is None or not keys[uri].startswith("/")
    assert requests(clean_twin, "path_lookup") == math.ceil(len(set(uris)) / PATH_LOOKUP_BATCH)


@trio_test
async def test_head_sizes(clean_twin):
    catalog = clean_twin.catalog
    async with mast_client(clean_twin) as client:
        null_size = await client.head(twin_catalog.NULL_SIZE_URI)
        no_length = await client.head(twin_catalog.NO_LENGTH_URI)
        with pytest.raises(NotFound):
            await client.head("mast:JWST/product/no_such_file.fits")
        with pytest.raises(Unauthorized) as anonymous:
            await client.head(twin_catalog.EXCLUSIVE_URI)
    assert null_size == catalog.product(twin_catalog.NULL_SIZE_URI).size
    assert no_length is None
    assert "MAST_API_TOKEN" in anonymous.value.reason
    async with mast_client(clean_twin, token=twin_catalog.EXPIRED_TOKEN) as client:
        with pytest.raises(Unauthorized) as expired:
            await client.head(twin_catalog.EXCLUSIVE_URI)
    assert "refused" in str(expired.value)
    async with mast_client(clean_twin, token=twin_catalog.VALID_TOKEN) as client:
        assert await client.head(twin_catalog.EXCLUSIVE_URI) == catalog.product(twin_catalog.EXCLUSIVE_URI).size


@trio_test
async def test_whoami(clean_twin):
    async with mast_client(clean_twin) as client:
        anonymous = await client.whoami()
    async with mast_client(clean_twin, token=twin_catalog.VALID_TOKEN) as client:
        user = await client.whoami()
    assert anonymous.anonymous
    assert not user.anonymous and user.ezid != "anonymous"


# --- tokens ----------------------------------------------------------------------------------------------


class _OneEntryKeyring(keyring.backend.KeyringBackend):
    priority = 1

    def __init__(self, entries):
        super().__init__()
        self.entries = entries

    def get_password(self, service, username):
        return self.entries.get((service, username))

    def set_password(self, service, username, password):
        raise NotImplementedError

    def delete_password(self, service, username):
        raise NotImplementedError


class _BrokenKeyring(_OneEntryKeyring):
    def get_password(self, service, username):
        raise RuntimeError("no dbus")


@pytest.fixture
def restore_keyring():
    previous = keyring.get_keyring()
    yield
    keyring.set_keyring(previous)


@trio_test
async def test_token_from_env_opens_exclusive_data(clean_twin, restore_keyring):
    keyring.set_keyring(_OneEntryKeyring({}))
    settings = twin_settings(clean_twin)
    token = auth.find_token(settings, env={"MAST_API_TOKEN": twin_catalog.VALID_TOKEN})
    assert token == twin_catalog.VALID_TOKEN
    assert auth.find_token(settings, env={}) is None
    async with make_http_client(settings) as http:
        client = MastClient(http, settings, token_provider=lambda: token)
        assert await client.head(twin_catalog.EXCLUSIVE_URI) == clean_twin.catalog.product(
            twin_catalog.EXCLUSIVE_URI).size


def test_token_file_and_keyring_sources(tmp_path, restore_keyring):
    token_file = tmp_path / "token"
    token_file.write_text("file-token\n")
    os.chmod(token_file, 0o600)
    settings = Settings.defaults(token_file=str(token_file))
    keyring.set_keyring(_OneEntryKeyring({(auth.KEYRING_SERVICE, auth.KEYRING_USER): "ring-token"}))
    assert auth.find_token(settings, env={"MAST_API_TOKEN": "env-token"}) == "env-token"
    assert auth.find_token(settings, env={}) == "file-token"
    assert auth.find_token(Settings.defaults(), env={}) == "ring-token"
    keyring.set_keyring(_BrokenKeyring({}))
    assert auth.find_token(Settings.defaults(), env={}) is None

    os.chmod(token_file, 0o640)
    with pytest.raises(Unauthorized, match="other users") as loose:
        auth.find_token(settings, env={})
    assert "chmod 600" in loose.value.reason
    with pytest.raises(Unauthorized, match="cannot read"):
        auth.find_token(Settings.defaults(token_file=str(tmp_path / "missing")), env={})


@trio_test
async def test_http_client_settings():
    settings = Settings.defaults(deadline=8.0)
    async with make_http_client(settings) as http:
        assert http.headers["User-Agent"].startswith("mastfs/")
        assert http.timeout.connect == 5.0 and http.timeout.read == 4.0


def test_auth_headers():
    assert auth.auth_headers("abc") == {"Authorization": "token abc"}
    assert auth.auth_headers(None) == {}


def test_token_never_reaches_the_log(caplog):
    secret = "s3cr3t-token-value-0123456789"
    auth.install_redaction(secret)
    logger = logging.getLogger("mastfs.test_redaction")
    with caplog.at_level(logging.INFO, logger="mastfs.test_redaction"):
        logger.info("sending %s to %s", {"Authorization": f"token {secret}"}, "mast")
        logger.info("plain %s", "message")
    assert secret not in caplog.text
    assert auth.REDACTED in caplog.text and "plain message" in caplog.text
    assert auth.redact(f"a {secret} b {secret}", [secret]) == f"a {auth.REDACTED} b {auth.REDACTED}"


# --- real-archive behaviours (issue 10): slow, failing and shifting queries, URL limits -------------------


@pytest.mark.parametrize("shape", ["executing", "first_byte"])
@trio_test
async def test_slow_query_is_bounded_by_the_query_timeout_not_the_deadline(clean_twin, shape):
    """MAST takes 2 s for the answer (EXECUTING polls, or holding the first byte): more than the 0.5 s
    deadline, well within the query timeout."""
    obsid = await f1130w_obsid(clean_twin)
    clean_twin.faults.add("invoke", "slow_query", count=1, seconds=2.0, shape=shape)
    async with mast_client(clean_twin, deadline=0.5, query_timeout=30.0) as client:
        products = await client.products([obsid])
    assert len(products) > 3000


@trio_test
async def test_slow_query_past_the_query_timeout_is_unavailable(clean_twin):
    obsid = await f1130w_obsid(clean_twin)
    clean_twin.faults.add("invoke", "slow_query", count=1, seconds=30.0, shape="first_byte")
    async with mast_client(clean_twin, deadline=0.5, query_timeout=1.5) as client:
        with pytest.raises(Unavailable):
            await client.products([obsid])
    clean_twin.faults.clear()  # release the held server thread


@trio_test
async def test_unreachable_mast_is_unavailable_at_once_whatever_the_query_timeout():
    """Connection refused is not a slow query: it fails within the deadline, not the query timeout."""
    import socket
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = Settings.defaults(mast_url=f"http://127.0.0.1:{port}", deadline=2.0, query_timeout=600.0,
                                 retries=1000)
    async with make_http_client(settings) as http:
        client = MastClient(http, settings)
        with pytest.raises(Unavailable, match="unreachable"):
            await client.observations_by_program("2733", ["JWST"])


@trio_test
async def test_transient_error_answers_are_retried(clean_twin, caplog):
    caplog.set_level(logging.INFO, logger="mastfs")
    clean_twin.faults.add("invoke", "error_timeout", count=2)
    async with mast_client(clean_twin) as client:
        observations = await client.observations_by_program(twin_catalog.PROGRAM_2733, ["JWST"])
    assert PROGRAM_2733_OBS <= {obs.obs_id for obs in observations}
    assert requests(clean_twin, "invoke") == 3
    assert "transient error" in caplog.text


def test_transient_and_final_error_messages():
    from mastfs.mast.client import is_transient_error
    assert is_transient_error("Query timed out: the server did not finish in time. Please try again later.")
    assert is_transient_error("Error 503: service temporarily unavailable")
    assert not is_transient_error("Incorrect or missing parameter: obsid")
    assert not is_transient_error("Unknown service Mast.Foo")


@pytest.mark.parametrize("mode", ["insert", "drop"])
@trio_test
async def test_shifted_pages_are_asked_again_never_kept_short(clean_twin, mode, caplog):
    expected = len(await _products_of_f1130w(clean_twin))
    obsid = await f1130w_obsid(clean_twin)
    clean_twin.faults.add("invoke", "page_shift", count=1, mode=mode)
    async with mast_client(clean_twin, pagesizes={"product_pagesize": 1000}) as client:
        products = await client.products([obsid])
    assert len(products) == expected
    assert "asking again from page 1" in caplog.text


@trio_test
async def test_persistent_page_shift_is_a_bad_response_with_a_log_line(clean_twin, caplog):
    obsid = await f1130w_obsid(clean_twin)
    clean_twin.faults.add("invoke", "page_shift", mode="insert")
    async with mast_client(clean_twin, pagesizes={"product_pagesize": 1000}) as client:
        with pytest.raises(BadResponse, match="announced"):
            await client.products([obsid])
    assert any(record.levelname == "ERROR" and "nothing stored" in record.getMessage()
               for record in caplog.records)


async def _products_of_f1130w(twin):
    async with mast_client(twin) as client:
        return await client.products([await f1130w_obsid(twin)])


async def f1130w_obsid(twin):
    """The obsid of OBS_2733_MIRI_F1130W (asked before any fault is armed)."""
    async with mast_client(twin) as client:
        return (await client.observation(twin_catalog.OBS_2733_MIRI_F1130W, ["JWST"])).obsid


@trio_test
async def test_queries_in_flight_are_reported(clean_twin):
    import trio
    obsid = await f1130w_obsid(clean_twin)
    clean_twin.faults.add("invoke", "slow_query", count=1, seconds=1.5, shape="executing")
    seen = []
    async with mast_client(clean_twin, query_timeout=30.0) as client:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.products, [obsid])
            while not seen:
                await trio.sleep(0.2)
                seen = [q for q in client.stats()["queries"] if q["polls"] > 0]
        assert client.stats()["queries"] == []
    assert seen[0]["what"].startswith("Mast.Caom.Products (obsid ")
    assert seen[0]["pages"] == 0 and seen[0]["seconds"] >= 0


@trio_test
async def test_path_lookup_halves_its_batch_on_414(clean_twin, caplog):
    """With a URL limit that 40 JWST uris overflow, the batch is halved until MAST takes it."""
    caplog.set_level(logging.INFO, logger="mastfs")
    uris = [product.uri for product in clean_twin.catalog.products()][:100]
    limit = clean_twin.max_url_length
    clean_twin.max_url_length = 1500
    try:
        async with mast_client(clean_twin) as client:
            keys = await client.path_lookup(uris)
    finally:
        clean_twin.max_url_length = limit
    assert keys == {uri: clean_twin.catalog.product(uri).s3_key for uri in uris}
    assert "asking 20 at a time" in caplog.text or "asking 10 at a time" in caplog.text
    assert "unavailable" not in caplog.text.lower()


@trio_test
async def test_path_lookup_sends_at_most_40_uris_and_use_cloud_path(clean_twin):
    uris = [product.uri for product in clean_twin.catalog.products()][:90]
    sent = []
    settings = twin_settings(clean_twin)
    async with make_http_client(settings) as http:
        http.event_hooks["request"].append(lambda request: _record(sent, request))
        await MastClient(http, settings).path_lookup(uris)
    assert sorted(len(params.get_list("uri")) for params in sent) == [10, 40, 40]
    assert all(params.get("use_cloud_path") == "True" for params in sent)


@trio_test
async def test_path_lookup_keeps_its_batches_in_flight_together(clean_twin):
    """The 5 batches of 200 uris (what opening a file looks up) are in flight together, at most
    PATH_LOOKUP_PARALLEL at once: one round trip to MAST instead of five."""
    uris = [product.uri for product in clean_twin.catalog.products()][:200]
    clean_twin.faults.add("path_lookup", "latency", seconds=0.3)
    in_flight, peak = 0, 0

    async def sent(request):
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)

    async def answered(response):
        nonlocal in_flight
        in_flight -= 1

    settings = twin_settings(clean_twin)
    async with make_http_client(settings) as http:
        http.event_hooks["request"].append(sent)
        http.event_hooks["response"].append(answered)
        keys = await MastClient(http, settings).path_lookup(uris)
    assert keys == {uri: clean_twin.catalog.product(uri).s3_key for uri in uris}
    assert requests(clean_twin, "path_lookup") == 5
    assert peak == PATH_LOOKUP_PARALLEL


@trio_test
async def test_a_failed_path_lookup_batch_fails_the_lookup(clean_twin):
    """One of three batches failing (here with an HTTP 404, which is not retried) fails the whole look-up
    with that error, raised as itself (not in an exception group)."""
    uris = [product.uri for product in clean_twin.catalog.products()][:120]
    clean_twin.faults.add("path_lookup", "status", count=1, code=404)
    async with mast_client(clean_twin) as client:
        with pytest.raises(NotFound):
            await client.path_lookup(uris)


async def _record(sent, request):
    sent.append(request.url.params)
