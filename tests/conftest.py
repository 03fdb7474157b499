import os

# torch.cuda.is_available() (the GPU tests' skip condition) would otherwise initialize the CUDA
# driver in pytest's process, and the workers LocalWorld forks from it could not use the GPU.
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")


def pytest_configure(config):
    # Triton chooses compiled or interpreted kernels once per process, when a kernel module is
    # imported. `pytest -m gpu` tests the compiled kernels on the GPU; every other run, the
    # kernels in Triton's interpreter on CPU tensors (machines without a GPU run only these).
    gpu_only = config.option.markexpr.strip() == "gpu"
    os.environ.setdefault("TRITON_INTERPRET", "0" if gpu_only else "1")


def pytest_sessionfinish(session, exitstatus):
    from parallelkit.testing import close_worlds

    close_worlds()
