"""Transfers that end when they should, redirects, truthful errors and a MAST token that lives (issue 12),
through real mounts against the twin:

- a burst of reads of a dripping S3 server ends at the deadline and gives back its transfer slots and
  worker threads: S3 reads of other files succeed at once afterwards;
- with 16 concurrent readers and fewer transfer slots, no read takes more than one deadline (plus
  :data:`MARGIN`), queueing for a slot included, and ``mastfs status`` shows who waits;
- S3 503 with Retry-After is honoured like HTTPS 503;
- ``--source s3`` refusals are EIO naming S3, a 401 on a public file says MAST refused the request;
- downloads follow redirects to a second host, which gets the token only when allowed;
- an expired token gives one WARNING at mount; a token saved anew serves the live mount.
"""

from __future__ import annotations

import concurrent.futures
import errno
import os
import subprocess
import time

import psutil
import pytest
from mountutil import mounted
from reliability_util import (
    Outcome,
    big_program_obs_ids,
    bounded,
    drop_page_cache,
    layout_of,
    product_path,
    science_product,
    sha256_of,
    twin_requests,
)

from mastfs.mounts import FUSECTL, MAX_BACKGROUND
from mastfs.twin import catalog as twin_catalog

pytestmark = pytest.mark.mount

DEADLINE = 3.0
MARGIN = 2.0
"""What a read may take beyond ``--deadline`` (docs/reliability.md): the FUSE round trip, the retry of a
failed page read by the kernel, and scheduling on a loaded 2-core machine."""
EXCLUSIVE_OBS = "jw06543-o001_t001_nircam_clear-f200w"


def s3_files(twin, count: int, skip: int = 0) -> list[tuple[str, str, str]]:
    """(uri, S3 key, path under the mount) of ``count`` public, S3-held products of distinct observations."""
    files = []
    for obs_id in big_program_obs_ids(twin)[skip:skip + count]:
        uri = science_product(twin, obs_id, in_s3=True)
        files.append((uri, twin.catalog.product(uri).s3_key, product_path(twin, obs_id, uri)))
    return files


def read_head(path: str, length: int = 4096) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(length)


def concurrent_reads(paths: list[str]) -> list:
    """Open and read the head of every path at once, one thread each (not through ``bounded``'s pool of 8,
    whose queueing would count in the times); each one's Outcome (see :func:`bounded_now`)."""
    with concurrent.futures.ThreadPoolExecutor(len(paths)) as pool:
        futures = [pool.submit(bounded_now, path) for path in paths]
        return [future.result() for future in futures]


def bounded_now(path: str):
    """Open ``path`` and read its head: the Outcome of the read, whose ``seconds`` is the longer of the two
    FUSE requests (the open pins the product's version with a HEAD of its own; the promise is one
    deadline per request, docs/reliability.md)."""
    started = time.monotonic()
    try:
        handle = open(path, "rb")
    except OSError as exc:
        return Outcome(None, exc.errno, time.monotonic() - started)
    opened = time.monotonic()
    with handle:
        try:
            value = handle.read(4096)
        except OSError as exc:
            return Outcome(None, exc.errno, max(opened - started, time.monotonic() - opened))
    return Outcome(value, None, max(opened - started, time.monotonic() - opened))


def daemon_threads(mount) -> int:
    return psutil.Process(mount.process.pid).num_threads()


def status_of(mount) -> dict:
    return mount.control({"op": "status"})[0]


def exclusive_files(twin) -> list[tuple[str, str]]:
    """(uri, path under the mount) of the exclusive FITS products (not the tiny previews)."""
    layout = layout_of(twin, EXCLUSIVE_OBS)
    return [(uri, os.path.join("obs", EXCLUSIVE_OBS, path)) for uri, path in sorted(layout.paths.items())
            if path.endswith(".fits")]


# ------------------------------------------------------------------------------ 1. abandoned transfers end


