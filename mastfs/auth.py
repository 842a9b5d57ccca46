"""MAST token discovery, the request headers carrying it, and keeping it out of the logs.

Sources, first found wins: the environment variable ``MAST_API_TOKEN``; the file named by the
``token_file`` setting (refused when group or others may read it); the keyring entry astroquery's
``Observations.login(store_token=True)`` writes. The token never reaches a log: :func:`install_redaction`
masks it in every log record, and nothing in mastfs logs request headers.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

import trio

from .config import Settings
from .errors import Unauthorized

log = logging.getLogger(__name__)

ENV_TOKEN = "MAST_API_TOKEN"
KEYRING_SERVICE = "astroquery:mast.stsci.edu.token"
KEYRING_USER = "masttoken"
TOKEN_URL = "https://auth.mast.stsci.edu/token"
#: The reason given when exclusive-access data is read without a token (logged, never the token itself).
LOGIN_HINT = (
    f"this file is exclusive-access: get a token at {TOKEN_URL} and set MAST_API_TOKEN "
    "(or --token-file) before mounting"
)
#: The reason given when MAST refuses the token in use.
REFUSED_HINT = (
    "MAST refused the token (expired, revoked or without rights to this program): get a new one at "
    f"{TOKEN_URL}"
)
REDACTED = "<redacted>"
TRUSTED_HOST_PATTERNS = ("*.stsci.edu",)
"""Hosts besides the configured MAST host that always may receive the token (MAST's own domain)."""
CHECK_INTERVAL = 3600.0
"""Seconds between two ``/whoami`` checks of the token by a mount (sooner after the token changed)."""


def find_token(settings: Settings, env: Mapping[str, str] = os.environ) -> str | None:
    """Return the MAST token to use, or None to stay anonymous.

    Blocking (reads a file, may ask a keyring daemon): call it at start-up or via
    ``trio.to_thread.run_sync``. Raises :class:`Unauthorized` when ``settings.token_file`` is set but
    missing, unreadable or readable by group/others (a token lying open to other users is refused,
    never silently used). Keyring failures (no package, no backend, locked) count as "no token there".
    """
    return find_token_and_source(settings, env)[0]


def find_token_and_source(settings: Settings, env: Mapping[str, str] = os.environ) -> tuple[str | None, str]:
    """Like :func:`find_token`, with where the token came from: ``$MAST_API_TOKEN``, ``file <path>``,
    ``keyring`` or ``none``."""
    token: str | None = (env.get(ENV_TOKEN) or "").strip()
    if token:
        log.debug("MAST token from $%s", ENV_TOKEN)
        return token, f"${ENV_TOKEN}"
    if settings.token_file:
        token = read_token_file(settings.token_file)
        if token:
            log.debug("MAST token from %s", settings.token_file)
            return token, f"file {settings.token_file}"
    token = _keyring_token()
    if token:
        log.debug("MAST token from the keyring entry %s", KEYRING_SERVICE)
        return token, "keyring"
    return None, "none"


def token_may_go_to(url: str, mast_url: str, extra_hosts: Iterable[str] = ()) -> bool:
    """Whether a request to ``url`` may carry the MAST token: its host is the host of ``mast_url``, or
    matches :data:`TRUSTED_HOST_PATTERNS` or ``extra_hosts`` (``name`` or ``*.domain``, which also matches
    ``domain``); and it is https, or plain http to a loopback host only."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if not host or parts.scheme not in ("http", "https"):
        return False
    if parts.scheme == "http" and not _is_loopback(host):
        return False
    if host == (urlsplit(mast_url).hostname or "").lower():
        return True
    for pattern in (*TRUSTED_HOST_PATTERNS, *extra_hosts):
        pattern = pattern.strip().lower()
        if pattern.startswith("*."):
            if host == pattern[2:] or host.endswith(pattern[1:]):
                return True
        elif pattern and host == pattern:
            return True
    return False


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class TokenKeeper:
    """The mount's MAST token over time: where it came from, whether MAST accepts it, and a fresh read of
    its source when MAST refuses it (so a token saved anew serves a live mount without a remount).

    ``current()`` is the token (or None); ``renew(used)`` re-reads the source (``renewable`` False: never,
    for a token given by the caller); ``check(whoami)`` asks MAST who the token is; ``status()``
    describes it all without the token itself. Only touched on the trio thread.
    """

    def __init__(self, settings: Settings, token: str | None, source: str,
                 env: Mapping[str, str] | None = None, *, renewable: bool = True) -> None:
        self._settings = settings
        self._renewable = renewable
        self._env = dict(os.environ if env is None else env)
        self._token = token
        self.source = source
        self.state = "unchecked" if token else "none"
        self.ezid: str | None = None
        self.last_check: float | None = None
        self.renewals = 0
        self._lock = trio.Lock()
        self._changed = trio.Event()
        self._warned = False
        install_redaction(token)

    def current(self) -> str | None:
        return self._token

    async def renew(self, used: str | None) -> bool:
        """After MAST refused a request made with ``used`` (None: sent without a token): re-read the token
        source. Returns True when there is now a token other than ``used`` (retry once with it). Never
        raises: an unreadable source is logged and counts as no new token."""
        async with self._lock:
            if self._token != used:
                return self._token is not None  # another request renewed it meanwhile
            if not self._renewable:
                return False
            try:
                token, source = await trio.to_thread.run_sync(find_token_and_source, self._settings, self._env)
            except Unauthorized as exc:
                log.warning("cannot re-read the MAST token: %s (%s)", exc, exc.reason)
                return False
            if token is None or token == used:
                return False
            install_redaction(token)
            self._token, self.source, self.state = token, source, "unchecked"
            self.renewals += 1
            self._warned = False
            self._changed.set()
            log.info("MAST refused the token; using the new one found in %s", source)
            return True

    async def check(self, whoami: Callable[[], Awaitable[Any]]) -> None:
        """Ask MAST (``whoami()`` -> Identity) whether the token is valid; sets ``state`` ("valid",
        "refused": MAST takes it for anonymous, i.e. expired or revoked, or "unknown": MAST did not
        answer), ``ezid`` and ``last_check``. Logs one WARNING per refused token saying how to get a new
        one. Never raises."""
        if self._token is None:
            self.state = "none"
            return
        checked = self._token
        try:
            identity = await whoami()
        except Exception as exc:  # a check that fails says nothing about the token
            log.info("cannot check the MAST token now (%s); will try again", exc)
            if self._token == checked:
                self.state = "unknown"
            return
        if self._token != checked:
            return
        self.last_check = time.time()
        if identity.anonymous:
            self.state, self.ezid = "refused", None
            if not self._warned:
                self._warned = True
                log.warning("MAST does not accept the token from %s (it expired, was revoked or is mistyped): "
                            "public data stays readable, exclusive-access data does not. Get a new token at "
                            "%s and save it to %s; the mount picks it up at the next refused read, without "
                            "a remount", self.source, TOKEN_URL, self._where_to_save())
        else:
            self.state, self.ezid = "valid", identity.ezid
            log.info("MAST token from %s is valid (MAST user %s)", self.source, identity.ezid)

    async def watch(self, whoami: Callable[[], Awaitable[Any]], interval: float = CHECK_INTERVAL) -> None:
        """Forever: :meth:`check` now, then every ``interval`` seconds or as soon as the token changes."""
        while True:
            self._changed = trio.Event()
            await self.check(whoami)
            with trio.move_on_after(interval):
                await self._changed.wait()

    def status(self) -> dict[str, Any]:
        """``source``, ``state`` (none, unchecked, valid, refused, unknown), ``ezid``, ``last_check``
        (epoch seconds or None) and ``renewals``: never the token."""
        return {"source": self.source, "state": self.state, "ezid": self.ezid, "last_check": self.last_check,
                "renewals": self.renewals}

    def _where_to_save(self) -> str:
        if self.source.startswith("file "):
            return self.source[5:]
        if self._settings.token_file:
            return self._settings.token_file
        return "a mode-600 file named by --token-file (or the keyring: astroquery's Observations.login)"


def read_token_file(path: str) -> str | None:
    """The token in ``path`` (stripped; None if empty). Raises Unauthorized if the file is missing,
    unreadable, or has any group/other permission bit set."""
    try:
        with open(os.path.expanduser(path), encoding="utf-8") as handle:
            mode = os.fstat(handle.fileno()).st_mode
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise Unauthorized(
                    f"token file {path} is accessible by other users (mode {stat.filemode(mode)})",
                    reason=f"run: chmod 600 {path}")
            token = handle.read().strip()
    except OSError as exc:
        raise Unauthorized(f"cannot read token file {path}: {exc.strerror}",
                           reason=f"create it with a token from {TOKEN_URL}, mode 600") from exc
    return token or None


def _keyring_token() -> str | None:
    try:
        import keyring

        token = keyring.get_password(KEYRING_SERVICE, KEYRING_USER)
    except Exception as exc:  # any backend failure means "no token there"; never fatal
        log.debug("keyring lookup failed: %s", type(exc).__name__)
        return None
    return token.strip() if token and token.strip() else None


def auth_headers(token: str | None) -> dict[str, str]:
    """Headers authenticating a MAST request with ``token``; empty when anonymous."""
    return {"Authorization": f"token {token}"} if token else {}


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every occurrence of each non-empty secret replaced by ``<redacted>``."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return text


class TokenRedactor(logging.Filter):
    """A logging filter masking registered secrets in a record's message and arguments.

    Usable on a handler; :func:`install_redaction` also applies it to every record at creation so no
    handler, present or future, ever sees a token.
    """

    def __init__(self) -> None:
        super().__init__()
        self.secrets: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            try:
                message = record.getMessage()
            except Exception:  # a malformed record: logging reports it when a handler formats it
                return True
            masked = redact(message, self.secrets)
            if masked != message:
                record.msg, record.args = masked, None
        return True


_redactor = TokenRedactor()
_installed = False


def install_redaction(token: str | None) -> TokenRedactor:
    """Mask ``token`` in every log record from now on (idempotent; safe to call with None).

    Returns the process-wide redactor, which may also be attached to handlers explicitly.
    """
    global _installed
    if token:
        _redactor.secrets.add(token)
    if not _installed:
        previous_factory = logging.getLogRecordFactory()

        def redacting_factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = previous_factory(*args, **kwargs)
            _redactor.filter(record)
            return record

        logging.setLogRecordFactory(redacting_factory)
        _installed = True
    return _redactor
