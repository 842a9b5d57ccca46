"""MAST token discovery, the request headers carrying it, and keeping it out of the logs.

Sources, first found wins: the environment variable ``MAST_API_TOKEN``; the file named by the
``token_file`` setting (refused when group or others may read it); the keyring entry astroquery's
``Observations.login(store_token=True)`` writes. The token never reaches a log: :func:`install_redaction`
masks it in every log record, and nothing in mastfs logs request headers.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterable, Mapping
from typing import Any

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


def find_token(settings: Settings, env: Mapping[str, str] = os.environ) -> str | None:
    """Return the MAST token to use, or None to stay anonymous.

    Blocking (reads a file, may ask a keyring daemon): call it at start-up or via
    ``trio.to_thread.run_sync``. Raises :class:`Unauthorized` when ``settings.token_file`` is set but
    missing, unreadable or readable by group/others (a token lying open to other users is refused,
    never silently used). Keyring failures (no package, no backend, locked) count as "no token there".
    """
    token: str | None = (env.get(ENV_TOKEN) or "").strip()
    if token:
        log.debug("MAST token from $%s", ENV_TOKEN)
        return token
    if settings.token_file:
        token = read_token_file(settings.token_file)
        if token:
            log.debug("MAST token from %s", settings.token_file)
            return token
    token = _keyring_token()
    if token:
        log.debug("MAST token from the keyring entry %s", KEYRING_SERVICE)
    return token


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
