"""The first hour of a new user, run as they would run it: `./run mount|demo DIR` make DIR (or name the
real problem), `./run` waits for apt's lock, `./run install` puts mastfs on PATH, the demo refuses a bad
mount point before starting its twin, no process depends on the current directory, an unreachable MAST
is one clear WARNING and counted errors, help shows readable defaults once, and variables follow the
flags' names."""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from mountutil import mounted

from mastfs.config import OPTIONS, load_settings

REPO = Path(__file__).resolve().parent.parent
MASTFS = os.path.join(os.path.dirname(sys.executable), "mastfs")
WAIT = 60


def user_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MASTFS_") and k != "MAST_API_TOKEN"}
    env["MASTFS_CONFIG"] = "/nonexistent/mastfs-test-config.toml"
    env.update(extra)
    return env


def twin_flags(twin, cache_dir: Path) -> list[str]:
    return ["--mast-url", twin.mast_url, "--resolver-url", twin.resolver_url, "--s3-endpoint", twin.s3_endpoint,
            "--cache-dir", str(cache_dir)]


def is_mounted(path: Path) -> bool:
    with open("/proc/self/mountinfo", encoding="utf-8") as handle:
        return any(line.split()[4] == str(path) for line in handle)


def umount(path: Path) -> None:
    subprocess.run([MASTFS, "umount", str(path)], capture_output=True, env=user_env(), timeout=WAIT, check=False)
    deadline = time.monotonic() + 10
    while is_mounted(path) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not is_mounted(path)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ---------------------------------------------------------------------------------- mount points


@pytest.mark.mount
def test_run_mount_creates_a_missing_mount_point(twin, tmp_path):
    target = tmp_path / "mast"
    result = subprocess.run([str(REPO / "run"), "mount", str(target), *twin_flags(twin, tmp_path / "cache")],
                            capture_output=True, text=True, env=user_env(), timeout=300)
    try:
        assert result.returncode == 0, result.stderr
        assert f"created the mount point {target}" in result.stderr
        assert "jw02733-o002_t001_miri_f1130w" in os.listdir(target / "program" / "2733")
    finally:
        umount(target)


@pytest.mark.parametrize("problem", ["missing parent", "file in the way", "parent is a file"])
def test_mount_and_demo_name_the_real_problem_with_the_mount_point(tmp_path, problem):
    (tmp_path / "plain-file").write_text("not a directory")
    target, expected = {
        "missing parent": (tmp_path / "nowhere" / "mast", f"its parent directory {tmp_path / 'nowhere'} does not exist"),
        "file in the way": (tmp_path / "plain-file", "is a file, not a directory"),
        "parent is a file": (tmp_path / "plain-file" / "mast", f"{tmp_path / 'plain-file'} is a file, not a directory"),
    }[problem]
    for verb in ("mount", "demo"):
        result = subprocess.run([MASTFS, verb, str(target), "--mast-url", "http://127.0.0.1:9"], capture_output=True,
                                text=True, env=user_env(), timeout=WAIT) if verb == "mount" else \
            subprocess.run([MASTFS, verb, str(target)], capture_output=True, text=True, env=user_env(), timeout=WAIT)
        assert result.returncode == 1, (verb, result.stderr)
        assert expected in result.stderr, (verb, result.stderr)
        assert "twin:" not in result.stderr and "mounting at" not in result.stderr  # the demo started nothing


@pytest.mark.mount
def test_demo_checks_the_mount_point_before_starting_its_twin(twin, tmp_path):
    with mounted(twin, tmp_path) as live:
        started = time.monotonic()
        result = subprocess.run([MASTFS, "demo", live.path], capture_output=True, text=True, env=user_env(),
                                timeout=WAIT)
        assert result.returncode == 1
        assert "already a mount point" in result.stderr
        assert "twin:" not in result.stderr and "mounting at" not in result.stderr
        assert time.monotonic() - started < WAIT


# --------------------------------------------------------------------------- the current directory


