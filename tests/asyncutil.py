"""Running async tests under trio without a pytest plugin."""

from __future__ import annotations

import functools

import trio


def trio_test(fn):
    """Run an async test function under trio.run (pytest-trio is not a dependency)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return trio.run(functools.partial(fn, *args, **kwargs))

    return wrapper
