"""Operational verbs of the CLI: status, prefetch, refresh, cache. They talk to a running daemon over its
control channel (:func:`mastfs.control.control_request`) or, for ``cache``, to the cache directory.

Output goes to stdout (results) and stderr (progress); every function returns the process exit code.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TextIO

from .config import Settings
from .errors import MastfsError
from .mounts import mastfs_mounts, mount_of


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


def _request(mountpoint: str, message: dict[str, Any], timeout: float | None = 30.0) -> Iterable[dict[str, Any]]:
    from .control import control_request

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
    """The human-readable form of a daemon's status answer (see :mod:`mastfs.control`)."""
    reader = status.get("reader", {})
    cache = status.get("cache", {})
    counters = reader.get("cache", {})
    used, limit = cache.get("used", 0), cache.get("limit", 0)
    lines = [
        f"{status.get('mountpoint')}: mastfs {status.get('version')} on {status.get('mast_url')} "
        f"(source {status.get('source')})",
        f"  cache     {human_bytes(used)} of {human_bytes(limit)} ({100 * used / limit if limit else 0:.1f}%) "
        f"in {cache.get('blocks', 0)} blocks at {cache.get('dir')}",
        f"  blocks    {counters.get('memory_hits', 0) + counters.get('disk_hits', 0)} hits "
        f"({counters.get('memory_hits', 0)} from memory), {counters.get('misses', 0)} misses, "
        f"{counters.get('readahead_blocks', 0)} read ahead, {counters.get('corrupt_blocks', 0)} corrupt dropped",
    ]
    fetched = reader.get("bytes_fetched", {})
    lines.append("  fetched   " + (", ".join(f"{human_bytes(n)} from {source}" for source, n in sorted(fetched.items()))
                                  or "nothing yet"))
    lines.append(f"  requests  {counters.get('requests', 0)} for file bytes")
    mast = status.get("mast", {})
    if mast:
        sent, failed = mast.get("requests", {}), mast.get("errors", {})
        lines.append("  MAST API  " + (", ".join(f"{name} {count} ({failed.get(name, 0)} failed)"
                                                 for name, count in sorted(sent.items())) or "no requests yet"))
        queries = mast.get("queries", [])
        lines.append(f"  queries   {len(queries)} metadata queries in flight")
        for query in queries:
            pages = (f"page {query.get('pages', 0)} of {query.get('pages_total')}" if query.get("pages_total")
                     else "no page yet")
            waits = f", {query.get('polls', 0)} EXECUTING polls" if query.get("polls") else ""
            errors = f", {query.get('transient_errors')} transient errors" if query.get("transient_errors") else ""
            lines.append(f"    {_duration(query.get('seconds', 0))} {pages} ({query.get('rows', 0)} rows{waits}"
                         f"{errors}): {query.get('what')}")
    problems = [f"{name} {count}" for name, count in sorted(reader.get("errors", {}).items())]
    failed_calls = sum(mast.get("errors", {}).values())
    if failed_calls:
        problems.append(f"{failed_calls} failed MAST API call{'s' if failed_calls != 1 else ''}")
    lines.append("  errors    " + (", ".join(problems) or "none"))
    last = mast.get("last_error")
    if last:
        when = datetime.fromtimestamp(last["time"]).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
        lines.append(f"  last error {when}: {last['message']}")
    probe = status.get("mast_probe") or {}
    if probe.get("state") == "unreachable":
        lines.append(f"  WARNING   MAST could not be reached when mounting: {probe.get('problem')}")
    lines.append(f"  signals   {status.get('interrupted', 0)} waits ended early by a signal to the requester")
    tree = status.get("tree", {})
    lines.append(f"  metadata  {tree.get('nodes', 0)} inodes in memory ({tree.get('kernel_inodes', 0)} known to the "
                 f"kernel), {tree.get('memos', 0)} listings memoised")
    token = status.get("token")
    if token:
        checked = token.get("last_check")
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(checked)) if checked else "never"
        lines.append(f"  token     {token.get('state')} (from {token.get('source')}; MAST user "
                     f"{token.get('ezid') or '-'}; last checked {when}; renewed {token.get('renewals', 0)} times)")
    in_flight = reader.get("in_flight", [])
    waiting, slots = reader.get("waiting", {}), reader.get("slots", {})
    lines.append(f"  transfers {len(in_flight)} in flight, {slots.get('busy', 0)} of {slots.get('total', 0)} slots "
                 f"busy, {waiting.get('runs', 0)} waiting for a slot; {waiting.get('reads', 0)} reads waiting "
                 "for bytes")
    for transfer in in_flight:
        total = transfer.get("bytes_total") or 0
        done = transfer.get("bytes_done", 0)
        percent = f"{100 * done / total:5.1f}%" if total else "    ?"
        lines.append(f"    {percent} {human_bytes(done)} of {human_bytes(total)} via {transfer.get('source')} "
                     f"{transfer.get('uri')}")
    recent = reader.get("recent", [])
    if recent:
        lines.append("  recent products (newest first)")
        for entry in recent:
            lines.append(f"    {entry.get('source'):5} {entry.get('uri')}")
    return "\n".join(lines)


