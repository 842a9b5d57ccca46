"""Configuration: one declarative table of options, read from flags, environment and a TOML file.

Precedence: command-line flag > environment variable ``MASTFS_<FLAG NAME>`` (``--cache-size`` ->
``MASTFS_CACHE_SIZE``) > ``~/.config/mastfs/config.toml``
(or ``$MASTFS_CONFIG``) > the default in :data:`OPTIONS`. Each option carries its help and the reason it
exists, so ``mastfs mount --help`` and docs/configuration.md stay in step with the code.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

log = logging.getLogger(__name__)

BLOCKS_SUBDIR = "blocks"
"""Subdirectory of the cache directory holding the block cache (see :attr:`Settings.blocks_dir`)."""
META_SUBDIR = "meta"
"""Subdirectory of the cache directory holding the metadata cache (see :attr:`Settings.meta_dir`)."""

_SIZE_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_size(text: str | int) -> int:
    """Parse ``"20G"``, ``"512M"``, ``"1048576"`` into bytes; raises ValueError on nonsense."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", str(text), re.IGNORECASE)
    if not match:
        raise ValueError(f"not a size: {text!r} (use e.g. 512M, 20G)")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])


def parse_duration(text: str | float) -> float:
    """Parse ``"90"``, ``"15m"``, ``"2h"``, ``"30d"`` into seconds; raises ValueError on nonsense."""
    if isinstance(text, (int, float)):
        return float(text)
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", str(text), re.IGNORECASE)
    if not match:
        raise ValueError(f"not a duration: {text!r} (use e.g. 90, 15m, 2h, 30d)")
    scale = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2).lower()]
    return float(match.group(1)) * scale


def parse_bool(text: str | bool) -> bool:
    """Parse yes/no/true/false/1/0; raises ValueError on nonsense."""
    if isinstance(text, bool):
        return text
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def parse_list(text: str | list[str]) -> list[str]:
    """Parse ``"JWST,HST"`` (or a TOML list) into ``["JWST", "HST"]``."""
    if isinstance(text, list):
        return [str(item).strip() for item in text if str(item).strip()]
    return [item.strip() for item in str(text).split(",") if item.strip()]


def parse_choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError(f"{text!r} is not one of {', '.join(choices)}")
        return text

    return parse


def parse_optional_int(text: str | int | None) -> int | None:
    return None if text in (None, "") else int(text)


def _default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "mastfs")


@dataclass(frozen=True)
class Option:
    """One setting: its name (also the TOML key), default, parser, help, and why it exists."""

    name: str
    default: Any
    parse: Callable[[Any], Any]
    help: str
    why: str
    flag: str = ""
    metavar: str | None = None
    deprecated_env: tuple[str, ...] = ()  # former variable names, still read (with a warning)

    @property
    def env(self) -> str:
        """``MASTFS_`` and the flag's name in capitals, dashes as underscores (``--collection`` ->
        ``MASTFS_COLLECTION``)."""
        return "MASTFS_" + self.cli_flag.lstrip("-").replace("-", "_").upper()

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")


