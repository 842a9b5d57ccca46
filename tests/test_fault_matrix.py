"""The fault matrix: every fault the twin can inject, on every path mastfs uses (observation query,
product list, path_lookup, HTTPS bytes, S3 bytes), through a real mount (--deadline 3 --retries 3).

Each operation returns correct data or a clear error (EIO; EACCES for a 401, except on a public file's
bytes: EIO) within the deadline plus
slack; never a wrong byte (sha256 against the twin's), never a hang; the daemon lives on, the same
operation succeeds once the fault is gone, and afterwards the cache holds nothing bad (``mastfs cache
verify`` after unmount, then a re-read in a fresh mount of the same cache). Also: a server that accepts and
never answers makes ``ls`` and ``read`` EIO within the deadline, and a reader interrupted by a signal
returns promptly.

The figures (faults injected, operations, outcomes) are printed when the module's mounts are torn down
(run with ``-s`` to see them) and recorded by hand in docs/reliability.md. No test depends on another
having run (``-p random_order`` shuffles them).
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

import pytest
from mountutil import start_mount, stop_mount
from reliability_util import (
    DEADLINE,
    FAULT_MOUNT,
    SLACK_LIMIT,
    big_program_obs_ids,
    bounded,
    cache_verify,
    expected_entries,
    layout_of,
    observation_row,
    product_path,
    science_product,
    sha256_of,
)

pytestmark = pytest.mark.mount


@dataclass(frozen=True)
class Fault:
    """One fault to inject: twin kind, parameters, how many requests it hits (None: until cleared), and
    what the operation must do where it hits: "recover" (correct data) or "fail" (a clear error)."""

    name: str
    kind: str
    params: dict = field(default_factory=dict)
    count: int | None = None
    expect: str = "fail"


FAULTS = [
    Fault("503_burst", "status", {"code": 503}, count=2, expect="recover"),
    Fault("503_retry_after", "status", {"code": 503, "retry_after": 1}, count=1, expect="recover"),
    Fault("503_persistent", "status", {"code": 503}, expect="fail"),
    Fault("500_persistent", "status", {"code": 500}, expect="fail"),
    Fault("html_504", "html_504", expect="fail"),
    Fault("html_200", "html_200", expect="fail"),
    Fault("reset_once", "reset", {"after_bytes": 100}, count=1, expect="recover"),
    Fault("reset", "reset", {"after_bytes": 0}, expect="fail"),
    Fault("truncate_once", "truncate", count=1, expect="recover"),
    Fault("truncate", "truncate", expect="fail"),
    Fault("wrong_range", "wrong_range", expect="fail"),
    Fault("wrong_range_once", "wrong_range", count=1, expect="recover"),
    Fault("ignore_range", "ignore_range", expect="recover"),
    Fault("stall", "stall", expect="fail"),
    Fault("latency", "latency", {"seconds": 1}, expect="recover"),
    Fault("unauthorized", "unauthorized", expect="fail"),
    Fault("executing", "executing", {"polls": 2}, count=1, expect="recover"),
]

# path -> (twin endpoint, match, the fault kinds that can hit its requests)
PATHS = {
    "observation_query": ("invoke", "Mast.Caom.Filtered", "metadata"),
    "product_list": ("invoke", "Mast.Caom.Products", "metadata"),
    "path_lookup": ("path_lookup", None, "lookup"),
    "https_bytes": ("download", None, "bytes"),
    "s3_bytes": ("s3", None, "bytes"),
}
RANGE_ONLY = {"wrong_range", "ignore_range"}


def applies(fault: Fault, path: str) -> bool:
    endpoint, _match, family = PATHS[path]
    if fault.kind == "executing":
        return endpoint == "invoke"
    if fault.kind in RANGE_ONLY:
        return family == "bytes"
    if fault.kind == "html_200":
        return endpoint != "s3"
    return True


def expectation(fault: Fault, path: str) -> str:
    """The one right outcome of ``fault`` on ``path``: "recover" or "fail"."""
    if path == "path_lookup":
        return "recover"  # without S3 keys a product is read over HTTPS: a failed lookup costs no data
    if path == "s3_bytes" and fault.kind == "unauthorized":
        return "recover"  # S3 answers 403 for keys it does not have: the bytes come over HTTPS
    return fault.expect


CASES = [(path, fault) for path in PATHS for fault in FAULTS if applies(fault, path)]
RESULTS: list[dict] = []
READ: list[tuple[str, str]] = []
"""(obs_id, dataURI) of the products read under faults so far (re-read from the cache at the end)."""
STALL_FIGURES: dict[str, float] = {}


class Mounts:
    """The two mounts of the matrix (auto source; HTTPS only), restartable by the last tests."""

    def __init__(self, twin, base) -> None:
        self.twin = twin
        self.base = base
        self.live: dict[str, object] = {}

    def start(self, name: str):
        settings = dict(FAULT_MOUNT, source="http" if name == "http" else "auto")
        self.live[name] = start_mount(self.twin, self.base / name, self.base / f"cache-{name}",
                                      self.base / f"{name}.log", **settings)
        return self.live[name]

    def stop(self, name: str) -> None:
        mount = self.live.pop(name, None)
        if mount is not None:
            stop_mount(mount)


@pytest.fixture(scope="module")
def mounts(twin, tmp_path_factory):
    twin.faults.clear()
    handle = Mounts(twin, tmp_path_factory.mktemp("matrix"))
    handle.start("auto")
    handle.start("http")
    try:
        yield handle
    finally:
        twin.faults.clear()
        for name in list(handle.live):
            handle.stop(name)
        print_figures()


@pytest.fixture(scope="module")
def fresh(twin):
    """A supply of never-seen observations (one per case)."""
    return iter(big_program_obs_ids(twin))


@dataclass
class Case:
    """One path's operation on one observation (and its largest S3 product), and how to check it."""

    twin: object
    mount: object
    obs_id: str

    @property
    def uri(self) -> str:
        return science_product(self.twin, self.obs_id, in_s3=True)

    def rel_path(self, uri: str) -> str:
        return product_path(self.twin, self.obs_id, uri)

    def prepare(self, path: str) -> None:
        """The steps before the faulty one, run without faults: look the observation up, list it, and
        for S3 bytes open another product first (that looks up the observation's S3 keys)."""
        obs_dir = self.mount.join("obs", self.obs_id)
        if path == "observation_query":
            return
        assert bounded(lambda: os.stat(obs_dir)).ok
        if path == "product_list":
            return
        for group in os.listdir(obs_dir):
            if os.path.isdir(os.path.join(obs_dir, group)):
                os.listdir(os.path.join(obs_dir, group))
        if path == "s3_bytes":
            other = next(uri for uri in layout_of(self.twin, self.obs_id).paths
                         if uri != self.uri and not self.twin.catalog.product(uri).exclusive)
            assert bounded(lambda: sha256_of(self.mount.join(self.rel_path(other)))).ok

    def operate(self, path: str):
        obs_dir = self.mount.join("obs", self.obs_id)
        if path == "observation_query":
            return bounded(lambda: json.loads(read_bytes(os.path.join(obs_dir, "observation.json"))))
        if path == "product_list":
            return bounded(lambda: sorted(os.listdir(obs_dir)))
        return bounded(lambda: sha256_of(self.mount.join(self.rel_path(self.uri))))

    def correct(self, path: str, value) -> bool:
        if path == "observation_query":
            row = observation_row(self.twin, self.obs_id)
            return value["obs_id"] == self.obs_id and str(value["obsid"]) == str(row["obsid"])
        if path == "product_list":
            return value == expected_entries(self.twin, self.obs_id)
        return value == self.twin.catalog.sha256(self.uri)


