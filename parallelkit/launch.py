"""Run a function on every rank of a local gloo world: N forked CPU processes, kept alive for reuse.

This is what `python -m parallelkit ...` uses to show a layout without `torchrun`, and what the
test harness keeps open across tests. Forking (~0.5 s for 8 ranks) instead of spawning (~13 s)
is only safe before the parent creates a process group or a CUDA context, so that is checked.

    with LocalWorld(8) as world:
        results = world.run(my_function, arg, timeout=60)   # my_function(arg) on ranks 0..7

`my_function` must be importable by name (a module-level function): it travels by pickle.
A rank that raises, dies or hangs fails the call with that rank's traceback or a timeout message,
and the world is torn down (its process group can no longer be trusted); the caller may open a new
one.
"""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.connection
import os
import shutil
import tempfile
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

# A collective blocked on a dead peer must give up well before CI does.
COLLECTIVE_TIMEOUT_S = 120.0
# After one rank fails, how long the others get to report before the world is killed: they are
# usually blocked in a collective that waits for the failed rank.
GRACE_AFTER_FAILURE_S = 2.0


class RankFailure(AssertionError):
    """One or more ranks raised, died or did not finish; the message says which and why."""


class LocalWorld:
    """`world_size` forked worker processes joined in one gloo process group.

    Args:
        world_size: number of ranks.
        setup_timeout: seconds the workers get to form the process group.
        threads_per_rank: intra-op threads per worker (the machine's cores are shared by all).
    """

    def __init__(self, world_size: int, setup_timeout: float = 60.0, threads_per_rank: int = 1):
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size={world_size!r} must be an integer >= 1")
        _check_fork_is_safe()
        self.world_size = world_size
        self._store_dir = tempfile.mkdtemp(prefix="parallelkit-world-")
        ctx = mp.get_context("fork")
        self._conns, self._procs = [], []
        for rank in range(world_size):
            parent_end, child_end = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, daemon=True, name=f"parallelkit-rank{rank}",
                               args=(rank, world_size, self._store_dir, threads_per_rank, child_end))
            proc.start()
            child_end.close()  # so that a dead worker reads as EOF on our end
            self._conns.append(parent_end)
            self._procs.append(proc)
        self._collect(setup_timeout, what="forming the gloo process group")

    @property
    def alive(self) -> bool:
        return bool(self._procs) and all(p.is_alive() for p in self._procs)

    def run(self, fn: Callable, *args, timeout: float = 60.0, **kwargs) -> list[Any]:
        """Call ``fn(*args, **kwargs)`` on every rank; return the per-rank results, rank order."""
        if not self.alive:
            raise RuntimeError("this LocalWorld has been closed (a rank failed or close() ran); "
                               "open a new one")
        name = getattr(fn, "__qualname__", repr(fn))
        if "<" in name:  # <lambda>, <locals>: pickle would fail with a less helpful message
            raise TypeError(f"{name} cannot be sent to worker processes; "
                            "pass a function defined at module level")
        for conn in self._conns:
            conn.send((fn, args, kwargs))
        return self._collect(timeout, what=f"running {name}")

    def close(self) -> None:
        """Stop the workers: politely if they are idle, by force otherwise."""
        for conn in self._conns:
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        deadline = time.monotonic() + 5.0
        for proc in self._procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        self._kill()

    def __enter__(self) -> "LocalWorld":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _kill(self) -> None:
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
            proc.join()
        for conn in self._conns:
            conn.close()
        self._procs, self._conns = [], []
        shutil.rmtree(self._store_dir, ignore_errors=True)

    def _collect(self, timeout: float, what: str) -> list[Any]:
        """Wait for one message per rank; on any failure kill the world and raise RankFailure."""
        results: list[Any] = [None] * self.world_size
        errors: dict[int, str] = {}
        pending = set(range(self.world_size))
        deadline = time.monotonic() + timeout
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            ready = mp.connection.wait([self._conns[r] for r in pending], timeout=remaining)
            for conn in ready:
                rank = self._conns.index(conn)
                pending.discard(rank)
                try:
                    status, payload = conn.recv()
                except EOFError:
                    status, payload = "error", f"the process died (exit code {self._exit_code(rank)})"
                if status == "ok":
                    results[rank] = payload
                else:
                    errors[rank] = payload
            if errors:
                deadline = min(deadline, time.monotonic() + GRACE_AFTER_FAILURE_S)
        if errors or pending:
            self._kill()
            raise RankFailure(_failure_message(what, timeout, errors, sorted(pending)))
        return results

    def _exit_code(self, rank: int):
        self._procs[rank].join(1.0)
        return self._procs[rank].exitcode


def _failure_message(what: str, timeout: float, errors: dict[int, str], hung: list[int]) -> str:
    lines = []
    if errors:
        lines.append(f"rank(s) {sorted(errors)} failed while {what}:")
        for rank, text in sorted(errors.items()):
            lines.append(f"--- rank {rank} ---\n{text.rstrip()}")
    if hung and errors:
        lines.append(f"rank(s) {hung} were still running (most likely blocked in a collective "
                     "waiting for a failed rank) and were stopped")
    elif hung:
        lines.append(f"rank(s) {hung} did not finish {what} within {timeout:g} s "
                     "(a hang: a collective some rank never joined, or a deadlock); stopped")
    return "\n".join(lines)


def _check_fork_is_safe() -> None:
    if dist.is_available() and dist.is_initialized():
        raise RuntimeError("LocalWorld forks its workers and must be created before this process "
                           "joins a process group; create it first, or use torchrun instead")
    if torch.cuda.is_initialized():
        raise RuntimeError("LocalWorld forks its workers, which cannot inherit an initialized CUDA "
                           "context; create it before the first CUDA call")


def _worker_main(rank: int, world_size: int, store_dir: str, threads: int, conn) -> None:
    torch.set_num_threads(threads)
    try:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(store_dir, 'store')}",
                                rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        conn.send(("ok", None))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        return
    while True:
        try:
            task = conn.recv()
        except (EOFError, KeyboardInterrupt):
            break
        if task is None:
            break
        outcome = _call(task)
        try:
            conn.send(outcome)
        except Exception as exc:  # an unpicklable result must not look like a dead rank
            conn.send(("error", f"the result could not be sent back to the parent: {exc!r}"))
    dist.destroy_process_group()


def _call(task) -> tuple[str, Any]:
    fn, args, kwargs = task
    try:
        outcome = "ok", fn(*args, **kwargs)
    except BaseException:
        outcome = "error", traceback.format_exc()
    try:
        _reset_rank_state()
    except BaseException:
        outcome = "error", "resetting the MPU after the call failed:\n" + traceback.format_exc()
    return outcome


def _reset_rank_state() -> None:
    """Leave no parallel state behind for the next function run on this worker."""
    from parallelkit.distributed import mpu  # local import: mpu is optional for LocalWorld users

    if mpu.is_initialized():
        mpu.destroy()
