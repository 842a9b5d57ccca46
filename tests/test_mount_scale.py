"""The real archive's size and pace through the kernel (issue 10): a 300,000-product observation, slow
queries interrupted and joined, transient ERROR answers, the URL limit, pages shifting under a listing,
planned observations. Each test mounts the daemon against the session twin."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from mountutil import endpoint_requests, mounted

from mastfs.tree import MEMO_TTL
from mastfs.twin import catalog as twin_catalog

pytestmark = pytest.mark.mount

RSS_LIMIT_MB = 250
"""Issue 10's bound on the daemon's peak RSS (VmHWM: the kernel's high-water mark, so no peak escapes
sampling) while listing and stat-ing every file of the 300,000-product observation. Measured: 204-210 MB
on the 2-core test machine (idle 80-90 MB); 310-340 MB before file nodes shed their per-node fields and
inode-keyed tables, and a reloaded listing kept its layout."""
FALLBACK_MB = 60
"""How far above its idle RSS the daemon may stay once the kernel forgot the inodes and the listing's
memo expired. Measured: about 35 MB (heap the allocator cannot hand back); 150 MB before (the layout
and the forgotten file nodes stayed, the inode tables kept their largest size)."""


def daemon_memory_mb(pid: int) -> tuple[float, float]:
    """(current, peak) resident memory of process ``pid`` in MB."""
    values = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(value.split()[0]) / 1024
    return values["VmRSS"], values["VmHWM"]


def status_json(mount) -> dict:
    answer = subprocess.run([sys.executable, "-m", "mastfs", "status", "--json", mount.path],
                            capture_output=True, text=True, timeout=60)
    return json.loads(answer.stdout)


def forget_kernel_inodes() -> None:
    """Make the kernel drop its dentries and inodes (it sends FUSE FORGET for them)."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as drop:
        drop.write("2\n")


@pytest.mark.timeout(1800)
def test_pages_shifting_fail_the_listing_then_the_300k_observation_lists_completely(clean_twin, tmp_path):
    """While rows shift between pages the listing is EIO (never short); then every one of the 300,607
    products lists (find, ls -l), with the daemon under RSS_LIMIT_MB, and the daemon gives the memory
    back (to within FALLBACK_MB of idle) once the kernel forgets the inodes."""
    twin = clean_twin
    obs = os.path.join("obs", twin_catalog.MOSAIC_OBS_ID)
    rows = len(twin.catalog.product_rows(twin_catalog.MOSAIC_OBSID))
    assert rows >= 300_000
    with mounted(twin, tmp_path) as mount:
        pid = mount.process.pid
        idle_mb, _ = daemon_memory_mb(pid)
        twin.faults.add("invoke", "page_shift", match="Mast.Caom.Products", mode="insert")
        with pytest.raises(OSError) as caught:
            os.listdir(mount.join(obs))
        assert caught.value.errno == errno.EIO
        assert "nothing stored" in mount.log_text()
        twin.faults.clear()
        twin.reset_stats()

        started = time.monotonic()
        # recommended/ shows some of the same products again: count each product once
        found = subprocess.run(f"find {mount.join(obs)} -path '*/recommended' -prune -o -type f -print | wc -l",
                               shell=True, capture_output=True, text=True, timeout=900)
        cold_seconds = time.monotonic() - started
        assert int(found.stdout) == rows + 2  # every product, observation.json, products.csv
        pages = endpoint_requests(twin.stats(), "invoke:Mast.Caom.Products")
        assert pages >= rows // 10_000

        listing = subprocess.run(["ls", "-l", mount.join(obs, "auxiliary")], capture_output=True, text=True,
                                 timeout=900)
        assert listing.returncode == 0, listing.stderr
        assert len(listing.stdout.splitlines()) - 1 == len(os.listdir(mount.join(obs, "auxiliary"))) > 280_000
        with open(mount.join(obs, "products.csv")) as csv_file:
            assert sum(1 for _ in csv_file) == rows + 1
        current_mb, peak_mb = daemon_memory_mb(pid)
        assert peak_mb < RSS_LIMIT_MB, f"daemon peak RSS {peak_mb:.0f} MB (idle {idle_mb:.0f} MB)"
        twin.reset_stats()
        again = subprocess.run(["ls", "-l", mount.join(obs, "auxiliary")], capture_output=True, text=True,
                               timeout=900)
        assert again.stdout == listing.stdout
        assert twin.stats()["total_requests"] == 0  # warm: no request to MAST

        forget_kernel_inodes()
        deadline = time.monotonic() + 120
        while status_json(mount)["tree"]["nodes"] > 20_000 and time.monotonic() < deadline:
            time.sleep(1)
            forget_kernel_inodes()
        assert status_json(mount)["tree"]["nodes"] <= 20_000
        # the observation's layout goes when its memo expires (MEMO_TTL); the daemon then trims its heap
        deadline = time.monotonic() + MEMO_TTL + 60
        while status_json(mount)["tree"]["memos"] > 0 and time.monotonic() < deadline:
            time.sleep(2)
        assert status_json(mount)["tree"]["memos"] == 0
        after_mb, _ = daemon_memory_mb(pid)
        print(f"300k: cold find {cold_seconds:.0f}s, {pages} pages, idle {idle_mb:.0f} MB, peak {peak_mb:.0f} MB, "
              f"listed {current_mb:.0f} MB, after forget {after_mb:.0f} MB")
        assert after_mb < idle_mb + FALLBACK_MB, f"RSS {after_mb:.0f} MB after the kernel forgot (idle {idle_mb:.0f})"


