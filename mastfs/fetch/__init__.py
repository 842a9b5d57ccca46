"""Fetchers: verified byte ranges of archive files from S3 (s3.py) or MAST's HTTPS download (http.py)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from ..versions import ObjectVersion


class Fetcher(Protocol):
    """What the reader needs of a fetcher: the version a file is at now, verified consecutive blocks of
    one version of it (conditional on ``version`` when given), handed over in order, and a user-facing
    location of that file."""

    def location(self, name: str, /) -> str: ...

    async def stat(self, name: str, /) -> ObjectVersion: ...

    async def fetch_blocks(self, name: str, bounds: Sequence[int],
                           deliver: Callable[[bytes], Awaitable[None]],
                           version: ObjectVersion | None = None, /) -> None: ...


class WholeFileFetcher(Fetcher, Protocol):
    """A fetcher that can also download a file that states no length, whole (at most ``most`` bytes)."""

    async def fetch_whole(self, name: str, most: int, /) -> bytes: ...


class ColdStartFetcher(Fetcher, Protocol):
    """A fetcher with a costly client to build, which :meth:`prepare` builds ahead of the first read."""

    async def prepare(self) -> None: ...


def check_bounds(bounds: Sequence[int]) -> None:
    """Raise ValueError unless ``bounds`` (block edges of one fetch) has two or more values rising
    strictly from >= 0."""
    if len(bounds) < 2 or bounds[0] < 0 or any(b <= a for a, b in zip(bounds, bounds[1:], strict=False)):
        raise ValueError(f"bounds must rise strictly from >= 0: {list(bounds)!r}")
