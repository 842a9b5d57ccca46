"""Security through a real mount with a MAST token (MAST_API_TOKEN, the twin's VALID_TOKEN):

- the token appears in no log (even at DEBUG), no xattr of any file or directory, no command line of the
  daemon or of any process it starts (foreground and background mounts), no file name and no byte of the
  cache directory;
- the cache directory is created 0700;
- with ``allow_other`` (docs/reliability.md, "Who may read exclusive-access data"): other users may
  browse and read public data, but exclusive-access files (readable thanks to the mounting user's token)
  are the mounting user's alone, before and after they were cached; without ``allow_other`` other users
  cannot enter the mount at all.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from mountutil import mounted
from reliability_util import layout_of, sha256_of

from mastfs.twin import catalog as twin_catalog

pytestmark = pytest.mark.mount

TOKEN = twin_catalog.VALID_TOKEN
NOBODY = 65534
EXCLUSIVE_OBS = "jw06543-o001_t001_nircam_clear-f200w"


@pytest.fixture(scope="module")
def base():
    """A directory other users may traverse (pytest's tmp dirs are 0700), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="mastfs-security-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def mount(twin, base):
    twin.faults.clear()
    with mounted(twin, base, env={"MAST_API_TOKEN": TOKEN}, log_level="DEBUG", allow_other=True) as live:
        yield live


def exclusive_product(twin) -> tuple[str, str]:
    """(uri, path under the mount) of the exclusive-access FITS product."""
    layout = layout_of(twin, EXCLUSIVE_OBS)
    return twin_catalog.EXCLUSIVE_URI, os.path.join("obs", EXCLUSIVE_OBS, layout.paths[twin_catalog.EXCLUSIVE_URI])


def public_product(twin) -> tuple[str, str]:
    obs_id = twin_catalog.OBS_2733_MIRI_F1130W
    layout = layout_of(twin, obs_id)
    return twin_catalog.BENCH_1GIB_URI, os.path.join("obs", obs_id, layout.paths[twin_catalog.BENCH_1GIB_URI])


def every_path(root: str) -> list[str]:
    paths = [root]
    for directory, dirs, files in os.walk(root):
        paths += [os.path.join(directory, name) for name in dirs + files]
    return paths


def as_nobody(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(command), user=NOBODY, group=NOBODY, extra_groups=[], capture_output=True,
                          text=True, timeout=60, check=False, cwd="/")


def test_exclusive_data_reads_with_the_token(mount, twin):
    uri, rel = exclusive_product(twin)
    assert stat.S_IMODE(os.stat(mount.join(rel)).st_mode) & 0o400
    assert sha256_of(mount.join(rel)) == twin.catalog.sha256(uri)
    uri, rel = public_product(twin)
    assert sha256_of(mount.join(rel)) == twin.catalog.sha256(uri)


def test_the_token_is_in_no_xattr(mount, twin):
    roots = [mount.join("obs", EXCLUSIVE_OBS), mount.join("program", twin_catalog.EXCLUSIVE_PROGRAM)]
    checked = 0
    for path in [mount.path, *[p for root in roots for p in every_path(root)]]:
        for name in os.listxattr(path):
            assert TOKEN.encode() not in os.getxattr(path, name), (path, name)
            checked += 1
    assert checked > 100


def process_tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def test_the_token_is_in_no_command_line(mount):
    for process in process_tree(mount.process.pid):
        assert TOKEN not in " ".join(process.cmdline()), process


def test_the_token_is_in_no_log(mount):
    log = mount.log_text()
    assert "DEBUG" in log and len(log) > 1000  # the most verbose log there is
    assert TOKEN not in log


def test_the_token_is_nowhere_in_the_cache_directory(mount):
    scanned = 0
    for directory, dirs, files in os.walk(mount.cache_dir):
        for name in dirs + files:
            assert TOKEN not in name
        for name in files:
            with open(os.path.join(directory, name), "rb") as handle:
                data = handle.read()
            assert TOKEN.encode() not in data, os.path.join(directory, name)
            scanned += len(data)
    assert scanned > 1_000_000  # blocks and metadata were written


def test_the_cache_directory_is_created_private(mount):
    assert stat.S_IMODE(os.stat(mount.cache_dir).st_mode) == 0o700


def test_a_background_mount_keeps_the_token_off_every_command_line(twin, base):
    mountpoint = base / "background"
    mountpoint.mkdir()
    cache_dir = base / "background-cache"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MASTFS_")}
    env.update(MAST_API_TOKEN=TOKEN, MASTFS_CONFIG="/nonexistent/mastfs-test-config.toml")
    started = subprocess.run(
        [sys.executable, "-m", "mastfs", "mount", str(mountpoint), "--mast-url", twin.mast_url,
         "--resolver-url", twin.resolver_url, "--s3-endpoint", twin.s3_endpoint, "--cache-dir", str(cache_dir)],
        env=env, capture_output=True, text=True, timeout=60, check=False)
    try:
        assert started.returncode == 0, started.stderr
        assert TOKEN not in started.stderr + started.stdout
        daemons = [p for p in psutil.process_iter(["cmdline"])
                   if str(mountpoint) in " ".join(p.info["cmdline"] or [])]
        assert daemons
        for daemon in daemons:
            for process in process_tree(daemon.pid):
                assert TOKEN not in " ".join(process.cmdline())
        uri, rel = exclusive_product(twin)
        assert sha256_of(os.path.join(mountpoint, rel)) == twin.catalog.sha256(uri)
    finally:
        subprocess.run([sys.executable, "-m", "mastfs", "umount", str(mountpoint)], env=env,
                       capture_output=True, timeout=60, check=False)
        deadline = time.monotonic() + 20
        while any(str(mountpoint) in " ".join(p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"])):
            assert time.monotonic() < deadline, "the background daemon did not exit"
            time.sleep(0.1)
    for directory, _dirs, files in os.walk(cache_dir):
        for name in files:
            with open(os.path.join(directory, name), "rb") as handle:
                assert TOKEN.encode() not in handle.read()


# ----------------------------------------------------------------------------- other users


def test_other_users_read_public_data_with_allow_other(mount, twin):
    uri, rel = public_product(twin)
    listing = as_nobody("ls", mount.join("obs", twin_catalog.OBS_2733_MIRI_F1130W))
    assert listing.returncode == 0, listing.stderr
    read = as_nobody("sha256sum", mount.join(rel))
    assert read.returncode == 0 and read.stdout.split()[0] == twin.catalog.sha256(uri), read.stderr


def test_other_users_cannot_read_exclusive_data_brought_by_the_owners_token(mount, twin):
    uri, rel = exclusive_product(twin)
    assert sha256_of(mount.join(rel)) == twin.catalog.sha256(uri)  # the owner read it: it is cached
    listing = as_nobody("ls", "-l", mount.join(os.path.dirname(rel)))
    assert listing.returncode == 0, listing.stderr  # visible to all ...
    read = as_nobody("head", "-c", "2880", mount.join(rel))
    assert read.returncode != 0 and "Permission denied" in read.stderr, "another user read exclusive data"
    assert not read.stdout


def test_other_users_cannot_read_the_cache_directory(mount):
    probe = as_nobody("ls", mount.cache_dir)
    assert probe.returncode != 0 and "Permission denied" in probe.stderr


def test_without_allow_other_other_users_cannot_enter_the_mount(twin, base):
    with mounted(twin, base, name="private", cache_dir=base / "private-cache") as private:
        probe = as_nobody("ls", private.path)
        assert probe.returncode != 0 and "Permission denied" in probe.stderr
        assert os.listdir(private.path)  # the mounting user can
