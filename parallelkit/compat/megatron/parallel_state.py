"""Megatron-core's ``parallel_state`` over parallelkit's MPU.

    from parallelkit.compat.megatron import parallel_state
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2,
                                             pipeline_model_parallel_size=2)
    parallel_state.get_tensor_model_parallel_group()     # is mpu.current().tp.group

Every getter reads the one ``ParallelState`` that ``parallelkit.mpu.initialize`` makes, so
``initialize_model_parallel`` and ``mpu.initialize`` are interchangeable and Megatron-style code
sees exactly the groups parallelkit's layers use. The rank lists are Megatron-core's for the same
sizes and order (``distributed/rank_groups.py``). The one value kept here is the virtual pipeline
rank that Megatron's interleaved schedules set; it belongs to the state it was set under, so
re-initialising forgets it.

Where this differs from Megatron-core, on purpose:
- A getter called before initialisation raises a ValueError saying what to call (Megatron
  asserts, or returns 0 for some sizes); ``check_initialized=False`` returns None as in Megatron.
- ``is_pipeline_first_stage`` / ``is_pipeline_last_stage`` / ``is_rank_in_embedding_group``
  default to ``ignore_virtual=False`` and, without ``vp_stage``, use the virtual rank set by
  :func:`set_virtual_pipeline_model_parallel_rank` (0 after initialisation), as Megatron-core
  did before ``vp_stage`` existed. Recent releases default to ``ignore_virtual=True``: code meant
  for both passes ``ignore_virtual`` (and ``vp_stage``) explicitly.
- Not built, each raising NotImplementedError with the alternative: gloo side groups, SHARP,
  hierarchical or hybrid CP, more than one distributed-optimizer instance, custom embedding
  ranks, NCCL communicator options, the position-embedding, tensor x data and all-gather groups,
  and the ``set_*`` overrides of sizes and ranks.
"""

from __future__ import annotations

from datetime import timedelta

import torch.distributed as dist

from parallelkit.distributed import mpu
from parallelkit.distributed.mpu import GroupInfo, ParallelState


def initialize_model_parallel(
        tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
        virtual_pipeline_model_parallel_size: int | None = None,
        pipeline_model_parallel_comm_backend: str | None = None, use_sharp: bool = False,
        context_parallel_size: int = 1, hierarchical_context_parallel_sizes=None,
        hybrid_context_parallel: bool = False, expert_model_parallel_size: int = 1,
        num_distributed_optimizer_instances: int = 1,
        expert_tensor_parallel_size: int | None = None,
        nccl_communicator_config_path: str | None = None, distributed_timeout_minutes: int = 30,
        order: str = "tp-cp-ep-dp-pp", get_embedding_ranks=None,
        get_position_embedding_ranks=None, create_gloo_process_groups: bool = True,
        high_priority_stream_groups=None, sharp_enabled_group: str | None = None,
        create_all_gather_group: bool = False) -> None:
    """Megatron-core's call: ``parallelkit.mpu.initialize(tp, pp, cp, order=, virtual_pp=, ep=,
    etp=)`` with a timeout of ``distributed_timeout_minutes`` (a collective over the world).

    ``create_gloo_process_groups`` is accepted but no gloo side groups are made (see
    :func:`get_data_parallel_group_gloo`). Options that shape groups parallelkit does not build
    raise NotImplementedError before any group is created.
    """
    refused = [
        ("pipeline_model_parallel_comm_backend", pipeline_model_parallel_comm_backend, None,
         "every group uses the world's backend: choose it in init_process_group"),
        ("use_sharp", use_sharp, False, "SHARP groups are not built; leave it False"),
        ("sharp_enabled_group", sharp_enabled_group, None, "SHARP groups are not built"),
        ("hierarchical_context_parallel_sizes", hierarchical_context_parallel_sizes, None,
         "context parallelism uses one ring or all-to-all over the cp group"),
        ("hybrid_context_parallel", hybrid_context_parallel, False,
         "context parallelism uses the one cp group"),
        ("num_distributed_optimizer_instances", num_distributed_optimizer_instances, 1,
         "parallelkit's ZeRO-1 shards over the whole DP x CP group: use 1"),
        ("nccl_communicator_config_path", nccl_communicator_config_path, None,
         "communicators take torch's defaults"),
        ("get_embedding_ranks", get_embedding_ranks, None,
         "the embedding group is each pipeline's first and last stage"),
        ("get_position_embedding_ranks", get_position_embedding_ranks, None,
         "no position-embedding group is built (see get_position_embedding_group)"),
        ("high_priority_stream_groups", high_priority_stream_groups or None, None,
         "communicators take torch's default streams"),
        ("create_all_gather_group", create_all_gather_group, False,
         "all-gathers share the DP x CP communicator"),
    ]
    for name, value, default, alternative in refused:
        if value != default:
            raise NotImplementedError(f"initialize_model_parallel({name}={value!r}) is not "
                                      f"supported by parallelkit's MPU: {alternative}")
    mpu.initialize(tp=tensor_model_parallel_size, pp=pipeline_model_parallel_size,
                   cp=context_parallel_size, order=order,
                   virtual_pp=virtual_pipeline_model_parallel_size,
                   timeout=timedelta(minutes=distributed_timeout_minutes),
                   ep=expert_model_parallel_size, etp=expert_tensor_parallel_size)


