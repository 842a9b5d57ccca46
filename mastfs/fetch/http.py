"""HttpFetcher: verified byte ranges of archive files from MAST's ``/api/v0.1/Download/file``.

Every request goes through the one :class:`~mastfs.retry.RetryPolicy`. A range is accepted only as a 206
whose Content-Range names exactly the requested bytes and whose body has exactly that length; a 200 means
the server ignored the Range header: its body is streamed once, the bytes before the wanted window are
skipped and reading stops at the window's end. The token travels only in the ``Authorization: token <t>``
header, never in a URL or a log line.

Redirects are followed here, not by httpx (which drops ``Authorization`` on a cross-host hop): at most
:data:`MAX_REDIRECTS` hops, the Range kept, and the token sent to a hop only when
:func:`~mastfs.auth.token_may_go_to` allows its host. A 401/403 makes the token's keeper re-read its
source; with a new token the request is made once more.

:meth:`HttpFetcher.fetch_blocks` reads several consecutive blocks with one request (per-request overhead
dominates at high bandwidth), handing each block over as soon as it is complete; a failure retries from
the first block not yet handed over.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from urllib.parse import quote

import httpcore
import httpx
import trio

from ..auth import TokenKeeper, token_may_go_to
from ..config import Settings
from ..errors import BadResponse, MastfsError, Retryable, Unauthorized
from ..httpwire import check_content_range, error_for_status, parse_retry_after
from ..retry import RetryPolicy
from ..versions import ObjectVersion, VersionChanged, content_range_total
from . import check_bounds

log = logging.getLogger(__name__)

_CLOSE_TIMEOUT = 2.0
MAX_REDIRECTS = 5
"""Most redirects one download follows; more is EIO (a loop, or a misconfigured front end)."""
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
RECEIVE_SIZE = 1024 * 1024
"""Bytes httpcore asks the socket for at once. Its default, 64 KiB, costs a round of h11 parsing and a
Python-level chunk per 64 KiB: receiving a 1 GiB file from the twin took a third less CPU (and ran 1.5x
as fast) with 1 MiB."""

# httpcore has no per-client option for this; it is a class attribute read on every receive. Raising it
# for the whole process also serves MAST API answers, which only gain from it.
httpcore.AsyncHTTP11Connection.READ_NUM_BYTES = RECEIVE_SIZE


class HttpFetcher:
    """Ranged downloads of MAST files over HTTPS.

    ``http`` is shared and owned by the caller (its timeouts and pool limits apply); ``mast_url`` is the
    MAST base URL; ``token`` the MAST API token (a fixed string, or the mount's :class:`TokenKeeper`) or
    None; ``policy`` bounds retries and time; ``token_hosts`` extends the hosts a redirect may carry the
    token to (see :func:`~mastfs.auth.token_may_go_to`).
    """

    def __init__(self, http: httpx.AsyncClient, mast_url: str, token: str | TokenKeeper | None, policy: RetryPolicy,
                 token_hosts: Sequence[str] = ()) -> None:
        self._http = http
        self._mast_url = mast_url
        self._url = mast_url.rstrip("/") + "/api/v0.1/Download/file"
        self._headers = {"Accept-Encoding": "identity"}
        if not isinstance(token, TokenKeeper):
            token = TokenKeeper(Settings.defaults(), token, "given" if token else "none", renewable=False)
        self._tokens = token
        self._token_hosts = tuple(token_hosts)
        self._policy = policy
        self.ignored_ranges = 0
        """How many answers ignored the Range header (200 instead of 206)."""

    def location(self, uri: str) -> str:
        """The download URL of ``uri`` (for users: ``user.mastfs.source``)."""
        return f"{self._url}?uri={quote(uri, safe=':/')}"

    async def fetch_blocks(self, uri: str, bounds: Sequence[int], deliver: Callable[[bytes], Awaitable[None]],
                           version: ObjectVersion | None = None) -> None:
        """Read the consecutive blocks ``[bounds[i], bounds[i+1])`` of ``uri`` with as few requests as
        possible, awaiting ``deliver(block)`` for each, in order, as soon as it is complete (the next
        block is read after ``deliver`` returns, so it can apply backpressure).

        With ``version``, every request carries its conditions (``If-Match``, else
        ``If-Unmodified-Since``) and every answer's ETag / Last-Modified must be the version's: a 412 or
        another validator raises VersionChanged (not retried).

        Raises Unauthorized (401/403), NotFound (404), BadResponse (416 or another unexpected answer) at
        once; retries 408/425/429/5xx, timeouts, resets, short bodies and wrong Content-Range answers under
        the policy, then raises Unavailable; cancellation closes the connection and propagates. A retried
        failure resumes at the first block not yet delivered; the policy's attempts and deadline apply to
        each block. Raises ValueError on empty or unordered bounds.
        """
        check_bounds(bounds)
        run = _Run(uri, bounds, version)
        try:
            while run.position < len(bounds) - 1:
                what = f"download of {uri} [{bounds[run.position]}, {bounds[run.position + 1]})"
                block = await self._policy.run(lambda: self._next_block(run), what=what)
                run.position += 1
                await deliver(block)
        finally:
            await run.close()

    async def fetch_whole(self, uri: str, most: int) -> bytes:
        """The whole file ``uri`` (for files that state no length: no ranges, no validators). Raises
        MastfsError when it is longer than ``most`` bytes; otherwise like :meth:`fetch_blocks`."""
        return await self._policy.run(lambda: self._whole_once(uri, most), what=f"download of {uri}")

    async def stat(self, uri: str) -> ObjectVersion:
        """The version of ``uri`` the server states now: size, ETag, Last-Modified.

        HEAD first; when it carries no Content-Length, a one-byte ranged GET reads the total from its
        Content-Range (size None when that fails too: only a whole download tells). Raises like
        :meth:`fetch_blocks`.
        """
        return await self._policy.run(lambda: self._stat_once(uri), what=f"version of {uri}")

    # ------------------------------------------------------------------ one attempt each

    async def _whole_once(self, uri: str, most: int) -> bytes:
        try:
            response = await self._send("GET", uri, {})
            try:
                if response.status_code != 200:
                    raise self._error_for(response, uri)
                parts, got = [], 0
                async for chunk in response.aiter_raw():
                    got += len(chunk)
                    if got > most:
                        raise MastfsError(f"{uri} states no length and is larger than the block cache ({most} "
                                          "bytes); raise --cache-size")
                    parts.append(chunk)
                return b"".join(parts)
            finally:
                await response.aclose()
        except httpx.TimeoutException as exc:
            raise Retryable(f"download of {uri}: timed out ({type(exc).__name__})") from exc
        except (httpx.TransportError, httpx.StreamError) as exc:
            raise Retryable(f"download of {uri}: {type(exc).__name__}: {exc}") from exc

    async def _stat_once(self, uri: str) -> ObjectVersion:
        try:
            response = await self._send("HEAD", uri, {})
            await response.aclose()
            if response.status_code != 200:
                raise self._error_for(response, uri)
            content_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
            if content_type == "text/html" and not uri.lower().endswith((".html", ".htm")):
                raise BadResponse(f"version of {uri}: answered an HTML page, not the file")
            length = response.headers.get("Content-Length")
            if length is not None and length.isdigit():
                return _version_of(response, int(length))
            probe = await self._send("GET", uri, {"Range": "bytes=0-0"})
            await probe.aclose()
            if probe.status_code == 206:
                return _version_of(probe, content_range_total(probe.headers.get("Content-Range")))
            if probe.status_code == 200:  # no length and no ranges: only a whole download tells
                return _version_of(probe, None)
            raise self._error_for(probe, uri)
        except httpx.TimeoutException as exc:
            raise Retryable(f"size of {uri}: timed out ({type(exc).__name__})") from exc
        except httpx.TransportError as exc:
            raise Retryable(f"size of {uri}: {type(exc).__name__}: {exc}") from exc

    async def _next_block(self, run: _Run) -> bytes:
        """The run's next block, opening (or re-opening) the request as needed; closes it on failure."""
        try:
            if run.response is None:
                await self._open(run)
            need = run.bounds[run.position + 1] - run.bounds[run.position]
            while run.buffered < need:
                await run.receive()
            block = run.take(need)
            if run.position + 2 == len(run.bounds):
                await run.finish()
            return block
        except (Retryable, httpx.TransportError, httpx.StreamError) as exc:
            await run.close()
            if isinstance(exc, httpx.TimeoutException):
                raise Retryable(f"download of {run.uri}: timed out ({type(exc).__name__})") from exc
            if isinstance(exc, httpx.HTTPError | httpx.StreamError):
                raise Retryable(f"download of {run.uri}: {type(exc).__name__}: {exc}") from exc
            raise
        except BaseException:
            await run.close()
            raise

    @property
    def _has_token(self) -> bool:
        return self._tokens.current() is not None

    async def _open(self, run: _Run) -> None:
        start, end = run.bounds[run.position], run.bounds[-1]
        conditions = run.version.conditions() if run.version is not None else {}
        response = await self._send("GET", run.uri, {**conditions, "Range": f"bytes={start}-{end - 1}"},
                                    attach=run.attach)
        if response.status_code == 412 and run.version is not None:
            raise VersionChanged(f"{run.uri}: the file changed on MAST (HTTP 412 to If-Match {run.version.etag})")
        if run.version is not None and response.status_code in (200, 206):
            run.version.check(response.headers.get("ETag"), response.headers.get("Last-Modified"), run.uri)
        if response.status_code == 206:
            check_content_range(f"download of {run.uri}", start, end, response.headers.get("Content-Range"),
                                response.headers.get("Content-Length"))
            run.exact = True
        elif response.status_code == 200:
            length = response.headers.get("Content-Length", "")
            if length.isdigit() and int(length) < end:
                raise BadResponse(f"{run.uri} is {length} bytes, shorter than the {end} bytes expected")
            self.ignored_ranges += 1
            if self.ignored_ranges == 1:
                log.warning("the download server ignored a Range request (HTTP 200); reading files from "
                            "their start up to the wanted bytes instead")
            run.skip = start
        else:
            raise self._error_for(response, run.uri)

    async def _send(self, method: str, uri: str, extra_headers: dict[str, str],
                    attach: Callable[[httpx.Response], None] | None = None) -> httpx.Response:
        """The streamed answer to ``method`` on the download of ``uri`` (redirects followed, the token
        renewed once on 401/403), handed to ``attach`` (which then owns it) before it is checked; the
        caller closes it otherwise. Raises Unauthorized when a redirect target the token was not sent to
        refuses, BadResponse like :meth:`_get_following`."""
        response, sent = await self._get_following(method, uri, extra_headers)
        if response.status_code in (401, 403) and await self._tokens.renew(sent):
            await response.aclose()
            response, sent = await self._get_following(method, uri, extra_headers)
        if attach is not None:
            attach(response)
        if response.status_code in (401, 403) and sent is None and self._has_token:
            if attach is None:
                await response.aclose()
            host = response.url.host
            raise Unauthorized(f"download of {uri}: refused by {host}, where it was redirected; the token "
                               f"was not sent there (not on the token allowlist)",
                               reason=f"if you trust {host}, add it with --token-hosts")
        return response

    async def _get_following(self, method: str, uri: str,
                             extra_headers: dict[str, str]) -> tuple[httpx.Response, str | None]:
        """A streamed ``method`` request of the download of ``uri`` after at most :data:`MAX_REDIRECTS`
        redirects, and the token its last hop carried (None: none, or its host is not on the allowlist).
        Raises BadResponse past that many redirects or on a redirect without a usable Location."""
        url: httpx.URL = httpx.URL(self._url, params={"uri": uri})
        for _hop in range(MAX_REDIRECTS + 1):
            token = self._tokens.current()
            if token is not None and not token_may_go_to(str(url), self._mast_url, self._token_hosts):
                token = None
            headers = {**self._headers, **extra_headers}
            if token is not None:
                headers["Authorization"] = f"token {token}"
            response = await self._http.send(self._http.build_request(method, url, headers=headers), stream=True,
                                             follow_redirects=False)
            if response.status_code not in _REDIRECTS:
                return response, token
            location = response.headers.get("Location", "")
            await response.aclose()
            try:
                url = response.url.join(location)
            except httpx.InvalidURL as exc:
                raise BadResponse(f"download of {uri}: redirect to an invalid Location {location!r}") from exc
            if not location or url.scheme not in ("http", "https"):
                raise BadResponse(f"download of {uri}: redirect to {location!r}")
            log.debug("download of %s redirected to %s", uri, url.copy_with(query=None))
        raise BadResponse(f"download of {uri}: more than {MAX_REDIRECTS} redirects")

    def _error_for(self, response: httpx.Response, uri: str) -> Exception:
        """The domain error for a non-success answer (returned, for the caller to raise)."""
        return error_for_status(response.status_code, f"download of {uri}", has_token=self._has_token,
                                retry_after=parse_retry_after(response.headers.get("Retry-After")))


class _Run:
    """The state of one :meth:`HttpFetcher.fetch_blocks` call: the open response (if any), the bytes
    received but not yet handed over, and the index of the next block."""

    def __init__(self, uri: str, bounds: Sequence[int], version: ObjectVersion | None) -> None:
        self.uri = uri
        self.bounds = bounds
        self.version = version
        self.position = 0
        self.response: httpx.Response | None = None
        self.chunks: AsyncIterator[bytes] | None = None
        self.pending: deque[bytes | memoryview] = deque()
        self.buffered = 0
        self.skip = 0  # bytes still to drop before the wanted ones (a 200 answer)
        self.exact = False  # a 206: the body must end exactly at the run's end

    def attach(self, response: httpx.Response) -> None:
        self.response = response
        self.chunks = response.aiter_raw()

    async def receive(self) -> None:
        """Append the next body chunk (after dropping skipped bytes); Retryable at a premature end."""
        assert self.chunks is not None
        try:
            chunk = await self.chunks.__anext__()
        except StopAsyncIteration:
            raise Retryable(f"body of {self.uri} ended early, before byte {self.bounds[-1]}") from None
        if self.skip:
            if len(chunk) <= self.skip:
                self.skip -= len(chunk)
                return
            view = memoryview(chunk)[self.skip:]
            self.skip = 0
            self.pending.append(view)
            self.buffered += len(view)
            return
        self.pending.append(chunk)
        self.buffered += len(chunk)

    def take(self, need: int) -> bytes:
        """The next ``need`` buffered bytes as one bytes object (one copy)."""
        parts: list[bytes | memoryview] = []
        got = 0
        while got < need:
            piece = self.pending[0]
            room = need - got
            if len(piece) <= room:
                parts.append(self.pending.popleft())
                got += len(piece)
            else:
                view = memoryview(piece)
                parts.append(view[:room])
                self.pending[0] = view[room:]
                got = need
        self.buffered -= need
        return b"".join(parts)

    async def finish(self) -> None:
        """After the last block: a 206 must have nothing more; a 200 is simply closed."""
        if self.exact:
            if self.buffered:
                raise Retryable(f"body of {self.uri} longer than the range asked for")
            assert self.chunks is not None
            async for extra in self.chunks:
                if extra:
                    raise Retryable(f"body of {self.uri} longer than the range asked for")
        await self.close()

    async def close(self) -> None:
        """Close the response (shielded: also on cancellation) and drop buffered bytes."""
        response, chunks = self.response, self.chunks
        self.response = self.chunks = None
        self.pending.clear()
        self.buffered = self.skip = 0
        self.exact = False
        if response is not None:
            with trio.CancelScope(shield=True), trio.move_on_after(_CLOSE_TIMEOUT):
                if chunks is not None:
                    await chunks.aclose()  # type: ignore[attr-defined]
                await response.aclose()


def _version_of(response: httpx.Response, size: int | None) -> ObjectVersion:
    return ObjectVersion(size=size, etag=response.headers.get("ETag"),
                         last_modified=response.headers.get("Last-Modified"))
