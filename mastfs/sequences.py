"""The base of the packed sequences (``ProductTable`` rows, ``NameList`` names): indexing the way ``list``
does, over one method that makes an element."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar, overload

T = TypeVar("T")


class PackedSequence(Sequence[T]):
    """A read-only sequence whose element ``i`` (``0 <= i < len(self)``) is ``self._item(i)``: a negative
    index counts from the end, a slice gives a list, an index out of range raises IndexError.
    Subclasses define ``__len__`` and ``_item``."""

    __slots__ = ()

    @overload
    def __getitem__(self, index: int) -> T: ...
    @overload
    def __getitem__(self, index: slice) -> list[T]: ...

    def __getitem__(self, index: int | slice) -> T | list[T]:
        length = len(self)
        if isinstance(index, slice):
            return [self._item(i) for i in range(*index.indices(length))]
        if index < 0:
            index += length
        if not 0 <= index < length:
            raise IndexError(index)
        return self._item(index)

    def _item(self, index: int) -> T:
        """Element ``index``, already checked to be in range."""
        raise NotImplementedError
