"""Run a test body on N gloo ranks, reusing the worker processes across tests.

    def _body(tp):                      # module level: it is sent to the workers by name
        state = mpu.initialize(tp=tp)
        ...                             # asserts run on every rank
        return state.tp.ranks           # results come back to the test, in rank order

    def test_something():
        results = run_on_ranks(_body, 8, 2, timeout=60)

One :class:`~parallelkit.launch.LocalWorld` per world size is forked on first use and kept until
the session ends (forking costs ~0.5 s, spawning ~13 s). A failing, dying or hanging rank fails the
test with that rank's traceback or a timeout message that says where each unfinished rank waits;
that world is discarded and the next test gets a fresh one. The MPU is destroyed after every
call, so no test inherits another's groups.
"""

from __future__ import annotations

import atexit
from typing import Any, Callable

from parallelkit.launch import LocalWorld

_worlds: dict[int, LocalWorld] = {}


def run_on_ranks(fn: Callable, world_size: int, *args, timeout: float = 60.0,
                 **kwargs) -> list[Any]:
    """``fn(*args, **kwargs)`` on every rank of a ``world_size`` gloo world; per-rank results."""
    world = _worlds.get(world_size)
    if world is None or not world.alive:
        if world is not None:
            world.close()  # a rank died while idle: stop the rest before forking anew
        world = _worlds[world_size] = LocalWorld(world_size)
    return world.run(fn, *args, timeout=timeout, **kwargs)


def close_worlds() -> None:
    """Stop every cached world (the session's end; also registered with atexit)."""
    while _worlds:
        _, world = _worlds.popitem()
        world.close()


atexit.register(close_worlds)
