"""Data parallelism: bucketed gradient sync overlapped with backward, ZeRO-1, global-norm clipping,
mixed precision.

``DistributedDataParallel`` averages gradients over DP (x CP) in flat buckets whose collectives
start during backward (fp32 ``main_grad`` buckets for bf16/fp16 models); expert parameters
(``expert_parallel``) go in buckets of their own, summed over the expert-DP group and scaled by
1 / (DP x CP) as Megatron does. ``DistributedOptimizer`` shards a torch optimizer's state over
DP (expert state over expert-DP); ``MixedPrecisionOptimizer`` steps fp32 master weights without
sharding; ``DynamicGradScaler`` scales fp16 losses; ``clip_grad_norm_`` clips by the norm of the
whole TP x PP (x EP) model, each parameter counted once.
"""

from parallelkit.data_parallel.buckets import (DEFAULT_BUCKET_BYTES, Bucket, accumulated_grad,
                                               plan_buckets)
from parallelkit.data_parallel.buckets import is_expert_parallel
from parallelkit.data_parallel.clip import (clip_grad_norm_, default_expert_mp_group,
                                            global_grad_norm)
from parallelkit.data_parallel.ddp import (DistributedDataParallel, default_dp_group,
                                           resolve_expert_dp_group)
from parallelkit.data_parallel.grad_scaler import DynamicGradScaler
from parallelkit.data_parallel.mixed_precision import MixedPrecisionOptimizer
from parallelkit.data_parallel.zero import DistributedOptimizer

__all__ = [
    "DistributedDataParallel", "DistributedOptimizer", "MixedPrecisionOptimizer",
    "DynamicGradScaler", "clip_grad_norm_", "global_grad_norm", "default_dp_group",
    "plan_buckets", "Bucket", "accumulated_grad", "DEFAULT_BUCKET_BYTES",
    "is_expert_parallel", "default_expert_mp_group", "resolve_expert_dp_group",
]
