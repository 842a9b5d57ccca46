"""Building the services of a mount, or of a ``mast://`` user, from its settings, in one place: the HTTP
client, MastClient, Archive, BlockCache, fetchers, ByteReader and the Tree over them (:func:`open_services`),
and the one probe of MAST after mounting (:class:`MastProbe`)."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .auth import TokenKeeper
from .config import Settings
from .errors import BadResponse, MastfsError, Unavailable
from .tree import Tree

if TYPE_CHECKING:
    from .archive import Archive
    from .blockcache import BlockCache
    from .mast.client import MastClient
    from .reader import ByteReader

log = logging.getLogger(__name__)

PROBE_WAIT = 5.0
"""Seconds the one probe of MAST after mounting may take (``mastfs mount`` waits this long at most for it)."""


@dataclass
class Services:
    """Everything a mount needs, built by :func:`open_services`."""

    tree: Tree
    archive: Archive
    reader: ByteReader
    cache: BlockCache
    client: MastClient
    tokens: TokenKeeper
    mast_probe: MastProbe = field(default_factory=lambda: MastProbe())


class MastProbe:
    """Whether MAST answered the one probe made after mounting: ``state`` is "pending", "ok" or
    "unreachable" (then ``problem`` says why)."""

    def __init__(self) -> None:
        self.state = "pending"
        self.problem = ""

    async def run(self, client: MastClient, mast_url: str) -> None:
        """Probe MAST once; log one WARNING when it cannot be reached. Never raises (but cancellation)."""
        try:
            await client.probe(PROBE_WAIT)
        except (Unavailable, BadResponse) as exc:
            self.state, self.problem = "unreachable", str(exc)
            log.warning("MAST cannot be reached at %s (%s); listings and reads that need it fail "
                        "with EIO until it can (mastfs status shows the errors)", mast_url, exc)
        except MastfsError:
            self.state = "ok"  # it answered, if only to refuse
        else:
            self.state = "ok"

    def as_dict(self) -> dict[str, str]:
        return {"state": self.state, "problem": self.problem}


@contextlib.asynccontextmanager
async def open_services(settings: Settings, token: str | TokenKeeper | None) -> AsyncIterator[Services]:
    """Build the HTTP client, MastClient, Archive, BlockCache, fetchers and ByteReader, and the Tree over
    them; close them all on exit. ``token`` is the mount's TokenKeeper (a plain token: one that is never
    re-read). Raises OSError when the cache directory is unusable."""
    from .archive import Archive
    from .blockcache import BlockCache, ProductRef
    from .fetch.http import HttpFetcher
    from .fetch.s3 import S3Fetcher
    from .mast.client import MastClient, make_http_client
    from .reader import ByteReader
    from .retry import RetryPolicy

    os.makedirs(settings.cache_dir, mode=0o700, exist_ok=True)
    os.chmod(settings.cache_dir, 0o700)  # blocks of exclusive-access data may live here
    policy = RetryPolicy.from_settings(settings)
    tokens = token if isinstance(token, TokenKeeper) else TokenKeeper(settings, token, "given" if token else "none",
                                                                        renewable=False)
    async with make_http_client(settings) as http:
        client = MastClient(http, settings, token_provider=tokens.current)
        archive = Archive(client, settings)
        cache = BlockCache(settings.blocks_dir, settings.cache_size, settings.min_free_space,
                           peer_wait=settings.deadline)
        http_fetcher = HttpFetcher(http, settings.mast_url, tokens, policy, settings.token_hosts)
        s3_fetcher = S3Fetcher(settings, policy) if settings.source != "http" else None
        try:
            async with ByteReader(cache, http_fetcher, s3_fetcher, settings.source,
                                  settings.transfers, deadline=settings.deadline) as reader:
                tree = Tree(archive, reader, settings, has_token=tokens.current() is not None,
                            product_ref=ProductRef, cache_usage=cache.usage,
                            cached_bytes=cache.product_bytes)
                yield Services(tree, archive, reader, cache, client, tokens)
        finally:
            await archive.aclose()
