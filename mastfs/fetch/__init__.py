"""Fetchers: verified byte ranges of archive files from S3 (s3.py) or MAST's HTTPS download (http.py)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

FetchBlocks = Callable[[str, Sequence[int], Callable[[bytes], Awaitable[None]]], Awaitable[None]]


def check_bounds(bounds: Sequence[int]) -> None:
    """Raise ValueError unless ``bounds`` (block edges of one fetch) has two or more values rising
    strictly from >= 0."""
    if len(bounds) < 2 or bounds[0] < 0 or any(b <= a for a, b in zip(bounds, bounds[1:], strict=False)):
        raise ValueError(f"bounds must rise strictly from >= 0: {list(bounds)!r}")
