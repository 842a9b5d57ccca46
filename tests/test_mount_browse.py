"""Browsing through a real FUSE mount of the twin: namespace, attributes, xattrs, sidecars, request
economy and error codes, all seen through the kernel (os.listdir, os.stat, xattrs, find, getfattr, ls)."""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import os
import socket
import stat
import subprocess
import sys
import time

import pytest
from mountutil import endpoint_requests, mounted, start_mount

from mastfs import namespace
from mastfs.control import control_request
from mastfs.twin import catalog as twin_catalog

PROGRAM = twin_catalog.PROGRAM_2733
OBS = twin_catalog.OBS_2733_MIRI_F1130W
PROGRAM_2733_OBSERVATIONS = 10  # the executed JWST ones; the OPO row is another collection
PLANNED = twin_catalog.PLANNED_2733_OBS_ID  # the program's planned observation (calib_level -1, no products)


@pytest.fixture(scope="module")
def mount(twin, tmp_path_factory):
    with mounted(twin, tmp_path_factory.mktemp("browse")) as live:
        yield live


def observation_row(twin, obs_id):
    return next(row for row in twin.catalog.observation_rows() if row["obs_id"] == obs_id)


def errno_of(call, *args):
    with pytest.raises(OSError) as info:
        call(*args)
    return info.value.errno


# ------------------------------------------------------------------------------------------- namespace


@pytest.mark.mount
def test_root_holds_the_top_directories_and_the_readme(mount):
    assert sorted(os.listdir(mount.path)) == ["README.txt", "cone", "obs", "program", "target"]
    with open(mount.join("README.txt"), encoding="utf-8") as handle:
        assert handle.read() == namespace.README_TEXT


@pytest.mark.mount
def test_program_lists_its_observations_by_obs_id(mount, twin):
    expected = sorted(row["obs_id"] for row in twin.catalog.observation_rows()
                      if str(row["proposal_id"]) == PROGRAM and row["obs_collection"] == "JWST"
                      and row["calib_level"] != -1)  # the planned one is named in planned.csv instead
    assert len(expected) == PROGRAM_2733_OBSERVATIONS
    assert sorted(os.listdir(mount.join("program", PROGRAM))) == sorted([*expected, "planned.csv"])
    assert PROGRAM in os.listdir(mount.join("program"))


@pytest.mark.mount
def test_observation_directory_groups_products(mount, twin):
    entries = os.listdir(mount.join("program", PROGRAM, OBS))
    assert {"level1", "level2", "level3", "observation.json", "products.csv"} <= set(entries)
    assert set(entries) <= {"level1", "level2", "level3", "auxiliary", "calibration", "info", "preview",
                            "thumbnail", "other", "recommended", "observation.json", "products.csv"}
    level2 = os.listdir(mount.join("program", PROGRAM, OBS, "level2"))
    obsid = observation_row(twin, OBS)["obsid"]
    science_level2 = {row["productFilename"] for row in twin.catalog.product_rows(obsid)
                      if row["productType"] == "SCIENCE" and row.get("calib_level") == 2}
    assert set(level2) == science_level2
    assert len(level2) == 80
    assert "jw02733-o002_t001_miri_f1130w_i2d.fits" in os.listdir(mount.join("program", PROGRAM, OBS, "level3"))


@pytest.mark.mount
def test_listings_show_dot_and_dotdot_like_a_local_disk(mount):
    level3 = mount.join("program", PROGRAM, OBS, "level3")
    shown = subprocess.run(["ls", "-a1", level3], capture_output=True, text=True, check=True).stdout.split()
    assert shown[:2] == [".", ".."]
    assert sorted(shown[2:]) == sorted(os.listdir(level3))
    assert os.stat(os.path.join(level3, "..")).st_ino == os.stat(mount.join("program", PROGRAM, OBS)).st_ino
    root = subprocess.run(["ls", "-a1", mount.path], capture_output=True, text=True, check=True).stdout.split()
    assert root == [".", "..", "README.txt", "cone", "obs", "program", "target"]


