"""The model-parallel unit: one call creates this rank's TP, PP, DP and CP process groups.

    state = mpu.initialize(tp=2, pp=2, cp=2)        # after torch.distributed.init_process_group
    state.tp.group, state.tp.rank, state.tp.size     # or mpu.get_tp_group(), mpu.get_tp_rank(), ...
    mpu.destroy()                                    # then initialize again with other sizes

All state lives in one frozen :class:`ParallelState`. ``initialize`` returns it and makes it the
current one, which the module-level getters read, so a layer can take explicit groups or fall back
to the MPU. The rank lists come from :func:`parallelkit.distributed.rank_groups.rank_groups` and are
Megatron-core's for the same sizes and order.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from parallelkit.distributed import comm
from parallelkit.distributed.rank_groups import (DEFAULT_ORDER, GROUP_KINDS, Layout,
                                                 rank_groups)

# Names of the group kinds as a reader meets them in errors and in describe().
KIND_TITLES = {
    "tp": "tensor parallel", "pp": "pipeline parallel", "dp": "data parallel",
    "cp": "context parallel", "dp_cp": "data x context (gradient sync)",
    "mp": "model parallel (tp x pp)", "tp_cp": "tensor x context",
    "embedding": "embedding (first + last stage)",
}


@dataclass(frozen=True)
class GroupInfo:
    """This rank's group of one kind.

    ``ranks`` are global ranks in group order: ``ranks[i]`` is group rank ``i``.
    """

    kind: str
    group: dist.ProcessGroup
    ranks: tuple[int, ...]
    rank: int  # this process's rank inside the group

    @property
    def size(self) -> int:
        return len(self.ranks)


@dataclass(frozen=True)
class ParallelState:
    """Everything the MPU knows: the layout, and this rank's group of each kind."""

    layout: Layout
    global_rank: int
    virtual_pp: int | None
    tp: GroupInfo
    pp: GroupInfo
    dp: GroupInfo
    cp: GroupInfo
    dp_cp: GroupInfo
    mp: GroupInfo
    tp_cp: GroupInfo
    embedding: GroupInfo | None  # None on middle pipeline stages, which hold no embedding

    def info(self, kind: str) -> GroupInfo:
        if kind not in GROUP_KINDS:
            raise ValueError(f"unknown group kind {kind!r}; expected one of {GROUP_KINDS}")
        info = getattr(self, kind)
        if info is None:
            raise ValueError(f"rank {self.global_rank} is on pipeline stage {self.pp.rank} of "
                             f"{self.pp.size}, which holds no embedding: only first- and last-stage "
                             "ranks have an embedding group (check is_in_embedding_group() first)")
        return info


_current: ParallelState | None = None


def initialize(tp: int = 1, pp: int = 1, cp: int = 1, dp: int | None = None,
               order: str = DEFAULT_ORDER, virtual_pp: int | None = None,
               backend: str | None = None, timeout: timedelta | None = None) -> ParallelState:
    """Create every group of every kind (a collective: all ranks must call it with equal sizes;
    where ``comm.validation_enabled`` (by default on gloo) unequal arguments raise on every rank,
    naming each rank's, instead of hanging).

    Args:
        tp, pp, cp: tensor, pipeline and context parallel sizes.
        dp: data parallel size; inferred as world_size / (tp*pp*cp) when None.
        order: the four names from fastest- to slowest-varying axis (Megatron's default).
        virtual_pp: model chunks per pipeline rank for interleaved schedules (needs pp > 1).
        backend, timeout: passed to ``torch.distributed.new_group``; default: the world's.
    """
    global _current
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("torch.distributed is not initialized: call "
                         "torch.distributed.init_process_group() first (torchrun sets it up)")
    world_size, rank = dist.get_world_size(), dist.get_rank()

    def local_checks():
        if _current is not None:
            raise ValueError(f"parallelkit.mpu is already initialized "
                             f"({_sizes_text(_current.layout)}); call parallelkit.mpu.destroy() "
                             "before initializing again")
        if virtual_pp is not None and (isinstance(virtual_pp, bool)
                                       or not isinstance(virtual_pp, int) or virtual_pp < 1
                                       or (virtual_pp > 1 and pp == 1)):
            raise ValueError(f"virtual_pp={virtual_pp!r} must be None or an integer >= 1, and > 1 "
                             f"only with pp > 1 (got pp={pp})")
        return Layout.create(world_size, tp=tp, pp=pp, cp=cp, dp=dp, order=order)

    # Ranks that asked for different layouts would each wait in a different new_group forever:
    # compare the arguments over the world first (one tiny all-gather; see comm.validation).
    comm.check_ranks_agree(
        dist.group.WORLD, "parallelkit.mpu.initialize", ranks="", check=local_checks,
        tp_size=tp, pp_size=pp, cp_size=cp, dp_size=_inferred_dp(world_size, tp, pp, cp, dp),
        order=order, virtual_pp=virtual_pp, world_size=world_size, backend=backend,
        timeout=None if timeout is None else timeout.total_seconds(),
        fix="every rank must call mpu.initialize with the same sizes, order, virtual_pp, backend "
            "and timeout")
    layout = local_checks()
    all_groups = rank_groups(world_size, tp=tp, pp=pp, cp=cp, dp=dp, order=order)

    mine: dict[str, GroupInfo | None] = {"embedding": None}
    for kind in GROUP_KINDS:
        for ranks in all_groups[kind]:
            key = tuple(ranks)
            group = _communicator(key, backend, timeout, kind)
            if rank in key:
                mine[kind] = GroupInfo(kind, group, key, key.index(rank))
    _current = ParallelState(layout=layout, global_rank=rank, virtual_pp=virtual_pp, **mine)
    return _current


