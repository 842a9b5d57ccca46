"""Concurrency through a real mount: 16+ concurrent readers (threads and processes) of the same and of
different uncached products get every byte right with one transfer per block (the twin's S3 byte counter
equals the products' sizes, not 16 times), and a hypothesis state machine of open/read/seek/pread/close
sequences agrees with a reference model (the twin's own bytes).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule
from mountutil import mounted
from reliability_util import (
    SLACK_LIMIT,
    Hang,
    abort_fuse_connection,
    big_program_obs_ids,
    bounded,
    bytes_sent,
    layout_of,
    product_path,
    science_product,
    sha256_of,
)

from mastfs.twin import catalog as twin_catalog

pytestmark = pytest.mark.mount

READERS = 16
BIG_OBS = ["jw02733-o001_t001_nircam_clear-f090w", "jw02733-o001_t001_nircam_clear-f187n",
           "jw02733-o001_t001_nircam_clear-f212n"]  # their i2d: about 6.4 MB, 3 blocks, at scale 0.001


@pytest.fixture(scope="module")
def mount(twin, tmp_path_factory):
    twin.faults.clear()
    with mounted(twin, tmp_path_factory.mktemp("concurrency")) as live:
        yield live


def listed(mount, twin, obs_id: str) -> None:
    """List the observation's directories (metadata ready, so only bytes are counted below)."""
    for group in layout_of(twin, obs_id).groups:
        os.listdir(mount.join("obs", obs_id, group))


def read_in_threads(paths: list[str]) -> list[str]:
    """sha256 of each path, each read by its own thread, all released at once."""
    barrier = threading.Barrier(len(paths))
    digests: list[str | BaseException] = [""] * len(paths)

    def read(index: int) -> None:
        barrier.wait()
        try:
            digests[index] = sha256_of(paths[index])
        except OSError as exc:
            digests[index] = exc

    threads = [threading.Thread(target=read, args=(index,)) for index in range(len(paths))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads), "a reader hung"
    return digests


READER_PROCESS = """
import hashlib, sys
digest = hashlib.sha256()
with open(sys.argv[1], "rb") as handle:
    while chunk := handle.read(1 << 17):
        digest.update(chunk)
print(digest.hexdigest())
"""


def read_in_processes(paths: list[str]) -> list[str]:
    processes = [subprocess.Popen([sys.executable, "-c", READER_PROCESS, path], stdout=subprocess.PIPE, text=True)
                 for path in paths]
    return [process.communicate(timeout=60)[0].strip() for process in processes]


def test_16_threads_on_one_uncached_product_cause_one_transfer_per_block(mount, twin):
    obs_id = BIG_OBS[0]
    uri = science_product(twin, obs_id, in_s3=True)
    listed(mount, twin, obs_id)
    twin.reset_stats()
    digests = read_in_threads([mount.join(product_path(twin, obs_id, uri))] * READERS)
    assert digests == [twin.catalog.sha256(uri)] * READERS
    assert bytes_sent(twin, "s3:GetObject") == twin.catalog.product(uri).size


def test_16_processes_on_one_uncached_product_cause_one_transfer_per_block(mount, twin):
    obs_id = BIG_OBS[1]
    uri = science_product(twin, obs_id, in_s3=True)
    listed(mount, twin, obs_id)
    twin.reset_stats()
    digests = read_in_processes([mount.join(product_path(twin, obs_id, uri))] * READERS)
    assert digests == [twin.catalog.sha256(uri)] * READERS
    assert bytes_sent(twin, "s3:GetObject") == twin.catalog.product(uri).size


def test_readers_of_different_uncached_products_each_get_their_bytes(mount, twin):
    observations = big_program_obs_ids(twin)[:READERS] + [BIG_OBS[2]]
    uris = [science_product(twin, obs_id, in_s3=True) for obs_id in observations]
    for obs_id in observations:
        listed(mount, twin, obs_id)
    paths = [mount.join(product_path(twin, obs_id, uri)) for obs_id, uri in zip(observations, uris, strict=True)]
    twin.reset_stats()
    half = len(paths) // 2
    by_threads: list = []
    thread = threading.Thread(target=lambda: by_threads.extend(read_in_threads(paths[:half])))
    thread.start()
    by_processes = read_in_processes(paths[half:])
    thread.join(60)
    assert by_threads + by_processes == [twin.catalog.sha256(uri) for uri in uris]
    assert bytes_sent(twin, "s3:GetObject") == sum(twin.catalog.product(uri).size for uri in uris)


