"""The twin's versions: real S3 ETags, reprocessing (both copies or one), HTTPS validators and
conditionals, sizes misreported by rows, dynamic products, and the wrong_body fault."""

from __future__ import annotations

import hashlib

import boto3
import botocore.exceptions
import httpx
import pytest
from botocore import UNSIGNED
from botocore.config import Config

from mastfs.twin import catalog as twin_catalog

MIRI_CAL = "mast:JWST/product/jw02733002001_02101_00001_mirimage_cal.fits"



@pytest.fixture
def s3(own_twin):
    return boto3.client("s3", endpoint_url=own_twin.s3_endpoint, region_name="us-east-1",
                        config=Config(signature_version=UNSIGNED, retries={"total_max_attempts": 1}))


@pytest.fixture
def http(own_twin):
    own_twin.faults.clear()
    with httpx.Client(base_url=own_twin.mast_url, timeout=30) as client:
        yield client
    own_twin.faults.clear()


def download(http: httpx.Client, uri: str, **headers: str) -> httpx.Response:
    return http.get("/api/v0.1/Download/file", params={"uri": uri}, headers=headers)


def test_single_part_etag_is_the_content_md5_on_both_copies(own_twin, s3, http):
    product = own_twin.catalog.product(MIRI_CAL)
    assert product.size <= twin_catalog.MULTIPART_THRESHOLD
    body = s3.get_object(Bucket="stpubdata", Key=product.s3_key)
    data = body["Body"].read()
    # what rclone checks after a full download
    assert body["ETag"] == '"' + hashlib.md5(data).hexdigest() + '"'
    assert download(http, MIRI_CAL).headers["ETag"] == body["ETag"]


