"""Benchmark: a ranged S3 GET of 2,880 bytes costs the same from a >= 1 GiB object as from a ~1 MiB one.

Starts the MAST twin at scale 1 (real file sizes) in-process, then times boto3 (anonymous, unsigned)
``get_object(Range="bytes=a-b")`` reads of one FITS block at random block-aligned offsets of each object
and prints a markdown table of the medians and the big/small ratio. Stock moto materialises the whole
object on every GET (about 0.7 s for 2,880 bytes of 1 GiB); the twin's gateway streams only the range.

Usage: .venv/bin/python bench/bench_twin_s3_range.py [--runs N]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import boto3
from botocore import UNSIGNED
from botocore.config import Config

from mastfs.twin import catalog as twin_catalog
from mastfs.twin.server import Twin

BLOCK = 2880


def timed_range_reads(s3, key: str, size: int, runs: int, rng: random.Random) -> list[float]:
    """Seconds per ranged GET of one 2,880-byte block at ``runs`` random block offsets of ``key``."""
    timings = []
    for _ in range(runs):
        start = rng.randrange(0, size // BLOCK) * BLOCK
        began = time.perf_counter()
        body = s3.get_object(Bucket="stpubdata", Key=key, Range=f"bytes={start}-{start + BLOCK - 1}")[
            "Body"
        ].read()
        timings.append(time.perf_counter() - began)
        if len(body) != BLOCK:
            raise RuntimeError(f"expected {BLOCK} bytes from {key} at {start}, got {len(body)}")
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50, help="ranged GETs per object (default 50)")
    args = parser.parse_args()
    rng = random.Random(2880)

    with Twin.start(scale=1.0) as twin:
        catalog = twin.catalog
        small = min(
            (
                p
                for p in catalog.products()
                if p.s3_key and p.filename.endswith(".fits") and p.size >= 8 * BLOCK
            ),
            key=lambda p: abs(p.size - (1 << 20)),
        )
        subjects = [("~1 MiB", small)] + [
            (label, catalog.product(uri))
            for label, uri in (("1 GiB", twin_catalog.BENCH_1GIB_URI), ("2 GiB", twin_catalog.BENCH_2GIB_URI))
        ]
        s3 = boto3.client(
            "s3",
            endpoint_url=twin.s3_endpoint,
            region_name="us-east-1",
            config=Config(signature_version=UNSIGNED),
        )
        for _, product in subjects:  # warm-up: connection pool, lazy key registration, file layouts
            timed_range_reads(s3, product.s3_key, product.size, 3, rng)

        medians = {}
        print(
            f"Ranged S3 GET of {BLOCK} bytes, median of {args.runs} runs (twin at scale 1, boto3 unsigned)\n"
        )
        print("| object | size (bytes) | median (ms) | p90 (ms) |")
        print("|---|---:|---:|---:|")
        for label, product in subjects:
            timings = timed_range_reads(s3, product.s3_key, product.size, args.runs, rng)
            medians[label] = statistics.median(timings)
            p90 = statistics.quantiles(timings, n=10)[-1]
            print(
                f"| {label} `{product.filename}` | {product.size:,} | {medians[label] * 1e3:.2f} | {p90 * 1e3:.2f} |"
            )
        base = medians["~1 MiB"]
        print()
        for label in ("1 GiB", "2 GiB"):
            print(f"ratio {label} / ~1 MiB: {medians[label] / base:.2f}")


if __name__ == "__main__":
    main()
