"""Soak benchmark (not a test): N minutes of mixed listings and reads through a mastfs mount of the twin,
sampling the daemon's RSS, to show whether its memory stays flat.

Starts ``mastfs twin serve`` (scale 0.01 by default: products up to 65 MB) in a child process and mounts it
with a small block cache (so eviction churns all along). Worker threads then loop over a weighted mix:
list an observation directory and one of its groups (readdirplus), read xattrs, read a FITS header, read a
random range, read a whole product, look up a cone, and now and then drop the cached metadata of an
observation (``refresh``) so listings keep reaching MAST. Every byte read is compared with the twin's
catalog (the same deterministic bytes, generated in this process).

Prints the RSS samples and a summary, and appends one row to the soak table of docs/reliability.md
(``--no-write`` to skip). Needs root (mounting). Exit status 0 when the soak ran with no wrong byte,
1 otherwise.

Usage: .venv/bin/python bench/soak.py [--minutes 10] [--workers 4] [--scale 0.01] [--cache-size 256M]
                                     [--skip KIND ...] [--no-write]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import REPO, BenchError, Mount, TwinProcess  # noqa: E402

from mastfs import namespace  # noqa: E402
from mastfs.mast.models import Product  # noqa: E402
from mastfs.twin.catalog import BIG_PROGRAM, PROGRAM_2733, Catalog  # noqa: E402

REPORT = REPO / "docs" / "reliability.md"
SOAK_MARKER = "<!-- soak rows: bench/soak.py appends one row per run at the end of this file -->"
WHOLE_FILE_LIMIT = 20_000_000
"""Whole-file reads are of products up to this size (bigger ones get ranged reads)."""
OPERATIONS = {"list": 30, "xattr": 10, "header": 20, "range": 20, "whole": 10, "cone": 5, "refresh": 5}
CONES = [f"{151.70 + 0.01 * i:.2f},-40.44,0.05" for i in range(12)] + [f"{53.10 + 0.02 * i:.2f},-27.80,0.1"
                                                                       for i in range(12)]


class Workload:
    """What the workers pick from: observations, their products' paths under the mount, sizes."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        rows = catalog.observation_rows()
        self.observations = [row for row in rows if row["obs_collection"] == "JWST" and
                             str(row["proposal_id"]) in (PROGRAM_2733, BIG_PROGRAM)]
        self.layouts: dict[str, namespace.Layout] = {}

    def layout(self, obs: dict) -> namespace.Layout:
        obs_id = obs["obs_id"]
        if obs_id not in self.layouts:
            products = [Product.from_row(row) for row in self.catalog.product_rows(str(obs["obsid"]))]
            self.layouts[obs_id] = namespace.layout_products(products)
        return self.layouts[obs_id]

    def random_product(self, rng: random.Random) -> tuple[str, str, int]:
        """(obs_id, dataURI, size) of a random public product (observations of 2733 weigh more: big files)."""
        while True:
            obs = rng.choice(self.observations[:10] if rng.random() < 0.4 else self.observations)
            layout = self.layout(obs)
            uri = rng.choice(list(layout.paths))
            product = self.catalog.product(uri)
            if product is not None and not product.exclusive:
                return obs["obs_id"], uri, product.size


class Soak:
    """Runs the workers and the RSS sampler against one mount."""

    def __init__(self, mount: Mount, workload: Workload, operations: dict[str, int], minutes: float,
                 workers: int, sample_seconds: float, seed: int) -> None:
        self.mount = mount
        self.workload = workload
        self.operations = operations
        self.until = time.monotonic() + minutes * 60
        self.workers = workers
        self.sample_seconds = sample_seconds
        self.seed = seed
        self.lock = threading.Lock()
        self.ops: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.wrong = 0
        self.bytes_read = 0
        self.samples: list[tuple[float, int]] = []
        self.started = time.monotonic()

    def path(self, obs_id: str, uri: str) -> str:
        layout = self.workload.layouts[obs_id]
        return self.mount.path(f"obs/{obs_id}/{layout.paths[uri]}")

    def check(self, uri: str, offset: int, data: bytes) -> None:
        expected = self.workload.catalog.read(uri, offset, len(data))
        if data != expected:
            with self.lock:
                self.wrong += 1
            print(f"WRONG BYTES: {uri} at {offset} (+{len(data)})", flush=True)

    def one(self, kind: str, rng: random.Random) -> None:
        workload = self.workload
        if kind == "list":
            obs = rng.choice(workload.observations)
            directory = self.mount.path(f"obs/{obs['obs_id']}")
            groups = [name for name in os.listdir(directory) if not name.endswith((".json", ".csv"))]
            if groups:
                for entry in os.scandir(os.path.join(directory, rng.choice(groups))):
                    entry.stat()
        elif kind == "xattr":
            obs_id, uri, _ = workload.random_product(rng)
            path = self.path(obs_id, uri)
            for name in os.listxattr(path):
                os.getxattr(path, name)
        elif kind in ("header", "range", "whole"):
            obs_id, uri, size = workload.random_product(rng)
            path = self.path(obs_id, uri)
            if kind == "whole" and size > WHOLE_FILE_LIMIT:
                kind = "range"
            with open(path, "rb") as handle:
                if kind == "header":
                    offset, data = 0, handle.read(2880)
                elif kind == "range":
                    offset = rng.randrange(max(1, size))
                    handle.seek(offset)
                    data = handle.read(rng.randint(1, 4 << 20))
                else:
                    offset, data = 0, handle.read()
            self.check(uri, offset, data)
            with self.lock:
                self.bytes_read += len(data)
        elif kind == "cone":
            os.listdir(self.mount.path(f"cone/{rng.choice(CONES)}"))
        elif kind == "refresh":
            obs = rng.choice(workload.observations)
            subprocess.run([sys.executable, "-m", "mastfs", "refresh", self.mount.path(f"obs/{obs['obs_id']}")],
                           capture_output=True, timeout=60, check=False, cwd=REPO)

    def worker(self, index: int) -> None:
        rng = random.Random(self.seed * 1000 + index)
        kinds, weights = zip(*self.operations.items(), strict=True)
        while time.monotonic() < self.until:
            kind = rng.choices(kinds, weights)[0]
            try:
                self.one(kind, rng)
            except OSError as exc:
                with self.lock:
                    self.errors[f"{kind}:{exc.strerror}"] += 1
            with self.lock:
                self.ops[kind] += 1

    def sampler(self) -> None:
        while time.monotonic() < self.until:
            rss = self.mount.daemon_rss()
            if rss is not None:
                self.samples.append((time.monotonic() - self.started, rss))
                with self.lock:
                    done = sum(self.ops.values())
                print(f"  t={self.samples[-1][0]:6.0f}s  rss={rss / 2**20:7.1f} MB  ops={done}", flush=True)
            time.sleep(self.sample_seconds)

    def run(self) -> None:
        threads = [threading.Thread(target=self.worker, args=(index,), daemon=True) for index in range(self.workers)]
        threads.append(threading.Thread(target=self.sampler, daemon=True))
        for thread in threads:
            thread.start()
        with self.mount.watchdog((self.until - time.monotonic()) + 120, "the soak"):
            for thread in threads:
                thread.join()