@pytest.mark.mount
def test_obs_target_and_cone_directories(mount):
    direct = mount.join("obs", OBS)
    assert "level3" in os.listdir(direct)
    assert os.stat(direct).st_ino != os.stat(mount.join("program", PROGRAM, OBS)).st_ino
    assert OBS in os.listdir(mount.join("target", "NGC 3132"))
    assert OBS in os.listdir(mount.join("cone", "151.755,-40.437,0.1"))
    assert errno_of(os.listdir, mount.join("target", twin_catalog.UNRESOLVABLE_NAME)) == errno.ENOENT
    assert "does not resolve" in mount.log_text()
    assert OBS in os.listdir(mount.join("obs"))
    assert "NGC 3132" in os.listdir(mount.join("target"))


@pytest.mark.mount
def test_unknown_program_and_observation_are_enoent(mount):
    assert errno_of(os.stat, mount.join("program", "99999")) == errno.ENOENT
    assert errno_of(os.stat, mount.join("program", PROGRAM, "jw02733-o099_t001_miri_f9999w")) == errno.ENOENT
    assert errno_of(os.stat, mount.join("obs", "jw09999-o099_t001_nothing")) == errno.ENOENT


# ------------------------------------------------------------------------------------------ attributes


@pytest.mark.mount
def test_modes_sizes_and_times(mount, twin):
    obs_dir = mount.join("program", PROGRAM, OBS)
    info = os.stat(obs_dir)
    assert stat.S_ISDIR(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o555
    release = observation_row(twin, OBS)["t_obs_release"]
    assert info.st_mtime == pytest.approx((release - 40587) * 86400, abs=1)
    path = os.path.join(obs_dir, "level3", "jw02733-o002_t001_miri_f1130w_i2d.fits")
    file_info = os.stat(path)
    assert stat.S_ISREG(file_info.st_mode) and stat.S_IMODE(file_info.st_mode) == 0o444
    assert file_info.st_size == twin.catalog.product(twin_catalog.BENCH_1GIB_URI).size
    assert file_info.st_mtime == info.st_mtime
    assert file_info.st_uid == os.getuid() and file_info.st_gid == os.getgid()


@pytest.mark.mount
def test_null_size_is_resolved(mount, twin):
    uri = twin_catalog.NULL_SIZE_URI
    name = uri.rsplit("/", 1)[1]
    path = mount.join("program", PROGRAM, "jw02733-o002_t001_miri_f1800w", "level3", name)
    assert os.stat(path).st_size == twin.catalog.product(uri).size


@pytest.mark.mount
def test_statfs_is_read_only_and_reports_the_cache(mount):
    info = os.statvfs(mount.path)
    assert info.f_flag & os.ST_RDONLY
    assert info.f_namemax == 255
    assert info.f_blocks * info.f_frsize == pytest.approx(20 * 2**30, rel=0.01)  # the default cache limit


# -------------------------------------------------------------------------------------------- xattrs


@pytest.mark.mount
def test_observation_xattrs(mount, twin):
    obs_dir = mount.join("program", PROGRAM, OBS)
    names = os.listxattr(obs_dir)
    row = observation_row(twin, OBS)
    expected = {f"user.mast_{key}" for key, value in row.items() if value is not None}
    assert set(names) == expected | {"user.mastfs.observation_date"}
    assert os.getxattr(obs_dir, "user.mast_obs_id") == OBS.encode()
    assert os.getxattr(obs_dir, "user.mast_proposal_id") == PROGRAM.encode()
    output = subprocess.run(["getfattr", "-d", obs_dir], capture_output=True, text=True, check=True).stdout
    assert f'user.mast_obs_id="{OBS}"' in output


@pytest.mark.mount
def test_product_xattrs(mount, twin):
    path = mount.join("program", PROGRAM, OBS, "level3", "jw02733-o002_t001_miri_f1130w_i2d.fits")
    names = set(os.listxattr(path))
    assert {"user.mast_dataURI", "user.mast_productType", "user.mast_size", "user.mastfs.uri"} <= names
    assert os.getxattr(path, "user.mast_dataURI") == twin_catalog.BENCH_1GIB_URI.encode()
    assert os.getxattr(path, "user.mast_productType") == b"SCIENCE"


@pytest.mark.mount
def test_xattr_errors_cost_no_requests(mount, clean_twin):
    path = mount.join("program", PROGRAM, OBS)
    assert errno_of(os.getxattr, path, "user.mast_no_such_field") == errno.ENODATA
    assert errno_of(os.getxattr, path, "security.selinux") == errno.EOPNOTSUPP
    assert errno_of(os.getxattr, path, "trusted.x") == errno.EOPNOTSUPP
    # ACLs: the kernel answers itself (the mount does not enable them)
    assert errno_of(os.getxattr, path, "system.posix_acl_access") in (errno.ENODATA, errno.EOPNOTSUPP)
    assert errno_of(os.setxattr, path, "user.mast_obs_id", b"x") in (errno.EPERM, errno.EROFS)
    assert errno_of(os.removexattr, path, "user.mast_obs_id") in (errno.EPERM, errno.EROFS)
    assert clean_twin.stats()["total_requests"] == 0


# ------------------------------------------------------------------------------------------- sidecars


@pytest.mark.mount
def test_sidecars_hold_every_field(mount, twin):
    obs_dir = mount.join("program", PROGRAM, OBS)
    row = observation_row(twin, OBS)
    with open(os.path.join(obs_dir, "observation.json"), encoding="utf-8") as handle:
        data = json.load(handle)
    assert set(data) == set(row)
    assert data["obs_id"] == OBS and str(data["obsid"]) == str(row["obsid"])
    with open(os.path.join(obs_dir, "products.csv"), encoding="utf-8") as handle:
        rows = list(csv.DictReader(io.StringIO(handle.read())))
    catalog_rows = twin.catalog.product_rows(row["obsid"])
    assert {r["dataURI"] for r in rows} == {r["dataURI"] for r in catalog_rows}
    assert set(catalog_rows[0]) | {"mastfs_path", "mastfs_kind", "mastfs_observation_date"} == set(rows[0])
    shown = [r for r in rows if r["mastfs_path"]]
    assert all(os.path.exists(os.path.join(obs_dir, r["mastfs_path"])) for r in shown[:50])


# ----------------------------------------------------------------------------------------- bad names


BAD_NAMES = [
    ("program", "abc"), ("program", "02733"), ("program", "27;33"), ("program", "2733%"),
    ("cone", "400,0"), ("cone", "10,95"), ("cone", "10,10,0"), ("cone", "ten,eleven"), ("cone", "1,2,3,4"),
    ("target", "' OR 1=1 --"), ("target", "NGC*"), ("obs", "x;y"), ("obs", "a\x01b"),
    (".hidden",), (".Trash",), (".Trash-1000",), ("autorun.inf",), (".xdg-volume-info",), ("desktop.ini",),
    (".git",), (".DS_Store",), ("Thumbs.db",),
    ("program", ".hidden"), ("program", PROGRAM, ".git"), ("program", PROGRAM, "desktop.ini"),
    ("program", PROGRAM, OBS, ".Trash-0"), ("program", PROGRAM, OBS, "autorun.inf"),
    ("program", PROGRAM, OBS, "level2", ".directory"),
]


@pytest.mark.mount
def test_bad_names_are_enoent_without_requests(mount, clean_twin):
    os.listdir(mount.join("program", PROGRAM, OBS, "level2"))  # make the parents known first
    clean_twin.reset_stats()
    for parts in BAD_NAMES:
        assert errno_of(os.stat, mount.join(*parts)) == errno.ENOENT, parts
    assert errno_of(os.stat, mount.join("program", "9" * 300)) == errno.ENAMETOOLONG
    assert clean_twin.stats()["total_requests"] == 0


@pytest.mark.mount
def test_writes_are_erofs(mount):
    obs_dir = mount.join("program", PROGRAM, OBS)
    file = os.path.join(obs_dir, "observation.json")
    assert errno_of(open, os.path.join(obs_dir, "new.txt"), "w") == errno.EROFS
    assert errno_of(open, file, "r+") == errno.EROFS
    assert errno_of(os.mkdir, os.path.join(obs_dir, "newdir")) == errno.EROFS
    assert errno_of(os.unlink, file) == errno.EROFS
    assert errno_of(os.rmdir, os.path.join(obs_dir, "level2")) == errno.EROFS
    assert errno_of(os.rename, file, os.path.join(obs_dir, "moved.json")) == errno.EROFS
    assert errno_of(os.chmod, file, 0o644) == errno.EROFS
    assert errno_of(os.utime, file, None) == errno.EROFS
    assert errno_of(os.symlink, file, os.path.join(obs_dir, "link")) == errno.EROFS
    assert errno_of(os.link, file, os.path.join(obs_dir, "hard")) == errno.EROFS
    assert errno_of(os.truncate, file, 0) == errno.EROFS


# --------------------------------------------------------------------------------------- exclusive data


@pytest.mark.mount
def test_exclusive_products_are_0000_and_refused_with_one_log_line(mount, twin):
    uri = twin_catalog.EXCLUSIVE_URI
    obs_id = uri.rsplit("/", 1)[1].rsplit("_", 1)[0]
    path = mount.join("program", twin_catalog.EXCLUSIVE_PROGRAM, obs_id, "level3", uri.rsplit("/", 1)[1])
    assert stat.S_IMODE(os.stat(path).st_mode) == 0
    for _ in range(3):
        assert errno_of(open, path, "rb") == errno.EACCES
    lines = [line for line in mount.log_text().splitlines() if "auth.mast.stsci.edu/token" in line]
    assert len(lines) == 1 and "MAST_API_TOKEN" in lines[0]


# ----------------------------------------------------------------------------------- request economy


@pytest.mark.mount
def test_listings_cost_one_query_and_nothing_when_repeated_or_remounted(twin, clean_twin, tmp_path):
    cache = tmp_path / "cache"
    level2 = os.path.join("program", PROGRAM, OBS, "level2")
    with mounted(twin, tmp_path, cache_dir=cache, name="first") as first:
        os.listdir(first.join("program", PROGRAM))
        stats = clean_twin.stats()
        assert endpoint_requests(stats, "invoke:Mast.Caom.Filtered") == 1
        # nothing but the query (and the mount's one probe of MAST, a whoami)
        assert stats["total_requests"] == endpoint_requests(stats, "invoke") + endpoint_requests(stats, "whoami")

        clean_twin.reset_stats()
        listing = subprocess.run(["ls", "-l", first.join(level2)], capture_output=True, text=True, check=True)
        assert len(listing.stdout.splitlines()) == 81  # "total" + 80 files
        stats = clean_twin.stats()
        assert endpoint_requests(stats, "invoke:Mast.Caom.Products") == 1
        assert stats["total_requests"] == 1

        clean_twin.reset_stats()
        os.listdir(first.join("program", PROGRAM))
        subprocess.run(["ls", "-l", first.join(level2)], capture_output=True, check=True)
        assert clean_twin.stats()["total_requests"] == 0

    with mounted(twin, tmp_path, cache_dir=cache, name="second") as second:
        clean_twin.reset_stats()
        os.listdir(second.join("program", PROGRAM))
        subprocess.run(["ls", "-l", second.join(level2)], capture_output=True, check=True)
        assert clean_twin.stats()["total_requests"] == 0


@pytest.mark.mount
def test_cold_find_costs_one_query_per_observation(twin, clean_twin, tmp_path):
    with mounted(twin, tmp_path) as live:
        found = subprocess.run(["find", live.join("program", PROGRAM)], capture_output=True, text=True,
                               check=True).stdout.splitlines()
        stats = clean_twin.stats()
    assert any(line.endswith("_i2d.fits") for line in found)
    assert len(found) > 3000
    assert not any(line.endswith("/" + PLANNED) for line in found)  # planned: no directory, no query
    assert endpoint_requests(stats, "invoke:Mast.Caom.Filtered") == 1
    assert endpoint_requests(stats, "invoke:Mast.Caom.Products") == PROGRAM_2733_OBSERVATIONS
    assert endpoint_requests(stats, "invoke") == 1 + PROGRAM_2733_OBSERVATIONS
    # the one product without a size in its row is asked for it once (HEAD); nothing else is fetched
    assert endpoint_requests(stats, "download") == 1
    assert endpoint_requests(stats, "whoami") == 1  # the mount's probe of MAST
    assert stats["total_requests"] == 3 + PROGRAM_2733_OBSERVATIONS


# ------------------------------------------------------------------------------------------- outages


@pytest.mark.mount
def test_stalled_archive_is_eio_never_enoent_and_seen_data_still_lists(twin, clean_twin, tmp_path):
    cache = tmp_path / "cache"
    with mounted(twin, tmp_path, cache_dir=cache, name="warm", ttl_recent="1s", ttl_released="1s") as warm:
        listed = os.listdir(warm.join("program", PROGRAM))
    time.sleep(1.5)  # let the 1 s TTL expire: the cached listing is now stale
    clean_twin.faults.add("invoke", "stall")
    # A stalled answer is indistinguishable from a slow query: it is bounded by the query timeout.
    with mounted(twin, tmp_path, cache_dir=cache, name="stalled", deadline="2s", query_timeout="3s",
                 ttl_recent="1s", ttl_released="1s") as stalled:
        assert os.listdir(stalled.join("program", PROGRAM)) == listed  # stale, served while MAST is down
        assert errno_of(os.listdir, stalled.join("program", "1073")) == errno.EIO
        assert errno_of(os.listdir, stalled.join("program", PROGRAM, OBS)) == errno.EIO
        clean_twin.faults.clear()
        assert "serving cached metadata" in stalled.log_text()


# ----------------------------------------------------------------------------------- mount lifecycle


def mastfs_command(*args, env=None):
    return subprocess.run([sys.executable, "-m", "mastfs", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def twin_flags(twin, cache):
    return ["--mast-url", twin.mast_url, "--resolver-url", twin.resolver_url, "--s3-endpoint", twin.s3_endpoint,
            "--cache-dir", str(cache)]


@pytest.mark.mount
def test_background_mount_returns_once_live_and_umount_stops_it(twin, tmp_path):
    mountpoint = tmp_path / "bg"
    mountpoint.mkdir()
    started = mastfs_command("mount", str(mountpoint), *twin_flags(twin, tmp_path / "cache"))
    assert started.returncode == 0, started.stderr
    try:
        assert os.path.ismount(mountpoint)
        assert OBS in os.listdir(mountpoint / "program" / PROGRAM)
        (status,) = control_request(str(mountpoint), {"op": "status"})
        assert status["ok"] and status["cache"]["dir"] == str(tmp_path / "cache")
    finally:
        stopped = mastfs_command("umount", str(mountpoint))
    assert stopped.returncode == 0, stopped.stderr
    assert not os.path.ismount(mountpoint)
    log = (tmp_path / "cache" / "mastfs.log").read_text()
    deadline = time.monotonic() + 20
    while "unmounted" not in log and time.monotonic() < deadline:
        time.sleep(0.1)
        log = (tmp_path / "cache" / "mastfs.log").read_text()
    assert "unmounted" in log and "Traceback" not in log
    assert mastfs_command("umount", str(mountpoint)).returncode == 1  # nothing mounted any more


def test_mount_refuses_a_non_empty_mountpoint(twin, tmp_path):
    mountpoint = tmp_path / "full"
    mountpoint.mkdir()
    (mountpoint / "precious.txt").write_text("keep me")
    result = mastfs_command("mount", str(mountpoint), *twin_flags(twin, tmp_path / "cache"))
    assert result.returncode == 1 and "not empty" in result.stderr
    assert not os.path.ismount(mountpoint)


@pytest.mark.mount
def test_mount_recovers_the_dead_mount_of_a_crashed_daemon(twin, tmp_path):
    crashed = start_mount(twin, tmp_path / "mp", tmp_path / "cache", tmp_path / "crashed.log")
    crashed.process.kill()
    crashed.process.wait()
    assert errno_of(os.listdir, crashed.path) == errno.ENOTCONN
    with mounted(twin, tmp_path, name="mp") as recovered:
        assert OBS in os.listdir(recovered.join("program", PROGRAM))


@pytest.mark.mount
def test_systemd_notify_ready_only_once_live_then_stopping(twin, tmp_path):
    address = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(address)
        notify.settimeout(30)
        with mounted(twin, tmp_path, env={"NOTIFY_SOCKET": address}) as live:
            assert notify.recv(1024) == b"READY=1"
            assert os.path.ismount(live.path)
        assert notify.recv(1024) == b"STOPPING=1"


@pytest.mark.mount
def test_daemon_memory_follows_the_kernel_and_numbers_survive_forgetting(mount, clean_twin):
    """After `ls -l` the daemon holds a node per file; when the kernel evicts its inodes (drop_caches)
    and sends FORGETs, the nodes go; listing again gives every file the number it had."""
    level1 = mount.join("program", PROGRAM, OBS, "level1")
    before = {name: os.stat(os.path.join(level1, name)).st_ino for name in os.listdir(level1)}
    assert len(before) >= 20
    [status] = mount.control({"op": "status"})
    assert status["tree"]["kernel_inodes"] >= len(before)

    give_up = time.monotonic() + 20
    while True:
        with open("/proc/sys/vm/drop_caches", "w") as drop:  # dentries and inodes: the kernel forgets
            drop.write("2")
        [status] = mount.control({"op": "status"})
        if status["tree"]["nodes"] < len(before) // 2 or time.monotonic() > give_up:
            break
        time.sleep(0.2)
    assert status["tree"]["nodes"] < len(before) // 2, status["tree"]
    assert status["tree"]["kernel_inodes"] < len(before) // 2, status["tree"]

    after = {name: os.stat(os.path.join(level1, name)).st_ino for name in os.listdir(level1)}
    assert after == before
    name = sorted(before)[0]
    uri = os.getxattr(os.path.join(level1, name), "user.mastfs.uri").decode()
    with open(os.path.join(level1, name), "rb") as handle:
        assert hashlib.sha256(handle.read()).hexdigest() == clean_twin.catalog.sha256(uri)


@pytest.mark.mount
def test_target_accepts_masts_own_target_name_spelling(mount, twin):
    """`user.mast_target_name` says NGC-3132; SANTA (like the twin) only knows "NGC 3132"."""
    observation = mount.join("program", "2733", OBS)
    spelled = os.getxattr(observation, "user.mast_target_name").decode()
    assert spelled == "NGC-3132"
    assert twin.catalog.resolve_name(spelled) == [] and twin.catalog.resolve_name("NGC 3132")
    assert OBS in os.listdir(mount.join("target", spelled))
    assert errno_of(os.listdir, mount.join("target", "NO-SUCH-OBJECT-12345")) == errno.ENOENT
