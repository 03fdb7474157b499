"""Compile recorded launches for sm_90 and read what the binary needs: registers per thread,
local memory (register spills) and shared memory.

``triton.compile`` runs the whole pipeline down to ptxas for the target without a device (ptxas
ships with Triton). The resource numbers Triton reads through the CUDA driver at load time
(``n_regs``, ``n_spills``, which is the local-memory size / 4) come here from the cubin itself,
through the cuobjdump that ships with Triton.
"""

from __future__ import annotations

import importlib
import re
import subprocess
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context

from parallelkit.aot_check.record import TARGET, Launch, compile_kernels_here

# sm_90's largest shared memory per block (opt-in): 227 KB. A kernel asking for more fails to
# launch with OutOfResources.
SHARED_LIMIT = 232448
_USAGE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


@dataclass(frozen=True)
class Compiled:
    """One binary's resources, or the error that stopped its compile."""

    registers: int = 0
    spill_bytes: int = 0  # local memory per thread (stack frame + local): register spills
    shared_bytes: int = 0  # the dynamic shared memory the launch requests
    error: str | None = None  # why there is no binary: a compile error, a launcher's error

    def problems(self) -> list[str]:
        """Why this binary fails the check (empty: it passes)."""
        if self.error:
            return [self.error]
        found = []
        if self.spill_bytes:
            found.append(f"spills {self.spill_bytes} bytes per thread to local memory")
        if self.shared_bytes > SHARED_LIMIT:
            found.append(f"needs {self.shared_bytes} bytes of shared memory, over sm_90's "
                         f"{SHARED_LIMIT}")
        return found


def compile_launch(launch: Launch) -> Compiled:
    """Compiles ``launch`` for sm_90 as JITFunction.run would on the GPU."""
    import triton
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(launch.module), launch.kernel)
    source = ASTSource(fn, launch.signature, launch.constexprs, launch.attrs)
    try:
        kernel = triton.compile(source, target=TARGET, options=launch.options)
    except Exception as error:  # noqa: BLE001  reported per kernel; the check fails on it
        return Compiled(error=f"compile error: {_one_line(error)}")
    registers, stack, _, local = _resource_usage(kernel.asm["cubin"])
    return Compiled(registers, stack + local, kernel.metadata.shared)


def compile_all(launches: list[Launch], jobs: int) -> list[Compiled]:
    """Compiles each distinct binary once (in ``jobs`` processes) and returns one result per
    launch, in order."""
    unique = list({launch.compile_key(): launch for launch in launches}.values())
    if jobs <= 1 or len(unique) <= 1:
        results = list(map(compile_launch, unique))
    else:
        # spawn: a fresh interpreter per worker, which imports the kernels compiled.
        with ProcessPoolExecutor(jobs, mp_context=get_context("spawn"),
                                 initializer=compile_kernels_here) as pool:
            results = list(pool.map(compile_launch, unique))
    by_key = {launch.compile_key(): result for launch, result in zip(unique, results)}
    return [by_key[launch.compile_key()] for launch in launches]


def _resource_usage(cubin: bytes) -> tuple[int, int, int, int]:
    """(registers, stack bytes, static shared bytes, local bytes) of the cubin's one kernel."""
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        listing = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage",
                                  file.name], capture_output=True, text=True, check=True).stdout
    match = _USAGE.search(listing)
    if match is None:
        raise RuntimeError(f"cannot read the resource usage from cuobjdump's output:\n{listing}")
    return tuple(int(group) for group in match.groups())


def _one_line(error: Exception) -> str:
    """The last non-empty line of a compile error (Triton puts the cause there), and its type."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[-1] if lines else ''}"[:300]
