"""ByteReader: the read path of archive files, from FUSE reads down to the block cache and the fetchers.

Per block (geometry in :mod:`mastfs.blockcache`), a read looks in a small in-memory LRU of recent blocks
(no thread hop, no disk read), then joins or starts the block's one *flight*: the promise of that block,
fulfilled in the background by loading it from disk (verified) or by a network *run*. A run fetches
several consecutive missing blocks with one ranged request (per-request overhead dominates at high
bandwidth), hands each block to its waiting readers as soon as it is complete (verified by the fetcher,
length-checked here), then stores it in the block cache. So one transfer serves every concurrent reader
of a block, and a reader cancelled by a signal returns at once while the run ends in the background,
never leaving an unverified block behind.

Each open file handle has a :class:`ReadStream`. Reads that continue where the previous one ended (within
a small slack, as FUSE may reorder concurrent reads) grow a readahead window: one block at first, then
grown fourfold at a block boundary whenever the reader is limited by the link (:func:`waits_for_link`;
a reader slower than the link keeps its window, so unread blocks do not pile up). The
window is capped by what the link calls for (:class:`LinkEstimate`, measured from the runs themselves):
runs long enough to amortise the time to first byte (four bandwidth-delay products of one connection,
from ``run_blocks`` to ``MAX_RUN_BLOCKS`` blocks) and one run per transfer slot, within ``max_readahead``
blocks and :func:`readahead_limit` (what memory holds). It is topped up one run at a time, as soon as a
run's worth of it is free, so the transfer slots stay busy (the old half-window refill kept about 3 of
them busy). A read that jumps (astropy ``.section``, memmap) resets the window to nothing: random access reads only what it asks for. A stream's first read
and reads inside block 0 never trigger readahead, so a FITS header read costs one 64 KiB block on the
wire. Readahead shares the ``transfers`` limit (one slot per run) with foreground reads, and its failures
reach no reader that did not ask for the block. A sequential stream drops the blocks it has left behind
from memory (the kernel's page cache and the block cache keep them), so the memory LRU holds what it has
yet to read.

Memory is bounded: the in-memory LRU holds at most ``memory_limit`` bytes (read-ahead blocks beyond it
are loaded back from the block cache when read); at most ``UNSTORED_BLOCKS`` fetched blocks wait for the
disk (runs pause before fetching more), and each of the at most ``transfers`` runs assembles one block
at a time. Scheduled blocks take no memory until they arrive.

Lifetime: ``async with ByteReader(...) as reader:`` opens the block cache, owns the background nursery
and builds the S3 client in it; leaving the block lets fetched blocks reach the disk (at most
``STORE_GRACE`` seconds), then cancels the remaining work (waiting readers get Unavailable).
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from types import TracebackType
from typing import Any

import trio

from .blockcache import (
    BLOCK_SIZE,
    HEADER_SIZE,
    BlockCache,
    ProductRef,
    block_count,
    block_index,
    block_span,
    block_start,
)
from .errors import IntegrityError, MastfsError, NotFound, Unauthorized, Unavailable
from .fanout import run_each
from .fetch import ColdStartFetcher, WholeFileFetcher
from .fitscheck import FitsCheck, HduMismatch, applies_to
from .lru import LRU
from .singleflight import SingleFlight
from .versions import ObjectVersion, VersionChanged

log = logging.getLogger(__name__)

MEMORY_LIMIT = 32 * 1024 * 1024
"""Default byte cap of the in-memory LRU of recent blocks (read-ahead blocks not read yet, mostly): with
the blocks the ``transfers`` runs are assembling, it keeps the daemon under 200 MB."""
MAX_READAHEAD_BLOCKS = 32
"""Default largest readahead window, in blocks (32 x 4 MiB = 128 MiB scheduled ahead of the reader), within
:func:`readahead_limit` (by default 8 + ``transfers`` blocks: what the memory LRU and the runs being
assembled hold). Scheduled blocks take memory only once they arrive, and the window grows only while the
reader waits for the link."""
RUN_BLOCKS = 2
"""Default fewest blocks fetched by one ranged request (2 x 4 MiB = 8 MiB, the range size AWS recommends
for parallel GETs: parallel runs beat the bandwidth of one connection)."""
WINDOW_GROWTH = 4
"""How much a sequential stream's readahead window grows at each new block while the reader waits for the
link: 1, 4, 16 blocks. Each step waits for a block to arrive, so over a far link (120 ms to the first
byte) doubling took the first 64 MiB of a read 0.4 s longer; what a reader that stops early wastes stays
within 4 blocks per block it read."""
MAX_RUN_BLOCKS = 4
"""Most blocks one run fetches, however slow the link's first byte."""
RUN_LATENCY_FACTOR = 4
"""A run carries up to this many bandwidth-delay products of one connection (waiting for the first byte
then costs at most a fifth of a run's time), as long as the window still holds a run per transfer slot."""
UNSTORED_BLOCKS = 4
"""Most fetched blocks waiting for the disk; runs pause before fetching more (bounded memory)."""
SEQUENTIAL_SLACK = 1024 * 1024
"""A read starting this close to where the stream's previous reads ended still counts as sequential."""
RECENT_PRODUCTS = 10
"""How many recently fetched products :meth:`ByteReader.stats` lists with the source of their bytes."""
DEADLINE = 30.0
"""Default seconds one read may wait for its bytes, and one run for a transfer slot plus each block."""
STORE_GRACE = 5.0
"""Seconds a closing ByteReader waits for fetched blocks to reach the disk before cancelling the rest."""
SOURCES = ("auto", "s3", "http")
FITS_CHECKS_KEPT = 64
"""How many product versions' FITS checks (per-record sums of blocks of HDUs not yet complete) are kept."""
PINS_KEPT = 10_000
"""How many products' latest pinned versions the reader remembers (to drop an old version's memory blocks)."""

