"""InterruptWatch and signal_pending against real processes: a process stopped with a signal pending is
exactly what a reader blocked in a FUSE request looks like from /proc."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import trio
from asyncutil import trio_test

from mastfs.errors import Interrupted
from mastfs.interrupts import InterruptWatch, signal_pending

CHILD = """
import signal, sys, time
signal.signal(signal.SIGUSR1, lambda *_: None)
if sys.argv[1] == "block":
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1])
print("ready", flush=True)
time.sleep(60)
"""


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as status:
        return {key: value.strip() for key, _, value in (line.partition(":") for line in status)}


def _wait_for(condition, seconds: float = 10.0) -> None:
    give_up = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < give_up, "the child never got there"
        time.sleep(0.01)


@pytest.fixture
def child():
    """Start a child that handles (or, with "block", blocks) SIGUSR1, stopped with SIGUSR1 pending."""
    children = []

    def start(mode: str) -> int:
        process = subprocess.Popen([sys.executable, "-c", CHILD, mode], stdout=subprocess.PIPE, text=True)
        children.append(process)
        assert process.stdout.readline() == "ready\n"
        process.send_signal(signal.SIGSTOP)
        _wait_for(lambda: _status(process.pid)["State"].startswith("T"))
        process.send_signal(signal.SIGUSR1)  # stays pending while the child is stopped
        _wait_for(lambda: int(_status(process.pid)["ShdPnd"], 16) != 0)
        return process.pid

    yield start
    for process in children:
        process.kill()
        process.wait()


def test_a_pending_handled_signal_is_seen(child):
    assert signal_pending(child("handle"))


def test_a_blocked_signal_does_not_count(child):
    assert not signal_pending(child("block"))


def test_a_running_process_has_nothing_pending():
    assert not signal_pending(os.getpid())


def test_a_vanished_process_has_nothing_pending():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    assert not signal_pending(process.pid)


@trio_test
async def _call_with_watch(pid: int, request_seconds: float):
    watch = InterruptWatch(interval=0.02)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch.run)

        async def request() -> str:
            await trio.sleep(request_seconds)
            return "done"

        try:
            return await watch.call(pid, request), watch.interrupted
        except Interrupted:
            return "interrupted", watch.interrupted
        finally:
            nursery.cancel_scope.cancel()


def test_the_wait_of_an_interrupted_requester_ends(child):
    assert _call_with_watch(child("handle"), 60) == ("interrupted", 1)


def test_requests_of_requesters_without_a_signal_complete(child):
    assert _call_with_watch(child("block"), 0.2) == ("done", 0)
    assert _call_with_watch(os.getpid(), 0.2) == ("done", 0)


def test_an_unknown_requester_is_never_interrupted():
    assert _call_with_watch(0, 0.1) == ("done", 0)