def test_a_drip_burst_gives_back_slots_and_threads(clean_twin, tmp_path):
    drip, other = s3_files(clean_twin, 8), s3_files(clean_twin, 3, skip=8)
    with mounted(clean_twin, tmp_path, source="s3", deadline=f"{DEADLINE:g}s", retries=2, transfers=4) as mount:
        for _uri, _key, path in drip + other:
            os.stat(mount.join(path))  # metadata now, so only the reads meet the drip
        assert read_head(mount.join(other[0][2]))  # S3 client built, a worker thread used
        time.sleep(12)  # trio keeps an idle worker thread 10 s
        idle = daemon_threads(mount)
        for _uri, key, _path in drip:
            clean_twin.faults.add("s3", "drip", match=key, bytes_per_second=1024)
        outcomes = concurrent_reads([mount.join(path) for _uri, _key, path in drip])
        assert all(outcome.errno == errno.EIO for outcome in outcomes), [o.describe() for o in outcomes]
        assert max(outcome.seconds for outcome in outcomes) <= DEADLINE + MARGIN
        started = time.monotonic()
        after = []
        for uri, _key, path in other[1:]:  # at once: no slot or thread is still held by the drip
            outcome = bounded(lambda path=path: read_head(mount.join(path)))
            assert outcome.ok and outcome.seconds < 2.0, outcome.describe()
            after.append(outcome.seconds)
            assert outcome.value == clean_twin.catalog.read(uri, 0, 4096)
        status = status_of(mount)["reader"]
        assert status["slots"]["busy"] == 0 and status["waiting"] == {"reads": 0, "runs": 0}
        peak_after = daemon_threads(mount)
        while daemon_threads(mount) > idle and time.monotonic() - started < 20:
            time.sleep(0.5)
        threads = daemon_threads(mount)
        assert threads <= idle, f"{threads} threads after the burst, {idle} before (peak {peak_after})"
        print(f"drip burst: 8 reads EIO in {max(o.seconds for o in outcomes):.2f}s at most; then S3 reads of "
              f"other files in {max(after):.2f}s at most; {idle} threads idle before, {peak_after} just after, "
              f"{threads} {time.monotonic() - started:.1f}s later; slots busy {status['slots']['busy']}")


def test_an_open_does_not_queue_behind_busy_transfers(clean_twin, tmp_path):
    """Opening pins the product's version (a HeadObject); with every transfer slot held by a dripping
    body, the open still ends while those reads wait, not after their deadline."""
    drip, other = s3_files(clean_twin, 2, skip=11), s3_files(clean_twin, 1, skip=13)
    with mounted(clean_twin, tmp_path, source="s3", deadline=f"{DEADLINE:g}s", retries=2, transfers=2) as mount:
        for _uri, _key, path in drip + other:
            os.stat(mount.join(path))
        for _uri, key, _path in drip:
            clean_twin.faults.add("s3", "drip", match=key, bytes_per_second=1024)
        with concurrent.futures.ThreadPoolExecutor(len(drip)) as pool:
            reads = [pool.submit(bounded_now, mount.join(path)) for _uri, _key, path in drip]
            waited = time.monotonic()
            while status_of(mount)["reader"]["slots"]["busy"] < 2 and time.monotonic() - waited < DEADLINE:
                time.sleep(0.02)
            assert status_of(mount)["reader"]["slots"]["busy"] == 2, "the dripping reads never held both slots"
            with open(mount.join(other[0][2]), "rb"):
                opened_while_busy = not any(read.done() for read in reads)
            outcomes = [read.result() for read in reads]
        assert all(outcome.errno == errno.EIO for outcome in outcomes), [o.describe() for o in outcomes]
        assert opened_while_busy, "the open waited for the transfers' deadline"


# ------------------------------------------------------------------------------ 2. one deadline per request