class ProgressBar:
    """A one-line progress display (percent, files, bytes, rate, ETA): redrawn in place on a terminal,
    else printed as a new line every ``quiet_interval`` seconds."""

    def __init__(self, stream: TextIO = sys.stderr, clock: Callable[[], float] = time.monotonic,
                 quiet_interval: float = 5.0) -> None:
        self.stream = stream
        self.clock = clock
        self.started = clock()
        self.tty = stream.isatty()
        self.interval = 0.2 if self.tty else quiet_interval
        self.last_draw: float | None = None
        self.files_total = self.files_done = 0
        self.bytes_total = self.bytes_done = 0
        self.bytes_not_fetched = 0
        """Bytes counted as done without a transfer (already cached, skipped or failed): not in the rate."""

    def line(self) -> str:
        elapsed = max(self.clock() - self.started, 1e-6)
        rate = max(self.bytes_done - self.bytes_not_fetched, 0) / elapsed
        fraction = min(self.bytes_done / self.bytes_total, 1.0) if self.bytes_total else 1.0
        left = max(self.bytes_total - self.bytes_done, 0)
        eta = _duration(left / rate) if rate > 0 else ("0:00:00" if not left else "-:--:--")
        width = 24
        filled = int(width * fraction)
        bar = "=" * filled + (">" if filled < width else "") + " " * max(width - filled - 1, 0)
        return (f"[{bar}] {fraction * 100:5.1f}%  {self.files_done}/{self.files_total} files  "
                f"{human_bytes(self.bytes_done)} / {human_bytes(self.bytes_total)}  "
                f"{human_bytes(rate)}/s  ETA {eta}")

    def draw(self, force: bool = False) -> None:
        now = self.clock()
        if not force and self.last_draw is not None and now - self.last_draw < self.interval:
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


@dataclass
class _FileResult:
    """One line of a prefetch manifest: the file's path on this machine, its size, ``done``, ``skipped``
    or ``failed``, and why (empty for done)."""

    path: str
    size: int
    status: str
    reason: str


def prefetch_command(paths: list[str], level: int | None, product_type: str | None, jobs: int | None,
                     out: TextIO = sys.stdout, progress_stream: TextIO = sys.stderr,
                     recommended: bool = False) -> int:
    """Warm the cache for every product below ``paths`` (only MAST's "Minimum Recommended Products" when
    ``recommended``), drawing a progress bar on ``progress_stream``;
    then print a manifest to ``out``: one line per file (done, skipped or failed, and why) and a summary.

    Rerunning after an interruption resumes: what is cached is skipped. Returns 0 when nothing failed,
    1 if any file failed, 130 when interrupted (Ctrl-C; the manifest then lists what finished).
    """
    bar = ProgressBar(progress_stream)
    fetched = 0
    results: list[_FileResult] = []
    try:
        for path in paths:
            mountpoint, inner = mount_of(path)
            message = {"op": "prefetch", "path": inner, "level": level, "type": product_type, "jobs": jobs,
                       "recommended": recommended}
            base_done = bar.bytes_done
            finished_bytes = 0
            for event in _request(mountpoint, message, timeout=None):
                kind = event.get("event")
                if kind == "start":
                    bar.files_total += event.get("files", 0)
                    bar.bytes_total += event.get("bytes", 0)
                elif kind == "progress":
                    bar.bytes_done = base_done + max(event.get("bytes_cached", 0), finished_bytes)
                elif kind == "file":
                    result = _FileResult(mountpoint.rstrip("/") + event.get("path", ""), event.get("size", 0),
                                         event.get("status", "failed"), event.get("reason") or "")
                    results.append(result)
                    bar.files_done += 1
                    finished_bytes += result.size
                    bar.bytes_done = max(bar.bytes_done, base_done + finished_bytes)
                    fetched += event.get("fetched") or 0
                    bar.bytes_not_fetched += result.size - (event.get("fetched") or 0)
                elif kind is None and event.get("ok") is False:
                    raise MastfsError(f"prefetch {path}: {event.get('error')}")
                bar.draw()
    except KeyboardInterrupt:
        bar.finish()
        _print_manifest(results, fetched, bar, out)
        print(f"prefetch: interrupted after {len(results)} of {bar.files_total} files; run the same command "
              "again to resume (what is cached is skipped)", file=out)
        return 130
    bar.finish()
    _print_manifest(results, fetched, bar, out)
    return 1 if any(result.status == "failed" for result in results) else 0


