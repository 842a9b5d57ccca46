"""mast:// (fsspec) benchmarks: cold sequential read against direct clients, header and cutout bytes.

- cold read of the 1 GiB product through ``fsspec`` (``MastFileSystem.open``, 1 MiB ``read()`` calls, a
  fresh cache directory each run) against a direct boto3 ``get_object`` stream of the same object, over
  the twin's S3-like link (goal >= 2x: the reader's parallel ranged requests) and on loopback (goal
  >= 0.8x: no FUSE here, so only the block cache's work separates the two);
- the wire bytes of ``astropy.io.fits.open("mast://...", use_fsspec=True)`` reading a header (goal
  <= 64 KiB) and of ``hdul[1].section[100:200, 100:200]`` of the uncached mosaic.

``bench_remote(ctx)`` is wired into bench/run_all.py (``--only remote``); standalone, at any scale:
``.venv/bin/python bench/bench_remote.py --scale 0.05 --runs 1`` (no root needed).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from common import (
    MIB,
    Goal,
    ReadResult,
    Section,
    TwinProcess,
    boto3_ranges,
    boto3_stream,
    median,
    prime_etags,
    remove_tree,
    s3_client,
    scratch_dir,
    spread,
)

from mastfs.blockcache import BLOCK_SIZE
from mastfs.config import OPTIONS
from mastfs.reader import RUN_BLOCKS
from mastfs.twin import catalog as twin_catalog
from mastfs.twin import link as twin_link

LOOPBACK_GOAL = 0.8
S3_LIKE_GOAL = 2.0
HEADER_GOAL_BYTES = 64 * 1024
TRANSFERS = next(option.default for option in OPTIONS if option.name == "transfers")
RUN_BYTES = RUN_BLOCKS * BLOCK_SIZE
"""The direct reference with mastfs's request pattern: one ranged GET of a default run per transfer slot."""
LINKS = (("S3-like link", twin_link.S3_LIKE, S3_LIKE_GOAL), ("loopback", twin_link.Link().to_json(), LOOPBACK_GOAL))


def _filesystem(twin: TwinProcess, cache_dir: Path):
    from mastfs.remote import MastFileSystem

    info = twin.info
    return MastFileSystem(mast_url=info["mast_url"], resolver_url=info["resolver_url"],
                          s3_endpoint=info["s3_endpoint"], cache_dir=str(cache_dir))


def _product_path(fs, uri: str) -> str:
    observation = uri.rsplit("/", 1)[1].rsplit("_", 1)[0]
    for entry in fs.ls(f"program/{twin_catalog.PROGRAM_2733}/{observation}/level3"):
        if entry.get("uri") == uri:
            return entry["name"]
    raise LookupError(f"{uri} not under {observation}/level3")


def _fsspec_read(fs, path: str) -> ReadResult:
    total = 0
    began = time.perf_counter()
    with fs.open(path, "rb") as handle:
        while chunk := handle.read(MIB):
            total += len(chunk)
    return ReadResult(total, time.perf_counter() - began)


def _file_bytes(twin: TwinProcess) -> int:
    endpoints = twin.stats()["endpoints"]
    return sum(endpoints.get(key, {}).get("bytes_sent", 0) for key in ("s3:GetObject", "download"))


