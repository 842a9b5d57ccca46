"""The mount-level benchmarks of issue 4 (point 6), each a ratio measured side by side in one run.

- :func:`bench_header`: wire bytes and time of a 2,880-byte read and of ``astropy.io.fits.getheader`` of
  uncached >= 1 GiB products, against a direct ranged GET.
- :func:`bench_cold`: cold sequential read of the 1 GiB product, ``--source s3`` and ``--source http``,
  against a direct boto3 ``get_object`` stream and a direct httpx stream of the same object.
- :func:`bench_warm`: re-read from the disk cache in a fresh mount (page cache dropped) against a local
  file on the same disk; and with the page cache warm (second read in the same mount).
- :func:`bench_rss`: the daemon's peak RSS while reading the 2 GiB product, over its first GiB and the rest.
- :func:`bench_listing`: ``ls -l`` of the biggest directory of the 3,000-product observation, cold, warm,
  and after a remount.

Each returns a :class:`common.Section`; run them through ``bench/run_all.py``.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
from astropy.io import fits
from common import (
    GIB,
    MIB,
    BenchError,
    CpuMeter,
    Goal,
    Mount,
    ReadResult,
    RssSampler,
    Section,
    TwinProcess,
    Wire,
    boto3_download,
    boto3_stream,
    drop_page_cache,
    httpx_stream,
    median,
    prime_etags,
    read_sequential,
    remove_tree,
    s3_client,
    spread,
)

from mastfs.mast.models import Product
from mastfs.namespace import product_group
from mastfs.twin import catalog as twin_catalog
from mastfs.twin import link as twin_link
from mastfs.twin.catalog import Catalog, TwinProduct

HEADER_BYTES = 2880
HEADER_GOAL_BYTES = 64 * 1024
COLD_GOAL_RATIO = 1.0
WARM_GOAL_RATIO = 0.8
S3_LIKE_LINK = twin_link.S3_LIKE
"""The link the cold-read goal is measured over (see mastfs/twin/link.py)."""
LOOPBACK_LINK = twin_link.Link().to_json()
RSS_GOAL_BYTES = 200 * 1000 * 1000
RSS_FLAT_TOLERANCE = 0.10
SETTLE_SECONDS = 1.0
"""Pause after a small read before reading the twin's counters, so background readahead is counted."""
READ_TIMEOUT = 300.0
LS_TIMEOUT = 180.0
LISTING_OBS = twin_catalog.OBS_2733_MIRI_F1130W


@dataclass
class Context:
    """What every benchmark needs: the twin, a scratch directory, the catalog (same scale as the twin),
    the number of runs, and direct clients of the twin."""

    twin: TwinProcess
    workdir: Path
    runs: int
    catalog: Catalog

    def __post_init__(self) -> None:
        self.s3 = s3_client(self.twin)
        self.http = httpx.Client(timeout=httpx.Timeout(60.0), limits=httpx.Limits(max_connections=4))
        self._mount_count = 0

    def close(self) -> None:
        self.http.close()

    def product(self, uri: str) -> TwinProduct:
        product = self.catalog.product(uri)
        if product is None:
            raise BenchError(f"the twin's catalog has no product {uri}")
        return product

    def big_products(self) -> list[TwinProduct]:
        """Every public >= 1 GiB FITS product with an S3 key, smallest first."""
        return sorted((p for p in self.catalog.products()
                       if p.size >= GIB and p.s3_key and not p.exclusive and p.filename.endswith(".fits")),
                      key=lambda p: p.size)

    def mid_products(self) -> list[TwinProduct]:
        """Public level-3 FITS products (i2d, segm) of 64 MiB to 1 GiB with an S3 key, biggest first."""
        return sorted((p for p in self.catalog.products()
                       if 64 * MIB <= p.size < GIB and p.s3_key and not p.exclusive
                       and p.filename.endswith(("_i2d.fits", "_segm.fits"))),
                      key=lambda p: -p.size)

    def cache_dir(self, name: str) -> Path:
        path = self.workdir / f"cache-{name}"
        remove_tree(path)
        return path

    def mount(self, cache_dir: Path, source: str | None = None) -> Mount:
        self._mount_count += 1
        return Mount(self.twin, self.workdir / f"mnt{self._mount_count}", cache_dir, source=source)

    def wire(self) -> Wire:
        return Wire.from_stats(self.twin.stats())

    @property
    def bucket(self) -> str:
        return self.twin.info["bucket"]


