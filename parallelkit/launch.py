"""Run a function on every rank of a local gloo world: N forked CPU processes, kept alive for reuse.

This is what `python -m parallelkit ...` uses to show a layout without `torchrun`, and what the
test harness keeps open across tests. Forking (~0.5 s for 8 ranks) instead of spawning (~13 s)
is only safe before the parent creates a process group or a CUDA context, so that is checked.

    with LocalWorld(8) as world:
        results = world.run(my_function, arg, timeout=60)   # my_function(arg) on ranks 0..7

`my_function` must be importable by name (a module-level function): it travels by pickle.
A rank that raises, dies or hangs fails the call with that rank's traceback or a timeout message
that says where every unfinished rank was waiting, and the world is torn down (its process group
can no longer be trusted); the caller may open a new one. Workers exit when their owner dies.
"""

from __future__ import annotations

import faulthandler
import multiprocessing as mp
import multiprocessing.connection
import os
import re
import shutil
import signal
import tempfile
import threading
import time
import traceback
import weakref
from datetime import timedelta
from multiprocessing.reduction import ForkingPickler
from typing import Any, Callable

import torch
import torch.distributed as dist

# A collective blocked on a dead peer must give up well before CI does.
COLLECTIVE_TIMEOUT_S = 120.0
# After one rank fails, how long the others get to report before the world is killed: they are
# usually blocked in a collective that waits for the failed rank.
GRACE_AFTER_FAILURE_S = 2.0
# How long a timed-out rank gets to write its stack (faulthandler writes it from the signal).
STACK_DUMP_WAIT_S = 1.0
FRAMES_SHOWN = 4
# How often a worker checks that its owner is alive (a busy worker never reads its pipe's EOF).
OWNER_POLL_S = 0.5

# Every owner-side pipe end of every open world in this process: a forked worker closes them all,
# or an idle worker of one world would keep another world's pipes open past its owner's death.
_owner_ends: weakref.WeakSet = weakref.WeakSet()


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
            _owner_ends.add(parent_end)
            proc = ctx.Process(target=_worker_main, daemon=True, name=f"parallelkit-rank{rank}",
                               args=(rank, world_size, self._store_dir, threads_per_rank, child_end,
                                     list(_owner_ends), os.getpid()))
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
        if not self._procs:
            raise RuntimeError("this LocalWorld has been closed (a rank failed or close() ran); "
                               "open a new one")
        name = getattr(fn, "__qualname__", repr(fn))
        if "<" in name:  # <lambda>, <locals>: pickle would fail with a less helpful message
            raise TypeError(f"{name} cannot be sent to worker processes; "
                            "pass a function defined at module level")
        try:  # once, before any rank is sent anything: a half-sent task would desync the ranks
            task = ForkingPickler.dumps((fn, args, kwargs))
        except Exception as exc:
            raise TypeError(f"the call {name}(...) cannot be pickled for the workers ({exc!r}); "
                            "pass module-level functions and picklable arguments") from exc
        dead = [r for r, p in enumerate(self._procs) if not p.is_alive()]
        if dead:
            codes = {r: _describe_exit(self._procs[r].exitcode) for r in dead}
            self._kill()
            raise RankFailure(f"rank(s) {dead} died while idle ({codes}); this world was "
                              "stopped, open a new one")
        for conn in self._conns:
            try:
                conn.send_bytes(task)
            except OSError:
                pass  # that rank died just now; _collect reports it with its exit code
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
            # The process sentinel too: a rank that exits without a word is dead even if some
            # process it forked still holds its end of the pipe open.
            rank_of = {self._conns[r]: r for r in pending}
            rank_of.update({self._procs[r].sentinel: r for r in pending})
            for ready in mp.connection.wait(list(rank_of), timeout=remaining):
                rank = rank_of[ready]
                if rank not in pending:
                    continue  # its pipe and its sentinel both fired
                pending.discard(rank)
                status, payload = self._receive(rank)
                if status == "ok":
                    results[rank] = payload
                else:
                    errors[rank] = payload
            if errors:
                deadline = min(deadline, time.monotonic() + GRACE_AFTER_FAILURE_S)
        if errors or pending:
            stacks = self._dump_stacks(sorted(pending))
            self._kill()
            finished = set(range(self.world_size)) - pending - set(errors)
            raise RankFailure(_failure_message(what, timeout, errors, stacks, sorted(finished)))
        return results

    def _receive(self, rank: int) -> tuple[str, Any]:
        conn = self._conns[rank]
        try:
            if conn.poll():
                return conn.recv()
        except EOFError:
            pass
        except Exception as exc:
            return "error", f"its message could not be read by the parent: {exc!r}"
        self._procs[rank].join(1.0)
        return "error", f"the process died ({_describe_exit(self._procs[rank].exitcode)})"

    def _dump_stacks(self, ranks: list[int]) -> dict[int, list[tuple[str, int, str]]]:
        """Each rank's main-thread frames (file, line, function), innermost first; [] if unknown."""
        if not ranks:
            return {}
        paths = {r: _stack_path(self._store_dir, r) for r in ranks}
        for rank in ranks:
            try:
                os.kill(self._procs[rank].pid, signal.SIGUSR1)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + STACK_DUMP_WAIT_S
        while time.monotonic() < deadline and not all(_size(p) for p in paths.values()):
            time.sleep(0.05)
        time.sleep(0.05)  # a dump that just started is a few writes from done
        stacks = {}
        for rank, path in paths.items():
            try:
                with open(path) as f:
                    stacks[rank] = _main_thread_frames(f.read())
            except OSError:
                stacks[rank] = []
        return stacks


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _stack_path(store_dir: str, rank: int) -> str:
    return os.path.join(store_dir, f"stack-rank{rank}.txt")


