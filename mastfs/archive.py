"""Archive: MAST metadata with a persistent cache, a TTL policy by data age, a negative cache and
stale-if-error. The tree asks the Archive; the Archive asks :class:`~mastfs.mast.client.MastClient`.

Policy (docs/metadata.md):
- Observation lists and product lists expire after ``ttl_released`` when every observation involved was
  released more than a year ago, else after ``ttl_recent`` (recent, exclusive-access, planned data).
- "Does not exist" answers (unknown program or obs id, unresolvable name) are remembered for
  ``ttl_negative``.
- When MAST fails (Unavailable, BadResponse) and an expired entry exists, the expired entry is served
  (one WARNING per outage) and MAST is not asked again about that key for :data:`STALE_RETRY_INTERVAL`.
  A key never seen during an outage raises Unavailable (EIO), never NotFound.
- Concurrent callers of one key share one request (single flight).

Entries live in a diskcache under ``<cache_dir>/meta`` as JSON text with a wall-clock expiry, so they
survive remounts; a small in-memory layer in front avoids a thread hop per lookup. Every diskcache call
runs in a worker thread under one CapacityLimiter. A broken cache degrades to "no cache", never to an
error; a corrupt cache database is moved aside and rebuilt.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import sqlite3
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import diskcache
import trio

from .config import Settings
from .errors import BadResponse, NotFound, Unauthorized, Unavailable
from .lru import LRU
from .mast.client import MastClient
from .mast.models import Observation, Product
from .mast.table import ProductTable
from .namespace import DEFAULT_CONE_RADIUS, MJD_UNIX_EPOCH
from .singleflight import SingleFlight

log = logging.getLogger(__name__)
V = TypeVar("V")

#: Data released longer ago than this (days) count as "released" for the TTL.
RELEASED_AGE_DAYS = 365.0
#: After MAST failed for a key whose stale entry was served, wait this long before asking again.
STALE_RETRY_INTERVAL = 60.0
#: Entries kept decoded in memory in front of the disk cache, a listing counting once per
#: MEMORY_ROWS_PER_ENTRY rows it holds (so at most about 65,000 product rows: a 300,000-product table
#: is only referenced weakly, see :class:`_DecodedEntries`).
MEMORY_ENTRIES = 4096
MEMORY_ROWS_PER_ENTRY = 16
#: Kinds accepted by :meth:`Archive.forget`.
FORGETTABLE = ("program", "observation", "products", "target", "size", "s3")

_CACHE_ERRORS = (sqlite3.Error, OSError, diskcache.Timeout, ValueError)


def mjd_now(clock: Callable[[], float]) -> float:
    """The Modified Julian Date of ``clock()`` (unix seconds)."""
    return clock() / 86400.0 + MJD_UNIX_EPOCH


def _memory_weight(entry: _Entry) -> int:
    """How many of the MEMORY_ENTRIES an entry takes: one, and one more per MEMORY_ROWS_PER_ENTRY rows
    of a listing (observations or products)."""
    value = entry.value
    rows = len(value) if isinstance(value, list | ProductTable) else 0
    return 1 + rows // MEMORY_ROWS_PER_ENTRY


@dataclass
class _Entry:
    """A cached answer: ``value`` (decoded), wall-clock ``expires``; ``missing`` for "does not exist"."""

    value: Any
    expires: float
    missing: bool = False


class _DecodedEntries:
    """The answers kept decoded in front of the disk cache: an LRU of MEMORY_ENTRIES, each answer weighing
    by its rows (:func:`_memory_weight`). A product table too heavy for it is remembered by a weak
    reference only: while the tree holds it (a listing the kernel knows) asking again costs no decoding
    (nor a second copy); once nothing does, it is loaded from disk."""

    def __init__(self) -> None:
        self._lru: LRU[str, _Entry] = LRU(MEMORY_ENTRIES, weigh=_memory_weight)
        self._heavy: dict[str, tuple[weakref.ref[ProductTable], float]] = {}

    def get(self, key: str) -> _Entry | None:
        entry = self._lru.get(key)
        if entry is None and key in self._heavy:
            table, expires = self._heavy[key]
            value = table()
            if value is None:
                del self._heavy[key]
            else:
                entry = _Entry(value, expires)
        return entry

    def put(self, key: str, entry: _Entry) -> None:
        self._heavy.pop(key, None)
        self._lru.put(key, entry)
        if key not in self._lru and isinstance(entry.value, ProductTable):
            self._heavy = {other: held for other, held in self._heavy.items() if held[0]() is not None}
            self._heavy[key] = (weakref.ref(entry.value), entry.expires)

    def pop(self, key: str) -> None:
        self._heavy.pop(key, None)
        self._lru.pop(key)

    def clear(self) -> None:
        self._heavy.clear()
        self._lru.clear()


@dataclass
class _Codec:
    """How a kind's value goes to JSON (for the disk) and back."""

    encode: Callable[[Any], Any]
    decode: Callable[[Any], Any]


