"""What this install of parallelkit was built with and what it can use here.

``build_info()`` answers "why is my kernel not running?": a CPU-only build, an arch list that
misses this GPU, or no Triton.
"""

import importlib.metadata
import importlib.util

import torch

import parallelkit


def _triton_version() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return None
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:  # an importable but unpackaged checkout
        return "unknown"


def build_info() -> dict:
    """Versions and capabilities; every value is a str, bool, list of str or None."""
    # Imported here so that `import parallelkit` works before the extension is built.
    from parallelkit._native import native

    triton_version = _triton_version()
    return {
        "parallelkit_version": parallelkit.__version__,
        "torch_version": torch.__version__,
        "torch_cuda_version": torch.version.cuda,
        "cuda_compiled": bool(native.cuda_compiled()),
        "cuda_arches": list(native.cuda_arches()),
        "cuda_available": torch.cuda.is_available(),
        "triton_available": triton_version is not None,
        "triton_version": triton_version,
    }


def format_build_info(info: dict | None = None) -> str:
    """``build_info()`` as aligned ``key: value`` lines, for logs and bug reports."""
    info = build_info() if info is None else info
    width = max(len(key) for key in info)
    return "\n".join(f"{key:<{width}} : {value}" for key, value in info.items())