def _describe_exit(code) -> str:
    if code is not None and code < 0:
        try:
            return f"exit code {code}: killed by {signal.Signals(-code).name}"
        except ValueError:
            pass
    return f"exit code {code}"


_FRAME = re.compile(r'\s+File "(.*)", line (\d+) in (.*)')


def _main_thread_frames(dump: str) -> list[tuple[str, int, str]]:
    """The frames of the thread running `_worker_main` in a faulthandler dump, innermost first,
    down to (not including) the harness's own frames."""
    others = []
    for block in re.split(r"\n(?=\S)", dump):
        frames = [(m[1], int(m[2]), m[3]) for m in map(_FRAME.match, block.splitlines()) if m]
        ours = [i for i, (path, _, fn) in enumerate(frames)
                if path == __file__ and fn in ("_call", "_worker_main")]
        if ours:
            return frames[:ours[0]]
        if frames and frames[0][2] != "_watch_owner":
            others.append(frames)
    # faulthandler keeps only the innermost 100 frames: deep recursion can cut off ours.
    return others[0] if len(others) == 1 else []


def _in_collective(frames) -> bool:
    return any(f"torch{os.sep}distributed{os.sep}" in path for path, _, _ in frames)


def _where(frames) -> str:
    if not frames:
        return "no stack (the rank did not answer SIGUSR1)"
    shown = []
    for path, line, fn in frames[:FRAMES_SHOWN]:
        if "site-packages" + os.sep in path:
            path = path.split("site-packages" + os.sep, 1)[1]
        elif path.startswith(os.getcwd() + os.sep):
            path = os.path.relpath(path)
        shown.append(f"{path}:{line} in {fn}")
    return "at " + " <- ".join(shown)


def _failure_message(what: str, timeout: float, errors: dict[int, str],
                     stacks: dict[int, list], finished: list[int]) -> str:
    lines, hung = _error_lines(what, errors), sorted(stacks)
    if hung and errors:
        lines.append(f"rank(s) {hung} were still running (most likely blocked in a collective "
                     "waiting for a failed rank) and were stopped")
    elif hung:
        lines.append(f"rank(s) {hung} did not finish {what} within {timeout:g} s "
                     "(a hang: a collective some rank never joined, or a deadlock); stopped")
    outside = [r for r in hung if not _in_collective(stacks[r])]
    inside = [r for r in hung if r not in outside]
    if outside:
        cause = "" if errors else " (likely the cause)"
        lines.append(f"rank(s) {outside} are not in a collective{cause}:")
        lines += [f"  rank {r} {_where(stacks[r])}" for r in outside]
    if inside:
        lines.append(f"rank(s) {inside} are waiting in a collective:")
        lines += [f"  rank {r} {_where(stacks[r])}" for r in inside]
        if not outside and finished and not errors:
            lines.append(f"rank(s) {finished} had returned without joining it (likely the cause)")
    return "\n".join(lines)


def _error_lines(what: str, errors: dict[int, str]) -> list[str]:
    """Full tracebacks for the ranks that failed on their own; one line for those whose collective
    then broke because a peer was gone ("Connection reset by peer"), so the cause stands out."""
    in_collective = f"torch{os.sep}distributed{os.sep}"
    causes = {r: text for r, text in errors.items() if in_collective not in text}
    followers = {r: text for r, text in errors.items() if r not in causes}
    if not causes:
        causes, followers = errors, {}
    lines = [f"rank(s) {sorted(causes)} failed while {what}:"]
    lines += [f"--- rank {r} ---\n{text.rstrip()}" for r, text in sorted(causes.items())]
    if followers:
        lines.append(f"rank(s) {sorted(followers)} then failed inside a collective "
                     "(a consequence):")
        lines += [f"  rank {r}: {text.rstrip().splitlines()[-1]}"
                  for r, text in sorted(followers.items())]
    return lines if errors else []


def _check_fork_is_safe() -> None:
    if dist.is_available() and dist.is_initialized():
        raise RuntimeError("LocalWorld forks its workers and must be created before this process "
                           "joins a process group; create it first, or use torchrun instead")
    if torch.cuda.is_initialized():
        raise RuntimeError("LocalWorld forks its workers, which cannot inherit an initialized CUDA "
                           "context; create it before the first CUDA call")


def _watch_owner(owner_pid: int, store_dir: str) -> None:
    """Exit when the owner dies (reparenting changes our parent), even mid-collective. A thread
    rather than PR_SET_PDEATHSIG, which fires when the forking *thread* ends, not the process."""
    while os.getppid() == owner_pid:
        time.sleep(OWNER_POLL_S)
    shutil.rmtree(store_dir, ignore_errors=True)  # nobody else is left to remove it
    os._exit(1)


def _worker_main(rank: int, world_size: int, store_dir: str, threads: int, conn,
                 owner_ends: list, owner_pid: int) -> None:
    for end in owner_ends:
        end.close()  # inherited copies: while open, our own pipe would never read EOF
    threading.Thread(target=_watch_owner, args=(owner_pid, store_dir), daemon=True).start()
    # On timeout the owner sends SIGUSR1 to ask where this rank is waiting; the file stays open.
    faulthandler.register(signal.SIGUSR1, file=open(_stack_path(store_dir, rank), "w"),
                          all_threads=True, chain=False)
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
        except (EOFError, KeyboardInterrupt):  # the owner is gone without closing us
            shutil.rmtree(store_dir, ignore_errors=True)
            break
        except Exception:  # e.g. the function's module cannot be imported here
            conn.send(("error", "the task could not be unpickled:\n" + traceback.format_exc()))
            continue
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
