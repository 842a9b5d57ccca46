"""Shared machinery of the mastfs benchmarks: the twin in a subprocess, mounts with a watchdog, page-cache
drops, timed sequential reads, direct S3/HTTPS clients, daemon RSS sampling, and the result model.

Everything that touches a mount can hang if the daemon misbehaves, so each such step runs under a
:class:`Mount.watchdog` that aborts the FUSE connection (``/sys/fs/fuse/connections/N/abort``) when its time
is up: the blocked system call then fails and the harness reports a clear error instead of hanging.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import boto3
import httpx
import psutil
from botocore import UNSIGNED
from botocore.config import Config

log = logging.getLogger("bench")

REPO = Path(__file__).resolve().parent.parent
MIB = 1 << 20
GIB = 1 << 30
READ_SIZE = MIB
TWIN_START_TIMEOUT = 60.0
MOUNT_TIMEOUT = 90.0
UMOUNT_TIMEOUT = 60.0


class BenchError(RuntimeError):
    """A benchmark step failed (the message says which step and why)."""


# ------------------------------------------------------------------------------------------ results


@dataclass
class Goal:
    """One goal of the issue: ``measured`` and ``target`` are display strings; ``passed`` None = not
    measured."""

    name: str
    measured: str
    target: str
    passed: bool | None

    @property
    def verdict(self) -> str:
        return {True: "PASS", False: "FAIL", None: "n/a"}[self.passed]


@dataclass
class Section:
    """The result of one benchmark: a markdown table plus its goals and notes; ``error`` when it failed."""

    key: str
    title: str
    intro: str
    columns: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    goals: list[Goal] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    raw_markdown: str = ""

    def markdown(self) -> str:
        lines = [f"## {self.title}", "", self.intro, ""]
        if self.columns and self.rows:
            lines += markdown_table(self.columns, self.rows) + [""]
        if self.raw_markdown:
            lines += [self.raw_markdown.rstrip(), ""]
        if self.goals:
            lines += markdown_table(["goal", "measured", "target", "result"],
                                    [[g.name, g.measured, g.target, f"**{g.verdict}**"] for g in self.goals])
            lines.append("")
        if self.error:
            lines += [f"**Not completed:** {self.error}", ""]
        lines += [f"- {note}" for note in self.notes]
        if self.notes:
            lines.append("")
        return "\n".join(lines)


def markdown_table(columns: list[str], rows: list[list[str]]) -> list[str]:
    """Lines of a markdown table (first column left-aligned, the others right-aligned)."""
    align = ["---"] + ["---:"] * (len(columns) - 1)
    return ["| " + " | ".join(columns) + " |", "| " + " | ".join(align) + " |"] + [
        "| " + " | ".join(row) + " |" for row in rows
    ]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: list[float], fmt: str = "{:.0f}") -> str:
    """'median (min-max, n=N)' for a list of runs."""
    if not values:
        return "n/a"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def mb_per_s(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e6 if seconds > 0 else float("inf")


# ------------------------------------------------------------------------------------------ the twin


class TwinProcess:
    """``mastfs twin serve --port 0 --scale S`` in a child process; ``info`` is its JSON line.

    Use as a context manager: the child is stopped (SIGTERM, then SIGKILL) on exit.
    """

    def __init__(self, workdir: Path, scale: float = 1.0) -> None:
        self.scale = scale
        self.log_path = workdir / "twin.log"
        self.process: subprocess.Popen[str] | None = None
        self.info: dict[str, str] = {}

    def __enter__(self) -> TwinProcess:
        with open(self.log_path, "w") as log_file:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "mastfs", "twin", "serve", "--port", "0", "--scale", str(self.scale)],
                stdout=subprocess.PIPE, stderr=log_file, text=True, cwd=REPO,
            )
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(self.process.stdout.readline()), daemon=True)
        reader.start()
        reader.join(TWIN_START_TIMEOUT)
        if not line or not line[0].strip():
            self.stop()
            raise BenchError(f"the twin did not print its JSON line within {TWIN_START_TIMEOUT:.0f} s; "
                             f"log: {self.log_path}: {tail(self.log_path)}")
        self.info = json.loads(line[0])
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def _admin(self, path: str, method: str = "GET", body: bytes | None = None) -> bytes:
        request = urllib.request.Request(self.info["mast_url"] + path, method=method, data=body)
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.read()

    def stats(self) -> dict:
        return json.loads(self._admin("/__twin__/stats"))

    def set_link(self, link: dict[str, float]) -> None:
        """Pace product bodies like ``link`` ({first_byte_ms, stream_mb_s}; zeros: loopback)."""
        self._admin("/__twin__/link", method="PUT", body=json.dumps(link).encode())

    def reset_stats(self) -> None:
        self._admin("/__twin__/stats/reset", method="POST")

    def sha256(self, uri: str) -> str:
        """The product's true sha256 (hex), as the twin computes it."""
        return json.loads(self._admin("/__twin__/sha256?uri=" + quote(uri, safe="")))["sha256"]


