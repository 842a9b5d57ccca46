"""The ``mastfs`` command line as a user runs it (subprocesses, real mounts of the twin): help texts,
status, prefetch (manifest, resume after Ctrl-C, exclusive data, failures), refresh, the cache verbs,
mount/umount edge cases, the demo, systemd's Type=notify protocol, the fstab mount helper, and the
configuration reference."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from mountutil import _is_mounted, endpoint_requests, mounted, start_mount

from mastfs.config import OPTIONS
from mastfs.twin import catalog as twin_catalog

REPO = Path(__file__).resolve().parent.parent
PROGRAM = twin_catalog.PROGRAM_2733
OBS = twin_catalog.OBS_2733_MIRI_F1130W
OTHER_OBS = "jw02733-o002_t001_miri_f770w"
WAIT = 30.0


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a user with no mastfs settings (no config file, no MASTFS_*, no token)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MASTFS_") and k != "MAST_API_TOKEN"}
    env.update(MASTFS_CONFIG="/nonexistent/mastfs-test-config.toml", COLUMNS="100", **extra)
    return env


def mastfs(*args: str, timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``mastfs ARGS`` and return the finished process (text stdout and stderr)."""
    return subprocess.run([sys.executable, "-m", "mastfs", *args], capture_output=True, text=True,
                          timeout=timeout, env=env or cli_env())


def twin_flags(twin) -> list[str]:
    return ["--mast-url", twin.mast_url, "--resolver-url", twin.resolver_url, "--s3-endpoint", twin.s3_endpoint]


def wait_for(condition, what: str, timeout: float = WAIT):
    """Poll ``condition()`` until it returns something true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def daemons_of(mountpoint: str) -> list[psutil.Process]:
    """Detached mastfs daemons serving ``mountpoint`` (``python -c <bootstrap> mastfs.daemon MOUNTPOINT``)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if "mastfs.daemon" in cmdline and mountpoint in cmdline:
            found.append(process)
    return found


def summary_line(stdout: str) -> str:
    return [line for line in stdout.splitlines() if line.startswith("prefetch: ") and " files, " in line][-1]


def summary_counts(stdout: str) -> dict[str, int]:
    line = summary_line(stdout)
    return {key: int(re.search(rf"(\d+) {key}", line).group(1)) for key in ("done", "skipped", "failed")}


def manifest_lines(stdout: str, status: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith(status + " ")]


def sha256_of(path: str) -> str:
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def wire_bytes(stats: dict) -> int:
    """Bytes the twin sent for file contents (HTTPS downloads and S3)."""
    return sum(stats["endpoints"].get(key, {}).get("bytes_sent", 0) for key in ("download", "s3"))


@pytest.fixture(scope="module")
def mount(twin, tmp_path_factory):
    with mounted(twin, tmp_path_factory.mktemp("cli"), cache_size="1G", deadline="8s", retries=2) as live:
        yield live


# ------------------------------------------------------------------------------------------- help

EVERY_OPTION_FLAG = [option.cli_flag for option in OPTIONS]


