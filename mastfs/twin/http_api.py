"""HTTP side of the MAST twin: the mast.stsci.edu endpoints mastfs and astroquery use, plus the SANTA
resolver and the twin's admin endpoints, on one stdlib ``ThreadingHTTPServer``.

Served (wire formats as in /work/shared/reference/MAST_API.md):

* ``POST /api/v0/invoke`` (form field ``request``): Mast.Caom.Filtered, Mast.Caom.Filtered.Position,
  Mast.Caom.Cone, Mast.Caom.Products, Mast.Name.Lookup; real paging; ``COUNT_BIG(*)`` counting.
* ``POST /portal/Mashup/Mashup.asmx/columnsconfig`` (form field ``colConfigId``).
* ``HEAD``/``GET /api/v0.1/Download/file?uri=``: single byte ranges, 416, 401 for exclusive data.
* ``GET``/``POST /api/v0.1/path_lookup/?uri=..&uri=..``; ``GET /whoami``; ``GET /Santa-war/query``.
* admin (not counted): ``/__twin__/faults``, ``/__twin__/stats``, ``/__twin__/stats/reset``,
  ``/__twin__/sha256?uri=``, ``/__twin__/requests`` (what the last requests asked for, decoded),
  ``/__twin__/reprocess`` and ``/__twin__/product`` (versions, misstated sizes, dynamic products).

Product bodies are streamed from ``Catalog.read`` in 1 MiB pieces, never materialised whole. Every
request consults the :class:`~mastfs.twin.faults.FaultController` and is counted in
:class:`~mastfs.twin.faults.TwinStats` (body bytes as actually written to the socket).
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from email.utils import formatdate, parsedate_to_datetime
from http import HTTPStatus
from http.cookies import CookieError, SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from mastfs.twin.catalog import OBSERVATION_COLUMNS, PRODUCT_COLUMNS, Catalog, ProductRows
from mastfs.twin.connections import ResetRegistry, TrackedConnections
from mastfs.twin.faults import (
    BODY_KINDS,
    DRIP_BYTES_PER_SECOND,
    ENDLESS_PAGES,
    GENERIC_KINDS,
    HTML_200_PAGE,
    NGINX_504_PAGE,
    RANGE_KINDS,
    SLOW_QUERY_SERVICES,
    TIMEOUT_MESSAGE,
    Fault,
    FaultController,
    FaultError,
    TwinStats,
    crafted_paths,
    crafted_rows,
    drip,
    endless_paging,
    mutate_rows,
)
from mastfs.twin.link import Link

logger = logging.getLogger(__name__)

CHUNK_SIZE = 1 << 20

INVOKE_PATH = "/api/v0/invoke"
COLUMNS_CONFIG_PATH = "/portal/Mashup/Mashup.asmx/columnsconfig"
DOWNLOAD_PATH = "/api/v0.1/Download/file"
PATH_LOOKUP_PATHS = ("/api/v0.1/path_lookup/", "/api/v0.1/path_lookup")
WHOAMI_PATH = "/whoami"
RESOLVER_PATH = "/Santa-war/query"
ADMIN_PREFIX = "/__twin__/"
REDIRECT_HOP_PARAM = "twin_hop"
"""Query parameter of a redirected download: how many more redirects follow (0: this host serves it)."""
REDIRECT_TARGET_PARAM = "twin_to"
"""Query parameter of a redirected download: the listener the remaining redirects point to."""
ENDPOINT_BY_PATH = {INVOKE_PATH: "invoke", COLUMNS_CONFIG_PATH: "columnsconfig", DOWNLOAD_PATH: "download",
                    WHOAMI_PATH: "whoami", RESOLVER_PATH: "resolver",
                    **dict.fromkeys(PATH_LOOKUP_PATHS, "path_lookup")}
DEFAULT_MAX_URL_LENGTH = 3400
"""Longest request target (path and query as sent) answered; longer ones get ``414 Request-URI Too
Large``. Between a path_lookup of 40 JWST dataURIs (at most 3,202 characters for the longest ones in the
catalog, with ``use_cloud_path=True``) and one of 50 typical ones (3,577 and more): see docs/twin.md."""

FILTERED = "Mast.Caom.Filtered"
FILTERED_POSITION = "Mast.Caom.Filtered.Position"
CONE = "Mast.Caom.Cone"
PRODUCTS = "Mast.Caom.Products"
NAME_LOOKUP = "Mast.Name.Lookup"
COUNT_COLUMN = "COUNT_BIG(*)"

# MAST's declared field types (string, float, int, boolean, ...); columns not listed get a type inferred
# from their first non-null value.
FIELD_TYPES = {**dict(OBSERVATION_COLUMNS), **dict(PRODUCT_COLUMNS), "distance": "float", "objID1": "string"}
PRODUCT_FIELDS = [{"name": name, "type": declared} for name, declared in PRODUCT_COLUMNS]
STREAM_BATCH_ROWS = 500
"""Rows JSON-encoded per piece of a streamed invoke answer."""

CONTENT_TYPES = {
    ".fits": "application/fits",
    ".fits.gz": "application/fits",
    ".json": "application/json",
    ".jpg": "image/jpeg",
    ".png": "image/png",
    ".csv": "text/csv",
    ".ecsv": "text/plain",
    ".txt": "text/plain",
}

UNAUTHORIZED_MESSAGE = "Must be logged in as an authorized user to access this service."


class InvokeError(Exception):
    """A MAST service error: answered as HTTP 200 ``{"status": "ERROR", "msg": ...}``."""


@dataclass
class Reply:
    """One response before it is written: status, headers and a body that is either in memory or a
    ``(uri, offset, length)`` stretch of a catalog product streamed on demand.

    ``length_known`` False means: no Content-Length (chunked for HTTP/1.1 clients, close-delimited
    otherwise).
    """

    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    stream: tuple[str, int, int] | None = None
    length_known: bool = True
    revision: int | None = None  # the product revision a stream reads (None: the current one)
    pieces: Iterable[bytes] | None = None  # a body generated while it is sent (length unknown)

    @property
    def body_length(self) -> int:
        """Number of body bytes this reply carries."""
        return self.stream[2] if self.stream else len(self.body)


def json_reply(payload: object, status: int = 200) -> Reply:
    """A JSON reply (UTF-8, compact)."""
    body = json.dumps(payload, separators=(",", ":")).encode()
    return Reply(status, [("Content-Type", "application/json; charset=utf-8")], body)


def invoke_reply(payload: dict) -> Reply:
    """An invoke answer: in memory when ``payload["data"]`` is a list, else (rows generated on demand)
    streamed chunked, :data:`STREAM_BATCH_ROWS` rows JSON-encoded at a time, so a page of any size costs
    O(batch) memory."""
    rows = payload.get("data")
    if isinstance(rows, list) or rows is None:
        return json_reply(payload)
    head = {name: value for name, value in payload.items() if name != "data"}

    def pieces() -> Iterator[bytes]:
        yield json.dumps(head, separators=(",", ":"))[:-1].encode() + b',"data":['
        for start in range(0, len(rows), STREAM_BATCH_ROWS):
            batch = ",".join(json.dumps(row, separators=(",", ":")) for row in rows[start : start + STREAM_BATCH_ROWS])
            yield (b"," if start else b"") + batch.encode()
        yield b"]}"

    return Reply(200, [("Content-Type", "application/json; charset=utf-8")], length_known=False, pieces=pieces())


def query_key(request: dict) -> str:
    """The identity of the query a Mashup request belongs to: its body without ``page`` (polls re-send
    the body; pages of one query share its cacheBreaker)."""
    return json.dumps({name: value for name, value in request.items() if name != "page"}, sort_keys=True,
                      default=str)


def request_page(request: dict) -> int:
    """The request's ``page`` (1 when absent or not a number)."""
    try:
        return int(request.get("page") or 1)
    except (TypeError, ValueError):
        return 1