def test_multipart_etag_is_the_md5_of_part_md5s():
    part = twin_catalog.MULTIPART_PART_SIZE
    data = bytes(range(256)) * ((2 * part + 1000) // 256)
    parts = [hashlib.md5(data[i:i + part]).digest() for i in range(0, len(data), part)]
    expected = hashlib.md5(b"".join(parts)).hexdigest() + "-3"
    assert twin_catalog.s3_etag(parts, len(data)) == f'"{expected}"'
    assert twin_catalog.s3_etag(parts[:1], part) == '"' + parts[0].hex() + '"'


def test_a_large_object_has_the_multipart_etag_of_its_bytes_on_both_copies(own_twin, s3, http):
    uri = "mast:JWST/product/jw02733002001_02101_00004_mirimage_cal.fits"
    part = twin_catalog.MULTIPART_PART_SIZE
    resize = -(-2 * part // 2880) * 2880  # a valid FITS size of three parts
    answer = http.post("/__twin__/reprocess", json={"uri": uri, "resize": resize}).json()
    key = own_twin.catalog.product(uri).s3_key
    body = s3.get_object(Bucket="stpubdata", Key=key)
    data = body["Body"].read()
    assert len(data) == answer["s3"]["size"] > 2 * part
    parts = [hashlib.md5(data[i:i + part]).digest() for i in range(0, len(data), part)]
    expected = f'"{hashlib.md5(b"".join(parts)).hexdigest()}-3"'
    assert body["ETag"] == s3.head_object(Bucket="stpubdata", Key=key)["ETag"] == answer["s3"]["etag"] == expected
    got = download(http, uri)
    assert got.content == data and got.headers["ETag"] == expected
    listed = s3.list_objects_v2(Bucket="stpubdata", Prefix=key)["Contents"]
    assert [item["ETag"] for item in listed] == [expected]


def test_a_listing_states_the_etag_a_request_computed_and_a_multipart_form_before(own_twin, s3):
    key = own_twin.catalog.product("mast:JWST/product/jw02733002001_02101_00005_mirimage_cal.fits").s3_key
    before = s3.list_objects_v2(Bucket="stpubdata", Prefix=key)["Contents"][0]["ETag"]
    assert before.endswith('-1"')  # what S3 states for an object uploaded as one multipart part
    head = s3.head_object(Bucket="stpubdata", Key=key)["ETag"]
    assert "-" not in head and head != before
    assert s3.list_objects_v2(Bucket="stpubdata", Prefix=key)["Contents"][0]["ETag"] == head


def test_reprocessing_both_copies_changes_bytes_etag_and_date(own_twin, s3, http):
    uri = "mast:JWST/product/jw02733002001_02101_00002_mirimage_cal.fits"
    before = own_twin.catalog.describe(uri)
    answer = http.post("/__twin__/reprocess", json={"uri": uri}).json()
    assert answer["http"]["revision"] == answer["s3"]["revision"] == 1
    for copy in ("http", "s3"):
        assert answer[copy]["etag"] != before[copy]["etag"]
        assert answer[copy]["sha256"] != before[copy]["sha256"]
        assert answer[copy]["mtime"] > before[copy]["mtime"]
        assert answer[copy]["size"] == before[copy]["size"]
    got = download(http, uri)
    assert hashlib.sha256(got.content).hexdigest() == answer["http"]["sha256"]
    assert got.headers["ETag"] == answer["http"]["etag"]
    s3_body = s3.get_object(Bucket="stpubdata", Key=own_twin.catalog.product(uri).s3_key)
    assert s3_body["ETag"] == answer["s3"]["etag"]
    assert hashlib.sha256(s3_body["Body"].read()).hexdigest() == answer["s3"]["sha256"]


def test_reprocessing_one_copy_leaves_the_other_lagging_and_can_resize(own_twin, s3, http):
    uri = "mast:JWST/product/jw02733002001_02101_00003_mirimage_cal.fits"
    before = own_twin.catalog.describe(uri)
    answer = http.post("/__twin__/reprocess", json={"uri": uri, "copies": "http", "resize": 2880}).json()
    assert answer["s3"] == before["s3"]
    assert answer["http"]["size"] == before["http"]["size"] + 2880
    head = s3.head_object(Bucket="stpubdata", Key=own_twin.catalog.product(uri).s3_key)
    assert (head["ETag"], head["ContentLength"]) == (before["s3"]["etag"], before["s3"]["size"])
    assert len(download(http, uri).content) == answer["http"]["size"]
    assert http.post("/__twin__/reprocess", json={"uri": uri, "copies": "sideways"}).status_code == 400
    assert http.post("/__twin__/reprocess", json={"uri": "mast:JWST/product/nope.fits"}).status_code == 404


def test_https_conditionals_follow_rfc_9110(own_twin, http):
    etag = download(http, MIRI_CAL, Range="bytes=0-9").headers["ETag"]
    assert download(http, MIRI_CAL, Range="bytes=0-9", **{"If-Match": etag}).status_code == 206
    assert download(http, MIRI_CAL, Range="bytes=0-9", **{"If-Match": '"other"'}).status_code == 412
    assert download(http, MIRI_CAL, Range="bytes=0-9", **{"If-Range": etag}).status_code == 206
    changed = download(http, MIRI_CAL, Range="bytes=0-9", **{"If-Range": '"other"'})
    assert changed.status_code == 200 and len(changed.content) == own_twin.catalog.product(MIRI_CAL).size


def test_wrong_body_fault_keeps_the_content_range_but_sends_other_bytes(own_twin, http):
    own_twin.faults.add("download", "wrong_body", count=1, match=MIRI_CAL)
    bad = download(http, MIRI_CAL, Range="bytes=2880-5759")
    assert bad.status_code == 206 and bad.headers["Content-Range"].startswith("bytes 2880-5759/")
    assert bad.content == own_twin.catalog.read(MIRI_CAL, 5760, 2880)
    good = download(http, MIRI_CAL, Range="bytes=2880-5759")
    assert good.content == own_twin.catalog.read(MIRI_CAL, 2880, 2880)


def test_rows_can_misstate_sizes_and_products_can_be_dynamic(own_twin, s3, http):
    rows = own_twin.catalog.product_rows
    obsid = next(r["obsid"] for r in own_twin.catalog.observation_rows()
                 if r["obs_id"] == twin_catalog.OBS_2733_MIRI_F1130W)
    cal = sorted({r["dataURI"] for r in rows(obsid) if r["dataURI"].endswith("_cal.fits")} - {MIRI_CAL})
    uri, other = cal[-1], cal[0]
    s3_key = own_twin.catalog.product(other).s3_key
    true_size = own_twin.catalog.product(uri).size
    assert http.post("/__twin__/product", json={"uri": uri, "size_error": -100}).status_code == 200
    assert http.post("/__twin__/product", json={"uri": other, "dynamic": True}).status_code == 200
    by_uri = {row["dataURI"]: row for row in rows(obsid)}
    assert by_uri[uri]["size"] == true_size - 100
    assert by_uri[other]["size"] is None
    plain = download(http, other, Range="bytes=0-0")
    assert plain.status_code == 200 and "Content-Length" not in plain.headers
    assert len(plain.content) == own_twin.catalog.product(other).size
    lookup = http.get("/api/v0.1/path_lookup/", params={"uri": other}).json()
    assert lookup[other]["status_code"] == 404
    with pytest.raises(botocore.exceptions.ClientError, match="NoSuchKey"):
        s3.get_object(Bucket="stpubdata", Key=s3_key)
