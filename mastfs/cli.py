"""The ``mastfs`` command line: mount, umount, demo, twin serve (and the operational verbs).

Each verb parses its flags into :class:`mastfs.config.Settings` and hands over to the layer that does the
work; this module holds no filesystem logic.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile

from . import __version__
from .config import Settings, add_arguments, load_settings
from .errors import MastfsError

EPILOG = """\
examples:
  mastfs mount ~/mast                      mount MAST (JWST) at ~/mast, in the background
  ls ~/mast/program/2733                   observations of program 2733
  mastfs umount ~/mast
  mastfs prefetch ~/mast/obs/jw02733-o002_t001_miri_f1130w --level 2 --type SCIENCE
  mastfs status ~/mast                     transfers, cache use, counters
  mastfs demo /tmp/mast-demo               try it offline, against the bundled MAST twin
  mastfs twin serve --port 0               run the MAST twin alone (prints its URLs as one JSON line)
"""


CACHE_OPTIONS = ("cache_dir", "cache_size", "min_free_space")
"""The settings ``mastfs cache`` takes."""
GENERIC_MOUNT_OPTIONS = frozenset({
    "defaults", "auto", "noauto", "user", "nouser", "users", "owner", "group", "_netdev", "nofail", "ro", "rw",
    "exec", "noexec", "suid", "nosuid", "dev", "nodev", "atime", "noatime", "relatime", "strictatime",
    "nodiratime", "sync", "async", "dirsync", "silent", "loud", "lazytime", "nolazytime",
})
"""Options of mount(8) and fstab that mean nothing to mastfs (it is always read-only, nosuid, nodev)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mastfs",
        description="Mount the MAST astronomy archive (JWST, HST, ...) as a read-only filesystem.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"mastfs {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="COMMAND", required=True)

    mount = verbs.add_parser("mount", help="mount MAST at MOUNTPOINT (returns once the mount is live)",
                             description="Mount MAST at MOUNTPOINT. Returns once the mount is live; the "
                             "daemon keeps running in the background unless --foreground is given.")
    mount.add_argument("mountpoint", help="an empty directory")
    mount.add_argument("--foreground", "-f", action="store_true",
                       help="stay in the foreground (for systemd and debugging)")
    mount.add_argument("--debug", action="store_true", help="log everything (same as --log-level DEBUG)")
    mount.add_argument("-o", dest="mount_options", metavar="OPTIONS", action="append", default=[],
                       help="settings as comma-separated NAME=VALUE (or NAME for a yes/no setting), as in an "
                       "fstab line: -o cache_size=50G,collection=JWST:HST,allow_other. Generic mount options "
                       "(noauto, _netdev, nofail, x-systemd.*, ...) are ignored. Flags win over -o.")
    add_arguments(mount)
    mount.set_defaults(run=run_mount)

    umount = verbs.add_parser("umount", help="unmount a mastfs mount",
                              description="Unmount MOUNTPOINT cleanly, even while reads are in flight.")
    umount.add_argument("mountpoint", help="where mastfs is mounted")
    umount.set_defaults(run=run_umount)

    demo = verbs.add_parser("demo", help="start the bundled MAST twin and mount it (no internet needed)",
                            description="Start the MAST twin (an offline emulator of MAST's HTTP API and S3 "
                            "bucket) and mount it at MOUNTPOINT; Ctrl-C unmounts and stops both.")
    demo.add_argument("mountpoint", help="an empty directory")
    demo.add_argument("--scale", type=float, default=0.01,
                      help="file sizes relative to the real archive (default: 0.01)")
    demo.add_argument("--cache-dir", default=None, help="cache directory (default: a temporary one)")
    demo.set_defaults(run=run_demo)

    status = verbs.add_parser("status", help="transfers, cache use, counters and errors of a mount",
                              description="Show what a running mount is doing: transfers in flight with "
                              "progress, cache use against its limit, request and error counters, and the "
                              "source (S3 or HTTPS) of recent products. Without MOUNTPOINT: every mount.")
    status.add_argument("mountpoint", nargs="?", help="a mastfs mount (or a path inside one)")
    status.add_argument("--json", action="store_true", help="print the raw status as JSON")
    status.set_defaults(run=run_status)

    prefetch = verbs.add_parser("prefetch", help="warm the cache for files or whole directories",
                                description="Download every product below PATH into the cache, in "
                                "parallel, with a progress bar; ends with a manifest of what was done, "
                                "skipped and failed (and why). Interrupt it at will: a rerun resumes.")
    prefetch.add_argument("paths", nargs="+", metavar="PATH", help="files or directories inside a mount")
    prefetch.add_argument("--level", type=int, choices=range(0, 5), metavar="N",
                          help="only products of calibration level N (0-4)")
    prefetch.add_argument("--type", dest="product_type", metavar="TYPE",
                          help="only products of this type: SCIENCE, AUXILIARY, INFO, PREVIEW, THUMBNAIL, ...")
    prefetch.add_argument("--jobs", type=int, metavar="N", help="parallel transfers (default: --transfers)")
    prefetch.add_argument("--recommended", action="store_true",
                          help='only MAST\'s "Minimum Recommended Products" (what recommended/ shows; '
                          "astroquery's mrp_only)")
    prefetch.set_defaults(run=run_prefetch)

    refresh = verbs.add_parser("refresh", help="forget cached metadata for a subtree",
                               description="Drop the cached MAST metadata at and below PATH so the next "
                               "listing asks MAST again (file bytes stay cached).")
    refresh.add_argument("path", help="a directory or file inside a mount")
    refresh.set_defaults(run=run_refresh)

    cache = verbs.add_parser("cache", help="inspect, verify or clear the block cache",
                             description="stats: use against the limit; verify: check every block's checksum "
                             "and remove bad ones; clear: remove every cached block. verify and clear need "
                             "the cache not to be in use by a mount (mastfs umount first).")
    cache.add_argument("action", choices=("stats", "clear", "verify"), help="stats, clear or verify")
    add_arguments(cache, only=CACHE_OPTIONS)
    cache.set_defaults(run=run_cache)

    twin = verbs.add_parser("twin", help="the MAST twin (offline emulator of MAST for tests and demos)",
                            description="The MAST twin: an offline emulator of MAST's HTTP API and S3 bucket "
                            "with a generated catalog (program 2733 and more), for tests and demos.")
    twin_verbs = twin.add_subparsers(dest="twin_verb", metavar="COMMAND", required=True)
    serve = twin_verbs.add_parser("serve", help="serve the twin until SIGTERM/SIGINT",
                                  description="Serve MAST's HTTP API and an S3 bucket on loopback; prints ONE "
                                  "JSON line with mast_url, resolver_url, s3_endpoint and bucket when ready.")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=0, help="HTTP port (0: pick a free one)")
    serve.add_argument("--s3-port", type=int, default=0, help="S3 port (0: pick a free one)")
    serve.add_argument("--scale", type=float, default=1.0,
                       help="file sizes relative to the real archive (default: 1.0)")
    serve.add_argument("--first-byte-ms", type=float, default=0.0, metavar="MS",
                       help="latency before the first byte of every answer (default: 0, loopback)")
    serve.add_argument("--stream-mb-s", type=float, default=0.0, metavar="MB_S",
                       help="bandwidth of each product body's connection in MB/s (default: 0, unlimited); "
                       "S3 gives about 90 per connection")
    serve.add_argument("--metadata-ms", type=float, default=None, metavar="MS",
                       help="latency before the first byte of metadata answers (HEAD, LIST, path_lookup, "
                       "invoke, ...; default: --first-byte-ms)")
    serve.add_argument("--max-url-length", type=int, default=None, metavar="N",
                       help="answer 414 Request-URI Too Large to request targets longer than N characters "
                       "(default: 3400, between path_lookup of 40 and of 50 JWST uris; 0: no limit)")
    serve.add_argument("--query-seconds", type=float, default=0.0, metavar="S",
                       help="every Mast.Caom.Products/Filtered query takes S seconds on the server "
                       "(default: 0); see --query-shape")
    serve.add_argument("--query-shape", choices=("executing", "first_byte"), default="executing",
                       help="how a slow query is answered: EXECUTING polls (default) or a held first byte")
    serve.set_defaults(run=run_twin_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args))
    except KeyboardInterrupt:
        return 130
    except MastfsError as exc:
        print(f"mastfs: {exc}", file=sys.stderr)
        return 1


