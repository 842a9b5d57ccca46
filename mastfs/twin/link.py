"""The network the twin pretends to sit behind.

On loopback a single stream runs as fast as two cores can copy and a request costs nothing, which no client
of the real archive sees. A :class:`Link` adds what a real one has: a first-byte latency on every answer
(product bodies, and metadata: HEAD, LIST, path_lookup, invoke, ...; the metadata latency may be set
apart) and a bandwidth cap per connection for product bodies. AWS documents about 85-90 MB/s per request
for S3 and recommends parallel 8-16 MB range requests for more ("Performance design patterns for Amazon
S3"); :data:`S3_LIKE` models that, :data:`FAR` a client on another continent. The default link is
loopback (no delay, no cap). The twin's own admin endpoints (``/__twin__/...``) are never delayed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

Piece = TypeVar("Piece", bytes, memoryview)

S3_LIKE = {"first_byte_ms": 30.0, "stream_mb_s": 90.0}
"""A link like S3's from a nearby client: 30 ms to the first byte, 90 MB/s per connection."""
FAR = {"first_byte_ms": 120.0, "stream_mb_s": 25.0}
"""A far link (a laptop in Europe reading us-east-1): 120 ms to the first byte, 25 MB/s per connection."""


class Link:
    """First-byte latency (ms) of every answer, per-connection bandwidth (MB/s, 0 = unlimited) of product
    bodies, and the first-byte latency of metadata answers (``metadata_ms``; None: the same as
    ``first_byte_ms``).

    Thread-safe: :meth:`set` applies to responses started afterwards. Raises ValueError on negative values.
    """

    def __init__(self, first_byte_ms: float = 0.0, stream_mb_s: float = 0.0,
                 metadata_ms: float | None = None) -> None:
        self._lock = threading.Lock()
        self.set(first_byte_ms, stream_mb_s, metadata_ms)

    def set(self, first_byte_ms: float, stream_mb_s: float, metadata_ms: float | None = None) -> None:
        first_byte_ms, stream_mb_s = float(first_byte_ms), float(stream_mb_s)
        metadata = first_byte_ms if metadata_ms is None else float(metadata_ms)
        if not (first_byte_ms >= 0 and stream_mb_s >= 0 and metadata >= 0):
            raise ValueError("first_byte_ms, stream_mb_s and metadata_ms must be numbers >= 0")
        with self._lock:
            self._first_byte_ms, self._stream_mb_s, self._metadata_ms = first_byte_ms, stream_mb_s, metadata

    def to_json(self) -> dict[str, float]:
        """``{"first_byte_ms", "stream_mb_s", "metadata_ms"}`` (metadata_ms always a number)."""
        with self._lock:
            return {"first_byte_ms": self._first_byte_ms, "stream_mb_s": self._stream_mb_s,
                    "metadata_ms": self._metadata_ms}

    def delay_metadata(self) -> None:
        """Sleep the first-byte latency of a metadata answer (call before sending its status line)."""
        with self._lock:
            delay = self._metadata_ms / 1000
        if delay:
            time.sleep(delay)

    def pace(self, pieces: Iterable[Piece]) -> Iterator[Piece]:
        """Yield ``pieces`` no faster than the link allows: after the first-byte latency, each piece once
        it (and everything before it) would have crossed a link of this bandwidth."""
        with self._lock:
            delay, rate = self._first_byte_ms / 1000, self._stream_mb_s * 1e6
        if not delay and not rate:
            yield from pieces
            return
        time.sleep(delay)
        started, sent = time.monotonic(), 0
        for piece in pieces:
            sent += len(piece)
            if rate:
                early = started + sent / rate - time.monotonic()
                if early > 0:
                    time.sleep(early)
            yield piece