@pytest.mark.mount
def test_no_mastfs_process_depends_on_the_current_directory(twin, tmp_path):
    """A clone of the repository is a directory holding `mastfs/`: run from there, nothing may import it."""
    clone = tmp_path / "clone"
    (clone / "mastfs").mkdir(parents=True)
    (clone / "mastfs" / "__init__.py").write_text("raise ImportError('the clone shadowed the installed mastfs')\n")
    (clone / "mastfs" / "__main__.py").write_text("raise SystemExit('the clone ran')\n")
    target = tmp_path / "mast"
    result = subprocess.run([MASTFS, "mount", str(target), *twin_flags(twin, tmp_path / "cache")], cwd=clone,
                            capture_output=True, text=True, env=user_env(), timeout=WAIT)
    try:
        assert result.returncode == 0, result.stderr
        assert os.listdir(target / "program" / "2733")
    finally:
        umount(target)
    demo_point = tmp_path / "demo"
    demo = subprocess.Popen([MASTFS, "demo", str(demo_point)], cwd=clone, env=user_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + WAIT
        while not is_mounted(demo_point):
            assert demo.poll() is None and time.monotonic() < deadline, demo.communicate()[1]
            time.sleep(0.1)
        assert "jw02733-o002_t001_miri_f1130w" in os.listdir(demo_point / "program" / "2733")
    finally:
        demo.send_signal(signal.SIGINT)
        _, stderr = demo.communicate(timeout=WAIT)
    assert demo.returncode in (0, 130), stderr
    assert "ImportError" not in stderr and "clone" not in stderr
    assert not is_mounted(demo_point)


# ------------------------------------------------------------------------------ truthful messages


@pytest.mark.mount
def test_unreachable_mast_is_one_warning_and_counted_errors_with_the_last_one(tmp_path):
    target = tmp_path / "mast"
    down = f"http://127.0.0.1:{free_port()}"
    cache = tmp_path / "cache"
    result = subprocess.run([MASTFS, "mount", str(target), "--mast-url", down, "--resolver-url", down,
                             "--cache-dir", str(cache), "--deadline", "2s", "--retries", "2"],
                            capture_output=True, text=True, env=user_env(), timeout=WAIT)
    try:
        assert result.returncode == 0, result.stderr  # the mount itself does not wait for MAST
        assert result.stderr.count("WARNING") == 1 and f"MAST cannot be reached at {down}" in result.stderr
        log = (cache / "mastfs.log").read_text()
        assert len(re.findall(r"WARNING .*MAST cannot be reached", log)) == 1
        with pytest.raises(OSError) as failure:
            os.listdir(target / "program" / "2733")
        assert failure.value.errno == errno.EIO
        status = subprocess.run([MASTFS, "status", str(target)], capture_output=True, text=True, env=user_env(),
                                timeout=WAIT, check=True).stdout
        errors_line = next(line for line in status.splitlines() if line.strip().startswith("errors"))
        assert "none" not in errors_line and re.search(r"\d+ failed MAST API calls?", errors_line), status
        assert re.search(r"last error \d{4}-\d\d-\d\d \d\d:\d\d:\d\d \S*: .*ConnectError", status), status
    finally:
        umount(target)


def test_help_shows_readable_defaults_each_once():
    text = subprocess.run([MASTFS, "mount", "--help"], capture_output=True, text=True, env=user_env(
        COLUMNS="200"), check=True).stdout
    assert "(default: 20 GiB)" in text and "(default: 1 GiB)" in text
    assert "(default: 1h)" in text and "(default: 7d)" in text and "(default: 30s)" in text
    assert "21474836480" not in text and "3600.0" not in text
    for line in text.splitlines():
        assert line.count("(default:") <= 1, line
    for option in OPTIONS:
        assert f"[env {option.env}]" in text


def test_every_variable_is_mastfs_and_the_flag_name_and_the_old_collections_still_works(caplog):
    for option in OPTIONS:
        assert option.env == "MASTFS_" + option.cli_flag[2:].replace("-", "_").upper()
    nowhere = Path("/nonexistent/mastfs.toml")
    assert load_settings(env={"MASTFS_COLLECTION": "HST"}, path=nowhere).collections == ["HST"]
    with caplog.at_level(logging.WARNING, logger="mastfs.config"):
        assert load_settings(env={"MASTFS_COLLECTIONS": "JWST,HST"}, path=nowhere).collections == ["JWST", "HST"]
    assert "MASTFS_COLLECTIONS is deprecated: use MASTFS_COLLECTION" in caplog.text
    both = {"MASTFS_COLLECTION": "HST", "MASTFS_COLLECTIONS": "JWST"}
    assert load_settings(env=both, path=nowhere).collections == ["HST"]


@pytest.mark.mount
def test_setting_an_xattr_is_erofs_as_the_docs_say(twin, tmp_path):
    assert "setting or removing any attribute is EROFS" in (REPO / "docs" / "namespace.md").read_text()
    with mounted(twin, tmp_path) as live:
        observation = live.join("program", "2733", "jw02733-o002_t001_miri_f1130w")
        for call in (lambda: os.setxattr(observation, "user.note", b"x"),
                     lambda: os.removexattr(observation, "user.mast_obs_id")):
            with pytest.raises(OSError) as failure:
                call()
            assert failure.value.errno == errno.EROFS


# ---------------------------------------------------------------------------------------- ./run


def test_run_install_puts_mastfs_on_path_as_the_readme_says(tmp_path):
    readme = (REPO / "README.md").read_text()
    assert "/usr/local/bin" in readme and "~/.local/bin" in readme
    assert os.getuid() == 0  # the suite runs as root, as ./run test does on a fresh machine
    result = subprocess.run([str(REPO / "run"), "install"], capture_output=True, text=True, env=user_env(),
                            timeout=600)
    assert result.returncode == 0, result.stderr
    assert os.path.realpath("/usr/local/bin/mastfs") == os.path.realpath(REPO / ".venv" / "bin" / "mastfs")
    shown = subprocess.run(["mastfs", "--version"], capture_output=True, text=True, check=True,
                           env=user_env(PATH="/usr/local/bin:/usr/bin:/bin")).stdout
    assert shown.startswith("mastfs ")
    # An ordinary user: ~/.local/bin is created and linked, with a note when it is not on PATH.
    home = Path(tempfile.mkdtemp(prefix="mastfs-home-", dir="/tmp"))  # reachable by nobody, unlike tmp_path
    try:
        os.chown(home, 65534, 65534)
        ordinary = subprocess.run(["runuser", "-u", "nobody", "--", "env", f"HOME={home}", "PATH=/usr/bin:/bin",
                                   str(REPO / "run"), "install"], capture_output=True, text=True, timeout=600)
        assert ordinary.returncode == 0, ordinary.stderr
        link = home / ".local" / "bin" / "mastfs"
        assert os.path.realpath(link) == os.path.realpath(REPO / ".venv" / "bin" / "mastfs")
        assert f"{home}/.local/bin is not on your PATH" in ordinary.stderr
    finally:
        shutil.rmtree(home)


def test_run_waits_for_a_held_apt_lock(tmp_path):
    """Another apt holds the package lock: ./run says so and waits instead of failing."""
    shims = tmp_path / "bin"
    shims.mkdir()
    (shims / "dpkg-query").write_text(  # pretend `attr` is missing, so ./run has apt work to do
        '#!/bin/sh\nfor last; do :; done\n[ "$last" = attr ] && exit 1\nexec /usr/bin/dpkg-query "$@"\n')
    (shims / "dpkg-query").chmod(0o755)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time\n"
        "held = [open(p, 'a') for p in ('/var/lib/dpkg/lock-frontend', '/var/lib/apt/lists/lock')]\n"
        "for f in held: fcntl.lockf(f, fcntl.LOCK_EX)\n"
        "print('held', flush=True); time.sleep(8)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        result = subprocess.run([str(REPO / "run"), "install"], capture_output=True, text=True, timeout=600,
                                env=user_env(PATH=f"{shims}:{os.environ['PATH']}"))
        waited = time.monotonic() - started
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 0, result.stderr
    assert "another apt/dpkg is running" in result.stderr and "waiting" in result.stderr
    assert "Could not get lock" not in result.stderr
    assert waited > 4  # it waited for the holder rather than failing at once