def locate(mount: Mount, product: TwinProduct) -> str:
    """The product's path in the mount: ``/program/<id>/<obs_id>/level3/<file>`` for level-3 products
    named after their observation, else found by scanning the program's observation directories.
    Checks the size. Raises BenchError when it is not there."""
    program_dir = mount.path(f"program/{int(product.program)}")
    guess = os.path.join(program_dir, product.filename.rsplit("_", 1)[0], "level3", product.filename)
    with mount.watchdog(120, f"looking up {product.filename} in the mount"):
        if os.path.exists(guess):
            found = guess
        else:
            found = next((os.path.join(program_dir, obs, group, product.filename)
                          for obs in sorted(os.listdir(program_dir))
                          if os.path.isdir(os.path.join(program_dir, obs))
                          for group in sorted(os.listdir(os.path.join(program_dir, obs)))
                          if os.path.exists(os.path.join(program_dir, obs, group, product.filename))), None)
        if found is None:
            raise BenchError(f"{product.filename} is not under {program_dir}")
        size = os.stat(found).st_size
    if size != product.size:
        raise BenchError(f"{found}: size {size} in the mount, {product.size} in the twin's catalog")
    return found


# ------------------------------------------------------------------------------------------ warm-up


def warm_up(ctx: Context) -> None:
    """One throwaway mount that looks up and reads the first bytes of every >= 1 GiB product, and direct
    ranged GETs of each: pays the one-time costs outside every measurement (the twin's lazy S3 key
    registration and file layouts, Python imports and the page cache of the code), after priming the
    twin's ETags of every big and mid-size product (:func:`prime_etags`)."""
    prime_etags(ctx.s3, ctx.bucket, [product.s3_key for product in [*ctx.big_products(), *ctx.mid_products()]
                                     if product.s3_key])
    cache = ctx.cache_dir("warm-up")
    try:
        with ctx.mount(cache) as mount:
            for product in ctx.big_products():
                ctx.s3.get_object(Bucket=ctx.bucket, Key=product.s3_key,
                                  Range=f"bytes={product.size - HEADER_BYTES}-{product.size - 1}")["Body"].read()
                path = locate(mount, product)
                with mount.watchdog(120, f"warm-up read of {product.filename}"), open(path, "rb") as handle:
                    handle.read(HEADER_BYTES)
    finally:
        remove_tree(cache)


# ------------------------------------------------------------------------------------------ (a) header


