"""The mount table and the kernel's side of a mount: which mastfs mounts exist, checking or creating a
mount point, ``fusermount3`` (unmounting, busy and dead mounts), and the mount's kernel knobs (bdi
read-ahead, the FUSE background limit). Reads /proc, never stats a mount (a FUSE server, ours included,
may be the one that would answer)."""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys
import time

from .errors import MastfsError

log = logging.getLogger(__name__)

MOUNT_FSTYPE = "fuse.mastfs"
UMOUNT_BUSY_WAIT = 2.0
"""Seconds ``umount`` retries a busy unmount before detaching lazily."""
READ_AHEAD_KB = 256
"""The mount's bdi read-ahead: the kernel sends reads of up to 256 KiB (its default, 128 KiB, is slower per
byte). Not more: the kernel's readahead window starts at 16 KiB and grows 4x at once when it is under a
sixteenth of this, so with 512 KiB or more the third 4 KiB read of a file (astropy reading a FITS header)
already asks for bytes up to 80 KiB, past the 64 KiB a header read may cost on the wire; with 256 KiB it
stops at 48 KiB (measured: docs/benchmarks.md)."""
FUSECTL = "/sys/fs/fuse/connections"
MAX_BACKGROUND = 64
"""FUSE requests the kernel lets wait on the daemon at once in the background (page-cache reads and
readahead are background requests). The kernel's default, 12, queues the 13th concurrent read in the
kernel until another ends, so it could take two deadlines; the daemon bounds the waits itself."""


# ------------------------------------------------------------------------------------------ mount table


def mount_entry(mountpoint: str) -> tuple[str, str] | None:
    """``(major:minor, fstype)`` of the mount at ``mountpoint`` from /proc/self/mountinfo (no stat, so it
    never waits on a FUSE server, ours included), or None when nothing is mounted there."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return None
    found = None
    for line in lines:
        fields = line.split()
        if len(fields) < 10:
            continue
        point = fields[4].encode().decode("unicode_escape")
        if point == mountpoint:
            separator = fields.index("-")
            found = (fields[2], fields[separator + 1])  # the last one is on top
    return found


def mastfs_mounts() -> list[str]:
    """Mountpoints of every mastfs mount on this machine (from /proc/self/mounts; no stat of the mounts)."""
    mounts = []
    with open("/proc/self/mounts") as table:
        for line in table:
            fields = line.split()
            if len(fields) >= 3 and fields[2] == MOUNT_FSTYPE:
                mounts.append(fields[1].replace("\\040", " "))
    return mounts


def mount_of(path: str) -> tuple[str, str]:
    """``(mountpoint, inner_path)`` of the mastfs mount holding ``path``; raises MastfsError if none does."""
    full = os.path.abspath(path)
    for mountpoint in sorted(mastfs_mounts(), key=len, reverse=True):
        if full == mountpoint or full.startswith(mountpoint.rstrip("/") + "/"):
            return mountpoint, "/" + full[len(mountpoint):].strip("/")
    raise MastfsError(f"{path} is not inside a mastfs mount (mounted: {', '.join(mastfs_mounts()) or 'none'})")


# ------------------------------------------------------------------------------- mounting, unmounting


def fusermount(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``fusermount3 ARGS`` (never raises for its exit status; its stderr is in the result)."""
    return subprocess.run(["fusermount3", *args], capture_output=True, text=True, check=False)


