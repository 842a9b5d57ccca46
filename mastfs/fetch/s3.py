"""S3Fetcher: verified byte ranges of MAST's cloud copies (bucket ``stpubdata``), anonymous boto3 reads.

boto3 blocks, so each block is one worker-thread hop (``get_object`` plus reading the block's bytes)
under the fetcher's own CapacityLimiter of ``settings.transfers`` threads. HeadObject (the version an
``open`` pins) has a limiter of its own (:data:`HEAD_THREADS`), so opens never queue behind bulk
transfers, even a dripping server's. botocore does not retry (``total_max_attempts=1``): the one
:class:`~mastfs.retry.RetryPolicy` does. botocore and urllib3
exceptions are translated into mastfs errors inside the thread.

An abandoned hop (its caller cancelled, e.g. at the deadline) ends at once: the trio side shuts the
response's socket down, which wakes the thread's blocked read, and the thread reads in bounded chunks,
checking between them whether it was abandoned. Before the response headers arrive there is no socket to
shut: botocore's read timeout (at most :data:`READ_TIMEOUT_MAX` seconds) bounds that wait. So a dripping
server cannot keep a worker thread, or the limiter slot it holds, past its request.
"""

from __future__ import annotations

import http.client
import logging
import socket
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

import boto3
import botocore.exceptions
import trio
import urllib3.exceptions
from botocore import UNSIGNED
from botocore.config import Config

from ..config import Settings
from ..errors import NotFound, Retryable
from ..httpwire import check_content_range, error_for_status, parse_retry_after
from ..retry import RetryPolicy
from ..versions import ObjectVersion, VersionChanged, from_s3
from . import check_bounds

log = logging.getLogger(__name__)

_MISSING_CODES = {"NoSuchKey", "NoSuchBucket", "NotFound", "404", "AccessDenied", "403"}
_RETRYABLE_CODES = {"SlowDown", "InternalError", "ServiceUnavailable"}
_CHUNK = 256 * 1024
"""Most bytes one blocking read of a body asks for; an abandoned hop notices between two reads."""
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT_MAX = 5.0
"""botocore's read timeout is half the deadline, but never more than this: it bounds how long a hop
abandoned before its response headers arrived can keep its thread."""
HEAD_THREADS = 4
"""Worker threads (and pooled connections) for HeadObject, apart from the ``transfers`` of bodies."""