def chained_rows(sources: list[Sequence[dict]]) -> Sequence[dict]:
    """The rows of ``sources`` one after the other: the list itself for one list, else a lazy view."""
    if len(sources) == 1:
        return sources[0]
    if all(isinstance(source, list) for source in sources):
        return [row for source in sources for row in source]
    ends = []
    total = 0
    for source in sources:
        total += len(source)
        ends.append(total)

    def row_at(index: int) -> dict:
        which = bisect_right(ends, index)
        return sources[which][index - (ends[which - 1] if which else 0)]

    return ProductRows(total, row_at)


def html_reply(status: int, title: str, detail: str = "") -> Reply:
    """A small HTML error page like the ones MAST's front end sends."""
    text = f"{status} {title}"
    page = (
        f"<html>\r\n<head><title>{text}</title></head>\r\n<body>\r\n<center><h1>{text}</h1></center>\r\n"
        f"{'<p>' + detail + '</p>' if detail else ''}\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
    )
    return Reply(status, [("Content-Type", "text/html; charset=utf-8")], page.encode())


def http_date(timestamp: float) -> str:
    """RFC 7231 date for ``timestamp`` (Last-Modified, Date)."""
    return formatdate(timestamp, usegmt=True)


def content_type_for(filename: str) -> str:
    """Content-Type MAST would send for a product file name."""
    lower = filename.lower()
    for suffix, content_type in CONTENT_TYPES.items():
        if lower.endswith(suffix):
            return content_type
    return "application/octet-stream"


def parse_single_range(header: str, size: int) -> tuple[int, int] | str | None:
    """Interpret a Range header against a body of ``size`` bytes.

    Returns (start, end_inclusive) for one satisfiable range, "unsatisfiable" for a syntactically valid
    single range that selects nothing, and None when the header must be ignored (syntax error, other
    unit, several ranges: the full body is then sent with 200, as RFC 9110 allows).
    """
    match = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header)
    if not match:
        return None
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:
        suffix = int(last)
        if suffix == 0 or size == 0:
            return "unsatisfiable"
        return max(0, size - suffix), size - 1
    start = int(first)
    end = int(last) if last else size - 1
    if last and end < start:
        return None
    if start >= size:
        return "unsatisfiable"
    return start, min(end, size - 1)


def precondition_failed(headers: Any, etag: str, mtime: float) -> bool:
    """True when ``If-Match`` names another entity tag or ``If-Unmodified-Since`` is before ``mtime``
    (RFC 9110 section 13.1: strong comparison; ``*`` matches)."""
    if_match = headers.get("If-Match")
    if if_match is not None:
        tags = [tag.strip() for tag in if_match.split(",")]
        return "*" not in tags and etag not in tags
    since = headers.get("If-Unmodified-Since")
    if since:
        try:
            return int(mtime) > parsedate_to_datetime(since).timestamp()
        except (TypeError, ValueError):
            return False
    return False


def if_range_holds(value: str | None, etag: str, mtime: float) -> bool:
    """Whether a Range may be honoured under ``If-Range: value`` (an entity tag, or a date that must
    equal Last-Modified); True without the header."""
    if not value:
        return True
    value = value.strip()
    if value.startswith('"') or value.startswith("W/"):
        return value == etag
    try:
        return parsedate_to_datetime(value).timestamp() == int(mtime)
    except (TypeError, ValueError):
        return False


def mismatched_range(start: int, end: int, size: int, shift: int) -> tuple[int, int]:
    """A range of a ``size``-byte body that differs from [start, end] (shifted by ``shift`` when it
    fits, else shortened): what the ``wrong_range`` fault answers instead of the requested range."""
    length = end - start + 1
    if start + shift + length <= size:
        return start + shift, end + shift
    if start - shift >= 0:
        return start - shift, end - shift
    if length > 1:
        return start, start + length // 2 - 1
    return (start + 1, end + 1) if end + 1 < size else (start - 1, end - 1)


