"""The readahead policy of mastfs/reader.py without a network: the link estimate (per-connection throughput
and time to first byte, from synthetic run timings), the run size and window cap it calls for, and which
blocks a stream schedules. No timed assertions: every timing here is made up."""

from __future__ import annotations

import pytest

from mastfs.blockcache import BLOCK_SIZE
from mastfs.reader import (
    MAX_READAHEAD_BLOCKS,
    MAX_RUN_BLOCKS,
    MEMORY_LIMIT,
    LinkEstimate,
    evicts_nearer,
    grown_window,
    readahead_limit,
    readahead_span,
    waits_for_link,
)


def estimate(first_byte: float, throughput: float, blocks: int = 2) -> LinkEstimate:
    """A LinkEstimate that has seen one run of ``blocks`` blocks over a link of this latency and bandwidth."""
    link = LinkEstimate()
    first_at = first_byte + BLOCK_SIZE / throughput
    link.observe(0.0, first_at, BLOCK_SIZE, first_at + (blocks - 1) * BLOCK_SIZE / throughput, blocks * BLOCK_SIZE)
    return link


def test_one_run_gives_back_the_links_latency_and_bandwidth():
    link = estimate(0.030, 90e6)
    assert link.first_byte == pytest.approx(0.030)
    assert link.throughput == pytest.approx(90e6)
    assert link.delay_bytes == pytest.approx(0.030 * 90e6)


def test_a_run_of_one_block_teaches_nothing():
    link = LinkEstimate()
    link.observe(0.0, 0.1, BLOCK_SIZE, 0.1, BLOCK_SIZE)
    assert link.throughput is None and link.delay_bytes == 0.0
    assert link.run_blocks(2, transfers=8, budget=64) == 2


def test_estimates_move_towards_new_runs_without_jumping():
    link = estimate(0.030, 90e6)
    fast = estimate(0.0, 900e6)
    link.observe(0.0, BLOCK_SIZE / 900e6, BLOCK_SIZE, 2 * BLOCK_SIZE / 900e6, 2 * BLOCK_SIZE)
    assert 90e6 < link.throughput < fast.throughput
    assert 0.0 < link.first_byte < 0.030


@pytest.mark.parametrize("first_byte, throughput, blocks", [
    (0.0, 2e9, 2),         # loopback: no latency to amortise, the smallest run
    (0.030, 90e6, 3),      # S3-like: 4 x 2.7 MB = 10.8 MB -> three 4 MiB blocks
    (0.120, 25e6, 3),      # far: 4 x 3 MB = 12 MB -> three blocks
    (0.300, 90e6, MAX_RUN_BLOCKS),  # very slow first byte: capped
])
def test_runs_carry_four_bandwidth_delay_products_when_the_budget_allows(first_byte, throughput, blocks):
    assert estimate(first_byte, throughput).run_blocks(2, transfers=4, budget=64) == blocks


def test_a_tight_budget_keeps_runs_short_so_every_transfer_slot_gets_one():
    far = estimate(0.120, 25e6)
    assert far.run_blocks(2, transfers=8, budget=14) == 2  # 14 // 8 = 1 < least: the least run
    assert far.run_blocks(2, transfers=4, budget=14) == 3


def test_the_window_holds_one_run_per_transfer_slot_within_the_budget():
    s3_like = estimate(0.030, 90e6)
    assert s3_like.window_cap(2, transfers=8, budget=64) == 24  # 8 runs of 3
    assert s3_like.window_cap(2, transfers=8, budget=14) == 14
    assert estimate(0.0, 2e9).window_cap(2, transfers=4, budget=24) == 8
    assert LinkEstimate().window_cap(2, transfers=8, budget=0) == 0


def test_the_window_never_outgrows_what_memory_holds():
    """The memory LRU's blocks plus the block each transfer is assembling: by default 8 + 8 = 16 blocks
    (a window of 24 overflowed the LRU over a far link and peaked at 221 MB)."""
    assert readahead_limit(MAX_READAHEAD_BLOCKS, MEMORY_LIMIT, transfers=8) == 16
    assert readahead_limit(MAX_READAHEAD_BLOCKS, 2 * BLOCK_SIZE, transfers=2) == 4
    assert readahead_limit(4, MEMORY_LIMIT, transfers=8) == 4  # a smaller configured window stands
    assert readahead_limit(0, MEMORY_LIMIT, transfers=8) == 0
    far = estimate(0.120, 25e6)  # the far link's runs of 3 then fit 5 slots, or 8 runs of 2
    assert far.window_cap(2, transfers=8, budget=readahead_limit(MAX_READAHEAD_BLOCKS, MEMORY_LIMIT, 8)) == 16


