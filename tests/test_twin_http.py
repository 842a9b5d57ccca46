"""The twin's HTTP side over real loopback HTTP (httpx): Mashup invoke, paging, filters, EXECUTING,
downloads with ranges and tokens, path_lookup, whoami, resolver, every fault kind, and the counters."""

from __future__ import annotations

import hashlib
import json
import threading

import httpx
import pytest
from astropy import units as u
from astropy.coordinates import SkyCoord

from mastfs.twin import catalog as twin_catalog

NGC3132 = (151.755, -40.437)


@pytest.fixture
def client(clean_twin):
    with httpx.Client(base_url=clean_twin.mast_url, timeout=30) as http:
        yield http


def invoke(client: httpx.Client, service: str, params: dict, **extra) -> dict:
    request = {"service": service, "params": params, "format": "json", **extra}
    response = client.post("/api/v0/invoke", data={"request": json.dumps(request)})
    assert response.status_code == 200
    return response.json()


def public_s3_product(twin, min_size: int = 0):
    """A public, cloud-hosted product with a Content-Length (the common case)."""
    for product in twin.catalog.products():
        if (
            product.s3_key
            and not product.exclusive
            and product.send_content_length
            and product.size >= min_size
        ):
            return product
    raise AssertionError("catalog has no public cloud product")


def download_url(uri: str) -> str:
    return "/api/v0.1/Download/file?" + httpx.QueryParams({"uri": uri}).__str__()


# ---- Mashup invoke ------------------------------------------------------------------------------------


def test_filtered_by_program_returns_its_observations_with_real_field_types(client, clean_twin):
    body = invoke(
        client,
        "Mast.Caom.Filtered",
        {"columns": "*", "filters": [{"paramName": "proposal_id", "values": [twin_catalog.PROGRAM_2733]}]},
        pagesize=50000,
        page=1,
    )
    assert body["status"] == "COMPLETE"
    assert body["paging"]["rowsFiltered"] == 11 == len(body["data"])
    assert {row["proposal_id"] for row in body["data"]} == {"2733"}
    types = {field["name"]: field["type"] for field in body["fields"]}
    assert types["s_ra"] == "float" and types["calib_level"] == "int" and types["obs_id"] == "string"
    assert twin_catalog.OBS_2733_MIRI_F1130W in {row["obs_id"] for row in body["data"]}


def test_paging_splits_rows_into_pages_that_add_up(client):
    params = {"columns": "*", "filters": [{"paramName": "proposal_id", "values": ["2733"]}]}
    pages = [invoke(client, "Mast.Caom.Filtered", params, pagesize=4, page=page) for page in (1, 2, 3, 4)]
    assert [page["paging"]["rows"] for page in pages] == [4, 4, 3, 0]
    assert all(page["paging"]["pagesFiltered"] == 3 for page in pages)
    assert all(page["paging"]["rowsFiltered"] == 11 and page["paging"]["pageSize"] == 4 for page in pages)
    obs_ids = [row["obs_id"] for page in pages for row in page["data"]]
    assert len(obs_ids) == len(set(obs_ids)) == 11


def test_count_big_answers_one_row(client):
    body = invoke(
        client,
        "Mast.Caom.Filtered",
        {"columns": "COUNT_BIG(*)", "filters": [{"paramName": "proposal_id", "values": ["2733"]}]},
    )
    assert body["data"] == [{"Column1": 11}]


def test_separator_filter_matches_one_part_of_a_multi_valued_column(client, clean_twin):
    multi = next(row for row in clean_twin.catalog.observation_rows() if ";" in str(row.get("filters") or ""))
    part = multi["filters"].split(";")[-1]
    body = invoke(
        client,
        "Mast.Caom.Filtered",
        {"columns": "*", "filters": [{"paramName": "filters", "separator": ";", "values": [part]}]},
    )
    assert multi["obs_id"] in {row["obs_id"] for row in body["data"]}
    assert all(part in row["filters"].split(";") for row in body["data"])