def model_parallel_is_initialized() -> bool:
    return mpu.is_initialized()


def is_initialized() -> bool:
    return mpu.is_initialized()


def destroy_model_parallel() -> None:
    """Forget the layout (``mpu.destroy()``): communicators are kept for a later initialize."""
    mpu.destroy()


def _state() -> ParallelState:
    if not mpu.is_initialized():
        raise ValueError("model parallel groups are not initialized: call "
                         "parallel_state.initialize_model_parallel(tensor_model_parallel_size=..., "
                         "...) (or parallelkit.mpu.initialize) first")
    return mpu.current()


def _info(kind: str, check_initialized: bool = True) -> GroupInfo | None:
    """This rank's group of ``kind``; None where Megatron's getter returns None unchecked."""
    if not check_initialized and (not mpu.is_initialized()
                                  or getattr(mpu.current(), kind) is None):
        return None
    return _state().info(kind)


def _group(kind: str, check_initialized: bool = True) -> dist.ProcessGroup | None:
    info = _info(kind, check_initialized)
    return None if info is None else info.group


# Tensor, pipeline, model (tp x pp), context and tensor x context groups.
def get_tensor_model_parallel_group(check_initialized=True): return _group("tp", check_initialized)
def get_tensor_model_parallel_rank() -> int: return _info("tp").rank
def get_tensor_model_parallel_world_size() -> int: return _info("tp").size
def get_pipeline_model_parallel_group(check_initialized=True):
    return _group("pp", check_initialized)
def get_pipeline_model_parallel_rank() -> int: return _info("pp").rank
def get_pipeline_model_parallel_world_size() -> int: return _info("pp").size
def get_model_parallel_group(check_initialized=True): return _group("mp", check_initialized)
def get_context_parallel_group(check_initialized=True): return _group("cp", check_initialized)
def get_context_parallel_rank() -> int: return _info("cp").rank
def get_context_parallel_world_size() -> int: return _info("cp").size
def get_tensor_and_context_parallel_group(check_initialized=True):
    return _group("tp_cp", check_initialized)
def get_tensor_and_context_parallel_rank() -> int: return _info("tp_cp").rank
def get_tensor_and_context_parallel_world_size() -> int: return _info("tp_cp").size


def get_context_parallel_global_ranks(check_initialized=True) -> list[int] | None:
    info = _info("cp", check_initialized)
    return None if info is None else list(info.ranks)


# Global rank of group rank 0 (the source of broadcasts within the group).
def get_tensor_model_parallel_src_rank() -> int: return _info("tp").ranks[0]
def get_model_parallel_src_rank() -> int: return _info("mp").ranks[0]
def get_pipeline_model_parallel_first_rank() -> int: return _info("pp").ranks[0]
def get_pipeline_model_parallel_last_rank() -> int: return _info("pp").ranks[-1]


def get_pipeline_model_parallel_next_rank() -> int:
    """Global rank of the next stage, wrapping around (interleaved schedules need the wrap)."""
    info = _info("pp")
    return info.ranks[(info.rank + 1) % info.size]


def get_pipeline_model_parallel_prev_rank() -> int:
    info = _info("pp")
    return info.ranks[(info.rank - 1) % info.size]


def _dp_kind(with_context_parallel: bool, partial_data_parallel: bool = False,
             independent_all_gather: bool = False) -> str:
    if independent_all_gather:
        raise NotImplementedError("no separate all-gather group is built "
                                  "(create_all_gather_group): use "
                                  "get_data_parallel_group(with_context_parallel=True)")
    if partial_data_parallel and not with_context_parallel:
        raise ValueError("partial_data_parallel=True needs with_context_parallel=True: as in "
                         "Megatron, the optimizer's partial DP group includes CP")
    # With one distributed-optimizer instance (the only count supported) Megatron's partial
    # group is the whole DP x CP group.
    return "dp_cp" if with_context_parallel else "dp"