def parse_mount_options(texts: list[str]) -> dict[str, str]:
    """``["cache_size=50G,allow_other,collection=JWST:HST"]`` -> ``{"cache_size": "50G", "allow_other": "yes",
    "collections": "JWST,HST"}`` (values still text: :func:`load_settings` parses them). Generic mount options
    are dropped; ``debug`` means log_level=DEBUG. Raises ValueError on an unknown name or a missing value."""
    from .config import OPTIONS, parse_bool

    by_name = {option.name: option for option in OPTIONS}
    by_name["collection"] = by_name["collections"]
    settings: dict[str, str] = {}
    for text in texts:
        for item in (part.strip() for part in text.split(",")):
            if not item or item in GENERIC_MOUNT_OPTIONS or item.startswith(("x-", "comment=")):
                continue
            key, has_value, value = item.partition("=")
            if key == "debug" and not has_value:
                settings["log_level"] = "DEBUG"
                continue
            option = by_name.get(key.replace("-", "_"))
            if option is None:
                raise ValueError(f"unknown mount option {key!r} (see mastfs mount --help)")
            if option.parse is parse_bool:
                value = value if has_value else "yes"
            elif not has_value:
                raise ValueError(f"mount option {key} needs a value ({key}=...)")
            settings[option.name] = value.replace(":", ",") if option.name == "collections" else value
    return settings