def test_free_text_is_a_case_insensitive_like(client, clean_twin):
    expected = {
        row["obs_id"]
        for row in clean_twin.catalog.observation_rows()
        if str(row.get("target_name") or "").lower().startswith("ngc")
    }
    body = invoke(
        client,
        "Mast.Caom.Filtered",
        {"columns": "*", "filters": [{"paramName": "target_name", "values": [], "freeText": "nGc%"}]},
    )
    assert expected and {row["obs_id"] for row in body["data"]} == expected


def test_range_filter_is_inclusive(client, clean_twin):
    rows = [row for row in clean_twin.catalog.observation_rows() if row.get("t_min") is not None]
    values = sorted(row["t_min"] for row in rows)
    low, high = values[len(values) // 4], values[len(values) // 2]
    expected = {row["obs_id"] for row in rows if low <= row["t_min"] <= high}
    body = invoke(
        client,
        "Mast.Caom.Filtered",
        {"columns": "*", "filters": [{"paramName": "t_min", "values": [{"min": low, "max": high}]}]},
    )
    assert {row["obs_id"] for row in body["data"]} == expected


def test_cone_adds_distance_in_arcsec_matching_astropy(client, clean_twin):
    ra, dec = NGC3132
    body = invoke(client, "Mast.Caom.Cone", {"ra": ra, "dec": dec, "radius": 0.2})
    centre = SkyCoord(ra * u.deg, dec * u.deg)
    expected = {
        row["obs_id"]
        for row in clean_twin.catalog.observation_rows()
        if row.get("s_ra") is not None
        and centre.separation(SkyCoord(row["s_ra"] * u.deg, row["s_dec"] * u.deg)).deg <= 0.2
    }
    assert {row["obs_id"] for row in body["data"]} == expected
    for row in body["data"]:
        truth = centre.separation(SkyCoord(row["s_ra"] * u.deg, row["s_dec"] * u.deg)).arcsec
        assert row["distance"] == pytest.approx(truth, abs=1e-3)
        assert row["objID1"] == row["objID"]
    assert {"distance", "objID1"} <= {field["name"] for field in body["fields"]}


def test_filtered_position_combines_filters_and_position(client):
    ra, dec = NGC3132
    body = invoke(
        client,
        "Mast.Caom.Filtered.Position",
        {
            "columns": "*",
            "filters": [{"paramName": "proposal_id", "values": ["2733"]}],
            "position": f"{ra}, {dec}, 0.2",
        },
    )
    assert body["status"] == "COMPLETE" and body["data"]
    assert all(row["proposal_id"] == "2733" and row["distance"] <= 720 for row in body["data"])


def test_products_of_the_f1130w_observation_are_thousands_and_page(client, clean_twin):
    obs = next(
        row
        for row in clean_twin.catalog.observation_rows()
        if row["obs_id"] == twin_catalog.OBS_2733_MIRI_F1130W
    )
    first = invoke(client, "Mast.Caom.Products", {"obsid": str(obs["obsid"])}, pagesize=1000, page=1)
    total = first["paging"]["rowsFiltered"]
    assert total >= 3000 and first["paging"]["pagesFiltered"] == -(-total // 1000)
    last = invoke(
        client,
        "Mast.Caom.Products",
        {"obsid": str(obs["obsid"])},
        pagesize=1000,
        page=first["paging"]["pagesFiltered"],
    )
    assert len(first["data"]) + (first["paging"]["pagesFiltered"] - 2) * 1000 + len(last["data"]) == total
    assert {"dataURI", "productFilename", "size", "productType"} <= {
        field["name"] for field in first["fields"]
    }


def test_unknown_service_is_a_200_error_and_garbage_is_a_400(client):
    body = invoke(client, "Mast.No.Such.Service", {})
    assert body["status"] == "ERROR" and "Mast.No.Such.Service" in body["msg"]
    bad_column = invoke(
        client,
        "Mast.Caom.Filtered",
        {"columns": "*", "filters": [{"paramName": "no_such_column", "values": ["1"]}]},
    )
    assert bad_column["status"] == "ERROR"
    assert client.post("/api/v0/invoke", data={"request": "{not json"}).status_code == 400
    assert client.post("/api/v0/invoke", data={"other": "x"}).status_code == 400


def test_executing_fault_holds_the_same_request_for_n_polls(client, clean_twin):
    clean_twin.faults.add("invoke", "executing", count=1, polls=2)
    request = {
        "service": "Mast.Caom.Filtered",
        "params": {"columns": "*", "filters": [{"paramName": "proposal_id", "values": ["2733"]}]},
        "format": "json",
        "pagesize": 100,
        "page": 1,
        "cacheBreaker": "fixed-breaker",
    }
    form = {"request": json.dumps(request)}
    statuses = [client.post("/api/v0/invoke", data=form).json()["status"] for _ in range(3)]
    assert statuses == ["EXECUTING", "EXECUTING", "COMPLETE"]
    assert client.post("/api/v0/invoke", data=form).json()["status"] == "COMPLETE"


def test_name_lookup_service_answers_resolved_coordinates(client):
    body = invoke(client, "Mast.Name.Lookup", {"input": "NGC 3132", "format": "json"})
    (entry,) = body["resolvedCoordinate"]
    assert entry["ra"] == pytest.approx(NGC3132[0], abs=0.05) and entry["decl"] == pytest.approx(
        NGC3132[1], abs=0.05
    )


def test_columnsconfig_is_the_catalogs(client, clean_twin):
    response = client.post("/portal/Mashup/Mashup.asmx/columnsconfig", data={"colConfigId": "Mast.Caom.Cone"})
    assert response.json() == clean_twin.catalog.column_config("Mast.Caom.Cone")
    assert response.json()["t_min"]["vot.datatype"] in ("double", "float")


# ---- downloads ----------------------------------------------------------------------------------------


def test_head_and_get_of_a_product(client, clean_twin):
    product = public_s3_product(clean_twin)
    head = client.head(download_url(product.uri))
    assert head.status_code == 200
    assert int(head.headers["content-length"]) == product.size
    assert head.headers["accept-ranges"] == "bytes"
    assert product.filename in head.headers["content-disposition"]
    assert head.headers["last-modified"] and head.headers["content-type"]
    body = client.get(download_url(product.uri)).content
    assert hashlib.sha256(body).hexdigest() == clean_twin.catalog.sha256(product.uri)


@pytest.mark.parametrize(
    ("header", "first", "last"),
    [("bytes=100-2979", 100, 2979), ("bytes=-500", None, None), ("bytes=2880-", 2880, None)],
)
def test_single_ranges_answer_206(client, clean_twin, header, first, last):
    product = public_s3_product(clean_twin, min_size=5760)
    size = product.size
    first = size - 500 if first is None else first
    last = size - 1 if last is None else last
    response = client.get(download_url(product.uri), headers={"Range": header})
    assert response.status_code == 206
    assert response.headers["content-range"] == f"bytes {first}-{last}/{size}"
    assert response.content == clean_twin.catalog.read(product.uri, first, last - first + 1)


def test_unsatisfiable_range_is_416_and_multi_range_is_the_full_body(client, clean_twin):
    product = public_s3_product(clean_twin)
    response = client.get(download_url(product.uri), headers={"Range": f"bytes={product.size}-"})
    assert response.status_code == 416
    assert response.headers["content-range"] == f"bytes */{product.size}"
    multi = client.get(download_url(product.uri), headers={"Range": "bytes=0-9,20-29"})
    assert multi.status_code == 200 and len(multi.content) == product.size


def test_no_length_product_is_served_without_content_length(client, clean_twin):
    product = clean_twin.catalog.product(twin_catalog.NO_LENGTH_URI)
    response = client.get(download_url(product.uri))
    assert response.status_code == 200
    assert "content-length" not in response.headers
    assert hashlib.sha256(response.content).hexdigest() == clean_twin.catalog.sha256(product.uri)


def test_unknown_uri_is_404(client):
    assert client.get(download_url("mast:JWST/product/no_such_file.fits")).status_code == 404


def test_exclusive_product_needs_a_valid_token_in_any_accepted_form(client):
    url = download_url(twin_catalog.EXCLUSIVE_URI)
    token = twin_catalog.VALID_TOKEN
    assert client.get(url).status_code == 401
    assert (
        client.get(url, headers={"Authorization": f"token {twin_catalog.EXPIRED_TOKEN}"}).status_code == 401
    )
    assert client.get(url, headers={"Authorization": f"token {token}"}).status_code == 200
    assert client.get(url, headers={"Authorization": f"Bearer {token}"}).status_code == 200
    assert client.get(url, headers={"Cookie": f"mast_token={token}"}).status_code == 200


# ---- path_lookup, whoami, resolver ---------------------------------------------------------------------


def test_path_lookup_answers_each_uri(client, clean_twin):
    product = public_s3_product(clean_twin)
    unknown = "mast:JWST/product/no_such_file.fits"
    uris = [product.uri, twin_catalog.HTTP_ONLY_URI, unknown]
    response = client.get("/api/v0.1/path_lookup/", params=[("uri", uri) for uri in uris])
    assert response.json() == {
        product.uri: {"status_code": 200, "path": "/" + product.s3_key},
        twin_catalog.HTTP_ONLY_URI: {"status_code": 404, "path": None},
        unknown: {"status_code": 404, "path": None},
    }


def test_whoami_anonymous_and_logged_in(client):
    assert client.get("/whoami").json()["anon"] is True
    assert (
        client.get("/whoami", headers={"Cookie": f"mast_token={twin_catalog.EXPIRED_TOKEN}"}).json()["anon"]
        is True
    )
    me = client.get("/whoami", headers={"Authorization": f"token {twin_catalog.VALID_TOKEN}"}).json()
    assert me["anon"] is False and me["attrib"]["display_name"]


def test_resolver_answers_santa_json(client):
    query = {"name": "NGC 3132", "outputFormat": "json", "resolveAll": "false"}
    body = client.get("/Santa-war/query", params=query).json()
    assert body["status"] == ""
    (entry,) = body["resolvedCoordinate"]
    assert entry["searchString"] == "ngc 3132"
    assert entry["ra"] == pytest.approx(NGC3132[0], abs=0.05)
    nothing = client.get("/Santa-war/query", params={**query, "name": twin_catalog.UNRESOLVABLE_NAME}).json()
    assert nothing["resolvedCoordinate"] == []


# ---- faults -------------------------------------------------------------------------------------------


def test_latency_fault_delays_but_answers(client, clean_twin):
    fault = clean_twin.faults.add("whoami", "latency", count=1, seconds=0.05)
    assert client.get("/whoami").status_code == 200
    assert fault.hits == 1 and clean_twin.faults.list()[0]["count"] == 0


def test_status_fault_bursts_then_recovers(client, clean_twin):
    clean_twin.faults.add("invoke", "status", count=2, code=503, retry_after=2)
    params = {"columns": "COUNT_BIG(*)", "filters": [{"paramName": "proposal_id", "values": ["2733"]}]}
    form = {"request": json.dumps({"service": "Mast.Caom.Filtered", "params": params, "format": "json"})}
    first, second, third = (client.post("/api/v0/invoke", data=form) for _ in range(3))
    assert first.status_code == second.status_code == 503
    assert first.headers["retry-after"] == "2"
    assert third.status_code == 200 and third.json()["data"] == [{"Column1": 11}]


def test_html_504_fault_sends_the_nginx_page(client, clean_twin):
    clean_twin.faults.add("resolver", "html_504", count=1)
    response = client.get("/Santa-war/query", params={"name": "NGC 3132", "outputFormat": "json"})
    assert response.status_code == 504
    assert "504 Gateway Time-out" in response.text and "nginx" in response.text


def test_reset_fault_cuts_the_connection_after_some_bytes(client, clean_twin):
    product = public_s3_product(clean_twin, min_size=5000)
    clean_twin.faults.add("download", "reset", count=1, match=product.uri, after_bytes=1000)
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        client.get(download_url(product.uri))
    assert clean_twin.stats()["endpoints"]["download"]["bytes_sent"] == 1000
    assert client.get(download_url(product.uri)).status_code == 200


def test_truncate_fault_sends_fewer_bytes_than_announced(client, clean_twin):
    product = public_s3_product(clean_twin, min_size=5000)
    clean_twin.faults.add("download", "truncate", count=1, after_bytes=100)
    with pytest.raises(httpx.RemoteProtocolError):
        client.get(download_url(product.uri))


def test_wrong_range_fault_answers_another_range(client, clean_twin):
    product = public_s3_product(clean_twin, min_size=10000)
    clean_twin.faults.add("download", "wrong_range", count=1)
    response = client.get(download_url(product.uri), headers={"Range": "bytes=0-99"})
    assert response.status_code == 206
    assert response.headers["content-range"] != f"bytes 0-99/{product.size}"


def test_ignore_range_fault_answers_200_with_everything(client, clean_twin):
    product = public_s3_product(clean_twin)
    clean_twin.faults.add("download", "ignore_range", count=1)
    response = client.get(download_url(product.uri), headers={"Range": "bytes=0-99"})
    assert response.status_code == 200 and len(response.content) == product.size


def test_range_faults_do_not_hit_requests_without_range(client, clean_twin):
    product = public_s3_product(clean_twin)
    fault = clean_twin.faults.add("download", "wrong_range", count=1)
    assert client.head(download_url(product.uri)).status_code == 200
    assert client.get(download_url(product.uri)).status_code == 200
    assert fault.hits == 0


def test_unauthorized_fault_refuses_public_data(client, clean_twin):
    product = public_s3_product(clean_twin)
    clean_twin.faults.add("download", "unauthorized", count=1)
    assert client.get(download_url(product.uri)).status_code == 401
    assert client.get(download_url(product.uri)).status_code == 200


def test_stall_fault_blocks_one_request_only_until_cleared(clean_twin):
    clean_twin.faults.add("path_lookup", "stall", count=1)
    outcome: list[object] = []

    def stalled_request() -> None:
        with httpx.Client(base_url=clean_twin.mast_url, timeout=30) as http:
            try:
                outcome.append(http.get("/api/v0.1/path_lookup/", params={"uri": "x"}).status_code)
            except httpx.HTTPError as exc:
                outcome.append(exc)

    thread = threading.Thread(target=stalled_request)
    thread.start()
    with httpx.Client(base_url=clean_twin.mast_url, timeout=5) as other:
        assert other.get("/whoami").status_code == 200
        thread.join(timeout=0.5)
        assert thread.is_alive() and not outcome
        clean_twin.faults.clear()
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], httpx.HTTPError)


