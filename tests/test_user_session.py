"""mastfs used as a person would, against the twin at scale 0.01 (files of 40 KB to 25 MB):

- a shell session driven in tmux: settings in a config.toml, ``mastfs mount``, ``ls``, ``mastfs prefetch``
  with its progress bar read off the screen (``tmux capture-pane``), ``mastfs status``, ``mastfs umount``;
- the tools astronomers and shells use on a mount: astropy (``memmap=True``, lazy HDUs), ``fitsinfo``,
  ``fitsheader``, ``find``, ``du -sh``, ``cp``, ``rsync -a``, ``getfattr -d``; each checked for what it shows
  and for what it cost on the wire (the twin's counters).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest
from mountutil import _is_mounted, mounted

from mastfs.blockcache import BLOCK_SIZE, HEADER_BLOCK_SIZE
from mastfs.twin import catalog as twin_catalog

pytestmark = pytest.mark.mount

PROGRAM = twin_catalog.PROGRAM_2733
NIRCAM_OBS = "jw02733-o001_t001_nircam_clear-f356w"
MIRI_OBS = twin_catalog.OBS_2733_MIRI_F1130W
NIRCAM_I2D_URI = twin_catalog.BENCH_2GIB_URI  # 25 MB at scale 0.01: SCI, ERR, ... HDUs of 3.5 MB each
MIRI_I2D_URI = twin_catalog.BENCH_1GIB_URI
FIRST_BLOCK = HEADER_BLOCK_SIZE
HEADER_READ_COST = HEADER_BLOCK_SIZE + BLOCK_SIZE
"""Most a header read may fetch: the 64 KiB first block, plus the next block when the kernel's readahead
(after a second small sequential read it asks for [16 KiB, 80 KiB)) reaches past the first one."""
WAIT = 30.0
VENV_BIN = str(Path(sys.executable).parent)


@pytest.fixture(scope="module")
def big_twin():
    """A twin of its own at scale 0.01, so a FITS file has HDUs in different cache blocks."""
    from mastfs.twin.server import Twin

    with Twin.start(scale=0.01) as handle:
        yield handle


def wire_bytes(twin) -> int:
    """Bytes the twin sent for file contents (HTTPS downloads and S3) since its last reset."""
    endpoints = twin.stats()["endpoints"]
    return sum(endpoints.get(key, {}).get("bytes_sent", 0) for key in ("download", "s3"))


def uri_of(path: str) -> str:
    return os.getxattr(path, "user.mastfs.uri").decode()


def sha256_of(path: str | Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


# ---------------------------------------------------------------------------------- tmux session


class Terminal:
    """A bash in a detached tmux session on a private tmux server (killed by :meth:`close`)."""

    def __init__(self, env: dict[str, str], cwd: str) -> None:
        self.server = f"mastfs-test-{uuid.uuid4().hex[:8]}"
        self.env = env
        self.commands = 0
        self.tmux("new-session", "-d", "-s", "user", "-x", "200", "-y", "50", "-c", cwd,
                  "bash --norc --noprofile")
        self.tmux("set-option", "-g", "history-limit", "5000")
        self.run("PS1='$ '")

    def tmux(self, *args: str) -> str:
        result = subprocess.run(["tmux", "-L", self.server, *args], capture_output=True, text=True,
                                env=self.env, timeout=WAIT, check=True)
        return result.stdout

    def screen(self) -> str:
        """Everything the terminal showed so far (scrollback included, wrapped lines joined)."""
        return self.tmux("capture-pane", "-p", "-J", "-S", "-", "-t", "user")

    def type(self, command: str) -> int:
        """Type ``command`` and Enter; returns the number whose exit status :meth:`wait` looks for."""
        self.commands += 1
        self.tmux("send-keys", "-t", "user", "-l", f'{command}; echo "@@{self.commands}:$?"')
        self.tmux("send-keys", "-t", "user", "Enter")
        return self.commands

    def wait(self, number: int, timeout: float = 60.0) -> int:
        """The exit status of typed command ``number``, once it has finished."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(rf"^@@{number}:(\d+)$", self.screen(), re.MULTILINE)
            if match:
                return int(match.group(1))
            time.sleep(0.1)
        pytest.fail(f"command {number} did not finish; the screen:\n{self.screen()}")

    def run(self, command: str, timeout: float = 60.0) -> int:
        return self.wait(self.type(command), timeout)

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.server, "kill-server"], capture_output=True, env=self.env, check=False)