def test_a_window_is_topped_up_one_run_at_a_time():
    # read up to block 10, scheduled up to 30, window 24, runs of 3: 4 blocks free -> one run, 31..33;
    # the fourth block waits for the next run (a run of one block would pay a whole first-byte latency)
    assert readahead_span(ahead=30, last=10, window=24, run=3, final=1000) == (31, 33)
    # 7 free with runs of 2: three whole runs, 31..36
    assert readahead_span(ahead=30, last=20, window=17, run=2, final=1000) == (31, 36)
    # only 2 blocks free: wait for a whole run
    assert readahead_span(ahead=32, last=10, window=24, run=3, final=1000) is None


def test_a_growing_window_smaller_than_a_run_schedules_half_windows():
    assert readahead_span(ahead=1, last=1, window=1, run=3, final=1000) == (2, 2)
    assert readahead_span(ahead=2, last=2, window=2, run=3, final=1000) == (3, 4)
    assert readahead_span(ahead=6, last=3, window=4, run=3, final=1000) is None  # 1 free: less than half
    assert readahead_span(ahead=5, last=3, window=4, run=3, final=1000) == (6, 7)  # 2 free: half a window


def test_the_end_of_the_file_is_scheduled_even_when_less_than_a_run_is_left():
    assert readahead_span(ahead=98, last=90, window=24, run=3, final=99) == (99, 99)
    assert readahead_span(ahead=99, last=95, window=24, run=3, final=99) is None


def test_the_window_grows_fourfold_only_while_the_reader_waits_for_the_link():
    assert grown_window(0, cap=24, starved=False) == 1  # a sequential stream starts with one block
    assert grown_window(1, cap=24, starved=True) == 4
    assert grown_window(4, cap=24, starved=True) == 16
    assert grown_window(16, cap=24, starved=True) == 24
    assert grown_window(8, cap=24, starved=False) == 8  # blocks were ready: the reader is the slower side
    assert grown_window(16, cap=6, starved=False) == 6  # a lower cap (the link estimate changed) applies
    assert grown_window(0, cap=0, starved=True) == 0  # readahead off


def test_a_block_landing_in_a_full_memory_never_evicts_one_the_reader_reaches_first():
    assert evicts_nearer(("v1", 10), ("v1", 12))  # block 12 waits on disk; 10 stays for the reader
    assert not evicts_nearer(("v1", 12), ("v1", 10))  # the farther block goes, the nearer one comes in
    assert not evicts_nearer(("v0", 3), ("v1", 12))  # another product's old block is evicted as usual
    assert not evicts_nearer(None, ("v1", 12))


def test_blocks_waiting_in_memory_narrow_the_window_left_for_runs_in_flight():
    # window 16, reader at block 20, scheduled up to 28: 8 blocks free, a run of 2 starts ...
    assert readahead_span(ahead=28, last=20, window=16, run=2, final=1000) == (29, 36)
    # ... but only one run when 6 of the scheduled blocks already wait in memory (a reader slower than
    # the link), and none when 7 do
    assert readahead_span(ahead=28, last=20, window=16 - 6, run=2, final=1000) == (29, 30)
    assert readahead_span(ahead=28, last=20, window=16 - 7, run=2, final=1000) is None


def test_a_reader_that_consumed_all_that_arrived_is_limited_by_the_link():
    # the reader had to wait since the last growth, or waits for this block: the link is the limit
    assert waits_for_link(starved=True, waiting=3, arrived=True)
    assert waits_for_link(starved=False, waiting=3, arrived=False)
    # its block had arrived, but nothing else did: the window is too small to keep the link busy
    assert waits_for_link(starved=False, waiting=0, arrived=True)
    # blocks arrived before the reader got to them: the reader is the slower side
    assert not waits_for_link(starved=False, waiting=1, arrived=True)