OPTIONS: tuple[Option, ...] = (
    Option("mast_url", "https://mast.stsci.edu", str, "MAST API base URL",
           "queries, downloads and whoami all live here; point it at `mastfs twin serve` offline"),
    Option("resolver_url", "http://mastresolver.stsci.edu/Santa-war/query", str, "SANTA name resolver URL",
           "/target/<name> resolves names to coordinates"),
    Option("s3_endpoint", "", str, "S3 endpoint URL (empty: AWS)", "the twin or a mirror serves the bucket",
           metavar="URL"),
    Option("bucket", "stpubdata", str, "S3 bucket holding MAST's public cloud copies", "real bucket name"),
    Option("region", "us-east-1", str, "S3 region of the bucket", "the bucket lives in us-east-1"),
    Option("source", "auto", parse_choice("auto", "s3", "http"),
           "where file bytes come from: auto (S3, HTTPS fallback), s3 or http",
           "S3 is faster and free inside AWS; HTTPS holds everything"),
    Option("collections", ["JWST"], parse_list, "observation collections shown (comma-separated)",
           "MAST mixes missions; JWST is what most users browse", flag="--collection", metavar="LIST",
           deprecated_env=("MASTFS_COLLECTIONS",)),
    Option("cache_dir", _default_cache_dir(), str, "directory of the metadata and block caches",
           "persistent across remounts and reboots", metavar="DIR"),
    Option("cache_size", parse_size("20G"), parse_size, "block cache size limit (e.g. 20G)",
           "bounded disk use; least recently used blocks go first", metavar="SIZE"),
    Option("min_free_space", parse_size("1G"), parse_size, "keep at least this much free on the cache disk",
           "never fill the user's disk, whatever the cache limit", metavar="SIZE"),
    Option("ttl_recent", parse_duration("1h"), parse_duration,
           "metadata TTL for recent, planned or exclusive-access observations",
           "new data and releases change listings often", metavar="DURATION"),
    Option("ttl_released", parse_duration("7d"), parse_duration,
           "metadata TTL for observations released long ago", "old public data rarely changes",
           metavar="DURATION"),
    Option("ttl_negative", parse_duration("10m"), parse_duration, "how long 'does not exist' is remembered",
           "repeated lookups of unknown ids must not hammer MAST", metavar="DURATION"),
    Option("deadline", parse_duration("30s"), parse_duration,
           "most seconds one operation may take, retries included, before EIO",
           "a hung network must never hang ls or read", metavar="DURATION"),
    Option("query_timeout", parse_duration("600s"), parse_duration,
           "most seconds one metadata query may take while MAST is answering (slow queries, EXECUTING "
           "polls, a slow first byte), its pages and retries included, before EIO",
           "large JWST queries take minutes on MAST's side (astroquery's default is 600 s); an unreachable "
           "MAST still fails within --deadline", metavar="DURATION"),
    Option("retries", 5, int, "attempts per request for transient failures", "MAST answers 503/504 at times"),
    Option("transfers", 8, int, "parallel range requests for reads and prefetch",
           "parallel ranges beat one stream on fast links"),
    Option("token_file", "", str, "file (mode 0600) holding a MAST token",
           "exclusive-access data needs a token; env MAST_API_TOKEN and the astroquery keyring also work",
           metavar="FILE"),
    Option("token_hosts", [], parse_list,
           "hosts a redirected download may carry the MAST token to, besides the MAST host and *.stsci.edu "
           "(comma-separated; *.domain patterns)",
           "MAST may redirect downloads; the token must reach only hosts you trust, and never over plain http",
           metavar="LIST"),
    Option("log_level", "INFO", parse_choice("DEBUG", "INFO", "WARNING", "ERROR"), "log level",
           "quiet by default, verbose when debugging"),
    Option("log_file", "", str, "write the log here (default: stderr, or the journal under systemd)",
           "background mounts have no terminal", metavar="FILE"),
    Option("allow_other", False, parse_bool, "let other users see the mount (needs user_allow_other)",
           "shared machines and services running as other users"),
    Option("uid", None, parse_optional_int, "owner uid of every file (default: the mounting user)",
           "match the user who reads the data"),
    Option("gid", None, parse_optional_int, "owner gid of every file (default: the mounting user's group)",
           "match the group who reads the data"),
)


@dataclass(frozen=True)
class Settings:
    """Resolved configuration, one field per entry of :data:`OPTIONS`; build it with :func:`load_settings`
    (or :meth:`defaults` in tests)."""

    mast_url: str
    resolver_url: str
    s3_endpoint: str
    bucket: str
    region: str
    source: str
    collections: list[str]
    cache_dir: str
    cache_size: int
    min_free_space: int
    ttl_recent: float
    ttl_released: float
    ttl_negative: float
    deadline: float
    query_timeout: float
    retries: int
    transfers: int
    token_file: str
    token_hosts: list[str]
    log_level: str
    log_file: str
    allow_other: bool
    uid: int | None
    gid: int | None

    @classmethod
    def defaults(cls, **changes: Any) -> Settings:
        """The defaults of :data:`OPTIONS` (no environment, no config file), with ``changes`` applied."""
        return load_settings(env={}, path=Path("/nonexistent/mastfs.toml")).replace(**changes)

    @property
    def blocks_dir(self) -> str:
        """Where the block cache keeps file bytes: ``<cache_dir>/blocks``."""
        return os.path.join(self.cache_dir, BLOCKS_SUBDIR)

    @property
    def meta_dir(self) -> str:
        """Where the archive keeps MAST metadata: ``<cache_dir>/meta``."""
        return os.path.join(self.cache_dir, META_SUBDIR)

    def replace(self, **changes: Any) -> Settings:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return Settings(**values)