# ------------------------------------------------------------------------------ the README's session


def readme_session() -> tuple[list[str], list[tuple[str, list[str]]]]:
    """The README's example session: the demo's first lines, then (command, output lines) pairs."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Example session"):]
    demo_block = section.split("```\n", 2)[1]
    demo_lines = demo_block.splitlines()[1:]  # after "$ ./run demo /tmp/mast-demo"
    console = section[section.index("```console\n") + len("```console\n"):]
    console = console[:console.index("```")]
    steps: list[tuple[str, list[str]]] = []
    for line in console.splitlines():
        if line.startswith("$ "):
            steps.append((line[2:], []))
        else:
            steps[-1][1].append(line)
    return demo_lines, steps


def in_terminal(command: str, cwd: str, env: dict[str, str]) -> list[str]:
    """What a terminal 110 columns wide shows for ``command``: its stdout on a pty, then the last state of
    what it drew on stderr (a progress bar redraws itself in place) first, as the eye sees it."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 110, 0, 0))
    process = subprocess.Popen(["bash", "-c", command], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                               stdout=slave, stderr=subprocess.PIPE)
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    drawn = process.stderr.read().decode()
    process.wait(timeout=WAIT)
    stdout = b"".join(chunks).decode().replace("\r\n", "\n").splitlines()
    bar = [part for part in re.split(r"[\r\n]", drawn) if part.strip()][-1:] if "[" in drawn else []
    return bar + stdout