def get_data_parallel_group(with_context_parallel=False, partial_data_parallel=False,
                            independent_all_gather=False) -> dist.ProcessGroup:
    """DP, or with ``with_context_parallel`` DP x CP: the gradient all-reduce group when CP ranks
    hold other tokens of the same samples."""
    return _info(_dp_kind(with_context_parallel, partial_data_parallel,
                          independent_all_gather)).group


def get_data_parallel_rank(with_context_parallel=False, partial_data_parallel=False) -> int:
    return _info(_dp_kind(with_context_parallel, partial_data_parallel)).rank


def get_data_parallel_world_size(with_context_parallel=False, partial_data_parallel=False) -> int:
    return _info(_dp_kind(with_context_parallel, partial_data_parallel)).size


def get_data_parallel_src_rank(with_context_parallel=False) -> int:
    return _info(_dp_kind(with_context_parallel)).ranks[0]


# Virtual pipeline stages (model chunks per rank, interleaved 1F1B).
_virtual_rank: tuple[ParallelState, int | None] | None = None


def get_virtual_pipeline_model_parallel_world_size() -> int | None:
    return mpu.current().virtual_pp if mpu.is_initialized() else None


def get_virtual_pipeline_model_parallel_rank() -> int | None:
    """The model chunk the schedule is running: the last value set under the current layout,
    else 0 with virtual stages and None without (Megatron's value after initialisation)."""
    if not mpu.is_initialized():
        return None
    state = mpu.current()
    if _virtual_rank is not None and _virtual_rank[0] is state:
        return _virtual_rank[1]
    return None if state.virtual_pp is None else 0


def set_virtual_pipeline_model_parallel_rank(rank: int | None) -> None:
    global _virtual_rank
    state = _state()
    if rank is not None and state.virtual_pp is not None:
        _check_vp_stage(rank, state.virtual_pp, "virtual pipeline rank")
    _virtual_rank = (state, rank)


def _check_vp_stage(stage, virtual_pp: int, what: str = "vp_stage") -> None:
    if isinstance(stage, bool) or not isinstance(stage, int) or not 0 <= stage < virtual_pp:
        raise ValueError(f"{what}={stage!r} must be a model chunk index in [0, {virtual_pp}) "
                         f"(virtual_pipeline_model_parallel_size={virtual_pp})")


def _chunk(ignore_virtual: bool, vp_stage: int | None) -> tuple[int, int] | None:
    """(model chunk, chunks per rank) that a stage test looks at, or None to ignore chunks."""
    virtual_pp = _state().virtual_pp
    if ignore_virtual or virtual_pp is None:
        return None
    stage = vp_stage if vp_stage is not None else get_virtual_pipeline_model_parallel_rank()
    if stage is None:
        raise ValueError(f"with virtual_pipeline_model_parallel_size={virtual_pp} the stage tests "
                         "need a model chunk: pass vp_stage=, call "
                         "set_virtual_pipeline_model_parallel_rank(), or pass ignore_virtual=True")
    _check_vp_stage(stage, virtual_pp)
    return stage, virtual_pp


def is_pipeline_first_stage(ignore_virtual: bool = False, vp_stage: int | None = None) -> bool:
    """First pipeline stage; with virtual stages (unless ``ignore_virtual``) only its model
    chunk 0: ``vp_stage``, else the rank set by set_virtual_pipeline_model_parallel_rank."""
    chunk = _chunk(ignore_virtual, vp_stage)
    if chunk is not None and chunk[0] != 0:
        return False
    return _info("pp").rank == 0


def is_pipeline_last_stage(ignore_virtual: bool = False, vp_stage: int | None = None) -> bool:
    """Last pipeline stage; with virtual stages (unless ``ignore_virtual``) only its last chunk."""
    chunk = _chunk(ignore_virtual, vp_stage)
    if chunk is not None and chunk[0] != chunk[1] - 1:
        return False
    info = _info("pp")
    return info.rank == info.size - 1


# Embedding group: the first and last stage of each pipeline (tied input/output embeddings).
def get_embedding_group(check_initialized=True): return _group("embedding", check_initialized)


def is_rank_in_embedding_group(ignore_virtual: bool = False, vp_stage: int | None = None) -> bool:
    """This rank holds an embedding; with virtual stages, in the chunk being asked about: the
    first stage's chunk 0 or the last stage's last chunk."""
    embedding = _state().embedding
    if embedding is None:
        return False
    if ignore_virtual:
        return True
    rank = embedding.ranks[embedding.rank]
    if rank == embedding.ranks[0] and is_pipeline_first_stage(False, vp_stage):
        return True
    return rank == embedding.ranks[-1] and is_pipeline_last_stage(False, vp_stage)


