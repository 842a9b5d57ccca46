"""The twin's S3 side through boto3 (anonymous, unsigned) on loopback: objects, ranges, listing, lazy
catalog-backed keys, absent keys, read-only bucket, conditionals, every S3 fault kind, and counters."""

from __future__ import annotations

import hashlib
import threading

import boto3
import botocore.exceptions
import pytest
from boto3.s3.transfer import TransferConfig
from botocore import UNSIGNED
from botocore.config import Config

from mastfs.twin import catalog as twin_catalog
from mastfs.twin.s3 import LazyCatalogKey, naive_utc


def s3_client(twin, **config):
    return boto3.client(
        "s3",
        endpoint_url=twin.s3_endpoint,
        region_name="us-east-1",
        config=Config(signature_version=UNSIGNED, retries={"total_max_attempts": 1}, **config),
    )


@pytest.fixture
def s3(clean_twin):
    return s3_client(clean_twin)


def cloud_products(twin, min_size: int = 0):
    return [product for product in twin.catalog.products() if product.s3_key and product.size >= min_size]


@pytest.fixture
def product(clean_twin):
    return cloud_products(clean_twin, min_size=20_000)[0]


def test_head_object_reports_catalog_size_etag_and_date(s3, clean_twin, product):
    head = s3.head_object(Bucket="stpubdata", Key=product.s3_key)
    assert head["ContentLength"] == product.size
    assert head["ETag"] == clean_twin.catalog.etag(product.uri, "s3")
    assert int(head["LastModified"].timestamp()) == int(product.mtime)
    assert head["AcceptRanges"] == "bytes"


def test_get_object_streams_the_catalog_bytes(s3, clean_twin, product):
    body = s3.get_object(Bucket="stpubdata", Key=product.s3_key)["Body"].read()
    assert hashlib.sha256(body).hexdigest() == clean_twin.catalog.sha256(product.uri)


@pytest.mark.parametrize("header", ["bytes=1000-3879", "bytes=-2880", "bytes=5000-"])
def test_ranged_get_object(s3, clean_twin, product, header):
    size = product.size
    spec = header.split("=")[1]
    first, _, last = spec.partition("-")
    if not first:
        start, end = size - int(last), size - 1
    else:
        start, end = int(first), int(last) if last else size - 1
    answer = s3.get_object(Bucket="stpubdata", Key=product.s3_key, Range=header)
    assert answer["ContentRange"] == f"bytes {start}-{end}/{size}"
    assert answer["Body"].read() == clean_twin.catalog.read(product.uri, start, end - start + 1)


def test_unsatisfiable_range_is_invalid_range(s3, product):
    with pytest.raises(botocore.exceptions.ClientError) as caught:
        s3.get_object(Bucket="stpubdata", Key=product.s3_key, Range=f"bytes={product.size}-")
    assert caught.value.response["Error"]["Code"] == "InvalidRange"


def test_list_objects_v2_lists_exactly_the_cloud_keys_under_a_prefix(s3, clean_twin):
    prefix = f"jwst/public/jw0{twin_catalog.PROGRAM_2733}/"
    expected = {
        product.s3_key: product.size
        for product in cloud_products(clean_twin)
        if product.s3_key.startswith(prefix)
    }
    listed: dict[str, int] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket="stpubdata", Prefix=prefix):
        listed.update({item["Key"]: item["Size"] for item in page.get("Contents", [])})
    assert expected and listed == expected


def test_products_without_s3_key_are_absent(s3, clean_twin):
    http_only = clean_twin.catalog.product(twin_catalog.HTTP_ONLY_URI)
    assert http_only.s3_key is None
    sibling = next(p for p in cloud_products(clean_twin) if p.filename.endswith("_rate.fits"))
    guessed_key = sibling.s3_key.rsplit("/", 1)[0] + "/" + http_only.filename
    with pytest.raises(botocore.exceptions.ClientError) as caught:
        s3.head_object(Bucket="stpubdata", Key=guessed_key)
    assert caught.value.response["Error"]["Code"] == "404"
    with pytest.raises(s3.exceptions.NoSuchKey):
        s3.get_object(Bucket="stpubdata", Key=guessed_key)