@pytest.fixture(scope="module")
def fusectl():
    """The fusectl filesystem mounted (systemd mounts it at boot; a bare container may not have), so the
    daemon can raise the mount's FUSE background limit (docs/reliability.md)."""
    if not os.listdir(FUSECTL):
        subprocess.run(["mount", "-t", "fusectl", "fusectl", FUSECTL], check=False, capture_output=True)
    assert os.listdir(FUSECTL) is not None


def background_limit(mount) -> int:
    """The kernel's max_background of the mount's FUSE connection."""
    device = next(line.split()[2] for line in open("/proc/self/mountinfo", encoding="utf-8")
                  if line.split()[4] == mount.path)
    with open(os.path.join(FUSECTL, device.split(":")[1], "max_background"), encoding="ascii") as handle:
        return int(handle.read())


def test_sixteen_readers_each_end_within_one_deadline_slot_wait_included(clean_twin, tmp_path, fusectl):
    files = s3_files(clean_twin, 16)
    with mounted(clean_twin, tmp_path, source="http", deadline=f"{DEADLINE:g}s", retries=2,
                 transfers=4) as mount:
        assert background_limit(mount) == MAX_BACKGROUND
        for _uri, _key, path in files:
            os.stat(mount.join(path))
        clean_twin.faults.add("download", "latency", seconds=1.0)
        waiting_seen = []

        def watch_status():
            for _ in range(10):
                waiting_seen.append(status_of(mount)["reader"]["waiting"])
                time.sleep(0.3)

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            watcher = pool.submit(watch_status)
            outcomes = concurrent_reads([mount.join(path) for _uri, _key, path in files])
            watcher.result()
        worst = max(outcome.seconds for outcome in outcomes)
        assert worst <= DEADLINE + MARGIN, f"worst read took {worst:.2f}s"
        assert all(outcome.ok or outcome.errno == errno.EIO for outcome in outcomes)
        assert any(outcome.ok for outcome in outcomes)  # the first runs got their bytes
        assert any(seen["runs"] > 0 for seen in waiting_seen)  # status showed runs waiting for a slot
        assert any(seen["reads"] > 0 for seen in waiting_seen)
        print(f"16 readers, 4 slots, 1 s per request, deadline {DEADLINE:g}s: worst {worst:.2f}s, "
              f"{sum(o.ok for o in outcomes)} ok")


def test_sixteen_readers_of_a_stalled_server_all_end_within_one_deadline(clean_twin, tmp_path, fusectl):
    files = s3_files(clean_twin, 16, skip=16)
    with mounted(clean_twin, tmp_path, source="s3", deadline=f"{DEADLINE:g}s", retries=2, transfers=4) as mount:
        for _uri, _key, path in files:
            os.stat(mount.join(path))
        clean_twin.faults.add("s3", "stall")
        try:
            outcomes = concurrent_reads([mount.join(path) for _uri, _key, path in files])
        finally:
            clean_twin.faults.clear()
        worst = max(outcome.seconds for outcome in outcomes)
        assert all(outcome.errno == errno.EIO for outcome in outcomes)
        assert worst <= DEADLINE + MARGIN, f"worst read took {worst:.2f}s"
        print(f"16 readers, 4 slots, stalled S3, deadline {DEADLINE:g}s: worst {worst:.2f}s")


# ------------------------------------------------------------------------------ 3. one retry behaviour


def test_s3_503_with_retry_after_is_honoured(clean_twin, tmp_path):
    (uri, key, path), (uri2, key2, path2) = s3_files(clean_twin, 2, skip=40)
    with mounted(clean_twin, tmp_path, source="s3", deadline="6s", retries=5) as mount:
        os.stat(mount.join(path))
        os.stat(mount.join(path2))
        clean_twin.faults.add("s3", "status", match=key, code=503, retry_after=2)
        clean_twin.reset_stats()
        outcome = bounded(lambda: read_head(mount.join(path)))
        assert outcome.errno == errno.EIO
        # Waiting 2 s between tries, a 6 s deadline leaves room for 3 or 4 of the 5 allowed (the open's
        # HeadObject meets the 503 first).
        endpoints = clean_twin.stats()["endpoints"]
        tries = sum(endpoints.get(f"s3:{name}", {}).get("requests", 0) for name in ("HeadObject", "GetObject"))
        assert tries <= 4
        print(f"S3 503 + Retry-After 2 s, deadline 6 s: {tries} HeadObject/GetObject requests (5 allowed), EIO after "
              f"{outcome.seconds:.2f}s")
        clean_twin.faults.add("s3", "status", match=key2, count=1, code=503, retry_after=2)
        outcome = bounded(lambda: read_head(mount.join(path2)))
        assert outcome.ok and outcome.value == clean_twin.catalog.read(uri2, 0, 4096)
        assert outcome.seconds >= 1.9  # it waited as told


