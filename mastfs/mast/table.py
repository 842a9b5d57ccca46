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
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from ..errors import BadResponse
from ..sequences import PackedSequence
from .models import ID_COLUMNS, MAX_SIZE, Product, normalise_id

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


class ProductTable(PackedSequence[Product]):
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

    def _item(self, index: int) -> Product:
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

    def chunk_columns(self, number: int, names: Sequence[str]) -> list[list[Any]]:
        """The values of columns ``names`` in chunk ``number``, one list per name (nulls where a column
        is absent), without making Products."""
        count = min(CHUNK_ROWS, len(self) - number * CHUNK_ROWS)
        packed = self._chunks[number]
        return [_unpack(packed[name]) if name in packed else [None] * count for name in names]

    def projected(self, names: Sequence[str]) -> Iterator[Product]:
        """Every row in order as a Product holding only columns ``names`` (cheaper than ``iter``)."""
        for number in range(len(self._chunks)):
            columns = self.chunk_columns(number, names)
            for values in zip(*columns, strict=True):
                yield Product(dict(zip(names, values, strict=True)))

    def _decode(self, number: int) -> list[Product]:
        first = number * CHUNK_ROWS
        count = min(CHUNK_ROWS, len(self) - first)
        packed = self._chunks[number]
        names = [name for name in self.columns if name in packed]
        columns = [_unpack(packed[name]) for name in names]
        nulls = dict.fromkeys(name for name in self.columns if name not in packed)
        return [Product({**nulls, **{name: values[row] for name, values in zip(names, columns, strict=True)}})
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
    """Packs product rows as they arrive (one page at a time) into a :class:`ProductTable`.

    Rows are taken column by column straight from the raw row objects (no Product per row): a
    300,000-row answer is packed in seconds. Id columns are normalised as :func:`normalise_row` does."""

    def __init__(self) -> None:
        self._columns: dict[str, None] = {}
        self._chunks: list[dict[str, bytes]] = []
        self._pending: list[Mapping[str, Any]] = []
        self._sizes: array[int] = array("q")
        self._rights = bytearray()
        self._seen: set[int] = set()  # hashes of the dataURIs taken (a str per row would cost 100 bytes)
        self._last_keys: Any = None
        self.dropped = 0
        self.duplicates = 0

    def __len__(self) -> int:
        return len(self._sizes)

    def add(self, rows: Iterable[Any]) -> None:
        """Pack ``rows`` (raw row objects or Products): rows without a dataURI are dropped (counted in
        ``dropped``), a dataURI already packed is skipped (``duplicates``)."""
        for row in rows:
            fields = row.fields if isinstance(row, Product) else row
            uri = fields.get("dataURI") if isinstance(fields, Mapping) else None
            if uri is None or not isinstance(uri, str | int | float) or not str(uri).strip():
                self.dropped += 1
                continue
            uri_hash = hash(str(uri).strip())
            if uri_hash in self._seen:
                self.duplicates += 1
                continue
            self._seen.add(uri_hash)
            keys = fields.keys()
            if keys != self._last_keys:
                self._columns.update(dict.fromkeys(map(str, keys)))
                self._last_keys = keys
            self._sizes.append(_packed_size(fields.get("size")))
            self._rights.append(_packed_rights(fields.get("dataRights")))
            self._pending.append(fields)
            if len(self._pending) == CHUNK_ROWS:
                self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        chunk = {}
        for name in self._columns:
            values = [row.get(name) for row in self._pending]
            if name in ID_COLUMNS:
                values = [value if type(value) is str and value and not value[0].isspace()
                          and not value[-1].isspace() else normalise_id(value) for value in values]
            if any(value is not None for value in values):
                chunk[name] = _pack(values)
        self._chunks.append(chunk)
        self._pending = []

    def finish(self) -> ProductTable:
        """The table of every row added (the builder is spent)."""
        self._flush()
        if self.dropped:
            log.warning("dropped %d product row(s) without a dataURI", self.dropped)
        self._seen = set()
        return ProductTable(list(self._columns), self._chunks, self._sizes, bytes(self._rights))


def _packed_size(value: Any) -> int:
    """A row's ``size`` as :attr:`Product.size` reads it, -1 for unknown."""
    if type(value) is int:
        return value if 0 <= value <= MAX_SIZE else _UNKNOWN_SIZE
    size = Product({"size": value}).size
    return _UNKNOWN_SIZE if size is None else size


def _packed_rights(value: Any) -> int:
    """A row's ``dataRights`` as :attr:`Product.data_rights` reads it, as one byte."""
    if value == "PUBLIC":
        return _RIGHTS_PUBLIC
    product = Product({"dataRights": value})
    if product.data_rights is None:
        return _RIGHTS_ABSENT
    return _RIGHTS_EXCLUSIVE if product.is_exclusive else _RIGHTS_PUBLIC
