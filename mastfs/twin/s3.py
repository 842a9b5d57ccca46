"""S3 side of the MAST twin: bucket ``stpubdata`` on loopback, anonymous read-only, backed by the catalog.

moto's S3 WSGI app answers everything S3 (ListObjectsV2, HeadObject, errors, ...), so the protocol is
the real one. In front of it sits :class:`S3Gateway`, a small WSGI middleware that

* registers catalog products in moto lazily (:class:`LazyCatalogKey`: size, ETag and LastModified come
  from the catalog; the bytes are never stored) when a request first names them or lists their prefix;
* serves GetObject (whole object or one Range) for catalog keys itself, streaming ``Catalog.read`` in
  1 MiB pieces: O(range) time and memory whatever the object size (stock moto materialises the object);
* refuses writes (403 AccessDenied, like the public bucket);
* applies the "s3" faults and counts requests and body bytes actually written
  ("s3" and "s3:<Operation>").

Each running twin owns a private moto account (selected with moto's ``x-moto-account-id`` header), so
several twins can live in one process without sharing a bucket.
"""

from __future__ import annotations

import bisect
import contextlib
import contextvars
import datetime
import itertools
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from email.utils import parsedate_to_datetime
from urllib.parse import parse_qs
from xml.sax.saxutils import escape

from moto.core.utils import rfc_1123_datetime
from moto.moto_server.werkzeug_app import MotoRequestHandler, create_backend_app
from moto.s3.models import FakeBucket, FakeKey, get_canned_acl, s3_backends
from werkzeug.serving import ThreadedWSGIServer

from mastfs.twin.catalog import Catalog, TwinProduct
from mastfs.twin.connections import ResetRegistry, TrackedConnections
from mastfs.twin.faults import (
    BODY_KINDS,
    DRIP_BYTES_PER_SECOND,
    GENERIC_KINDS,
    NGINX_504_PAGE,
    RANGE_KINDS,
    Fault,
    FaultController,
    TwinStats,
    drip,
)
from mastfs.twin.http_api import CHUNK_SIZE, mismatched_range, parse_single_range
from mastfs.twin.link import Link

logger = logging.getLogger(__name__)

BUCKET = "stpubdata"
REGION = "us-east-1"
PARTITION = "aws"
OBJECT_CONTENT_TYPE = "binary/octet-stream"
ADMIN_PING_PATH = "/__twin__/ping"
LAZY_LISTING_LIMIT = 10_000
"""Most on-demand catalog keys one listing registers in moto (one visit folder of the mosaic program)."""

_account_numbers = itertools.count(int.from_bytes(os.urandom(3), "big") * 1000)

S3_ERRORS = {
    400: ("InvalidRequest", "Invalid Request"),
    403: ("AccessDenied", "Access Denied"),
    404: ("NoSuchKey", "The specified key does not exist."),
    412: ("PreconditionFailed", "At least one of the pre-conditions you specified did not hold"),
    416: ("InvalidRange", "The requested range is not satisfiable"),
    500: ("InternalError", "We encountered an internal error. Please try again."),
    503: ("SlowDown", "Please reduce your request rate."),
}
STATUS_LINES = {
    200: "200 OK",
    206: "206 Partial Content",
    304: "304 Not Modified",
    403: "403 Forbidden",
    412: "412 Precondition Failed",
    416: "416 Requested Range Not Satisfiable",
    500: "500 Internal Server Error",
    503: "503 Service Unavailable",
    504: "504 Gateway Time-out",
}


def naive_utc(timestamp: float) -> datetime.datetime:
    """``timestamp`` as the naive UTC datetime moto keeps in ``FakeKey.last_modified``."""
    return datetime.datetime.fromtimestamp(int(timestamp), tz=datetime.timezone.utc).replace(tzinfo=None)


_LISTING: contextvars.ContextVar[bool] = contextvars.ContextVar("twin_s3_listing", default=False)
"""True while moto renders a bucket listing (see :attr:`LazyCatalogKey.etag`)."""


