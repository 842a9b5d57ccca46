"""Fetchers: verified byte ranges of archive files from S3 (s3.py) or MAST's HTTPS download (http.py)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from ..versions import ObjectVersion

FetchBlocks = Callable[..., Awaitable[None]]


async def fetch_one_range(fetch_blocks: FetchBlocks, name: str, start: int, end: int,
                          version: ObjectVersion | None = None) -> bytes:
    """Bytes ``[start, end)`` of ``name`` (of ``version`` only, when given) read through a fetcher's
    ``fetch_blocks`` as a single block; raises whatever ``fetch_blocks`` raises."""
    blocks: list[bytes] = []

    async def keep(block: bytes) -> None:
        blocks.append(block)

    await fetch_blocks(name, (start, end), keep, version)
    return blocks[0]