def like_pattern(free_text: str) -> re.Pattern[str]:
    """Compile an SQL LIKE pattern (``%`` any run, ``_`` one character) to a case-insensitive regex."""
    parts = []
    for char in free_text:
        if char == "%":
            parts.append(".*")
        elif char == "_":
            parts.append(".")
        else:
            parts.append(re.escape(char))
    return re.compile("".join(parts), re.IGNORECASE | re.DOTALL)


def great_circle_arcsec(ra1: float, dec1: float, ra2: float, dec2: float) -> float:
    """Angular distance between two sky positions (degrees in) in arcseconds (haversine)."""
    phi1, phi2 = math.radians(dec1), math.radians(dec2)
    dphi = phi2 - phi1
    dlam = math.radians(ra2 - ra1)
    h = math.sin(dphi / 2) ** 2 + math.cos(phi1) * math.cos(phi2) * math.sin(dlam / 2) ** 2
    return math.degrees(2 * math.asin(min(1.0, math.sqrt(h)))) * 3600.0


def field_type(name: str, rows: list[dict]) -> str:
    """MAST type name of column ``name``: declared, else inferred from the first non-null value."""
    declared = FIELD_TYPES.get(name)
    if declared:
        return declared
    for row in rows:
        value = row.get(name)
        if value is None:
            continue
        if isinstance(value, bool):
            return "boolean"
        if isinstance(value, int):
            return "int"
        if isinstance(value, float):
            return "float"
        return "string"
    return "string"


def fields_for(rows: list[dict], template: dict | None = None) -> list[dict[str, str]]:
    """The ``fields`` list describing ``rows``: the columns of ``template`` (if given) then of every row,
    in first-seen order."""
    names: dict[str, None] = dict.fromkeys(template or {})
    for row in rows:
        names.update(dict.fromkeys(row))
    return [{"name": name, "type": field_type(name, rows)} for name in names]


class RowFilter:
    """One Mashup filter ``{"paramName", "values", "separator"?, "freeText"?}`` compiled for matching.

    Semantics (as MAST's SQL): range values ``[{"min", "max"}]`` are inclusive numeric bounds (either may
    be null); other values match exactly on ``str(value)``; ``freeText`` is a case-insensitive LIKE; with a
    ``separator`` each part of a multi-valued field is tried too; values and freeText are OR-ed; a filter
    without values or freeText matches everything.
    """

    def __init__(self, spec: object, known_columns: set[str]) -> None:
        if not isinstance(spec, dict) or not isinstance(spec.get("paramName"), str):
            raise InvokeError("Each filter must be an object with a paramName.")
        self.column = spec["paramName"]
        if self.column not in known_columns:
            raise InvokeError(f"Invalid column name: {self.column}")
        values = spec.get("values", [])
        if not isinstance(values, list):
            raise InvokeError(f"Filter {self.column}: values must be a list.")
        self.ranges = [value for value in values if isinstance(value, dict)]
        self.exact = {str(value) for value in values if not isinstance(value, dict)}
        for bounds in self.ranges:
            for bound in ("min", "max"):
                if bounds.get(bound) is not None and not isinstance(bounds[bound], (int, float, str)):
                    raise InvokeError(f"Filter {self.column}: bad {bound} bound.")
        free_text = spec.get("freeText")
        self.free = like_pattern(free_text) if isinstance(free_text, str) and free_text else None
        separator = spec.get("separator")
        self.separator = separator if isinstance(separator, str) and separator else None

    def matches(self, row: dict) -> bool:
        """Whether ``row`` passes this filter."""
        if not self.ranges and not self.exact and self.free is None:
            return True
        value = row.get(self.column)
        if value is None:
            return False
        if self.ranges and self._in_ranges(value):
            return True
        text = str(value)
        parts = [text] + (text.split(self.separator) if self.separator else [])
        if self.exact and any(part in self.exact for part in parts):
            return True
        return self.free is not None and any(self.free.fullmatch(part) for part in parts)

    def _in_ranges(self, value: object) -> bool:
        try:
            number = float(value)
        except (TypeError, ValueError):
            return False
        for bounds in self.ranges:
            low, high = bounds.get("min"), bounds.get("max")
            try:
                if (low is None or number >= float(low)) and (high is None or number <= float(high)):
                    return True
            except ValueError as exc:
                raise InvokeError(f"Filter {self.column}: bounds must be numbers.") from exc
        return False


def parse_position(text: object) -> tuple[float, float, float]:
    """``"ra, dec, radius_deg"`` -> floats; raises InvokeError when malformed."""
    try:
        ra, dec, radius = (float(part) for part in str(text).split(","))
    except ValueError:
        raise InvokeError(f"Invalid position: {text!r} (expected 'ra, dec, radius').") from None
    return ra, dec, radius