# Expert groups (see README "Expert parallelism"): ep, expert tp, expert tp x ep, expert
# tp x ep x pp, expert dp, from the expert layout over the same order.
def get_expert_model_parallel_group(check_initialized=True): return _group("ep", check_initialized)
def get_expert_model_parallel_rank() -> int: return _info("ep").rank
def get_expert_model_parallel_world_size() -> int: return _info("ep").size
def get_expert_model_parallel_src_rank() -> int: return _info("ep").ranks[0]
def get_expert_tensor_parallel_group(check_initialized=True):
    return _group("expert_tp", check_initialized)
def get_expert_tensor_parallel_rank() -> int: return _info("expert_tp").rank
def get_expert_tensor_parallel_world_size() -> int: return _info("expert_tp").size
def get_expert_tensor_and_model_parallel_group(check_initialized=True):
    return _group("expert_tp_ep", check_initialized)
def get_expert_tensor_and_model_parallel_rank() -> int: return _info("expert_tp_ep").rank
def get_expert_tensor_and_model_parallel_world_size() -> int: return _info("expert_tp_ep").size
def get_expert_tensor_model_pipeline_parallel_group(check_initialized=True):
    return _group("expert_tp_ep_pp", check_initialized)


# With one distributed-optimizer instance the partial expert-DP group is the expert-DP group.
def get_expert_data_parallel_group(check_initialized=True, partial_expert_data_parallel=False):
    return _group("expert_dp", check_initialized)
def get_expert_data_parallel_rank(partial_expert_data_parallel=False) -> int:
    return _info("expert_dp").rank
def get_expert_data_parallel_world_size(partial_expert_data_parallel=False) -> int:
    return _info("expert_dp").size


def _not_built(name: str, alternative: str):
    def refuse(*args, **kwargs):
        raise NotImplementedError(f"parallel_state.{name} is not provided by parallelkit: "
                                  f"{alternative}")
    refuse.__name__ = refuse.__qualname__ = name
    return refuse


_GLOO = ("no gloo side groups are built; make one over the same ranks with "
         "torch.distributed.new_group(torch.distributed.get_process_group_ranks(group), "
         "backend='gloo')")
get_data_parallel_group_gloo = _not_built("get_data_parallel_group_gloo", _GLOO)
get_expert_data_parallel_group_gloo = _not_built("get_expert_data_parallel_group_gloo", _GLOO)
get_position_embedding_group = _not_built(
    "get_position_embedding_group", "learned position embeddings live on the first stage "
    "alone, so no group is needed: test is_pipeline_first_stage()")
get_tensor_and_data_parallel_group = _not_built(
    "get_tensor_and_data_parallel_group", "the groups built are tp, pp, dp, cp, dp x cp, mp, "
    "tp x cp, embedding and the expert ones (parallelkit.mpu.describe() lists them)")
get_amax_reduction_group = _not_built("get_amax_reduction_group", "FP8 training is not supported")
get_global_memory_buffer = _not_built(
    "get_global_memory_buffer", "allocate with torch.empty; torch's caching allocator reuses "
    "the memory")

# Sizes and ranks come from the groups: overriding them would let the getters disagree with the
# communicators that parallelkit's layers use.
_FIXED = ("sizes and ranks come from the groups initialize_model_parallel built; initialize the "
          "layout you need (after destroy_model_parallel()), or compute rank lists without "
          "process groups with parallelkit.mpu.rank_groups(world_size, tp=, pp=, cp=, order=)")
set_tensor_model_parallel_world_size = _not_built("set_tensor_model_parallel_world_size", _FIXED)
set_tensor_model_parallel_rank = _not_built("set_tensor_model_parallel_rank", _FIXED)
set_pipeline_model_parallel_world_size = _not_built("set_pipeline_model_parallel_world_size",
                                                    _FIXED)
set_pipeline_model_parallel_rank = _not_built("set_pipeline_model_parallel_rank", _FIXED)
set_virtual_pipeline_model_parallel_world_size = _not_built(
    "set_virtual_pipeline_model_parallel_world_size",
    "pass virtual_pipeline_model_parallel_size to initialize_model_parallel")
set_data_parallel_rank = _not_built("set_data_parallel_rank", _FIXED)
set_expert_model_parallel_world_size = _not_built("set_expert_model_parallel_world_size", _FIXED)
set_expert_model_parallel_rank = _not_built("set_expert_model_parallel_rank", _FIXED)
set_expert_tensor_parallel_world_size = _not_built("set_expert_tensor_parallel_world_size",
                                                   _FIXED)
set_expert_tensor_parallel_rank = _not_built("set_expert_tensor_parallel_rank", _FIXED)
