"""The twin's link: first-byte latency and per-connection bandwidth of product bodies (S3 GetObject and
HTTPS downloads), set by `mastfs twin serve --first-byte-ms --stream-mb-s` or ``PUT /__twin__/link``.
Only lower bounds of time are asserted (a paced body can never arrive early); the bytes stay exact."""

from __future__ import annotations

import hashlib
import http.client
import subprocess
import sys
import time

import httpx
import pytest
from test_twin_s3 import s3_client

from mastfs.twin.link import S3_LIKE, Link


def test_pace_keeps_every_piece_in_order_and_takes_at_least_the_link_time():
    link = Link(first_byte_ms=50, stream_mb_s=1)
    pieces = [bytes([n]) * 100_000 for n in range(3)]
    began = time.monotonic()
    assert list(link.pace(iter(pieces))) == pieces
    assert time.monotonic() - began >= 0.05 + 0.3 - 0.01  # first byte + 300 kB at 1 MB/s


def test_loopback_link_passes_pieces_through():
    pieces = [b"a", b"bc"]
    assert list(Link().pace(iter(pieces))) == pieces
    assert Link().to_json() == {"first_byte_ms": 0.0, "stream_mb_s": 0.0, "metadata_ms": 0.0}


@pytest.mark.parametrize("first_byte_ms, stream_mb_s, metadata_ms",
                         [(-1, 0, None), (0, -5, None), (float("nan"), 0, None), (0, 0, -1)])
def test_a_negative_or_nan_link_is_refused(first_byte_ms, stream_mb_s, metadata_ms):
    with pytest.raises(ValueError):
        Link(first_byte_ms, stream_mb_s, metadata_ms)


def test_the_s3_like_link_is_the_documented_one():
    assert S3_LIKE == {"first_byte_ms": 30.0, "stream_mb_s": 90.0}


def test_admin_endpoint_sets_and_reports_the_link(clean_twin):
    with httpx.Client(base_url=clean_twin.mast_url, timeout=30) as client:
        assert client.get("/__twin__/link").json() == {"first_byte_ms": 0.0, "stream_mb_s": 0.0, "metadata_ms": 0.0}
        answer = client.put("/__twin__/link", json={"first_byte_ms": 25, "stream_mb_s": 90})
        assert answer.status_code == 200
        assert answer.json() == {"first_byte_ms": 25.0, "stream_mb_s": 90.0, "metadata_ms": 25.0}
        assert clean_twin.link.to_json() == answer.json()
        refused = client.put("/__twin__/link", json={"first_byte_ms": -3})
        assert refused.status_code == 400 and "first_byte_ms" in refused.json()["error"]
        assert client.put("/__twin__/link", content=b"[1, 2]").status_code == 400
        assert clean_twin.link.to_json() == {"first_byte_ms": 25.0, "stream_mb_s": 90.0, "metadata_ms": 25.0}
        answer = client.put("/__twin__/link", json={"first_byte_ms": 25, "stream_mb_s": 90, "metadata_ms": 5})
        assert answer.json() == {"first_byte_ms": 25.0, "stream_mb_s": 90.0, "metadata_ms": 5.0}


def _public_s3_product(twin):
    return next(p for p in twin.catalog.products() if p.s3_key and not p.exclusive and p.size > 500_000)


def test_s3_bodies_are_paced_and_exact(clean_twin):
    product = _public_s3_product(clean_twin)
    clean_twin.link.set(first_byte_ms=300, stream_mb_s=0)
    began = time.monotonic()
    body = s3_client(clean_twin).get_object(Bucket=clean_twin.bucket, Key=product.s3_key)["Body"].read()
    assert time.monotonic() - began >= 0.3
    assert hashlib.sha256(body).hexdigest() == clean_twin.catalog.sha256(product.uri)


def test_https_downloads_are_paced_by_bandwidth_and_exact(clean_twin):
    product = _public_s3_product(clean_twin)
    clean_twin.link.set(first_byte_ms=0, stream_mb_s=2)  # 2 MB/s: at least size / 2e6 seconds
    began = time.monotonic()
    with httpx.Client(base_url=clean_twin.mast_url, timeout=60) as client:
        answer = client.get("/api/v0.1/Download/file", params={"uri": product.uri})
    assert answer.status_code == 200
    assert time.monotonic() - began >= product.size / 2e6 - 0.01
    assert hashlib.sha256(answer.content).hexdigest() == clean_twin.catalog.sha256(product.uri)


def test_twin_serve_refuses_a_negative_link():
    result = subprocess.run([sys.executable, "-m", "mastfs", "twin", "serve", "--stream-mb-s", "-1"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "stream_mb_s" in result.stderr


def test_metadata_answers_wait_for_the_metadata_latency_on_both_servers(clean_twin):
    product = _public_s3_product(clean_twin)
    s3 = s3_client(clean_twin)
    s3.head_object(Bucket=clean_twin.bucket, Key=product.s3_key)  # connection open and key registered
    clean_twin.link.set(first_byte_ms=0, stream_mb_s=0, metadata_ms=250)
    timings = {}
    with httpx.Client(base_url=clean_twin.mast_url, timeout=30) as client:
        for name, call in {
            "s3 head": lambda: s3.head_object(Bucket=clean_twin.bucket, Key=product.s3_key),
            "s3 list": lambda: s3.list_objects_v2(Bucket=clean_twin.bucket, Prefix=product.s3_key, MaxKeys=1),
            "path_lookup": lambda: client.get("/api/v0.1/path_lookup/", params={"uri": product.uri}),
            "download head": lambda: client.head("/api/v0.1/Download/file", params={"uri": product.uri}),
        }.items():
            began = time.monotonic()
            call()
            timings[name] = time.monotonic() - began
    assert all(seconds >= 0.25 for seconds in timings.values()), timings


def test_s3_keeps_the_connection_alive_between_requests(clean_twin):
    product = _public_s3_product(clean_twin)
    host, port = clean_twin.s3_endpoint.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        bodies = []
        for start in (0, 100):
            connection.request("GET", f"/{clean_twin.bucket}/{product.s3_key}",
                               headers={"Range": f"bytes={start}-{start + 99}"})
            response = connection.getresponse()
            bodies.append(response.read())
            assert response.status == 206 and response.getheader("Connection") != "close"
            if start == 0:
                first_socket = connection.sock
                connection.request("HEAD", f"/{clean_twin.bucket}/{product.s3_key}")
                head = connection.getresponse()
                head.read()
                assert head.status == 200 and connection.sock is first_socket
        assert connection.sock is first_socket  # one connection served all three requests
        assert b"".join(bodies) == clean_twin.catalog.read(product.uri, 0, 200)
    finally:
        connection.close()
