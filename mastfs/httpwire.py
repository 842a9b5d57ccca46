"""HTTP plumbing shared by the MAST client and both fetchers: which domain error an HTTP status means,
the Retry-After header in seconds, and the check that a ranged answer carries exactly the bytes asked for.

The MAST client (mast/client.py), the HTTPS fetcher (fetch/http.py) and the S3 fetcher (fetch/s3.py) all
map statuses here, so a status means the same thing whichever layer meets it.
"""

from __future__ import annotations

import datetime
import email.utils
import re
import time

from .auth import LOGIN_HINT, REFUSED_HINT
from .errors import BadResponse, MastfsError, NotFound, Retryable, Unauthorized

#: Statuses worth another try besides every 5xx: request timeout, too early, too many requests.
RETRYABLE_STATUS = frozenset({408, 425, 429})
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


def is_retryable_status(status: int) -> bool:
    """True for the statuses another try may cure: 408, 425, 429 and every 5xx."""
    return status >= 500 or status in RETRYABLE_STATUS


def unauthorized(what: str, has_token: bool, detail: str = "") -> Unauthorized:
    """The Unauthorized error for a refused request, its reason telling the user how to log in
    (:data:`~mastfs.auth.LOGIN_HINT`) or to renew a refused token (:data:`~mastfs.auth.REFUSED_HINT`)."""
    if has_token:
        return Unauthorized(f"{what}: access refused{detail}", reason=REFUSED_HINT)
    return Unauthorized(f"{what}: login required{detail}", reason=LOGIN_HINT)


def error_for_status(status: int, what: str, *, has_token: bool, retry_after: float | None = None) -> MastfsError:
    """The domain error for a non-success HTTP ``status`` of the request described by ``what`` (returned,
    for the caller to raise): 401/403 Unauthorized, 404 NotFound, 416 BadResponse, 408/425/429/5xx
    Retryable carrying ``retry_after``, anything else BadResponse."""
    if status in (401, 403):
        return unauthorized(what, has_token, f" (HTTP {status})")
    if status == 404:
        return NotFound(f"{what}: not found (HTTP 404)")
    if status == 416:
        return BadResponse(f"{what}: range not satisfiable (HTTP 416; the file is shorter than listed?)")
    if is_retryable_status(status):
        return Retryable(f"{what}: HTTP {status}", retry_after=retry_after)
    return BadResponse(f"{what}: unexpected HTTP {status}")


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait per a Retry-After header value, delta-seconds or HTTP-date (relative to ``now``,
    default the wall clock), never negative; None when absent or unparsable."""
    value = (value or "").strip()
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000": RFC 9110 dates are GMT anyway
        when = when.replace(tzinfo=datetime.timezone.utc)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def check_content_range(where: str, start: int, end: int, content_range: str | None,
                        content_length: str | int | None = None) -> None:
    """Raise Retryable unless a 206's Content-Range names exactly bytes ``[start, end)`` and its
    Content-Length (when given) is ``end - start``."""
    header = (content_range or "").strip()
    match = _CONTENT_RANGE.fullmatch(header)
    if not match or int(match.group(1)) != start or int(match.group(2)) != end - 1:
        raise Retryable(f"{where}: answer for bytes {start}-{end - 1} had Content-Range {header!r}")
    if content_length is not None and str(content_length).strip() != str(end - start):
        raise Retryable(f"{where}: answer for bytes {start}-{end - 1} had Content-Length {content_length}")