@pytest.mark.parametrize(("command", "mentions"), [
    ([], ["mount", "umount", "demo", "status", "prefetch", "refresh", "cache", "twin", "examples:"]),
    (["mount"], ["--foreground", "--debug", "-o OPTIONS", *EVERY_OPTION_FLAG,
                 *(option.env for option in OPTIONS)]),
    (["umount"], ["mountpoint", "in flight"]),
    (["demo"], ["--scale", "--cache-dir", "Ctrl-C"]),
    (["status"], ["--json", "mountpoint", "transfers"]),
    (["prefetch"], ["--level", "--type", "--jobs", "PATH", "rerun resumes"]),
    (["refresh"], ["path", "asks MAST again"]),
    (["cache"], ["stats", "clear", "verify", "--cache-dir", "--cache-size", "--min-free-space"]),
    (["twin"], ["serve"]),
    (["twin", "serve"], ["--host", "--port", "--s3-port", "--scale", "JSON"]),
], ids=["mastfs", "mount", "umount", "demo", "status", "prefetch", "refresh", "cache", "twin", "twin serve"])
def test_help_of_every_command(command, mentions):
    result = mastfs(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: mastfs"), result.stdout
    for text in mentions:
        assert text in result.stdout, f"`mastfs {' '.join(command)} --help` does not mention {text!r}"


def test_cache_help_lists_only_cache_settings():
    result = mastfs("cache", "--help")
    assert "--mast-url" not in result.stdout and "--allow-other" not in result.stdout


def test_configuration_doc_covers_every_option():
    text = (REPO / "docs" / "configuration.md").read_text()
    for option in OPTIONS:
        for form in (f"`{option.name}`", option.env, option.cli_flag):
            assert form in text, f"docs/configuration.md does not mention {form} ({option.name})"


# ----------------------------------------------------------------------------------------- status


def uncached_pair(mount, twin) -> tuple[str, str]:
    """Two files of one level2 directory of the program, public and in the cloud, whose bytes the mount
    has not cached: the test sees real transfers whichever tests ran before."""
    program = mount.join("program", PROGRAM)
    for obs_id in [OBS, *sorted(os.listdir(program))]:  # OBS's files first: big ones, long transfers
        level2 = os.path.join(program, obs_id, "level2")
        if not os.path.isdir(level2):
            continue
        fresh = []
        for name in sorted(os.listdir(level2)):
            path = os.path.join(level2, name)
            product = twin.catalog.product(os.getxattr(path, "user.mastfs.uri").decode())
            if product.s3_key and not product.exclusive and int(os.getxattr(path, "user.mastfs.cached_bytes")) == 0:
                fresh.append(path)
            if len(fresh) == 2:
                return fresh[0], fresh[1]
    raise AssertionError("no level2 directory of the program has two uncached cloud products left")


@pytest.mark.mount
def test_status_shows_cache_transfers_counters_and_sources(mount, clean_twin):
    first, second = uncached_pair(mount, clean_twin)
    sha256_of(first)
    first_uri = os.getxattr(first, "user.mastfs.uri").decode()
    second_uri = os.getxattr(second, "user.mastfs.uri").decode()
    clean_twin.faults.add("s3", "latency", match=os.path.basename(second), seconds=2)
    read = {}
    reader = threading.Thread(target=lambda: read.update(sha=sha256_of(second)))
    reader.start()
    try:
        answer = wait_for(lambda: (status := json.loads(mastfs("status", mount.path, "--json").stdout))
                          ["reader"]["in_flight"] and status, "a transfer in flight")
        human = mastfs("status", mount.path)
    finally:
        reader.join(timeout=WAIT)
        clean_twin.faults.clear()
    assert read["sha"] == clean_twin.catalog.sha256(second_uri)
    assert answer["cache"]["limit"] == 1 << 30
    assert answer["cache"]["used"] > 0 and answer["cache"]["dir"] == mount.cache_dir
    assert answer["reader"]["bytes_fetched"]["s3"] > 0
    assert answer["reader"]["cache"]["requests"] >= 1
    assert {"uri": first_uri, "source": "s3"} in answer["reader"]["recent"]
    [transfer] = answer["reader"]["in_flight"]
    assert transfer["uri"] == second_uri and transfer["source"] == "s3"

    assert human.returncode == 0, human.stderr
    text = human.stdout
    assert f"{mount.path}: mastfs" in text
    assert re.search(r"cache +[\d.]+ [KM]iB of 1\.0 GiB \(\d+\.\d%\) in \d+ blocks at " + re.escape(mount.cache_dir),
                     text)
    assert re.search(r"fetched .*[KM]iB from s3", text)
    assert re.search(r"requests +[1-9]\d* for file bytes", text)
    errors = answer["reader"]["errors"]  # earlier tests of the module's mount may have counted some
    assert ("errors    none" in text) == (not errors)
    assert all(f"{kind} {count}" in text for kind, count in errors.items())
    assert "signals   0 waits ended early by a signal to the requester" in text
    assert re.search(r"metadata  [1-9]\d* inodes in memory \([1-9]\d* known to the kernel\), \d+ listings memoised",
                     text)
    assert answer["tree"]["kernel_inodes"] >= 2  # at least level2 and the file read
    assert "transfers 1 in flight" in text
    assert re.search(r"%.* of [\d.]+ KiB via s3 " + re.escape(second_uri), text)
    assert re.search(r"s3 +" + re.escape(first_uri), text)


def test_status_of_a_path_outside_any_mount_says_so(tmp_path):
    result = mastfs("status", str(tmp_path))
    assert result.returncode == 1
    assert "is not inside a mastfs mount" in result.stderr


# --------------------------------------------------------------------------------------- prefetch


@pytest.mark.mount
def test_prefetch_fills_the_cache_then_reruns_skip_everything(mount, clean_twin):
    obs_dir = mount.join("program", PROGRAM, OBS)
    level2 = os.path.join(obs_dir, "level2")
    names = sorted(os.listdir(level2))
    result = mastfs("prefetch", obs_dir, "--level", "2", "--type", "SCIENCE", "--jobs", "4")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ETA" in result.stderr and "files" in result.stderr
    assert re.search(rf"\[=+\] 100\.0%  {len(names)}/{len(names)} files", result.stderr), result.stderr
    done = manifest_lines(result.stdout, "done") + manifest_lines(result.stdout, "skipped")
    assert sorted(line.rsplit("/", 1)[1].split()[0] for line in done) == names
    assert summary_counts(result.stdout)["failed"] == 0
    assert f"prefetch: {len(names)} files" in summary_line(result.stdout)

    clean_twin.reset_stats()
    for name in names:
        uri = os.getxattr(os.path.join(level2, name), "user.mastfs.uri").decode()
        assert sha256_of(os.path.join(level2, name)) == clean_twin.catalog.sha256(uri)
    assert wire_bytes(clean_twin.stats()) == 0

    again = mastfs("prefetch", obs_dir, "--level", "2", "--type", "SCIENCE", "--jobs", "4")
    assert again.returncode == 0, again.stdout + again.stderr
    assert summary_counts(again.stdout) == {"done": 0, "skipped": len(names), "failed": 0}
    assert f"{len(names)} skipped ({len(names)} already cached)" in summary_line(again.stdout)
    assert wire_bytes(clean_twin.stats()) == 0


@pytest.mark.mount
def test_prefetch_of_exclusive_data_without_a_token_says_why(mount, clean_twin):
    program = mount.join("program", twin_catalog.EXCLUSIVE_PROGRAM)
    result = mastfs("prefetch", program, "--level", "3")
    assert result.returncode == 0, result.stdout + result.stderr
    skipped = manifest_lines(result.stdout, "skipped")
    assert skipped and all(line.endswith("(exclusive-access data needs a token)") for line in skipped)
    counts = summary_counts(result.stdout)
    assert counts == {"done": 0, "skipped": len(skipped), "failed": 0}
    assert wire_bytes(clean_twin.stats()) == 0


@pytest.mark.mount
def test_prefetch_failure_is_in_the_manifest_with_its_reason(mount, clean_twin):
    level1 = mount.join("program", PROGRAM, "jw02733-o001_t001_nircam_clear-f090w", "level1")
    name = sorted(os.listdir(level1))[0]
    path = os.path.join(level1, name)
    clean_twin.faults.add("s3", "status", match=name, code=503)
    result = mastfs("prefetch", path)
    clean_twin.faults.clear()
    assert result.returncode == 1, result.stdout + result.stderr
    [failed] = manifest_lines(result.stdout, "failed")
    # --retries 2; the open's HeadObject meets the fault first (a HEAD answer has no body: its code is 503)
    assert path in failed and "failed 2 times" in failed and ("SlowDown" in failed or "503" in failed), failed
    assert summary_counts(result.stdout) == {"done": 0, "skipped": 0, "failed": 1}


@pytest.mark.mount
def test_interrupted_prefetch_resumes(mount, clean_twin):
    level2 = mount.join("program", PROGRAM, OTHER_OBS, "level2")
    total = len(os.listdir(level2))
    clean_twin.faults.add("s3", "latency", seconds=0.1)
    first = subprocess.Popen([sys.executable, "-m", "mastfs", "prefetch", level2, "--jobs", "2"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env())
    try:
        ready, _, _ = select.select([first.stderr], [], [], WAIT)
        assert ready, "no progress line"
        assert "ETA" in first.stderr.readline()
        wait_for(lambda: endpoint_requests(clean_twin.stats(), "s3:GetObject") >= 4, "a few transfers")
        first.send_signal(signal.SIGINT)
        out, _ = first.communicate(timeout=WAIT)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
        clean_twin.faults.clear()
    assert first.returncode == 130
    assert f"of {total} files; run the same command again to resume" in out
    finished_before = len(manifest_lines(out, "done"))
    assert 1 <= finished_before < total

    rerun = mastfs("prefetch", level2, "--jobs", "2")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    counts = summary_counts(rerun.stdout)
    assert counts["failed"] == 0 and counts["done"] + counts["skipped"] == total
    assert counts["skipped"] >= finished_before and counts["done"] >= 1
    assert summary_counts(mastfs("prefetch", level2).stdout) == {"done": 0, "skipped": total, "failed": 0}
    assert "interrupted by its client" in mount.log_text()


# ---------------------------------------------------------------------------------------- refresh


@pytest.mark.mount
def test_refresh_makes_the_next_listing_ask_mast_again(mount, clean_twin):
    program = mount.join("program", PROGRAM)
    obs_level3 = os.path.join(program, OBS, "level3")
    os.listdir(program)
    os.listdir(obs_level3)
    clean_twin.reset_stats()
    os.listdir(program)
    os.listdir(obs_level3)
    assert endpoint_requests(clean_twin.stats(), "invoke") == 0

    result = mastfs("refresh", program)
    assert result.returncode == 0, result.stderr
    assert f"refreshed {program}" in result.stdout
    assert OBS in os.listdir(program)
    assert endpoint_requests(clean_twin.stats(), "invoke:Mast.Caom.Filtered") >= 1
    assert os.listdir(obs_level3)
    assert endpoint_requests(clean_twin.stats(), "invoke:Mast.Caom.Products") >= 1


def test_refresh_outside_a_mount_fails_clearly(tmp_path):
    result = mastfs("refresh", str(tmp_path))
    assert result.returncode == 1 and "not inside a mastfs mount" in result.stderr


# ------------------------------------------------------------------------------------------ cache


@pytest.mark.mount
def test_cache_verbs_refuse_while_mounted_and_work_after(twin, tmp_path):
    cache_dir = tmp_path / "cache"
    cache_flags = ["--cache-dir", str(cache_dir), "--cache-size", "256M"]
    with mounted(twin, tmp_path, cache_dir=cache_dir, cache_size="256M") as live:
        level1 = live.join("program", PROGRAM, "jw02733-o001_t001_nircam_clear-f356w", "level1")
        for name in sorted(os.listdir(level1))[:3]:
            sha256_of(os.path.join(level1, name))
        wait_for(lambda: "in 0 blocks" not in mastfs("status", live.path).stdout, "blocks on disk")
        for action in ("clear", "verify"):
            refused = mastfs("cache", action, *cache_flags)
            assert refused.returncode == 1
            assert f"in use by the mount at {live.path}" in refused.stderr and "unmount it first" in refused.stderr
        busy = mastfs("cache", "stats", *cache_flags)
        assert busy.returncode == 0, busy.stderr
        assert f"(in use by the mount at {live.path})" in busy.stdout

    stats = mastfs("cache", "stats", *cache_flags)
    assert stats.returncode == 0, stats.stderr
    blocks = int(re.search(r"of 256\.0 MiB \([\d.]+%\) in (\d+) blocks", stats.stdout).group(1))
    assert blocks >= 3
    verify = mastfs("cache", "verify", *cache_flags)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert f"verified {blocks} blocks" in verify.stdout and "0 corrupt removed" in verify.stdout

    block_files = sorted(p for p in (cache_dir / "blocks").rglob("*") if p.is_file() and p.name.isdigit())
    victim = block_files[0]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    verify = mastfs("cache", "verify", *cache_flags)
    assert verify.returncode == 1
    assert f"verified {blocks - 1} blocks" in verify.stdout and "1 corrupt removed" in verify.stdout
    assert str(victim) in verify.stdout and not victim.exists()

    cleared = mastfs("cache", "clear", *cache_flags)
    assert cleared.returncode == 0 and f"({blocks - 1} blocks)" in cleared.stdout
    assert "0 B of 256.0 MiB (0.0%) in 0 blocks" in mastfs("cache", "stats", *cache_flags).stdout


# -------------------------------------------------------------------------------- mount and umount


def test_mount_refuses_a_non_empty_directory(twin, tmp_path):
    target = tmp_path / "full"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    result = mastfs("mount", str(target), *twin_flags(twin), "--cache-dir", str(tmp_path / "cache"))
    assert result.returncode == 1
    assert f"{target} is not empty" in result.stderr
    assert not _is_mounted(str(target)) and (target / "notes.txt").read_text() == "mine"


@pytest.mark.mount
def test_mount_recovers_a_dead_mount_and_umount_ends_the_daemon(twin, tmp_path):
    crashed = start_mount(twin, tmp_path / "mnt", tmp_path / "cache", tmp_path / "crashed.log")
    try:
        crashed.process.kill()
        crashed.process.wait()
        with pytest.raises(OSError) as dead:
            os.listdir(crashed.path)
        assert dead.value.errno == errno.ENOTCONN

        result = mastfs("mount", crashed.path, *twin_flags(twin), "--cache-dir", str(tmp_path / "cache"))
        assert result.returncode == 0, result.stderr
        assert f"mounted at {crashed.path}" in result.stderr
        assert "dead mount of a crashed daemon (Transport endpoint is not connected)" in result.stderr
        assert OBS in os.listdir(os.path.join(crashed.path, "program", PROGRAM))
        [daemon] = daemons_of(crashed.path)
        unmounted = mastfs("umount", crashed.path)
        assert unmounted.returncode == 0, unmounted.stderr
        assert not _is_mounted(crashed.path)
        daemon.wait(timeout=WAIT)
    finally:
        if _is_mounted(crashed.path):
            subprocess.run(["fusermount3", "-u", "-z", crashed.path], check=False)
    assert "Traceback" not in (tmp_path / "cache" / "mastfs.log").read_text()


@pytest.mark.mount
def test_umount_while_a_read_is_in_flight(twin, clean_twin, tmp_path):
    mountpoint = str(tmp_path / "mnt")
    os.mkdir(mountpoint)
    started = mastfs("mount", mountpoint, *twin_flags(twin), "--cache-dir", str(tmp_path / "cache"))
    assert started.returncode == 0, started.stderr
    [daemon] = daemons_of(mountpoint)
    try:
        level2 = os.path.join(mountpoint, "program", PROGRAM, OBS, "level2")
        name = sorted(os.listdir(level2))[-1]
        uri = os.getxattr(os.path.join(level2, name), "user.mastfs.uri").decode()
        clean_twin.faults.add("s3", "latency", match=name, seconds=2)
        reader = subprocess.Popen(["sha256sum", os.path.join(level2, name)], stdout=subprocess.PIPE, text=True)
        wait_for(lambda: json.loads(mastfs("status", mountpoint, "--json").stdout)["reader"]["in_flight"],
                 "the read to be in flight")
        result = mastfs("umount", mountpoint)
        assert result.returncode == 0, result.stderr
        assert not _is_mounted(mountpoint)
        out, _ = reader.communicate(timeout=WAIT)
        assert reader.returncode == 0 and out.split()[0] == clean_twin.catalog.sha256(uri)
        daemon.wait(timeout=WAIT)
    finally:
        clean_twin.faults.clear()
        if _is_mounted(mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", mountpoint], check=False)
    assert "Traceback" not in (tmp_path / "cache" / "mastfs.log").read_text()


def test_umount_of_something_not_mounted_says_so(tmp_path):
    result = mastfs("umount", str(tmp_path))
    assert result.returncode == 1 and f"{tmp_path} is not mounted" in result.stderr


# ------------------------------------------------------------------------------------------- demo


@pytest.mark.mount
def test_demo_serves_program_2733_and_cleans_up_on_ctrl_c(tmp_path):
    mountpoint = tmp_path / "demo"
    mountpoint.mkdir()
    temp = tmp_path / "tmp"
    temp.mkdir()
    demo = subprocess.Popen([sys.executable, "-m", "mastfs", "demo", str(mountpoint), "--scale", "0.001"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=cli_env(TMPDIR=str(temp)))
    twins = []
    try:
        wait_for(lambda: demo.poll() is not None or _is_mounted(str(mountpoint)), "the demo mount")
        assert demo.poll() is None, demo.communicate()
        assert OBS in os.listdir(mountpoint / "program" / PROGRAM)
        twins = [child for child in psutil.Process(demo.pid).children(recursive=True)
                 if "twin" in child.cmdline()]
        assert len(twins) == 1
        assert list(temp.glob("mastfs-demo-cache-*"))
        demo.send_signal(signal.SIGINT)
        _, err = demo.communicate(timeout=WAIT)
    finally:
        if demo.poll() is None:
            leftovers = psutil.Process(demo.pid).children(recursive=True)
            demo.kill()
            demo.wait()
            for child in leftovers:
                child.kill()
        if _is_mounted(str(mountpoint)):
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)
    assert demo.returncode == 0, err
    assert "try: ls" in err and "Traceback" not in err
    assert not _is_mounted(str(mountpoint))
    assert not any(twin.is_running() and twin.status() != psutil.STATUS_ZOMBIE for twin in twins)
    assert not list(temp.glob("mastfs-demo-cache-*")), "the demo left its temporary cache behind"


# ---------------------------------------------------------------------------------- systemd, fstab


@pytest.mark.mount
def test_systemd_notify_ready_only_once_mounted_and_stop_unmounts(twin, tmp_path):
    """What systemd sees of ``Type=notify``: READY=1 only once the mount answers; SIGTERM (systemctl
    stop) sends STOPPING=1, unmounts and exits 0."""
    unit = (REPO / "systemd" / "mastfs.service").read_text()
    assert "Type=notify" in unit and re.search(r"^ExecStart=.*mastfs mount --foreground", unit, re.MULTILINE)
    notify_path = str(tmp_path / "notify.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(notify_path)
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    daemon = subprocess.Popen(
        [sys.executable, "-m", "mastfs", "mount", "--foreground", str(mountpoint), *twin_flags(twin),
         "--cache-dir", str(tmp_path / "cache")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=cli_env(NOTIFY_SOCKET=notify_path))
    try:
        listener.settimeout(WAIT)
        assert listener.recv(4096) == b"READY=1"
        assert _is_mounted(str(mountpoint))
        assert OBS in os.listdir(mountpoint / "program" / PROGRAM)
        daemon.send_signal(signal.SIGTERM)
        assert listener.recv(4096) == b"STOPPING=1"
        _, err = daemon.communicate(timeout=WAIT)
    finally:
        listener.close()
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        if _is_mounted(str(mountpoint)):
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)
    assert daemon.returncode == 0, err
    assert not _is_mounted(str(mountpoint))


@pytest.mark.mount
def test_fstab_mount_helper(twin, tmp_path):
    """``systemd/mount.fuse.mastfs`` called as mount(8) calls it for an fstab line of type fuse.mastfs."""
    helper = REPO / "systemd" / "mount.fuse.mastfs"
    assert os.access(helper, os.X_OK)
    mountpoint = tmp_path / "mast"
    mountpoint.mkdir()
    options = ",".join([
        "noauto", "nofail", "_netdev", "x-systemd.automount", "ro", f"mast_url={twin.mast_url}",
        f"resolver_url={twin.resolver_url}", f"s3_endpoint={twin.s3_endpoint}", f"cache_dir={tmp_path / 'cache'}",
        "cache_size=300M", "collection=JWST:HST", "transfers=3",
    ])
    env = cli_env(MASTFS_BIN=str(Path(sys.executable).with_name("mastfs")))
    result = subprocess.run([str(helper), "mastfs", str(mountpoint), "-o", options, "-t", "fuse.mastfs"],
                            capture_output=True, text=True, timeout=60, env=env)
    try:
        assert result.returncode == 0, result.stderr
        assert _is_mounted(str(mountpoint))
        assert OBS in os.listdir(mountpoint / "program" / PROGRAM)
        assert os.listdir(mountpoint / "program" / twin_catalog.HST_PROGRAM)  # collection=JWST:HST applied
        status = json.loads(mastfs("status", str(mountpoint), "--json").stdout)
        assert status["cache"]["limit"] == 300 << 20 and status["cache"]["dir"] == str(tmp_path / "cache")
    finally:
        unmounted = mastfs("umount", str(mountpoint))
    assert unmounted.returncode == 0, unmounted.stderr

    bad = subprocess.run([str(helper), "mastfs", str(mountpoint), "-o", "cache_sise=1G"], capture_output=True,
                         text=True, timeout=60, env=env)
    assert bad.returncode != 0 and "unknown mount option 'cache_sise'" in bad.stderr
    assert not _is_mounted(str(mountpoint))


def test_stale_control_sockets_are_removed_and_live_ones_kept(tmp_path):
    from mastfs.control import remove_stale_sockets

    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(tmp_path / "dead.sock"))
    stale.close()  # a killed daemon's socket: the file stays, nobody listens
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(tmp_path / "live.sock"))
    live.listen(1)
    (tmp_path / "notes.sock").write_text("not a socket")
    try:
        assert remove_stale_sockets(str(tmp_path)) == [str(tmp_path / "dead.sock")]
    finally:
        live.close()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["live.sock", "notes.sock"]
