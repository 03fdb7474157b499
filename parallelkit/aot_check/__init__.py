"""Ahead-of-time compile check of every Triton kernel for sm_90 (H100/H200), without a GPU.

    python -m parallelkit.aot_check [--json PATH] [--only REGEX] [--jobs N]

drives the real launchers of ``parallelkit.kernels`` on fake CUDA tensors at the shapes of real
models and of the GPU tests (``cases.py``), records each launch exactly as Triton would compile
it on the GPU (``record.py``: constexprs, warps, stages, specialisation, grid), compiles it for
sm_90 with the ptxas that ships with Triton and reads registers, spills and shared memory from
the binary (``compile.py``). It fails, exit 1, on a compile error, any register spill, or shared
memory over sm_90's per-block limit, naming the kernel and the launch.

Run it in its own process: the kernels must be imported compiled, not interpreted.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from parallelkit.aot_check.cases import Case, all_cases
from parallelkit.aot_check.compile import SHARED_LIMIT, Compiled, compile_all
from parallelkit.aot_check.record import Launch, compile_kernels_here, jit_functions, recording

__all__ = ["Case", "Row", "SHARED_LIMIT", "all_cases", "check", "kernel_names"]


@dataclass(frozen=True)
class Row:
    """One launch and what its binary needs (or why there is none)."""

    case: str
    kernel: str
    launch: Launch | None = None  # None: the launcher itself raised
    compiled: Compiled = field(default_factory=Compiled)

    def problems(self) -> list[str]:
        return self.compiled.problems()

    def config(self) -> str:
        """The launch's constexprs, compactly: flags that are set, sizes, dtypes."""
        if self.launch is None:
            return ""
        parts = []
        for name, value in self.launch.named_constexprs().items():
            if isinstance(value, bool):
                parts += [name] if value else []
            else:
                parts.append(f"{name}={_short(value)}")
        return " ".join(parts)

    def to_json(self) -> dict:
        record = dict(case=self.case, kernel=self.kernel, registers=self.compiled.registers,
                      spill_bytes=self.compiled.spill_bytes,
                      shared_bytes=self.compiled.shared_bytes, error=self.compiled.error,
                      problems=self.problems())
        if self.launch is not None:
            record.update(grid=list(self.launch.grid), num_warps=self.launch.options["num_warps"],
                          num_stages=self.launch.options["num_stages"],
                          constexprs={k: _short(v) for k, v in
                                      self.launch.named_constexprs().items()},
                          signature={k: str(v) for k, v in self.launch.signature.items()})
        return record


def kernel_modules() -> list:
    """The modules whose kernels the check compiles (imported compiled, not interpreted)."""
    compile_kernels_here()
    from parallelkit.kernels import cross_entropy, flash_attention, norms

    return [norms, cross_entropy, flash_attention]


def kernel_names() -> set[str]:
    """Every kernel a launcher can launch: the modules' @triton.jit functions named *_kernel
    (the others are device functions they call)."""
    return {fn.__name__ for fn in jit_functions(kernel_modules())
            if fn.__name__.endswith("_kernel")}


def check(cases: list[Case] | None = None, only: str | None = None, jobs: int = 1) -> list[Row]:
    """Records the launches of ``cases`` (default: all; ``only``: names matching this regex) and
    compiles each distinct one for sm_90. One Row per launch, in order; a case whose launcher
    raises or launches nothing gives a failing Row of its own."""
    modules = kernel_modules()
    os.environ["PARALLELKIT_TRITON"] = "1"  # the ops' switch: Triton, never the torch path
    cases = all_cases() if cases is None else cases
    if only is not None:
        cases = [case for case in cases if re.search(only, case.name)]
    launches, failed = [], []
    for case in cases:
        with recording(case.name, modules) as recorded:
            try:
                case.run()
            except Exception as error:  # noqa: BLE001  a launcher that raises fails the check
                recorded.clear()
                failed.append(Row(case.name, "(launcher)", compiled=Compiled(
                    error=f"the launcher raised {type(error).__name__}: {error}")))
            else:
                if not recorded:
                    failed.append(Row(case.name, "(launcher)", compiled=Compiled(
                        error="launched no Triton kernel (the op took its torch path)")))
        launches += recorded
    results = compile_all(launches, jobs)
    rows = [Row(launch.case, launch.kernel, launch, result)
            for launch, result in zip(launches, results)]
    return rows + failed


def _short(value) -> str:
    """tl.float32 -> fp32; other values as str."""
    text = str(value)
    return text.removeprefix("triton.language.").replace("float", "fp").replace("bfp", "bf")