def _print_manifest(results: list[_FileResult], fetched: int, bar: ProgressBar, out: TextIO) -> None:
    """One line per file, then ``prefetch: N files, SIZE: a done, b skipped (why), c failed; ...``."""
    for result in results:
        why = f"  ({result.reason})" if result.reason else ""
        print(f"{result.status:8} {human_bytes(result.size):>10}  {result.path}{why}", file=out)
    counts = Counter(result.status for result in results)
    skipped_why = Counter(result.reason for result in results if result.status == "skipped")
    skipped = f"{counts['skipped']} skipped" + (
        " (" + ", ".join(f"{n} {reason}" for reason, n in skipped_why.most_common()) + ")" if skipped_why else "")
    print(f"prefetch: {len(results)} files, {human_bytes(sum(r.size for r in results))}: {counts['done']} done, "
          f"{skipped}, {counts['failed']} failed; {human_bytes(fetched)} fetched in "
          f"{_duration(bar.clock() - bar.started)}", file=out)


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

    While a mount uses that cache directory, ``stats`` asks its daemon (opening the cache here would
    disturb the daemon's unfinished writes) and ``clear`` and ``verify`` refuse (raise MastfsError:
    unmount first). ``verify`` returns 1 when it found (and removed) corrupt blocks or whole files that
    failed a check.
    """
    import trio

    from .blockcache import BlockCache

    blocks_dir = settings.blocks_dir
    users = {point: answer for point in mastfs_mounts()
             if (answer := _daemon_status(point)) is not None
             and os.path.realpath(str(answer["cache"].get("dir"))) == os.path.realpath(settings.cache_dir)}
    if users and action != "stats":
        raise MastfsError(f"cannot {action} the cache {settings.cache_dir}: it is in use by the mount at "
                          f"{', '.join(users)}; unmount it first (mastfs umount MOUNTPOINT)")
    if users:
        point, answer = next(iter(users.items()))
        cache = answer["cache"]
        print(_cache_line(settings.cache_dir, cache["used"], cache["limit"], cache["blocks"]) +
              f" (in use by the mount at {point})", file=out)
        return 0
    if not os.path.isdir(blocks_dir):
        print(f"cache {settings.cache_dir}: empty (no blocks directory)", file=out)
        return 0

    async def run() -> int:
        cache = BlockCache(blocks_dir, settings.cache_size, settings.min_free_space)
        await cache.open()
        if action == "stats":
            used, limit = cache.usage()
            print(_cache_line(settings.cache_dir, used, limit, cache.entries), file=out)
        elif action == "clear":
            used, _ = cache.usage()
            blocks = cache.entries
            await cache.clear()
            print(f"cleared {human_bytes(used)} ({blocks} blocks) from {settings.cache_dir}", file=out)
        else:
            report = await cache.verify()
            print(f"verified {report.blocks} blocks ({human_bytes(report.bytes)}) in {settings.cache_dir}: "
                  f"{report.corrupt} corrupt removed ({report.mixed} of another version), "
                  f"{report.stray_files} unfinished writes removed; {report.products_checked} whole files checked "
                  f"(MD5 ETag, S3 checksums, FITS DATASUM/CHECKSUM), {report.products_failed} failed and removed",
                  file=out)
            for path in report.corrupt_paths:
                print(f"  removed corrupt block {path}", file=out)
            return 1 if report.corrupt or report.products_failed else 0
        return 0

    try:
        return trio.run(run)
    except OSError as exc:
        raise MastfsError(f"cannot use the cache {settings.cache_dir}: {exc}") from exc


def _cache_line(cache_dir: str, used: int, limit: int, blocks: int) -> str:
    return (f"cache {cache_dir}: {human_bytes(used)} of {human_bytes(limit)} "
            f"({100 * used / limit if limit else 0:.1f}%) in {blocks} blocks")


def _daemon_status(mountpoint: str) -> dict[str, Any] | None:
    """The status answer of the daemon serving ``mountpoint``, or None when none answers."""
    try:
        answer = list(_request(mountpoint, {"op": "status"}, timeout=5.0))[-1]
    except MastfsError:
        return None
    return answer if answer.get("ok") and isinstance(answer.get("cache"), dict) else None
