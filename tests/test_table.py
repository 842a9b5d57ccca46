"""ProductTable: product rows packed column by column (no I/O)."""

from __future__ import annotations

import pytest

from mastfs.errors import BadResponse
from mastfs.mast.models import Product
from mastfs.mast.table import CHUNK_ROWS, ProductTable, ProductTableBuilder


def rows(count: int, start: int = 0) -> list[dict]:
    return [{"dataURI": f"mast:JWST/product/f{i}_cal.fits", "obsID": i, "size": i * 10 if i % 7 else None,
             "dataRights": "EXCLUSIVE_ACCESS" if i % 5 == 0 else "PUBLIC", "calib_level": 2,
             "productType": "SCIENCE"} for i in range(start, start + count)]


def test_pages_packed_as_they_come_read_back_as_products():
    builder = ProductTableBuilder()
    builder.add(rows(CHUNK_ROWS + 10))
    builder.add(rows(500, start=CHUNK_ROWS + 10))
    builder.add(rows(3))  # already packed: first row wins
    builder.add([{"size": 1}, "not a row"])  # no dataURI: dropped
    table = builder.finish()
    assert len(table) == CHUNK_ROWS + 510 and builder.duplicates == 3 and builder.dropped == 2
    for index in (0, 5, 7, CHUNK_ROWS, len(table) - 1):
        expected = Product.from_row(rows(1, start=index)[0])
        product = table[index]
        assert product.data_uri == expected.data_uri and product.obsid == str(index)
        assert product.size == expected.size == table.size(index)
        assert table.exclusive(index) == expected.is_exclusive and table.rights_stated(index)
    assert [p.data_uri for p in table] == [r["dataURI"] for r in rows(CHUNK_ROWS + 510)]


def test_a_table_survives_the_metadata_cache_format():
    table = ProductTable.of(rows(2000))
    again = ProductTable.from_json(table.to_json())
    assert again == table and list(again) == list(table)
    with pytest.raises(BadResponse):
        ProductTable.from_json({"columns": ["dataURI"], "chunks": "nonsense"})


def test_packed_rows_are_small():
    table = ProductTable.of(rows(20_000))
    assert table.packed_bytes() / len(table) < 60  # bytes a row, vs ~2 KB as a dict


def test_projected_rows_hold_only_the_asked_columns():
    table = ProductTable.of(rows(10))
    projected = list(table.projected(("dataURI", "size")))
    assert projected[3].fields == {"dataURI": "mast:JWST/product/f3_cal.fits", "size": 30}