def bench_remote(twin: TwinProcess, workdir: Path, runs: int) -> Section:
    """Run every mast:// measurement on ``twin`` (any scale); returns the report section."""
    from astropy.io import fits

    uri = twin_catalog.BENCH_1GIB_URI
    s3 = s3_client(twin)
    section = Section(
        "remote", "mast:// (fsspec): cold read, header and cutout bytes",
        "Through `fsspec` in this process (`MastFileSystem`, one trio core thread), no mount: the 1 GiB "
        "product read with 1 MiB `read()` calls on a fresh cache directory (services started and the "
        "file's metadata known before the clock starts, as in a mount that is up), against a direct boto3 "
        "`get_object` stream (1 MiB chunks) of the same object and the same object read as ranged GETs "
        "with mastfs's request pattern (one 8 MiB run per transfer slot, into memory), back to back in "
        "each run (the goal is against the stream; *ratio to the ranges* tells what the twin's serving of "
        "parallel ranges allows); then the bytes "
        "astropy (`use_fsspec=True`) pulls for a header and for a 100 x 100 `.section` cutout.",
        columns=["link", "direct boto3 MB/s", f"boto3 {TRANSFERS} x {RUN_BYTES // MIB} MiB ranges MB/s",
                 "mast:// MB/s", "ratio", "ratio to the ranges", "wire bytes / size"],
    )
    probe = _filesystem(twin, workdir / "remote-probe")
    path = _product_path(probe, uri)
    size = probe.info(path)["size"]
    s3_key = probe.open_product(path).ref.s3_key
    prime_etags(s3, twin.info["bucket"], [s3_key])  # a standalone run has no warm-up
    for label, link, goal in LINKS:
        twin.set_link(link)
        ratios, direct_rates, remote_rates, wire, ranged_rates, ranged_ratios = [], [], [], [], [], []
        for run in range(runs):
            direct = boto3_stream(s3, twin.info["bucket"], s3_key)
            ranged = boto3_ranges(s3, twin.info["bucket"], s3_key, size, RUN_BYTES, TRANSFERS)
            cache = workdir / f"remote-{label.split()[0]}-{run}"
            fs = _filesystem(twin, cache)
            fs.info(path)  # services started and metadata known, as in a mount that is up (not timed)
            twin.reset_stats()
            remote = _fsspec_read(fs, path)
            wire.append(_file_bytes(twin) / size)
            if remote.nbytes != size or direct.nbytes != size:
                raise RuntimeError(f"short read: mast:// {remote.nbytes}, direct {direct.nbytes} of {size}")
            direct_rates.append(direct.mb_s)
            ranged_rates.append(ranged.mb_s)
            remote_rates.append(remote.mb_s)
            ratios.append(remote.mb_s / direct.mb_s)
            ranged_ratios.append(remote.mb_s / ranged.mb_s)
            remove_tree(cache)
        section.rows.append([label, spread(direct_rates), spread(ranged_rates), spread(remote_rates),
                             spread(ratios, "{:.2f}"), spread(ranged_ratios, "{:.2f}"), spread(wire, "{:.3f}")])
        section.goals.append(Goal(f"cold read over the {label}, mast:// / direct boto3", f"{median(ratios):.2f}",
                                  f">= {goal:g}", median(ratios) >= goal))
    twin.set_link(twin_link.Link().to_json())

    cache = workdir / "remote-astropy"
    options = dict(mast_url=twin.info["mast_url"], resolver_url=twin.info["resolver_url"],
                   s3_endpoint=twin.info["s3_endpoint"], cache_dir=str(cache))
    twin.reset_stats()
    with fits.open(f"mast://{path}", use_fsspec=True, fsspec_kwargs=options) as hdul:
        telescope = hdul[0].header["TELESCOP"]
        header_bytes = _file_bytes(twin)
        shape = hdul[1].shape
        twin.reset_stats()
        cutout = hdul[1].section[100:200, 100:200]
        cutout_bytes = _file_bytes(twin)
    remove_tree(cache)
    section.goals.append(Goal("header read by astropy (use_fsspec), bytes on the wire", f"{header_bytes:,}",
                              f"<= {HEADER_GOAL_BYTES:,}", 0 < header_bytes <= HEADER_GOAL_BYTES))
    section.notes.append(f"header: TELESCOP={telescope}, {header_bytes:,} B on the wire. `.section[100:200, "
                         f"100:200]` of the {shape[0]} x {shape[1]} SCI image ({cutout.nbytes:,} B of pixels): "
                         f"{cutout_bytes:,} B on the wire (whole cache blocks: 64 KiB first, 4 MiB after; "
                         f"{size:,} B file).")
    return section


def main() -> int:
    parser = argparse.ArgumentParser(description="mast:// benchmarks against a twin of the given scale.")
    parser.add_argument("--scale", type=float, default=1.0, help="twin file-size scale (1 = real sizes)")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with scratch_dir() as workdir, TwinProcess(workdir, scale=args.scale) as twin:
        print(bench_remote(twin, workdir, args.runs).markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