# ------------------------------------------------------------------------------ 4. truthful errors


@pytest.mark.parametrize(("source", "endpoint", "said", "not_said"), [
    ("s3", "s3", ["S3 cannot serve", "--source auto"], []),  # an S3 403 under --source s3
    ("http", "download", ["MAST refused a download of the public file"], ["exclusive-access", "get a token"]),
])
def test_a_refusal_of_a_public_file_is_eio_and_says_who_refused(clean_twin, tmp_path, source, endpoint, said,
                                                                 not_said):
    (uri, key, path), = s3_files(clean_twin, 1, skip=50 if source == "s3" else 51)
    with mounted(clean_twin, tmp_path, source=source, deadline=f"{DEADLINE:g}s") as mount:
        os.stat(mount.join(path))
        clean_twin.faults.add(endpoint, "unauthorized", match=key if endpoint == "s3" else uri)
        outcome = bounded(lambda: read_head(mount.join(path)))
        assert outcome.errno == errno.EIO  # never ENOENT (the file exists), nor EACCES (it is public)
        log = mount.log_text()
    assert all(text in log for text in said) and not any(text in log for text in not_said)


# ------------------------------------------------------------------------------ 5. redirects


def test_downloads_follow_redirects_to_another_host_with_their_range(clean_twin, tmp_path):
    (uri, _key, path), = s3_files(clean_twin, 1, skip=60)
    with mounted(clean_twin, tmp_path, source="http", env={"MAST_API_TOKEN": twin_catalog.VALID_TOKEN}) as mount:
        os.stat(mount.join(path))
        clean_twin.faults.add("download", "redirect", hops=2)
        assert sha256_of(mount.join(path)) == clean_twin.catalog.sha256(uri)
        served = [r for r in twin_requests(clean_twin) if r["endpoint"] == "download" and r["uri"] == uri]
        second = [r for r in served if r["host"] == "127.0.0.2"]
        gets = [r for r in second if r["method"] == "GET"]  # the open's HEAD asks for no range
        assert gets and all(r["range"] and r["range"].startswith("bytes=") for r in gets)
        assert not any(r["with_token"] for r in second)  # 127.0.0.2 is not on the allowlist
        assert all(r["with_token"] for r in served if r["host"] == "127.0.0.1")


def test_the_token_follows_a_redirect_only_to_an_allowed_host(clean_twin, tmp_path):
    (uri, path), = exclusive_files(clean_twin)[:1]
    env = {"MAST_API_TOKEN": twin_catalog.VALID_TOKEN}
    clean_twin.faults.add("download", "redirect", match=uri)
    with mounted(clean_twin, tmp_path, source="http", env=env, deadline=f"{DEADLINE:g}s") as mount:
        outcome = bounded(lambda: read_head(mount.join(path)))
        assert outcome.errno == errno.EACCES
        assert "not on the token allowlist" in mount.log_text() and "--token-hosts" in mount.log_text()
    second = [r for r in twin_requests(clean_twin) if r["host"] == "127.0.0.2" and r.get("uri") == uri]
    assert second and not any(r["with_token"] for r in second)
    with mounted(clean_twin, tmp_path, source="http", env=env, token_hosts=["127.0.0.2"], name="trusted",
                 cache_dir=tmp_path / "cache2") as mount:
        assert sha256_of(mount.join(path)) == clean_twin.catalog.sha256(uri)
    second = [r for r in twin_requests(clean_twin) if r["host"] == "127.0.0.2" and r.get("uri") == uri]
    assert second[-1]["with_token"]


