"""Megatron-core's ``parallel_state``, ``tensor_parallel`` and ``ModelParallelConfig`` names.

    # was: from megatron.core import ModelParallelConfig, parallel_state, tensor_parallel
    from parallelkit.compat.megatron import ModelParallelConfig, parallel_state, tensor_parallel

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2,
                                             pipeline_model_parallel_size=2)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    fc1 = tensor_parallel.ColumnParallelLinear(h, 4 * h, config=config, init_method=init,
                                               gather_output=False, skip_bias_add=True)
    y, bias = fc1(x)                                    # Megatron's (output, output_bias)

Everything is backed by the one ``ParallelState`` of ``parallelkit.mpu`` and by parallelkit's own
layers and ops, so Megatron-style code and parallelkit code can share a process. Megatron options
that this package does not implement raise NotImplementedError naming the alternative; where
the results differ from Megatron-core on purpose (initialisation, label smoothing, the virtual
pipeline default) the function's docstring says so.
"""

from parallelkit.compat.megatron import parallel_state, tensor_parallel
from parallelkit.compat.megatron.model_parallel_config import ModelParallelConfig

__all__ = ["ModelParallelConfig", "parallel_state", "tensor_parallel"]
