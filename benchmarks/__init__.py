"""parallelkit microbenchmarks: ``python -m benchmarks [NAME ...]`` runs them (``--quick`` for
small sizes), ``python -m benchmarks.bench_<name>`` runs one with its own options; see README.md."""

import os

# torch.cuda.is_available() otherwise initializes the CUDA driver in the asking process, after
# which the ranks that LocalWorld forks from it cannot use the GPU. NVML answers from outside.
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