def test_more_than_five_redirects_is_eio(clean_twin, tmp_path):
    (uri, _key, path), = s3_files(clean_twin, 1, skip=61)
    with mounted(clean_twin, tmp_path, source="http", deadline=f"{DEADLINE:g}s") as mount:
        os.stat(mount.join(path))
        clean_twin.faults.add("download", "redirect", match=uri, hops=6, to="mast")
        assert bounded(lambda: read_head(mount.join(path))).errno == errno.EIO
        clean_twin.faults.clear()
        clean_twin.faults.add("download", "redirect", match=uri, hops=5, to="mast")
        assert bounded(lambda: read_head(mount.join(path))).value == clean_twin.catalog.read(uri, 0, 4096)


# ------------------------------------------------------------------------------ 6. a token that lives


def test_an_expired_token_warns_once_at_mount_and_public_data_still_reads(clean_twin, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(twin_catalog.EXPIRED_TOKEN)
    token_file.chmod(0o600)
    (uri, _key, path), = s3_files(clean_twin, 1, skip=62)
    with mounted(clean_twin, tmp_path, token_file=str(token_file)) as mount:
        assert read_head(mount.join(path)) == clean_twin.catalog.read(uri, 0, 4096)
        deadline = time.monotonic() + 10
        while status_of(mount)["token"]["state"] == "unchecked" and time.monotonic() < deadline:
            time.sleep(0.2)
        status = status_of(mount)
        log = mount.log_text()
    assert status["token"]["state"] == "refused" and status["token"]["source"] == f"file {token_file}"
    assert status["token"]["last_check"] and twin_catalog.EXPIRED_TOKEN not in str(status)
    warnings = [line for line in log.splitlines() if "WARNING" in line and "token" in line]
    assert len(warnings) == 1 and "auth.mast.stsci.edu/token" in warnings[0] and str(token_file) in warnings[0]


def test_a_token_saved_anew_serves_the_live_mount(clean_twin, tmp_path):
    first, second = "twin0first0token00000000000000aa", "twin0second0token0000000000000bb"
    clean_twin.catalog.set_token(first, "valid")
    token_file = tmp_path / "token"
    token_file.write_text(first)
    token_file.chmod(0o600)
    (uri_a, path_a), (uri_b, path_b), (uri_c, path_c) = exclusive_files(clean_twin)[:3]
    with mounted(clean_twin, tmp_path, token_file=str(token_file), deadline=f"{DEADLINE:g}s") as mount:
        assert read_head(mount.join(path_a)) == clean_twin.catalog.read(uri_a, 0, 4096)
        clean_twin.catalog.set_token(first, "expired")  # MAST lets it expire mid-mount
        clean_twin.catalog.set_token(second, "valid")  # and the user makes a new one
        assert bounded(lambda: read_head(mount.join(path_b))).errno == errno.EACCES
        token_file.write_text(second)  # saved: no remount
        outcome = bounded(lambda: read_head(mount.join(path_c)))
        assert outcome.ok and outcome.value == clean_twin.catalog.read(uri_c, 0, 4096)
        drop_page_cache(mount.join(path_b))
        assert read_head(mount.join(path_b)) == clean_twin.catalog.read(uri_b, 0, 4096)
        deadline = time.monotonic() + 10
        while status_of(mount)["token"]["state"] != "valid" and time.monotonic() < deadline:
            time.sleep(0.2)
        token = status_of(mount)["token"]
        log = mount.log_text()
    assert token["state"] == "valid" and token["ezid"] == "twinuser" and token["renewals"] == 1
    assert first not in log and second not in log and first not in str(token) and second not in str(token)
