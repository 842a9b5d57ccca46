"""Operational verbs of the CLI: status, prefetch, refresh, cache. They talk to a running daemon over its
control channel (:func:`mastfs.daemon.control_request`) or, for ``cache``, to the cache directory.

Output goes to stdout (results) and stderr (progress); every function returns the process exit code.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterable
from typing import Any, TextIO

from .config import Settings
from .errors import MastfsError

MOUNT_FSTYPE = "fuse.mastfs"


def mastfs_mounts() -> list[str]:
    """Mountpoints of every mastfs mount on this machine (from /proc/self/mounts; no stat of the mounts)."""
    mounts = []
    with open("/proc/self/mounts") as table:
        for line in table:
            fields = line.split()
            if len(fields) >= 3 and fields[2] == MOUNT_FSTYPE:
                mounts.append(fields[1].replace("\\040", " "))
    return mounts


def mount_of(path: str) -> tuple[str, str]:
    """``(mountpoint, inner_path)`` of the mastfs mount holding ``path``; raises MastfsError if none does."""
    full = os.path.abspath(path)
    for mountpoint in sorted(mastfs_mounts(), key=len, reverse=True):
        if full == mountpoint or full.startswith(mountpoint.rstrip("/") + "/"):
            return mountpoint, "/" + full[len(mountpoint):].strip("/")
    raise MastfsError(f"{path} is not inside a mastfs mount (mounted: {', '.join(mastfs_mounts()) or 'none'})")


def human_bytes(count: float) -> str:
    """``1536`` -> ``'1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _request(mountpoint: str, message: dict[str, Any], timeout: float | None = 30.0) -> Iterable[dict]:
    from .daemon import control_request

    return control_request(mountpoint, message, timeout=timeout)


def status_command(mountpoint: str | None, as_json: bool, out: TextIO = sys.stdout) -> int:
    """Print the status of one mount, or of every mastfs mount when ``mountpoint`` is None."""
    mountpoints = [mount_of(mountpoint)[0]] if mountpoint else mastfs_mounts()
    if not mountpoints:
        print("no mastfs mounts", file=out)
        return 0
    code = 0
    for point in mountpoints:
        try:
            answer = list(_request(point, {"op": "status"}))[-1]
        except MastfsError as exc:
            print(f"{point}: {exc}", file=out)
            code = 1
            continue
        if as_json:
            print(json.dumps(answer, indent=2, sort_keys=True), file=out)
        else:
            print(format_status(answer), file=out)
    return code


def format_status(status: dict[str, Any]) -> str:
    """The human-readable form of a daemon's status answer."""
    reader = status.get("reader", {})
    cache = status.get("cache", {})
    counters = reader.get("cache", {})
    lines = [
        f"{status.get('mountpoint')}: mastfs {status.get('version')} on {status.get('mast_url')} "
        f"(source {status.get('source')})",
        f"  cache     {human_bytes(cache.get('used', 0))} of {human_bytes(cache.get('limit', 0))} "
        f"in {cache.get('blocks', 0)} blocks at {cache.get('dir')}",
        f"  blocks    {counters.get('hits', 0)} hits, {counters.get('misses', 0)} misses, "
        f"{counters.get('corrupt_blocks', 0)} corrupt dropped",
    ]
    fetched = reader.get("bytes_fetched", {})
    lines.append("  fetched   " + (", ".join(f"{human_bytes(n)} from {source}" for source, n in sorted(fetched.items()))
                                  or "nothing yet"))
    requests = status.get("requests", {})
    if requests:
        lines.append("  requests  " + ", ".join(f"{name} {count}" for name, count in sorted(requests.items())))
    errors = reader.get("errors", {})
    lines.append("  errors    " + (", ".join(f"{name} {count}" for name, count in sorted(errors.items())) or "none"))
    in_flight = reader.get("in_flight", [])
    lines.append(f"  transfers {len(in_flight)} in flight")
    for transfer in in_flight:
        total = transfer.get("size") or transfer.get("total") or 0
        done = transfer.get("bytes_done", transfer.get("done", 0))
        percent = f"{100 * done / total:5.1f}%" if total else "  ?  "
        lines.append(f"    {percent} {human_bytes(done)} of {human_bytes(total)} via {transfer.get('source')} "
                     f"{transfer.get('uri')}")
    recent = reader.get("recent", [])
    if recent:
        lines.append("  recent products")
        for entry in recent:
            lines.append(f"    {entry.get('source'):5} {entry.get('uri')}")
    return "\n".join(lines)