def test_shell_session_in_tmux(big_twin, tmp_path):
    home = tmp_path / "home"
    (home / ".config" / "mastfs").mkdir(parents=True)
    config = home / ".config" / "mastfs" / "config.toml"
    config.write_text(
        f'mast_url = "{big_twin.mast_url}"\nresolver_url = "{big_twin.resolver_url}"\n'
        f's3_endpoint = "{big_twin.s3_endpoint}"\ncache_size = "2G"\ntransfers = 2\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MASTFS_", "TMUX")) and k != "MAST_API_TOKEN"}
    env.update(HOME=str(home), PATH=f"{VENV_BIN}:{env.get('PATH', '/usr/bin:/bin')}", TERM="xterm-256color",
               XDG_CACHE_HOME=str(home / ".cache"), XDG_CONFIG_HOME=str(home / ".config"))
    mountpoint = home / "mast"
    mountpoint.mkdir()
    terminal = Terminal(env, str(home))
    try:
        assert terminal.run("mastfs mount ~/mast") == 0
        assert f"mastfs: mounted at {mountpoint} (log: {home}/.cache/mastfs/mastfs.log)" in terminal.screen()

        assert terminal.run("ls ~/mast/program/2733") == 0
        assert NIRCAM_OBS in terminal.screen() and MIRI_OBS in terminal.screen()

        big_twin.faults.add("s3", "latency", seconds=0.1)  # slow enough to watch the bar move
        prefetch = terminal.type(f"mastfs prefetch ~/mast/program/2733/{NIRCAM_OBS} --level 2 --type SCIENCE --jobs 2")
        moving = wait_for_screen(terminal, r"\[=*>? *\] +(\d+\.\d)%  \d+/32 files  .* ETA \d:\d\d:\d\d",
                                 lambda match: float(match.group(1)) < 100.0)
        assert terminal.wait(prefetch) == 0
        big_twin.faults.clear()
        screen = terminal.screen()
        assert re.search(r"\[={24}\] 100\.0%  32/32 files  [\d.]+ MiB / [\d.]+ MiB  .*/s  ETA 0:00:00", screen), screen
        assert re.search(r"prefetch: 32 files, [\d.]+ MiB: 32 done, 0 skipped, 0 failed; [\d.]+ MiB fetched", screen)
        assert len(re.findall(rf"^done .*/{NIRCAM_OBS}/level2/\S+\.fits$", screen, re.MULTILINE)) == 32
        assert moving  # the bar was seen part way, with its rate and ETA

        assert terminal.run("mastfs status ~/mast") == 0
        screen = terminal.screen()
        assert re.search(r"cache +[\d.]+ MiB of 2\.0 GiB", screen)
        assert re.search(r"fetched .*MiB from s3", screen) and "transfers 0 in flight" in screen
        assert re.search(r"s3 +mast:JWST/product/jw02733001001_\S+\.fits", screen)

        assert terminal.run("mastfs umount ~/mast") == 0
        assert terminal.run(f"grep -c ' {mountpoint} ' /proc/mounts") == 1  # grep found nothing
        assert not _is_mounted(str(mountpoint))
        wait_until(lambda: not daemons_of(str(mountpoint)), "the daemon to exit")
    finally:
        big_twin.faults.clear()
        terminal.close()
        if _is_mounted(str(mountpoint)):
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)


def daemons_of(mountpoint: str) -> list[psutil.Process]:
    return [process for process in psutil.process_iter(["cmdline"])
            if "mastfs.daemon" in (process.info["cmdline"] or []) and mountpoint in process.info["cmdline"]]


