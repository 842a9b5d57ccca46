"""mastfs against its peers on the same twin, in the same run (issue 16): s3fs-fuse and rclone mount (both from
Debian, mounting the twin's S3 endpoint) and boto3 ``download_file`` (TransferManager defaults: what a user
would do instead of mounting).

Every measurement interleaves the configurations (A B C A B C ...), each on a fresh mount after dropping
the page cache, and records the wire (the twin's ``/__twin__/stats``: file bytes and requests), the
daemon's CPU seconds and peak RSS. :func:`bench_peers` returns one :class:`common.Section` with the issue's
table (rows: figures, columns: configurations) and its goals.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import psutil
from astropy.io import fits
from botocore import UNSIGNED
from botocore.config import Config
from common import (
    GIB,
    BenchError,
    CpuMeter,
    Goal,
    Mount,
    ReadResult,
    RssSampler,
    Section,
    TwinProcess,
    Wire,
    boto3_stream,
    drop_page_cache,
    median,
    mount_entry,
    prime_etags,
    read_sequential,
    remove_tree,
    spread,
)

from mastfs.twin import catalog as twin_catalog
from mastfs.twin import link as twin_link

S3_LIKE_LINK = twin_link.S3_LIKE
FAR_LINK = twin_link.FAR
LOOPBACK_LINK = twin_link.Link().to_json()
PEER_MOUNT_TIMEOUT = 60.0
READ_TIMEOUT = 600.0
LS_TIMEOUT = 300.0
S3FS_GOAL = 1.2
"""Cold read over a link: mastfs >= 1.2x s3fs ..."""
DOWNLOAD_GOAL = 0.8
"""... and >= 0.8x boto3 ``download_file`` (issue 16, point 1)."""
RSS_GOAL_BYTES = 200 * 1000 * 1000
PEERS = ("s3fs", "rclone")
S3FS_CACHED = "s3fs-cache"
"""s3fs with ``use_cache`` (its own disk cache), measured on loopback: issue 16 asks for a loopback cold read
at least as fast as it."""
MASTFS = ("mastfs-s3", "mastfs-http")
LABELS = {"mastfs-s3": "mastfs (S3)", "mastfs-http": "mastfs (HTTPS)", "s3fs": "s3fs 1.90", "rclone": "rclone 1.60",
          S3FS_CACHED: "s3fs 1.90 `use_cache`", "download": "boto3 `download_file`", "stream": "one boto3 stream"}


class PeerMount(Mount):
    """s3fs (``s3fs-cache``: with ``use_cache`` in ``cache_dir``) or rclone serving the twin's bucket at
    ``mountpoint``, in the foreground as our child process (``daemon``); files are at their S3 keys.
    Unmounting: ``umount``, then SIGTERM, then the Mount abort."""

    def __init__(self, kind: str, twin: TwinProcess, mountpoint: Path, cache_dir: Path) -> None:
        super().__init__(twin, mountpoint, cache_dir)
        self.kind = kind
        self.process: subprocess.Popen[bytes] | None = None

    def command(self) -> tuple[list[str], dict[str, str]]:
        endpoint, bucket = self.twin.info["s3_endpoint"], self.twin.info["bucket"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}  # rclone fails on AWS_CA_BUNDLE
        if self.kind.startswith("s3fs"):
            options = f"url={endpoint},use_path_request_style,public_bucket=1,ro,endpoint=us-east-1"
            if self.kind == S3FS_CACHED:
                options += f",use_cache={self.cache_dir}"
            return ["s3fs", bucket, self.mountpoint, "-f", "-o", options], env
        env["RCLONE_CONFIG"] = str(self.cache_dir / "rclone.conf")
        return ["rclone", "mount", f":s3:{bucket}", self.mountpoint, "--read-only", "--s3-provider", "Other",
                "--s3-endpoint", endpoint, "--s3-region", "us-east-1", "--cache-dir", str(self.cache_dir)], env

    def __enter__(self) -> PeerMount:
        os.makedirs(self.mountpoint, exist_ok=True)
        os.makedirs(self.cache_dir, exist_ok=True)
        command, env = self.command()
        log_file = open(self.cache_dir / f"{self.kind}.log", "wb")  # noqa: SIM115 (lives as long as the mount)
        self.process = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT)
        log_file.close()
        deadline = time.monotonic() + PEER_MOUNT_TIMEOUT
        while mount_entry(self.mountpoint) is None:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.force_cleanup()
                raise BenchError(f"{self.kind} did not mount: {(self.cache_dir / f'{self.kind}.log').read_text()[-600:]}")
            time.sleep(0.05)
        self.device = mount_entry(self.mountpoint)
        self.daemon = psutil.Process(self.process.pid)
        return self

    def unmount(self) -> None:
        if mount_entry(self.mountpoint) is not None:
            subprocess.run(["umount", self.mountpoint], capture_output=True, timeout=60)
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        if mount_entry(self.mountpoint) is not None:
            self.force_cleanup()

    def force_cleanup(self) -> None:
        self.abort()
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
        if mount_entry(self.mountpoint) is not None:
            subprocess.run(["umount", "-l", self.mountpoint], capture_output=True, timeout=30)


def peers_installed() -> list[str]:
    """The peers missing from PATH (``./run bench`` installs them from Debian)."""
    return [peer for peer in PEERS if shutil.which(peer) is None]


@dataclass
class Sample:
    """One configuration's run of one figure."""

    result: ReadResult | None = None
    seconds: float = 0.0
    wire: Wire | None = None
    cpu: float | None = None
    peak_rss: int | None = None


