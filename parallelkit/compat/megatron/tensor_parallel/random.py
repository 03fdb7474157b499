"""Megatron-core's RNG tracker names (``tensor_parallel.random``) over
``parallelkit.tensor_parallel.random``.

    model_parallel_cuda_manual_seed(1234)
    with get_cuda_rng_tracker().fork():          # "model-parallel-rng": differs per TP rank
        h = F.dropout(h_shard, 0.1)

The streams are Megatron's: "model-parallel-rng" from seed + 2718 + tp_rank, "data-parallel-rng"
from seed, and (when the layout has expert groups) "expert-parallel-rng" from
seed + 1024 + 100 * ep_rank + expert_tp_rank. Differences: the default generator is seeded with
``torch.manual_seed`` (CPU and every CUDA device; Megatron seeds the CUDA one only), and on a
machine without CUDA the tracker swaps the CPU generator, so Megatron-style code runs on CPU.
``checkpoint`` is ``parallelkit.recompute.checkpoint``, which replays every stream.
"""

from __future__ import annotations

from parallelkit import recompute
from parallelkit.compat.megatron import parallel_state
from parallelkit.tensor_parallel import random as pk_random

_MODEL_PARALLEL_RNG_TRACKER_NAME = pk_random.MODEL_PARALLEL_RNG
_DATA_PARALLEL_RNG_TRACKER_NAME = "data-parallel-rng"
_EXPERT_PARALLEL_RNG_TRACKER_NAME = "expert-parallel-rng"


def get_data_parallel_rng_tracker_name() -> str:
    return _DATA_PARALLEL_RNG_TRACKER_NAME


def get_expert_parallel_rng_tracker_name() -> str:
    return _EXPERT_PARALLEL_RNG_TRACKER_NAME


def _refuse_variants(what: str, **flags) -> None:
    on = [name for name, value in flags.items() if value]
    if on:
        raise NotImplementedError(f"{what}({on[0]}=True): only the plain tracker exists here "
                                  "(no Transformer Engine, inference or CUDA-graph trackers); "
                                  "leave it False")


def model_parallel_cuda_manual_seed(seed: int, te_rng_tracker: bool = False,
                                    inference_rng_tracker: bool = False,
                                    use_cudagraphable_rng: bool = False,
                                    force_reset_rng: bool = False) -> None:
    """Seed the default generator and the tracker's streams (see the module docstring); a
    fresh tracker each call, so ``force_reset_rng`` changes nothing."""
    _refuse_variants("model_parallel_cuda_manual_seed", te_rng_tracker=te_rng_tracker,
                     inference_rng_tracker=inference_rng_tracker,
                     use_cudagraphable_rng=use_cudagraphable_rng)
    tracker = pk_random.model_parallel_seed(
        seed, parallel_state.get_tensor_model_parallel_group())
    tracker.add(_DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    if parallel_state.get_expert_model_parallel_group(check_initialized=False) is not None:
        tracker.add(_EXPERT_PARALLEL_RNG_TRACKER_NAME,
                    seed + 1024 + 100 * parallel_state.get_expert_model_parallel_rank()
                    + parallel_state.get_expert_tensor_parallel_rank())


def get_cuda_rng_tracker(use_te_rng_tracker: bool = False, inference_rng_tracker: bool = False,
                         use_cudagraphable_rng: bool = False) -> pk_random.RNGStatesTracker:
    """The tracker made by :func:`model_parallel_cuda_manual_seed` (``fork``, ``add``,
    ``get_states``, ``set_states``, ``reset``); a clear error before it is seeded, where
    Megatron hands out an empty tracker whose ``fork`` fails later."""
    _refuse_variants("get_cuda_rng_tracker", use_te_rng_tracker=use_te_rng_tracker,
                     inference_rng_tracker=inference_rng_tracker,
                     use_cudagraphable_rng=use_cudagraphable_rng)
    try:
        return pk_random.get_rng_tracker()
    except ValueError:
        raise ValueError("the RNG tracker is not set up: call "
                         "tensor_parallel.model_parallel_cuda_manual_seed(seed) after "
                         "initialize_model_parallel") from None


def checkpoint(function, distribute_saved_activations: bool, *args):
    """``function(*args)`` with its activations recomputed in backward, every random stream
    replayed (``parallelkit.recompute.checkpoint``)."""
    if distribute_saved_activations:
        raise NotImplementedError("checkpoint(distribute_saved_activations=True) is not "
                                  "supported: the saved inputs stay whole on each TP rank; "
                                  "pass False")
    return recompute.checkpoint(function, *args)
