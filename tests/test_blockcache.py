"""BlockCache on a real directory: geometry, verified reads, atomicity, eviction, persistence."""

from __future__ import annotations

import hashlib
import os

import pytest
import trio

from mastfs.blockcache import (
    BLOCK_SIZE,
    HEADER_BLOCK_SIZE,
    HEADER_SIZE,
    LAYOUT,
    BlockCache,
    ProductRef,
    block_count,
    block_index,
    block_span,
    block_start,
)

MiB = 1024 * 1024


def product_bytes(size: int, seed: int = 1) -> bytes:
    """Deterministic, non-repeating content of ``size`` bytes."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


def block_of(content: bytes, index: int) -> bytes:
    start, end = block_span(index, len(content))
    return content[start:end]


def block_files(directory) -> list[str]:
    root = os.path.join(directory, LAYOUT)
    return sorted(
        os.path.join(dirpath, name)
        for dirpath, _, names in os.walk(root)
        for name in names
        if name.isdigit()
    )


def damage(path: str, how: str) -> None:
    """Damage a block file the way a crash, a bad disk or a meddling user could."""
    if how == "delete":
        os.unlink(path)
        return
    with open(path, "r+b") as handle:
        if how == "flip":
            handle.seek(HEADER_SIZE + 1234)
            byte = handle.read(1)
            handle.seek(HEADER_SIZE + 1234)
            handle.write(bytes([byte[0] ^ 1]))
        elif how == "truncate":
            handle.truncate(HEADER_SIZE + 4999)
        elif how == "torn":
            handle.truncate(HEADER_SIZE + 100)
        elif how == "extend":
            handle.seek(0, os.SEEK_END)
            handle.write(b"\0")
        elif how == "header":
            handle.seek(9)
            handle.write(b"\xff")
        else:
            handle.seek(HEADER_SIZE)
            handle.write(b"XXXX")


def write_file(path: str, payload: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(payload)


def read_file(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


def disk_bytes(directory) -> int:
    return sum(os.path.getsize(path) for path in block_files(directory))


def test_geometry_covers_every_byte_once():
    for size in (1, 2880, HEADER_BLOCK_SIZE, HEADER_BLOCK_SIZE + 1, HEADER_BLOCK_SIZE + 3 * BLOCK_SIZE + 17):
        count = block_count(size)
        spans = [block_span(index, size) for index in range(count)]
        assert spans[0][0] == 0 and spans[-1][1] == size
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
        assert all(start < end for start, end in spans)
        for offset in {0, size // 2, size - 1}:
            index = block_index(offset)
            assert block_span(index, size)[0] <= offset < block_span(index, size)[1]
            assert block_start(index) == block_span(index, size)[0]
    assert block_count(0) == 0
    assert block_span(0, 10**9) == (0, 64 * 1024)


def test_version_key_hides_the_uri_and_tracks_size_and_checksum():
    ref = ProductRef("mast:JWST/product/secret_name.fits", 1000)
    assert "secret" not in ref.version_key and len(ref.version_key) == 64
    assert ProductRef(ref.uri, 1001).version_key != ref.version_key
    assert ProductRef(ref.uri, 1000, sha256="ab" * 32).version_key != ref.version_key
    assert ProductRef(ref.uri, 1000, s3_key="x").version_key == ref.version_key


def test_store_load_and_reopen(tmp_path):
    content = product_bytes(HEADER_BLOCK_SIZE + BLOCK_SIZE + 1000)
    ref = ProductRef("mast:TEST/a.fits", len(content))

    async def main():
        cache = BlockCache(str(tmp_path), 100 * MiB, 0)
        await cache.open()
        assert await cache.load(ref, 0) is None
        for index in range(block_count(ref.size)):
            assert await cache.store(ref, index, block_of(content, index))
        assert cache.entries == 3 and cache.is_complete(ref)
        assert cache.usage() == (len(content) + 3 * HEADER_SIZE, 100 * MiB)
        reopened = BlockCache(str(tmp_path), 100 * MiB, 0)
        await reopened.open()
        assert reopened.entries == 3 and reopened.usage()[0] == cache.usage()[0]
        for index in range(3):
            assert await reopened.load(ref, index) == block_of(content, index)

    trio.run(main)
    assert all("a.fits" not in path for path in block_files(tmp_path))


@pytest.mark.parametrize("direct_io", [True, False])
def test_block_files_hold_exactly_header_and_data_with_or_without_direct_io(tmp_path, direct_io):
    content = product_bytes(HEADER_BLOCK_SIZE + BLOCK_SIZE + 4093)  # aligned blocks and an odd tail
    ref = ProductRef("mast:TEST/direct.fits", len(content))

    async def main():
        cache = BlockCache(str(tmp_path), 100 * MiB, 0, direct_io=direct_io)
        await cache.open()
        for index in range(block_count(ref.size)):
            assert await cache.store(ref, index, block_of(content, index))
        if not direct_io:
            assert not cache.direct_io
        for index in range(3):
            assert await cache.load(ref, index) == block_of(content, index)

    trio.run(main)
    sizes = sorted(os.path.getsize(path) for path in block_files(tmp_path))
    assert sizes == sorted(HEADER_SIZE + len(block_of(content, index)) for index in range(3))
    assert os.listdir(tmp_path / "tmp") == []


def test_store_rejects_wrong_length(tmp_path):
    ref = ProductRef("mast:TEST/b.fits", 5000)

    async def main():
        cache = BlockCache(str(tmp_path), 100 * MiB, 0)
        await cache.open()
        with pytest.raises(ValueError):
            await cache.store(ref, 0, b"x" * 4999)
        assert cache.entries == 0

    trio.run(main)


@pytest.mark.parametrize("how", ["flip", "truncate", "extend", "delete", "header"])
def test_damaged_block_is_a_miss_and_deleted(tmp_path, how):
    content = product_bytes(HEADER_BLOCK_SIZE + 5000)
    ref = ProductRef("mast:TEST/c.fits", len(content))

    async def main():
        cache = BlockCache(str(tmp_path), 100 * MiB, 0)
        await cache.open()
        await cache.store(ref, 1, block_of(content, 1))
        (path,) = block_files(tmp_path)
        damage(path, how)
        assert await cache.load(ref, 1) is None
        assert not cache.contains(ref, 1) and cache.entries == 0 and cache.usage()[0] == 0
        assert block_files(tmp_path) == []
        assert await cache.store(ref, 1, block_of(content, 1))
        assert await cache.load(ref, 1) == block_of(content, 1)

    trio.run(main)


def test_block_of_another_product_or_index_is_not_served(tmp_path):
    content = product_bytes(HEADER_BLOCK_SIZE * 2)
    first = ProductRef("mast:TEST/d1.fits", len(content))
    second = ProductRef("mast:TEST/d2.fits", len(content))

    async def main():
        cache = BlockCache(str(tmp_path), 100 * MiB, 0)
        await cache.open()
        await cache.store(first, 0, block_of(content, 0))
        await cache.store(second, 0, block_of(content, 0))
        one, two = block_files(tmp_path)
        write_file(two, read_file(one))  # a well-formed block, but of the other product
        loaded = [await cache.load(first, 0), await cache.load(second, 0)]
        assert loaded.count(None) == 1 and block_of(content, 0) in loaded

    trio.run(main)


def test_lru_eviction_keeps_the_limit(tmp_path):
    block = HEADER_BLOCK_SIZE
    refs = [ProductRef(f"mast:TEST/e{i}.fits", block) for i in range(10)]
    limit = 4 * (block + HEADER_SIZE)

    async def main():
        cache = BlockCache(str(tmp_path), limit, 0)
        await cache.open()
        for i, ref in enumerate(refs[:4]):
            await cache.store(ref, 0, product_bytes(block, i))
        assert await cache.load(refs[0], 0) is not None  # refs[0] becomes the most recent
        for i, ref in enumerate(refs[4:], start=4):
            await cache.store(ref, 0, product_bytes(block, i))
            assert cache.usage()[0] <= limit
            assert disk_bytes(tmp_path) <= limit
        assert cache.entries == 4
        assert [cache.contains(ref, 0) for ref in refs] == [False] * 6 + [True] * 4
        reopened = BlockCache(str(tmp_path), limit, 0)
        await reopened.open()
        assert reopened.entries == 4
        # LRU order survives the reopen: a new block evicts the oldest survivor (refs[6])
        await reopened.store(refs[0], 0, product_bytes(block, 0))
        assert not reopened.contains(refs[6], 0) and reopened.contains(refs[9], 0)

    trio.run(main)


def test_free_space_floor_evicts_and_refuses(tmp_path):
    ref = ProductRef("mast:TEST/f.fits", HEADER_BLOCK_SIZE)
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize

    async def main():
        cache = BlockCache(str(tmp_path), 100 * MiB, min_free=free * 2)
        await cache.open()
        assert not await cache.store(ref, 0, product_bytes(HEADER_BLOCK_SIZE))
        assert cache.entries == 0 and cache.usage()[0] == 0 and block_files(tmp_path) == []

    trio.run(main)


def test_crash_leftovers_are_cleaned_and_never_served(tmp_path):
    content = product_bytes(HEADER_BLOCK_SIZE)
    ref = ProductRef("mast:TEST/g.fits", len(content))

    async def main():
        cache = BlockCache(str(tmp_path), 100 * MiB, 0)
        await cache.open()
        await cache.store(ref, 0, content)
        (path,) = block_files(tmp_path)
        # a crash mid-write: a temporary file, and a torn block that had been renamed into place
        write_file(os.path.join(tmp_path, "tmp", "deadbeef"), b"partial")
        damage(path, "torn")
        reopened = BlockCache(str(tmp_path), 100 * MiB, 0)
        await reopened.open()
        assert os.listdir(os.path.join(tmp_path, "tmp")) == []
        assert await reopened.load(ref, 0) is None
        assert reopened.entries == 0

    trio.run(main)


def test_whole_file_sha256_verification(tmp_path):
    content = product_bytes(HEADER_BLOCK_SIZE + 1000)
    good = ProductRef("mast:TEST/h.fits", len(content), sha256=hashlib.sha256(content).hexdigest())
    bad = ProductRef("mast:TEST/h.fits", len(content), sha256="00" * 32)

    async def main():
        cache = BlockCache(str(tmp_path), 100 * MiB, 0)
        await cache.open()
        await cache.store(good, 0, block_of(content, 0))
        assert await cache.verify_product(good) is None  # incomplete
        await cache.store(good, 1, block_of(content, 1))
        assert await cache.verify_product(good) is True
        reopened = BlockCache(str(tmp_path), 100 * MiB, 0)
        await reopened.open()

        def no_rehash(*args):
            raise AssertionError("re-hashed a product verified by an earlier instance")

        reopened._hash_product_sync = no_rehash  # the verdict must come from the marker on disk
        assert await reopened.verify_product(good) is True
        del reopened._hash_product_sync
        for index in range(2):
            await reopened.store(bad, index, block_of(content, index))
        assert await reopened.verify_product(bad) is False
        assert not reopened.contains(bad, 0) and not reopened.contains(bad, 1)
        assert reopened.contains(good, 0) and reopened.entries == 2

    trio.run(main)


def test_verify_reports_and_removes_corrupt_blocks_and_clear_empties(tmp_path):
    content = product_bytes(HEADER_BLOCK_SIZE + 3000)
    ref = ProductRef("mast:TEST/i.fits", len(content))

    async def main():
        cache = BlockCache(str(tmp_path), 100 * MiB, 0)
        await cache.open()
        for index in range(2):
            await cache.store(ref, index, block_of(content, index))
        first, _ = sorted(block_files(tmp_path), key=os.path.getsize)
        damage(first, "overwrite")
        report = await cache.verify()
        assert (report.blocks, report.corrupt, report.bytes) == (1, 1, HEADER_BLOCK_SIZE)
        assert cache.entries == 1 and len(block_files(tmp_path)) == 1
        await cache.clear()
        assert cache.entries == 0 and cache.usage()[0] == 0 and block_files(tmp_path) == []

    trio.run(main)


def test_versions_of_one_product_are_separate_and_superseded_ones_are_dropped(tmp_path):
    from mastfs.versions import ObjectVersion

    old_bytes, new_bytes = product_bytes(HEADER_BLOCK_SIZE + 500, 1), product_bytes(HEADER_BLOCK_SIZE + 500, 2)
    old = ProductRef("mast:TEST/v.fits", len(old_bytes), version=ObjectVersion(len(old_bytes), '"one"'))
    new = ProductRef("mast:TEST/v.fits", len(new_bytes), version=ObjectVersion(len(new_bytes), '"two"'))
    other = ProductRef("mast:TEST/w.fits", len(old_bytes), version=ObjectVersion(len(old_bytes), '"one"'))
    assert len({old.version_key, new.version_key, other.version_key}) == 3
    assert old.product_key == new.product_key != other.product_key

    async def main():
        cache = BlockCache(str(tmp_path), 100 * MiB, 0)
        await cache.open()
        for ref, content in ((old, old_bytes), (new, new_bytes), (other, old_bytes)):
            await cache.store(ref, 0, block_of(content, 0))
        assert await cache.load(new, 0) == block_of(new_bytes, 0)  # never the other version's block
        assert cache.product_bytes("mast:TEST/v.fits") == 2 * HEADER_BLOCK_SIZE
        reopened = BlockCache(str(tmp_path), 100 * MiB, 0)  # the grouping survives a remount
        await reopened.open()
        assert await reopened.drop_superseded(new) == 1
        assert not reopened.contains(old, 0) and reopened.contains(new, 0) and reopened.contains(other, 0)
        assert reopened.product_bytes("mast:TEST/v.fits") == HEADER_BLOCK_SIZE

    trio.run(main)


def test_a_plain_md5_etag_is_checked_once_the_object_is_whole_also_by_cache_verify(tmp_path):
    from mastfs.versions import ObjectVersion

    content = product_bytes(HEADER_BLOCK_SIZE + 700)
    md5 = hashlib.md5(content).hexdigest()
    good = ProductRef("mast:TEST/m.fits", len(content), version=ObjectVersion(len(content), f'"{md5}"'))
    liar = ProductRef("mast:TEST/n.fits", len(content), version=ObjectVersion(len(content), '"' + "0" * 32 + '"'))
    multipart = ProductRef("mast:TEST/p.fits", len(content), version=ObjectVersion(len(content), f'"{md5}-2"'))

    async def main():
        cache = BlockCache(str(tmp_path), 100 * MiB, 0)
        await cache.open()
        for ref in (good, liar, multipart):
            for index in range(2):
                await cache.store(ref, index, block_of(content, index))
        assert await cache.verify_product(good) is True
        assert await cache.verify_product(multipart) is None  # nothing to check against
        offline = BlockCache(str(tmp_path), 100 * MiB, 0)  # `mastfs cache verify`: no ProductRef at hand
        await offline.open()
        report = await offline.verify()
        assert (report.products_checked, report.products_failed, report.mixed) == (1, 1, 0)
        assert not offline.contains(liar, 0) and offline.contains(good, 0) and offline.contains(multipart, 1)

    trio.run(main)


def test_cache_verify_counts_a_block_of_another_version_as_mixed(tmp_path):
    content = product_bytes(HEADER_BLOCK_SIZE + 10)
    one, two = ProductRef("mast:TEST/x.fits", len(content)), ProductRef("mast:TEST/x.fits", len(content) - 1)

    async def main():
        cache = BlockCache(str(tmp_path), 100 * MiB, 0)
        await cache.open()
        await cache.store(one, 1, block_of(content, 1))
        await cache.store(two, 0, block_of(content, 0))
        one_block = next(p for p in block_files(tmp_path) if p.endswith(os.sep + "1"))
        two_block = next(p for p in block_files(tmp_path) if p.endswith(os.sep + "0"))
        os.replace(two_block, os.path.join(os.path.dirname(one_block), "0"))  # a block moved between versions
        reopened = BlockCache(str(tmp_path), 100 * MiB, 0)
        await reopened.open()
        report = await reopened.verify()
        assert (report.blocks, report.corrupt, report.mixed) == (1, 1, 1)

    trio.run(main)