class MastHttpServer(TrackedConnections, ThreadingHTTPServer):
    """The twin's HTTP server. Daemon threads; one per connection (keep-alive)."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(
        self,
        address: tuple[str, int],
        catalog: Catalog,
        faults: FaultController,
        stats: TwinStats,
        link: Link | None = None,
        max_url_length: int = DEFAULT_MAX_URL_LENGTH,
    ) -> None:
        self.catalog = catalog
        self.faults = faults
        self.stats = stats
        self.link = link if link is not None else Link()
        self.max_url_length = max_url_length  # 0: no limit (the stdlib's 65,536 still applies)
        self.observations: list[dict] = catalog.observation_rows()
        self.observation_columns: set[str] = set()
        for row in self.observations:
            self.observation_columns.update(row)
        self.peer_urls: dict[str, str] = {}
        """Base URLs a ``redirect`` fault may send downloads to ("second", "mast"), set by the Twin."""
        self.track_connections(ResetRegistry())
        super().__init__(address, MastRequestHandler)


def request_token(headers) -> str | None:
    """The MAST token a request carries: ``Authorization: token X`` / ``Bearer X`` or cookie
    ``mast_token``; None without one."""
    authorization = headers.get("Authorization", "")
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() in ("token", "bearer") and value.strip():
        return value.strip()
    cookie_header = headers.get("Cookie")
    if cookie_header:
        cookies = SimpleCookie()
        try:
            cookies.load(cookie_header)
        except CookieError:
            return None
        morsel = cookies.get("mast_token")
        if morsel is not None and morsel.value:
            return morsel.value
    return None


class MastRequestHandler(BaseHTTPRequestHandler):
    """Routes one request to its endpoint, applies faults, writes the reply and counts it."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in separate writes: without TCP_NODELAY a
    # small body waits for the client's delayed ACK of the headers (40 ms on Linux), as nginx never does
    server_version = "nginx"
    sys_version = ""
    server: MastHttpServer

    def log_message(self, format: str, *args: object) -> None:
        logger.debug("twin http %s: " + format, self.address_string(), *args)

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    # ---- routing -------------------------------------------------------------------------------------

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        self.query = parse_qs(url.query, keep_blank_values=True)
        self.body = self._read_body()
        path = url.path
        method = self.command
        if path.startswith(ADMIN_PREFIX):
            self._write(self._admin(method, path[len(ADMIN_PREFIX) :]), stat_keys=(), over_link=False)
            return
        limit = self.server.max_url_length
        if limit and len(self.path) > limit:
            endpoint = ENDPOINT_BY_PATH.get(path)
            stat_keys = [endpoint] if endpoint else []
            self.server.stats.count_request(stat_keys)
            self._log_request(endpoint or "unknown", status=414, url_length=len(self.path))
            self._write(html_reply(414, "Request-URI Too Large"), stat_keys)
            return
        if path == INVOKE_PATH and method == "POST":
            self._invoke()
        elif path == COLUMNS_CONFIG_PATH and method == "POST":
            colconfig_id = self._form().get("colConfigId", [""])[0]
            self._log_request("columnsconfig", colConfigId=colconfig_id)
            self._serve(
                "columnsconfig",
                colconfig_id,
                ["columnsconfig"],
                lambda fault: self._columns_config(colconfig_id),
            )
        elif path == DOWNLOAD_PATH and method in ("GET", "HEAD"):
            uri = self.query.get("uri", [""])[0]
            ranged = method == "GET" and "Range" in self.headers
            redirected = REDIRECT_HOP_PARAM in self.query
            self._log_request("download", uri=uri, range=self.headers.get("Range"), redirected=redirected)
            self._serve(
                "download", uri, ["download"], lambda fault: self._download(uri, fault), ranged=ranged,
                extra_kinds=() if redirected else ("redirect",),
            )
        elif path in PATH_LOOKUP_PATHS and method in ("GET", "POST"):
            uris = self.query.get("uri", []) + self._form().get("uri", [])
            self._log_request("path_lookup", uris=uris)
            self._serve(
                "path_lookup",
                "\n".join(uris),
                ["path_lookup"],
                lambda fault: self._path_lookup(uris, fault),
                extra_kinds=("crafted_names",),
            )
        elif path == WHOAMI_PATH and method == "GET":
            self._log_request("whoami")
            self._serve("whoami", self.path, ["whoami"], lambda fault: self._whoami())
        elif path == RESOLVER_PATH and method == "GET":
            names = self.query.get("name", [])
            self._log_request("resolver", names=names)
            self._serve("resolver", "\n".join(names), ["resolver"], lambda fault: self._resolve(names))
        else:
            known = path in (INVOKE_PATH, COLUMNS_CONFIG_PATH, DOWNLOAD_PATH, WHOAMI_PATH, RESOLVER_PATH)
            if known or path in PATH_LOOKUP_PATHS:
                self._write(html_reply(405, "Method Not Allowed"), stat_keys=())
            else:
                self._write(html_reply(404, "Not Found"), stat_keys=())

    def _log_request(self, endpoint: str, **details: object) -> None:
        """Record what this request asked for, as the twin decoded it (``GET /__twin__/requests``), which
        listener got it (``host``) and whether it carried a token (``with_token``); never the token."""
        self.server.stats.log_request({"endpoint": endpoint, "method": self.command,
                                       "host": self.server.server_address[0],
                                       "with_token": request_token(self.headers) is not None, **details})

    def _read_body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if not length:
            return b""
        try:
            return self.rfile.read(int(length))
        except ValueError:
            self.close_connection = True
            return b""

    def _form(self) -> dict[str, list[str]]:
        if not self.body:
            return {}
        return parse_qs(self.body.decode("utf-8", "replace"), keep_blank_values=True)

    # ---- fault application -----------------------------------------------------------------------------

    def _serve(
        self,
        endpoint: str,
        subject: str,
        stat_keys: list[str],
        build: Callable[[Fault | None], Reply],
        *,
        ranged: bool = False,
        extra_kinds: Iterable[str] = (),
    ) -> None:
        """Count the request, apply the faults that hit it, build the reply and write it."""
        self.server.stats.count_request(stat_keys)
        kinds = set(GENERIC_KINDS) | {"html_200"} | set(extra_kinds)
        if self.command != "HEAD":
            kinds |= BODY_KINDS
        if ranged:
            kinds |= RANGE_KINDS
        faults = self.server.faults.take(endpoint, subject, kinds)
        terminal = None
        for fault in faults:
            if fault.kind == "latency":
                time.sleep(fault.number("seconds", 1.0))
            else:
                terminal = fault
        if terminal is not None:
            early = self._fault_reply(terminal)
            if early is not None:
                self._write(early, stat_keys)
                return
            if terminal.kind == "stall":
                self.server.faults.stall()
                self.close_connection = True
                self.server.resets.mark(self.connection)
                return
        self._write(build(terminal), stat_keys, terminal)

    def _fault_reply(self, fault: Fault) -> Reply | None:
        """The reply that replaces the real one for status-like faults; None for other kinds."""
        if fault.kind == "status":
            code = int(fault.number("code", 503))
            try:
                title = HTTPStatus(code).phrase
            except ValueError:
                title = "Error"
            reply = html_reply(code, title)
            if "retry_after" in fault.params:
                reply.headers.append(("Retry-After", str(int(fault.number("retry_after", 1)))))
            return reply
        if fault.kind == "html_504":
            return Reply(504, [("Content-Type", "text/html")], NGINX_504_PAGE)
        if fault.kind == "html_200":
            return Reply(200, [("Content-Type", "text/html; charset=utf-8")], HTML_200_PAGE)
        if fault.kind == "unauthorized":
            return html_reply(401, "Unauthorized", "The token is expired or invalid.")
        return None

    # ---- writing ---------------------------------------------------------------------------------------

    def _write(self, reply: Reply, stat_keys: Iterable[str], fault: Fault | None = None,
               over_link: bool = True) -> None:
        """Send ``reply`` (``over_link``: after the link's first-byte latency; a product body is paced by
        the link); apply body faults (reset/truncate); count body bytes actually written."""
        stat_keys = list(stat_keys)
        head = self.command == "HEAD"
        if over_link and (reply.stream is None or head):
            self.server.link.delay_metadata()
        total = reply.body_length
        chunked = not reply.length_known and self.request_version == "HTTP/1.1"
        self.send_response(reply.status)
        for name, value in reply.headers:
            self.send_header(name, value)
        if reply.length_known:
            self.send_header("Content-Length", str(total))
        elif chunked and not head:
            self.send_header("Transfer-Encoding", "chunked")
        elif not head:
            self.send_header("Connection", "close")
            self.close_connection = True
        try:
            self.end_headers()
            if head:
                return
            limit = total
            if fault is not None and fault.kind == "reset":
                limit = min(total, int(fault.number("after_bytes", 0)))
            elif fault is not None and fault.kind == "truncate":
                limit = min(total, int(fault.number("after_bytes", total // 2)))
                limit = min(limit, max(0, total - 1))
            pieces = self._body_pieces(reply, limit)
            if fault is not None and fault.kind == "drip":
                pieces = drip(pieces, fault.number("bytes_per_second", DRIP_BYTES_PER_SECOND))
            for piece in pieces:
                # Counted before the write (so a client that has the bytes also sees them counted) and
                # taken back if the write fails.
                self.server.stats.count_bytes(stat_keys, len(piece))
                try:
                    if chunked:
                        self.wfile.write(b"%x\r\n" % len(piece))
                        self.wfile.write(piece)
                        self.wfile.write(b"\r\n")
                    else:
                        self.wfile.write(piece)
                except OSError:
                    self.server.stats.count_bytes(stat_keys, -len(piece))
                    raise
            if fault is not None and fault.kind in BODY_KINDS:
                self.close_connection = True
                if fault.kind == "reset":
                    self.server.resets.mark(self.connection)
                return
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
        except OSError as exc:
            logger.debug("twin http client went away: %s", exc)
            self.close_connection = True

    def _body_pieces(self, reply: Reply, limit: int) -> Iterator[memoryview | bytes]:
        """The first ``limit`` body bytes of ``reply`` in pieces of at most CHUNK_SIZE (a generated body
        whole, as generated)."""
        if reply.pieces is not None:
            yield from reply.pieces
            return
        if reply.stream is None:
            view = memoryview(reply.body)[:limit]
            for start in range(0, len(view), CHUNK_SIZE):
                yield view[start : start + CHUNK_SIZE]
            return
        uri, offset, _ = reply.stream
        pieces = self.server.catalog.pieces(uri, offset, limit, CHUNK_SIZE, revision=reply.revision)
        yield from self.server.link.pace(pieces)

    # ---- admin -----------------------------------------------------------------------------------------

    def _admin(self, method: str, route: str) -> Reply:
        faults, stats = self.server.faults, self.server.stats
        if route == "faults":
            if method == "GET":
                return json_reply({"faults": faults.list()})
            if method == "DELETE":
                faults.clear()
                return json_reply({"faults": []})
            if method == "POST":
                try:
                    spec = json.loads(self.body or b"null")
                    specs = spec if isinstance(spec, list) else [spec]
                    added = [faults.add_from_json(item).to_json() for item in specs]
                except (ValueError, FaultError) as exc:
                    return json_reply({"error": str(exc)}, status=400)
                return json_reply({"added": added, "faults": faults.list()})
        if route == "stats":
            if method == "GET":
                return json_reply(stats.snapshot())
            if method == "DELETE":
                stats.reset()
                return json_reply(stats.snapshot())
        if route == "stats/reset" and method == "POST":
            stats.reset()
            return json_reply(stats.snapshot())
        if route == "link":
            if method == "PUT":
                try:
                    spec = json.loads(self.body or b"null")
                    self.server.link.set(spec.get("first_byte_ms", 0), spec.get("stream_mb_s", 0),
                                         spec.get("metadata_ms"))
                except (AttributeError, TypeError, ValueError) as exc:
                    return json_reply({"error": f"a link is {{first_byte_ms, stream_mb_s, metadata_ms}} >= 0: "
                                                f"{exc}"},
                                      status=400)
            if method in ("GET", "PUT"):
                return json_reply(self.server.link.to_json())
        if route == "tokens" and method == "PUT":
            try:
                spec = json.loads(self.body or b"null")
                self.server.catalog.set_token(str(spec.get("token", "")), str(spec.get("state", "")))
            except (AttributeError, TypeError, ValueError) as exc:
                return json_reply({"error": f"a token change is {{token, state}}: {exc}"}, status=400)
            return json_reply({"ok": True})
        if route == "tokens" and method == "DELETE":
            self.server.catalog.reset_tokens()
            return json_reply({"ok": True})
        if route == "limits":
            if method == "PUT":
                try:
                    spec = json.loads(self.body or b"null")
                    length = spec.get("max_url_length", self.server.max_url_length)
                    if isinstance(length, bool) or not isinstance(length, int) or length < 0:
                        raise ValueError(f"bad max_url_length {length!r}")
                except (AttributeError, ValueError) as exc:
                    return json_reply({"error": f"limits are {{max_url_length: int >= 0}}: {exc}"}, status=400)
                self.server.max_url_length = length
            if method in ("GET", "PUT"):
                return json_reply({"max_url_length": self.server.max_url_length})
        if route == "requests" and method == "GET":
            return json_reply({"requests": stats.requests()})
        if route == "sha256" and method == "GET":
            uri = self.query.get("uri", [""])[0]
            product = self.server.catalog.product(uri)
            if product is None:
                return json_reply({"error": f"unknown uri {uri!r}"}, status=404)
            digest = self.server.catalog.sha256(uri)
            return json_reply({"uri": uri, "sha256": digest, "size": product.size})
        if route in ("reprocess", "product") and method == "POST":
            return self._alter_product(route)
        if route == "product" and method == "GET":
            try:
                return json_reply(self.server.catalog.describe(self.query.get("uri", [""])[0]))
            except KeyError as exc:
                return json_reply({"error": f"unknown uri {exc}"}, status=404)
        return json_reply({"error": f"no admin route {method} {route}"}, status=404)

    def _alter_product(self, route: str) -> Reply:
        """``POST /__twin__/reprocess {"uri", "resize": 0, "copies": "both"}`` and ``POST /__twin__/product
        {"uri", "size_error": N}`` / ``{"uri", "dynamic": true}``; both answer :meth:`Catalog.describe`."""
        catalog = self.server.catalog
        try:
            spec = json.loads(self.body or b"null")
            uri = spec["uri"]
            if route == "reprocess":
                return json_reply(catalog.reprocess(uri, int(spec.get("resize", 0)), spec.get("copies", "both")))
            if "size_error" in spec:
                catalog.misreport_size(uri, int(spec["size_error"]))
            if spec.get("dynamic"):
                catalog.make_dynamic(uri)
            return json_reply(catalog.describe(uri))
        except KeyError as exc:
            return json_reply({"error": f"unknown uri or missing field: {exc}"}, status=404)
        except (AttributeError, TypeError, ValueError) as exc:
            return json_reply({"error": str(exc)}, status=400)

    # ---- endpoints -------------------------------------------------------------------------------------

    def _invoke(self) -> None:
        """``POST /api/v0/invoke``: parse the Mashup request; malformed bodies get HTTP 400."""
        form = self._form()
        try:
            raw_request = form["request"][0]
            request = json.loads(raw_request)
            if not isinstance(request, dict):
                raise ValueError("request is not a JSON object")
        except (KeyError, IndexError, ValueError) as exc:
            self.server.stats.count_request(["invoke"])
            self._write(html_reply(400, "Bad Request", f"Malformed Mashup request: {exc}"), ["invoke"])
            return
        service = str(request.get("service", ""))
        stat_keys = ["invoke", f"invoke:{service}"]
        self._log_request("invoke", service=service, params=request.get("params"), page=request.get("page"),
                          pagesize=request.get("pagesize"))
        if service in SLOW_QUERY_SERVICES:
            slow = self.server.faults.slow_query(query_key(request), service)
            if slow is not None and slow[1] > 0:
                if slow[0] == "executing":
                    self.server.stats.count_request(stat_keys)
                    self._write(self._executing_reply(request), stat_keys)
                    return
                self.server.faults.hold(slow[1])
        polls_left = self.server.faults.executing_polls_left(raw_request)
        if polls_left:
            self.server.stats.count_request(stat_keys)
            self._write(self._executing_reply(request), stat_keys)
            return
        if polls_left == 0:
            self.server.stats.count_request(stat_keys)
            self._write(self._invoke_reply(request), stat_keys)
            return

        def build(fault: Fault | None) -> Reply:
            if fault is not None and fault.kind == "executing":
                self.server.faults.start_executing(raw_request, int(fault.number("polls", 1)))
                return self._executing_reply(request)
            if fault is not None and fault.kind in ("mutate_rows", "endless_paging", "crafted_names"):
                return self._hostile_invoke_reply(request, fault)
            if fault is not None and fault.kind == "error_timeout":
                return json_reply({"status": "ERROR", "msg": str(fault.params.get("msg", TIMEOUT_MESSAGE)),
                                   "data": [], "fields": []})
            if fault is not None and fault.kind == "page_shift":
                return self._page_shift_reply(request, str(fault.params.get("mode", "insert")))
            return self._invoke_reply(request, in_memory=fault is not None and fault.kind in BODY_KINDS)

        kinds = ["executing", "mutate_rows", "endless_paging", "crafted_names", "error_timeout"]
        if request_page(request) >= 2:
            kinds.append("page_shift")
        self._serve("invoke", service, stat_keys, build, extra_kinds=kinds)

    def _executing_reply(self, request: dict) -> Reply:
        return json_reply(
            {
                "status": "EXECUTING",
                "msg": "",
                "data": [],
                "fields": [],
                "paging": {
                    "page": request.get("page", 1),
                    "pageSize": request.get("pagesize", 0),
                    "pagesFiltered": 0,
                    "rows": 0,
                    "rowsFiltered": 0,
                    "rowsTotal": 0,
                },
            }
        )

    def _invoke_reply(self, request: dict, in_memory: bool = False) -> Reply:
        """The service's answer (streamed when its rows are generated on demand, unless ``in_memory``)."""
        try:
            payload = self._run_service(request)
            if in_memory and "data" in payload:
                payload["data"] = list(payload["data"])
            return invoke_reply(payload)
        except InvokeError as exc:
            return json_reply({"status": "ERROR", "msg": str(exc), "data": [], "fields": []})

    def _page_shift_reply(self, request: dict, mode: str) -> Reply:
        """Page ``request.page`` (>= 2) of an answer whose rows moved since page 1 was served: ``insert``
        answers as if one row had been inserted at the front (this page starts with the previous page's
        last row, rowsFiltered is one more, the new row is never seen), ``drop`` answers no rows while
        paging still announces them."""
        try:
            payload = self._run_service(request, shift=1 if mode == "insert" else 0)
        except InvokeError as exc:
            return json_reply({"status": "ERROR", "msg": str(exc), "data": [], "fields": []})
        if mode == "drop" and "paging" in payload:
            payload["data"] = []
            payload["paging"]["rows"] = 0
        return invoke_reply(payload)

    def _hostile_invoke_reply(self, request: dict, fault: Fault) -> Reply:
        """The answer to ``request`` rewritten as the hostile fault asks: rows with wrong types or missing
        fields (``mutate_rows``, param ``mode``), paging claiming ``pages`` pages whose pages past the
        real end repeat the real ones (``endless_paging``), hostile names (``crafted_names``, param
        ``field``). Service errors stay errors."""
        try:
            payload = self._run_service(request)
            if "data" in payload:
                payload["data"] = list(payload["data"])
            if fault.kind == "endless_paging":
                real_pages = int((payload.get("paging") or {}).get("pagesFiltered") or 0)
                page = int((payload.get("paging") or {}).get("page") or 1)
                if real_pages and page > real_pages:
                    payload = self._run_service({**request, "page": (page - 1) % real_pages + 1})
                    payload["paging"]["page"] = page
                payload = endless_paging(payload, int(fault.number("pages", ENDLESS_PAGES)))
            elif fault.kind == "mutate_rows":
                payload = mutate_rows(payload, str(fault.params.get("mode", "mixed")))
            else:
                payload = crafted_rows(payload, str(fault.params.get("field", "productFilename")))
        except InvokeError as exc:
            return json_reply({"status": "ERROR", "msg": str(exc), "data": [], "fields": []})
        return invoke_reply(payload)

    def _run_service(self, request: dict, shift: int = 0) -> dict:
        """The COMPLETE answer to ``request`` (raises InvokeError for service errors); ``shift`` rows are
        counted as inserted before the first one (the ``page_shift`` fault)."""
        service = request.get("service")
        params = request.get("params", {})
        if not isinstance(params, dict):
            raise InvokeError("params must be a JSON object.")
        if service == NAME_LOOKUP:
            name = params.get("input")
            if not isinstance(name, str) or not name.strip():
                raise InvokeError("Mast.Name.Lookup needs params.input.")
            entries = self.server.catalog.resolve_name(name)
            return {
                "resolvedCoordinate": [dict(entry, searchString=name.lower()) for entry in entries[:1]],
                "status": "",
            }
        if service == PRODUCTS:
            obsids = params.get("obsid")
            if obsids is None or str(obsids).strip() == "":
                raise InvokeError("Mast.Caom.Products needs params.obsid.")
            sources = [self.server.catalog.product_rows(obsid.strip())
                       for obsid in str(obsids).split(",") if obsid.strip()]
            return self._table(request, chained_rows(sources), PRODUCT_FIELDS, shift)
        if service in (FILTERED, FILTERED_POSITION):
            filters = params.get("filters", [])
            if not isinstance(filters, list):
                raise InvokeError("params.filters must be a list.")
            compiled = [RowFilter(spec, self.server.observation_columns) for spec in filters]
            rows = [row for row in self.server.observations if all(flt.matches(row) for flt in compiled)]
            if service == FILTERED_POSITION:
                if "position" not in params:
                    raise InvokeError("Mast.Caom.Filtered.Position needs params.position.")
                rows = self._within(rows, *parse_position(params["position"]))
            return self._select(request, params, rows, shift)
        if service == CONE:
            try:
                ra, dec, radius = (float(params[name]) for name in ("ra", "dec", "radius"))
            except (KeyError, TypeError, ValueError):
                raise InvokeError("Mast.Caom.Cone needs numeric params ra, dec and radius.") from None
            return self._select(request, params, self._within(self.server.observations, ra, dec, radius), shift)
        raise InvokeError(f"Unknown service: {service}")

    def _within(self, rows: list[dict], ra: float, dec: float, radius_deg: float) -> list[dict]:
        """Rows within ``radius_deg`` of (ra, dec), each with ``distance`` (arcsec) and ``objID1`` added."""
        selected = []
        for row in rows:
            if row.get("s_ra") is None or row.get("s_dec") is None:
                continue
            distance = great_circle_arcsec(ra, dec, float(row["s_ra"]), float(row["s_dec"]))
            if distance <= radius_deg * 3600.0:
                selected.append({**row, "objID1": row.get("objID"), "distance": distance})
        return selected

    def _select(self, request: dict, params: dict, rows: list[dict], shift: int = 0) -> dict:
        """Apply ``params.columns`` (``*``, ``COUNT_BIG(*)`` or a comma list) and page the result
        (``shift``: see :meth:`_table`)."""
        columns = str(params.get("columns", "*")).strip()
        if columns.replace(" ", "").upper() == COUNT_COLUMN:
            counted = [{"Column1": len(rows)}]
            return self._table(request, counted, [{"name": "Column1", "type": "string"}])
        if columns in ("*", ""):
            return self._table(
                request,
                rows,
                fields_for(rows, self.server.observations[0] if self.server.observations else None),
                shift,
            )
        wanted = [name.strip() for name in columns.split(",") if name.strip()]
        known = self.server.observation_columns | {"distance", "objID1"}
        unknown = [name for name in wanted if name not in known]
        if unknown:
            raise InvokeError(f"Invalid column name: {', '.join(unknown)}")
        projected = [{name: row.get(name) for name in wanted} for row in rows]
        return self._table(
            request, projected, [{"name": name, "type": field_type(name, rows)} for name in wanted], shift
        )

    def _table(self, request: dict, rows: Sequence[dict], fields: list[dict], shift: int = 0) -> dict:
        """A COMPLETE response holding page ``request.page`` of ``rows`` (``pagesize`` rows a page); its
        ``data`` is a list when ``rows`` is, else a lazy view generating the page's rows when sent.
        ``shift`` unseen rows are counted before the first row (pages after the first start earlier)."""
        total = len(rows) + shift
        try:
            page = int(request.get("page") or 1)
            page_size = int(request.get("pagesize") or max(total, 1))
        except (TypeError, ValueError):
            raise InvokeError("page and pagesize must be integers.") from None
        if page < 1 or page_size < 1:
            raise InvokeError("page and pagesize must be positive.")
        start = max(0, (page - 1) * page_size - shift)
        if isinstance(rows, list):
            data: Sequence[dict] = rows[start : start + page_size]
        else:
            data = ProductRows(max(0, min(page_size, len(rows) - start)), lambda index: rows[start + index])
        return {
            "status": "COMPLETE",
            "msg": "",
            "paging": {
                "page": page,
                "pageSize": page_size,
                "pagesFiltered": math.ceil(total / page_size),
                "rows": len(data),
                "rowsFiltered": total,
                "rowsTotal": total,
            },
            "fields": fields,
            "data": data,
        }

    def _columns_config(self, colconfig_id: str) -> Reply:
        try:
            config = self.server.catalog.column_config(colconfig_id)
        except KeyError:
            config = {}
        return json_reply(config or {})

    def _download(self, uri: str, fault: Fault | None) -> Reply:
        """``/api/v0.1/Download/file``: headers (ETag and Last-Modified of the HTTPS copy), 401, 404,
        If-Match / If-Unmodified-Since (412), If-Range, single ranges, 416."""
        catalog = self.server.catalog
        if fault is not None and fault.kind == "redirect":
            return self._redirect(uri, int(fault.number("hops", 1)), str(fault.params.get("to", "second")))
        hops_left = self.query.get(REDIRECT_HOP_PARAM, ["0"])[0]
        if hops_left.isdigit() and int(hops_left) > 0:
            target = self.query.get(REDIRECT_TARGET_PARAM, ["second"])[0]
            return self._redirect(uri, int(hops_left), target if target in self.server.peer_urls else "second")
        product = catalog.product(uri) if uri else None
        if product is None:
            return html_reply(404, "Not Found", f"File not found: {uri}")
        if not catalog.may_read(product, request_token(self.headers)):
            return html_reply(401, "Unauthorized", UNAUTHORIZED_MESSAGE)
        size = product.size
        revision = catalog.revision(uri)
        headers = [
            ("Content-Type", content_type_for(product.filename)),
            ("Content-Disposition", f'attachment; filename="{product.filename}"'),
            ("Last-Modified", http_date(product.mtime)),
        ]
        if not product.send_content_length:  # generated on the fly: no length, no validators, no ranges
            return Reply(200, headers, stream=(uri, 0, size), length_known=False, revision=revision)
        etag = catalog.etag(uri)
        headers += [("ETag", etag), ("Accept-Ranges", "bytes")]
        if precondition_failed(self.headers, etag, product.mtime):
            return html_reply(412, "Precondition Failed")
        range_header = self.headers.get("Range") if self.command == "GET" else None
        if range_header and not if_range_holds(self.headers.get("If-Range"), etag, product.mtime):
            range_header = None  # RFC 9110: a changed representation is sent whole
        wanted = parse_single_range(range_header, size) if range_header else None
        if wanted == "unsatisfiable":
            reply = html_reply(416, "Requested Range Not Satisfiable")
            reply.headers.append(("Content-Range", f"bytes */{size}"))
            return reply
        if wanted is None or (fault is not None and fault.kind == "ignore_range"):
            return Reply(200, headers, stream=(uri, 0, size), revision=revision)
        start, end = wanted
        body_start = start
        if fault is not None and fault.kind == "wrong_range":
            start, end = mismatched_range(start, end, size, int(fault.number("shift", 2880)))
            body_start = start
        elif fault is not None and fault.kind == "wrong_body":
            body_start = mismatched_range(start, end, size, int(fault.number("shift", 2880)))[0]
        headers.append(("Content-Range", f"bytes {start}-{end}/{size}"))
        return Reply(206, headers, stream=(uri, body_start, end - start + 1), revision=revision)

    def _redirect(self, uri: str, hops: int, target: str) -> Reply:
        """302 to the same download on listener ``target`` ("second": 127.0.0.2, "mast": the main one),
        with ``hops - 1`` redirects still to come there."""
        location = (f"{self.server.peer_urls[target]}{DOWNLOAD_PATH}?"
                    + urlencode({"uri": uri, REDIRECT_HOP_PARAM: hops - 1, REDIRECT_TARGET_PARAM: target}))
        reply = html_reply(302, "Found")
        reply.headers.append(("Location", location))
        return reply

    def _path_lookup(self, uris: list[str], fault: Fault | None = None) -> Reply:
        """The S3 path of each uri (404 entries for unknown or HTTP-only ones); hostile paths under the
        ``crafted_names`` fault."""
        catalog = self.server.catalog
        answer: dict[str, dict] = {}
        for uri in uris:
            product = catalog.product(uri)
            if product is not None and product.s3_key:
                answer[uri] = {"status_code": 200, "path": "/" + product.s3_key}
            else:
                answer[uri] = {"status_code": 404, "path": None}
        if fault is not None and fault.kind == "crafted_names":
            answer = crafted_paths(answer)
        return json_reply(answer)

    def _whoami(self) -> Reply:
        return json_reply(self.server.catalog.whoami(request_token(self.headers)))

    def _resolve(self, names: list[str]) -> Reply:
        """SANTA: first compatible resolver per name, all of them with resolveAll=true, or the one named
        by ``resolver``."""
        resolve_all = self.query.get("resolveAll", ["false"])[0].lower() == "true"
        resolver = self.query.get("resolver", [""])[0].upper()
        resolved = []
        for name in names:
            entries = [
                dict(entry, searchString=name.lower()) for entry in self.server.catalog.resolve_name(name)
            ]
            if not resolve_all:
                if resolver:
                    entries = [
                        entry for entry in entries if str(entry.get("resolver", "")).upper() == resolver
                    ]
                entries = entries[:1]
            resolved.extend(entries)
        return json_reply({"resolvedCoordinate": resolved, "status": ""})