class LazyCatalogKey(FakeKey):
    """A moto key whose size, ETag and LastModified come from a catalog product and whose bytes are read
    from the catalog only if moto itself ever asks for ``value`` (the gateway serves GetObject without
    it)."""

    def __init__(self, product: TwinProduct, catalog: Catalog, account_id: str, owner: str) -> None:
        self.uri = product.uri
        self.catalog = catalog
        super().__init__(
            name=product.s3_key,
            value=b"",
            account_id=account_id,
            region_name=REGION,
            bucket_name=BUCKET,
        )
        self.owner = owner
        self.acl = get_canned_acl("public-read")

    @property
    def product(self) -> TwinProduct:
        """The catalog product as its S3 copy stands now (reprocessing changes size, mtime, ETag)."""
        product = self.catalog.product(self.uri, "s3")
        assert product is not None
        return product

    @property
    def etag(self) -> str:
        """The S3 copy's real S3 ETag (content md5, or the multipart form), computed once per revision.
        In a listing, an ETag not computed yet is not computed there (that generates the objects: a
        listing of thousands took minutes): see :meth:`Catalog.listed_etag`."""
        if _LISTING.get():
            return self.catalog.listed_etag(self.uri, "s3")
        return self.catalog.etag(self.uri, "s3")

    @property
    def last_modified(self) -> datetime.datetime:
        return naive_utc(self.product.mtime)

    @last_modified.setter
    def last_modified(self, _value: datetime.datetime) -> None:
        pass  # moto stamps new keys with "now"; a catalog key's time is its copy's mtime

    @property
    def contentsize(self) -> int:
        return self.product.size

    @contentsize.setter
    def contentsize(self, _value: int) -> None:
        pass

    @property
    def value(self) -> bytes:
        """The whole object, read from the catalog (only moto-internal paths such as CopyObject use it)."""
        return self.catalog.read(self.uri, 0, self.product.size, copy="s3")

    @value.setter
    def value(self, new_value: bytes) -> None:
        if new_value:
            raise ValueError("catalog-backed S3 objects are read-only")

    @property
    def size(self) -> int:
        return self.product.size


def s3_error_body(code: str, message: str, request_id: str, **details: str) -> bytes:
    """An S3 XML error document."""
    extra = "".join(f"<{name}>{escape(str(value))}</{name}>" for name, value in details.items())
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{escape(message)}</Message>{extra}"
        f"<RequestId>{request_id}</RequestId><HostId>{request_id}</HostId></Error>"
    ).encode()


def operation_name(method: str, key: str, query: dict[str, list[str]]) -> str:
    """The S3 API operation a request is (GetObject, HeadObject, ListObjectsV2, ...), for the stats."""
    if not key:
        if method == "GET" and query.get("list-type") == ["2"]:
            return "ListObjectsV2"
        if method == "GET" and "versions" in query:
            return "ListObjectVersions"
        if method == "GET" and "location" in query:
            return "GetBucketLocation"
        if method == "GET" and not query:
            return "ListObjects"
        if method == "HEAD":
            return "HeadBucket"
        return f"{method.title()}Bucket"
    if method == "GET":
        return "GetObject" if set(query) <= {"x-id"} else "GetObjectSubresource"
    if method == "HEAD":
        return "HeadObject"
    return f"{method.title()}Object"