def config_path(env: Mapping[str, str] = os.environ) -> Path:
    """The TOML file read for settings: ``$MASTFS_CONFIG`` or ``~/.config/mastfs/config.toml``."""
    if env.get("MASTFS_CONFIG"):
        return Path(env["MASTFS_CONFIG"])
    base = env.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "mastfs" / "config.toml"


def add_arguments(parser: argparse.ArgumentParser, only: tuple[str, ...] | None = None) -> None:
    """Add one flag per option (or per option named in ``only``); defaults stay None so
    :func:`load_settings` sees what was given."""
    group = parser.add_argument_group("settings (flag > MASTFS_* environment > config.toml > default)")
    for option in OPTIONS:
        if only is not None and option.name not in only:
            continue
        if option.parse is parse_bool:
            group.add_argument(option.cli_flag, dest=option.name, action="store_const", const=True,
                               default=None, help=f"{option.help} [env {option.env}]")
        else:
            default = "" if "(default:" in option.help else f" (default: {show_default(option)})"
            group.add_argument(option.cli_flag, dest=option.name, default=None, metavar=option.metavar,
                               help=f"{option.help}{default} [env {option.env}]")


def format_size(nbytes: int) -> str:
    """``21474836480`` -> ``"20 GiB"`` (the largest binary unit that divides it; parse_size reads it back)."""
    for unit, factor in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= factor and nbytes % factor == 0:
            return f"{nbytes // factor} {unit}"
    return f"{nbytes} bytes"


def format_duration(seconds: float) -> str:
    """``3600.0`` -> ``"1h"`` (the largest unit that divides it; parse_duration reads it back)."""
    for unit, factor in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= factor and seconds % factor == 0:
            return f"{int(seconds // factor)}{unit}"
    return f"{seconds:g}s"


def show_default(option: Option) -> str:
    """The option's default as a user writes it (``20 GiB``, ``1h``, ``JWST``, ``''``)."""
    value = option.default
    if option.parse is parse_size:
        return format_size(value)
    if option.parse is parse_duration:
        return format_duration(value)
    if isinstance(value, list):
        return ",".join(value)
    return repr(value) if value in ("", None) else str(value)


def load_settings(
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] = os.environ,
    path: Path | None = None,
) -> Settings:
    """Resolve every option by precedence. Raises ValueError naming the option and source on bad values."""
    flags = flags or {}
    path = path or config_path(env)
    file_values: dict[str, Any] = {}
    if path.is_file():
        with open(path, "rb") as handle:
            file_values = tomllib.load(handle)
        unknown = set(file_values) - {option.name for option in OPTIONS}
        if unknown:
            raise ValueError(f"{path}: unknown settings {', '.join(sorted(unknown))}")
    resolved: dict[str, Any] = {}
    for option in OPTIONS:
        from_env = option.env, env.get(option.env)
        for old in option.deprecated_env:
            if from_env[1] is None and env.get(old) is not None:
                log.warning("%s is deprecated: use %s (the flag's name, like every MASTFS_ variable)",
                            old, option.env)
                from_env = old, env[old]
        for source, value in ((option.cli_flag, flags.get(option.name)), from_env,
                              (str(path), file_values.get(option.name))):
            if value is not None:
                try:
                    resolved[option.name] = option.parse(value)
                except (TypeError, ValueError) as exc:
                    raise ValueError(f"{option.name} from {source}: {exc}") from exc
                break
        else:
            resolved[option.name] = option.default
    resolved["cache_dir"] = os.path.abspath(os.path.expanduser(resolved["cache_dir"]))
    return Settings(**resolved)
