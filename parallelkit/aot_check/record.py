"""Record the Triton launches the launchers make on a GPU, on a machine without one.

A case calls the real launchers of ``parallelkit.kernels`` on fake CUDA tensors (torch's
FakeTensorMode: shapes, dtypes, strides and a CUDA device, no memory), so every choice the
launchers make from the device, dtype and shape (tiles, warps, stages, grid, the fused or split
path) is the one they make on a GPU. Each ``kernel[grid](...)`` is intercepted before it would
launch: Triton's own binder (the code ``JITFunction.run`` uses) turns the arguments into the
signature, constexprs and specialisation attributes (16-byte divisibility of pointers and ints)
that the GPU would compile, and a :class:`Launch` records them for ``compile.py``.

Tied to Triton 3.8's ``JITFunction.run`` (runtime/jit.py), which this mirrors step by step. The
kernel modules must have been imported compiled, not interpreted: see compile_kernels_here.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Callable, Iterator

import torch
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from triton.runtime.jit import JITFunction, MockTensor, create_function_from_signature

TARGET = GPUTarget("cuda", 90, 32)  # sm_90: H100, H200
SM_COUNT = 132  # H100 SXM and H200: the norms size their persistent backward grid by it
# The CUDA caching allocator hands out blocks aligned to 512 bytes; a view adds its offset.
_ALLOCATION_ALIGNMENT = 512


@dataclass(frozen=True)
class Launch:
    """One intercepted launch: what Triton would compile for it, and where it came from."""

    case: str
    module: str  # the kernel's module, for a worker process to import
    kernel: str
    grid: tuple[int, ...]
    signature: dict  # argument name -> Triton type ("*bf16", "i32", "constexpr", ...)
    constexprs: dict  # (argument index,) -> value
    attrs: dict  # (argument index,) -> [["tt.divisibility", 16]] or []
    options: dict  # the backend's CUDAOptions as a dict: num_warps, num_stages, ...

    def compile_key(self) -> tuple:
        """Equal for launches that compile to the same binary."""
        return (self.module, self.kernel, repr(sorted(self.signature.items())),
                repr(sorted(self.constexprs.items())), repr(sorted(self.attrs.items())),
                repr(sorted((k, v) for k, v in self.options.items() if k != "extern_libs")))

    def named_constexprs(self) -> dict:
        """The constexprs by argument name, as the kernel's source spells them."""
        names = list(self.signature)
        return {names[path[0]]: value for path, value in self.constexprs.items()}


class _DevicePointer(MockTensor):
    """What the binder sees of a fake CUDA tensor: its dtype and a pointer with a real tensor's
    alignment (the binder specialises on data_ptr() % 16). FakeTensor's own data_ptr is 0."""

    def __init__(self, tensor: torch.Tensor):
        super().__init__(tensor.dtype, list(tensor.shape))
        self._data_ptr = _ALLOCATION_ALIGNMENT + tensor.storage_offset() * tensor.element_size()

    def data_ptr(self) -> int:
        return self._data_ptr


def _as_seen_by_binder(value):
    return _DevicePointer(value) if isinstance(value, torch.Tensor) else value


def _recorder(fn: JITFunction, backend, case: str, launches: list[Launch]) -> Callable:
    """A stand-in for ``fn.run`` that records instead of compiling and launching."""
    binder = create_function_from_signature(fn.signature, fn.params, backend)

    def run(*args, grid, warmup, **kwargs):
        # As JITFunction.run: these two options are part of every compile.
        kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        args = [_as_seen_by_binder(a) for a in args]
        kwargs = {k: _as_seen_by_binder(v) for k, v in kwargs.items()}
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound,
                                                              specialization, options)
        if callable(grid):
            grid = grid(bound)
        launches.append(Launch(case, fn.module, fn.__name__, tuple(int(g) for g in grid),
                               signature, constexprs, attrs, dict(options.__dict__)))

    return run


def compile_kernels_here() -> None:
    """Makes kernel modules imported from now on JITFunctions: Triton picks interpreted or
    compiled kernels when a kernel module is imported, from TRITON_INTERPRET."""
    os.environ["TRITON_INTERPRET"] = "0"


def jit_functions(modules: list[ModuleType]) -> list[JITFunction]:
    """Every @triton.jit function of the modules; refuses interpreted ones."""
    found = []
    for module in modules:
        for value in vars(module).values():
            if isinstance(value, JITFunction):
                found.append(value)
            elif type(value).__name__ == "InterpretedFunction":
                raise RuntimeError(
                    f"{module.__name__} was imported under TRITON_INTERPRET=1, so its kernels "
                    "are interpreted and cannot be compiled; run the check in its own process: "
                    "python -m parallelkit.aot_check")
    return found


@contextlib.contextmanager
def recording(case: str, modules: list[ModuleType]) -> Iterator[list[Launch]]:
    """Within: fake CUDA tensors, an H200's SM count, and launches of the modules' kernels
    recorded into the yielded list instead of run."""
    from parallelkit.kernels import norms

    backend = make_backend(TARGET)
    launches: list[Launch] = []
    functions = jit_functions(modules)
    sm_count = norms._sm_count  # asks the CUDA driver, which this machine may lack
    try:
        for fn in functions:
            fn.run = _recorder(fn, backend, case, launches)  # kernel[grid] calls self.run
        norms._sm_count = lambda device: SM_COUNT
        with torch._subclasses.fake_tensor.FakeTensorMode():
            yield launches
    finally:
        norms._sm_count = sm_count
        for fn in functions:
            vars(fn).pop("run", None)