def _inferred_dp(world_size: int, tp, pp, cp, dp):
    """dp as the layout will resolve it, so that dp=None and an explicit equal dp agree."""
    if dp is not None or not all(isinstance(v, int) and v > 0 for v in (tp, pp, cp)):
        return dp
    return world_size // (tp * pp * cp) if world_size % (tp * pp * cp) == 0 else None


# Communicators by (world, ranks, backend, timeout), kept across destroy()/initialize(): making
# one is a rendezvous through the store plus a connection per peer (and device memory on NCCL),
# and a process that switches layouts (tests, planners, elastic restarts) meets the same rank
# lists again. Kinds whose rank lists coincide (dp_cp = dp when cp = 1, ...) share one.
_communicators: dict[tuple, dist.ProcessGroup] = {}


def _communicator(ranks: tuple[int, ...], backend, timeout, kind: str) -> dist.ProcessGroup:
    # Every rank calls this for every group, in the same order, member or not, and every rank
    # has seen the same sequence of layouts, so all ranks agree on which entries are new.
    key = (id(dist.group.WORLD), ranks, backend, timeout)
    if key not in _communicators:
        _communicators[key] = dist.new_group(list(ranks), backend=backend, timeout=timeout,
                                             group_desc=f"parallelkit_{kind}")
    return _communicators[key]


def destroy(free_communicators: bool = False) -> None:
    """Forget the current layout so that :func:`initialize` can run again; the world process
    group stays. Communicators are kept for reuse unless ``free_communicators`` (then every
    rank must call it). A no-op if uninitialized."""
    global _current
    _current = None
    if free_communicators:
        for group in _communicators.values():
            if group != dist.GroupMember.NON_GROUP_MEMBER:
                dist.destroy_process_group(group)
        _communicators.clear()


def is_initialized() -> bool:
    return _current is not None


def current() -> ParallelState:
    """The state made by :func:`initialize`; a clear error if there is none."""
    if _current is None:
        raise ValueError("parallelkit.mpu is not initialized: call "
                         "parallelkit.mpu.initialize(tp=..., pp=..., cp=...) first")
    return _current


# Generic getters: kind is one of "tp", "pp", "dp", "cp", "dp_cp", "mp", "tp_cp", "embedding".
def get_group(kind: str) -> dist.ProcessGroup:
    return current().info(kind).group


def get_rank(kind: str) -> int:
    return current().info(kind).rank


def get_world_size(kind: str) -> int:
    return current().info(kind).size


def get_group_ranks(kind: str) -> list[int]:
    return list(current().info(kind).ranks)


# Named getters for the groups that layers ask for most.
def get_tp_group() -> dist.ProcessGroup: return get_group("tp")
def get_tp_rank() -> int: return get_rank("tp")
def get_tp_world_size() -> int: return get_world_size("tp")
def get_pp_group() -> dist.ProcessGroup: return get_group("pp")
def get_pp_rank() -> int: return get_rank("pp")
def get_pp_world_size() -> int: return get_world_size("pp")
def get_cp_group() -> dist.ProcessGroup: return get_group("cp")
def get_cp_rank() -> int: return get_rank("cp")
def get_cp_world_size() -> int: return get_world_size("cp")
def get_dp_rank() -> int: return get_rank("dp")
def get_dp_world_size() -> int: return get_world_size("dp")
def get_embedding_group() -> dist.ProcessGroup: return get_group("embedding")