INTERRUPTED_LS = """
import ctypes, os, signal, sys
signal.signal(signal.SIGINT, lambda *_: None)  # handled: the process goes on, its system call is EINTR
libc = ctypes.CDLL(None, use_errno=True)
libc.open.argtypes = [ctypes.c_char_p, ctypes.c_int]
print("ready", flush=True)
result = libc.open(os.fsencode(sys.argv[1]), os.O_RDONLY | os.O_DIRECTORY)
print("done" if result >= 0 else f"error {ctypes.get_errno()}", flush=True)
"""

SLOW_QUERY_SECONDS = 6.0


def test_ctrl_c_on_a_slow_listing_is_eintr_and_the_next_ls_joins_the_query(clean_twin, tmp_path):
    twin = clean_twin
    obs_id = twin_catalog.OBS_2733_MIRI_F1130W
    with mounted(twin, tmp_path, query_timeout="60s", deadline="3s") as mount:
        os.listdir(mount.join("program", twin_catalog.PROGRAM_2733))  # the observation row is known
        twin.faults.add("invoke", "slow_query", count=1, match="Mast.Caom.Products", seconds=SLOW_QUERY_SECONDS,
                        shape="first_byte")
        twin.reset_stats()
        path = mount.join("program", twin_catalog.PROGRAM_2733, obs_id)
        program = subprocess.Popen([sys.executable, "-c", INTERRUPTED_LS, path], stdout=subprocess.PIPE, text=True)
        try:
            assert program.stdout.readline() == "ready\n"
            time.sleep(1.0)  # opendir now waits for MAST's first byte
            shown = subprocess.run([sys.executable, "-m", "mastfs", "status", mount.path], capture_output=True,
                                   text=True, timeout=60).stdout
            assert "1 metadata queries in flight" in shown and "Mast.Caom.Products" in shown, shown
            sent = time.monotonic()
            program.send_signal(signal.SIGINT)
            output, _ = program.communicate(timeout=30)
            interrupted_after = time.monotonic() - sent
        finally:
            if program.poll() is None:
                program.kill()
                program.wait()
        assert output.split() == ["error", str(errno.EINTR)], output
        assert interrupted_after < 2.0, f"EINTR took {interrupted_after:.1f}s"  # the watch looks every 0.1 s
        listed = os.listdir(path)  # joins the query still running in the daemon
        assert "level2" in listed and "products.csv" in listed
        assert endpoint_requests(twin.stats(), "invoke:Mast.Caom.Products") == 1


def test_concurrent_ls_of_a_slow_observation_share_one_query(clean_twin, tmp_path):
    twin = clean_twin
    obs_id = twin_catalog.OBS_2733_MIRI_F1130W
    with mounted(twin, tmp_path, query_timeout="60s", deadline="2s") as mount:
        os.listdir(mount.join("program", twin_catalog.PROGRAM_2733))
        twin.faults.add("invoke", "slow_query", count=1, match="Mast.Caom.Products", seconds=3.0,
                        shape="first_byte")
        twin.reset_stats()
        path = mount.join("program", twin_catalog.PROGRAM_2733, obs_id, "level2")
        listings = [subprocess.Popen(["ls", "-l", path], stdout=subprocess.PIPE, text=True) for _ in range(4)]
        outputs = [listing.communicate(timeout=60)[0] for listing in listings]
        assert all(listing.returncode == 0 for listing in listings)
        assert len(set(outputs)) == 1 and len(outputs[0].splitlines()) > 10
        # one query answered after 3 s, whatever the number of ls waiting on it
        assert endpoint_requests(twin.stats(), "invoke:Mast.Caom.Products") == 1


def test_transient_error_answers_are_retried_and_414_halves_path_lookup(clean_twin, tmp_path):
    twin = clean_twin
    obs_path = os.path.join("program", twin_catalog.PROGRAM_2733, twin_catalog.OBS_2733_MIRI_F1130W)
    limit = twin.max_url_length
    with mounted(twin, tmp_path) as mount:
        os.listdir(mount.join("program", twin_catalog.PROGRAM_2733))
        twin.faults.add("invoke", "error_timeout", count=2, match="Mast.Caom.Products")
        files = sorted(os.listdir(mount.join(obs_path, "level2")))
        assert files
        assert "transient error" in mount.log_text()
        twin.max_url_length = 1500  # 40 uris overflow it; 10 pass
        try:
            path = mount.join(obs_path, "level2", files[0])
            with open(path, "rb") as handle:
                data = handle.read()
            source = os.getxattr(path, "user.mastfs.source").decode()
        finally:
            twin.max_url_length = limit
        uri = os.getxattr(path, "user.mastfs.uri").decode()
        assert len(data) == twin.catalog.product(uri).size
        assert source.startswith("s3://"), source
        text = mount.log_text()
        assert "414" in text and "MAST unavailable" not in text


def test_planned_observations_are_left_out_and_named_in_planned_csv(clean_twin, tmp_path):
    twin = clean_twin
    with mounted(twin, tmp_path) as mount:
        program = mount.join("program", twin_catalog.PROGRAM_2733)
        listed = os.listdir(program)
        assert twin_catalog.PLANNED_2733_OBS_ID not in listed
        assert twin_catalog.OBS_2733_MIRI_F1130W in listed and "planned.csv" in listed
        with open(os.path.join(program, "planned.csv")) as planned:
            text = planned.read()
        assert text.splitlines()[0].count(",") > 5 and twin_catalog.PLANNED_2733_OBS_ID in text
        assert not os.path.exists(mount.join("obs", twin_catalog.PLANNED_2733_OBS_ID))