class PeerContext:
    """The twin, the scratch dir and a default boto3 client; :meth:`mounted` gives any configuration's mount."""

    def __init__(self, twin: TwinProcess, workdir: Path, runs: int) -> None:
        self.twin, self.workdir, self.runs = twin, workdir, runs
        self.catalog = twin_catalog.Catalog(scale=twin.scale)
        self.s3 = boto3.client("s3", endpoint_url=twin.info["s3_endpoint"], region_name="us-east-1",
                               config=Config(signature_version=UNSIGNED))
        self._count = 0

    @contextlib.contextmanager
    def mounted(self, config: str) -> Iterator[Mount]:
        """A fresh mount of ``config`` (mastfs-s3, mastfs-http, s3fs, rclone) on an empty cache dir."""
        self._count += 1
        cache = self.workdir / f"peer-cache-{self._count}"
        remove_tree(cache)
        mountpoint = self.workdir / f"peer-mnt{self._count}"
        if config in MASTFS:
            mount: Mount = Mount(self.twin, mountpoint, cache, source=config.split("-")[1])
        else:
            mount = PeerMount(config, self.twin, mountpoint, cache)
        try:
            with mount:
                yield mount
        finally:
            remove_tree(cache)

    def path(self, mount: Mount, product: twin_catalog.TwinProduct) -> str:
        if isinstance(mount, PeerMount):
            return mount.path(product.s3_key)
        from bench_read import locate  # the mastfs namespace layout

        return locate(mount, product)

    def measure(self, mount: Mount | None, action: Callable[[], ReadResult | float]) -> Sample:
        """Run ``action`` (a read, or anything returning seconds) with the wire, CPU and RSS measured."""
        daemon = mount.daemon if mount is not None else None
        self.twin.reset_stats()
        meter = CpuMeter(daemon=daemon)
        with RssSampler(daemon) as rss, meter:
            outcome = action()
        result = outcome if isinstance(outcome, ReadResult) else None
        seconds = result.seconds if result is not None else float(outcome)
        return Sample(result, seconds, Wire.from_stats(self.twin.stats()), meter.used.get("daemon"),
                      rss.peak if daemon is not None else None)

    def download(self, product: twin_catalog.TwinProduct) -> ReadResult:
        """boto3 ``download_file`` with TransferManager defaults into a local file (deleted afterwards)."""
        destination = self.workdir / "download.bin"
        began = time.perf_counter()
        try:
            self.s3.download_file(self.twin.info["bucket"], product.s3_key, str(destination))
            return ReadResult(destination.stat().st_size, time.perf_counter() - began)
        finally:
            destination.unlink(missing_ok=True)


