"""The twin's link: first-byte latency and per-connection bandwidth of product bodies (S3 GetObject and
HTTPS downloads), set by `mastfs twin serve --first-byte-ms --stream-mb-s` or ``PUT /__twin__/link``.
Only lower bounds of time are asserted (a paced body can never arrive early); the bytes stay exact."""

from __future__ import annotations

import hashlib
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
    assert Link().to_json() == {"first_byte_ms": 0.0, "stream_mb_s": 0.0}


@pytest.mark.parametrize("first_byte_ms, stream_mb_s", [(-1, 0), (0, -5), (float("nan"), 0)])
def test_a_negative_or_nan_link_is_refused(first_byte_ms, stream_mb_s):
    with pytest.raises(ValueError):
        Link(first_byte_ms, stream_mb_s)


def test_the_s3_like_link_is_the_documented_one():
    assert S3_LIKE == {"first_byte_ms": 30.0, "stream_mb_s": 90.0}


def test_admin_endpoint_sets_and_reports_the_link(clean_twin):
    with httpx.Client(base_url=clean_twin.mast_url, timeout=30) as client:
        assert client.get("/__twin__/link").json() == {"first_byte_ms": 0.0, "stream_mb_s": 0.0}
        answer = client.put("/__twin__/link", json={"first_byte_ms": 25, "stream_mb_s": 90})
        assert answer.status_code == 200 and answer.json() == {"first_byte_ms": 25.0, "stream_mb_s": 90.0}
        assert clean_twin.link.to_json() == answer.json()
        refused = client.put("/__twin__/link", json={"first_byte_ms": -3})
        assert refused.status_code == 400 and "first_byte_ms" in refused.json()["error"]
        assert client.put("/__twin__/link", content=b"[1, 2]").status_code == 400
        assert clean_twin.link.to_json() == {"first_byte_ms": 25.0, "stream_mb_s": 90.0}


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
