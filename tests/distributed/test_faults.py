"""Every way a rank can go wrong fails the call with a report that names the culprit, and the next
call gets a fresh, working world; workers never outlive the process that owns them."""

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import types

import pytest
import torch.distributed as dist

from parallelkit.launch import LocalWorld, RankFailure
from parallelkit.testing import harness, run_on_ranks


def _ranks():
    return dist.get_rank()


def _assert_next_call_works(world_size):
    assert run_on_ranks(_ranks, world_size, timeout=30) == list(range(world_size))


def _sigkill_rank_1():
    if dist.get_rank() == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    dist.barrier()


def test_rank_killed_by_a_signal_is_the_cause_and_its_peers_a_consequence():
    with pytest.raises(RankFailure) as caught:
        run_on_ranks(_sigkill_rank_1, 4, timeout=10)
    text = str(caught.value)
    assert "rank(s) [1] failed while running _sigkill_rank_1" in text
    assert "died (exit code -9: killed by SIGKILL)" in text
    # The others either broke in their barrier (gloo saw the peer go) or were stopped in it.
    assert "then failed inside a collective" in text or "were still running" in text
    _assert_next_call_works(4)


def _sys_exit_on_rank_0():
    if dist.get_rank() == 0:
        sys.exit(0)
    dist.barrier()


def _os_exit_0_on_rank_0():
    if dist.get_rank() == 0:
        os._exit(0)
    dist.barrier()


@pytest.mark.parametrize("body, says", [(_sys_exit_on_rank_0, "SystemExit: 0"),
                                        (_os_exit_0_on_rank_0, "died (exit code 0)")])
def test_rank_exiting_successfully_is_a_failure_not_a_hang(body, says):
    start = time.monotonic()
    with pytest.raises(RankFailure, match=r"(?s)rank\(s\) \[0\] failed.*" + re.escape(says)):
        run_on_ranks(body, 2, timeout=10)
    assert time.monotonic() - start < 8  # the grace after a failure, not the 10 s timeout
    _assert_next_call_works(2)


def _sleep_on_rank_2_while_others_wait():
    if dist.get_rank() == 2:
        time.sleep(60)  # THE HANG
    dist.barrier()


def test_hang_report_names_the_rank_outside_the_collective_and_where_each_rank_waits():
    with pytest.raises(RankFailure) as caught:
        run_on_ranks(_sleep_on_rank_2_while_others_wait, 4, timeout=3)
    text = str(caught.value)
    assert "rank(s) [0, 1, 2, 3] did not finish running" in text
    hang_line = _line_of("# THE HANG")
    assert "rank(s) [2] are not in a collective (likely the cause):\n  rank 2 at " in text
    assert f"test_faults.py:{hang_line} in _sleep_on_rank_2_while_others_wait\n" in text
    assert "rank(s) [0, 1, 3] are waiting in a collective:" in text
    for rank in (0, 1, 3):
        assert f"  rank {rank} at torch/distributed/distributed_c10d.py:" in text
    assert text.count("in barrier <- ") == 3
    _assert_next_call_works(4)


def _barrier_on_ranks_0_and_1():
    if dist.get_rank() < 2:
        dist.barrier()


def test_hang_report_names_ranks_that_skipped_the_collective():
    with pytest.raises(RankFailure) as caught:
        run_on_ranks(_barrier_on_ranks_0_and_1, 4, timeout=2)
    text = str(caught.value)
    assert "rank(s) [0, 1] are waiting in a collective:" in text
    assert "rank(s) [2, 3] had returned without joining it (likely the cause)" in text
    _assert_next_call_works(4)


def test_rank_dying_while_idle_is_reported_and_the_harness_replaces_the_world():
    with LocalWorld(2) as world:
        pids = world.run(os.getpid)
        os.kill(pids[1], signal.SIGKILL)
        while world.alive:
            time.sleep(0.05)
        with pytest.raises(RankFailure, match=r"rank\(s\) \[1\] died while idle .*SIGKILL"):
            world.run(os.getpid)
    os.kill(run_on_ranks(os.getpid, 2)[0], signal.SIGKILL)
    while harness._worlds[2].alive:  # until every thread of it has exited and it is reaped
        time.sleep(0.05)
    _assert_next_call_works(2)  # the harness noticed, closed that world and forked a new one


def test_function_the_workers_cannot_import_is_reported():
    _assert_next_call_works(2)  # the workers are forked before the module below exists
    late = types.ModuleType("parallelkit_late_module")
    late.body = types.FunctionType(_ranks.__code__, {"dist": dist}, "body")
    late.body.__module__, late.body.__qualname__ = late.__name__, "body"
    sys.modules[late.__name__] = late
    try:
        with pytest.raises(RankFailure, match=r"(?s)rank\(s\) \[0, 1\] failed.*"
                                              "the task could not be unpickled.*"
                                              "No module named 'parallelkit_late_module'"):
            run_on_ranks(late.body, 2, timeout=10)
    finally:
        del sys.modules[late.__name__]
    _assert_next_call_works(2)


_OWNER = textwrap.dedent("""
    import os, time
    import torch.distributed as dist
    from parallelkit.launch import LocalWorld

    def busy():  # rank 0 sleeps, rank 1 waits for it in a barrier: both are mid-call
        if dist.get_rank() == 0:
            time.sleep(60)
        dist.barrier()

    idle, busy_world = LocalWorld(2), LocalWorld(2)
    pids = idle.run(os.getpid) + busy_world.run(os.getpid)
    print(*pids, flush=True)
    print(idle._store_dir, busy_world._store_dir, flush=True)
    busy_world.run(busy, timeout=60)
""")


def _gone(pid):
    """Exited, or a zombie waiting for whoever inherited it to reap it."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_exit_when_their_owner_is_killed():
    owner = subprocess.Popen([sys.executable, "-c", _OWNER], stdout=subprocess.PIPE, text=True,
                             cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    try:
        pids = [int(p) for p in owner.stdout.readline().split()]
        assert len(pids) == 4, f"the owner printed {pids!r} instead of 4 worker pids"
        store_dirs = owner.stdout.readline().split()
        time.sleep(0.5)  # let busy() reach its sleep and its barrier
        owner.kill()
        owner.wait()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not all(map(_gone, pids)):
            time.sleep(0.1)
        assert [pid for pid in pids if not _gone(pid)] == []
        assert [d for d in store_dirs if os.path.exists(d)] == []  # the workers removed them
    finally:
        owner.kill()
        owner.wait()


def _line_of(marker):
    with open(__file__) as f:
        return next(i for i, line in enumerate(f, 1) if marker in line and "_line_of" not in line)