@dataclass(frozen=True)
class Wire:
    """What a twin stats snapshot says was sent: file bytes (S3 GetObject + HTTPS download), all bytes,
    and request counts."""

    file_bytes: int
    total_bytes: int
    file_requests: int
    total_requests: int
    s3_bytes: int
    download_bytes: int

    @classmethod
    def from_stats(cls, stats: dict) -> Wire:
        endpoints = stats.get("endpoints", {})

        def get(key: str, what: str) -> int:
            return int(endpoints.get(key, {}).get(what, 0))

        return cls(
            file_bytes=get("s3:GetObject", "bytes_sent") + get("download", "bytes_sent"),
            total_bytes=int(stats.get("total_bytes_sent", 0)),
            file_requests=get("s3:GetObject", "requests") + get("download", "requests"),
            total_requests=int(stats.get("total_requests", 0)),
            s3_bytes=get("s3:GetObject", "bytes_sent"),
            download_bytes=get("download", "bytes_sent"),
        )


# ------------------------------------------------------------------------------------------ mounts


def mount_entry(mountpoint: str) -> str | None:
    """The ``major:minor`` of what is mounted at ``mountpoint`` (from /proc/self/mountinfo, so no system
    call ever touches the mount), or None."""
    found = None
    with open("/proc/self/mountinfo", encoding="utf-8") as handle:
        for line in handle:
            fields = line.split()
            if len(fields) > 4 and fields[4].encode().decode("unicode_escape") == mountpoint:
                found = fields[2]
    return found


def _daemon_candidates(mountpoint: str) -> list[psutil.Process]:
    """mastfs processes serving ``mountpoint``: those holding /dev/fuse first, then by command line."""
    holders, by_cmdline = [], []
    for process in psutil.process_iter(["pid", "cmdline"]):
        cmdline = process.info.get("cmdline") or []
        if process.pid == os.getpid() or mountpoint not in cmdline or not any("mastfs" in a for a in cmdline):
            continue
        if "umount" in cmdline:
            continue
        try:
            fds = os.listdir(f"/proc/{process.pid}/fd")
            holds_fuse = any(os.readlink(f"/proc/{process.pid}/fd/{fd}") == "/dev/fuse" for fd in fds)
        except OSError:
            holds_fuse = False
        (holders if holds_fuse else by_cmdline).append(process)
    return holders + by_cmdline