def normalised(line: str) -> str:
    line = re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:PORT", line.rstrip())
    line = re.sub(r"mastfs-demo-cache-\w+", "mastfs-demo-cache-X", line)
    return re.sub(r"^(-r[-rwx]{8} \d+ )\S+ \S+", r"\1you you", line)


@pytest.mark.mount
def test_readme_example_session_is_what_a_user_sees(tmp_path):
    demo_lines, steps = readme_session()
    target = tmp_path / "mast-demo"
    env = user_env(HOME=str(tmp_path), PATH=f"{os.path.dirname(MASTFS)}:{os.environ['PATH']}")
    demo = subprocess.Popen([str(REPO / "run"), "demo", str(target)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not is_mounted(target):
            assert demo.poll() is None and time.monotonic() < deadline, demo.communicate()[1]
            time.sleep(0.2)
        cwd = str(tmp_path)
        for command, expected in steps:
            command = command.replace("/tmp/mast-demo", str(target))
            expected = [normalised(line.replace("/tmp/mast-demo", str(target))) for line in expected]
            if command.startswith("cd "):
                cwd = command[3:]
                continue
            if command.startswith("cd; "):
                cwd, command = str(tmp_path), command[4:]
            shown = [normalised(line) for line in in_terminal(command, cwd, env)]
            if "..." in expected:  # the README shows the first lines only
                expected = expected[:expected.index("...")]
                shown = shown[:len(expected)]
            if command.startswith(("mastfs prefetch", "mastfs status")):  # counts and timings vary
                assert [line.split()[0] for line in shown] == [line.split()[0] for line in expected], command
                assert [line for line in shown if "errors" in line] == [line for line in expected if "errors" in line]
            else:
                assert shown == expected, command
    finally:
        if is_mounted(target):
            umount(target)
        _, stderr = demo.communicate(timeout=WAIT)
    shown = [normalised(line) for line in stderr.splitlines() if not line.startswith(("run:", "20"))]
    assert shown[:len(demo_lines)] == [normalised(line.replace("/tmp/mast-demo", str(target))) for line in demo_lines]