def wait_until(condition, what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def wait_for_screen(terminal: Terminal, pattern: str, accept, timeout: float = WAIT) -> str:
    """The first line of the screen matching ``pattern`` for which ``accept(match)`` holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for match in re.finditer(pattern, terminal.screen()):
            if accept(match):
                return match.group(0)
        time.sleep(0.05)
    pytest.fail(f"never saw {pattern!r}; the screen:\n{terminal.screen()}")


# ------------------------------------------------------------------------------------- user tools


@pytest.fixture(scope="module")
def mount(big_twin, tmp_path_factory):
    with mounted(big_twin, tmp_path_factory.mktemp("tools")) as live:
        yield live


@pytest.fixture
def twin(big_twin):
    """The scale-0.01 twin with zeroed counters."""
    big_twin.reset_stats()
    return big_twin


def test_astropy_memmap_loads_only_the_hdus_touched(mount, twin):
    from astropy.io import fits

    path = mount.join("obs", NIRCAM_OBS, "level3", NIRCAM_I2D_URI.rsplit("/", 1)[1])
    size = os.stat(path).st_size
    twin.reset_stats()
    with fits.open(path, memmap=True) as hdul:
        assert hdul[0].header["TARGNAME"] == "NGC 3132"
        assert wire_bytes(twin) <= HEADER_READ_COST
        science = hdul["SCI"]
        rows, columns = science.header["NAXIS2"], science.header["NAXIS1"]
        row = science.data[rows // 2].copy()  # one row in the middle of the image, through the memmap
        touched = wire_bytes(twin)
        assert touched <= HEADER_READ_COST + BLOCK_SIZE and touched < size / 2, \
            f"{touched} of {size} bytes fetched for two headers and one row"
        assert row.shape == (columns,)
        offset = science.fileinfo()["datLoc"] + (rows // 2) * columns * 4
        expected = twin.catalog.read(NIRCAM_I2D_URI, offset, columns * 4)
        assert row.astype(">f4").tobytes() == expected
        assert len(hdul) == 9 and hdul[-1].name == "ASDF"  # now every header is read
    assert wire_bytes(twin) <= size


def test_fitsheader_reads_one_header_and_fitsinfo_lists_the_hdus(mount, twin):
    path = mount.join("program", PROGRAM, MIRI_OBS, "level3", MIRI_I2D_URI.rsplit("/", 1)[1])
    size = os.stat(path).st_size
    header = subprocess.run([f"{VENV_BIN}/fitsheader", "-e", "0", "-k", "TARGNAME", "-k", "INSTRUME", path],
                            capture_output=True, text=True, timeout=WAIT)
    assert header.returncode == 0, header.stderr
    assert re.search(r"TARGNAME= 'NGC 3132'", header.stdout) and "'MIRI    '" in header.stdout
    assert wire_bytes(twin) <= HEADER_READ_COST < size / 2

    info = subprocess.run([f"{VENV_BIN}/fitsinfo", path], capture_output=True, text=True, timeout=WAIT)
    assert info.returncode == 0, info.stderr
    for name in ("PRIMARY", "SCI", "ERR", "CON", "WHT", "VAR_POISSON", "ASDF"):
        assert re.search(rf"^\s+\d+\s+{name}\s", info.stdout, re.MULTILINE), info.stdout


def test_find_and_du_list_without_reading_files(mount, twin):
    program = mount.join("program", PROGRAM)
    observations = subprocess.run(["find", program, "-mindepth", "1", "-maxdepth", "1", "-type", "d"],
                                  capture_output=True, text=True, timeout=WAIT, check=True).stdout.split()
    assert len(observations) == 10 and os.path.join(program, MIRI_OBS) in observations
    mosaics = subprocess.run(["find", os.path.join(program, NIRCAM_OBS), "-name", "*_i2d.fits"],
                             capture_output=True, text=True, timeout=WAIT, check=True).stdout.split()
    name = NIRCAM_I2D_URI.rsplit("/", 1)[1]  # a Minimum Recommended Product: in level3/ and recommended/
    assert sorted(mosaics) == [os.path.join(program, NIRCAM_OBS, "level3", name),
                               os.path.join(program, NIRCAM_OBS, "recommended", name)]

    level1 = os.path.join(program, NIRCAM_OBS, "level1")
    sizes = sum(os.stat(os.path.join(level1, name)).st_size for name in os.listdir(level1))
    human = subprocess.run(["du", "-sh", level1], capture_output=True, text=True, timeout=WAIT, check=True).stdout
    assert re.fullmatch(rf"[\d.]+M\t{re.escape(level1)}\n", human), human
    apparent = subprocess.run(["du", "-s", "-B1", "--apparent-size", level1], capture_output=True, text=True,
                              timeout=WAIT, check=True).stdout
    assert int(apparent.split()[0]) == sizes + os.stat(level1).st_size  # the files plus the directory
    assert wire_bytes(twin) == 0


def test_cp_and_rsync_copy_exact_bytes(mount, twin, tmp_path):
    level1 = mount.join("program", PROGRAM, NIRCAM_OBS, "level1")
    names = sorted(os.listdir(level1))
    first = os.path.join(level1, names[0])
    subprocess.run(["cp", first, str(tmp_path / "copy.fits")], check=True, timeout=WAIT)
    assert sha256_of(tmp_path / "copy.fits") == twin.catalog.sha256(uri_of(first))

    result = subprocess.run(["rsync", "-a", level1, str(tmp_path / "backup")], capture_output=True, text=True,
                            timeout=WAIT)
    assert result.returncode == 0, result.stderr
    copied = tmp_path / "backup" / "level1"
    assert sorted(os.listdir(copied)) == names
    for name in names:
        source = os.path.join(level1, name)
        assert sha256_of(copied / name) == twin.catalog.sha256(uri_of(source))
        assert os.stat(copied / name).st_mtime == os.stat(source).st_mtime  # -a kept the times
    assert wire_bytes(twin) <= sum(os.stat(os.path.join(level1, name)).st_size for name in names)
    shutil.rmtree(tmp_path / "backup")


def test_getfattr_dumps_mast_fields(mount):
    obs_dir = mount.join("program", PROGRAM, MIRI_OBS)
    observation = subprocess.run(["getfattr", "-d", obs_dir], capture_output=True, text=True, timeout=WAIT,
                                 check=True).stdout
    assert f'user.mast_obs_id="{MIRI_OBS}"' in observation
    assert 'user.mast_proposal_id="2733"' in observation and "user.mast_target_name=" in observation
    path = os.path.join(obs_dir, "level3", MIRI_I2D_URI.rsplit("/", 1)[1])
    product = subprocess.run(["getfattr", "-d", path], capture_output=True, text=True, timeout=WAIT,
                             check=True).stdout
    assert f'user.mast_dataURI="{MIRI_I2D_URI}"' in product and f'user.mastfs.uri="{MIRI_I2D_URI}"' in product
    assert re.search(r'user\.mastfs\.cached_bytes="\d+"', product)

