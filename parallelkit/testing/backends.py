"""Choosing an op's local implementation inside a test body."""

import contextlib
import os

BACKENDS = {"torch": "0", "triton": "1"}  # values of PARALLELKIT_TRITON (see ops/_backend.py)


@contextlib.contextmanager
def local_backend(name: str):
    """Run the block with the ``"torch"`` or ``"triton"`` (interpreter on CPU) local steps, and
    put PARALLELKIT_TRITON back afterwards: harness workers are reused across tests."""
    before = os.environ.get("PARALLELKIT_TRITON")
    os.environ["PARALLELKIT_TRITON"] = BACKENDS[name]
    try:
        yield
    finally:
        if before is None:
            del os.environ["PARALLELKIT_TRITON"]
        else:
            os.environ["PARALLELKIT_TRITON"] = before