class S3Fetcher:
    """Ranged reads of ``settings.bucket`` at ``settings.s3_endpoint`` (AWS when empty) in
    ``settings.region``, unsigned. ``policy`` defaults to one built from ``settings.retries`` and
    ``settings.deadline``. The boto3 client is built (in a worker thread) by :meth:`prepare` or on first
    use, not here.
    """

    def __init__(self, settings: Settings, policy: RetryPolicy | None = None) -> None:
        self._bucket = settings.bucket
        self._endpoint = settings.s3_endpoint or None
        self._region = settings.region
        self._transfers = max(1, settings.transfers)
        self._policy = policy or RetryPolicy.from_settings(settings)
        self._limiter = trio.CapacityLimiter(self._transfers)
        self._head_limiter = trio.CapacityLimiter(HEAD_THREADS)
        self._client: Any = None
        self._client_lock = trio.Lock()

    def location(self, key: str) -> str:
        """``s3://<bucket>/<key>`` (for users: ``user.mastfs.source``)."""
        return f"s3://{self._bucket}/{key}"

    async def stat(self, key: str) -> ObjectVersion:
        """The version of object ``key`` now (HeadObject with ``ChecksumMode=ENABLED``: size, ETag,
        VersionId, LastModified, additional checksums). Raises like :meth:`fetch_blocks`."""
        client = await self._get_client()
        where = self.location(key)

        def head() -> ObjectVersion:
            try:
                return from_s3(client.head_object(Bucket=self._bucket, Key=key, ChecksumMode="ENABLED"))
            except botocore.exceptions.ClientError as exc:
                raise _translate_client_error(exc, where) from exc
            except (botocore.exceptions.BotoCoreError, urllib3.exceptions.HTTPError, OSError) as exc:
                raise Retryable(f"{where}: {type(exc).__name__}: {exc}") from exc

        async def once() -> ObjectVersion:
            return await trio.to_thread.run_sync(head, limiter=self._head_limiter, abandon_on_cancel=True)

        return await self._policy.run(once, what=f"version of {where}")

    async def fetch_blocks(self, key: str, bounds: Sequence[int], deliver: Callable[[bytes], Awaitable[None]],
                           version: ObjectVersion | None = None) -> None:
        """Read the consecutive blocks ``[bounds[i], bounds[i+1])`` of ``key`` with one GetObject (more
        only after failures), awaiting ``deliver(block)`` for each, in order, as soon as it is read (the
        next block is read after ``deliver`` returns, so it can apply backpressure).

        With ``version``, each GetObject carries ``IfMatch`` (and its VersionId) and its ETag must be the
        version's: a 412 or another ETag raises VersionChanged (not retried).

        Raises NotFound when the object is not in the bucket (the file is not in the cloud; a 401/403 on
        an anonymous read means the same), BadResponse on 416 or another client error; retries
        408/425/429/5xx, throttling, timeouts, resets, short bodies and wrong Content-Range under the
        policy, then raises Unavailable. On cancellation the worker thread is abandoned and its socket
        shut down, so the thread and its limiter slot are free within moments (see the module docstring).

        One worker-thread hop per block. A retried failure resumes at the first
        block not yet delivered, and the policy's attempts and deadline apply to each block. Raises
        ValueError on empty or unordered bounds.
        """
        check_bounds(bounds)
        client = await self._get_client()
        run = _Run(key, bounds, version)
        try:
            while run.position < len(bounds) - 1:
                what = f"{self.location(key)} [{bounds[run.position]}, {bounds[run.position + 1]})"
                block = await self._policy.run(lambda: self._next_block(client, run), what=what)
                run.position += 1
                await deliver(block)
        finally:
            if run.body is not None and not run.busy:
                run.body.close()  # closes the socket at once; a busy (abandoned) thread closes its own

    async def _next_block(self, client: Any, run: _Run) -> bytes:
        run.busy = True
        hop = _Hop(run.body)
        try:
            body, skip, block = await trio.to_thread.run_sync(
                self._next_block_sync, client, run.key, hop, run.skip, run.bounds[run.position],
                run.bounds[run.position + 1], run.bounds[-1], run.version, limiter=self._limiter,
                abandon_on_cancel=True)
        except trio.Cancelled:
            hop.abandon()  # the thread closes the body itself once its read fails
            raise
        except Exception:  # the thread closed the body: the next attempt opens a new request
            run.busy = False
            run.body, run.skip = None, 0
            raise
        run.busy = False
        run.body, run.skip = body, skip
        return block

    async def prepare(self) -> None:
        """Build the boto3 client now (about a tenth of a second of CPU), so that the first read does not
        wait for it. Never raises: a failure is logged and the first fetch tries again."""
        try:
            await self._get_client()
        except Exception as exc:
            log.debug("cannot build the S3 client yet: %s", exc)

    async def _get_client(self) -> Any:
        async with self._client_lock:
            if self._client is None:
                self._client = await trio.to_thread.run_sync(self._build_client, limiter=self._head_limiter)
        return self._client

    def _build_client(self) -> Any:
        read_timeout = max(1.0, min(READ_TIMEOUT_MAX, self._policy.deadline / 2))
        config = Config(
            signature_version=UNSIGNED,
            retries={"total_max_attempts": 1, "mode": "standard"},
            connect_timeout=min(CONNECT_TIMEOUT, read_timeout),
            read_timeout=read_timeout,
            max_pool_connections=self._transfers + HEAD_THREADS,
        )
        session = boto3.session.Session()
        return session.client("s3", region_name=self._region, endpoint_url=self._endpoint, config=config)

    def _next_block_sync(self, client: Any, key: str, hop: _Hop, skip: int, start: int, end: int,
                         run_end: int, version: ObjectVersion | None) -> tuple[Any, int, bytes]:
        """Worker thread: bytes [start, end) from the hop's open body (None: open a GetObject of
        [start, run_end) first, conditional on ``version``). Returns (body still open or None, bytes
        still to skip, block). Closes the body itself on failure, when abandoned, and after the run's
        last byte."""
        where = self.location(key)
        body = hop.body
        try:
            if body is None:
                conditions: dict[str, str] = {}
                if version is not None and version.etag:
                    conditions["IfMatch"] = version.etag
                    if version.version_id:
                        conditions["VersionId"] = version.version_id
                response = client.get_object(Bucket=self._bucket, Key=key, Range=f"bytes={start}-{run_end - 1}",
                                             **conditions)
                body = response["Body"]
                hop.attach(body)
                if version is not None:
                    version.check(response.get("ETag"), None, where)
                if response["ResponseMetadata"]["HTTPStatusCode"] == 200 and "ContentRange" not in response:
                    log.debug("%s: the server ignored the Range header; reading from its start", where)
                    skip = start
                else:
                    check_content_range(where, start, run_end, response.get("ContentRange"))
            while skip:
                hop.check()
                dropped = body.read(min(_CHUNK, skip))
                if not dropped:
                    raise Retryable(f"{where}: whole-object body ended before byte {start}")
                skip -= len(dropped)
            block = _read_exactly(body, end - start, hop)
            if len(block) != end - start:
                raise Retryable(f"{where}: body cut short ({len(block)} of {end - start} bytes)")
            if end == run_end:
                body.close()
                body = None
            return body, skip, block
        except BaseException as exc:
            if body is not None:
                body.close()
            if isinstance(exc, botocore.exceptions.ClientError):
                if exc.response.get("Error", {}).get("Code") == "PreconditionFailed" and version is not None:
                    raise VersionChanged(f"{where}: the object changed (412 to If-Match {version.etag})") from exc
                raise _translate_client_error(exc, where) from exc
            if isinstance(exc, botocore.exceptions.BotoCoreError | urllib3.exceptions.HTTPError | OSError
                          | http.client.HTTPException | ValueError | _Abandoned):
                raise Retryable(f"{where}: {type(exc).__name__}: {exc}") from exc
            raise


