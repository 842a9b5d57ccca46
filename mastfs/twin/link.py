"""The network the twin pretends to sit behind, for product bodies (S3 GetObject, HTTPS downloads).

On loopback a single stream runs as fast as two cores can copy, which no client of the real archive sees.
A :class:`Link` adds what a real one has: a first-byte latency per response and a bandwidth cap per
connection. AWS documents about 85-90 MB/s per request for S3 and recommends parallel 8-16 MB range
requests for more ("Performance design patterns for Amazon S3"); :data:`S3_LIKE` models that. The default
link is loopback (no delay, no cap). Metadata responses are never paced.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

Piece = TypeVar("Piece", bytes, memoryview)

S3_LIKE = {"first_byte_ms": 30.0, "stream_mb_s": 90.0}
"""A link like S3's from a nearby client: 30 ms to the first byte, 90 MB/s per connection."""


class Link:
    """First-byte latency (ms) and per-connection bandwidth (MB/s, 0 = unlimited) of product bodies.

    Thread-safe: :meth:`set` applies to responses started afterwards. Raises ValueError on negative values.
    """

    def __init__(self, first_byte_ms: float = 0.0, stream_mb_s: float = 0.0) -> None:
        self._lock = threading.Lock()
        self.set(first_byte_ms, stream_mb_s)

    def set(self, first_byte_ms: float, stream_mb_s: float) -> None:
        first_byte_ms, stream_mb_s = float(first_byte_ms), float(stream_mb_s)
        if not (first_byte_ms >= 0 and stream_mb_s >= 0):
            raise ValueError("first_byte_ms and stream_mb_s must be numbers >= 0")
        with self._lock:
            self._first_byte_ms, self._stream_mb_s = first_byte_ms, stream_mb_s

    def to_json(self) -> dict[str, float]:
        with self._lock:
            return {"first_byte_ms": self._first_byte_ms, "stream_mb_s": self._stream_mb_s}

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