def cold_reads(ctx: PeerContext, product: twin_catalog.TwinProduct, configs: list[str]) -> dict[str, list[Sample]]:
    """Interleaved cold sequential reads of ``product``: each round runs every configuration once."""
    samples: dict[str, list[Sample]] = {config: [] for config in configs}
    for _ in range(ctx.runs):
        for config in configs:
            drop_page_cache()
            if config == "download":
                sample = ctx.measure(None, lambda: ctx.download(product))
            elif config == "stream":
                sample = ctx.measure(None, lambda: boto3_stream(ctx.s3, ctx.twin.info["bucket"], product.s3_key))
            else:
                with ctx.mounted(config) as mount:
                    path = ctx.path(mount, product)
                    drop_page_cache()
                    with mount.watchdog(READ_TIMEOUT, f"cold read through {config}"):
                        sample = ctx.measure(mount, lambda path=path: read_sequential(path))
            if sample.result is None or sample.result.nbytes != product.size:
                raise BenchError(f"{config}: read {sample.result.nbytes if sample.result else 0} of {product.size} B")
            samples[config].append(sample)
    return samples


def header_reads(ctx: PeerContext, products: list[twin_catalog.TwinProduct],
                 configs: list[str]) -> dict[str, list[Sample]]:
    """``fits.getheader`` of an uncached big product through each configuration (a different product per round)."""
    samples: dict[str, list[Sample]] = {config: [] for config in configs}
    for product in products:
        for config in configs:
            with ctx.mounted(config) as mount:
                path = ctx.path(mount, product)

                def getheader(path: str = path) -> float:
                    began = time.perf_counter()
                    if "TELESCOP" not in fits.getheader(path):
                        raise BenchError(f"{path}: no TELESCOP card")
                    elapsed = time.perf_counter() - began
                    time.sleep(1.0)  # background readahead is counted too
                    return elapsed

                with mount.watchdog(READ_TIMEOUT, f"getheader through {config}"):
                    samples[config].append(ctx.measure(mount, getheader))
    return samples


def listings(ctx: PeerContext, directories: dict[str, str], configs: list[str]) -> dict[str, list[Sample]]:
    """``ls -l`` of a ~3,000-entry directory, cold then warm (same mount), per configuration."""
    samples: dict[str, list[Sample]] = {f"{config}:{kind}": [] for config in configs for kind in ("cold", "warm")}
    prime_twin_etags(ctx, directories["s3"])
    for _ in range(ctx.runs):
        for config in configs:
            with ctx.mounted(config) as mount:
                path = mount.path(directories["mastfs" if config in MASTFS else "s3"])
                for kind in ("cold", "warm"):
                    with mount.watchdog(LS_TIMEOUT, f"ls -l through {config}"):
                        samples[f"{config}:{kind}"].append(ctx.measure(mount, lambda path=path: _ls(path)))
    return samples


def prime_twin_etags(ctx: PeerContext, prefix: str) -> None:
    """:func:`prime_etags` of every object under ``prefix``: whichever configuration HEADs the ~3,000 files
    first (s3fs and rclone do; mastfs lists without HEADs) would otherwise pay about 100 s of the twin's
    one-time work."""
    bucket = ctx.twin.info["bucket"]
    prime_etags(ctx.s3, bucket, [item["Key"] for page in ctx.s3.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=prefix + "/") for item in page.get("Contents", [])])


def _ls(path: str) -> float:
    began = time.perf_counter()
    result = subprocess.run(["ls", "-l", path], capture_output=True, text=True, timeout=LS_TIMEOUT)
    if result.returncode != 0 or result.stdout.count("\n") < 100:
        raise BenchError(f"`ls -l {path}` failed or listed too little: {result.stderr.strip()[-300:]}")
    return time.perf_counter() - began


