"""MastClient: the async HTTP client of MAST's metadata services (see MAST_API.md for the wire facts).

Speaks ``POST /api/v0/invoke`` (all pages, EXECUTING polled), the SANTA name resolver, path_lookup,
``HEAD /api/v0.1/Download/file`` and ``/whoami``. Every request goes through the one
:class:`~mastfs.retry.RetryPolicy` (5xx, 429, timeouts, resets and truncated answers are retried within
``settings.deadline``); every failure leaves as NotFound, Unauthorized, Unavailable or BadResponse.
The client caches nothing: that is the Archive's job.
"""

from __future__ import annotations

import gc
import json
import logging
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

import httpx
import trio

from .. import __version__
from ..auth import auth_headers
from ..config import Settings
from ..errors import BadResponse, NotFound, Retryable, Unauthorized, Unavailable
from ..fanout import run_each
from ..httpwire import error_for_status, parse_retry_after, unauthorized
from ..retry import RetryPolicy
from .models import (
    Identity,
    Observation,
    Paging,
    parse_count,
    parse_invoke_response,
    parse_path_lookup,
    parse_resolver_response,
    parse_rows,
)
from .table import ProductTable, ProductTableBuilder


class _PackingSink(ProductTableBuilder):
    """The sink of a product query: each page's rows packed as they arrive."""

    def extend(self, rows: list[dict[str, Any]]) -> None:
        self.add(rows)

log = logging.getLogger(__name__)

OBSERVATION_PAGESIZE = 5000
#: Rows per page of a product list: a page is parsed into dicts (about 2 KB each) before it is packed,
#: so this bounds the memory a page takes on its way to the ProductTable (about 20 MB).
PRODUCT_PAGESIZE = 10_000
#: Most dataURIs in one path_lookup request: 50 JWST uris overflow MAST's URL limit (HTTP 414),
#: astroquery sends 40. A 414 halves the batch.
PATH_LOOKUP_BATCH = 40
#: Most path_lookup requests one look-up keeps in flight: opening a file looks up its 200 neighbours (5
#: requests), which then cost one round trip to MAST instead of five.
PATH_LOOKUP_PARALLEL = 4
#: Most rows one query may return: a cap against a server paging forever, far above real answers (one
#: JWST observation lists about 300,000 products, mostly guide-star files). Product rows are packed
#: (about 50 bytes each, see mast/table.py), so 5 million rows stay within about 250 MB; an answer
#: claiming more is refused with BadResponse after its first page.
MAX_ROWS = 5_000_000
#: An answer whose rows do not add up to the rowsFiltered it announced is asked again this many times.
INCOMPLETE_RETRIES = 2
#: Polls of an EXECUTING query wait this long at first, doubling up to MAX_POLL_DELAY.
FIRST_POLL_DELAY = 0.1
MAX_POLL_DELAY = 2.0
#: A transient ERROR answer ("timed out", "try again") is asked again after this long, doubling up to
#: MAX_ERROR_DELAY, within the query timeout.
FIRST_ERROR_DELAY = 0.5
MAX_ERROR_DELAY = 15.0
#: Seconds to set up a connection: a MAST that takes longer is unreachable, however slow its queries.
CONNECT_TIMEOUT = 5.0
#: Pooled connections beyond ``transfers``: for queries, HEADs and token checks while every transfer runs.
METADATA_CONNECTIONS = 8
#: Words of an ERROR message that mean "ask again later" (MAST reports its own timeouts as ERROR).
_TRANSIENT_ERROR_WORDS = ("timed out", "timeout", "time out", "try again", "temporar", "unavailable",
                          "busy", "overload", "too many", "internal server error", "gateway", "502",
                          "503", "504", "deadlock", "connection reset", "retry")
#: Failures that mean MAST cannot be reached at all (as opposed to answering slowly).
_UNREACHABLE = (httpx.ConnectError, httpx.ConnectTimeout)
#: An unparsable body is retried this many times before it counts as a BadResponse.
BAD_BODY_RETRIES = 2
_AUTH_ERROR_WORDS = ("logged in", "authoriz", "authentic", "token", "permission", "forbidden")

