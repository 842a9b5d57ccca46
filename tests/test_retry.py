import pytest
import trio
import trio.testing

from mastfs.errors import NotFound, Retryable, Unavailable
from mastfs.retry import RetryPolicy


def run_with_fake_clock(fn):
    clock = trio.testing.MockClock(autojump_threshold=0)
    return trio.run(fn, clock=clock)


def test_retries_transient_failures_then_succeeds():
    calls = []

    async def op():
        calls.append(trio.current_time())
        if len(calls) < 3:
            raise Retryable("503")
        return "ok"

    async def main():
        return await RetryPolicy(attempts=5, base_delay=1, max_delay=8, deadline=60).run(op, what="query")

    assert run_with_fake_clock(main) == "ok"
    assert len(calls) == 3


def test_gives_up_after_attempts_with_unavailable():
    async def op():
        raise Retryable("reset")

    async def main():
        await RetryPolicy(attempts=3, base_delay=0.1, deadline=60).run(op, what="download")

    with pytest.raises(Unavailable, match="download: failed 3 times"):
        run_with_fake_clock(main)


def test_deadline_bounds_a_hung_operation():
    async def op():
        await trio.sleep_forever()

    async def main():
        start = trio.current_time()
        with pytest.raises(Unavailable, match="no answer within 5s"):
            await RetryPolicy(deadline=5).run(op, what="query")
        return trio.current_time() - start

    assert run_with_fake_clock(main) == pytest.approx(5)


def test_retry_after_is_honoured():
    times = []

    async def op():
        times.append(trio.current_time())
        if len(times) == 1:
            raise Retryable("503", retry_after=4)
        return 1

    async def main():
        await RetryPolicy(base_delay=0.01, max_delay=10, deadline=60).run(op, what="query")

    run_with_fake_clock(main)
    assert times[1] - times[0] >= 4


def test_other_errors_propagate_at_once():
    calls = []

    async def op():
        calls.append(1)
        raise NotFound("no such program")

    with pytest.raises(NotFound):
        run_with_fake_clock(lambda: RetryPolicy().run(op, what="query"))
    assert calls == [1]