def _identity(value: Any) -> Any:
    return value


_OBSERVATIONS = _Codec(lambda items: [obs.fields for obs in items],
                       lambda rows: [Observation.from_row(row) for row in rows])
_OBSERVATION = _Codec(lambda obs: obs.fields, Observation.from_row)
_PRODUCTS = _Codec(ProductTable.to_json, ProductTable.from_json)
_POSITION = _Codec(list, tuple)
_PLAIN = _Codec(_identity, _identity)


class Archive:
    """Cached, TTL'd MAST metadata (see the module docstring for the policy).

    ``clock`` returns wall-clock unix seconds (persistent expiries outlive the process); tests inject a
    fake one. No I/O in the constructor: the disk cache opens on first use. Methods raise NotFound,
    Unauthorized, Unavailable or BadResponse.
    """

    def __init__(self, client: MastClient, settings: Settings, *,
                 clock: Callable[[], float] = time.time) -> None:
        self._client = client
        self._settings = settings
        self._clock = clock
        self._directory = settings.meta_dir
        self._cache: diskcache.Cache | None = None
        self._open_lock = trio.Lock()
        self._limiter = trio.CapacityLimiter(4)
        self._memory = _DecodedEntries()
        self._flights: SingleFlight[str, Any] = SingleFlight()
        self._outage = False
        # Keys are scoped by MAST host and collections: a twin and the real archive may share a cache dir.
        self._host = hashlib.sha1(settings.mast_url.rstrip("/").encode()).hexdigest()[:8]
        self._collections = ",".join(settings.collections)

    # --- public API ----------------------------------------------------------------------------------

    async def program(self, pid: str) -> list[Observation]:
        """Observations of program ``pid`` in the configured collections (one query plus pages).
        Raises NotFound (remembered for ttl_negative) when MAST has none."""
        pid = str(pid).strip()

        async def fetch() -> list[Observation]:
            observations = await self._client.observations_by_program(pid, self._settings.collections)
            if not observations:
                raise NotFound(f"no observations of program {pid} in {self._collections}")
            await self._remember_program(pid, observations)
            return observations

        return await self._cached(self._key("program", pid), _OBSERVATIONS, fetch, self._ttl_for)

    async def observation(self, obs_id: str) -> Observation:
        """The observation ``obs_id`` (0 requests if a listing of its program is cached).
        Raises NotFound (remembered) when MAST has no such observation in the configured collections."""

        async def fetch() -> Observation:
            return await self._client.observation(obs_id, self._settings.collections)

        return await self._cached(self._key("observation", obs_id), _OBSERVATION, fetch,
                                  lambda obs: self._ttl_for([obs]))

    async def products(self, obs: Observation) -> ProductTable:
        """The products of ``obs`` (one Mast.Caom.Products query plus pages, packed), unique by dataURI."""

        async def fetch() -> ProductTable:
            return await self._client.products([obs.obsid])

        return await self._cached(self._key("products", obs.obsid), _PRODUCTS, fetch,
                                  lambda _products: self._ttl_for([obs]))

    async def resolve(self, name: str) -> tuple[float, float]:
        """(ra, dec) of a target name. MAST's own ``target_name`` spellings (``NGC-3132``: hyphens for
        blanks) are tried again with blanks when the resolver does not know them as written. Raises
        NotFound (remembered) when SANTA cannot resolve it."""
        normalised = " ".join(name.split()).lower()

        async def fetch() -> tuple[float, float]:
            position = await self._client.resolve_name(name)
            if position is None and "-" in name:
                position = await self._client.resolve_name(" ".join(name.replace("-", " ").split()))
            if position is None:
                raise NotFound(f"cannot resolve target name {name!r}")
            return position

        return await self._cached(self._key("target", normalised), _POSITION, fetch,
                                  lambda _position: self._settings.ttl_released)

    async def target(self, name: str) -> list[Observation]:
        """Observations within :data:`~mastfs.namespace.DEFAULT_CONE_RADIUS` of the resolved position of ``name``
        (possibly empty). Raises NotFound when the name cannot be resolved."""
        ra, dec = await self.resolve(name)
        return await self.cone(ra, dec, DEFAULT_CONE_RADIUS)

    async def cone(self, ra: float, dec: float, radius: float) -> list[Observation]:
        """Observations of the configured collections within ``radius`` degrees of (ra, dec); open-ended
        searches gain new data, so they expire after ttl_recent."""

        async def fetch() -> list[Observation]:
            return await self._client.cone(ra, dec, radius, self._settings.collections)

        return await self._cached(self._cone_key(ra, dec, radius), _OBSERVATIONS, fetch,
                                  lambda _observations: self._settings.ttl_recent)

    async def resolved_size(self, product: Product) -> int | None:
        """The size of ``product``: its row's ``size``, else Content-Length from one HEAD (cached).
        None when MAST states no size at all. Raises Unauthorized for exclusive data without access."""
        if product.size is not None:
            return product.size

        async def fetch() -> int | None:
            return await self._client.head(product.data_uri)

        return await self._cached(self._key("size", product.data_uri), _PLAIN, fetch,
                                  lambda size: self._settings.ttl_released if size is not None
                                  else self._settings.ttl_recent)

    async def s3_keys(self, products: Iterable[Product]) -> dict[str, str | None]:
        """S3 key of each product's dataURI, None where there is no cloud copy.

        Cached per uri; the uris not cached are looked up in one path_lookup batch (40 uris a request).
        When MAST fails, stale keys are served and unknown ones are left out of the answer (the HTTPS
        download still works, and the next call asks again): a listing never fails for want of cloud
        paths, and a failed lookup is never remembered as "not in S3".
        """
        uris = list(dict.fromkeys(product.data_uri for product in products))
        now = self._clock()
        keys: dict[str, str | None] = {}
        stale: dict[str, str | None] = {}
        wanted = []
        for uri in uris:
            entry = self._memory.get(self._key("s3", uri))
            if entry is not None and entry.expires > now:
                keys[uri] = entry.value
            else:
                wanted.append(uri)
        if wanted:
            loaded = await self._load_many([self._key("s3", uri) for uri in wanted], _PLAIN)
            for uri, entry in zip(wanted, loaded, strict=True):
                if entry is None:
                    continue
                self._memory.put(self._key("s3", uri), entry)
                (keys if entry.expires > now else stale)[uri] = entry.value
        missing = [uri for uri in uris if uri not in keys]
        if not missing:
            return keys
        batch_key = "s3-batch:" + hashlib.sha1("\n".join(sorted(missing)).encode()).hexdigest()
        try:
            found = await self._flights.run(batch_key, lambda: self._lookup_s3(missing))
        except (Unavailable, BadResponse, Unauthorized) as exc:  # the HTTPS download decides access
            self._note_outage(exc)
            found = {uri: stale[uri] for uri in missing if uri in stale}
        keys.update(found)
        return keys

    async def programs_seen(self) -> list[str]:
        """Program ids listed successfully so far (in this cache, configured collections), sorted."""
        value = await self._cache_call(self._get_raw, self._key("index", "programs"))
        return sorted(json.loads(value)) if value else []

    known_programs = programs_seen

    async def forget(self, kind: str, ident: str) -> None:
        """Drop the cached answer about ``ident`` (kind in :data:`FORGETTABLE`; for "target" the name,
        whose position and observation list both go) so the next lookup asks MAST.
        Raises ValueError for an unknown kind."""
        if kind not in FORGETTABLE:
            raise ValueError(f"cannot forget {kind!r}; kinds: {', '.join(FORGETTABLE)}")
        keys = [self._key(kind, ident)]
        if kind == "target":  # the name's position and the observations around it
            keys = [self._key("target", " ".join(ident.split()).lower())]
            position = self._memory.get(keys[0]) or (await self._load_many(keys, _POSITION))[0]
            if position is not None and not position.missing:
                ra, dec = position.value
                keys.append(self._cone_key(ra, dec, DEFAULT_CONE_RADIUS))
        for key in keys:
            self._memory.pop(key)
            await self._cache_call(self._delete_raw, key)

    async def forget_all(self) -> None:
        """Drop every cached metadata answer (the next lookups ask MAST)."""
        self._memory.clear()
        await self._cache_call(lambda cache: cache.clear(retry=True))

    async def aclose(self) -> None:
        """Close the disk cache (reopened on next use)."""
        async with self._open_lock:
            if self._cache is not None:
                cache, self._cache = self._cache, None
                await trio.to_thread.run_sync(cache.close, limiter=self._limiter)

    # --- policy ------------------------------------------------------------------------------------

    def _ttl_for(self, observations: Sequence[Observation]) -> float:
        """ttl_released when every observation is public and released over a year ago, else ttl_recent."""
        now = mjd_now(self._clock)
        for obs in observations:
            release = obs.t_obs_release
            if obs.is_exclusive or release is None or now - release < RELEASED_AGE_DAYS:
                return self._settings.ttl_recent
        return self._settings.ttl_released

    def _key(self, kind: str, ident: str) -> str:
        scoped_by_collections = kind in ("program", "observation", "cone", "index")
        scope = f"{self._host}/{self._collections}" if scoped_by_collections else self._host
        return f"{kind}/{scope}/{ident}"

    def _cone_key(self, ra: float, dec: float, radius: float) -> str:
        return self._key("cone", f"{ra:.6f},{dec:.6f},{radius:.6f}")

    def _note_outage(self, exc: BaseException) -> None:
        if not self._outage:
            self._outage = True
            log.warning("MAST unavailable (%s): serving cached metadata where possible", exc)

    def _note_recovery(self) -> None:
        if self._outage:
            self._outage = False
            log.info("MAST answers again")

    async def _cached(self, key: str, codec: _Codec, fetch: Callable[[], Awaitable[V]],
                      ttl_of: Callable[[V], float]) -> V:
        entry = self._memory.get(key)
        if entry is None or entry.expires <= self._clock():
            entry = await self._flights.run_detached(key, lambda: self._refresh(key, codec, fetch, ttl_of))
        if entry.missing:
            raise NotFound(f"{key.split('/', 1)[0]} {key.rsplit('/', 1)[-1]!r} does not exist "
                           f"(remembered)")
        return cast(V, entry.value)

    async def _refresh(self, key: str, codec: _Codec, fetch: Callable[[], Awaitable[Any]],
                       ttl_of: Callable[[Any], float]) -> _Entry:
        """A fresh entry for ``key``: from memory or disk if unexpired, else from MAST (stored), else
        the stale one when MAST fails. Raises MAST's error when there is nothing to fall back on."""
        entry = self._memory.get(key) or (await self._load_many([key], codec))[0]
        now = self._clock()
        if entry is not None and entry.expires > now:
            self._memory.put(key, entry)
            return entry
        try:
            value = await fetch()
        except NotFound:
            fresh = _Entry(None, now + self._settings.ttl_negative, missing=True)
        except (Unavailable, BadResponse) as exc:
            if entry is None:
                raise
            self._note_outage(exc)
            log.debug("serving stale %s", key)
            self._memory.put(key, _Entry(entry.value, now + STALE_RETRY_INTERVAL, entry.missing))
            return entry
        else:
            fresh = _Entry(value, now + ttl_of(value))
        self._note_recovery()
        await self._store_many([(key, fresh, codec)])
        return fresh

    async def _lookup_s3(self, uris: list[str]) -> dict[str, str | None]:
        """Keys of ``uris`` from MAST, stored; a uri MAST gave no answer about is left out (unsettled)."""
        found = await self._client.path_lookup(uris)
        now = self._clock()
        entries = []
        for uri, key in found.items():
            ttl = self._settings.ttl_released if key else self._settings.ttl_recent
            entries.append((self._key("s3", uri), _Entry(key, now + ttl), _PLAIN))
        self._note_recovery()
        await self._store_many(entries)
        return found

    async def _remember_program(self, pid: str, observations: list[Observation]) -> None:
        """Store each observation of a fresh program listing under its own key, and index the program."""
        now = self._clock()
        entries = [(self._key("observation", obs.obs_id), _Entry(obs, now + self._ttl_for([obs])),
                    _OBSERVATION) for obs in observations]
        await self._store_many(entries)

        def index(cache: diskcache.Cache) -> None:
            key = self._key("index", "programs")
            with cache.transact(retry=True):
                seen = set(json.loads(cache.get(key, default="[]", retry=True)))
                if pid not in seen:
                    cache.set(key, json.dumps(sorted(seen | {pid})), retry=True)

        await self._cache_call(index)

    # --- disk layer (worker threads) -----------------------------------------------------------------

    def _open(self) -> diskcache.Cache:
        try:
            return diskcache.Cache(self._directory)
        except sqlite3.DatabaseError as exc:
            aside = f"{self._directory}.corrupt-{int(time.time())}"
            log.warning("metadata cache %s is corrupt (%s); moved to %s and rebuilt", self._directory,
                        exc, aside)
            os.replace(self._directory, aside)
            return diskcache.Cache(self._directory)

    async def _cache_call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(cache, *args)`` in a worker thread; None (logged) if the cache fails."""
        try:
            async with self._open_lock:
                if self._cache is None:
                    self._cache = await trio.to_thread.run_sync(self._open, limiter=self._limiter)
            return await trio.to_thread.run_sync(functools.partial(fn, self._cache, *args),
                                                 limiter=self._limiter)
        except _CACHE_ERRORS as exc:
            log.warning("metadata cache %s failed: %s", self._directory, exc)
            return None

    @staticmethod
    def _get_raw(cache: diskcache.Cache, key: str) -> Any:
        return cache.get(key, retry=True)

    @staticmethod
    def _delete_raw(cache: diskcache.Cache, key: str) -> None:
        cache.delete(key, retry=True)

    async def _load_many(self, keys: list[str], codec: _Codec) -> list[_Entry | None]:
        """Entries for ``keys`` from disk (expired ones included); None for absent or undecodable."""

        def load(cache: diskcache.Cache) -> list[_Entry | None]:
            entries: list[_Entry | None] = []
            for key in keys:
                text = cache.get(key, retry=True)
                try:
                    record = json.loads(text) if isinstance(text, str) else None
                    entry = None if record is None else _Entry(
                        None if record["missing"] else codec.decode(record["value"]),
                        float(record["expires"]), bool(record["missing"]))
                except (ValueError, KeyError, TypeError, BadResponse) as exc:
                    log.warning("ignoring undecodable cache entry %s: %s", key, exc)
                    entry = None
                entries.append(entry)
            return entries

        return await self._cache_call(load) or [None] * len(keys)

    async def _store_many(self, items: list[tuple[str, _Entry, _Codec]]) -> None:
        """Put entries in memory, and on disk in one transaction."""
        for key, entry, _codec in items:
            self._memory.put(key, entry)

        def store(cache: diskcache.Cache) -> None:
            records = [(key, json.dumps({"value": None if entry.missing else codec.encode(entry.value),
                                         "expires": entry.expires, "missing": entry.missing}))
                       for key, entry, codec in items]
            with cache.transact(retry=True):
                for key, text in records:
                    cache.set(key, text, retry=True)

        await self._cache_call(store)
