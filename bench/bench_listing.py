"""Listing benchmarks at the real archive's size and pace (issue 10), through the kernel.

- ``bench_large_listing``: the twin's 300,607-product JWST mosaic observation (MOSAIC_OBS_ID). Cold
  ``find DIR -type f | wc -l`` on an empty cache (wall time, MAST requests, product pages, files found),
  then ``ls -l auxiliary/`` (about 290,000 entries) warm in the same mount (requests: must be 0), the
  daemon's peak RSS over both (goal: < 250 MB), and its RSS after the kernel forgot the inodes and the
  listing's memo expired (goal: within 60 MB of idle).
- ``bench_slow_query``: an observation whose ``Mast.Caom.Products`` query takes ``query_seconds`` (90 s
  by default, held first byte) on the server, listed by several ``ls -l`` at once: wall time of each and
  how many product queries MAST saw (goal: one).

Both are wired into bench/run_all.py (``--only large-listing,slow-query``). Run alone at a small setting
to check the harness: ``.venv/bin/python bench/bench_listing.py --query-seconds 5`` (root; its own twin).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BenchError, Goal, Mount, RssSampler, Section, TwinProcess, scratch_dir  # noqa: E402

from mastfs.tree import MEMO_TTL  # noqa: E402
from mastfs.twin import catalog as twin_catalog  # noqa: E402

RSS_GOAL_MB = 250
LISTING_TIMEOUT = 1800.0
SLOW_QUERY_SECONDS = 90.0
CONCURRENT_LISTERS = 4
SETTLE_SECONDS = MEMO_TTL + 15.0
"""How long to wait for the daemon's memory to settle after the kernel forgot the inodes: the listing's
memo expires (MEMO_TTL), then the daemon's trim loop (every 2 s) hands the heap back."""
FALLBACK_MB = 60
"""Goal: the daemon's RSS after the kernel forgot ends within this much of its idle RSS."""


def _run(command: str, timeout: float = LISTING_TIMEOUT) -> tuple[float, str]:
    """(wall seconds, stdout) of a shell command; raises BenchError when it fails."""
    began = time.perf_counter()
    try:
        result = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BenchError(f"`{command}` did not finish within {timeout:.0f} s") from None
    if result.returncode != 0:
        raise BenchError(f"`{command}` failed: {result.stderr.strip()[-400:]}")
    return time.perf_counter() - began, result.stdout


def _product_requests(twin: TwinProcess) -> int:
    return twin.stats()["endpoints"].get("invoke:Mast.Caom.Products", {}).get("requests", 0)


def _forget_kernel_inodes() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as drop:
        drop.write("2\n")


def bench_large_listing(twin: TwinProcess, workdir: Path) -> Section:
    section = Section(
        "large-listing", "Listing a 300,000-product observation",
        f"`/obs/{twin_catalog.MOSAIC_OBS_ID}`: the twin's JWST mosaic whose `Mast.Caom.Products` answer holds "
        "300,607 rows (mostly guide-star files in `auxiliary/`). *Cold*: `find DIR -type f | wc -l` in a "
        "fresh mount on an empty cache dir (the product query, its pages, packing, layout and every "
        "directory). *Warm*: `ls -l auxiliary/` afterwards in the same mount. RSS is the daemon's, sampled "
        "every 50 ms; *after forget* is its RSS once the kernel dropped the inodes (`drop_caches`) and the "
        "listing's 60 s memo expired.",
        columns=["step", "wall (s)", "MAST requests", "product pages", "files / entries", "daemon RSS (MB)"],
    )
    observation = f"obs/{twin_catalog.MOSAIC_OBS_ID}"
    with Mount(twin, workdir / "mnt-large", workdir / "cache-large") as mount:
        idle_mb = mount.daemon_rss() / 2**20 if mount.daemon_rss() else float("nan")
        with RssSampler(mount.daemon) as sampler:
            twin.reset_stats()
            # recommended/ shows some products a second time (same inode): count each product once
            cold_s, found = _run(f"find {mount.path(observation)} -path '*/recommended' -prune -o -type f -print "
                                 "| wc -l")
            cold_requests = twin.stats()["total_requests"]
            pages = _product_requests(twin)
            twin.reset_stats()
            warm_s, listing = _run(f"ls -l {mount.path(observation + '/auxiliary')}")
            warm_requests = twin.stats()["total_requests"]
            peak_mb = sampler.peak / 2**20
            listed_mb = sampler.current / 2**20
        entries = sum(1 for line in listing.splitlines() if not line.startswith("total"))
        _forget_kernel_inodes()
        time.sleep(SETTLE_SECONDS)
        _forget_kernel_inodes()
        time.sleep(5)
        after = mount.daemon_rss()
        after_mb = after / 2**20 if after else float("nan")
    section.rows += [
        ["idle (mounted)", "", "", "", "", f"{idle_mb:.0f}"],
        ["cold `find -type f | wc -l`", f"{cold_s:.1f}", str(cold_requests), str(pages), found.strip(),
         f"{listed_mb:.0f}"],
        ["warm `ls -l auxiliary/`", f"{warm_s:.1f}", str(warm_requests), "0", str(entries), f"{listed_mb:.0f}"],
        ["after the kernel forgot the inodes", "", "", "", "", f"{after_mb:.0f}"],
    ]
    section.goals += [
        Goal("every product listed", f"{found.strip()} files", f"{300_607 + 2} (products + 2 sidecars)",
             found.strip() == str(300_607 + 2)),
        Goal("warm `ls -l` asks MAST nothing", f"{warm_requests} requests", "0", warm_requests == 0),
        Goal("daemon peak RSS", f"{peak_mb:.0f} MB", f"< {RSS_GOAL_MB} MB", peak_mb < RSS_GOAL_MB),
        Goal("RSS falls back after the kernel forgets", f"{after_mb:.0f} MB",
             f"< idle + {FALLBACK_MB} MB ({idle_mb + FALLBACK_MB:.0f} MB)", after_mb < idle_mb + FALLBACK_MB),
    ]
    return section