class S3Gateway:
    """WSGI middleware in front of moto's S3 app (see the module docstring)."""

    def __init__(
        self,
        catalog: Catalog,
        faults: FaultController,
        stats: TwinStats,
        resets: ResetRegistry,
        link: Link | None = None,
    ) -> None:
        self.catalog = catalog
        self.faults = faults
        self.stats = stats
        self.resets = resets
        self.link = link if link is not None else Link()
        self.owner = uuid.uuid4().hex
        self.account_id = f"{next(_account_numbers) % 10**12:012d}"
        self.moto_app = create_backend_app("s3")
        self.products = {product.s3_key: product for product in catalog.products() if product.s3_key}
        self._sorted_keys = sorted(self.products)
        self._registered: set[str] = set()
        self._register_lock = threading.Lock()
        backend = s3_backends[self.account_id][PARTITION]
        self.bucket = FakeBucket(name=BUCKET, account_id=self.account_id, region_name=REGION)
        backend.buckets[BUCKET] = self.bucket

    # ---- lazy registration -----------------------------------------------------------------------------

    def product(self, key: str) -> TwinProduct | None:
        """The catalog product stored under ``key`` (built or generated on demand), or None."""
        return self.products.get(key) or self.catalog.product_for_s3_key(key)

    def register(self, keys: Iterable[str]) -> None:
        """Make the catalog keys ``keys`` exist in moto's bucket (idempotent)."""
        with self._register_lock:
            for key in keys:
                if key in self._registered:
                    continue
                product = self.product(key)
                if product is None:
                    continue
                self.bucket.keys[key] = LazyCatalogKey(product, self.catalog, self.account_id, self.owner)
                self._registered.add(key)

    def register_prefix(self, prefix: str) -> None:
        """Register every catalog key starting with ``prefix`` (before moto lists them). Keys generated on
        demand (the mosaic program's) are registered only when the prefix selects at most
        LAZY_LISTING_LIMIT of them (one visit folder); a wider listing leaves them out (logged)."""
        start = bisect.bisect_left(self._sorted_keys, prefix)
        stop = start
        while stop < len(self._sorted_keys) and self._sorted_keys[stop].startswith(prefix):
            stop += 1
        self.register(self._sorted_keys[start:stop])
        generated = self.catalog.lazy_s3_keys(prefix, LAZY_LISTING_LIMIT)
        if generated is None:
            logger.warning("twin s3: listing %r leaves out the mosaic program's generated keys (too many)", prefix)
        else:
            self.register(generated)

    def dispose(self) -> None:
        """Drop this gateway's bucket and keys from moto (the twin is stopping)."""
        backend = s3_backends[self.account_id][PARTITION]
        backend.buckets.pop(BUCKET, None)
        if s3_backends.bucket_accounts.get(BUCKET) == (PARTITION, self.account_id):
            s3_backends.bucket_accounts.pop(BUCKET, None)
        for _name, versions in self.bucket.keys.lists():
            for key in versions:
                key.dispose()
        LazyCatalogKey.instances_tracked[:] = [
            key for key in LazyCatalogKey.instances_tracked if getattr(key, "owner", None) != self.owner
        ]
        FakeBucket.instances_tracked[:] = [
            bucket for bucket in FakeBucket.instances_tracked if bucket is not self.bucket
        ]

    # ---- WSGI ------------------------------------------------------------------------------------------

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == ADMIN_PING_PATH:
            start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
            return [b"ok"]
        method = environ["REQUEST_METHOD"]
        bucket, key = self._bucket_and_key(environ, path)
        query = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
        stat_keys = ["s3", f"s3:{operation_name(method, key, query)}"]
        self.stats.count_request(stat_keys)
        request_id = uuid.uuid4().hex[:16].upper()
        environ["HTTP_X_MOTO_ACCOUNT_ID"] = self.account_id

        product = self.product(key) if bucket == BUCKET and key else None
        if product is not None and not self._in_cloud(product.uri):
            product = None  # a product made dynamic left the bucket
        is_catalog_get = method == "GET" and product is not None and set(query) <= {"x-id"}
        is_generated_head = (method == "HEAD" and product is not None and key not in self.products
                             and set(query) <= {"x-id"})
        kinds = set(GENERIC_KINDS)
        if is_catalog_get:
            kinds |= BODY_KINDS
            if environ.get("HTTP_RANGE"):
                kinds |= RANGE_KINDS
        terminal = None
        for fault in self.faults.take("s3", key or bucket, kinds):
            if fault.kind == "latency":
                time.sleep(fault.number("seconds", 1.0))
            else:
                terminal = fault
        if terminal is not None and terminal.kind == "stall":
            self.faults.stall()
            self.resets.mark(environ["werkzeug.socket"])
            raise ConnectionAbortedError("stalled request released")
        if terminal is not None and terminal.kind not in BODY_KINDS | RANGE_KINDS:
            status, headers, body = self._fault_response(terminal, request_id)
        elif method not in ("GET", "HEAD"):
            status, headers, body = self._error(403, request_id)
        elif is_generated_head:  # answered here: registering in moto would keep a key per HEAD
            status, headers, _ = self._get_object(environ, product.uri, request_id, None)
        elif is_catalog_get:
            status, headers, body = self._get_object(environ, product.uri, request_id, terminal)
            if status not in (200, 206):  # a product body waits for its first byte in Link.pace
                self.link.delay_metadata()
            length = int(dict(headers).get("Content-Length", 0))
            start_response(STATUS_LINES.get(status, f"{status} Error"), headers)
            return self._counted(body, stat_keys, environ, terminal, length)
        else:
            if product is not None:
                self.register([key])
            elif bucket == BUCKET and not key:
                self.register_prefix(query.get("prefix", [""])[0])
            self.link.delay_metadata()
            listing = _LISTING.set(not key)
            try:
                answer = self.moto_app(environ, start_response)
            finally:
                _LISTING.reset(listing)
            return self._counted(answer, stat_keys, environ)
        self.link.delay_metadata()
        start_response(STATUS_LINES.get(status, f"{status} Error"), headers)
        if method == "HEAD":
            return []
        return self._counted(body, stat_keys, environ)

    @staticmethod
    def _bucket_and_key(environ: dict, path: str) -> tuple[str, str]:
        """(bucket, key) of a path-style or virtual-host-style request; PATH_INFO is latin-1 decoded."""
        try:
            path = path.encode("latin-1").decode("utf-8")
        except (UnicodeEncodeError, UnicodeDecodeError):
            pass
        host = environ.get("HTTP_HOST", "")
        if host.startswith(BUCKET + "."):
            return BUCKET, path.lstrip("/")
        bucket, _, key = path.lstrip("/").partition("/")
        return bucket, key

    def _error(self, status: int, request_id: str, **details: str) -> tuple[int, list, Iterable[bytes]]:
        code, message = S3_ERRORS.get(status, ("InternalError", "We encountered an internal error."))
        body = s3_error_body(code, message, request_id, **details)
        headers = [
            ("Content-Type", "application/xml"),
            ("Content-Length", str(len(body))),
            ("x-amz-request-id", request_id),
            ("x-amz-id-2", request_id),
        ]
        return status, headers, [body]

    def _fault_response(self, fault: Fault, request_id: str) -> tuple[int, list, Iterable[bytes]]:
        if fault.kind == "html_504":
            headers = [("Content-Type", "text/html"), ("Content-Length", str(len(NGINX_504_PAGE)))]
            return 504, headers, [NGINX_504_PAGE]
        if fault.kind == "unauthorized":
            return self._error(403, request_id)
        status, headers, body = self._error(int(fault.number("code", 503)), request_id)
        if "retry_after" in fault.params:
            headers.append(("Retry-After", str(int(fault.number("retry_after", 1)))))
        return status, headers, body

    def _in_cloud(self, uri: str) -> bool:
        """Whether the product ``uri`` is in the bucket now (a product made dynamic is not)."""
        product = self.catalog.product(uri, "s3")
        return product is not None and product.s3_key is not None

    def _get_object(
        self, environ: dict, uri: str, request_id: str, fault: Fault | None
    ) -> tuple[int, list, Iterable[bytes]]:
        """GetObject of a catalog key (its S3 copy as it stands now): conditionals, one Range, a body
        streamed from the revision the headers describe."""
        revision = self.catalog.revision(uri, "s3")
        product = self.catalog.product(uri, "s3")
        assert product is not None
        size = product.size
        etag = self.catalog.etag(uri, "s3")
        last_modified = naive_utc(product.mtime)
        headers = [
            ("Content-Type", OBJECT_CONTENT_TYPE),
            ("ETag", etag),
            ("Last-Modified", rfc_1123_datetime(last_modified)),
            ("Accept-Ranges", "bytes"),
            ("x-amz-request-id", request_id),
            ("x-amz-id-2", request_id),
        ]
        precondition = self._precondition(environ, etag, last_modified)
        if precondition == 412:
            return self._error(412, request_id, Condition="If-Match")
        if precondition == 304:
            return 304, headers, []
        wanted = (
            parse_single_range(environ.get("HTTP_RANGE", ""), size) if environ.get("HTTP_RANGE") else None
        )
        if wanted == "unsatisfiable":
            status, error_headers, body = self._error(
                416, request_id, RangeRequested=environ["HTTP_RANGE"], ActualObjectSize=str(size)
            )
            error_headers.append(("Content-Range", f"bytes */{size}"))
            return status, error_headers, body
        if wanted is None or (fault is not None and fault.kind == "ignore_range"):
            headers.append(("Content-Length", str(size)))
            return 200, headers, self._stream(uri, 0, size, revision)
        start, end = wanted
        body_start = start
        if fault is not None and fault.kind == "wrong_range":
            start, end = mismatched_range(start, end, size, int(fault.number("shift", 2880)))
            body_start = start
        elif fault is not None and fault.kind == "wrong_body":
            body_start = mismatched_range(start, end, size, int(fault.number("shift", 2880)))[0]
        headers.append(("Content-Range", f"bytes {start}-{end}/{size}"))
        headers.append(("Content-Length", str(end - start + 1)))
        return 206, headers, self._stream(uri, body_start, end - start + 1, revision)

    @staticmethod
    def _precondition(environ: dict, etag: str, last_modified: datetime.datetime) -> int | None:
        """412, 304 or None from If-Match / If-Unmodified-Since / If-None-Match / If-Modified-Since."""

        def parse_date(text: str) -> datetime.datetime | None:
            try:
                return parsedate_to_datetime(text).astimezone(datetime.timezone.utc).replace(tzinfo=None)
            except (TypeError, ValueError):
                return None

        if_match = environ.get("HTTP_IF_MATCH")
        if if_match and if_match.strip() not in (etag, etag.strip('"'), "*"):
            return 412
        since = parse_date(environ.get("HTTP_IF_UNMODIFIED_SINCE", ""))
        if since is not None and last_modified > since:
            return 412
        if_none_match = environ.get("HTTP_IF_NONE_MATCH")
        if if_none_match and if_none_match.strip() in (etag, etag.strip('"'), "*"):
            return 304
        modified_since = parse_date(environ.get("HTTP_IF_MODIFIED_SINCE", ""))
        if modified_since is not None and last_modified <= modified_since:
            return 304
        return None

    def _stream(self, uri: str, offset: int, length: int, revision: int) -> Iterator[bytes]:
        """Bytes [offset, offset+length) of the S3 copy's ``revision`` in pieces of at most CHUNK_SIZE,
        paced by the link."""
        return self.link.pace(self.catalog.pieces(uri, offset, length, CHUNK_SIZE, copy="s3", revision=revision))

    def _counted(
        self,
        body: Iterable[bytes],
        stat_keys: list[str],
        environ: dict,
        fault: Fault | None = None,
        length: int = 0,
    ) -> Iterator[bytes]:
        """Yield ``body``, counting each piece as it is handed to the server and taking it back if the
        server fails to write it (it then closes this generator at the yield). A reset/truncate ``fault`` cuts a body of ``length`` bytes short:
        reset then closes the connection with an RST, truncate with an orderly close; a drip ``fault`` sends
        it at its ``bytes_per_second``."""
        limit = None
        if fault is not None and fault.kind == "reset":
            limit = min(length, int(fault.number("after_bytes", 0)))
        elif fault is not None and fault.kind == "truncate":
            limit = min(max(0, length - 1), int(fault.number("after_bytes", length // 2)))
        sent = 0
        pieces = body
        if fault is not None and fault.kind == "drip":
            pieces = drip(body, fault.number("bytes_per_second", DRIP_BYTES_PER_SECOND))
        try:
            for piece in pieces:
                if limit is not None:
                    piece = piece[: limit - sent]
                if piece:
                    self.stats.count_bytes(stat_keys, len(piece))
                    try:
                        yield piece
                    except GeneratorExit:
                        self.stats.count_bytes(stat_keys, -len(piece))
                        raise
                    sent += len(piece)
                if limit is not None and sent >= limit:
                    break
        finally:
            close = getattr(body, "close", None)
            if close is not None:
                close()
        if fault is not None and fault.kind == "reset":
            self.resets.mark(environ["werkzeug.socket"])
            raise ConnectionResetError("twin fault: reset")
        if fault is not None and fault.kind == "truncate":
            raise ConnectionAbortedError("twin fault: truncate")  # the server ends the connection (FIN)


class TwinS3RequestHandler(MotoRequestHandler):
    """moto's request handler with HTTP/1.1 keep-alive, as S3 keeps connections open (werkzeug's own
    ``run_wsgi`` closes every connection after one response), logging to our logger instead of werkzeug's
    stderr handler. The connection ends after a request that carried a body (it may be left unread), a
    ``Connection: close`` request, an error after the status line, or a request the gateway aborted
    (reset or released stall)."""

    server: S3Server
    protocol_version = "HTTP/1.1"

    def handle_one_request(self) -> None:
        super().handle_one_request()
        if self.server.resets.is_marked(self.connection):
            self.close_connection = True

    def run_wsgi(self) -> None:
        if self.headers.get("Transfer-Encoding") or int(self.headers.get("Content-Length") or 0) > 0:
            self.close_connection = True
        if self.headers.get("Expect", "").lower().strip() == "100-continue":
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.environ = environ = self.make_environ()
        response: list = []  # [status, headers] from start_response
        sent = chunked = False

        def start_response(status: str, headers: list, exc_info: object = None) -> Callable[[bytes], None]:
            if sent and exc_info:
                raise exc_info[1].with_traceback(exc_info[2])  # type: ignore[index]
            response[:] = [status, headers]
            return write

        def write(data: bytes) -> None:
            nonlocal sent, chunked
            if not sent:
                sent = True
                code, _, message = response[0].partition(" ")
                self.send_response(int(code), message)
                names = set()
                for name, value in response[1]:
                    self.send_header(name, value)
                    names.add(name.lower())
                chunked = ("content-length" not in names and self.command != "HEAD"
                           and int(code) >= 200 and int(code) not in (204, 304))
                if chunked:
                    self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
            if data and chunked:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            elif data:
                self.wfile.write(data)

        body: Iterable[bytes] = []
        try:
            body = self.server.app(environ, start_response)
            for data in body:
                write(data)
            write(b"")
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (ConnectionError, TimeoutError) as exc:
            logger.debug("twin s3: connection dropped: %s", exc)
            self.close_connection = True
        except Exception:
            logger.exception("twin s3: error while answering %s %s", self.command, self.path)
            self.close_connection = True
            if not sent:
                with contextlib.suppress(OSError):
                    self.send_response(500)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
        finally:
            close = getattr(body, "close", None)
            if close is not None:
                close()

    def log(self, type: str, message: str, *args: object) -> None:
        logger.debug("twin s3 %s: " + message, self.address_string(), *args)


class S3Server(TrackedConnections, ThreadedWSGIServer):
    """werkzeug's threaded WSGI server running an :class:`S3Gateway`; closes marked sockets with RST."""

    def __init__(self, host: str, port: int, gateway: S3Gateway, resets: ResetRegistry) -> None:
        self.track_connections(resets)
        super().__init__(host, port, gateway, handler=TwinS3RequestHandler)

    def log(self, type: str, message: str, *args: object) -> None:
        logger.debug("twin s3 server %s: " + message, type, *args)
