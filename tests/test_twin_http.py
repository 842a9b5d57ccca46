"""The twin's HTTP side over real loopback HTTP (httpx): Mashup invoke, paging, filters, EXECUTING,
downloads with ranges and tokens, path_lookup, whoami, resolver, every fault kind, and the counters."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
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
    assert body["paging"]["rowsFiltered"] == 12 == len(body["data"])  # 11 executed + 1 planned
    assert {row["proposal_id"] for row in body["data"]} == {"2733"}
    types = {field["name"]: field["type"] for field in body["fields"]}
    assert types["s_ra"] == "float" and types["calib_level"] == "int" and types["obs_id"] == "string"
    assert twin_catalog.OBS_2733_MIRI_F1130W in {row["obs_id"] for row in body["data"]}


def test_paging_splits_rows_into_pages_that_add_up(client):
    params = {"columns": "*", "filters": [{"paramName": "proposal_id", "values": ["2733"]}]}
    pages = [invoke(client, "Mast.Caom.Filtered", params, pagesize=4, page=page) for page in (1, 2, 3, 4)]
    assert [page["paging"]["rows"] for page in pages] == [4, 4, 4, 0]
    assert all(page["paging"]["pagesFiltered"] == 3 for page in pages)
    assert all(page["paging"]["rowsFiltered"] == 12 and page["paging"]["pageSize"] == 4 for page in pages)
    obs_ids = [row["obs_id"] for page in pages for row in page["data"]]
    assert len(obs_ids) == len(set(obs_ids)) == 12


def test_count_big_answers_one_row(client):
    body = invoke(
        client,
        "Mast.Caom.Filtered",
        {"columns": "COUNT_BIG(*)", "filters": [{"paramName": "proposal_id", "values": ["2733"]}]},
    )
    assert body["data"] == [{"Column1": 12}]


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
    assert third.status_code == 200 and third.json()["data"] == [{"Column1": 12}]


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


# ---- issue 10: the 300,000-product observation, planned observations -----------------------------------


def test_mosaic_products_page_lazily_and_add_up(client, clean_twin):
    rows = clean_twin.catalog.product_rows(twin_catalog.MOSAIC_OBSID)
    params = {"obsid": twin_catalog.MOSAIC_OBSID}
    first = invoke(client, "Mast.Caom.Products", params, pagesize=20_000, page=1)
    last_page = first["paging"]["pagesFiltered"]
    last = invoke(client, "Mast.Caom.Products", params, pagesize=20_000, page=last_page)
    assert first["paging"]["rowsFiltered"] == len(rows) >= 300_000
    assert last_page == -(-len(rows) // 20_000)
    assert len(first["data"]) == 20_000 and len(last["data"]) == len(rows) - 20_000 * (last_page - 1)
    assert first["data"][:3] == rows[:3] and last["data"][-1] == rows[len(rows) - 1]
    assert [field["name"] for field in first["fields"]] == [name for name, _ in twin_catalog.PRODUCT_COLUMNS]
    both = invoke(client, "Mast.Caom.Products", {"obsid": f"{twin_catalog.MOSAIC_OBSID},87600001"},
                  pagesize=10, page=-(-len(rows) // 10))
    assert both["paging"]["rowsFiltered"] == len(rows) + len(clean_twin.catalog.product_rows("87600001"))
    assert both["data"][-1]["parent_obsid"] == "87600001"


def test_mosaic_program_filters_and_counts(client):
    filters = [{"paramName": "proposal_id", "values": [twin_catalog.MOSAIC_PROGRAM]}]
    body = invoke(client, "Mast.Caom.Filtered", {"columns": "*", "filters": filters})
    assert {(row["obs_id"], row["calib_level"]) for row in body["data"]} == {
        (twin_catalog.MOSAIC_OBS_ID, 3), (twin_catalog.PLANNED_MOSAIC_OBS_ID, -1)}
    count = invoke(client, "Mast.Caom.Filtered", {"columns": "COUNT_BIG(*)", "filters": filters})
    assert count["data"] == [{"Column1": 2}]


def test_mosaic_products_download_and_path_lookup(client, clean_twin):
    rows = clean_twin.catalog.product_rows(twin_catalog.MOSAIC_OBSID)
    chosen = [rows[index] for index in (7, 80, 150_000, len(rows) - 1)]
    answer = client.get("/api/v0.1/path_lookup/", params={"uri": [row["dataURI"] for row in chosen]}).json()
    for row in chosen:
        product = clean_twin.catalog.product(row["dataURI"])
        expected = {"status_code": 200, "path": "/" + product.s3_key} if product.s3_key else \
            {"status_code": 404, "path": None}
        assert answer[row["dataURI"]] == expected
    response = client.get(download_url(chosen[2]["dataURI"]), headers={"Range": "bytes=0-2879"})
    assert response.status_code == 206 and response.content == clean_twin.catalog.read(chosen[2]["dataURI"], 0, 2880)


def test_planned_observations_appear_in_program_and_cone_answers(client):
    params = {"columns": "*", "filters": [{"paramName": "proposal_id", "values": [twin_catalog.PROGRAM_2733]}]}
    planned = [row for row in invoke(client, "Mast.Caom.Filtered", params)["data"] if row["calib_level"] == -1]
    assert [row["obs_id"] for row in planned] == [twin_catalog.PLANNED_2733_OBS_ID]
    assert planned[0]["t_obs_release"] == twin_catalog.PLANNED_RELEASE_MJD
    cone = invoke(client, "Mast.Caom.Cone", {"ra": NGC3132[0], "dec": NGC3132[1], "radius": 0.05})
    assert twin_catalog.PLANNED_2733_OBS_ID in {row["obs_id"] for row in cone["data"]}
    products = invoke(client, "Mast.Caom.Products", {"obsid": planned[0]["obsid"]})
    assert products["status"] == "COMPLETE" and products["paging"]["rowsFiltered"] == 0 and products["data"] == []


# ---- issue 10: slow queries, timeouts as answers, the URL limit, rows shifting between pages ----------


def program_request(page: int = 1, breaker: str = "breaker-1", pagesize: int = 4) -> dict:
    return {"service": "Mast.Caom.Filtered",
            "params": {"columns": "*", "filters": [{"paramName": "proposal_id", "values": ["2733"]}]},
            "format": "json", "pagesize": pagesize, "page": page, "cacheBreaker": breaker}


def post(client: httpx.Client, request: dict, **options) -> httpx.Response:
    return client.post("/api/v0/invoke", data={"request": json.dumps(request)}, **options)


def test_slow_query_answers_executing_until_its_time_has_passed(client, clean_twin):
    clean_twin.faults.add("invoke", "slow_query", count=1, seconds=600, shape="executing")
    statuses = [post(client, program_request()).json()["status"] for _ in range(3)]
    assert statuses == ["EXECUTING"] * 3
    # Other pages of the same query (same cacheBreaker) wait for the same clock; other services do not.
    assert post(client, program_request(page=2)).json()["status"] == "EXECUTING"
    assert invoke(client, "Mast.Name.Lookup", {"input": "M101"})["resolvedCoordinate"]
    # count=1: a new query (new cacheBreaker) is not slowed any more.
    assert post(client, program_request(breaker="breaker-2")).json()["status"] == "COMPLETE"
    clean_twin.faults.clear()
    assert post(client, program_request()).json()["status"] == "COMPLETE"


def test_slow_query_completes_once_the_time_has_passed_and_later_pages_come_at_once(client, clean_twin):
    clean_twin.faults.add("invoke", "slow_query", seconds=0.3, shape="executing", match="Mast.Caom.Filtered")
    polls = 0
    while (body := post(client, program_request()).json())["status"] == "EXECUTING":
        polls += 1
        assert polls < 200
        threading.Event().wait(0.05)
    assert polls >= 1 and body["status"] == "COMPLETE" and len(body["data"]) == 4
    assert post(client, program_request(page=2)).json()["status"] == "COMPLETE"
    assert clean_twin.faults.list()[0]["hits"] == 1


def test_slow_query_first_byte_shape_holds_the_response(clean_twin):
    clean_twin.faults.add("invoke", "slow_query", seconds=600, shape="first_byte")
    with httpx.Client(base_url=clean_twin.mast_url, timeout=httpx.Timeout(30, read=0.5)) as impatient:
        with pytest.raises(httpx.ReadTimeout):
            post(impatient, program_request())
    with httpx.Client(base_url=clean_twin.mast_url, timeout=30) as patient:
        answer: list[dict] = []
        waiter = threading.Thread(target=lambda: answer.append(post(patient, program_request()).json()))
        waiter.start()
        waiter.join(0.5)
        assert waiter.is_alive() and not answer  # still held: no first byte yet
        clean_twin.faults.clear()  # releases held queries
        waiter.join(30)
    assert answer and answer[0]["status"] == "COMPLETE"


def test_slow_query_shapes_are_validated(clean_twin):
    with pytest.raises(ValueError):
        clean_twin.faults.add("invoke", "slow_query", shape="sometimes")
    with pytest.raises(ValueError):
        clean_twin.faults.add("download", "slow_query")


def test_error_timeout_answers_error_n_times_then_the_real_answer(client, clean_twin):
    clean_twin.faults.add("invoke", "error_timeout", count=2, match="Mast.Caom.Products")
    params = {"obsid": "87600008"}
    first, second = (invoke(client, "Mast.Caom.Products", params) for _ in range(2))
    assert first["status"] == second["status"] == "ERROR" and "timed out" in first["msg"]
    assert invoke(client, "Mast.Caom.Products", params)["status"] == "COMPLETE"
    clean_twin.faults.add("invoke", "error_timeout", count=1, msg="Request timed out after 600 s")
    assert invoke(client, "Mast.Caom.Products", params)["msg"] == "Request timed out after 600 s"
    # A malformed request stays an ERROR with its own message, every time.
    bad = {"columns": "*", "filters": [{"paramName": "no_such_column", "values": ["x"]}]}
    for _ in range(2):
        answer = invoke(client, "Mast.Caom.Filtered", bad)
        assert answer["status"] == "ERROR" and "timed out" not in answer["msg"]


def path_lookup_uris(twin, count: int) -> list[str]:
    """``count`` consecutive member-exposure dataURIs of the mosaic observation (typical JWST length)."""
    rows = twin.catalog.product_rows(twin_catalog.MOSAIC_OBSID)
    return [row["dataURI"] for row in rows[7 : 7 + count]]


def test_url_limit_refuses_path_lookup_of_50_uris_and_answers_40(client, clean_twin):
    assert clean_twin.max_url_length == 3400
    forty, fifty = path_lookup_uris(clean_twin, 40), path_lookup_uris(clean_twin, 50)
    ok = client.get("/api/v0.1/path_lookup/", params=[("uri", uri) for uri in forty] + [("use_cloud_path", "True")])
    assert ok.status_code == 200 and set(ok.json()) == set(forty)
    too_long = client.get("/api/v0.1/path_lookup/", params=[("uri", uri) for uri in fifty])
    assert too_long.status_code == 414 and "414 Request-URI Too Large" in too_long.text
    # The 40 longest JWST uris of the catalog pass too.
    longest = sorted((p.uri for p in clean_twin.catalog.products() if p.uri.startswith("mast:JWST")), key=len)[-40:]
    assert client.get("/api/v0.1/path_lookup/",
                      params=[("uri", uri) for uri in longest] + [("use_cloud_path", "True")]).status_code == 200
    endpoints = clean_twin.stats()["endpoints"]
    assert endpoints["path_lookup"]["requests"] == 3


def test_url_limit_is_switchable(client, clean_twin):
    fifty = path_lookup_uris(clean_twin, 50)
    try:
        assert client.put("/__twin__/limits", json={"max_url_length": 0}).json() == {"max_url_length": 0}
        assert client.get("/api/v0.1/path_lookup/", params=[("uri", uri) for uri in fifty]).status_code == 200
        client.put("/__twin__/limits", json={"max_url_length": 100})
        assert client.get("/whoami?" + "x" * 100).status_code == 414
        assert client.put("/__twin__/limits", json={"max_url_length": -1}).status_code == 400
        assert client.get("/__twin__/limits").json() == {"max_url_length": 100}
    finally:
        clean_twin.max_url_length = 3400


def test_page_shift_insert_repeats_a_row_and_loses_another(client, clean_twin):
    expected = [row["obs_id"] for row in invoke(client, "Mast.Caom.Filtered", program_request()["params"])["data"]]
    clean_twin.faults.add("invoke", "page_shift", mode="insert")
    first = post(client, program_request(page=1)).json()
    pages = [first] + [post(client, program_request(page=page)).json()
                       for page in range(2, first["paging"]["pagesFiltered"] + 1)]
    seen = [row["obs_id"] for page in pages for row in page["data"]]
    assert first["paging"]["rowsFiltered"] == len(seen) == len(expected) == 12
    assert pages[1]["data"][0] == first["data"][-1]  # page 2 repeats page 1's last row
    assert set(expected) - set(seen) == {expected[-1]}  # ... and the last row is never seen
    assert pages[1]["paging"]["rowsFiltered"] == 13  # the later pages announce one row more
    assert clean_twin.faults.list()[0]["hits"] == 2  # page 1 is never shifted


def test_page_shift_drop_loses_a_page_and_counts_down(client, clean_twin):
    clean_twin.faults.add("invoke", "page_shift", count=1, mode="drop")
    pages = [post(client, program_request(page=page)).json() for page in (1, 2, 3)]
    assert [page["paging"]["rows"] for page in pages] == [4, 0, 4]
    assert all(page["paging"]["rowsFiltered"] == 12 for page in pages)
    assert sum(len(page["data"]) for page in pages) == 8
    assert len(post(client, program_request(page=2)).json()["data"]) == 4  # count exhausted
    with pytest.raises(ValueError):
        clean_twin.faults.add("invoke", "page_shift", mode="sideways")


def test_page_shift_on_the_mosaic_product_pages(client, clean_twin):
    rows = clean_twin.catalog.product_rows(twin_catalog.MOSAIC_OBSID)
    clean_twin.faults.add("invoke", "page_shift", count=1, mode="insert")
    request = {"service": "Mast.Caom.Products", "params": {"obsid": twin_catalog.MOSAIC_OBSID}, "format": "json",
               "pagesize": 1000, "page": 2, "cacheBreaker": "b"}
    body = post(client, request).json()
    assert body["data"][0] == rows[999] and body["paging"]["rowsFiltered"] == len(rows) + 1


def test_new_faults_are_reachable_over_http(client, clean_twin):
    specs = [{"endpoint": "invoke", "kind": "slow_query", "seconds": 90, "shape": "first_byte", "count": 1},
             {"endpoint": "invoke", "kind": "error_timeout", "count": 3},
             {"endpoint": "invoke", "kind": "page_shift", "params": {"mode": "drop"}}]
    answer = client.post("/__twin__/faults", json=specs).json()
    assert [fault["kind"] for fault in answer["added"]] == ["slow_query", "error_timeout", "page_shift"]
    assert answer["added"][2]["params"] == {"mode": "drop"}
    assert client.post("/__twin__/faults", json={"endpoint": "invoke", "kind": "slow_query",
                                                 "shape": "never"}).status_code == 400


def test_twin_serve_flags_set_query_time_shape_and_url_limit():
    process = subprocess.Popen(
        [sys.executable, "-m", "mastfs", "twin", "serve", "--scale", "0.001", "--query-seconds", "600",
         "--query-shape", "first_byte", "--max-url-length", "120"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        info = json.loads(process.stdout.readline())
        assert set(info) == {"mast_url", "resolver_url", "s3_endpoint", "bucket"}
        with httpx.Client(base_url=info["mast_url"], timeout=30) as http:
            (fault,) = http.get("/__twin__/faults").json()["faults"]
            assert (fault["kind"], fault["params"]) == ("slow_query", {"seconds": 600.0, "shape": "first_byte"})
            assert http.get("/__twin__/limits").json() == {"max_url_length": 120}
            assert http.get("/whoami?" + "x" * 120).status_code == 414
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        process.stdout.close()
    refused = subprocess.run([sys.executable, "-m", "mastfs", "twin", "serve", "--max-url-length", "-5"],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "--max-url-length" in refused.stderr


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
