"""The one retry policy of mastfs: exponential backoff with full jitter, Retry-After, an overall deadline.

Every network operation (metadata queries, byte ranges, path lookups) goes through :class:`RetryPolicy`;
no other module loops on failures.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import trio

from .errors import Retryable, Unavailable

if TYPE_CHECKING:
    from .config import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """Retry transient failures of an async operation.

    attempts: the most tries in all; base_delay/max_delay: backoff bounds in seconds;
    deadline: the most seconds the whole operation, retries and waits included, may take.
    """

    attempts: int = 5
    base_delay: float = 0.2
    max_delay: float = 5.0
    deadline: float = 30.0

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryPolicy:
        """The daemon's policy: ``settings.retries`` attempts within ``settings.deadline`` seconds."""
        return cls(attempts=settings.retries, deadline=settings.deadline)

    def backoff(self, attempt: int, retry_after: float | None) -> float:
        """Seconds to wait before try number ``attempt + 1`` (attempt counts from 1)."""
        delay = random.uniform(0, min(self.max_delay, self.base_delay * 2 ** (attempt - 1)))
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.max_delay))
        return delay

    async def run(self, op: Callable[[], Awaitable[T]], *, what: str) -> T:
        """Await ``op()``, retrying it while it raises :class:`Retryable`.

        Returns op's result. Raises :class:`Unavailable` when the attempts or the deadline run out
        (chained to the last failure); any other exception of ``op`` propagates at once. Cancellation
        propagates at once too.
        """
        last: Retryable | None = None
        try:
            with trio.fail_after(self.deadline):
                for attempt in range(1, self.attempts + 1):
                    try:
                        return await op()
                    except Retryable as exc:
                        last = exc
                        if attempt == self.attempts:
                            break
                        delay = self.backoff(attempt, exc.retry_after)
                        log.debug("%s failed (%s); retry %d in %.2fs", what, exc, attempt, delay)
                        await trio.sleep(delay)
        except trio.TooSlowError:
            raise Unavailable(f"{what}: no answer within {self.deadline:g}s ({last or 'timed out'})") from last
        raise Unavailable(f"{what}: failed {self.attempts} times ({last})") from last