def test_refresh_while_a_read_is_in_flight_does_not_deadlock(twin, tmp_path):
    """``mastfs refresh`` drops the kernel's cached pages of the files below it; a read in flight holds
    one of those pages locked until the daemon answers it, so the daemon must keep serving meanwhile."""
    obs_id, uri = twin_catalog.OBS_2733_MIRI_F1130W, twin_catalog.BENCH_1GIB_URI
    twin.faults.clear()
    with mounted(twin, tmp_path) as own:
        path = own.join(product_path(twin, obs_id, uri))
        listed(own, twin, obs_id)
        twin.faults.add("s3", "latency", seconds=2.0)
        reader: dict = {}

        def read() -> None:
            try:
                reader["sha"] = sha256_of(path)
            except OSError as exc:  # the connection aborted after a deadlock
                reader["errno"] = exc.errno

        thread = threading.Thread(target=read, daemon=True)
        thread.start()
        time.sleep(0.5)  # the read now waits for the slow S3 answer, its page locked
        try:
            refresh = bounded(lambda: own.control({"op": "refresh", "path": own.join("obs", obs_id)}))
            thread.join(SLACK_LIMIT)
            assert not thread.is_alive(), "the read never returned"
            listing = bounded(lambda: os.listdir(own.join("obs", obs_id)))
        except Hang:
            abort_fuse_connection(own.path)  # so that the test can unmount
            raise
        finally:
            twin.faults.clear()
        assert refresh.ok and refresh.value[-1].get("ok"), refresh.value
        assert reader.get("sha") == twin.catalog.sha256(uri), reader
        assert listing.ok


# ----------------------------------------------------------------------------- a stateful model


MODEL_PRODUCTS = [
    (BIG_OBS[2], None),  # set to its largest product below: 3 blocks over S3
    (twin_catalog.OBS_2733_MIRI_F1130W, twin_catalog.BENCH_1GIB_URI),  # 2 blocks
    (twin_catalog.OBS_2733_MIRI_F1130W, twin_catalog.HTTP_ONLY_URI),  # over HTTPS only
    (twin_catalog.OBS_2733_MIRI_F1130W, twin_catalog.NO_LENGTH_URI),  # served without Content-Length
    ("jw02733-o002_t001_miri_f1800w", twin_catalog.NULL_SIZE_URI),  # size from a HEAD
]


class ReadModel(RuleBasedStateMachine):
    """Open handles of products through the mount, each with the position the model expects."""

    handles = Bundle("handles")
    mount = None
    twin = None
    products: list[tuple[str, str, int]] = []

    def __init__(self) -> None:
        super().__init__()
        self.open_handles: dict[int, dict] = {}

    @rule(target=handles, which=st.integers(0, len(MODEL_PRODUCTS) - 1))
    def open_file(self, which):
        path, uri, size = self.products[which]
        fd = os.open(path, os.O_RDONLY)
        self.open_handles[fd] = {"uri": uri, "size": size, "pos": 0}
        return fd

    @rule(fd=handles, length=st.one_of(st.integers(0, 5000), st.integers(60_000, 70_000),
                                       st.integers(1, 3 * 2**20)))
    def read(self, fd, length):
        state = self.open_handles.get(fd)
        if state is None:
            return
        data = os.read(fd, length)
        assert data == self.twin.catalog.read(state["uri"], state["pos"], length)
        state["pos"] += len(data)

    @rule(fd=handles, where=st.floats(0, 1.1), whence=st.sampled_from([os.SEEK_SET, os.SEEK_CUR, os.SEEK_END]))
    def seek(self, fd, where, whence):
        state = self.open_handles.get(fd)
        if state is None:
            return
        target = int(where * state["size"])
        offset = {os.SEEK_SET: target, os.SEEK_CUR: target - state["pos"], os.SEEK_END: target - state["size"]}
        assert os.lseek(fd, offset[whence], whence) == target
        state["pos"] = target

    @rule(fd=handles, where=st.floats(0, 1.05), length=st.integers(1, 300_000))
    def pread(self, fd, where, length):
        state = self.open_handles.get(fd)
        if state is None:
            return
        offset = int(where * state["size"])
        assert os.pread(fd, length, offset) == self.twin.catalog.read(state["uri"], offset, length)

    @rule(fd=consumes(handles))
    def close(self, fd):
        if self.open_handles.pop(fd, None) is not None:
            os.close(fd)

    @invariant()
    def sizes_agree(self):
        for fd, state in self.open_handles.items():
            assert os.fstat(fd).st_size == state["size"]

    def teardown(self):
        for fd in self.open_handles:
            os.close(fd)


