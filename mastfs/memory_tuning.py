"""glibc malloc tuning for the daemon: reuse the memory of freed block buffers (:func:`tune_malloc`), and
hand freed heap memory back to the kernel after large swings of metadata memory (:func:`hand_back_memory`).
Both are best effort and no-ops without glibc."""

from __future__ import annotations

import ctypes
import gc
import logging
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from .services import Services

log = logging.getLogger(__name__)

MALLOC_MMAP_THRESHOLD = 32 * 1024 * 1024
"""glibc malloc serves allocations below this from its heaps (reused memory) instead of fresh mmaps."""
MALLOC_TRIM_THRESHOLD = 64 * 1024 * 1024
"""glibc malloc keeps up to this much freed memory at the top of a heap instead of returning it."""
MALLOC_ARENA_MAX = 1
"""glibc malloc arenas: one for every thread, so a block freed by one thread is reused by another (with a
second arena for the worker threads, the daemon's RSS crept up by a few MB per GiB read; measured no
slower)."""
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # glibc's <malloc.h>

METADATA_SWING = 10_000
"""Inodes in memory gained or lost, product rows of memoised listings gained or lost, or MAST query pages
received (a thousandth), after which freed heap memory is handed back to the kernel (malloc_trim): a
300,000-product listing leaves its pages' and its layout's garbage behind, the kernel forgetting its
inodes frees their nodes, and its layout goes when its memo expires."""
TRIM_CHECK_INTERVAL = 2.0


def tune_malloc() -> bool:
    """Make glibc malloc reuse the memory of freed blocks (best effort; a no-op elsewhere). Returns
    whether every setting was taken.

    By default glibc serves each 4 MiB block buffer with a fresh mmap, and returns it to the kernel when
    it is freed: every block then costs page faults and zeroing of 1,024 new pages, and on a VM that hands
    freed memory back to its host, fetching those pages again. With a higher mmap threshold, a high trim
    threshold and a single arena, block buffers come from heap memory the daemon already holds (its peak
    stays bounded by the reader's memory limits).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    settings = ((_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD),
                (_M_ARENA_MAX, MALLOC_ARENA_MAX))
    taken = [mallopt(option, value) == 1 for option, value in settings]
    log.debug("malloc tuning taken: %s", taken)
    return all(taken)


async def hand_back_memory(services: Services, interval: float = TRIM_CHECK_INTERVAL) -> None:
    """Forever: after a large swing of metadata memory (see :data:`METADATA_SWING`), call glibc's
    ``malloc_trim(0)`` so the daemon's RSS follows what it holds (the malloc tuning above keeps freed
    memory otherwise). A no-op without glibc."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return
    trim.argtypes = [ctypes.c_size_t]
    last_nodes, last_rows, last_pages = 0, 0, 0
    while True:
        await trio.sleep(interval)
        services.tree.sweep_memos()
        held = services.tree.stats()
        nodes, rows = held["nodes"], held["memo_rows"]
        pages = services.client.stats()["requests"].get("invoke", 0)
        if (abs(nodes - last_nodes) >= METADATA_SWING or abs(rows - last_rows) >= METADATA_SWING
                or pages - last_pages >= METADATA_SWING // 1000):
            services.tree.compact()
            gc.collect()
            trim(0)
            last_nodes, last_pages = nodes, pages
        last_rows = rows