def test_match_limits_a_fault_to_matching_requests(client, clean_twin):
    products = [
        product for product in clean_twin.catalog.products() if product.s3_key and not product.exclusive
    ]
    target, other = products[0], next(p for p in products if products[0].uri not in p.uri)
    clean_twin.faults.add("download", "status", code=500, match=target.uri)
    assert client.head(download_url(other.uri)).status_code == 200
    assert client.head(download_url(target.uri)).status_code == 500


def test_faults_admin_endpoint(client, clean_twin):
    added = client.post(
        "/__twin__/faults", json={"endpoint": "whoami", "kind": "status", "count": 1, "code": 502}
    )
    assert added.status_code == 200
    listed = client.get("/__twin__/faults").json()["faults"]
    assert [(f["endpoint"], f["kind"], f["count"], f["params"]["code"]) for f in listed] == [
        ("whoami", "status", 1, 502)
    ]
    assert client.get("/whoami").status_code == 502
    assert client.post("/__twin__/faults", json={"endpoint": "nowhere", "kind": "status"}).status_code == 400
    assert client.delete("/__twin__/faults").json() == {"faults": []}
    assert clean_twin.faults.list() == []


# ---- counters -----------------------------------------------------------------------------------------


def test_stats_count_requests_and_body_bytes_but_not_admin(client, clean_twin):
    product = public_s3_product(clean_twin)
    client.head(download_url(product.uri))
    client.get(download_url(product.uri), headers={"Range": "bytes=0-99"})
    invoke(client, "Mast.Caom.Products", {"obsid": "1"})
    client.get("/__twin__/faults")
    stats = client.get("/__twin__/stats").json()
    assert stats == clean_twin.stats()
    assert stats["endpoints"]["download"] == {"requests": 2, "bytes_sent": 100}
    assert stats["endpoints"]["invoke:Mast.Caom.Products"]["requests"] == 1
    assert stats["endpoints"]["invoke"]["bytes_sent"] > 0
    assert stats["total_requests"] == 3
    assert stats["total_bytes_sent"] == sum(
        value["bytes_sent"] for key, value in stats["endpoints"].items() if ":" not in key
    )
    assert client.post("/__twin__/stats/reset").json()["total_requests"] == 0
    assert clean_twin.stats() == {"endpoints": {}, "total_requests": 0, "total_bytes_sent": 0}


