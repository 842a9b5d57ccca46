"""MastClient: the async HTTP client of MAST's metadata services (see MAST_API.md for the wire facts).

Speaks ``POST /api/v0/invoke`` (all pages, EXECUTING polled), the SANTA name resolver, path_lookup,
``HEAD /api/v0.1/Download/file`` and ``/whoami``. Every request goes through the one
:class:`~mastfs.retry.RetryPolicy` (5xx, 429, timeouts, resets and truncated answers are retried within
``settings.deadline``); every failure leaves as NotFound, Unauthorized, Unavailable or BadResponse.
The client caches nothing: that is the Archive's job.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import trio

from .. import __version__
from ..auth import auth_headers
from ..config import Settings
from ..errors import BadResponse, NotFound, Retryable, Unauthorized, Unavailable
from ..httpwire import error_for_status, parse_retry_after, unauthorized
from ..retry import RetryPolicy
from .models import (
    Identity,
    Observation,
    Paging,
    Product,
    parse_count,
    parse_invoke_response,
    parse_path_lookup,
    parse_resolver_response,
    parse_rows,
)

log = logging.getLogger(__name__)

OBSERVATION_PAGESIZE = 5000
PRODUCT_PAGESIZE = 50000
PATH_LOOKUP_BATCH = 40
#: Most rows one query may return. The largest real answers (the products of a JWST mosaic with all its
#: members, a wide cone in a crowded field) are tens of thousands of rows, about 3 KB of memory each once
#: parsed; an answer claiming more (a million-row product list, a server paging forever) is refused with
#: BadResponse after its first page, so memory and time stay bounded.
MAX_ROWS = 100_000
#: Polls of an EXECUTING query wait this long at first, doubling up to MAX_POLL_DELAY.
FIRST_POLL_DELAY = 0.1
MAX_POLL_DELAY = 2.0
#: An unparsable body is retried this many times before it counts as a BadResponse.
BAD_BODY_RETRIES = 2
_AUTH_ERROR_WORDS = ("logged in", "authoriz", "authentic", "token", "permission", "forbidden")

TokenProvider = Callable[[], "str | None"]


def make_http_client(settings: Settings) -> httpx.AsyncClient:
    """The httpx client mastfs talks to MAST with: HTTP/1.1, about 16 pooled connections, connect
    timeout 5 s, read timeout half the deadline (so one stalled try leaves time for another), and a
    ``mastfs/<version>`` User-Agent. The caller closes it (``async with`` or ``aclose()``)."""
    read_timeout = max(0.5, settings.deadline / 2)
    return httpx.AsyncClient(
        http1=True,
        http2=False,
        timeout=httpx.Timeout(connect=5.0, read=read_timeout, write=read_timeout,
                              pool=read_timeout),
        limits=httpx.Limits(max_connections=16, max_keepalive_connections=16),
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
        self._last_error: dict[str, Any] | None = None

    def stats(self) -> dict[str, Any]:
        """Requests sent and failed tries, by endpoint (``invoke``, ``path_lookup``, ``file``, ``whoami``,
        ``resolver``), since the client was made, and the last failure (``time`` in seconds since the
        epoch, ``endpoint``, ``message``) or None (for ``mastfs status``)."""
        return {"requests": dict(self._requests), "errors": dict(self._errors), "last_error": self._last_error}

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
        raise error_for_status(status, what, has_token=mast_host and bool(self._token_provider()),
                               retry_after=parse_retry_after(response.headers.get("Retry-After")))

    async def _request_json(self, method: str, url: str, *, what: str, mast_host: bool = True,
                            policy: RetryPolicy | None = None, **kwargs: Any) -> Any:
        """The decoded JSON answer of a request, retried per the policy.

        A 2xx answer that is not JSON (an HTML error page, a truncated body) is retried
        :data:`BAD_BODY_RETRIES` times, then raises BadResponse.
        """
        bad_bodies = 0

        async def attempt() -> Any:
            nonlocal bad_bodies
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

    async def _invoke_page(self, body: dict[str, Any], what: str) -> tuple[list[dict[str, Any]], Paging]:
        """Rows and paging of one page, re-sending the identical body while EXECUTING; the
        requests and polls of the page together take at most the deadline."""
        content = "request=" + quote(json.dumps(body))
        headers = {"Content-Type": "application/x-www-form-urlencoded", "Accept": "text/plain"}
        give_up_at = trio.current_time() + self._settings.deadline
        delay = FIRST_POLL_DELAY
        polls = 0
        while True:
            remaining = give_up_at - trio.current_time()
            if remaining <= 0:
                raise Unavailable(f"{what}: still EXECUTING after {self._settings.deadline:g}s "
                                  f"({polls} polls)")
            payload = await self._request_json("POST", f"{self._mast}/api/v0/invoke", what=what,
                                               policy=replace(self._policy, deadline=remaining),
                                               content=content, headers=headers)
            rows, paging, status, msg = parse_invoke_response(payload)
            if status == "COMPLETE":
                return rows, paging
            if status == "ERROR":
                if _is_auth_message(msg):
                    raise self._unauthorized(f"{what}: {msg}")
                raise BadResponse(f"{what}: MAST error: {msg or '(no message)'}")
            polls += 1
            log.debug("%s still EXECUTING (poll %d); again in %.2fs", what, polls, delay)
            await trio.sleep(min(delay, max(0.0, give_up_at - trio.current_time())))
            delay = min(delay * 2, MAX_POLL_DELAY)

    async def invoke(self, service: str, params: dict[str, Any], pagesize: int) -> list[dict[str, Any]]:
        """Every row of a ``/api/v0/invoke`` query: page 1, then pages 2..pagesFiltered with the same
        body (same cacheBreaker), each polled while EXECUTING. Each page is bounded by the deadline.

        Raises Unauthorized when MAST says the service needs a login, BadResponse on other service
        errors or malformed answers and on answers of more than :data:`MAX_ROWS` rows (claimed or
        delivered), Unavailable when MAST cannot be reached in time.
        """
        body: dict[str, Any] = {"service": service, "params": params, "format": "json",
                                "pagesize": pagesize, "page": 1, "cacheBreaker": str(uuid.uuid4())}
        rows, paging = await self._invoke_page(body, f"{service} page 1")
        pages = paging.pages_filtered
        page_size = max(1, paging.page_size or pagesize)  # a page holds at least one row
        claimed = max(paging.rows_filtered or 0, (pages - 1) * page_size, len(rows))
        if claimed > MAX_ROWS:
            raise BadResponse(f"{service}: the answer claims {claimed} rows in {pages} page(s), more than the "
                              f"{MAX_ROWS} mastfs accepts from one query")
        for page in range(2, pages + 1):
            body["page"] = page
            page_rows, _ = await self._invoke_page(body, f"{service} page {page}/{pages}")
            rows.extend(page_rows)
            if len(rows) > MAX_ROWS:
                raise BadResponse(f"{service}: more than {MAX_ROWS} rows by page {page}/{pages}")
        log.debug("%s: %d rows in %d page(s)", service, len(rows), max(pages, 1))
        return rows

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

    async def products(self, obsids: Iterable[str]) -> list[Product]:
        """The products of the observations with these ``obsid`` values (NOT obs_id), one query plus
        pages, deduplicated by dataURI (first row wins)."""
        obsid_list = [str(obsid) for obsid in obsids]
        if not obsid_list:
            return []
        rows = await self.invoke("Mast.Caom.Products", {"obsid": ",".join(obsid_list)},
                                 self.product_pagesize)
        unique: dict[str, Product] = {}
        for product in parse_rows(rows, Product):
            unique.setdefault(product.data_uri, product)
        return list(unique.values())

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
        no cloud copy. One ``GET /api/v0.1/path_lookup/?uri=..&uri=..`` per 50 uris."""
        unique = list(dict.fromkeys(uris))
        keys: dict[str, str | None] = {}
        for start in range(0, len(unique), PATH_LOOKUP_BATCH):
            batch = unique[start:start + PATH_LOOKUP_BATCH]
            payload = await self._request_json(
                "GET", f"{self._mast}/api/v0.1/path_lookup/", params=[("uri", uri) for uri in batch],
                what=f"path_lookup of {len(batch)} uris")
            keys.update(parse_path_lookup(payload, batch))
        return keys

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
