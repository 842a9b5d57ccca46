"""End the waits of processes that a signal interrupted, as FUSE_INTERRUPT would.

When a signal interrupts a process blocked in a FUSE request, the kernel sends FUSE_INTERRUPT and waits
for the daemon to answer (EINTR, say), even for SIGKILL once the request was handed over; pyfuse3 does
not deliver FUSE_INTERRUPT, so without help the process would wait until the request's deadline. While
it waits in the kernel, its signal stays pending, visible in ``/proc/<pid>/status`` (``SigPnd``,
``ShdPnd``, masked by ``SigBlk``). :class:`InterruptWatch` looks there, every ``interval`` seconds, for
each request that has waited at least that long, and ends the waits of interrupted requesters with
:class:`~mastfs.errors.Interrupted` (EINTR). Fast requests never reach a check.
"""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

from .errors import Interrupted

T = TypeVar("T")

CHECK_INTERVAL = 0.1
"""Seconds between looks at the pending signals of waiting requesters (and the least wait looked at)."""

_SIGNAL_FIELDS = (b"SigPnd", b"ShdPnd", b"SigBlk")


def signal_pending(pid: int) -> bool:
    """Whether thread ``pid`` or its process has a signal pending that the thread does not block.

    False when the process is gone or its status cannot be read or parsed. Reads procfs only (no
    blocking I/O); never raises."""
    try:
        with open(f"/proc/{pid}/status", "rb") as status:
            text = status.read()
        masks = {}
        for line in text.splitlines():
            key, _, value = line.partition(b":")
            if key in _SIGNAL_FIELDS:
                masks[key] = int(value.strip(), 16)
    except (OSError, ValueError):
        return False
    if len(masks) != len(_SIGNAL_FIELDS):
        return False
    return bool((masks[b"SigPnd"] | masks[b"ShdPnd"]) & ~masks[b"SigBlk"])


class InterruptWatch:
    """Runs requests on behalf of requester pids and cancels those whose requester a signal interrupted.

    ``await watch.run()`` in a background task does the looking; :meth:`call` wraps one request."""

    def __init__(self, interval: float = CHECK_INTERVAL) -> None:
        self._interval = interval
        self._waits: dict[int, tuple[int, float, trio.CancelScope]] = {}
        self._keys = itertools.count()
        self.interrupted = 0
        """How many requests ended early because their requester was interrupted."""

    async def call(self, pid: int, request: Callable[[], Awaitable[T]]) -> T:
        """``await request()``, unless process ``pid`` is interrupted by a signal meanwhile: then the
        request is cancelled (work it shares with others, such as a block's transfer, goes on) and
        Interrupted is raised. ``pid`` 0 (unknown requester) is never interrupted."""
        if pid <= 0:
            return await request()
        key = next(self._keys)
        scope = trio.CancelScope()
        self._waits[key] = (pid, trio.current_time(), scope)
        try:
            with scope:
                return await request()
        finally:
            del self._waits[key]
        self.interrupted += 1
        raise Interrupted(f"process {pid} was interrupted by a signal")

    async def run(self) -> None:
        """Look for interrupted requesters forever (cancel to stop)."""
        while True:
            await trio.sleep(self._interval)
            now = trio.current_time()
            for pid, started, scope in list(self._waits.values()):
                if now - started >= self._interval and signal_pending(pid):
                    scope.cancel()
