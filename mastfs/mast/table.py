"""ProductTable: a product list held compactly, so an observation of 300,000 products fits in tens of MB.

A ``Mast.Caom.Products`` row parsed into a dict costs about 2 KB of Python objects; 300,000 of them would
cost 600 MB. A :class:`ProductTable` keeps the rows column by column in chunks of :data:`CHUNK_ROWS` rows,
each column of a chunk one zlib-compressed JSON list (about 50 bytes a row in all), plus the two values
``stat`` needs of every row unpacked: the size (an ``array('q')``) and the data rights (one byte). A row
is turned back into a :class:`~mastfs.mast.models.Product` only when asked for (``table[i]``), its chunk
decoded once and kept until another chunk is asked for.

:class:`ProductTableBuilder` packs rows page by page as they arrive (``add``), dropping rows without a
dataURI (logged) and later rows of a dataURI already seen (first row wins), so a paged answer is never
held as dicts longer than one page.
"""

from __future__ import annotations

import base64
import json
import logging
import zlib
from array import array
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, overload

from ..errors import BadResponse
from .models import Product

log = logging.getLogger(__name__)

CHUNK_ROWS = 1024
"""Rows per packed chunk: the unit of decoding when one row is asked for."""

_UNKNOWN_SIZE = -1
_RIGHTS_ABSENT, _RIGHTS_PUBLIC, _RIGHTS_EXCLUSIVE = 0, 1, 2


def _pack(values: list[Any]) -> bytes:
    return zlib.compress(json.dumps(values, separators=(",", ":"), allow_nan=False, default=str).encode(), 6)


def _unpack(blob: bytes) -> list[Any]:
    values: list[Any] = json.loads(zlib.decompress(blob))
    return values


def _rights_code(product: Product) -> int:
    rights = product.data_rights
    if rights is None:
        return _RIGHTS_ABSENT
    return _RIGHTS_EXCLUSIVE if product.is_exclusive else _RIGHTS_PUBLIC