BlockKey = tuple[str, int]


@dataclass(eq=False)
class ReadStream:
    """Sequential-detection state of one open file handle (see :meth:`ByteReader.open_stream`)."""

    ref: ProductRef
    slack: int = SEQUENTIAL_SLACK
    max_readahead: int | None = None
    next_offset: int = -1
    last_block: int = -1
    window: int = 0
    ahead: int = -1
    starved: bool = False
    """A read since the window last grew found a block it needed not yet in memory."""


class LinkEstimate:
    """What recent network runs say about the link: per-connection throughput (bytes/s) and time to
    first byte (s), as moving averages (None until a run of two blocks or more has been measured), and the
    readahead geometry they call for."""

    WEIGHT = 0.3
    """Weight of a new measurement in the moving averages."""

    def __init__(self) -> None:
        self.throughput: float | None = None
        self.first_byte: float | None = None

    def observe(self, began: float, first_at: float, first_bytes: int, last_at: float, total_bytes: int) -> None:
        """One run: started at ``began``, its first block (``first_bytes``) complete at ``first_at``, its
        last at ``last_at``, ``total_bytes`` in all (monotonic seconds). Runs of one block are ignored
        (first byte and throughput cannot be told apart)."""
        if total_bytes <= first_bytes or last_at <= first_at:
            return
        throughput = (total_bytes - first_bytes) / (last_at - first_at)
        first_byte = max(0.0, first_at - began - first_bytes / throughput)
        if self.throughput is None or self.first_byte is None:
            self.throughput, self.first_byte = throughput, first_byte
            return
        self.throughput += self.WEIGHT * (throughput - self.throughput)
        self.first_byte += self.WEIGHT * (first_byte - self.first_byte)

    @property
    def delay_bytes(self) -> float:
        """The bandwidth-delay product of one connection: bytes it could have carried while waiting for the
        first byte (0 before any measurement)."""
        if self.throughput is None or self.first_byte is None:
            return 0.0
        return self.throughput * self.first_byte

    def run_blocks(self, least: int, transfers: int, budget: int) -> int:
        """Blocks per run: ``RUN_LATENCY_FACTOR`` bandwidth-delay products, at least ``least``, at most
        ``MAX_RUN_BLOCKS`` and at most what lets a window of ``budget`` blocks hold a run per transfer slot
        (given a window, shorter runs on more connections carry more)."""
        wanted = math.ceil(RUN_LATENCY_FACTOR * self.delay_bytes / BLOCK_SIZE)
        return max(least, min(MAX_RUN_BLOCKS, budget // max(1, transfers), wanted))

    def window_cap(self, least_run: int, transfers: int, budget: int) -> int:
        """Largest readahead window in blocks: one run per transfer slot, within ``budget`` blocks."""
        return max(0, min(budget, transfers * self.run_blocks(least_run, transfers, budget)))


class _Flight:
    """One block being loaded or fetched: readers wait on ``done`` (then ``data`` or ``error`` is set),
    prefetch also on ``stored`` (then ``cached`` says whether the block is on disk)."""

    __slots__ = ("ref", "index", "keep", "done", "stored", "data", "error", "cached", "claimed")

    def __init__(self, ref: ProductRef, index: int, keep: bool) -> None:
        self.ref = ref
        self.index = index
        self.keep = keep
        self.done = trio.Event()
        self.stored = trio.Event()
        self.data: bytes | None = None
        self.error: BaseException | None = None
        self.cached = False
        self.claimed = False  # holds the shared cache directory's lock of its block


class _RunProgress:
    """What one network run has handed over so far, from which source, and the cancel scope holding its
    deadline (``limit``; pushed back by one deadline at each block handed over)."""

    __slots__ = ("flights", "delivered", "source", "limit", "started", "began", "first_at", "first_bytes",
                 "last_at", "total_bytes")

    def __init__(self, flights: list[_Flight], source: str, limit: trio.CancelScope) -> None:
        self.flights = flights
        self.delivered = 0
        self.source = source
        self.limit = limit
        self.started = False
        self.began = time.monotonic()
        self.first_at = self.last_at = 0.0
        self.first_bytes = self.total_bytes = 0

    def arrived(self, nbytes: int) -> None:
        """Note one delivered block (for the link estimate)."""
        self.last_at = time.monotonic()
        if not self.total_bytes:
            self.first_at, self.first_bytes = self.last_at, nbytes
        self.total_bytes += nbytes


class ByteReader:
    """Verified bytes of archive files through the block cache.

    ``cache`` is the :class:`BlockCache`; ``http_fetcher`` reads over HTTPS, ``s3_fetcher`` (optional)
    from the cloud bucket; ``source`` is "auto" (S3 when the product has an S3 key and is public, else
    HTTPS; a product missing from S3 falls back to HTTPS and is remembered), "s3" (S3 only) or "http"
    (HTTPS only); ``transfers`` bounds parallel network runs. ``deadline`` bounds, in seconds, each read
    (from its call to its bytes, whatever it waits for) and each run (from its start, waiting for a
    transfer slot included, to its first block, then to each next block): a run past it is cancelled, which
    frees its slot and closes its connection. Use as ``async with ByteReader(...)``.
    """

    def __init__(
        self,
        cache: BlockCache,
        http_fetcher: WholeFileFetcher,
        s3_fetcher: ColdStartFetcher | None = None,
        source: str = "auto",
        transfers: int = 8,
        *,
        memory_limit: int = MEMORY_LIMIT,
        max_readahead: int = MAX_READAHEAD_BLOCKS,
        run_blocks: int = RUN_BLOCKS,
        deadline: float = DEADLINE,
    ) -> None:
        if source not in SOURCES:
            raise ValueError(f"source must be one of {', '.join(SOURCES)}, not {source!r}")
        self._cache = cache
        self._http = http_fetcher
        self._s3 = s3_fetcher
        self._source = source
        self._transfers = max(1, transfers)
        self._transfer_slots = trio.CapacityLimiter(self._transfers)
        self._deadline = deadline
        self._waiting = {"reads": 0, "runs": 0}  # reads waiting for bytes, runs waiting for a slot
        self._unstored = trio.Semaphore(UNSTORED_BLOCKS)
        self._max_readahead = readahead_limit(max_readahead, memory_limit, self._transfers)
        self._run_blocks = max(1, run_blocks)
        self.link = LinkEstimate()
        self._memory: LRU[BlockKey, bytes] = LRU(memory_limit, weigh=len)
        self._flights: dict[BlockKey, _Flight] = {}
        self._verifying: SingleFlight[str, bool | None] = SingleFlight()
        self._not_in_cloud: set[str] = set()  # uris
        self._s3_only_warned: set[str] = set()
        self._pinned: LRU[str, str] = LRU(PINS_KEPT)  # uri -> version key of its latest pin
        self._fits: LRU[str, FitsCheck] = LRU(FITS_CHECKS_KEPT)  # version key -> its FITS check
        self._hdu_failures: dict[tuple[str, int], int] = {}  # (version key, HDU start) -> failed checks
        self._mismatched: set[str] = set()
        self._active: dict[str, dict[str, Any]] = {}
        self._bytes_fetched = {"s3": 0, "http": 0}
        self._recent: LRU[str, str] = LRU(RECENT_PRODUCTS)  # uri -> source of its latest bytes, newest last
        self._counts = {"memory_hits": 0, "disk_hits": 0, "misses": 0, "requests": 0, "readahead_blocks": 0}
        self._errors: dict[str, int] = {}
        self._nursery: trio.Nursery | None = None
        self._nursery_manager: Any = None

    # ------------------------------------------------------------------ lifetime

    async def __aenter__(self) -> ByteReader:
        await self._cache.open()
        self._nursery_manager = trio.open_nursery()
        self._nursery = await self._nursery_manager.__aenter__()
        if self._s3 is not None and self._source != "http":
            self._nursery.start_soon(self._s3.prepare)  # the first S3 read need not wait for boto3
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        traceback: TracebackType | None) -> None:
        assert self._nursery is not None
        with trio.CancelScope(shield=True), trio.move_on_after(STORE_GRACE):
            for flight in list(self._flights.values()):
                if flight.data is not None:  # fetched: let it reach the disk
                    await flight.stored.wait()
        self._nursery.cancel_scope.cancel()
        self._nursery = None
        # Background tasks catch their own errors, so closing the nursery raises nothing of theirs;
        # whatever the body of the `async with` raised propagates unwrapped.
        await self._nursery_manager.__aexit__(None, None, None)
        self._cache.close()

    # ------------------------------------------------------------------ reading

    def open_stream(self, ref: ProductRef, *, slack: int = SEQUENTIAL_SLACK,
                    max_readahead: int | None = None) -> ReadStream:
        """A fresh read stream (one per open file handle) for ``ref`` (a pinned ref: see :meth:`pin`). A
        read starting at most ``slack`` bytes from where the previous one ended counts as sequential (0 for
        callers whose reads arrive in order, unlike the kernel's); ``max_readahead`` (blocks) replaces the
        reader's largest window for it, within :func:`readahead_limit` (what memory holds)."""
        return ReadStream(ref, slack, max_readahead)

    async def pin(self, ref: ProductRef) -> ProductRef:
        """``ref`` as the server states it now: its version (ETag, VersionId, Last-Modified, checksums)
        and true size, asked of the source its reads will use (one HeadObject or HEAD; a file that
        states no length is downloaded whole, at most the cache's size, and identified by its sha256).
        Blocks of the product's other versions leave the cache and memory, so a changed file is read
        from its start and no old block is served again.

        When the server cannot be reached (Unavailable), the version cached last is used if there is one
        (stale-if-error: cached bytes still read during an outage; a block not cached fails with EIO).

        Raises NotFound, Unauthorized, Unavailable, BadResponse; MastfsError when a file of unknown
        length is larger than the cache.
        """
        try:
            return await self._pin(ref)
        except Unavailable as exc:
            cached = await self._cache.last_known(ref)
            if cached is None:
                raise
            log.warning("%s: MAST cannot be asked for its version (%s); reading the version cached on %s",
                        ref.uri, exc, cached.version.tag if cached.version else "?")
            return cached

    async def _pin(self, ref: ProductRef) -> ProductRef:
        source = self._source_for(ref)
        if source is None:
            raise self._s3_only_failure(ref, "MAST lists no cloud copy")
        version = None
        if source == "s3":
            assert self._s3 is not None and ref.s3_key is not None
            try:
                version = await self._s3.stat(ref.s3_key)
            except NotFound as exc:
                if self._source == "s3":
                    raise self._s3_only_failure(ref, str(exc)) from exc
                log.info("%s is not in the cloud; reading it over HTTPS", ref.uri)
                self._not_in_cloud.add(ref.uri)
        if version is None:
            try:
                version = await self._http.stat(ref.uri)
            except Unauthorized as exc:
                raise self._refusal(ref, exc) from exc
        if version.size is None:
            pinned = await self._fetch_whole(ref)
        else:
            pinned = replace(ref, size=version.size, version=version)
        if await self._cache.drop_superseded(pinned):
            log.info("%s changed on MAST: its cached blocks of older versions were dropped", ref.uri)
        previous = self._pinned.peek(pinned.uri)
        if previous is not None and previous != pinned.version_key:
            self._forget_memory(previous)
        self._pinned.put(pinned.uri, pinned.version_key)
        return pinned

    async def _fetch_whole(self, ref: ProductRef) -> ProductRef:
        """Download a file that states no length whole (bounded by the cache size); store its blocks under
        a version named by the content's sha256; the pinned ref."""
        data = await self._http.fetch_whole(ref.uri, self._cache.size_limit)
        digest = hashlib.sha256(data).hexdigest()
        pinned = replace(ref, size=len(data), sha256=digest, version=ObjectVersion(size=len(data)))
        self._counts["requests"] += 1
        self._bytes_fetched["http"] += len(data)
        for index in range(block_count(len(data))):
            start, end = block_span(index, len(data))
            block = data[start:end]
            self._remember((pinned.version_key, index), block)
            await self._cache.store(pinned, index, block)
        return pinned


    async def read(self, stream: ReadStream, offset: int, length: int) -> bytes:
        """Exactly ``min(length, size - offset)`` verified bytes of the stream's product from ``offset``
        (``b""`` at or after the end).

        Raises NotFound, Unauthorized, Unavailable, BadResponse or IntegrityError from the block(s) the
        read needs (never from readahead); Unavailable when the bytes are not there within the deadline.
        Cancellation returns at once; the blocks keep loading in the background (each run bounded by the
        deadline too).
        """
        data = await self.read_view(stream, offset, length)
        return data if isinstance(data, bytes) else bytes(data)

    async def read_view(self, stream: ReadStream, offset: int, length: int) -> bytes | memoryview:
        """Like :meth:`read`, but a read inside one block returns a read-only memoryview of the cached
        block instead of a copy (for the FUSE adapter: pyfuse3 accepts any buffer). The view keeps its
        block alive while referenced.

        Raises VersionChanged once a later pin found another version of the product: an open file
        never serves bytes of two versions, nor old bytes after a newer open saw the new ones."""
        with trio.move_on_after(self._deadline):
            return await self._read_view(stream, offset, length)
        error = Unavailable(f"{stream.ref.uri}: bytes from {offset} not fetched within the {self._deadline:g}s "
                            "deadline")
        self._count_error(error, "a read")
        raise error

    async def _read_view(self, stream: ReadStream, offset: int, length: int) -> bytes | memoryview:
        ref = stream.ref
        if offset < 0 or length < 0:
            raise ValueError(f"negative offset or length ({offset}, {length})")
        latest = self._pinned.peek(ref.uri)
        if ref.version is not None and latest is not None and latest != ref.version_key:
            raise VersionChanged(f"{ref.uri}: a newer version was opened since this file was")
        end = min(offset + length, ref.size)
        if offset >= end:
            return b""
        first = block_index(offset)
        last = block_index(end - 1)
        self._track(stream, offset, end, last)
        if (ref.version_key, last) not in self._memory:
            stream.starved = True
        if first == last:
            data = await self._block(ref, first)
            base = block_start(first)
            return memoryview(data).toreadonly()[offset - base:end - base]
        self._ensure(ref, first, last, keep=True)  # every missing block in flight before waiting for any
        parts = []
        for index in range(first, last + 1):
            data = await self._block(ref, index)
            base, block_end = block_span(index, ref.size)
            parts.append(memoryview(data)[max(offset, base) - base:min(end, block_end) - base])
        return b"".join(parts)

    async def prefetch(self, ref: ProductRef, progress: Callable[[int], None] | None = None) -> None:
        """Fill the block cache with the whole product (``transfers`` runs in parallel); when
        ``ref.sha256`` is known, verify the whole file afterwards.

        ``progress`` is called with the number of the product's bytes in the cache so far (first with
        what was already there, last with ``ref.size``). Raises like :meth:`read`; IntegrityError when
        the file does not match its sha256 (its blocks are then dropped); MastfsError when the cache
        cannot hold it (size limit or free-space floor).
        """
        count = block_count(ref.size)
        if ref.size + count * HEADER_SIZE > self._cache.size_limit:
            raise MastfsError(f"{ref.uri} ({ref.size} bytes) does not fit in the block cache "
                              f"({self._cache.size_limit} bytes); raise --cache-size")
        missing = [index for index in range(count) if not self._cache.contains(ref, index)]
        done = ref.size - sum(end - start for start, end in (block_span(i, ref.size) for i in missing))
        if progress is not None:
            progress(done)
        self._mismatched.discard(ref.version_key)

        async def fill(group: list[int]) -> None:
            nonlocal done
            for index, flight in zip(group, self._ensure(ref, group[0], group[-1], keep=False), strict=True):
                assert flight is not None  # keep=False never answers from memory
                await flight.stored.wait()
                if flight.error is not None:
                    raise flight.error
                if not flight.cached:
                    raise MastfsError(f"block cache full: cannot keep {ref.uri} (size limit or free-space floor)")
                start, end = block_span(index, ref.size)
                done += end - start
                if progress is not None:
                    progress(done)

        await run_each((partial(fill, group) for group in _runs_of(missing, self._run_blocks)), self._transfers)
        if await self._verify_product(ref) is False or ref.version_key in self._mismatched:
            raise IntegrityError(f"{ref.uri} does not match its sha256 {ref.sha256}; its blocks were dropped")

    def stats(self) -> dict[str, Any]:
        """Counters for ``mastfs status``: transfers in flight per product (uri, source, bytes fetched
        since its transfers began / total, runs in flight), bytes fetched per source, the source of the
        ``RECENT_PRODUCTS`` products most recently fetched (newest first), cache hits and misses (per
        block; ``requests`` counts network requests), errors by type; ``waiting``: reads waiting for
        their bytes and runs waiting for a transfer slot; ``slots``: transfer slots busy and in all."""
        used, limit = self._cache.usage()
        return {
            "in_flight": [dict(entry) for entry in self._active.values()],
            "waiting": dict(self._waiting),
            "slots": {"busy": self._transfer_slots.borrowed_tokens, "total": self._transfers},
            "bytes_fetched": dict(self._bytes_fetched),
            "recent": [{"uri": uri, "source": source} for uri, source in reversed(list(self._recent.items()))],
            "cache": {
                **self._counts,
                "memory_bytes": self._memory.weight,
                "memory_limit": self._memory.capacity,
                "readahead_limit_blocks": self._max_readahead,
                "disk_bytes": used,
                "disk_limit": limit,
                "disk_blocks": self._cache.entries,
                "corrupt_blocks": self._cache.corrupt_blocks,
            },
            "errors": dict(self._errors),
        }

    # ------------------------------------------------------------------ blocks and flights

    async def _block(self, ref: ProductRef, index: int) -> bytes:
        """The verified bytes of one block: from memory, else from its (possibly new) flight."""
        key = (ref.version_key, index)
        data = self._memory.get(key)
        if data is not None:
            self._cache.touch(ref, index)
            self._counts["memory_hits"] += 1
            return data
        flight = self._flights.get(key) or self._ensure(ref, index, index, keep=True)[0]
        assert flight is not None
        self._waiting["reads"] += 1
        try:
            await flight.done.wait()
        finally:
            self._waiting["reads"] -= 1
        if flight.error is not None:
            raise flight.error
        assert flight.data is not None
        return flight.data

    def _ensure(self, ref: ProductRef, first: int, last: int, keep: bool) -> list[_Flight | None]:
        """Make sure blocks ``first..last`` are in memory or in flight: join existing flights, load
        blocks on disk, and fetch the others in runs of consecutive blocks. Returns each block's flight
        (None: in memory, only when ``keep``). ``keep`` puts fetched blocks in the memory LRU."""
        if self._nursery is None:
            raise RuntimeError("ByteReader is not running: use `async with ByteReader(...)`")
        vk = ref.version_key
        flights: list[_Flight | None] = []
        pending: list[_Flight] = []
        for index in range(first, last + 1):
            key = (vk, index)
            flight = self._flights.get(key)
            if flight is not None:
                flight.keep = flight.keep or keep
            elif keep and key in self._memory:
                flights.append(None)
                continue
            else:
                flight = self._flights[key] = _Flight(ref, index, keep)
                if self._cache.contains(ref, index):
                    self._nursery.start_soon(self._load, flight)
                else:
                    pending.append(flight)
            flights.append(flight)
        start = 0
        run_blocks = self.link.run_blocks(self._run_blocks, self._transfers, self._max_readahead)
        for group in _runs_of(list(range(len(pending))), run_blocks, [f.index for f in pending]):
            run = pending[start:start + len(group)]
            start += len(group)
            self._nursery.start_soon(self._transfer, run)
        return flights

    async def _load(self, flight: _Flight) -> None:
        """Background: a block from disk, or (missing or corrupt there) from the network."""
        try:
            data = await self._cache.load(flight.ref, flight.index)
        except OSError as exc:
            log.warning("cannot read block %d of %s from the cache: %s", flight.index, flight.ref.uri, exc)
            data = None
        except BaseException:
            self._fail([flight], Unavailable(f"read of {flight.ref.uri} interrupted: mastfs is stopping"))
            raise
        if data is not None:
            try:
                self._check_fits(flight.ref, flight.index, data)
            except HduMismatch as exc:
                await self._drop_span(flight.ref, exc)
                data = None
        if data is None:
            await self._transfer([flight])
            return
        self._counts["disk_hits"] += 1
        flight.cached = True
        self._deliver(flight, data)
        self._finish(flight)
        await self._note_fits_verified(flight.ref)

    async def _transfer(self, flights: list[_Flight]) -> None:
        """Background: fetch consecutive blocks with one run (one transfer slot), hand each over and
        start its store; the flights that get no data end with the run's error."""
        ref = flights[0].ref
        what = f"blocks {flights[0].index}-{flights[-1].index} of {ref.uri}"
        run = _RunProgress(flights, "", trio.CancelScope(deadline=trio.current_time() + self._deadline))
        handed_over = False
        try:
            with run.limit:
                self._waiting["runs"] += 1
                try:
                    await self._transfer_slots.acquire()
                finally:
                    self._waiting["runs"] -= 1
                try:
                    run.started = True
                    if await self._claim(flights):
                        handed_over = True
                        return
                    self._counts["misses"] += len(flights)
                    run.began = time.monotonic()
                    while True:
                        try:
                            await self._fetch_run(ref, run)
                            break
                        except HduMismatch as exc:
                            await self._drop_span(ref, exc)
                            if self._hdu_failures[(ref.version_key, exc.span[0])] > 1:
                                log.error("%s: %s again after fetching it again; reads of it fail (EIO) until "
                                          "the archive serves it right", ref.uri, exc)
                                raise IntegrityError(f"{ref.uri}: {exc}") from exc
                            log.warning("%s: %s; its blocks were dropped and are fetched again", ref.uri, exc)
                    self.link.observe(run.began, run.first_at, run.first_bytes, run.last_at, run.total_bytes)
                except Exception as exc:
                    self._count_error(exc, what)
                    self._fail(flights[run.delivered:], exc)
                finally:
                    self._transfer_slots.release()
            if run.limit.cancelled_caught and run.delivered < len(flights):
                waited = "" if run.started else " (all that time waiting for a transfer slot)"
                error = Unavailable(f"{ref.uri}: block {flights[run.delivered].index} not fetched within the "
                                    f"{self._deadline:g}s deadline{waited}")
                self._count_error(error, what)
                self._fail(flights[run.delivered:], error)
        finally:
            if not handed_over:
                self._fail(flights[run.delivered:], Unavailable(f"read of {ref.uri} interrupted: mastfs is stopping"))

    async def _claim(self, flights: list[_Flight]) -> bool:
        """Claim the run's blocks in the shared cache directory (see :meth:`BlockCache.claim`); when
        another process stored any of them meanwhile, load each block of the run from disk instead (a
        block still missing is fetched alone) and return True: the flights are handed over."""
        found = await self._cache.claim(flights[0].ref, [flight.index for flight in flights])
        for flight in flights:
            flight.claimed = True
        if not found:
            return False
        assert self._nursery is not None
        for flight in flights:
            self._nursery.start_soon(self._load, flight)
        return True

    async def _fetch_run(self, ref: ProductRef, run: _RunProgress) -> None:
        """Fetch the run's blocks from the source the policy picks, falling back from S3 to HTTPS."""
        flights = run.flights
        bounds = [block_start(flight.index) for flight in flights[run.delivered:]]
        bounds.append(block_span(flights[-1].index, ref.size)[1])
        source = self._source_for(ref)
        if source is None:
            raise self._s3_only_failure(ref, "MAST lists no cloud copy")
        run.source = source
        progress = self._transfer_started(ref, run.source)
        delivered_before = run.delivered

        async def deliver(data: bytes) -> None:
            flight = flights[run.delivered]
            start, end = block_span(flight.index, ref.size)
            if len(data) != end - start:
                raise IntegrityError(f"{ref.uri}: fetcher handed over {len(data)} bytes for block {flight.index}")
            self._check_fits(ref, flight.index, data)
            run.delivered += 1
            run.limit.deadline = trio.current_time() + self._deadline  # the next block gets a deadline too
            run.arrived(len(data))
            self._bytes_fetched[run.source] += len(data)
            self._note_recent(ref.uri, run.source)
            progress["bytes_done"] += len(data)
            self._deliver(flight, data)
            assert self._nursery is not None
            try:
                await self._unstored.acquire()  # backpressure: a slow disk slows the network down
            except BaseException:
                self._finish(flight)
                raise
            self._nursery.start_soon(self._store, flight, data)

        try:
            if run.source == "s3":
                assert self._s3 is not None and ref.s3_key is not None
                try:
                    self._counts["requests"] += 1
                    await self._s3.fetch_blocks(ref.s3_key, bounds, deliver, ref.version)
                    return
                except NotFound as exc:
                    if self._source == "s3":
                        raise self._s3_only_failure(ref, str(exc)) from exc
                    if run.delivered > delivered_before:
                        raise
                    log.info("%s is not in the cloud; reading it over HTTPS", ref.uri)
                    self._not_in_cloud.add(ref.uri)
                    run.source = progress["source"] = "http"
            self._counts["requests"] += 1
            try:
                await self._http.fetch_blocks(ref.uri, bounds[run.delivered - delivered_before:], deliver,
                                              ref.version)
            except Unauthorized as exc:
                raise self._refusal(ref, exc) from exc
        finally:
            self._transfer_ended(ref)

    def _refusal(self, ref: ProductRef, exc: Unauthorized) -> MastfsError:
        """The error of MAST refusing a download or HEAD: ``exc`` itself (EACCES) for exclusive data; for a
        public file (EIO: not a matter of access rights) Unavailable, logged with the reason."""
        if ref.exclusive:
            return exc
        log.warning("MAST refused a download of the public file %s (%s): not a matter of access rights "
                    "(public data needs no token); MAST may be failing, try again later", ref.uri, exc)
        return Unavailable(f"{ref.uri}: MAST refused the request ({exc})")

    def _s3_only_failure(self, ref: ProductRef, why: str) -> Unavailable:
        """The error (EIO, never ENOENT: the file exists) of a read S3 cannot serve under ``--source s3``,
        logged once per product with the way out."""
        if ref.version_key not in self._s3_only_warned:
            self._s3_only_warned.add(ref.version_key)
            log.warning("S3 cannot serve %s (%s) and the mount reads from S3 only (--source s3); mount with "
                        "--source auto to read such files over HTTPS", ref.uri, why)
        return Unavailable(f"{ref.uri}: S3 cannot serve it ({why}) and the source is s3 only")

    async def _store(self, flight: _Flight, data: bytes) -> None:
        """Background: put a fetched block on disk; check the whole product once it is complete."""
        ref = flight.ref
        try:
            flight.cached = await self._cache.store(ref, flight.index, data)
            if flight.cached and ref.sha256 and self._cache.is_complete(ref):
                if await self._verify_product(ref) is False:
                    log.error("%s: dropped every cached block; it will be fetched again", ref.uri)
            elif flight.cached:
                await self._note_fits_verified(ref)
        except Exception as exc:
            self._count_error(exc, f"storing block {flight.index} of {ref.uri}")
        finally:
            self._unstored.release()
            self._finish(flight)

    def _deliver(self, flight: _Flight, data: bytes) -> None:
        """Hand a verified block to the flight's waiting readers (and the memory LRU)."""
        flight.data = data
        if flight.keep:
            self._remember((flight.ref.version_key, flight.index), data)
        flight.done.set()

    def _fail(self, flights: list[_Flight], error: BaseException) -> None:
        """End flights that got no data with ``error`` (flights already ended are left alone)."""
        for flight in flights:
            if not flight.done.is_set():
                flight.error = error
                flight.done.set()
            self._finish(flight)

    def _finish(self, flight: _Flight) -> None:
        if flight.claimed:
            flight.claimed = False
            self._cache.release(flight.ref, flight.index)
        key = (flight.ref.version_key, flight.index)
        if self._flights.get(key) is flight:
            del self._flights[key]
        flight.stored.set()

    def _count_error(self, exc: Exception, what: str) -> None:
        self._errors[type(exc).__name__] = self._errors.get(type(exc).__name__, 0) + 1
        if isinstance(exc, MastfsError):
            log.debug("%s: %s", what, exc)
        else:
            log.error("%s failed unexpectedly", what, exc_info=exc)

    def source_of(self, ref: ProductRef) -> str | None:
        """Where the bytes of ``ref`` are read from now, by the same decision reads follow:
        ``s3://<bucket>/<key>`` or the HTTPS download URL (HTTPS for exclusive products, products found
        missing from S3 and ``source`` "http"); None when no allowed source has them (``source`` "s3"
        and no S3 copy)."""
        source = self._source_for(ref)
        if source is None:
            return None
        if source == "s3":
            assert self._s3 is not None and ref.s3_key
            return self._s3.location(ref.s3_key)
        return self._http.location(ref.uri)

    def _source_for(self, ref: ProductRef) -> str | None:
        """"s3" or "http" for ``ref`` per ``source`` (see the class); None when neither may serve it."""
        if self._source == "http":
            return "http"
        if self._source == "s3":
            if self._s3 is None or not ref.s3_key:
                return None
            return "s3"
        cloud = self._s3 is not None and ref.s3_key and not ref.exclusive
        return "s3" if cloud and ref.uri not in self._not_in_cloud else "http"

    def _note_recent(self, uri: str, source: str) -> None:
        self._recent.put(uri, source)

    def _transfer_started(self, ref: ProductRef, source: str) -> dict[str, Any]:
        entry = self._active.get(ref.version_key)
        if entry is None:
            entry = self._active[ref.version_key] = {
                "uri": ref.uri, "source": source, "bytes_done": 0, "bytes_total": ref.size, "transfers": 0,
            }
        entry["transfers"] += 1
        return entry

    def _transfer_ended(self, ref: ProductRef) -> None:
        entry = self._active[ref.version_key]
        entry["transfers"] -= 1
        if entry["transfers"] == 0:
            del self._active[ref.version_key]

    def _remember(self, key: BlockKey, data: bytes) -> None:
        """Keep a block in the in-memory LRU, dropping the oldest beyond the byte cap; but when the LRU is
        full and its oldest block is one of the same product before this one (read ahead, not yet read),
        leave this one out: it is on its way to disk and loads from there when reached. Otherwise a burst
        of readahead blocks larger than the LRU evicts the blocks the reader needs next, and each of them
        loaded back evicts the one after (on loopback 256 of the 279 blocks of a cold read came back
        from disk)."""
        if key in self._memory:
            return
        if self._memory.weight + len(data) > self._memory.capacity and evicts_nearer(next(iter(self._memory), None),
                                                                                     key):
            return
        self._memory.put(key, data)

    def _drop_behind(self, key: BlockKey) -> None:
        """Forget a block a sequential stream has left behind (the kernel's page cache and the block cache
        still have it), so the memory LRU keeps the blocks read ahead of the stream."""
        self._memory.pop(key)

    def _check_fits(self, ref: ProductRef, index: int, data: bytes) -> None:
        """Feed a block about to be handed over to the product's FITS check (DATASUM and CHECKSUM of each
        HDU once all its blocks passed; see :mod:`mastfs.fitscheck`); headers found in blocks seen
        before are parsed from their memory copies. Raises HduMismatch (counted per HDU)."""
        if not applies_to(ref.uri, ref.size) or self._cache.is_verified(ref):
            return
        vk = ref.version_key
        check = self._fits.get(vk)
        if check is None:
            check = FitsCheck(ref.size)
            self._fits.put(vk, check)
        try:
            check.add(block_start(index), data, self._memory.peek((vk, index + 1)) or b"")
            while check.next_header < ref.size:  # a header in a block that passed before it was known
                at = block_index(check.next_header)
                seen = self._memory.peek((vk, at)) if at != index else None
                before = check.next_header
                if seen is not None:
                    check.add(block_start(at), seen, self._memory.peek((vk, at + 1)) or b"")
                if check.next_header == before:
                    break  # not at hand, or the header runs past the bytes at hand
        except HduMismatch as exc:
            key = (vk, exc.span[0])
            self._hdu_failures[key] = self._hdu_failures.get(key, 0) + 1
            self._errors["IntegrityError"] = self._errors.get("IntegrityError", 0) + 1
            raise

    async def _note_fits_verified(self, ref: ProductRef) -> None:
        """Once every HDU of a product passed its FITS check and all its blocks are cached, mark the
        cached version verified (on disk): later reads, in this mount or the next, skip the sums (a warm
        re-read of a 1 GiB image spent a third of its daemon CPU re-summing blocks verified before)."""
        check = self._fits.peek(ref.version_key)
        if check is not None and check.complete and await self._cache.mark_verified(ref):
            self._fits.pop(ref.version_key)

    async def _drop_span(self, ref: ProductRef, mismatch: HduMismatch) -> None:
        """Drop every block (memory and disk) holding bytes of a failed HDU, so it is fetched again."""
        first, last = block_index(mismatch.span[0]), block_index(mismatch.span[1] - 1)
        for index in range(first, last + 1):
            key = (ref.version_key, index)
            self._memory.pop(key)
            await self._cache.discard(ref, index)

    def _forget_memory(self, version_key: str) -> None:
        for key in [key for key in self._memory if key[0] == version_key]:
            self._memory.pop(key)

    async def _verify_product(self, ref: ProductRef) -> bool | None:
        """Whole-file sha256 check of a complete product, one at a time per product (see
        :meth:`BlockCache.verify_product`); on a mismatch also forget its blocks in memory."""
        return await self._verifying.run(ref.version_key, lambda: self._verify_once(ref))

    async def _verify_once(self, ref: ProductRef) -> bool | None:
        result = await self._cache.verify_product(ref)
        if result is False:
            self._mismatched.add(ref.version_key)
            self._forget_memory(ref.version_key)
            self._errors["IntegrityError"] = self._errors.get("IntegrityError", 0) + 1
        return result

    # ------------------------------------------------------------------ sequential detection

    def _track(self, stream: ReadStream, offset: int, end: int, last: int) -> None:
        """Update the stream's sequential state; a sequential read (not the stream's first) drops the
        block before the one it starts in from memory (see :meth:`_drop_behind`) and, past block 0, grows
        the readahead window while the reader waits for the link (see :func:`waits_for_link` and
        :func:`grown_window`) and tops it up (see :func:`readahead_span`), less one block per block already
        in memory ahead of the reader: a reader slower than the link keeps about a memory LRU of blocks
        waiting for it and no more in flight, a reader waiting for the link keeps the whole window in
        flight. A jump resets the window. A read that starts a stream (its first, or one after a jump)
        counts as sequential when it starts at offset 0 and reaches past block 0 (a reader of the whole
        file: ``cp``, ``cat``; a header read stays within block 0), so readahead starts with it."""
        if stream.last_block < 0 or abs(offset - stream.next_offset) > stream.slack:
            whole_file = offset == 0 and last > 0  # from the start past block 0: cp, cat
            stream.next_offset = end
            stream.ahead = last
            stream.last_block = last - 1 if whole_file else last
            stream.window = 0
            if not whole_file:
                return
        stream.next_offset = max(stream.next_offset, end)
        first = block_index(offset)
        if first > 0:
            self._drop_behind((stream.ref.version_key, first - 1))
        most = self._max_readahead if stream.max_readahead is None else min(stream.max_readahead,
                                                                             self._max_readahead)
        if last == 0 or most == 0:
            return
        cap = self.link.window_cap(self._run_blocks, self._transfers, most)
        vk = stream.ref.version_key
        waiting = sum(1 for index in range(last + 1, stream.ahead + 1) if (vk, index) in self._memory)
        if last > stream.last_block or stream.window == 0:
            link_bound = waits_for_link(stream.starved, waiting, (vk, last) in self._memory)
            stream.window = grown_window(stream.window, cap, link_bound)
            stream.starved = False
            stream.last_block = max(stream.last_block, last)
        run = self.link.run_blocks(self._run_blocks, self._transfers, most)
        span = readahead_span(stream.ahead, last, stream.window - waiting, run, block_count(stream.ref.size) - 1)
        if span is None:
            return
        stream.ahead = span[1]
        started = self._ensure(stream.ref, span[0], span[1], keep=True)
        self._counts["readahead_blocks"] += sum(1 for flight in started if flight is not None)


def readahead_limit(max_readahead: int, memory_limit: int, transfers: int) -> int:
    """Largest readahead window in blocks: ``max_readahead``, but no more than the memory LRU holds plus
    one block per transfer (the block each run is assembling). Runs deliver out of order, so the blocks
    of a window arrive before the reader reaches them; a larger window only overflows the LRU (blocks
    evicted, then loaded back from disk) and raises the daemon's peak RSS (measured over a far link: 24
    blocks against an 8-block LRU peaked at 209-222 MB at 132 MB/s; 16 blocks at 170-179 MB, 106-121
    MB/s; over the S3-like link no slower)."""
    return max(0, min(max_readahead, memory_limit // BLOCK_SIZE + transfers))


def evicts_nearer(oldest: BlockKey | None, key: BlockKey) -> bool:
    """Whether putting block ``key`` into a full memory LRU whose least recent entry is ``oldest`` would
    evict a block of the same product before it: one read ahead that the reader reaches first."""
    return oldest is not None and oldest[0] == key[0] and oldest[1] < key[1]


def waits_for_link(starved: bool, waiting: int, arrived: bool) -> bool:
    """Whether a sequential reader reaching a new block is limited by the link: a read since the window
    last grew had to wait (``starved``), the new block has not ``arrived``, or no block ahead of it is
    waiting in memory (the reader has consumed everything the link delivered). A reader slower than the
    link always finds blocks waiting, so its window stops growing."""
    return starved or not arrived or waiting == 0


def grown_window(window: int, cap: int, starved: bool) -> int:
    """A stream's readahead window (blocks) at a new block: one block to begin with; then multiplied by
    :data:`WINDOW_GROWTH` when the reader is limited by the link (see :func:`waits_for_link`), else kept
    (the reader is the slower side: more readahead would only pile up unread blocks); never above ``cap``."""
    if window == 0:
        return min(1, cap)
    return min(window * WINDOW_GROWTH if starved else window, cap)


def readahead_span(ahead: int, last: int, window: int, run: int, final: int) -> tuple[int, int] | None:
    """The blocks to schedule for a stream that has read up to block ``last`` and scheduled up to block
    ``ahead``, with a ``window`` of blocks and runs of ``run`` blocks, in a file whose last block is
    ``final``: None while less than a run (or, for a window smaller than a run, half the window) of it is
    free, else ``(first, last)``: whole runs up to ``last + window``, or to the end of the file (a
    remainder shorter than a run waits: a short run pays a whole first-byte latency for less data)."""
    target = min(last + window, final)
    first = max(ahead, last) + 1
    step = min(run, max(1, window // 2))
    if first > target or target - first + 1 < step and target < final:
        return None
    if target < final:
        target = first + (target - first + 1) // step * step - 1
    return first, target


def _runs_of(indexes: list[int], most: int, blocks: list[int] | None = None) -> list[list[int]]:
    """Split ``indexes`` into groups of consecutive blocks (by ``blocks[i]``, default the indexes
    themselves) of at most ``most``, balanced in length: 5 consecutive blocks with most=4 give 3 + 2."""
    blocks = indexes if blocks is None else blocks
    streaks: list[list[int]] = []
    for position, index in enumerate(indexes):
        if streaks and blocks[position] == blocks[position - 1] + 1:
            streaks[-1].append(index)
        else:
            streaks.append([index])
    groups = []
    for streak in streaks:
        parts = -(-len(streak) // most)
        size = -(-len(streak) // parts)
        groups += [streak[i:i + size] for i in range(0, len(streak), size)]
    return groups
