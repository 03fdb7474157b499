"""Data parallelism: bucketed gradient sync overlapped with backward, ZeRO-1, global-norm clipping.

``DistributedDataParallel`` averages gradients over DP (x CP) in flat buckets whose collectives
start during backward; ``DistributedOptimizer`` shards a torch optimizer's state over DP;
``clip_grad_norm_`` clips by the norm of the whole TP x PP model.
"""

from parallelkit.data_parallel.buckets import DEFAULT_BUCKET_BYTES, Bucket, plan_buckets
from parallelkit.data_parallel.clip import clip_grad_norm_, global_grad_norm
from parallelkit.data_parallel.ddp import DistributedDataParallel, default_dp_group
from parallelkit.data_parallel.zero import DistributedOptimizer

__all__ = [
    "DistributedDataParallel", "DistributedOptimizer", "clip_grad_norm_", "global_grad_norm",
    "default_dp_group", "plan_buckets", "Bucket", "DEFAULT_BUCKET_BYTES",
]