class Mount:
    """A mastfs mount of the twin at ``mountpoint`` with ``cache_dir``; ``daemon`` is its psutil.Process.

    ``with Mount(...) as mount:`` mounts (``mastfs mount``, which returns once live) and always unmounts
    (``mastfs umount``; if that fails or times out: abort the FUSE connection, kill the daemon, lazy
    unmount). Raises BenchError when mounting fails or times out.
    """

    def __init__(self, twin: TwinProcess, mountpoint: Path, cache_dir: Path, source: str | None = None,
                 extra_args: tuple[str, ...] = ()) -> None:
        self.twin = twin
        self.mountpoint = str(mountpoint)
        self.cache_dir = cache_dir
        self.source = source
        self.extra_args = extra_args
        self.daemon: psutil.Process | None = None
        self.device: str | None = None

    def __enter__(self) -> Mount:
        os.makedirs(self.mountpoint, exist_ok=True)
        os.makedirs(self.cache_dir, exist_ok=True)
        info = self.twin.info
        command = [sys.executable, "-m", "mastfs", "mount", self.mountpoint, "--mast-url", info["mast_url"],
                   "--resolver-url", info["resolver_url"], "--s3-endpoint", info["s3_endpoint"],
                   "--cache-dir", str(self.cache_dir), *self.extra_args]
        if self.source:
            command += ["--source", self.source]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=MOUNT_TIMEOUT, cwd=REPO)
        except subprocess.TimeoutExpired:
            self.force_cleanup()
            raise BenchError(f"`mastfs mount` did not return within {MOUNT_TIMEOUT:.0f} s") from None
        if result.returncode != 0 or mount_entry(self.mountpoint) is None:
            self.force_cleanup()
            raise BenchError(f"`mastfs mount` failed (exit {result.returncode}): "
                             f"{(result.stderr or result.stdout).strip()[-800:]}")
        self.device = mount_entry(self.mountpoint)
        candidates = _daemon_candidates(self.mountpoint)
        self.daemon = candidates[0] if candidates else None
        if self.daemon is None:
            log.warning("no daemon process found for %s: RSS and CPU cannot be sampled", self.mountpoint)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.unmount()

    def unmount(self) -> None:
        if mount_entry(self.mountpoint) is None:
            self._reap_daemon()
            return
        try:
            result = subprocess.run([sys.executable, "-m", "mastfs", "umount", self.mountpoint],
                                    capture_output=True, text=True, timeout=UMOUNT_TIMEOUT, cwd=REPO)
            if result.returncode != 0:
                log.warning("`mastfs umount %s` failed: %s", self.mountpoint, result.stderr.strip())
        except subprocess.TimeoutExpired:
            log.warning("`mastfs umount %s` timed out", self.mountpoint)
        if mount_entry(self.mountpoint) is not None:
            self.force_cleanup()
        self._reap_daemon()

    def _reap_daemon(self) -> None:
        """Wait for the daemon to exit after unmounting (it must, so the next mount of the same cache dir
        is not refused); kill it if it lingers."""
        if self.daemon is None:
            return
        try:
            self.daemon.wait(timeout=20)
        except psutil.TimeoutExpired:
            log.warning("daemon %d still running 20 s after unmount: killing it", self.daemon.pid)
            with contextlib.suppress(psutil.Error):
                self.daemon.kill()
                self.daemon.wait(timeout=5)
        except psutil.Error:
            pass

    def abort(self) -> None:
        """Abort the FUSE connection (blocked system calls on the mount fail at once) and kill the daemon."""
        device = self.device or mount_entry(self.mountpoint)
        if device and device.startswith("0:"):
            with contextlib.suppress(OSError), open(f"/sys/fs/fuse/connections/{device[2:]}/abort", "w") as f:
                f.write("1")
        for process in ([self.daemon] if self.daemon else []) + _daemon_candidates(self.mountpoint):
            with contextlib.suppress(psutil.Error):
                process.kill()

    def force_cleanup(self) -> None:
        """Abort, kill and lazily unmount whatever is at the mountpoint."""
        self.abort()
        if mount_entry(self.mountpoint) is not None:
            subprocess.run(["fusermount3", "-u", "-z", self.mountpoint], capture_output=True, timeout=30)

    @contextlib.contextmanager
    def watchdog(self, seconds: float, what: str) -> Iterator[None]:
        """Run the body; if it takes longer than ``seconds``, abort the mount (so the body's blocked
        system call fails) and raise BenchError naming ``what``."""
        fired = threading.Event()

        def fire() -> None:
            fired.set()
            log.error("%s: no progress after %.0f s, aborting the mount", what, seconds)
            self.abort()

        timer = threading.Timer(seconds, fire)
        timer.daemon = True
        timer.start()
        try:
            yield
        except OSError as exc:
            if fired.is_set():
                raise BenchError(f"{what} did not finish within {seconds:.0f} s (mount aborted)") from exc
            raise BenchError(f"{what} failed: {exc}") from exc
        finally:
            timer.cancel()
        if fired.is_set():
            raise BenchError(f"{what} did not finish within {seconds:.0f} s (mount aborted)")

    def path(self, relative: str) -> str:
        return os.path.join(self.mountpoint, relative.lstrip("/"))

    def daemon_rss(self) -> int | None:
        if self.daemon is None:
            return None
        try:
            return self.daemon.memory_info().rss
        except psutil.Error:
            return None