def test_sha256_admin_endpoint(client, clean_twin):
    product = public_s3_product(clean_twin)
    answer = client.get("/__twin__/sha256", params={"uri": product.uri}).json()
    assert answer == {
        "uri": product.uri,
        "sha256": clean_twin.catalog.sha256(product.uri),
        "size": product.size,
    }


def test_info_has_exactly_the_promised_keys(clean_twin):
    info = clean_twin.info()
    assert set(info) == {"mast_url", "resolver_url", "s3_endpoint", "bucket"}
    assert info["resolver_url"] == info["mast_url"] + "/Santa-war/query" and info["bucket"] == "stpubdata"


def test_tokens_expire_and_appear_through_the_admin_endpoint(client, clean_twin):
    fresh = "twin0fresh0token00000000000000cc"
    headers = {"Authorization": f"token {fresh}"}
    assert client.get("/whoami", headers=headers).json()["anon"] is True
    assert client.put("/__twin__/tokens", json={"token": fresh, "state": "valid"}).status_code == 200
    assert client.get("/whoami", headers=headers).json()["ezid"] == "twinuser"
    client.put("/__twin__/tokens", json={"token": fresh, "state": "expired"})
    assert client.get("/whoami", headers=headers).json()["anon"] is True
    assert clean_twin.catalog.token_status(fresh) == "expired"
    assert client.put("/__twin__/tokens", json={"token": fresh, "state": "sideways"}).status_code == 400
    client.put("/__twin__/tokens", json={"token": twin_catalog.VALID_TOKEN, "state": "expired"})
    assert client.delete("/__twin__/tokens").status_code == 200
    assert clean_twin.catalog.token_status(twin_catalog.VALID_TOKEN) == "valid"


def test_redirect_and_drip_faults_serve_the_right_bytes(client, clean_twin):
    product = public_s3_product(clean_twin)
    clean_twin.faults.add("download", "redirect", hops=2)
    clean_twin.faults.add("download", "drip", bytes_per_second=200_000)
    response = client.get("/api/v0.1/Download/file", params={"uri": product.uri},
                          headers={"Range": "bytes=10-2009"}, follow_redirects=True)
    assert response.status_code == 206 and response.content == clean_twin.catalog.read(product.uri, 10, 2000)
    assert str(response.url).startswith(clean_twin.second_url)
    assert [r["host"] for r in client.get("/__twin__/requests").json()["requests"]] == \
        ["127.0.0.1", "127.0.0.2", "127.0.0.2"]
    for bad in ({"kind": "redirect", "hops": 0}, {"kind": "redirect", "to": "elsewhere"},
                {"kind": "drip", "bytes_per_second": 0}, {"kind": "drip", "endpoint": "invoke"}):
        assert client.post("/__twin__/faults", json={"endpoint": "download", **bad}).status_code == 400