TokenProvider = Callable[[], "str | None"]
S = TypeVar("S")


class IncompleteAnswer(Exception):
    """The pages of an answer do not add up to the rows it announced (only inside ``invoke``)."""


class RequestTooLong(BadResponse):
    """MAST refused the request line as too long (HTTP 414)."""


@dataclass
class QueryProgress:
    """One metadata query in flight, for ``mastfs status``."""

    what: str
    started: float
    pages: int = 0
    pages_total: int = 0
    rows: int = 0
    polls: int = 0
    transient_errors: int = 0


def is_transient_error(msg: str) -> bool:
    """Whether a MAST ``ERROR`` message says the query may succeed when asked again (a server-side
    timeout, "try again", a 5xx-like failure) rather than that the request is malformed."""
    lowered = msg.lower()
    return any(word in lowered for word in _TRANSIENT_ERROR_WORDS)


def _describe(service: str, params: dict[str, Any]) -> str:
    """A short, readable summary of a query for status lines."""
    if "obsid" in params:
        detail = f"obsid {params['obsid']}"
    elif "filters" in params:
        detail = ", ".join(f"{f.get('paramName')}={';'.join(map(str, f.get('values', [])))}"
                           for f in params["filters"] if isinstance(f, dict))
        if "position" in params:
            detail = f"{detail} around {params['position']}"
    else:
        detail = ", ".join(f"{key}={value}" for key, value in params.items())
    return f"{service} ({detail[:120]})"


def make_http_client(settings: Settings) -> httpx.AsyncClient:
    """The httpx client mastfs talks to MAST with: HTTP/1.1, ``transfers`` pooled connections for bodies
    plus :data:`METADATA_CONNECTIONS` (so queries and HEADs never wait behind bulk transfers), connect
    timeout 5 s, read timeout half the deadline (so one stalled try leaves time for another; metadata
    queries set their own, up to the query timeout), and a ``mastfs/<version>`` User-Agent. The caller closes it (``async with`` or ``aclose()``)."""
    read_timeout = max(0.5, settings.deadline / 2)
    connections = settings.transfers + METADATA_CONNECTIONS
    return httpx.AsyncClient(
        http1=True,
        http2=False,
        timeout=httpx.Timeout(connect=CONNECT_TIMEOUT, read=read_timeout, write=read_timeout,
                              pool=read_timeout),
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
        headers={"User-Agent": f"mastfs/{__version__}"},
        follow_redirects=True,
    )


def _endpoint_name(url: str, mast_host: bool) -> str:
    """A short, id-free name of the endpoint a URL addresses, for counters."""
    if not mast_host:
        return "resolver"
    path = urlsplit(url).path.rstrip("/")
    return path.rsplit("/", 1)[-1] or "root"


def _is_auth_message(msg: str) -> bool:
    lowered = msg.lower()
    return any(word in lowered for word in _AUTH_ERROR_WORDS)