def bench_header(ctx: Context) -> Section:
    section = Section(
        "header", "Header read of an uncached >= 1 GiB product",
        "Each run reads a different uncached >= 1 GiB product (one mount, fresh cache dir, default source "
        "`auto`; the file is looked up with `stat` before the timer starts, as after an `ls`). *File bytes* "
        "are what the twin sent from S3 GetObject and HTTPS download, counted 1 s after the read returned so "
        "background readahead is included; *other requests* are MAST API calls made meanwhile (e.g. "
        "`path_lookup` of S3 keys). Direct = one ranged GET of bytes 0-2879 of the same objects.",
        columns=["operation", "open (ms)", "read (ms)", "total (ms)", "file bytes on the wire", "file requests",
                 "other requests", "total time vs direct S3", "file bytes vs direct S3"],
    )
    big = ctx.big_products()
    runs = min(ctx.runs, len(big) // 2)
    if runs < 1:
        raise BenchError("the twin's catalog has fewer than two >= 1 GiB products (is it at scale 1?)")
    raw_products, astropy_products = big[:runs], big[-runs:]
    small = ctx.mid_products()[: 2 * runs]
    # per kind: (open seconds or None, total seconds, wire)
    results: dict[str, list[tuple[float | None, float, Wire]]] = {
        kind: [] for kind in ("raw", "getheader", "pages", "pages-random", "s3", "https")}
    cache = ctx.cache_dir("header")
    with ctx.mount(cache) as mount:
        for kind, products in (("raw", raw_products), ("getheader", astropy_products),
                               ("pages", small[:runs]), ("pages-random", small[runs:])):
            for product in products:
                path = locate(mount, product)
                time.sleep(SETTLE_SECONDS)
                ctx.twin.reset_stats()
                opened = None
                with mount.watchdog(120, f"header read of {product.filename}"):
                    began = time.perf_counter()
                    if kind == "raw":
                        with open(path, "rb", buffering=0) as handle:
                            opened = time.perf_counter() - began
                            data = handle.read(HEADER_BYTES)
                    elif kind == "getheader":
                        header = fits.getheader(path)
                    else:
                        _read_pages(path, kind == "pages-random")
                    elapsed = time.perf_counter() - began
                if kind == "raw" and (len(data) != HEADER_BYTES or not data.startswith(b"SIMPLE  =")):
                    raise BenchError(f"{path}: the first {HEADER_BYTES} bytes are not a FITS header")
                if kind == "getheader" and "TELESCOP" not in header:
                    raise BenchError(f"{path}: getheader returned no TELESCOP card")
                time.sleep(SETTLE_SECONDS)
                results[kind].append((opened, elapsed, ctx.wire()))
        blksize = os.stat(path).st_blksize
    remove_tree(cache)

    for product in raw_products + astropy_products:
        ctx.twin.reset_stats()
        began = time.perf_counter()
        body = ctx.s3.get_object(Bucket=ctx.bucket, Key=product.s3_key,
                                 Range=f"bytes=0-{HEADER_BYTES - 1}")["Body"].read()
        results["s3"].append((None, time.perf_counter() - began, ctx.wire()))
        ctx.twin.reset_stats()
        began = time.perf_counter()
        response = ctx.http.get(ctx.twin.info["mast_url"] + "/api/v0.1/Download/file", params={"uri": product.uri},
                                headers={"Range": f"bytes=0-{HEADER_BYTES - 1}"})
        results["https"].append((None, time.perf_counter() - began, ctx.wire()))
        if len(body) != HEADER_BYTES or response.status_code != 206 or len(response.content) != HEADER_BYTES:
            raise BenchError(f"direct ranged GET of {product.uri} did not return {HEADER_BYTES} bytes")

    direct_time = median([t for _, t, _ in results["s3"]])
    direct_bytes = median([w.file_bytes for _, _, w in results["s3"]])
    labels = {"raw": "mount: open + read 2,880 B + close", "getheader": "mount: `astropy.io.fits.getheader`",
              "pages": "mount: 3 sequential 4 KiB `os.read` (diagnostic)",
              "pages-random": "mount: the same after `posix_fadvise(RANDOM)` (diagnostic)",
              "s3": "direct boto3 `get_object(Range=0-2879)`", "https": "direct httpx GET `Range: bytes=0-2879`"}
    for kind, label in labels.items():
        opens = [o * 1e3 for o, _, _ in results[kind] if o is not None]
        totals = [t * 1e3 for _, t, _ in results[kind]]
        reads = [t - o for t, o in zip(totals, opens, strict=False)] if opens else []
        wires = [w for _, _, w in results[kind]]
        file_bytes = [w.file_bytes for w in wires]
        section.rows.append([
            label, spread(opens, "{:.1f}") if opens else "", spread(reads, "{:.1f}") if reads else "",
            spread(totals, "{:.1f}"), spread(file_bytes, "{:,.0f}"), spread([w.file_requests for w in wires]),
            spread([w.total_requests - w.file_requests for w in wires]),
            f"{median(totals) / 1e3 / direct_time:.1f}x", f"{median(file_bytes) / direct_bytes:.1f}x"])
    for kind, name in (("raw", "2,880-byte read: file bytes on the wire (worst run)"),
                       ("getheader", "`fits.getheader`: file bytes on the wire (worst run)")):
        worst = max(w.file_bytes for _, _, w in results[kind])
        section.goals.append(Goal(name, f"{worst:,} B", f"<= {HEADER_GOAL_BYTES:,} B", worst <= HEADER_GOAL_BYTES))
    section.notes.append("products: " + ", ".join(f"`{p.filename}` ({p.size / GIB:.2f} GiB)"
                                                  for p in raw_products + astropy_products)
                         + "; diagnostic rows: " + ", ".join(f"`{p.filename}`" for p in small))
    section.notes.append(f"the mount reports `st_blksize` = {blksize:,} (Python's `open()`, and so astropy, "
                         "reads in buffers of that size). The diagnostic rows tell whether bytes beyond what "
                         "the application read come from the kernel's readahead (they vanish with "
                         "`POSIX_FADV_RANDOM`) or from mastfs's own readahead.")
    return section


def _read_pages(path: str, no_kernel_readahead: bool) -> None:
    """Three sequential 4 KiB reads from offset 0 (what astropy does for a primary header), optionally
    with the kernel's readahead disabled for this open file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if no_kernel_readahead:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        for _ in range(3):
            os.read(fd, 4096)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------ (b) cold


@dataclass
class Run:
    """One timed read: what it read and how long it took, what the twin sent meanwhile, and (when
    measured) CPU seconds of the daemon and the twin and the daemon's peak RSS."""

    result: ReadResult
    wire: Wire | None = None
    daemon_cpu: float | None = None
    twin_cpu: float | None = None
    peak_rss: int | None = None
    machine_busy: float | None = None


def timed_mount_read(ctx: Context, mount: Mount, path: str, what: str, drop: bool = True) -> Run:
    """Drop the page cache (if ``drop``), then read ``path`` sequentially under a watchdog, measuring wire
    bytes, the daemon's and the twin's CPU seconds and the daemon's peak RSS."""
    if drop:
        drop_page_cache()
    ctx.twin.reset_stats()
    meter = CpuMeter(daemon=mount.daemon, twin=_twin_process(ctx))
    with RssSampler(mount.daemon) as rss, meter, mount.watchdog(READ_TIMEOUT, what):
        result = read_sequential(path)
    return Run(result, ctx.wire(), meter.used.get("daemon"), meter.used.get("twin"),
               rss.peak if mount.daemon else None, meter.machine_busy)


def _twin_process(ctx: Context) -> psutil.Process | None:
    try:
        return psutil.Process(ctx.twin.pid)
    except psutil.Error:
        return None


def bench_cold(ctx: Context) -> tuple[Section, Path | None]:
    """The cold read over an S3-like link (the goal). Returns the section and the cache dir of the last
    ``--source s3`` run (the whole 1 GiB product cached, unmounted), for :func:`bench_warm`."""
    ctx.twin.set_link(S3_LIKE_LINK)
    try:
        return _cold_read(ctx, "cold", "over an S3-like link", (
            f"The twin paces every product body like a link to S3 ({S3_LIKE_LINK['first_byte_ms']:g} ms to the "
            f"first byte, {S3_LIKE_LINK['stream_mb_s']:g} MB/s per connection, the figure AWS documents per "
            "request; `mastfs twin serve --first-byte-ms --stream-mb-s`), for the direct clients and the "
            "mount alike. A single stream gets one connection's bandwidth; mastfs reads ahead with parallel "
            "range requests, as AWS recommends for large objects."), goals=True)
    finally:
        ctx.twin.set_link(LOOPBACK_LINK)


def bench_cold_loopback(ctx: Context) -> Section:
    """The cold read on plain loopback (no link limits): context, no goal."""
    section, cache = _cold_read(ctx, "cold-loopback", "on loopback (context)", (
        "No link limits: a single stream runs as fast as this machine's two cores copy, so the comparison "
        "measures CPU per byte, not the network. The mount does strictly more work per byte than a direct "
        "client (the same fetch, plus the block cache, the FUSE round trips and the kernel's page-cache "
        "fill), and on two cores it cannot match it. Shown for context; the goal is measured above."),
        goals=False)
    if cache is not None:
        remove_tree(cache)
    return section


def _cold_read(ctx: Context, key: str, title: str, intro: str, goals: bool) -> tuple[Section, Path | None]:
    product = ctx.product(twin_catalog.BENCH_1GIB_URI)
    section = Section(
        key, f"Cold sequential read of {product.size / GIB:.2f} GiB {title}",
        f"`{product.filename}` ({product.size:,} B) read with 1 MiB `read()` calls from open to close, "
        "through a fresh mount on an empty cache dir after `sync; echo 3 > /proc/sys/vm/drop_caches`, "
        "against a direct boto3 `get_object` stream and a direct httpx stream of the same object from the "
        "same twin (1 MiB chunks). Each round runs the four reads back to back; ratios are medians of the "
        "per-round ratios. Daemon and twin CPU: CPU seconds over wall time (100 % = one core); machine CPU "
        "busy: the share of all cores not idle meanwhile (other processes on the machine included). "
        + intro,
        columns=["reader", "MB/s", "seconds", "open (ms)", "first byte (ms)", "wire bytes / size", "daemon CPU",
                 "daemon CPU s/GiB", "twin CPU", "machine CPU busy", "daemon peak RSS (MB)", "ratio to direct"],
    )
    samples: dict[str, list[Run]] = {key: [] for key in ("s3-direct", "s3-mount", "http-direct", "http-mount",
                                                         "s3-download")}
    twin_process = _twin_process(ctx)
    kept_cache: Path | None = None
    for run in range(ctx.runs):
        for source in ("s3", "http"):
            meter = CpuMeter(twin=twin_process)
            ctx.twin.reset_stats()
            with meter:
                if source == "s3":
                    direct = boto3_stream(ctx.s3, ctx.bucket, product.s3_key)
                else:
                    direct = httpx_stream(ctx.http, ctx.twin.info["mast_url"], product.uri)
            if direct.nbytes != product.size:
                raise BenchError(f"direct {source} read returned {direct.nbytes} of {product.size} bytes")
            samples[f"{source}-direct"].append(Run(direct, ctx.wire(), twin_cpu=meter.used.get("twin"),
                                                   machine_busy=meter.machine_busy))

            cache = ctx.cache_dir(f"cold-{source}-{run}")
            with ctx.mount(cache, source=source) as mount:
                path = locate(mount, product)
                read = timed_mount_read(ctx, mount, path, f"cold read ({source}) of {product.filename}")
            if read.result.nbytes != product.size:
                raise BenchError(f"cold read through the mount returned {read.result.nbytes} of {product.size} B")
            samples[f"{source}-mount"].append(read)
            if source == "s3" and run == ctx.runs - 1:
                kept_cache = cache
            else:
                remove_tree(cache)
        if not goals:
            drop_page_cache()
            with CpuMeter(twin=twin_process) as meter:
                download = boto3_download(ctx.s3, ctx.bucket, product.s3_key, ctx.workdir / "download.bin")
            samples["s3-download"].append(Run(download, twin_cpu=meter.used.get("twin"),
                                              machine_busy=meter.machine_busy))

    labels = {"s3-direct": "direct boto3 `get_object` stream", "s3-mount": "mount, `--source s3`",
              "http-direct": "direct httpx stream (HTTPS download)", "http-mount": "mount, `--source http`",
              "s3-download": "context: direct boto3 stream written to a local file"}
    for key, label in labels.items():
        runs = samples[key]
        if not runs:
            continue
        row = [label, spread([r.result.mb_s for r in runs]), spread([r.result.seconds for r in runs], "{:.2f}"),
               _ms_spread([r.result.open_seconds for r in runs]),
               _ms_spread([r.result.first_byte_seconds for r in runs]),
               f"{median([r.wire.file_bytes for r in runs]) / product.size:.3f}" if runs[0].wire else "",
               _cpu_share(runs, "daemon_cpu"), _cpu_per_gib(runs, product.size), _cpu_share(runs, "twin_cpu"),
               spread([r.machine_busy * 100 for r in runs if r.machine_busy is not None], "{:.0f} %"),
               spread([r.peak_rss / 1e6 for r in runs if r.peak_rss is not None]) if runs[0].peak_rss else "",
               ""]
        if key.endswith("-mount"):
            direct_key = key.replace("mount", "direct")
            ratios = [m.result.mb_s / d.result.mb_s for m, d in zip(runs, samples[direct_key], strict=True)]
            row[-1] = spread(ratios, "{:.2f}")
            if goals:
                section.goals.append(Goal(f"cold read {title}, {label} / {labels[direct_key]}",
                                          f"{median(ratios):.2f}", f">= {COLD_GOAL_RATIO:.1f}",
                                          median(ratios) >= COLD_GOAL_RATIO))
        section.rows.append(row)
    section.notes.append("values are `median (min-max)` of the runs. *open* includes what mastfs asks MAST "
                         "when a file is opened (e.g. the product's S3 key).")
    if samples["s3-download"]:
        to_download = [m.result.mb_s / d.result.mb_s
                       for m, d in zip(samples["s3-mount"], samples["s3-download"], strict=True)]
        section.notes.append("context row (no goal): a download that writes the object to a local file after "
                             "dropping the page cache fills the page cache with the file once, as a read "
                             "through the mount does (the mounted file's pages; mastfs writes its block files "
                             "with O_DIRECT); mount `--source s3` / that download: "
                             f"{spread(to_download, '{:.2f}')}.")
    return section, kept_cache


def _ms_spread(seconds: list[float | None]) -> str:
    known = [s * 1e3 for s in seconds if s is not None]
    return spread(known, "{:.1f}") if known else ""


def _cpu_per_gib(runs: list[Run], size: int) -> str:
    """Median daemon CPU seconds per GiB read (empty for direct clients, which have no daemon)."""
    per_gib = [r.daemon_cpu / (size / GIB) for r in runs if r.daemon_cpu is not None]
    return spread(per_gib, "{:.2f}") if per_gib else ""


def _cpu_share(runs: list[Run], attribute: str) -> str:
    """Median CPU use of ``attribute`` ("daemon_cpu" / "twin_cpu") over the runs' wall time, in % of one core."""
    shares = [getattr(r, attribute) / r.result.seconds * 100 for r in runs if getattr(r, attribute) is not None]
    return f"{median(shares):.0f} %" if shares else ""


# ------------------------------------------------------------------------------------------ (c) warm


def write_local_file(path: Path, size: int) -> None:
    """A real (non-sparse) file of ``size`` bytes, fsynced: the local-disk baseline."""
    block = os.urandom(MIB)
    with open(path, "wb") as handle:
        remaining = size
        while remaining > 0:
            remaining -= handle.write(block[: min(MIB, remaining)])
        handle.flush()
        os.fsync(handle.fileno())


def bench_warm(ctx: Context, cache: Path | None) -> Section:
    product = ctx.product(twin_catalog.BENCH_1GIB_URI)
    section = Section(
        "warm", "Warm re-read",
        f"`{product.filename}` ({product.size:,} B) already in the block cache. *Disk cache*: a fresh "
        "mount on that cache dir, page cache dropped, one sequential read with 1 MiB `read()` calls, against "
        "the same read of a local file of the same size on the same disk after dropping the page cache. "
        "*Page cache*: a second read in the same mount (no drop), against a second read of the local file.",
        columns=["reader", "MB/s", "seconds", "file bytes on the wire", "daemon CPU", "machine CPU busy",
                 "ratio to local file"],
    )
    if cache is None:
        cache = ctx.cache_dir("warm")
        with ctx.mount(cache, source="s3") as mount:
            path = locate(mount, product)
            with mount.watchdog(READ_TIMEOUT, "filling the cache for the warm read"):
                read_sequential(path)
    local = ctx.workdir / "local-baseline.bin"
    write_local_file(local, product.size)
    samples: dict[str, list[Run]] = {key: [] for key in ("local-disk", "mount-disk", "local-page", "mount-page")}
    verified = "not checked"
    for run in range(ctx.runs):
        drop_page_cache()
        for key in ("local-disk", "local-page"):
            with CpuMeter() as meter:
                result = read_sequential(str(local))
            samples[key].append(Run(result, machine_busy=meter.machine_busy))
        with ctx.mount(cache, source="s3") as mount:
            path = locate(mount, product)
            for key, drop in (("mount-disk", True), ("mount-page", False)):
                read = timed_mount_read(ctx, mount, path, f"warm read ({key}) of {product.filename}", drop=drop)
                if read.result.nbytes != product.size:
                    raise BenchError(f"warm read returned {read.result.nbytes} of {product.size} bytes")
                samples[key].append(read)
            if run == 0:
                verified = _verify(ctx, mount, path, product)
    local.unlink()
    remove_tree(cache)

    labels = {"local-disk": "local file, page cache dropped", "mount-disk": "fresh mount, disk cache",
              "local-page": "local file, page cache warm", "mount-page": "same mount, second read (page cache)"}
    for key, label in labels.items():
        runs = samples[key]
        row = [label, spread([r.result.mb_s for r in runs]), spread([r.result.seconds for r in runs], "{:.2f}"),
               "", "", spread([r.machine_busy * 100 for r in runs if r.machine_busy is not None], "{:.0f} %"), ""]
        if key.startswith("mount"):
            row[3] = spread([r.wire.file_bytes for r in runs], "{:,.0f}")
            row[4] = _cpu_share(runs, "daemon_cpu")
            baseline = samples[key.replace("mount", "local")]
            ratios = [m.result.mb_s / b.result.mb_s for m, b in zip(runs, baseline, strict=True)]
            row[6] = spread(ratios, "{:.2f}")
            if key == "mount-disk":
                section.goals.append(Goal("warm re-read from the disk cache (fresh mount) / local file",
                                          f"{median(ratios):.2f}", f">= {WARM_GOAL_RATIO:.1f}",
                                          median(ratios) >= WARM_GOAL_RATIO))
            else:
                section.goals.append(Goal("page-cache re-read / local file in page cache (no goal set)",
                                          f"{median(ratios):.2f}", "report", None))
        section.rows.append(row)
    section.notes.append(f"sha256 of the file read through the mount vs the twin's: {verified}")
    return section


def _verify(ctx: Context, mount: Mount, path: str, product: TwinProduct) -> str:
    """Hash the file through the mount (untimed) and compare with the twin's sha256."""
    digest = hashlib.sha256()
    with mount.watchdog(READ_TIMEOUT, f"hashing {path}"), open(path, "rb") as handle:
        while chunk := handle.read(8 * MIB):
            digest.update(chunk)
    expected = ctx.twin.sha256(product.uri)
    if digest.hexdigest() != expected:
        raise BenchError(f"{path}: sha256 {digest.hexdigest()} through the mount, {expected} in the twin")
    return "match"


# ------------------------------------------------------------------------------------------ (d) RSS


def bench_rss(ctx: Context) -> Section:
    product = ctx.product(twin_catalog.BENCH_2GIB_URI)
    section = Section(
        "rss", "Daemon memory while reading a 2 GiB product",
        f"`{product.filename}` ({product.size:,} B) read sequentially (cold, fresh cache dir, default "
        "source) with 1 MiB reads; the daemon's RSS sampled every 50 ms (psutil), each sample tagged with "
        "how far the reader had got. *Flat* compares the peak over the second GiB (and the rest) with the "
        "peak over the first GiB.",
        columns=["measure", "value"],
    )
    cache = ctx.cache_dir("rss")
    try:
        with ctx.mount(cache) as mount:
            if mount.daemon is None:
                raise BenchError("cannot find the daemon process of the mount")
            path = locate(mount, product)
            drop_page_cache()
            before = mount.daemon_rss() or 0
            ctx.twin.reset_stats()
            with RssSampler(mount.daemon) as rss, mount.watchdog(2 * READ_TIMEOUT, "2 GiB read"):
                result = read_sequential(path, progress=lambda done: setattr(rss, "position", done))
            after = mount.daemon_rss() or 0
            wire = ctx.wire()
    finally:
        remove_tree(cache)
    if result.nbytes != product.size:
        raise BenchError(f"read {result.nbytes} of {product.size} bytes")
    first_gib = rss.peak_between(1, GIB)
    later = rss.peak_between(GIB, product.size + 1)
    section.rows += [
        ["RSS after mount, before the read", f"{before / 1e6:.0f} MB"],
        ["peak RSS while reading the first GiB", f"{first_gib / 1e6:.0f} MB"],
        [f"peak RSS while reading the rest ({(product.size - GIB) / GIB:.2f} GiB)", f"{later / 1e6:.0f} MB"],
        ["RSS after the read", f"{after / 1e6:.0f} MB"],
        [f"peak RSS ({rss.samples} samples)", f"{rss.peak / 1e6:.0f} MB"],
        ["throughput of this read", f"{result.mb_s:.0f} MB/s"],
        ["file bytes on the wire / size", f"{wire.file_bytes / product.size:.3f}"],
    ]
    section.goals.append(Goal("peak daemon RSS reading 2 GiB", f"{rss.peak / 1e6:.0f} MB",
                              f"<= {RSS_GOAL_BYTES / 1e6:.0f} MB", rss.peak <= RSS_GOAL_BYTES))
    if first_gib and later:
        growth = later / first_gib - 1
        section.goals.append(Goal("flat in file size: peak RSS after the first GiB vs during it",
                                  f"{growth * 100:+.1f} %", f"<= +{RSS_FLAT_TOLERANCE * 100:.0f} %",
                                  growth <= RSS_FLAT_TOLERANCE))
    return section


# ------------------------------------------------------------------------------------------ (e) ls -l


def bench_listing(ctx: Context) -> Section:
    observation = LISTING_OBS
    section = Section(
        "listing", "`ls -l` of a 3,000-product observation",
        f"`ls -l /program/2733/{observation}/<dir>` of its biggest directory, as a child process. *Cold*: "
        "fresh mount on an empty cache dir, so this includes looking up the program, the observation and "
        "its product list. *Warm*: the same command again in the same mount. *After remount*: a fresh "
        "mount on the same cache dir (metadata from the disk cache). Requests = all requests the twin "
        "answered (MAST API + downloads + S3).",
        columns=["listing", "time (ms)", "requests", "bytes from the twin", "entries"],
    )
    relative = f"program/2733/{observation}/{_biggest_group(ctx, observation)}"
    samples: dict[str, list[tuple[float, Wire, int]]] = {"cold": [], "warm": [], "remount": []}
    for run in range(ctx.runs):
        cache = ctx.cache_dir(f"ls-{run}")
        try:
            with ctx.mount(cache) as mount:
                samples["cold"].append(_timed_ls(ctx, mount, relative))
                samples["warm"].append(_timed_ls(ctx, mount, relative))
            with ctx.mount(cache) as mount:
                samples["remount"].append(_timed_ls(ctx, mount, relative))
        finally:
            remove_tree(cache)
    for kind, label in (("cold", "cold (empty cache)"), ("warm", "warm (same mount)"),
                        ("remount", "after remount (disk metadata cache)")):
        runs = samples[kind]
        section.rows.append([label, spread([t * 1e3 for t, _, _ in runs], "{:.1f}"),
                             spread([w.total_requests for _, w, _ in runs]),
                             spread([w.total_bytes for _, w, _ in runs], "{:,.0f}"),
                             spread([n for *_, n in runs])])
    section.notes.append(f"directory: `/{relative}`")
    section.notes.append("s3fs and rclone listing the same products, in the same run: see the *peers* section.")
    return section


def _biggest_group(ctx: Context, observation: str) -> str:
    """The name of the observation's directory holding the most products (by mastfs's grouping rule)."""
    rows = next((ctx.catalog.product_rows(str(row["obsid"])) for row in ctx.catalog.observation_rows()
                 if row["obs_id"] == observation), None)
    if not rows:
        raise BenchError(f"the twin's catalog has no products for {observation}")
    groups = Counter(product_group(Product.from_row(row)) for row in rows)
    return groups.most_common(1)[0][0]


def _timed_ls(ctx: Context, mount: Mount, relative: str) -> tuple[float, Wire, int]:
    ctx.twin.reset_stats()
    began = time.perf_counter()
    try:
        result = subprocess.run(["ls", "-l", mount.path(relative)], capture_output=True, text=True,
                                timeout=LS_TIMEOUT)
    except subprocess.TimeoutExpired:
        mount.abort()
        raise BenchError(f"`ls -l {relative}` did not finish within {LS_TIMEOUT:.0f} s (mount aborted)") from None
    elapsed = time.perf_counter() - began
    if result.returncode != 0:
        raise BenchError(f"`ls -l {relative}` failed: {result.stderr.strip()[-400:]}")
    entries = sum(1 for line in result.stdout.splitlines() if not line.startswith("total"))
    return elapsed, ctx.wire(), entries


# ------------------------------------------------------------------------------- verification cost


VERIFY_SAMPLE = 256 * MIB


def bench_verify(ctx: Context) -> Section:
    """What versions and verification cost: CPU seconds per GiB of each check the read path runs, and
    the revalidation request each open sends (one HeadObject / HEAD, metadata: never paced by the link)."""
    from mastfs.blockcache import BLOCK_SIZE
    from mastfs.fitscheck import _record_sums

    section = Section(
        "verify", "Cost of versions and verification",
        "CPU seconds per GiB (one core, this machine) of the checks mastfs runs on the bytes it fetches: the "
        "per-record FITS sums behind each HDU's DATASUM/CHECKSUM (every `.fits` block, on the trio thread "
        "as it arrives), the whole-file MD5 of a single-part S3 object (its ETag; once the whole object is "
        "cached, in a worker thread, re-reading the cached blocks) and, for comparison, SHA-256. Then the "
        "time of the one revalidation request every open sends (HeadObject on S3, HEAD on HTTPS) to the "
        "twin; ranged GETs after it carry `If-Match`, which costs nothing measurable. The cold-read table "
        "above shows the whole cost end to end (its *open* column includes the revalidation).",
        columns=["check", "CPU s / GiB", "median ms"],
    )
    data = os.urandom(BLOCK_SIZE)
    blocks = VERIFY_SAMPLE // BLOCK_SIZE

    def cpu_per_gib(work) -> float:
        began = time.process_time()
        for index in range(blocks):
            work(index)
        return (time.process_time() - began) / (VERIFY_SAMPLE / GIB)

    section.rows.append(["FITS record sums (DATASUM/CHECKSUM)",
                         f"{cpu_per_gib(lambda i: _record_sums(65536 + i * BLOCK_SIZE, data)):.3f}", ""])
    md5, sha = hashlib.md5(), hashlib.sha256()
    section.rows.append(["whole-file MD5 (plain S3 ETag)", f"{cpu_per_gib(lambda i: md5.update(data)):.3f}", ""])
    section.rows.append(["whole-file SHA-256", f"{cpu_per_gib(lambda i: sha.update(data)):.3f}", ""])
    product = ctx.product(twin_catalog.BENCH_1GIB_URI)
    heads = []
    for _ in range(20 * ctx.runs):
        began = time.monotonic()
        ctx.s3.head_object(Bucket=ctx.bucket, Key=product.s3_key)
        heads.append(time.monotonic() - began)
    section.rows.append(["revalidation at open: HeadObject (boto3, twin on loopback)", "", f"{median(heads) * 1000:.1f}"])
    section.notes.append("the FITS sums run for every block of a `.fits` product not yet verified; the MD5 "
                         "only for objects whose ETag is a plain MD5 (single-part uploads, <= 8 MiB at MAST's "
                         "part size), so never for the 1 GiB products of the cold read.")
    return section
