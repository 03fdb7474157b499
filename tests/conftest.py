import os

# torch.cuda.is_available() (the GPU tests' skip condition) would otherwise initialize the CUDA
# driver in pytest's process, and the workers LocalWorld forks from it could not use the GPU.
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "forks: a GPU test whose ranks are forked from pytest's process (run_on_ranks); "
                   "it runs before every GPU test that may create a CUDA context there")
    # Triton chooses compiled or interpreted kernels once per process, when a kernel module is
    # imported. `pytest -m gpu` (or -m "gpu and ...") tests the compiled kernels on the GPU; every
    # other run, the kernels in Triton's interpreter on CPU tensors (all that runs without a GPU).
    expr = config.option.markexpr.strip()
    gpu_only = expr == "gpu" or expr.startswith("gpu and ")
    os.environ.setdefault("TRITON_INTERPRET", "0" if gpu_only else "1")


def pytest_collection_modifyitems(config, items):
    # A forked rank cannot use a CUDA context its parent created, and a GPU test that runs in
    # pytest's process creates one: such tests run last, whatever the files' names or the order
    # of the paths given, so that every test forking ranks (CPU tests and `forks` GPU tests)
    # comes first. The sort is stable: the order within each group is pytest's.
    items.sort(key=lambda item: item.get_closest_marker("gpu") is not None
               and item.get_closest_marker("forks") is None)


def pytest_sessionfinish(session, exitstatus):
    from parallelkit.testing import close_worlds

    close_worlds()
