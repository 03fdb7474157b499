import os

# Triton kernels run in its interpreter on machines without a GPU.
os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_sessionfinish(session, exitstatus):
    from parallelkit.testing import close_worlds

    close_worlds()
