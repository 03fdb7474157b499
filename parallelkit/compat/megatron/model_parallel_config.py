"""Megatron-core's ``ModelParallelConfig``: the fields the compat layers read, with its defaults.

    config = ModelParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True,
                                 params_dtype=torch.bfloat16)
    fc1 = tensor_parallel.ColumnParallelLinear(h, 4 * h, config=config, init_method=init)

The layers read a config by attribute, so any object with these fields works; a field it lacks
takes the default below. The sizes are recorded only, as in Megatron's layers: the layout is the
one ``initialize_model_parallel`` built. How each field maps onto parallelkit is listed in
``tensor_parallel/layers.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ModelParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int | None = None
    context_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    expert_tensor_parallel_size: int | None = None
    sequence_parallel: bool = False
    perform_initialization: bool = True
    use_cpu_initialization: bool = False
    fp16: bool = False   # recorded only: the layers use params_dtype, as Megatron's do
    bf16: bool = False
    params_dtype: torch.dtype = torch.float32
    gradient_accumulation_fusion: bool = False
    async_tensor_model_parallel_allreduce: bool = False
    tp_comm_overlap: bool = False
    deterministic_mode: bool = False
    defer_embedding_wgrad_compute: bool = False