def prepare_mountpoint(mountpoint: str) -> str | None:
    """Check ``mountpoint`` is an empty directory, creating it (with a note on stderr) when missing and
    unmounting the dead remains of a crashed daemon ("Transport endpoint is not connected") first.
    Returns a message naming what is wrong (a missing parent, a file in the way, ...), or None."""
    if not os.path.lexists(mountpoint):
        parent = os.path.dirname(mountpoint.rstrip("/")) or "/"
        if not os.path.exists(parent):
            return f"cannot create the mount point {mountpoint}: its parent directory {parent} does not exist"
        if not os.path.isdir(parent):
            return f"cannot create the mount point {mountpoint}: {parent} is a file, not a directory"
        try:
            os.mkdir(mountpoint)
        except OSError as exc:
            return f"cannot create the mount point {mountpoint}: {exc.strerror}"
        print(f"mastfs: created the mount point {mountpoint}", file=sys.stderr)
        return None
    if mount_entry(mountpoint) is not None:
        try:
            os.statvfs(mountpoint)  # always answered by the filesystem's server (no kernel cache)
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:
                return f"cannot use {mountpoint}: {exc.strerror}"
            log.warning("%s is the dead mount of a crashed daemon (Transport endpoint is not connected): "
                        "unmounting it", mountpoint)
            result = fusermount("-u", "-z", mountpoint)
            if result.returncode != 0:
                return f"{mountpoint} is a dead mount and fusermount3 -uz failed: {result.stderr.strip()}"
        else:
            return f"{mountpoint} is already a mount point (mastfs umount {mountpoint} first?)"
    if not os.path.isdir(mountpoint):
        return f"{mountpoint} is a file, not a directory: mount on an empty directory"
    if os.listdir(mountpoint):
        return f"{mountpoint} is not empty; mount on an empty directory so no files are hidden"
    return None


def umount_command(mountpoint: str) -> int:
    """``mastfs umount``: unmount (retrying a busy mount for UMOUNT_BUSY_WAIT, then detaching it lazily
    so reads in flight finish). Returns 0 when unmounted, 1 with a message otherwise."""
    mountpoint = os.path.abspath(mountpoint)
    if mount_entry(mountpoint) is None:
        print(f"mastfs: {mountpoint} is not mounted", file=sys.stderr)
        return 1
    deadline = time.monotonic() + UMOUNT_BUSY_WAIT
    while True:
        result = fusermount("-u", mountpoint)
        if result.returncode == 0:
            return 0
        if "busy" not in result.stderr.lower() or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if "busy" in result.stderr.lower():
        lazy = fusermount("-u", "-z", mountpoint)
        if lazy.returncode == 0:
            print(f"mastfs: {mountpoint} was busy; detached it (open files keep working until closed)",
                  file=sys.stderr)
            return 0
        result = lazy
    print(f"mastfs: cannot unmount {mountpoint}: {result.stderr.strip()}", file=sys.stderr)
    return 1


# ------------------------------------------------------------------------------------- kernel knobs


def raise_read_ahead(mountpoint: str, kilobytes: int = READ_AHEAD_KB) -> bool:
    """Set the mount's bdi ``read_ahead_kb`` (root only; best effort). Returns whether it was set."""
    entry = mount_entry(mountpoint)
    if entry is None:
        return False
    path = f"/sys/class/bdi/{entry[0]}/read_ahead_kb"
    try:
        with open(path, "w", encoding="ascii") as handle:
            handle.write(str(kilobytes))
    except OSError as exc:
        log.debug("cannot set %s (%s); the kernel keeps 128 KiB reads", path, exc.strerror)
        return False
    log.debug("read_ahead_kb of %s set to %d", mountpoint, kilobytes)
    return True


def raise_max_background(mountpoint: str, value: int = MAX_BACKGROUND) -> bool:
    """Let ``value`` background requests of the mount reach the daemon at once (and start congestion at
    three quarters of it), through the fusectl filesystem at :data:`FUSECTL` (root only, and only where it
    is mounted, as systemd does at boot; best effort). Returns whether it was set."""
    entry = mount_entry(mountpoint)
    if entry is None or entry[0].split(":")[0] != "0":
        return False
    directory = os.path.join(FUSECTL, entry[0].split(":")[1])
    try:
        for name, number in (("max_background", value), ("congestion_threshold", value * 3 // 4)):
            with open(os.path.join(directory, name), "w", encoding="ascii") as handle:
                handle.write(str(number))
    except OSError as exc:
        log.debug("cannot raise the FUSE background limit in %s (%s); the kernel lets 12 reads wait at once",
                  directory, exc.strerror)
        return False
    log.debug("FUSE background limit of %s raised to %d", mountpoint, value)
    return True