class ProductTable(Sequence[Product]):
    """An immutable, compact sequence of products, unique by dataURI (see the module docstring).

    ``table[i]`` is a Product with every column of the table (null where its row had none);
    :meth:`size` and :meth:`exclusive` answer without decoding anything.
    """

    def __init__(self, columns: Sequence[str], chunks: list[dict[str, bytes]], sizes: array[int],
                 rights: bytes) -> None:
        if len(sizes) != len(rights) or len(chunks) != -(-len(sizes) // CHUNK_ROWS):
            raise BadResponse("product table with inconsistent parts")
        self.columns = tuple(columns)
        self._chunks = chunks
        self._sizes = sizes
        self._rights = rights
        self._decoded: tuple[int, list[Product]] | None = None

    def __len__(self) -> int:
        return len(self._sizes)

    def __eq__(self, other: object) -> bool:
        """Equal to a table packing the same rows, or to a sequence of the same Products."""
        if isinstance(other, ProductTable):
            return (self.columns == other.columns and self._chunks == other._chunks
                    and self._sizes == other._sizes and self._rights == other._rights)
        if isinstance(other, Sequence) and not isinstance(other, str | bytes):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    @overload
    def __getitem__(self, index: int) -> Product: ...
    @overload
    def __getitem__(self, index: slice) -> list[Product]: ...

    def __getitem__(self, index: int | slice) -> Product | list[Product]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        number, offset = divmod(index, CHUNK_ROWS)
        return self.chunk(number)[offset]

    def __iter__(self) -> Iterator[Product]:
        for number in range(len(self._chunks)):
            yield from self._decode(number)

    @property
    def chunk_count(self) -> int:
        return len(self._chunks)

    @staticmethod
    def chunk_start(number: int) -> int:
        """The index of the first row of chunk ``number``."""
        return number * CHUNK_ROWS

    def chunk(self, number: int) -> list[Product]:
        """The products of chunk ``number`` (rows ``number * CHUNK_ROWS`` on); the last one asked for is
        kept decoded."""
        if self._decoded is None or self._decoded[0] != number:
            self._decoded = (number, self._decode(number))
        return self._decoded[1]

    def _decode(self, number: int) -> list[Product]:
        first = number * CHUNK_ROWS
        count = min(CHUNK_ROWS, len(self) - first)
        packed = self._chunks[number]
        columns = [_unpack(packed[name]) if name in packed else [None] * count for name in self.columns]
        return [Product({name: values[row] for name, values in zip(self.columns, columns, strict=True)})
                for row in range(count)]

    def size(self, index: int) -> int | None:
        """The product's size as :attr:`Product.size` gives it, without decoding its row."""
        size = self._sizes[index]
        return None if size == _UNKNOWN_SIZE else size

    def rights_stated(self, index: int) -> bool:
        """Whether the product's row states its data rights (else the observation's apply)."""
        return self._rights[index] != _RIGHTS_ABSENT

    def exclusive(self, index: int) -> bool:
        """Whether the product's row says exclusive access (False when it states no rights)."""
        return self._rights[index] == _RIGHTS_EXCLUSIVE

    def packed_bytes(self) -> int:
        """Bytes the packed columns take (for figures and tests)."""
        return sum(len(blob) for chunk in self._chunks for blob in chunk.values()) + len(self._sizes) * 9

    # --- to and from the metadata cache ------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """A JSON value holding the packed table (base64 of the compressed columns)."""
        def text(blob: bytes) -> str:
            return base64.b64encode(blob).decode("ascii")

        return {"columns": list(self.columns), "sizes": text(self._sizes.tobytes()),
                "rights": text(bytes(self._rights)),
                "chunks": [{name: text(blob) for name, blob in chunk.items()} for chunk in self._chunks]}

    @classmethod
    def from_json(cls, value: Any) -> ProductTable:
        """The table :meth:`to_json` gave. Raises BadResponse when ``value`` is not one."""
        try:
            sizes: array[int] = array("q")
            sizes.frombytes(base64.b64decode(value["sizes"]))
            chunks = [{str(name): base64.b64decode(blob) for name, blob in chunk.items()}
                      for chunk in value["chunks"]]
            return cls([str(name) for name in value["columns"]], chunks, sizes,
                       base64.b64decode(value["rights"]))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BadResponse(f"not a packed product table: {exc}") from exc

    @classmethod
    def of(cls, rows: Iterable[Any]) -> ProductTable:
        """A table of raw rows (or Products) at once; see :class:`ProductTableBuilder`."""
        builder = ProductTableBuilder()
        builder.add(rows)
        return builder.finish()


class ProductTableBuilder:
    """Packs product rows as they arrive (one page at a time) into a :class:`ProductTable`."""

    def __init__(self) -> None:
        self._columns: dict[str, None] = {}
        self._chunks: list[dict[str, bytes]] = []
        self._pending: list[Product] = []
        self._sizes: array[int] = array("q")
        self._rights = bytearray()
        self._seen: set[int] = set()  # hashes of the dataURIs taken (a str per row would cost 100 bytes)
        self.dropped = 0
        self.duplicates = 0

    def __len__(self) -> int:
        return len(self._sizes)

    def add(self, rows: Iterable[Any]) -> None:
        """Pack ``rows`` (raw row objects or Products): rows without a dataURI are dropped (counted in
        ``dropped``), a dataURI already packed is skipped (``duplicates``)."""
        for row in rows:
            try:
                product = row if isinstance(row, Product) else Product.from_row(row)
            except BadResponse:
                self.dropped += 1
                continue
            uri_hash = hash(product.data_uri)
            if uri_hash in self._seen:
                self.duplicates += 1
                continue
            self._seen.add(uri_hash)
            self._columns.update(dict.fromkeys(product.fields))
            size = product.size
            self._sizes.append(_UNKNOWN_SIZE if size is None else size)
            self._rights.append(_rights_code(product))
            self._pending.append(product)
            if len(self._pending) == CHUNK_ROWS:
                self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        names = {name for product in self._pending for name in product.fields}
        self._chunks.append({name: _pack([product.fields.get(name) for product in self._pending])
                             for name in self._columns if name in names})
        self._pending = []

    def finish(self) -> ProductTable:
        """The table of every row added (the builder is spent)."""
        self._flush()
        if self.dropped:
            log.warning("dropped %d product row(s) without a dataURI", self.dropped)
        self._seen = set()
        return ProductTable(list(self._columns), self._chunks, self._sizes, bytes(self._rights))
