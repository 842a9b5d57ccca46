"""LRU: a bounded mapping that drops its least recently used entries first.

Bounded by entry count (weight 1 each) or, with ``weigh``, by total weight (e.g. bytes). Used for the
archive's memory layer, the tree's product refs and forgotten nodes, and the reader's block memory and
recent-products list. Not thread-safe: use it from the trio thread only.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


def _one(_value: object) -> int:
    return 1


class LRU(Generic[K, V]):
    """At most ``capacity`` total weight of entries (``weigh(value)``, 1 by default), oldest out first.

    :meth:`get` and :meth:`put` make an entry the most recent; :meth:`peek`, ``in`` and iteration do
    not. A value weighing more than the capacity on its own is not kept.
    """

    def __init__(self, capacity: int, weigh: Callable[[V], int] = _one) -> None:
        self.capacity = capacity
        self._weigh = weigh
        self._entries: OrderedDict[K, V] = OrderedDict()
        self.weight = 0
        """Total weight of the entries held."""

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[K]:
        """Keys, least recently used first."""
        return iter(self._entries)

    def values(self) -> Iterator[V]:
        """Values, least recently used first."""
        return iter(self._entries.values())

    def items(self) -> Iterator[tuple[K, V]]:
        """(key, value) pairs, least recently used first."""
        return iter(self._entries.items())

    def get(self, key: K) -> V | None:
        """The value of ``key`` (now the most recent), or None."""
        if key not in self._entries:
            return None
        self._entries.move_to_end(key)
        return self._entries[key]

    def peek(self, key: K) -> V | None:
        """The value of ``key`` without touching its recency, or None."""
        return self._entries.get(key)

    def put(self, key: K, value: V) -> None:
        """Set ``key`` (now the most recent), then drop the oldest entries beyond the capacity."""
        weight = self._weigh(value)
        self.pop(key)
        if weight > self.capacity:
            return
        self._entries[key] = value
        self.weight += weight
        while self.weight > self.capacity:
            _, old = self._entries.popitem(last=False)
            self.weight -= self._weigh(old)

    def pop(self, key: K) -> V | None:
        """Remove ``key`` and return its value, or None when absent."""
        if key not in self._entries:
            return None
        value = self._entries.pop(key)
        self.weight -= self._weigh(value)
        return value

    def clear(self) -> None:
        self._entries.clear()
        self.weight = 0