def _settings_from(args: argparse.Namespace) -> Settings:
    flags = vars(args).copy()
    try:
        for name, value in parse_mount_options(flags.pop("mount_options", [])).items():
            if flags.get(name) is None:
                flags[name] = value
    except ValueError as exc:
        raise SystemExit(f"mastfs: {exc}") from exc
    if getattr(args, "debug", False):
        flags["log_level"] = "DEBUG"
    try:
        return load_settings(flags)
    except ValueError as exc:
        raise SystemExit(f"mastfs: {exc}") from exc


FUSE_MISSING = ("mastfs: mounting needs the FUSE library pyfuse3, which is not installed: "
                "pip install 'mastfs[fuse]' (it builds against libfuse3: apt install fuse3 libfuse3-dev). "
                "mast:// URLs in Python need no FUSE.")


def _require_fuse() -> None:
    """Raise SystemExit with how to install pyfuse3 when it is missing (the `fuse` extra)."""
    if importlib.util.find_spec("pyfuse3") is None:
        raise SystemExit(FUSE_MISSING)


def run_mount(args: argparse.Namespace) -> int:
    from .daemon import mount_command

    _require_fuse()

    return mount_command(_settings_from(args), args.mountpoint, foreground=args.foreground)


def run_umount(args: argparse.Namespace) -> int:
    from .mounts import umount_command

    return umount_command(args.mountpoint)


def run_status(args: argparse.Namespace) -> int:
    from .cli_verbs import status_command

    return status_command(args.mountpoint, args.json)


def run_prefetch(args: argparse.Namespace) -> int:
    from .cli_verbs import prefetch_command

    return prefetch_command(args.paths, args.level, args.product_type, args.jobs, recommended=args.recommended)


def run_refresh(args: argparse.Namespace) -> int:
    from .cli_verbs import refresh_command

    return refresh_command(args.path)


def run_cache(args: argparse.Namespace) -> int:
    from .cli_verbs import cache_command

    return cache_command(args.action, _settings_from(args))


def run_twin_serve(args: argparse.Namespace) -> int:
    from .twin.link import Link
    from .twin.server import serve

    logging.basicConfig(level=logging.WARNING)
    try:
        link = Link(args.first_byte_ms, args.stream_mb_s, args.metadata_ms)
    except ValueError as exc:
        print(f"mastfs twin serve: {exc}", file=sys.stderr)
        return 2
    if args.max_url_length is not None and args.max_url_length < 0:
        print("mastfs twin serve: --max-url-length must be >= 0", file=sys.stderr)
        return 2
    limits = {} if args.max_url_length is None else {"max_url_length": args.max_url_length}
    serve(host=args.host, port=args.port, s3_port=args.s3_port, scale=args.scale, link=link,
          query_seconds=args.query_seconds, query_shape=args.query_shape, **limits)
    return 0


def run_demo(args: argparse.Namespace) -> int:
    """Check the mountpoint, start the twin in a child process, mount against it in the foreground,
    clean up both on exit (and the cache, unless ``--cache-dir`` named one)."""
    from .daemon import python_module_command
    from .mounts import prepare_mountpoint

    _require_fuse()
    mountpoint = os.path.abspath(args.mountpoint)
    problem = prepare_mountpoint(mountpoint)
    if problem:
        print(f"mastfs: {problem}", file=sys.stderr)
        return 1
    temporary_cache = tempfile.TemporaryDirectory(prefix="mastfs-demo-cache-")
    twin = subprocess.Popen(
        python_module_command("mastfs", "twin", "serve", "--scale", str(args.scale)),
        stdout=subprocess.PIPE, text=True,
    )
    try:
        line = twin.stdout.readline() if twin.stdout else ""
        if not line:
            print("mastfs demo: the twin did not start", file=sys.stderr)
            return 1
        urls = json.loads(line)
        cache_dir = args.cache_dir or temporary_cache.name
        print(f"twin: {urls['mast_url']} (S3 {urls['s3_endpoint']}); cache {cache_dir}", file=sys.stderr)
        print(f"mounting at {mountpoint}; try: ls {mountpoint}/program/2733  (Ctrl-C stops)",
              file=sys.stderr)
        mount_args = [
            "mount", "--foreground", mountpoint, "--mast-url", urls["mast_url"],
            "--resolver-url", urls["resolver_url"], "--s3-endpoint", urls["s3_endpoint"],
            "--cache-dir", cache_dir,
        ]
        return main(mount_args)
    finally:
        twin.send_signal(signal.SIGTERM)
        try:
            twin.wait(timeout=10)
        except subprocess.TimeoutExpired:
            twin.kill()
            twin.wait()
        if twin.stdout:
            twin.stdout.close()
        temporary_cache.cleanup()
