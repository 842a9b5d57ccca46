"""SingleFlight: one run of a producer per key at a time, its outcome shared by every concurrent caller.

Used by the archive (one MAST query per cache key), the tree (one listing per directory) and the reader
(one whole-file verification per product version). Nothing is cached once a flight has landed: callers
that keep results keep them themselves.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

import trio

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class _Flight(Generic[V]):
    __slots__ = ("done", "landed", "value", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.landed = False
        self.value: V | None = None
        self.error: Exception | None = None


class SingleFlight(Generic[K, V]):
    """Concurrent :meth:`run` calls for one key share one ``produce()``.

    The first caller runs ``produce()``; the others wait and get its value or raise its exception (the
    same object). If the producing task is cancelled, its cancellation stays its own: one waiting
    caller takes over and runs its own ``produce()`` for the rest.
    """

    def __init__(self) -> None:
        self._flights: dict[K, _Flight[V]] = {}

    def __len__(self) -> int:
        """How many keys have a flight in progress."""
        return len(self._flights)

    def __contains__(self, key: object) -> bool:
        return key in self._flights

    async def run(self, key: K, produce: Callable[[], Awaitable[V]]) -> V:
        """The value of the flight for ``key``: joined if one is in progress, else started with
        ``produce()``. Raises what that ``produce()`` raised; cancellation of this caller propagates."""
        while (flight := self._flights.get(key)) is not None:
            await flight.done.wait()
            if flight.error is not None:
                raise flight.error
            if flight.landed:
                return flight.value  # type: ignore[return-value]
            # the producer was cancelled: loop, perhaps to become the producer
        flight = self._flights[key] = _Flight()
        try:
            flight.value = await produce()
            flight.landed = True
            return flight.value
        except Exception as exc:
            flight.error = exc
            raise
        finally:
            del self._flights[key]
            flight.done.set()

    async def run_detached(self, key: K, produce: Callable[[], Awaitable[V]]) -> V:
        """Like :meth:`run`, but ``produce()`` runs in a background (trio system) task and every caller,
        the first included, only waits for it: a caller whose wait is cancelled (a Ctrl-C on ``ls``)
        leaves the flight going, and a later caller of ``key`` joins it instead of starting over.
        ``produce()`` must bound its own time; if the daemon stops first, waiters get RuntimeError."""
        flight = self._flights.get(key)
        if flight is None:
            flight = self._flights[key] = _Flight()
            trio.lowlevel.spawn_system_task(self._fly, key, flight, produce, name=f"flight {key!r}")
        await flight.done.wait()
        if flight.error is not None:
            raise flight.error
        return flight.value  # type: ignore[return-value]

    async def _fly(self, key: K, flight: _Flight[V], produce: Callable[[], Awaitable[V]]) -> None:
        try:
            flight.value = await produce()
            flight.landed = True
        except Exception as exc:
            flight.error = exc
        except BaseException:  # cancelled: the trio run (the daemon) is ending
            flight.error = RuntimeError(f"flight {key!r} cancelled as the daemon stops")
            raise
        finally:
            del self._flights[key]
            flight.done.set()