def read_bytes(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


@pytest.mark.parametrize(("path", "fault"), CASES, ids=[f"{p}-{f.name}" for p, f in CASES])
def test_fault(mounts, twin, fresh, path, fault):
    twin.faults.clear()
    mount = mounts.live["http" if path == "https_bytes" else "auto"]
    obs_id = next(fresh)
    case = Case(twin, mount, obs_id)
    case.prepare(path)
    endpoint, match, _family = PATHS[path]
    armed = twin.faults.add(endpoint, fault.kind, count=fault.count, match=match, **fault.params)
    outcome = case.operate(path)
    hits = next(entry["hits"] for entry in twin.faults.list() if entry["id"] == armed.fault_id)
    twin.faults.clear()
    correct = outcome.ok and case.correct(path, outcome.value)
    RESULTS.append({"path": path, "fault": fault.name, "hits": hits, "outcome": outcome.describe(),
                    "seconds": round(outcome.seconds, 2), "wrong_data": outcome.ok and not correct})
    assert hits > 0, f"the fault never hit {path}: the case tests nothing"
    assert not (outcome.ok and not correct), f"WRONG DATA served under {fault.name} on {path}"
    assert outcome.seconds < SLACK_LIMIT
    expected = expectation(fault, path)
    if expected == "recover":
        assert outcome.ok, f"{fault.name} on {path} should be ridden out, got {outcome.describe()}"
    elif expected == "fail":
        assert not outcome.ok, f"{fault.name} on {path} cannot give data"
    if not outcome.ok:
        # A 401 on a query is EACCES; on the bytes of a public file it is MAST refusing a request public
        # data never needs a token for: EIO, and the log says so (not "exclusive-access").
        refused_access = fault.kind == "unauthorized" and path != "https_bytes"
        allowed = {errno.EACCES} if refused_access else {errno.EIO}
        assert outcome.errno in allowed, f"{fault.name} on {path}: {outcome.describe()}"
    if not outcome.ok:  # the fault is gone: the same operation now works, with the right answer
        again = case.operate(path)
        assert again.ok and case.correct(path, again.value), again.describe()
    if path.endswith("_bytes"):
        READ.append((obs_id, case.uri))
    assert mount.process.poll() is None, "the daemon died"


def test_stalled_server_ls_and_read_are_eio_within_the_deadline(mounts, twin, fresh):
    mount = mounts.live["auto"]
    listing_obs, reading_obs = next(fresh), next(fresh)
    case = Case(twin, mount, reading_obs)
    case.prepare("s3_bytes")
    twin.faults.add("invoke", "stall")
    twin.faults.add("s3", "stall")
    listing = bounded(lambda: os.listdir(mount.join("obs", listing_obs)))
    reading = case.operate("s3_bytes")
    twin.faults.clear()
    assert listing.errno == errno.EIO and reading.errno == errno.EIO
    # One deadline, not two: the kernel's own retry of the failed page read fails at once. (Two deadlines,
    # the old behaviour, take at least 2 x DEADLINE.)
    # TODO(issue 12): the docs promise EIO within 1x the deadline; issue 12 is changing how the deadline
    # bounds a FUSE request, so this bound stays 2x until that lands.
    assert listing.seconds < 2 * DEADLINE and reading.seconds < 2 * DEADLINE
    STALL_FIGURES.update(ls_seconds=round(listing.seconds, 2), read_seconds=round(reading.seconds, 2))
    assert mount.process.poll() is None


INTERRUPTED = """
import ctypes, os, signal, sys
signal.signal(signal.SIGINT, lambda *_: None)  # a program that handles SIGINT and goes on
libc = ctypes.CDLL(None, use_errno=True)  # the system calls themselves: Python's own retry after EINTR
libc.open.argtypes = [ctypes.c_char_p, ctypes.c_int]
if sys.argv[1] == "read":
    fd = os.open(sys.argv[2], os.O_RDONLY)
    buffer = ctypes.create_string_buffer(1 << 20)
    print("ready", flush=True)
    result = libc.read(fd, buffer, len(buffer))
else:  # open a directory: the listing is made then (FUSE opendir)
    print("ready", flush=True)
    result = libc.open(os.fsencode(sys.argv[2]), os.O_RDONLY | os.O_DIRECTORY)
print("done" if result >= 0 else f"error {ctypes.get_errno()}", flush=True)
"""


def interrupt_while_waiting(operation: str, path: str) -> tuple[str, float]:
    """Run ``operation`` ("read" or "opendir") of ``path`` in a program that handles SIGINT, send it
    SIGINT once it waits, and return what it printed and how long after the signal it ended."""
    program = subprocess.Popen([sys.executable, "-c", INTERRUPTED, operation, path],
                               stdout=subprocess.PIPE, text=True)
    try:
        assert program.stdout.readline() == "ready\n"
        time.sleep(0.5)  # the request now waits on the stalled server
        assert program.poll() is None
        sent = time.monotonic()
        program.send_signal(signal.SIGINT)
        output, _ = program.communicate(timeout=SLACK_LIMIT)
        return output, time.monotonic() - sent
    finally:
        if program.poll() is None:
            program.kill()
            program.wait()


def test_a_listing_interrupted_by_a_signal_returns_promptly(mounts, twin, fresh):
    mount = mounts.live["auto"]
    obs_id = next(fresh)
    twin.faults.add("invoke", "stall")
    try:
        output, returned_after = interrupt_while_waiting("opendir", mount.join("obs", obs_id))
    finally:
        twin.faults.clear()
    assert output.split() == ["error", str(errno.EINTR)], output
    assert returned_after < DEADLINE, f"the interrupted listing took {returned_after:.1f}s"
    assert mount.process.poll() is None
    assert sorted(os.listdir(mount.join("obs", obs_id)))  # the same listing works afterwards


def test_a_reader_interrupted_by_a_signal_returns_promptly(mounts, twin, fresh):
    """pyfuse3 does not deliver FUSE_INTERRUPT; the daemon sees the reader's pending signal instead and ends
    its read with EINTR long before the deadline (the block's transfer goes on for later readers)."""
    mount = mounts.live["auto"]
    obs_id = next(fresh)
    case = Case(twin, mount, obs_id)
    case.prepare("s3_bytes")
    os.close(os.open(mount.join(case.rel_path(case.uri)), os.O_RDONLY))  # the open's pin (HeadObject) is reused
    twin.faults.add("s3", "stall")
    try:
        output, returned_after = interrupt_while_waiting("read", mount.join(case.rel_path(case.uri)))
    finally:
        twin.faults.clear()
    assert output.split() == ["error", str(errno.EINTR)], output
    status = subprocess.run([sys.executable, "-m", "mastfs", "status", "--json", mount.path],
                            capture_output=True, text=True, timeout=60)
    assert json.loads(status.stdout)["interrupted"] >= 1, status.stdout + status.stderr
    # EINTR comes from the daemon noticing the signal, not from the deadline (EIO, after 3 s or more).
    assert returned_after < DEADLINE, f"the interrupted reader took {returned_after:.1f}s"
    STALL_FIGURES.update(signal_to_return_seconds=round(returned_after, 2))
    assert mount.process.poll() is None
    # and the product reads correctly afterwards
    assert case.operate("s3_bytes").value == twin.catalog.sha256(case.uri)


def test_afterwards_the_cache_holds_nothing_bad(mounts, twin, fresh):
    """Faulty transfers leave nothing bad in either cache: ``mastfs cache verify`` after unmounting finds
    no corrupt block, and every product read under faults (these two, and whichever matrix cases ran
    before) reads right again from the same caches."""
    for endpoint, kind in (("s3", "truncate"), ("s3", "wrong_range"), ("download", "reset")):
        obs_id = next(fresh)
        case = Case(twin, mounts.live["http" if endpoint == "download" else "auto"], obs_id)
        case.prepare("s3_bytes" if endpoint == "s3" else "https_bytes")
        twin.faults.add(endpoint, kind, count=1)
        outcome = case.operate("s3_bytes")
        twin.faults.clear()
        assert outcome.ok and case.correct("s3_bytes", outcome.value), outcome.describe()
        READ.append((obs_id, case.uri))
    for name in ("auto", "http"):
        mounts.stop(name)
        verified = cache_verify(str(mounts.base / f"cache-{name}"))
        assert verified.returncode == 0 and re.search(r"\b0 corrupt", verified.stdout), \
            verified.stdout + verified.stderr
    for name in ("auto", "http"):  # same caches: every product read under faults reads right again
        mount = mounts.start(name)
        for obs_id, uri in READ:
            outcome = bounded(lambda m=mount, o=obs_id, u=uri: sha256_of(m.join(product_path(twin, o, u))))
            assert outcome.ok and outcome.value == twin.catalog.sha256(uri), (name, uri, outcome.describe())


def print_figures() -> None:
    """Print the matrix's figures (recorded in docs/reliability.md); each case asserted its own."""
    if not RESULTS:
        return
    summary = {
        "cases": len(RESULTS),
        "faults_injected": sum(entry["hits"] for entry in RESULTS),
        "outcomes": {outcome: sum(entry["outcome"] == outcome for entry in RESULTS)
                     for outcome in sorted({entry["outcome"] for entry in RESULTS})},
        "wrong_data": sum(entry["wrong_data"] for entry in RESULTS),
        "slowest_seconds": max(entry["seconds"] for entry in RESULTS),
        "stall": STALL_FIGURES,
    }
    print("\nFAULT MATRIX", json.dumps(summary))
    for entry in RESULTS:
        print("  ", json.dumps(entry))