def listing_directories(ctx: PeerContext) -> dict[str, str]:
    """The biggest directory of the 3,000-product observation: in mastfs's namespace and in the bucket."""
    from bench_read import LISTING_OBS, _biggest_group

    rows = next(ctx.catalog.product_rows(str(row["obsid"])) for row in ctx.catalog.observation_rows()
                if row["obs_id"] == LISTING_OBS)
    keys = [product.s3_key for product in ctx.catalog.products()
            if product.s3_key and product.uri in {row["dataURI"] for row in rows}]
    prefixes: dict[str, int] = {}
    for key in keys:
        prefixes[key.rsplit("/", 1)[0]] = prefixes.get(key.rsplit("/", 1)[0], 0) + 1
    return {"mastfs": f"program/2733/{LISTING_OBS}/{_biggest_group(ctx, LISTING_OBS)}",
            "s3": max(prefixes, key=prefixes.get)}


def bench_peers(twin: TwinProcess, workdir: Path, runs: int) -> Section:
    """The issue-16 table: mastfs, s3fs, rclone and boto3 on the same twin, interleaved, with goals."""
    missing = peers_installed()
    if missing:
        raise BenchError(f"{', '.join(missing)} not installed (`./run bench` installs them from Debian)")
    ctx = PeerContext(twin, workdir, runs)
    big = sorted((p for p in ctx.catalog.products() if p.size >= GIB and p.s3_key and not p.exclusive
                  and p.filename.endswith(".fits")), key=lambda p: p.size)
    product = ctx.catalog.product(twin_catalog.BENCH_1GIB_URI)
    columns = [*MASTFS, *PEERS, S3FS_CACHED, "download", "stream"]
    section = Section(
        "peers", f"mastfs and its peers on the same twin ({product.size / GIB:.2f} GiB `{product.filename}`)",
        "s3fs-fuse and rclone mount (Debian packages, default options; rclone without a VFS cache; s3fs also "
        "with `use_cache` on loopback) read the "
        "twin's S3 endpoint; mastfs reads S3 or HTTPS. Each round runs every configuration once, in turn "
        f"(medians of {runs} rounds, min-max in brackets), each on a fresh mount and an empty cache dir after "
        "dropping the page cache. *boto3 `download_file`*: TransferManager defaults (10 threads, 8 MiB parts) "
        "into a local file, what a user would do instead; *one boto3 stream*: one `get_object`. Wire bytes "
        "and requests are what the twin counted; CPU and peak RSS are the FUSE daemon's.",
        columns=["figure", *[LABELS[c] for c in columns]])
    table: dict[str, dict[str, str]] = {}

    def row(name: str, values: dict[str, str]) -> None:
        table[name] = values

    def mbs(samples: dict[str, list[Sample]]) -> dict[str, float]:
        return {c: median([s.result.mb_s for s in runs_]) for c, runs_ in samples.items()}

    link_results: dict[str, dict[str, float]] = {}
    for name, link, configs in (("S3-like link", S3_LIKE_LINK, columns),
                                ("far link", FAR_LINK, [*MASTFS, *PEERS, "download"]),
                                ("loopback", LOOPBACK_LINK, [*MASTFS, *PEERS, S3FS_CACHED, "download", "stream"])):
        twin.set_link(link)
        try:
            samples = cold_reads(ctx, product, configs)
        finally:
            twin.set_link(LOOPBACK_LINK)
        speeds = mbs(samples)
        link_results[name] = speeds
        what = f"{link['first_byte_ms']:g} ms first byte, {link['stream_mb_s']:g} MB/s per connection" \
            if link["stream_mb_s"] else "no limits"
        row(f"cold read, {name} ({what}), MB/s",
            {c: spread([s.result.mb_s for s in samples[c]]) for c in configs})
        row(f"requests / wire bytes per size, {name}",
            {c: f"{median([s.wire.file_requests for s in samples[c]]):.0f} / "
                f"{median([s.wire.file_bytes for s in samples[c]]) / product.size:.2f}" for c in configs})
        mounted = [c for c in configs if c in (*MASTFS, *PEERS, S3FS_CACHED)]
        row(f"daemon CPU s per GiB, {name}",
            {c: spread([s.cpu / (product.size / GIB) for s in samples[c] if s.cpu is not None], "{:.2f}")
             for c in mounted})
        row(f"daemon peak RSS (MB), {name}", {c: spread([s.peak_rss / 1e6 for s in samples[c]]) for c in mounted})
        for config in MASTFS:
            rss = max(s.peak_rss for s in samples[config])
            section.goals.append(Goal(f"{LABELS[config]} peak RSS, cold read over the {name}", f"{rss / 1e6:.0f} MB",
                                      f"< {RSS_GOAL_BYTES / 1e6:.0f} MB", rss < RSS_GOAL_BYTES))
            if name == "loopback":
                cpu = median([s.cpu for s in samples[config]]) / median([s.cpu for s in samples["s3fs"]])
                section.goals.append(Goal(f"{LABELS[config]} daemon CPU per byte / s3fs's, loopback",
                                          f"{cpu:.2f}", "<= 1.0", cpu <= 1.0))
                ratios = [m.result.mb_s / p.result.mb_s
                          for m, p in zip(samples[config], samples[S3FS_CACHED], strict=True)]
                section.goals.append(Goal(f"{LABELS[config]} / s3fs `use_cache`, cold read over the loopback",
                                          f"{median(ratios):.2f}", ">= 1.0", median(ratios) >= 1.0))
                continue
            for peer, goal, label in (("s3fs", S3FS_GOAL, "s3fs"), ("download", DOWNLOAD_GOAL, "boto3 download_file")):
                ratios = [m.result.mb_s / p.result.mb_s for m, p in zip(samples[config], samples[peer], strict=True)]
                section.goals.append(Goal(f"{LABELS[config]} / {label}, cold read over the {name}",
                                          f"{median(ratios):.2f}", f">= {goal:.1f}", median(ratios) >= goal))

    headers = header_reads(ctx, big[: ctx.runs], [*MASTFS, *PEERS])
    row("wire bytes of `fits.getheader` of an uncached >= 1 GiB file",
        {c: spread([s.wire.file_bytes for s in runs_], "{:,.0f}") for c, runs_ in headers.items()})
    directories = listing_directories(ctx)
    listed = listings(ctx, directories, [MASTFS[0], *PEERS])
    for kind in ("warm", "cold"):
        row(f"{kind} `ls -l` of ~3,000 entries (s / requests)",
            {c: f"{median([s.seconds for s in listed[f'{c}:{kind}']]):.2f} / "
                f"{median([s.wire.total_requests for s in listed[f'{c}:{kind}']]):.0f}" for c in [MASTFS[0], *PEERS]})
    warm = {c: median([s.seconds for s in listed[f"{c}:warm"]]) for c in [MASTFS[0], *PEERS]}
    section.goals.append(Goal("warm `ls -l` of ~3,000 entries, mastfs / rclone (time)",
                              f"{warm[MASTFS[0]] / warm['rclone']:.2f}", "<= 1.0", warm[MASTFS[0]] <= warm["rclone"]))
    section.rows = [[name, *[values.get(c, "") for c in columns]] for name, values in table.items()]
    section.notes.append(f"directories listed: mastfs `/{directories['mastfs']}`, peers `/{directories['s3']}` "
                         "(the same products' S3 prefix)")
    section.notes.append("getheader products: " + ", ".join(f"`{p.filename}`" for p in big[: ctx.runs]))
    loop = link_results["loopback"]
    section.notes.append("loopback cold read, mastfs (S3) / s3fs: "
                         f"{loop['mastfs-s3'] / loop['s3fs']:.2f}; the far-link figures use the same file")
    return section
