"""run_each: run independent jobs concurrently with a bound, failing like a plain loop would."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable

import trio


async def run_each(jobs: Iterable[Callable[[], Awaitable[None]]], limit: int) -> None:
    """Run every job of ``jobs`` (taken lazily: a job is taken only once a slot is free), at most ``limit``
    at once. The first job to raise cancels the others and its exception is raised as itself, not in an
    exception group; cancellation from outside passes through."""
    slots = trio.Semaphore(max(1, limit))
    failure: Exception | None = None

    async def run(job: Callable[[], Awaitable[None]], nursery: trio.Nursery) -> None:
        nonlocal failure
        try:
            await job()
        except Exception as exc:
            failure = failure or exc
            nursery.cancel_scope.cancel()
        finally:
            slots.release()

    pending = iter(jobs)
    async with trio.open_nursery() as nursery:
        while True:
            await slots.acquire()
            job = next(pending, None)
            if job is None:
                break
            nursery.start_soon(run, job, nursery)
    if failure is not None:
        raise failure