class MastClient:
    """Async client of MAST's metadata services; no I/O in the constructor, no caching.

    ``token_provider`` returns the current MAST token (or None); it is asked on each request to the MAST
    host and its token is never sent to the name resolver. Methods raise only NotFound, Unauthorized,
    Unavailable (network, 5xx, deadline) and BadResponse; cancellation propagates at once.
    """

    def __init__(
        self,
        http: httpx.AsyncClient,
        settings: Settings,
        token_provider: TokenProvider | None = None,
        *,
        observation_pagesize: int = OBSERVATION_PAGESIZE,
        product_pagesize: int = PRODUCT_PAGESIZE,
    ) -> None:
        self._http = http
        self._settings = settings
        self._token_provider = token_provider or (lambda: None)
        self._policy = RetryPolicy.from_settings(settings)
        self._mast = settings.mast_url.rstrip("/")
        self.observation_pagesize = observation_pagesize
        self.product_pagesize = product_pagesize
        self._requests: Counter[str] = Counter()
        self._errors: Counter[str] = Counter()
        self._queries: dict[int, QueryProgress] = {}
        self._last_error: dict[str, Any] | None = None

    def stats(self) -> dict[str, Any]:
        """Requests sent and failed tries, by endpoint (``invoke``, ``path_lookup``, ``file``, ``whoami``,
        ``resolver``), since the client was made, the queries in flight, and the last failure (``time`` in
        seconds since the epoch, ``endpoint``, ``message``) or None (for ``mastfs status``)."""
        return {"requests": dict(self._requests), "errors": dict(self._errors), "queries": self.queries(),
                "last_error": self._last_error}

    def _failed(self, endpoint: str, message: str) -> None:
        """Count a failed try and remember it as the last error."""
        self._errors[endpoint] += 1
        self._last_error = {"time": time.time(), "endpoint": endpoint, "message": message}

    async def probe(self, within: float) -> None:
        """One try of ``GET /whoami`` within ``within`` seconds, to tell whether MAST can be reached.
        Raises Unavailable (unreachable, 5xx, too slow) or BadResponse; counted like any request."""
        policy = RetryPolicy(attempts=1, deadline=within)
        await self._request_json("GET", f"{self._mast}/whoami", what="probing MAST", policy=policy)

    # --- low level --------------------------------------------------------------------------------

    def _unauthorized(self, what: str) -> Unauthorized:
        return unauthorized(what, has_token=bool(self._token_provider()))

    async def _send(self, method: str, url: str, *, what: str, mast_host: bool = True,
                    **kwargs: Any) -> httpx.Response:
        """One try of a request. Raises Retryable for transient failures, else a typed error."""
        headers = dict(kwargs.pop("headers", None) or {})
        if mast_host:
            headers.update(auth_headers(self._token_provider()))
        endpoint = _endpoint_name(url, mast_host)
        self._requests[endpoint] += 1
        try:
            response = await self._http.request(method, url, headers=headers, **kwargs)
        except (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError,
                httpx.ProxyError, httpx.DecodingError) as exc:
            self._failed(endpoint, f"{what}: {type(exc).__name__}: {exc}")
            raise Retryable(f"{what}: {type(exc).__name__}: {exc}") from exc
        except httpx.HTTPError as exc:
            self._failed(endpoint, f"{what}: {type(exc).__name__}: {exc}")
            raise BadResponse(f"{what}: {type(exc).__name__}: {exc}") from exc
        status = response.status_code
        if status < 300:
            return response
        self._failed(endpoint, f"{what}: HTTP {status}")
        if status == 414:
            raise RequestTooLong(f"{what}: HTTP 414 (request line too long)")
        raise error_for_status(status, what, has_token=mast_host and bool(self._token_provider()),
                               retry_after=parse_retry_after(response.headers.get("Retry-After")))

    async def _request_json(self, method: str, url: str, *, what: str, mast_host: bool = True,
                            policy: RetryPolicy | None = None,
                            send: Callable[[], Awaitable[httpx.Response]] | None = None, **kwargs: Any) -> Any:
        """The decoded JSON answer of a request, retried per the policy (``send()`` makes one try when
        given, else ``_send`` with these arguments).

        A 2xx answer that is not JSON (an HTML error page, a truncated body) is retried
        :data:`BAD_BODY_RETRIES` times, then raises BadResponse.
        """
        bad_bodies = 0

        async def attempt() -> Any:
            nonlocal bad_bodies
            if send is not None:
                response = await send()
            else:
                response = await self._send(method, url, what=what, mast_host=mast_host, **kwargs)
            try:
                return json.loads(response.content)
            except ValueError as exc:
                bad_bodies += 1
                problem = (f"{what}: answer is not JSON ({response.headers.get('content-type', '?')}, "
                           f"{len(response.content)} bytes)")
                if bad_bodies > BAD_BODY_RETRIES:
                    raise BadResponse(problem) from exc
                raise Retryable(problem) from exc

        return await (policy or self._policy).run(attempt, what=what)

    # --- invoke ----------------------------------------------------------------------------------

    def _invoke_timeout(self, give_up_at: float) -> httpx.Timeout:
        """Timeouts of one invoke request: connecting is quick or MAST is unreachable (5 s); the first
        byte of a slow query may take until the query's end."""
        remaining = max(0.5, give_up_at - trio.current_time())
        return httpx.Timeout(connect=CONNECT_TIMEOUT, read=remaining, write=remaining, pool=remaining)

    async def _invoke_page(self, body: dict[str, Any], what: str, give_up_at: float,
                           query: QueryProgress) -> tuple[list[dict[str, Any]], Paging]:
        """Rows and paging of one page, re-sending the identical body while EXECUTING and, with
        backoff, after a transient ERROR answer, until ``give_up_at`` (trio time). A MAST that cannot
        be reached at all (connection refused, DNS failure) fails within the deadline instead.

        Raises Unauthorized, BadResponse (a final ERROR, a malformed answer), Unavailable.
        """
        content = "request=" + quote(json.dumps(body))
        headers = {"Content-Type": "application/x-www-form-urlencoded", "Accept": "text/plain"}
        delay = FIRST_POLL_DELAY
        error_delay = FIRST_ERROR_DELAY
        unreachable_since: float | None = None

        async def send() -> httpx.Response:
            nonlocal unreachable_since
            try:
                response = await self._send("POST", f"{self._mast}/api/v0/invoke", what=what,
                                            content=content, headers=headers,
                                            timeout=self._invoke_timeout(give_up_at))
            except Retryable as exc:
                if isinstance(exc.__cause__, _UNREACHABLE):
                    now = trio.current_time()
                    unreachable_since = now if unreachable_since is None else unreachable_since
                    if now - unreachable_since >= self._settings.deadline:
                        raise Unavailable(f"{what}: MAST unreachable for {self._settings.deadline:g}s "
                                          f"({exc})") from exc
                raise
            unreachable_since = None
            return response

        while True:
            remaining = give_up_at - trio.current_time()
            if remaining <= 0:
                raise Unavailable(f"{what}: no answer within the query timeout "
                                  f"({self._settings.query_timeout:g}s, {query.polls} polls)")
            payload = await self._request_json("POST", f"{self._mast}/api/v0/invoke", what=what,
                                               policy=replace(self._policy, deadline=remaining),
                                               send=send)
            rows, paging, status, msg = parse_invoke_response(payload)
            if status == "COMPLETE":
                return rows, paging
            if status == "ERROR":
                if _is_auth_message(msg):
                    raise self._unauthorized(f"{what}: {msg}")
                if not is_transient_error(msg):
                    raise BadResponse(f"{what}: MAST error: {msg or '(no message)'}")
                query.transient_errors += 1
                log.info("%s: MAST answered a transient error (%s); asking again in %.1fs", what, msg,
                         error_delay)
                await trio.sleep(min(error_delay, max(0.0, give_up_at - trio.current_time())))
                error_delay = min(error_delay * 2, MAX_ERROR_DELAY)
                continue
            query.polls += 1
            log.debug("%s still EXECUTING (poll %d); again in %.2fs", what, query.polls, delay)
            await trio.sleep(min(delay, max(0.0, give_up_at - trio.current_time())))
            delay = min(delay * 2, MAX_POLL_DELAY)

    async def invoke(self, service: str, params: dict[str, Any], pagesize: int) -> list[dict[str, Any]]:
        """Every row of a ``/api/v0/invoke`` query as a list (see :meth:`invoke_into`)."""
        rows: list[dict[str, Any]] = await self.invoke_into(service, params, pagesize, list)
        return rows

    async def invoke_into(self, service: str, params: dict[str, Any], pagesize: int,
                          sink: Callable[[], S]) -> S:
        """Every row of a ``/api/v0/invoke`` query, page by page: page 1, then pages 2..pagesFiltered
        with the same body (same cacheBreaker), each polled while EXECUTING. Each page's rows go to
        ``sink()``'s ``extend`` before the next page is asked for; the filled sink is returned.

        The whole query, retries included, takes at most ``settings.query_timeout``. An answer whose
        rows do not add up to the ``rowsFiltered`` it announced (rows shifting between pages, a lost
        page) is asked again from page 1 into a fresh sink, :data:`INCOMPLETE_RETRIES` times, then
        raises BadResponse. Raises Unauthorized when MAST says the service needs a login, BadResponse
        on other final service errors, malformed answers and answers of more than :data:`MAX_ROWS`
        rows, Unavailable when MAST does not answer in time (or cannot be reached within the deadline).
        """
        query = QueryProgress(_describe(service, params), trio.current_time())
        self._queries[id(query)] = query
        give_up_at = trio.current_time() + self._settings.query_timeout
        tries = 0
        try:
            while True:
                collected = sink()
                tries += 1
                try:
                    await self._read_pages(service, params, pagesize, collected, give_up_at, query)
                    return collected
                except IncompleteAnswer as exc:
                    del collected
                    if tries > INCOMPLETE_RETRIES or trio.current_time() >= give_up_at:
                        log.error("%s: %s; gave up after %d tries (nothing stored)", query.what, exc, tries)
                        raise BadResponse(f"{service}: {exc}") from exc
                    log.warning("%s: %s; asking again from page 1", query.what, exc)
                    await trio.sleep(min(FIRST_ERROR_DELAY * 2 ** (tries - 1),
                                         max(0.0, give_up_at - trio.current_time())))
        finally:
            del self._queries[id(query)]

    async def _read_pages(self, service: str, params: dict[str, Any], pagesize: int, collected: Any,
                          give_up_at: float, query: QueryProgress) -> None:
        """One pass over every page of a query into ``collected``. Raises IncompleteAnswer when the
        rows do not add up to what the pages announced."""
        body: dict[str, Any] = {"service": service, "params": params, "format": "json",
                                "pagesize": pagesize, "page": 1, "cacheBreaker": str(uuid.uuid4())}
        query.pages, query.rows = 0, 0
        rows, paging = await self._invoke_page(body, f"{service} page 1", give_up_at, query)
        pages = paging.pages_filtered
        page_size = max(1, paging.page_size or pagesize)  # a page holds at least one row
        announced = paging.rows_filtered
        claimed = max(announced or 0, (pages - 1) * page_size, len(rows))
        if claimed > MAX_ROWS:
            raise BadResponse(f"{service}: the answer claims {claimed} rows in {pages} page(s), more than the "
                              f"{MAX_ROWS} mastfs accepts from one query")
        query.pages_total = max(pages, 1)
        if pages > 1 and len(rows) != page_size:
            raise IncompleteAnswer(f"page 1/{pages} holds {len(rows)} rows, not {page_size}")
        received = self._take_page(collected, rows, query)
        del rows
        for page in range(2, pages + 1):
            body["page"] = page
            page_rows, page_paging = await self._invoke_page(body, f"{service} page {page}/{pages}",
                                                             give_up_at, query)
            if page_paging.rows_filtered != announced or page_paging.pages_filtered != pages:
                raise IncompleteAnswer(f"page {page} announces {page_paging.rows_filtered} rows in "
                                       f"{page_paging.pages_filtered} pages, page 1 announced {announced} "
                                       f"in {pages}")
            if page < pages and len(page_rows) != page_size:
                raise IncompleteAnswer(f"page {page}/{pages} holds {len(page_rows)} rows, not {page_size}")
            received += self._take_page(collected, page_rows, query)
            del page_rows
            if received > MAX_ROWS:
                raise BadResponse(f"{service}: more than {MAX_ROWS} rows by page {page}/{pages}")
        if announced is not None and received != announced:
            raise IncompleteAnswer(f"{received} rows arrived, {announced} were announced")
        log.debug("%s: %d rows in %d page(s)", service, received, max(pages, 1))

    @staticmethod
    def _take_page(collected: Any, rows: list[dict[str, Any]], query: QueryProgress) -> int:
        """Hand one page's rows to the sink. An httpx response is a reference cycle (its stream points
        back at it), so its body (MBs for a page of thousands of rows) would wait for a rare full
        collection: one collection per page of a multi-page answer frees it before the next page comes."""
        collected.extend(rows)
        query.pages += 1
        query.rows += len(rows)
        if query.pages_total > 1:
            gc.collect()
        return len(rows)

    def queries(self) -> list[dict[str, Any]]:
        """The metadata queries in flight: what, seconds so far, pages received (of how many), rows,
        EXECUTING polls and transient errors so far."""
        now = trio.current_time()
        return [{"what": q.what, "seconds": round(now - q.started, 1), "pages": q.pages,
                 "pages_total": q.pages_total, "rows": q.rows, "polls": q.polls,
                 "transient_errors": q.transient_errors} for q in self._queries.values()]

    # --- observations ------------------------------------------------------------------------------

    @staticmethod
    def program_filters(pid: str, collections: Sequence[str]) -> list[dict[str, Any]]:
        """The Mast.Caom.Filtered filters selecting program ``pid`` within ``collections``."""
        return [{"paramName": "proposal_id", "values": [str(pid)]},
                *MastClient.collection_filters(collections)]

    @staticmethod
    def collection_filters(collections: Sequence[str]) -> list[dict[str, Any]]:
        if not collections:
            return []
        return [{"paramName": "obs_collection", "separator": ";", "values": list(collections)}]

    async def observations(self, filters: list[dict[str, Any]],
                           position: tuple[float, float, float] | None = None) -> list[Observation]:
        """Observations matching ``filters`` (Mast.Caom.Filtered), or within ``position``
        (ra, dec, radius in degrees) of the sky too (Mast.Caom.Filtered.Position)."""
        params: dict[str, Any] = {"columns": "*", "filters": filters}
        service = "Mast.Caom.Filtered"
        if position is not None:
            ra, dec, radius = position
            params["position"] = f"{ra}, {dec}, {radius}"
            service = "Mast.Caom.Filtered.Position"
        rows = await self.invoke(service, params, self.observation_pagesize)
        return parse_rows(rows, Observation)

    async def observations_by_program(self, pid: str, collections: Sequence[str]) -> list[Observation]:
        """Every observation of program ``pid`` in ``collections`` (one query plus pages); [] if none."""
        return await self.observations(self.program_filters(pid, collections))

    async def observation(self, obs_id: str, collections: Sequence[str]) -> Observation:
        """The observation named ``obs_id``. Raises NotFound if MAST has none in ``collections``."""
        filters = [{"paramName": "obs_id", "values": [obs_id]}, *self.collection_filters(collections)]
        for obs in await self.observations(filters):
            if obs.obs_id == obs_id:
                return obs
        raise NotFound(f"no observation {obs_id!r} in {', '.join(collections) or 'any collection'}")

    async def cone(self, ra: float, dec: float, radius: float,
                   collections: Sequence[str] = ()) -> list[Observation]:
        """Observations within ``radius`` degrees of (ra, dec): Mast.Caom.Cone, or Filtered.Position
        when restricted to ``collections``."""
        if collections:
            return await self.observations(self.collection_filters(collections), (ra, dec, radius))
        rows = await self.invoke("Mast.Caom.Cone", {"ra": ra, "dec": dec, "radius": radius},
                                 self.observation_pagesize)
        return parse_rows(rows, Observation)

    async def count(self, filters: list[dict[str, Any]]) -> int:
        """How many observations match ``filters`` (a ``COUNT_BIG(*)`` query)."""
        rows = await self.invoke("Mast.Caom.Filtered", {"columns": "COUNT_BIG(*)", "filters": filters},
                                 self.observation_pagesize)
        return parse_count(rows)

    async def products(self, obsids: Iterable[str]) -> ProductTable:
        """The products of the observations with these ``obsid`` values (NOT obs_id), one query plus
        pages packed as they arrive, deduplicated by dataURI (first row wins)."""
        obsid_list = [str(obsid) for obsid in obsids]
        if not obsid_list:
            return ProductTable.of([])
        builder = await self.invoke_into("Mast.Caom.Products", {"obsid": ",".join(obsid_list)},
                                         self.product_pagesize, _PackingSink)
        return builder.finish()

    # --- other services ----------------------------------------------------------------------------

    async def resolve_name(self, name: str) -> tuple[float, float] | None:
        """(ra, dec) in degrees of ``name`` per SANTA (first resolver answering), None if unresolvable."""
        params = {"outputFormat": "json", "resolveAll": "False", "name": name}
        try:
            payload = await self._request_json("GET", self._settings.resolver_url, params=params,
                                               what=f"resolve {name!r}", mast_host=False)
        except NotFound:
            return None
        return parse_resolver_response(payload)

    async def path_lookup(self, uris: Iterable[str]) -> dict[str, str | None]:
        """S3 key (no leading slash) of each dataURI in bucket ``settings.bucket``, None where MAST has
        no cloud copy. One ``GET /api/v0.1/path_lookup/?uri=..&use_cloud_path=True`` per
        :data:`PATH_LOOKUP_BATCH` uris, up to :data:`PATH_LOOKUP_PARALLEL` of them at once; a batch MAST
        refuses as too long (414) is asked again in halves. A uri MAST refuses even alone is left out of
        the answer (its key is unknown, not None). Raises the first failure of any batch (the others are
        cancelled)."""
        pending = list(dict.fromkeys(uris))
        keys: dict[str, str | None] = {}

        async def lookup(batch: list[str]) -> None:
            keys.update(await self._path_lookup_batch(batch))

        await run_each((partial(lookup, pending[start:start + PATH_LOOKUP_BATCH])
                        for start in range(0, len(pending), PATH_LOOKUP_BATCH)), PATH_LOOKUP_PARALLEL)
        return keys

    async def _path_lookup_batch(self, batch: list[str]) -> dict[str, str | None]:
        """Keys of one batch of uris (see :meth:`path_lookup`); halves it on a 414."""
        try:
            payload = await self._request_json(
                "GET", f"{self._mast}/api/v0.1/path_lookup/",
                params=[*(("uri", uri) for uri in batch), ("use_cloud_path", "True")],
                what=f"path_lookup of {len(batch)} uris")
        except RequestTooLong:
            if len(batch) == 1:
                log.warning("path_lookup: MAST refuses even one uri as too long (414): %s", batch[0])
                return {}
            half = (len(batch) + 1) // 2
            log.info("path_lookup: MAST refused %d uris in one request (414); asking %d at a time",
                     len(batch), half)
            return {**await self._path_lookup_batch(batch[:half]), **await self._path_lookup_batch(batch[half:])}
        return parse_path_lookup(payload, batch)

    async def head(self, uri: str) -> int | None:
        """Content-Length of ``uri`` from ``HEAD /api/v0.1/Download/file``, None when the server omits
        it. Raises Unauthorized (exclusive-access without a valid token), NotFound, Unavailable, and
        BadResponse for an HTML page where the file should be (a portal or maintenance page)."""
        what = f"HEAD {uri}"
        response = await self._policy.run(
            lambda: self._send("HEAD", f"{self._mast}/api/v0.1/Download/file", params={"uri": uri},
                               what=what), what=what)
        content_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if content_type == "text/html" and not uri.lower().endswith((".html", ".htm")):
            raise BadResponse(f"{what}: answered an HTML page, not the file")
        length = response.headers.get("Content-Length")
        if length is None:
            return None
        try:
            size = int(length)
        except ValueError:
            raise BadResponse(f"{what}: Content-Length {length!r}") from None
        if size < 0:
            raise BadResponse(f"{what}: Content-Length {length!r}")
        return size

    async def whoami(self) -> Identity:
        """Who MAST takes us for with the current token (anonymous without one or when it is refused)."""
        payload = await self._request_json("GET", f"{self._mast}/whoami", what="whoami")
        return Identity.from_payload(payload)