def test_open_read_seek_close_sequences_match_the_model(mount, twin):
    products = []
    for obs_id, uri in MODEL_PRODUCTS:
        uri = uri or science_product(twin, obs_id, in_s3=True)
        products.append((mount.join(product_path(twin, obs_id, uri)), uri, twin.catalog.product(uri).size))
    ReadModel.mount, ReadModel.twin, ReadModel.products = mount, twin, products
    machine = settings(max_examples=12, stateful_step_count=25, deadline=None, database=None)(ReadModel)
    machine.TestCase().runTest()


def test_listings_stats_and_reads_survive_the_kernel_forgetting_inodes(mount, twin):
    """Listers, readers and a thread evicting the kernel's inodes (drop_caches: FUSE forgets) all at once
    for a few seconds: no operation on an existing file fails, every byte read is right, and once the
    kernel lets go the daemon holds no node but the root (its reference counts match the kernel's)."""
    program = mount.join("program", twin_catalog.PROGRAM_2733)
    observations = [obs for obs in os.listdir(program) if os.path.isdir(os.path.join(program, obs))]
    dirs = [os.path.join(program, obs, group) for obs in observations
            for group in os.listdir(os.path.join(program, obs)) if os.path.isdir(os.path.join(program, obs, group))]
    errors: list[tuple[str, str, OSError | AssertionError]] = []
    operations = [0]
    stop = time.monotonic() + 6

    def lister(seed: int) -> None:
        for directory in (dirs[(seed + n) % len(dirs)] for n in range(10**9)):
            if time.monotonic() > stop:
                return
            try:
                for name in os.listdir(directory):
                    os.stat(os.path.join(directory, name))
                    os.listxattr(os.path.join(directory, name))
                    operations[0] += 1
            except OSError as exc:
                errors.append(("list", directory, exc))

    def reader(seed: int) -> None:
        for directory in (dirs[(seed * 7 + n) % len(dirs)] for n in range(10**9)):
            if time.monotonic() > stop:
                return
            try:
                for name in sorted(os.listdir(directory))[:2]:
                    path = os.path.join(directory, name)
                    if os.path.isfile(path) and name.endswith(".fits"):
                        uri = os.getxattr(path, "user.mastfs.uri").decode()
                        if sha256_of(path) != twin.catalog.sha256(uri):
                            errors.append(("read", path, AssertionError("wrong bytes")))
                        operations[0] += 1
            except OSError as exc:
                errors.append(("read", directory, exc))

    def evictor() -> None:
        while time.monotonic() < stop:
            with open("/proc/sys/vm/drop_caches", "w") as drop:
                drop.write("2")
            time.sleep(0.1)

    threads = [threading.Thread(target=lister, args=(n,)) for n in range(4)]
    threads += [threading.Thread(target=reader, args=(n,)) for n in range(2)]
    threads.append(threading.Thread(target=evictor))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=SLACK_LIMIT + 10)  # (a bound, not a timing assertion: a hang fails below)
    assert not any(thread.is_alive() for thread in threads), "an operation hung"
    assert errors == [] and operations[0] > 100, (operations[0], errors[:5])

    give_up = time.monotonic() + 20
    while True:
        with open("/proc/sys/vm/drop_caches", "w") as drop:
            drop.write("2")
        [status] = mount.control({"op": "status"})
        if status["tree"]["kernel_inodes"] == 0 or time.monotonic() > give_up:
            break
        time.sleep(0.2)
    tree = status["tree"]
    # (an inode some other test still holds open would stay: allow a few)
    assert tree["kernel_inodes"] < 10 and tree["nodes"] == tree["kernel_inodes"] + 1 and tree["listed"] == 0, tree