def test_download_file_with_parallel_parts(s3, clean_twin, tmp_path):
    product = max(cloud_products(clean_twin), key=lambda p: p.size)
    target = tmp_path / product.filename
    part = max(5 * 1024 * 1024, product.size // 4)
    config = TransferConfig(multipart_threshold=part, multipart_chunksize=part, max_concurrency=4)
    s3.download_file("stpubdata", product.s3_key, str(target), Config=config)
    assert hashlib.sha256(target.read_bytes()).hexdigest() == clean_twin.catalog.sha256(product.uri)


def test_conditional_get(s3, clean_twin, product):
    etag = clean_twin.catalog.etag(product.uri, "s3")
    assert (
        s3.get_object(Bucket="stpubdata", Key=product.s3_key, IfMatch=etag, Range="bytes=0-9")[
            "ContentLength"
        ]
        == 10
    )
    with pytest.raises(botocore.exceptions.ClientError) as caught:
        s3.get_object(Bucket="stpubdata", Key=product.s3_key, IfMatch='"0000"')
    assert caught.value.response["Error"]["Code"] == "PreconditionFailed"


def test_bucket_is_read_only(s3, product):
    with pytest.raises(botocore.exceptions.ClientError) as caught:
        s3.put_object(Bucket="stpubdata", Key=product.s3_key, Body=b"x")
    assert caught.value.response["Error"]["Code"] == "AccessDenied"
    with pytest.raises(botocore.exceptions.ClientError):
        s3.delete_object(Bucket="stpubdata", Key=product.s3_key)
    assert s3.head_object(Bucket="stpubdata", Key=product.s3_key)["ContentLength"] == product.size


def test_lazy_key_takes_metadata_from_the_catalog_without_reading_bytes(clean_twin, product):
    reads: list[tuple] = []

    class ReadCountingCatalog:
        def __getattr__(self, name):
            return getattr(clean_twin.catalog, name)

        def read(self, *args, **kwargs):
            reads.append(args)
            return clean_twin.catalog.read(*args, **kwargs)

    key = LazyCatalogKey(product, ReadCountingCatalog(), "123456789012", owner="test")
    assert (key.size, key.etag, key.name) == (product.size, clean_twin.catalog.etag(product.uri, "s3"), product.s3_key)
    assert key.last_modified == naive_utc(product.mtime)
    assert reads == []
    assert hashlib.sha256(key.value).hexdigest() == clean_twin.catalog.sha256(product.uri)
    key.dispose()


# ---- faults -------------------------------------------------------------------------------------------


def test_status_fault_answers_s3_xml_errors(s3, clean_twin, product):
    clean_twin.faults.add("s3", "status", count=1, code=503)
    with pytest.raises(botocore.exceptions.ClientError) as caught:
        s3.get_object(Bucket="stpubdata", Key=product.s3_key)
    assert caught.value.response["Error"]["Code"] == "SlowDown"
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    assert s3.get_object(Bucket="stpubdata", Key=product.s3_key)["ContentLength"] == product.size


def test_html_504_and_unauthorized_faults(s3, clean_twin, product):
    clean_twin.faults.add("s3", "html_504", count=1)
    clean_twin.faults.add("s3", "unauthorized", count=1)
    with pytest.raises(botocore.exceptions.ClientError) as first:
        s3.head_object(Bucket="stpubdata", Key=product.s3_key)
    assert first.value.response["ResponseMetadata"]["HTTPStatusCode"] == 504
    with pytest.raises(botocore.exceptions.ClientError) as second:
        s3.get_object(Bucket="stpubdata", Key=product.s3_key)
    assert second.value.response["Error"]["Code"] == "AccessDenied"


def test_reset_fault_breaks_the_body_and_counts_only_sent_bytes(s3, clean_twin, product):
    clean_twin.faults.add("s3", "reset", count=1, match=product.s3_key, after_bytes=4096)
    with pytest.raises((botocore.exceptions.ResponseStreamingError, botocore.exceptions.ConnectionError)):
        s3.get_object(Bucket="stpubdata", Key=product.s3_key)["Body"].read()
    assert clean_twin.stats()["endpoints"]["s3:GetObject"]["bytes_sent"] == 4096


def test_truncate_fault_is_detected_as_incomplete(s3, clean_twin, product):
    clean_twin.faults.add("s3", "truncate", count=1)
    with pytest.raises((botocore.exceptions.IncompleteReadError, botocore.exceptions.ResponseStreamingError)):
        s3.get_object(Bucket="stpubdata", Key=product.s3_key)["Body"].read()


def test_range_faults(s3, clean_twin, product):
    clean_twin.faults.add("s3", "wrong_range", count=1)
    wrong = s3.get_object(Bucket="stpubdata", Key=product.s3_key, Range="bytes=0-2879")
    assert wrong["ContentRange"] != f"bytes 0-2879/{product.size}"
    clean_twin.faults.add("s3", "ignore_range", count=1)
    ignored = s3.get_object(Bucket="stpubdata", Key=product.s3_key, Range="bytes=0-2879")
    assert "ContentRange" not in ignored and len(ignored["Body"].read()) == product.size


def test_stall_fault_blocks_only_the_stalled_request(clean_twin, product):
    clean_twin.faults.add("s3", "stall", count=1, match=product.s3_key)
    outcome: list[BaseException] = []

    def stalled() -> None:
        try:
            s3_client(clean_twin, read_timeout=30).head_object(Bucket="stpubdata", Key=product.s3_key)
        except botocore.exceptions.BotoCoreError as exc:
            outcome.append(exc)
        except botocore.exceptions.ClientError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=stalled)
    thread.start()
    other = cloud_products(clean_twin)[-1]
    assert (
        s3_client(clean_twin).head_object(Bucket="stpubdata", Key=other.s3_key)["ContentLength"] == other.size
    )
    thread.join(timeout=0.5)
    assert thread.is_alive()
    clean_twin.faults.clear()
    thread.join(timeout=10)
    assert not thread.is_alive() and len(outcome) == 1


