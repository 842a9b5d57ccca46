"""Indexing of the packed sequences (``ProductTable`` rows, ``NameList`` names) the way ``list`` does."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar, overload

T = TypeVar("T")


@overload
def item_or_slice(index: int, length: int, item: Callable[[int], T]) -> T: ...
@overload
def item_or_slice(index: slice, length: int, item: Callable[[int], T]) -> list[T]: ...


def item_or_slice(index: int | slice, length: int, item: Callable[[int], T]) -> T | list[T]:
    """``sequence[index]`` of a sequence of ``length`` whose element ``i`` (``0 <= i < length``) is
    ``item(i)``: a negative index counts from the end, a slice gives a list. Raises IndexError out of
    range."""
    if isinstance(index, slice):
        return [item(i) for i in range(*index.indices(length))]
    if index < 0:
        index += length
    if not 0 <= index < length:
        raise IndexError(index)
    return item(index)