def is_in_embedding_group() -> bool:
    """Whether this rank holds an embedding: first or last pipeline stage."""
    return current().embedding is not None


def get_dp_group(with_context_parallel: bool = False) -> dist.ProcessGroup:
    """The gradient-sync group: DP, or DP x CP when CP ranks hold other tokens of one sample."""
    return get_group("dp_cp" if with_context_parallel else "dp")


def get_virtual_pp_world_size() -> int | None:
    return current().virtual_pp


def is_pipeline_first_stage(vp_stage: int | None = None) -> bool:
    """First pipeline stage; with interleaving, only model chunk ``vp_stage=0`` of it counts."""
    if vp_stage is not None and vp_stage != 0:
        return False
    return get_pp_rank() == 0


def is_pipeline_last_stage(vp_stage: int | None = None) -> bool:
    """Last pipeline stage; with interleaving, only the last model chunk of it counts."""
    virtual = current().virtual_pp
    if vp_stage is not None and virtual is not None and vp_stage != virtual - 1:
        return False
    return get_pp_rank() == get_pp_world_size() - 1


def get_pipeline_next_rank() -> int:
    """Global rank of the next stage (wrapping around, as interleaved schedules need)."""
    info = current().pp
    return info.ranks[(info.rank + 1) % info.size]


def get_pipeline_prev_rank() -> int:
    """Global rank of the previous stage (wrapping around)."""
    info = current().pp
    return info.ranks[(info.rank - 1) % info.size]


def device_mesh(device_type: str | None = None):
    """A ``DeviceMesh`` with dims ``("pp", "dp", "cp", "tp")`` over exactly the MPU's groups.

    DTensor, FSDP2 and ``parallelize_module`` code then runs on the same layout and the same
    communicators as parallelkit's layers. ``device_type`` defaults to "cuda" on NCCL, else "cpu".
    """
    from torch.distributed.device_mesh import DeviceMesh

    state = current()
    layout = state.layout
    dims = ("pp", "dp", "cp", "tp")
    # arange over the world, shaped slowest axis first, is the grid of global ranks; permute
    # its axes into the mesh's fixed dimension order.
    slow_first = tuple(reversed(layout.order))
    grid = torch.arange(layout.world_size).reshape([layout.size(a) for a in slow_first])
    grid = grid.permute([slow_first.index(d) for d in dims]).contiguous()
    if device_type is None:
        device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    return DeviceMesh.from_group([state.info(d).group for d in dims], device_type, mesh=grid,
                                 mesh_dim_names=dims)


def describe(state: ParallelState | Layout | None = None) -> str:
    """The rank map as text: each group kind's rank lists, then each rank's coordinates.

    Takes a ``ParallelState``, a ``Layout`` (offline, no process group needed) or, by default, the
    current state.
    """
    if state is None:
        state = current()
    layout = state if isinstance(state, Layout) else state.layout
    groups = rank_groups(layout.world_size, tp=layout.tp, pp=layout.pp, cp=layout.cp,
                         dp=layout.dp, order="-".join(layout.order))
    lines = [f"world {layout.world_size} = {_sizes_text(layout)}   "
             f"(order {'-'.join(layout.order)}: {layout.order[0]} varies fastest)", ""]
    width = max(len(t) for t in KIND_TITLES.values())
    for kind in GROUP_KINDS:
        lists = " ".join(str(g).replace(" ", "") for g in groups[kind])
        lines.append(f"  {kind:<9} {KIND_TITLES[kind]:<{width}}  {lists}")
    axes = ("tp", "cp", "dp", "pp")
    lines += ["", "  rank " + " ".join(f"{a:>3}" for a in axes)]
    for rank in range(layout.world_size):
        coords = layout.coordinates(rank)
        lines.append(f"  {rank:>4} " + " ".join(f"{coords[a]:>3}" for a in axes))
    return "\n".join(lines)


def _sizes_text(layout: Layout) -> str:
    return " x ".join(f"{a} {layout.size(a)}" for a in layout.order)
