"""The multi-rank harness itself: results, reuse, and failures that name the rank."""

import os
import threading
import time

import pytest
import torch.distributed as dist

from parallelkit.launch import LocalWorld, RankFailure
from parallelkit.testing import close_worlds, run_on_ranks


def _rank_and_pid(offset):
    return dist.get_rank() + offset, os.getpid()


def test_results_in_rank_order_and_workers_reused():
    first = run_on_ranks(_rank_and_pid, 4, 10)
    second = run_on_ranks(_rank_and_pid, 4, 10)
    assert [r for r, _ in first] == [10, 11, 12, 13]
    assert [pid for _, pid in first] == [pid for _, pid in second]  # same processes


def _raise_on_rank_1():
    if dist.get_rank() == 1:
        raise ZeroDivisionError("rank one broke")
    dist.barrier()  # the others wait for rank 1, as they would in a real collective


def test_failing_rank_reported_with_traceback():
    with pytest.raises(RankFailure) as caught:
        run_on_ranks(_raise_on_rank_1, 4, timeout=60)
    text = str(caught.value)
    assert "rank(s) [1] failed" in text
    assert "ZeroDivisionError: rank one broke" in text
    assert "_raise_on_rank_1" in text  # the traceback, not just the message
    assert "rank(s) [0, 2, 3] were still running" in text
    # The broken world was discarded; the next call gets a working one.
    assert [r for r, _ in run_on_ranks(_rank_and_pid, 4, 0)] == [0, 1, 2, 3]


def _hang_on_rank_2():
    if dist.get_rank() == 2:
        time.sleep(60)


def test_hanging_rank_times_out_with_its_stack():
    start = time.monotonic()
    with pytest.raises(RankFailure, match=r"rank\(s\) \[2\] did not finish running "
                                          r"_hang_on_rank_2 within 2 s") as caught:
        run_on_ranks(_hang_on_rank_2, 4, timeout=2)
    assert time.monotonic() - start < 15
    sleep_line = _hang_on_rank_2.__code__.co_firstlineno + 2
    assert "rank(s) [2] are not in a collective (likely the cause)" in str(caught.value)
    assert f"test_harness.py:{sleep_line} in _hang_on_rank_2" in str(caught.value)


def _die_on_rank_0():
    if dist.get_rank() == 0:
        os._exit(3)


def test_dying_rank_reported():
    with pytest.raises(RankFailure, match=r"(?s)rank\(s\) \[0\] failed.*died \(exit code 3\)"):
        run_on_ranks(_die_on_rank_0, 2, timeout=30)


def test_local_functions_rejected_with_a_clear_error():
    with pytest.raises(TypeError, match="pass a function defined at module level"):
        run_on_ranks(lambda: None, 2)


def test_close_stops_the_workers_and_can_run_twice():
    world = LocalWorld(2)
    pids = world.run(os.getpid)
    world.close()
    world.close()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # reaped by close(), not merely killed
    with pytest.raises(RuntimeError, match="has been closed.*open a new one"):
        world.run(os.getpid)
    cached = run_on_ranks(os.getpid, 2)
    close_worlds()  # what atexit runs at the session's end
    assert run_on_ranks(os.getpid, 2) != cached  # a fresh world was forked


def test_unpicklable_arguments_rejected_before_any_rank_runs():
    pids = run_on_ranks(_rank_and_pid, 2, 0)
    with pytest.raises(TypeError, match="cannot be pickled.*picklable arguments"):
        run_on_ranks(_rank_and_pid, 2, threading.Lock())
    assert run_on_ranks(_rank_and_pid, 2, 0) == pids  # the world was not torn down
