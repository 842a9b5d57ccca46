"""One block cache directory used by several processes at once (blockcache.py, "Shared directory")."""

from __future__ import annotations

import multiprocessing
import os
import time

import trio

from mastfs import blockcache
from mastfs.blockcache import HEADER_BLOCK_SIZE, BlockCache, ProductRef

MiB = 1024 * 1024
CONTENT = bytes(range(256)) * (HEADER_BLOCK_SIZE // 256)
REF = ProductRef("mast:TEST/shared.fits", len(CONTENT))


def _fetch_and_store_slowly(directory, claimed, release):
    """Another process: claims block 0, waits for the word, stores it, releases it."""

    async def main():
        cache = BlockCache(directory, 100 * MiB, 0)
        await cache.open()
        assert await cache.claim(REF, [0]) == []
        claimed.set()
        await trio.to_thread.run_sync(release.wait, 30)
        assert await cache.store(REF, 0, CONTENT)
        cache.release(REF, 0)
        cache.close()

    trio.run(main)


def test_a_block_another_process_is_fetching_is_waited_for_then_found_on_disk(tmp_path):
    context = multiprocessing.get_context("fork")
    claimed, release = context.Event(), context.Event()
    other = context.Process(target=_fetch_and_store_slowly, args=(str(tmp_path), claimed, release))
    other.start()
    try:
        assert claimed.wait(30)

        async def main():
            cache = BlockCache(str(tmp_path), 100 * MiB, 0)
            await cache.open()
            assert not cache.contains(REF, 0)
            async with trio.open_nursery() as nursery:
                found: list = []

                async def claim():
                    found.append(await cache.claim(REF, [0]))

                nursery.start_soon(claim)
                await trio.sleep(0.3)
                assert found == []  # still waiting for the other process
                release.set()
            assert found == [[0]] and cache.contains(REF, 0)
            assert await cache.load(REF, 0) == CONTENT
            cache.release(REF, 0)
            cache.close()

        trio.run(main)
    finally:
        release.set()
        other.join(30)
    assert other.exitcode == 0


def test_a_block_evicted_by_another_process_is_a_plain_miss(tmp_path):
    async def main():
        mine, theirs = BlockCache(str(tmp_path), 100 * MiB, 0), BlockCache(str(tmp_path), 100 * MiB, 0)
        await mine.open()
        await theirs.open()
        assert await theirs.store(REF, 0, CONTENT)
        assert await mine.claim(REF, [0]) == [0]  # written by "them": adopted
        mine.release(REF, 0)
        await theirs.drop(REF)
        assert await mine.load(REF, 0) is None
        assert mine.corrupt_blocks == 0 and not mine.contains(REF, 0) and mine.usage()[0] == 0

    trio.run(main)


def test_the_index_counts_blocks_other_processes_stored_against_the_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(blockcache, "RESCAN_INTERVAL", 0.0)
    refs = [ProductRef(f"mast:TEST/p{i}.fits", len(CONTENT)) for i in range(3)]
    need = blockcache.HEADER_SIZE + len(CONTENT)

    async def main():
        mine, theirs = BlockCache(str(tmp_path), 2 * need, 0), BlockCache(str(tmp_path), 2 * need, 0)
        await mine.open()
        await theirs.open()
        assert await theirs.store(refs[0], 0, CONTENT)
        assert await theirs.store(refs[1], 0, CONTENT)
        assert await mine.store(refs[2], 0, CONTENT)  # sees theirs, evicts the oldest to stay in bounds
        return mine.usage()[0], [mine.contains(ref, 0) for ref in refs]

    used, present = trio.run(main)
    assert used == 2 * need and present == [False, True, True]
    assert len([p for p in tmp_path.rglob("*") if p.is_file() and p.name.isdigit()]) == 2


def test_only_abandoned_temporary_files_are_removed(tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    live = tmp / f"{os.getpid()}-inprogress"
    live.write_bytes(b"being written")
    dead = tmp / "999999999-crashed"  # no such process
    dead.write_bytes(b"half")
    unnamed = tmp / "leftover"
    unnamed.write_bytes(b"old layout")
    old = tmp / f"{os.getpid()}-ancient"
    old.write_bytes(b"x")
    stale = time.time() - blockcache.STALE_TMP_AGE - 10
    os.utime(old, (stale, stale))

    async def main():
        await BlockCache(str(tmp_path), 100 * MiB, 0).open()

    trio.run(main)
    assert sorted(p.name for p in tmp.iterdir()) == [live.name]


def test_a_store_during_an_index_rebuild_stays_counted(tmp_path, monkeypatch):
    refs = [ProductRef(f"mast:TEST/r{i}.fits", len(CONTENT)) for i in range(2)]
    need = blockcache.HEADER_SIZE + len(CONTENT)
    scan = BlockCache._scan_sync

    def slow_scan(self):  # a rebuild that lists the directory, then takes a while
        found = scan(self)
        time.sleep(0.5)
        return found

    async def main():
        cache = BlockCache(str(tmp_path), 100 * MiB, 0)
        await cache.open()
        monkeypatch.setattr(blockcache, "RESCAN_INTERVAL", 0.0)
        monkeypatch.setattr(BlockCache, "_scan_sync", slow_scan)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cache.store, refs[0], 0, CONTENT)  # rebuilds the index first
            await trio.sleep(0.1)
            nursery.start_soon(cache.store, refs[1], 0, CONTENT)  # arrives mid-rebuild
        return cache.usage()[0], [cache.contains(ref, 0) for ref in refs]

    assert trio.run(main) == (2 * need, [True, True])