def bench_slow_query(twin: TwinProcess, workdir: Path, query_seconds: float = SLOW_QUERY_SECONDS,
                     listers: int = CONCURRENT_LISTERS) -> Section:
    section = Section(
        "slow-query", f"A listing against a {query_seconds:.0f} s query",
        f"MAST takes {query_seconds:.0f} s to answer the product query of "
        f"`{twin_catalog.OBS_2733_MIRI_F1130W}` (twin fault `slow_query`, held first byte). {listers} "
        "`ls -l level2/` start at once; the daemon must send one query whatever the number of waiters, "
        "and each `ls` ends when the answer is in.",
        columns=["ls", "wall (s)", "entries"],
    )
    program = twin_catalog.PROGRAM_2733
    relative = f"program/{program}/{twin_catalog.OBS_2733_MIRI_F1130W}/level2"
    with Mount(twin, workdir / "mnt-slow", workdir / "cache-slow",
               extra_args=("--query-timeout", f"{max(600.0, 2 * query_seconds):.0f}s")) as mount:
        _run(f"ls {mount.path('program/' + program)}")
        twin._admin("/__twin__/faults", method="POST", body=json.dumps(
            {"endpoint": "invoke", "kind": "slow_query", "count": 1, "match": "Mast.Caom.Products",
             "seconds": query_seconds, "shape": "first_byte"}).encode())
        twin.reset_stats()
        results: list[tuple[float, str] | BaseException] = [BenchError("did not run")] * listers

        def lister(index: int) -> None:
            try:
                results[index] = _run(f"ls -l {mount.path(relative)}", timeout=query_seconds + 600)
            except BaseException as exc:  # reported below
                results[index] = exc

        threads = [threading.Thread(target=lister, args=(i,)) for i in range(listers)]
        for thread in threads:
            thread.start()
        time.sleep(min(5.0, query_seconds / 2))
        status = subprocess.run([sys.executable, "-m", "mastfs", "status", "--json", mount.mountpoint],
                                capture_output=True, text=True, timeout=60)
        in_flight = len(json.loads(status.stdout).get("mast", {}).get("queries", [])) if status.stdout else -1
        for thread in threads:
            thread.join()
        queries = _product_requests(twin)
        twin._admin("/__twin__/faults", method="DELETE")
    for index, result in enumerate(results):
        if isinstance(result, BaseException):
            raise BenchError(f"ls {index + 1}: {result}")
        wall, text = result
        section.rows.append([str(index + 1), f"{wall:.1f}",
                             str(sum(1 for line in text.splitlines() if not line.startswith("total")))])
    walls = [result[0] for result in results if not isinstance(result, BaseException)]
    section.goals += [
        Goal("product queries sent to MAST", str(queries), "1", queries == 1),
        Goal("queries in flight shown by `mastfs status` while waiting", str(in_flight), "1", in_flight == 1),
        Goal("each ls ends with the answer", f"{max(walls):.1f} s", f"< {query_seconds + 30:.0f} s",
             max(walls) < query_seconds + 30),
    ]
    return section


def main() -> int:
    parser = argparse.ArgumentParser(description="Run the listing benchmarks once against a twin of their own.")
    parser.add_argument("--query-seconds", type=float, default=SLOW_QUERY_SECONDS)
    parser.add_argument("--listers", type=int, default=CONCURRENT_LISTERS)
    parser.add_argument("--skip-large", action="store_true", help="only the slow-query benchmark")
    args = parser.parse_args()
    with scratch_dir() as workdir, TwinProcess(workdir, scale=0.001) as twin:
        sections = [bench_slow_query(twin, workdir, args.query_seconds, args.listers)]
        if not args.skip_large:
            sections.append(bench_large_listing(twin, workdir))
    print("\n".join(section.markdown() for section in sections))
    return 0


if __name__ == "__main__":
    sys.exit(main())
