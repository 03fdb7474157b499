"""Builds parallelkit and its native extension parallelkit._C.

The C++ part always builds. The CUDA kernels build when torch sees a GPU or PARALLELKIT_BUILD_CUDA=1
(PARALLELKIT_BUILD_CUDA=0 turns them off), for TORCH_CUDA_ARCH_LIST: by default the visible GPUs,
or "9.0" (H100) on a machine without one. Against the torch already installed:

    pip install --no-build-isolation -e .
"""

import glob
import os
import re

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

DEFAULT_CUDA_ARCHES = ["9.0"]
# No -std: torch adds the standard its headers need (C++20 for torch 2.14, whose headers fail
# to compile as C++17).
CXX_FLAGS = ["-O3"]


def want_cuda() -> bool:
    flag = os.environ.get("PARALLELKIT_BUILD_CUDA", "")
    return flag == "1" if flag in ("0", "1") else torch.cuda.is_available()


def cuda_arches() -> list[str]:
    requested = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if requested and requested != "native":
        return [arch for arch in re.split(r"[;\s]+", requested) if arch]
    visible = {"%d.%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
    return sorted(visible) or DEFAULT_CUDA_ARCHES


def native_extension():
    sources = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
    include_dirs = [os.path.abspath("csrc")]
    if not want_cuda():
        return CppExtension("parallelkit._C", sources, include_dirs=include_dirs,
                            extra_compile_args={"cxx": CXX_FLAGS})
    arches = cuda_arches()
    # torch compiles for TORCH_CUDA_ARCH_LIST; pinning it to the list we bake in keeps
    # parallelkit.build_info() truthful. The quotes survive: torch shell-quotes each flag.
    os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(arches)
    defines = ["-DPARALLELKIT_WITH_CUDA", '-DPARALLELKIT_CUDA_ARCHES="%s"' % ";".join(arches)]
    return CUDAExtension("parallelkit._C", sources + sorted(glob.glob("csrc/**/*.cu", recursive=True)),
                         include_dirs=include_dirs,
                         extra_compile_args={"cxx": CXX_FLAGS + defines, "nvcc": CXX_FLAGS + defines})


setup(
    packages=find_packages(include=["parallelkit", "parallelkit.*"]) + ["parallelkit.kernels"],
    package_dir={"parallelkit.kernels": "kernels"},  # Triton kernels live at the top of the repo
    ext_modules=[native_extension()],
    # With ninja (the default), BuildExtension always reruns the build and ninja recompiles what
    # changed, flags included, so switching PARALLELKIT_BUILD_CUDA rebuilds even an in-tree build/.
    cmdclass={"build_ext": BuildExtension},
)