class ProgressBar:
    """A one-line progress display (files, bytes, rate, ETA) redrawn on a terminal, else printed sparsely."""

    def __init__(self, stream: TextIO = sys.stderr, clock=time.monotonic) -> None:
        self.stream = stream
        self.clock = clock
        self.started = clock()
        self.tty = stream.isatty()
        self.last_draw = 0.0
        self.files_total = self.files_done = 0
        self.bytes_total = self.bytes_done = 0

    def line(self) -> str:
        elapsed = max(self.clock() - self.started, 1e-6)
        rate = self.bytes_done / elapsed
        fraction = self.bytes_done / self.bytes_total if self.bytes_total else 1.0
        eta = (self.bytes_total - self.bytes_done) / rate if rate > 0 else 0.0
        width = 24
        filled = int(width * min(fraction, 1.0))
        bar = "=" * filled + (">" if filled < width else "") + " " * max(width - filled - 1, 0)
        return (f"[{bar}] {fraction * 100:5.1f}%  {self.files_done}/{self.files_total} files  "
                f"{human_bytes(self.bytes_done)} / {human_bytes(self.bytes_total)}  "
                f"{human_bytes(rate)}/s  ETA {_duration(eta)}")

    def draw(self, force: bool = False) -> None:
        now = self.clock()
        if not force and now - self.last_draw < (0.2 if self.tty else 5.0):
            return
        self.last_draw = now
        if self.tty:
            self.stream.write("\r\033[K" + self.line())
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    def finish(self) -> None:
        self.draw(force=True)
        if self.tty:
            self.stream.write("\n")
        self.stream.flush()


def prefetch_command(paths: list[str], level: int | None, product_type: str | None, jobs: int | None,
                     out: TextIO = sys.stdout, progress_stream: TextIO = sys.stderr) -> int:
    """Warm the cache for every product below ``paths``; print a manifest (done, skipped, failed and why).

    Rerunning after an interruption resumes: what is cached is skipped. Returns 1 if any file failed.
    """
    bar = ProgressBar(progress_stream)
    summary = {"done": 0, "skipped": 0, "failed": 0, "bytes": 0}
    failures: list[tuple[str, str]] = []
    for path in paths:
        mountpoint, inner = mount_of(path)
        message = {"op": "prefetch", "path": inner, "level": level, "type": product_type, "jobs": jobs}
        base_done = bar.bytes_done
        for event in _request(mountpoint, message, timeout=None):
            kind = event.get("event")
            if kind == "start":
                bar.files_total += event.get("files", 0)
                bar.bytes_total += event.get("bytes", 0)
            elif kind == "progress":
                bar.bytes_done = base_done + event.get("bytes_cached", 0)
            elif kind == "file":
                bar.files_done += 1
                if event.get("status") == "failed":
                    failures.append((mountpoint.rstrip("/") + event.get("path", ""), event.get("reason", "")))
            elif kind == "summary":
                for key in summary:
                    summary[key] += event.get(key, 0)
            elif event.get("ok") is False:
                raise MastfsError(f"prefetch {path}: {event.get('error')}")
            bar.draw()
    bar.finish()
    print(f"prefetch: {summary['done']} done, {summary['skipped']} skipped (already cached or not readable), "
          f"{summary['failed']} failed; {human_bytes(summary['bytes'])} fetched", file=out)
    for path, reason in failures:
        print(f"  FAILED {path}: {reason}", file=out)
    return 1 if failures else 0


def refresh_command(path: str, out: TextIO = sys.stdout) -> int:
    """Drop cached metadata at and below ``path`` so the next listing asks MAST again."""
    mountpoint, inner = mount_of(path)
    answer = list(_request(mountpoint, {"op": "refresh", "path": inner}))[-1]
    if not answer.get("ok"):
        raise MastfsError(f"refresh {path}: {answer.get('error')}")
    print(f"refreshed {path}", file=out)
    return 0


def cache_command(action: str, settings: Settings, out: TextIO = sys.stdout) -> int:
    """``stats``, ``clear`` or ``verify`` the block cache in ``settings.cache_dir``.

    ``clear`` and ``verify`` refuse while a daemon uses that cache directory (unmount first).
    """
    import trio

    from .blockcache import BlockCache

    blocks_dir = os.path.join(settings.cache_dir, "blocks")
    users = [point for point in mastfs_mounts() if _daemon_cache_dir(point) == settings.cache_dir]
    if action != "stats" and users:
        raise MastfsError(f"the cache {settings.cache_dir} is in use by the mount at {', '.join(users)}; "
                          "unmount it first")

    async def run() -> int:
        cache = BlockCache(blocks_dir, settings.cache_size, settings.min_free_space)
        await cache.open()
        if action == "stats":
            used, limit = cache.usage()
            print(f"cache {settings.cache_dir}: {human_bytes(used)} of {human_bytes(limit)} "
                  f"({100 * used / limit if limit else 0:.1f}%) in {cache.entries} blocks", file=out)
        elif action == "clear":
            used, _ = cache.usage()
            await cache.clear()
            print(f"cleared {human_bytes(used)} from {settings.cache_dir}", file=out)
        else:
            report = await cache.verify()
            print(f"verified {report.blocks} blocks ({human_bytes(report.bytes)}): {report.corrupt} corrupt "
                  f"removed, {report.stray_files} stray files removed", file=out)
            return 1 if report.corrupt else 0
        return 0

    return trio.run(run)


def _daemon_cache_dir(mountpoint: str) -> str | None:
    try:
        answer = list(_request(mountpoint, {"op": "status"}, timeout=5.0))[-1]
    except MastfsError:
        return None
    return (answer.get("cache") or {}).get("dir")