# ------------------------------------------------------------------------------------------ measuring


def drop_page_cache(timeout: float = 120.0) -> None:
    """``sync; echo 3 > /proc/sys/vm/drop_caches`` (root only), in a child process so a stuck sync cannot
    hang the harness. Raises BenchError when it fails or times out."""
    try:
        result = subprocess.run(["sh", "-c", "sync && echo 3 > /proc/sys/vm/drop_caches"],
                                capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BenchError(f"sync + drop_caches did not finish within {timeout:.0f} s") from None
    if result.returncode != 0:
        raise BenchError(f"cannot drop the page cache ({result.stderr.strip()}): run the benchmarks as root")


@dataclass(frozen=True)
class ReadResult:
    """``nbytes`` read in ``seconds`` (open to close); ``open_seconds`` and ``first_byte_seconds`` (open to
    the end of the first read) for reads of files."""

    nbytes: int
    seconds: float
    open_seconds: float | None = None
    first_byte_seconds: float | None = None

    @property
    def mb_s(self) -> float:
        return mb_per_s(self.nbytes, self.seconds)


def read_sequential(path: str, limit: int | None = None, progress: Callable[[int], None] | None = None,
                    read_size: int = READ_SIZE) -> ReadResult:
    """Open ``path``, read it (or its first ``limit`` bytes) with ``read_size`` reads into one buffer,
    close it; the time covers open to close. ``progress(bytes_so_far)`` is called after each read."""
    buffer = bytearray(read_size)
    total = 0
    first_byte = None
    began = time.perf_counter()
    with open(path, "rb", buffering=0) as handle:
        opened = time.perf_counter() - began
        while limit is None or total < limit:
            got = handle.readinto(buffer)
            if first_byte is None:
                first_byte = time.perf_counter() - began
            if not got:
                break
            total += got
            if progress is not None:
                progress(total)
    return ReadResult(total, time.perf_counter() - began, opened, first_byte)


def s3_client(twin: TwinProcess):
    """An anonymous (UNSIGNED) boto3 S3 client of the twin."""
    return boto3.client("s3", endpoint_url=twin.info["s3_endpoint"], region_name="us-east-1",
                        config=Config(signature_version=UNSIGNED, max_pool_connections=16))


def prime_etags(s3, bucket: str, keys: list[str]) -> None:
    """HeadObject each key once, unmeasured, two at a time. The twin computes an object's ETag from its
    bytes on the first request naming it (some 5 s per GiB; about 30 ms for a small FITS file), where real
    S3 has it stored: without this, whichever measurement touched an object first would pay for it."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(lambda key: s3.head_object(Bucket=bucket, Key=key), keys))


def boto3_stream(s3, bucket: str, key: str) -> ReadResult:
    """Time one whole-object ``get_object`` streamed in 1 MiB chunks."""
    total = 0
    began = time.perf_counter()
    body = s3.get_object(Bucket=bucket, Key=key)["Body"]
    for chunk in body.iter_chunks(READ_SIZE):
        total += len(chunk)
    return ReadResult(total, time.perf_counter() - began)


def boto3_ranges(s3, bucket: str, key: str, size: int, part: int, threads: int) -> ReadResult:
    """Time reading a whole object as ``part``-byte ranged ``get_object`` calls on ``threads`` threads
    into memory: the request pattern of mastfs's readahead (runs of 8 MiB, one per transfer slot) from a
    client that does nothing else with the bytes."""

    def get(offset: int) -> int:
        last = min(offset + part, size) - 1
        return len(s3.get_object(Bucket=bucket, Key=key, Range=f"bytes={offset}-{last}")["Body"].read())

    began = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        total = sum(pool.map(get, range(0, size, part)))
    return ReadResult(total, time.perf_counter() - began)


def boto3_download(s3, bucket: str, key: str, destination: Path) -> ReadResult:
    """Time one whole-object ``get_object`` streamed in 1 MiB chunks into a local file (a download:
    buffered writes, no fsync, as ``aws s3 cp`` does); the file is deleted afterwards."""
    total = 0
    began = time.perf_counter()
    try:
        with open(destination, "wb") as handle:
            for chunk in s3.get_object(Bucket=bucket, Key=key)["Body"].iter_chunks(READ_SIZE):
                total += handle.write(chunk)
        return ReadResult(total, time.perf_counter() - began)
    finally:
        destination.unlink(missing_ok=True)


def page_cache_fill_rates(directory: Path, size: int = 512 * MIB) -> tuple[float, float]:
    """MB/s of a buffered write of ``size`` bytes into a new file right after dropping the page cache,
    and of overwriting the same file at once (its pages already in memory). On a VM that hands freed
    memory back to its host (virtio free page reporting) the first is much slower: every new page is
    faulted in again by the host."""
    block = bytes(MIB)
    path = directory / "page-cache-probe"
    rates = []
    drop_page_cache()
    for mode in ("wb", "r+b"):
        began = time.perf_counter()
        with open(path, mode) as handle:
            for _ in range(size // MIB):
                handle.write(block)
        rates.append(mb_per_s(size, time.perf_counter() - began))
    path.unlink()
    drop_page_cache()
    return rates[0], rates[1]


def httpx_stream(client: httpx.Client, mast_url: str, uri: str) -> ReadResult:
    """Time one whole-file GET of /api/v0.1/Download/file streamed in 1 MiB chunks."""
    total = 0
    began = time.perf_counter()
    with client.stream("GET", mast_url + "/api/v0.1/Download/file", params={"uri": uri}) as response:
        if response.status_code != 200:
            raise BenchError(f"direct HTTPS download of {uri}: HTTP {response.status_code}")
        for chunk in response.iter_bytes(READ_SIZE):
            total += len(chunk)
    return ReadResult(total, time.perf_counter() - began)


class RssSampler:
    """Samples a process's RSS every ``interval`` seconds in a thread: ``peak``, ``current``, ``samples``.

    The caller may set ``position`` (e.g. bytes read so far); every sample is kept with it in ``history``
    so :meth:`peak_between` can tell the peak over one stretch of a read.
    """

    def __init__(self, process: psutil.Process | None, interval: float = 0.05) -> None:
        self.process = process
        self.interval = interval
        self.position = 0
        self.history: list[tuple[int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss-sampler")

    @property
    def peak(self) -> int:
        return max((rss for _, rss in self.history), default=0)

    @property
    def current(self) -> int:
        return self.history[-1][1] if self.history else 0

    @property
    def samples(self) -> int:
        return len(self.history)

    def peak_between(self, start: int, end: int) -> int:
        """The highest RSS sampled while ``start <= position < end`` (0 when none was)."""
        return max((rss for position, rss in self.history if start <= position < end), default=0)

    def _sample(self) -> None:
        try:
            self.history.append((self.position, self.process.memory_info().rss))
        except psutil.Error:
            pass

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        if self.process is not None:
            self._sample()
            self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        if self.process is not None:
            self._sample()


class CpuMeter:
    """CPU seconds used by some processes over a ``with`` block (psutil; dead processes count 0), and
    ``machine_busy``: the share of the whole machine's CPU time that was not idle (0..1)."""

    def __init__(self, **processes: psutil.Process | None) -> None:
        self.processes = {name: p for name, p in processes.items() if p is not None}
        self.used: dict[str, float] = {}
        self.machine_busy: float | None = None
        self._start: dict[str, float] = {}
        self._machine_start = None

    @staticmethod
    def _cpu(process: psutil.Process) -> float:
        try:
            times = process.cpu_times()
            return times.user + times.system
        except psutil.Error:
            return 0.0

    def __enter__(self) -> CpuMeter:
        self._start = {name: self._cpu(p) for name, p in self.processes.items()}
        self._machine_start = psutil.cpu_times()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.used = {name: self._cpu(p) - self._start[name] for name, p in self.processes.items()}
        end = psutil.cpu_times()
        total = sum(end) - sum(self._machine_start)
        idle = (end.idle + getattr(end, "iowait", 0.0)) - (self._machine_start.idle
                                                           + getattr(self._machine_start, "iowait", 0.0))
        self.machine_busy = 1 - idle / total if total > 0 else None


# ------------------------------------------------------------------------------------------ misc


def tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@contextlib.contextmanager
def scratch_dir(prefix: str = "mastfs-bench-") -> Iterator[Path]:
    """A fresh directory under /tmp (same disk as the benchmark's cache dirs), deleted afterwards."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