def slope_mb_per_hour(samples: list[tuple[float, int]]) -> float:
    """Least-squares slope of RSS over time, MB per hour."""
    if len(samples) < 2:
        return 0.0
    n = len(samples)
    mean_t = sum(t for t, _ in samples) / n
    mean_r = sum(r for _, r in samples) / n
    var = sum((t - mean_t) ** 2 for t, _ in samples)
    if not var:
        return 0.0
    cov = sum((t - mean_t) * (r - mean_r) for t, r in samples)
    return cov / var * 3600 / 2**20


def summarise(soak: Soak, minutes: float, args: argparse.Namespace) -> dict:
    samples = soak.samples
    warm = [s for s in samples if s[0] >= min(60.0, minutes * 60 * 0.2)] or samples
    half = warm[len(warm) // 2:]
    mb = 2**20
    return {
        "date": datetime.date.today().isoformat(),
        "minutes": round(minutes, 1),
        "scale": args.scale,
        "workers": args.workers,
        "cache_size": args.cache_size,
        "skipped": args.skip,
        "operations": sum(soak.ops.values()),
        "by_kind": dict(soak.ops),
        "errors": sum(soak.errors.values()),
        "error_kinds": dict(soak.errors),
        "wrong_reads": soak.wrong,
        "bytes_read_mb": round(soak.bytes_read / mb),
        "rss_after_warmup_mb": round(warm[0][1] / mb, 1) if warm else None,
        "rss_end_mb": round(samples[-1][1] / mb, 1) if samples else None,
        "rss_max_mb": round(max(r for _, r in samples) / mb, 1) if samples else None,
        "rss_slope_second_half_mb_per_hour": round(slope_mb_per_hour(half), 1),
    }


def append_row(summary: dict) -> None:
    mix = "all" if not summary["skipped"] else "no " + ", ".join(summary["skipped"])
    row = (f"| {summary['date']} | {summary['minutes']:g} | {mix} | {summary['scale']:g} | {summary['workers']} | "
           f"{summary['cache_size']} | {summary['operations']} | {summary['bytes_read_mb']} | {summary['errors']} | "
           f"{summary['wrong_reads']} | {summary['rss_after_warmup_mb']} | {summary['rss_end_mb']} | "
           f"{summary['rss_max_mb']} | {summary['rss_slope_second_half_mb_per_hour']:+g} |\n")
    text = REPORT.read_text(encoding="utf-8")
    if SOAK_MARKER not in text:
        raise BenchError(f"{REPORT} has no soak table marker {SOAK_MARKER!r}")
    REPORT.write_text(text.rstrip("\n") + "\n" + row, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--scale", type=float, default=0.01)
    parser.add_argument("--cache-size", default="256M")
    parser.add_argument("--sample-seconds", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--skip", action="append", default=[], choices=sorted(OPERATIONS),
                        help="leave this kind of operation out of the mix (repeatable)")
    parser.add_argument("--no-write", action="store_true", help="do not append to docs/reliability.md")
    args = parser.parse_args(argv)
    operations = {kind: weight for kind, weight in OPERATIONS.items() if kind not in args.skip}
    with tempfile.TemporaryDirectory(prefix="mastfs-soak-") as workdir:
        work = Path(workdir)
        print(f"soak: {args.minutes:g} min, {args.workers} workers, twin scale {args.scale:g}, "
              f"cache {args.cache_size}", flush=True)
        catalog = Catalog(scale=args.scale)
        with TwinProcess(work, scale=args.scale) as twin, \
                Mount(twin, work / "mnt", work / "cache", extra_args=("--cache-size", args.cache_size)) as mount:
            if mount.daemon is None:
                raise BenchError("the daemon process was not found: RSS cannot be sampled")
            soak = Soak(mount, Workload(catalog), operations, args.minutes, args.workers, args.sample_seconds,
                        args.seed)
            soak.run()
            daemon_alive = mount.daemon.is_running()
        summary = summarise(soak, args.minutes, args)
        summary["daemon_alive_at_end"] = daemon_alive
    print("soak summary:", json.dumps(summary), flush=True)
    if not args.no_write:
        append_row(summary)
        print(f"appended to {REPORT}")
    return 0 if summary["wrong_reads"] == 0 and daemon_alive else 1


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except BenchError as exc:
        print(f"soak: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
