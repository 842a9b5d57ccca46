"""SingleFlight, run_each, LRU and PackedSequence, the shared primitives of the archive, the tree, the reader and the
packed sequences."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from asyncutil import trio_test

from mastfs.fanout import run_each
from mastfs.lru import LRU
from mastfs.namespace import NameList
from mastfs.sequences import PackedSequence
from mastfs.singleflight import SingleFlight


@trio_test
async def test_concurrent_callers_share_one_run():
    flight: SingleFlight[str, int] = SingleFlight()
    runs = 0
    release = trio.Event()
    results: list[int] = []

    async def produce() -> int:
        nonlocal runs
        runs += 1
        await release.wait()
        return 42

    async def caller() -> None:
        results.append(await flight.run("k", produce))

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(caller)
        await trio.testing.wait_all_tasks_blocked()
        assert "k" in flight and len(flight) == 1
        release.set()
    assert results == [42] * 5 and runs == 1
    assert "k" not in flight
    assert await flight.run("k", produce) == 42 and runs == 2  # nothing is kept after landing


@trio_test
async def test_an_error_reaches_every_waiter_and_is_not_kept():
    flight: SingleFlight[str, int] = SingleFlight()
    release = trio.Event()
    errors: list[BaseException] = []

    async def fail() -> int:
        await release.wait()
        raise ValueError("boom")

    async def caller() -> None:
        with pytest.raises(ValueError, match="boom") as info:
            await flight.run("k", fail)
        errors.append(info.value)

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(caller)
        await trio.testing.wait_all_tasks_blocked()
        release.set()
    assert len(errors) == 3 and errors[0] is errors[1] is errors[2]

    async def succeed() -> int:
        return 7

    assert await flight.run("k", succeed) == 7


@trio_test
async def test_a_waiter_takes_over_when_the_first_caller_is_cancelled():
    flight: SingleFlight[str, str] = SingleFlight()
    started: list[str] = []
    release = trio.Event()
    got: list[str] = []

    def producer(name: str):
        async def produce() -> str:
            started.append(name)
            await release.wait()
            return name

        return produce

    async with trio.open_nursery() as nursery:
        first = trio.CancelScope()
        nursery.start_soon(_run_in, first, flight, producer("first"))
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(_append, got, flight.run("k", producer("second")))
        await trio.testing.wait_all_tasks_blocked()
        assert started == ["first"]
        first.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert started == ["first", "second"]  # the waiter ran its own producer
        release.set()
    assert got == ["second"]


async def _run_in(scope: trio.CancelScope, flight: SingleFlight[str, str], produce) -> None:
    with scope:
        await flight.run("k", produce)
        raise AssertionError("the cancelled caller must not get a value")


async def _append(out: list[str], awaitable) -> None:
    out.append(await awaitable)


@trio_test
async def test_different_keys_fly_separately():
    flight: SingleFlight[int, int] = SingleFlight()
    release = trio.Event()
    seen: list[int] = []

    async def caller(key: int) -> None:
        async def produce() -> int:
            await release.wait()
            return key * 10

        seen.append(await flight.run(key, produce))

    async with trio.open_nursery() as nursery:
        for key in (1, 2, 3):
            nursery.start_soon(caller, key)
        await trio.testing.wait_all_tasks_blocked()
        assert len(flight) == 3
        release.set()
    assert sorted(seen) == [10, 20, 30]


def test_lru_drops_the_least_recently_used_first():
    lru: LRU[str, int] = LRU(3)
    for key, value in [("a", 1), ("b", 2), ("c", 3)]:
        lru.put(key, value)
    assert lru.get("a") == 1  # a is now the most recent
    lru.put("d", 4)
    assert list(lru) == ["c", "a", "d"] and "b" not in lru
    assert lru.peek("c") == 3 and list(lru) == ["c", "a", "d"]  # peek leaves the order alone
    lru.put("c", 30)  # a put refreshes too
    lru.put("e", 5)
    assert list(lru.items()) == [("d", 4), ("c", 30), ("e", 5)]
    assert lru.get("zz") is None


def test_weighted_lru_bounds_the_total_weight():
    lru: LRU[str, bytes] = LRU(10, weigh=len)
    lru.put("a", b"1234")
    lru.put("b", b"1234")
    assert lru.weight == 8
    lru.put("c", b"1234")  # 12 > 10: a goes
    assert list(lru) == ["b", "c"] and lru.weight == 8
    lru.put("huge", b"x" * 11)  # heavier than the capacity alone: not kept, nothing else lost
    assert "huge" not in lru and list(lru) == ["b", "c"]
    assert lru.pop("b") == b"1234" and lru.weight == 4
    lru.put("c", b"12")  # a replaced value's weight is recounted
    assert lru.weight == 2 and lru.pop("missing") is None
    lru.clear()
    assert len(lru) == 0 and lru.weight == 0


def test_packed_sequence_indexes_like_a_list():
    letters = ["a", "b", "c", "d", "e"]
    asked: list[int] = []

    class Letters(PackedSequence[str]):
        def __len__(self) -> int:
            return len(letters)

        def _item(self, index: int) -> str:
            asked.append(index)
            return letters[index]

    packed = Letters()
    for index in (0, 4, -1, -5):
        assert packed[index] == letters[index]
    for cut in (slice(1, 3), slice(None, None, -2), slice(-2, None), slice(7, 9)):
        assert packed[cut] == letters[cut]
    assert list(packed) == letters and packed.index("c") == 2
    assert all(0 <= i < len(letters) for i in asked)  # _item only ever sees indices in range
    for outside in (5, -6):
        with pytest.raises(IndexError):
            packed[outside]


def test_name_list_indexes_like_the_list_of_its_names():
    names = ["a.fits", "b.fits", "c.jpg"]
    packed = NameList(names, [2, 0, 1])
    assert [packed[i] for i in range(-3, 3)] == [names[i] for i in range(-3, 3)]
    assert packed[::-1] == names[::-1]
    with pytest.raises(IndexError):
        packed[3]


@trio_test
async def test_run_each_keeps_at_most_limit_jobs_running_and_runs_them_all():
    running, peak, done = 0, 0, []

    async def job(number: int) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await trio.sleep(0.01)
        running -= 1
        done.append(number)

    await run_each((lambda n=n: job(n) for n in range(7)), limit=3)
    assert sorted(done) == list(range(7))
    assert peak == 3


@trio_test
async def test_run_each_raises_the_first_failure_as_itself_and_cancels_the_rest():
    finished, taken = [], []

    async def fails() -> None:
        raise KeyError("first")

    async def waits() -> None:
        await trio.sleep_forever()
        finished.append(True)

    def jobs():
        for job in (waits, fails, waits, waits):
            taken.append(job)
            yield job

    with pytest.raises(KeyError, match="first"):
        await run_each(jobs(), limit=2)
    assert finished == []
    assert len(taken) == 2  # the jobs after the failure were never taken