def test_latency_fault_only_delays(s3, clean_twin, product):
    fault = clean_twin.faults.add("s3", "latency", count=1, seconds=0.05)
    assert s3.head_object(Bucket="stpubdata", Key=product.s3_key)["ContentLength"] == product.size
    assert fault.hits == 1


# ---- counters -----------------------------------------------------------------------------------------


def test_s3_counters_per_operation(s3, clean_twin, product):
    s3.head_object(Bucket="stpubdata", Key=product.s3_key)
    s3.get_object(Bucket="stpubdata", Key=product.s3_key, Range="bytes=0-2879")["Body"].read()
    s3.list_objects_v2(Bucket="stpubdata", Prefix="hst/", MaxKeys=5)
    endpoints = clean_twin.stats()["endpoints"]
    assert endpoints["s3"]["requests"] == 3
    assert endpoints["s3:HeadObject"] == {"requests": 1, "bytes_sent": 0}
    assert endpoints["s3:GetObject"] == {"requests": 1, "bytes_sent": 2880}
    assert endpoints["s3:ListObjectsV2"]["requests"] == 1 and endpoints["s3:ListObjectsV2"]["bytes_sent"] > 0
    assert endpoints["s3"]["bytes_sent"] == 2880 + endpoints["s3:ListObjectsV2"]["bytes_sent"]


def test_mosaic_keys_are_served_without_entering_moto(s3, clean_twin):
    rows = clean_twin.catalog.product_rows(twin_catalog.MOSAIC_OBSID)
    product = clean_twin.catalog.product(rows[200_000]["dataURI"])
    if product.s3_key is None:
        product = clean_twin.catalog.product(rows[200_001]["dataURI"])
    head = s3.head_object(Bucket="stpubdata", Key=product.s3_key)
    assert head["ContentLength"] == product.size and head["ETag"] == clean_twin.catalog.etag(product.uri, "s3")
    body = s3.get_object(Bucket="stpubdata", Key=product.s3_key, Range="bytes=2880-5759")["Body"].read()
    assert body == clean_twin.catalog.read(product.uri, 2880, 2880)
    assert not any(isinstance(key, LazyCatalogKey) and key.product == product
                   for key in LazyCatalogKey.instances_tracked)
    http_only = next(clean_twin.catalog.product(row["dataURI"]) for row in rows[2000:2100]
                     if clean_twin.catalog.product(row["dataURI"]).s3_key is None)
    missing_key = f"jwst/public/jw01727/jw01727001001/{http_only.filename}"
    with pytest.raises(botocore.exceptions.ClientError):
        s3.head_object(Bucket="stpubdata", Key=missing_key)


def test_listing_one_mosaic_visit_folder_lists_its_generated_keys(s3, clean_twin):
    prefix = "jwst/public/jw01727/jw01727001004/"
    expected = clean_twin.catalog.lazy_s3_keys(prefix, 10_000)
    listed = [item["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket="stpubdata", Prefix=prefix)
              for item in page.get("Contents", [])]
    assert listed == expected and len(listed) > 1500