def _read_exactly(body: Any, length: int, hop: _Hop) -> bytes:
    """Up to ``length`` bytes of ``body`` (fewer only at its end), received straight into one buffer in
    chunks of at most :data:`_CHUNK` with an abandonment check before each. The bytes go from the socket
    into the block once: through botocore's and urllib3's ``read`` each 4 MiB block was copied four
    more times, holding the GIL. Raises OSError or http.client.HTTPException when the connection fails."""
    if length <= _CHUNK:
        hop.check()
        data: bytes = body.read(length)
        return data
    response = _wire_response(body)
    block = bytearray(length)
    filled = 0
    with memoryview(block) as view:
        while filled < length:
            hop.check()
            got = response.readinto(view[filled:filled + _CHUNK])
            if not got:
                break
            filled += got
    if filled < length:
        del block[filled:]
    if response.isclosed():  # the whole answer is read: its connection goes back to the pool, as after read()
        body._raw_stream.release_conn()
    return cast(bytes, block)  # the buffer itself, not a copy: blocks are only ever read (views read-only)


def _wire_response(body: Any) -> http.client.HTTPResponse:
    """The http.client response under a botocore StreamingBody (through urllib3's HTTPResponse)."""
    response = body._raw_stream._fp
    if not isinstance(response, http.client.HTTPResponse):
        raise TypeError(f"unexpected S3 body stream {type(response).__name__}")
    return response


class _Abandoned(Exception):
    """Raised in a worker thread whose caller gave up on it."""


class _Hop:
    """What the trio side and one worker thread share about that thread's work: the body being read,
    its socket, and whether the caller abandoned it. :meth:`abandon` (trio side) shuts the socket down so
    a read blocked in the thread returns at once."""

    def __init__(self, body: Any) -> None:
        self.body = body
        self._lock = threading.Lock()
        self._socket: socket.socket | None = _socket_of(body)
        self._abandoned = False

    def attach(self, body: Any) -> None:
        """Worker thread: the body of a new response (raises _Abandoned if the caller left meanwhile)."""
        with self._lock:
            self.body = body
            self._socket = _socket_of(body)
        self.check()

    def check(self) -> None:
        if self._abandoned:
            raise _Abandoned("the caller gave up on this transfer")

    def abandon(self) -> None:
        with self._lock:
            self._abandoned = True
            sock = self._socket
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _socket_of(body: Any) -> socket.socket | None:
    """The socket under a botocore StreamingBody (urllib3 response -> http.client response -> socket
    file), or None when it cannot be found (then only the read timeout ends an abandoned read)."""
    try:
        sock: socket.socket = body._raw_stream._fp.fp.raw._sock
    except AttributeError:
        return None
    return sock


class _Run:
    """The state of one :meth:`S3Fetcher.fetch_blocks` call (only touched on the trio thread)."""

    def __init__(self, key: str, bounds: Sequence[int], version: ObjectVersion | None) -> None:
        self.key = key
        self.bounds = bounds
        self.version = version
        self.position = 0
        self.body: Any = None
        self.skip = 0
        self.busy = False


def _translate_client_error(exc: botocore.exceptions.ClientError, where: str) -> Exception:
    """NotFound for an object the anonymous reader cannot have (missing or refused: not in the cloud),
    Retryable for throttling codes, else the shared HTTP status mapping."""
    error = exc.response.get("Error", {})
    code = str(error.get("Code", ""))
    metadata = exc.response.get("ResponseMetadata", {})
    status = int(metadata.get("HTTPStatusCode") or 0)
    if code in _MISSING_CODES or status in (401, 403, 404):
        return NotFound(f"{where}: not in the cloud ({code or status})")
    retry_after = parse_retry_after(metadata.get("HTTPHeaders", {}).get("retry-after"))
    if code in _RETRYABLE_CODES:
        return Retryable(f"{where}: {code}", retry_after=retry_after)
    if code == "InvalidRange":
        status = 416
    return error_for_status(status, f"{where}: {code or status} {error.get('Message', '')}".rstrip(),
                            has_token=False, retry_after=retry_after)
