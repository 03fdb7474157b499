"""The model-parallel unit: one call creates this rank's TP, PP, DP, CP and expert process groups.

    state = mpu.initialize(tp=2, pp=2, cp=2)        # after torch.distributed.init_process_group
    state.tp.group, state.tp.rank, state.tp.size     # or mpu.get_tp_group(), mpu.get_tp_rank(), ...
    mpu.destroy()                                    # then initialize again with other sizes
    state = mpu.initialize(tp=2, ep=4)               # MoE: state.ep, state.expert_dp, ...

All state lives in one frozen :class:`ParallelState`. ``initialize`` returns it and makes it the
current one, which the module-level getters read, so a layer can take explicit groups or fall back
to the MPU. The rank lists come from :func:`parallelkit.distributed.rank_groups.rank_groups` and are
Megatron-core's for the same sizes and order: the dense groups from a layout with ep = 1, the expert
groups ("ep", "expert_tp", "expert_tp_ep", "expert_tp_ep_pp", "expert_dp") from a second layout with
tp = etp and cp = 1 over the same order.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from parallelkit.distributed import comm
from parallelkit.distributed.rank_groups import (DEFAULT_ORDER, EXPERT_GROUP_KINDS, GROUP_KINDS,
                                                 Layout, expert_layout, layout_groups)

# Names of the group kinds as a reader meets them in errors and in describe().
KIND_TITLES = {
    "tp": "tensor parallel", "pp": "pipeline parallel", "dp": "data parallel",
    "cp": "context parallel", "dp_cp": "data x context (gradient sync)",
    "mp": "model parallel (tp x pp)", "tp_cp": "tensor x context",
    "embedding": "embedding (first + last stage)",
    "ep": "expert model parallel", "expert_tp": "expert tensor parallel",
    "expert_tp_ep": "expert tensor x model", "expert_tp_ep_pp": "expert tensor x model x pipe",
    "expert_dp": "expert data parallel",
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
    """Everything the MPU knows: the dense and expert layouts, and this rank's group of each kind.

    The expert fields are None only where ``expert_layout`` is: a dense layout that Megatron-core
    would refuse for experts (pp not last, with cp > 1 and pp > 1), initialized without ep/etp.
    """

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
    expert_layout: Layout | None = None
    ep: GroupInfo | None = None
    expert_tp: GroupInfo | None = None
    expert_tp_ep: GroupInfo | None = None
    expert_tp_ep_pp: GroupInfo | None = None
    expert_dp: GroupInfo | None = None

    def info(self, kind: str) -> GroupInfo:
        if kind not in GROUP_KINDS + EXPERT_GROUP_KINDS:
            raise ValueError(f"unknown group kind {kind!r}; expected one of "
                             f"{GROUP_KINDS + EXPERT_GROUP_KINDS}")
        info = getattr(self, kind)
        if info is None and kind in EXPERT_GROUP_KINDS:
            layout = self.layout
            raise ValueError(f"this layout has no {kind} group: order {'-'.join(layout.order)!r} "
                             f"does not put pp last while cp={layout.cp} and pp={layout.pp}, "
                             "which Megatron-core refuses for experts; initialize with a pp-last "
                             f"order, e.g. {DEFAULT_ORDER!r}")
        if info is None:
            raise ValueError(f"rank {self.global_rank} is on pipeline stage {self.pp.rank} of "
                             f"{self.pp.size}, which holds no embedding: only first- and last-stage "
                             "ranks have an embedding group (check is_in_embedding_group() first)")
        return info


_current: ParallelState | None = None


def initialize(tp: int = 1, pp: int = 1, cp: int = 1, dp: int | None = None,
               order: str = DEFAULT_ORDER, virtual_pp: int | None = None,
               backend: str | None = None, timeout: timedelta | None = None, *,
               ep: int = 1, etp: int | None = None) -> ParallelState:
    """Create every group of every kind (a collective: all ranks must call it with equal sizes;
    where ``comm.validation_enabled`` (by default on gloo) unequal arguments raise on every rank,
    naming each rank's, instead of hanging).

    Args:
        tp, pp, cp: tensor, pipeline and context parallel sizes.
        dp: data parallel size; inferred as world_size / (tp*pp*cp) when None.
        order: the names from fastest- to slowest-varying axis (Megatron's default); "ep" may
            be left out while ep = 1, so "tp-cp-dp-pp" gives the same groups.
        virtual_pp: model chunks per pipeline rank for interleaved schedules (needs pp > 1).
        backend, timeout: passed to ``torch.distributed.new_group``; default: the world's.
        ep, etp: expert model and expert tensor parallel sizes (etp default: tp); the expert
            data parallel size is world_size / (etp*ep*pp). See ``rank_groups.expert_layout``.
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
        layout = Layout.create(world_size, tp=tp, pp=pp, cp=cp, dp=dp, order=order)
        return layout, expert_layout(layout, ep, etp)

    # Ranks that asked for different layouts would each wait in a different new_group forever:
    # compare the arguments over the world first (one tiny all-gather; see comm.validation).
    comm.check_ranks_agree(
        dist.group.WORLD, "parallelkit.mpu.initialize", ranks="", check=local_checks,
        tp_size=tp, pp_size=pp, cp_size=cp, dp_size=_inferred_dp(world_size, tp, pp, cp, dp),
        ep_size=ep, etp_size=etp, order=order, virtual_pp=virtual_pp,
        world_size=world_size, backend=backend,
        timeout=None if timeout is None else timeout.total_seconds(),
        fix="every rank must call mpu.initialize with the same sizes, order, virtual_pp, backend "
            "and timeout")
    layout, experts = local_checks()
    mine: dict[str, GroupInfo | None] = {"embedding": None}
    for kind, lists in layout_groups(layout, experts).items():
        for ranks in lists:
            key = tuple(ranks)
            group = _communicator(key, backend, timeout, kind)
            if rank in key:
                mine[kind] = GroupInfo(kind, group, key, key.index(rank))
    _current = ParallelState(layout=layout, global_rank=rank, virtual_pp=virtual_pp,
                             expert_layout=experts, **mine)
    return _current


def _inferred_dp(world_size: int, tp, pp, cp, dp):
    """dp as the layout will resolve it, so that dp=None and an explicit equal dp agree."""
    if dp is not None or not all(isinstance(v, int) and v > 0 for v in (tp, pp, cp)):
        return dp
    return world_size // (tp * pp * cp) if world_size % (tp * pp * cp) == 0 else None


# Communicators by (world, ranks, backend, timeout), kept across destroy()/initialize(): making
# one is a rendezvous through the store plus a connection per peer (and device memory on NCCL),
# and a process that switches layouts (tests, planners, elastic restarts) meets the same rank
# lists again. Kinds whose rank lists coincide (dp_cp = dp when cp = 1, expert_tp = tp when
# etp = tp, ...) share one.
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


# Generic getters: kind is one of "tp", "pp", "dp", "cp", "dp_cp", "mp", "tp_cp", "embedding",
# "ep", "expert_tp", "expert_tp_ep", "expert_tp_ep_pp", "expert_dp".
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
def get_ep_group() -> dist.ProcessGroup: return get_group("ep")
def get_ep_rank() -> int: return get_rank("ep")
def get_ep_world_size() -> int: return get_world_size("ep")
def get_expert_tp_group() -> dist.ProcessGroup: return get_group("expert_tp")
def get_expert_tp_rank() -> int: return get_rank("expert_tp")
def get_expert_tp_world_size() -> int: return get_world_size("expert_tp")
def get_expert_tp_ep_group() -> dist.ProcessGroup: return get_group("expert_tp_ep")
def get_expert_tp_ep_pp_group() -> dist.ProcessGroup: return get_group("expert_tp_ep_pp")
def get_expert_dp_group() -> dist.ProcessGroup: return get_group("expert_dp")
def get_expert_dp_rank() -> int: return get_rank("expert_dp")
def get_expert_dp_world_size() -> int: return get_world_size("expert_dp")


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


def device_mesh(device_type: str | None = None, expert: bool = False):
    """A ``DeviceMesh`` over exactly the MPU's groups: dims ``("pp", "dp", "cp", "tp")``, or with
    ``expert`` the expert layout's ``("pp", "expert_dp", "ep", "expert_tp")``.

    DTensor, FSDP2 and ``parallelize_module`` code then runs on the same layout and the same
    communicators as parallelkit's layers. ``device_type`` defaults to "cuda" on NCCL, else "cpu".
    """
    from torch.distributed.device_mesh import DeviceMesh

    state = current()
    if expert:
        state.info("expert_dp")  # a clear error where the layout has no expert groups
        layout, axes = state.expert_layout, ("pp", "dp", "ep", "tp")
        dims = ("pp", "expert_dp", "ep", "expert_tp")
    else:
        layout, axes = state.layout, ("pp", "dp", "cp", "tp")
        dims = axes
    # arange over the world, shaped slowest axis first, is the grid of global ranks; permute
    # its axes into the mesh's dimension order, then drop the one it leaves out (size 1 here:
    # ep in the dense layout, cp in the expert one).
    slow_first = tuple(reversed(layout.axes))
    grid = torch.arange(layout.world_size).reshape([layout.size(a) for a in slow_first])
    rest = [a for a in slow_first if a not in axes]
    grid = grid.permute([slow_first.index(a) for a in (*axes, *rest)])
    grid = grid.reshape([layout.size(a) for a in axes]).contiguous()
    if device_type is None:
        device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    return DeviceMesh.from_group([state.info(d).group for d in dims], device_type, mesh=grid,
                                 mesh_dim_names=dims)


def describe(state: ParallelState | Layout | None = None, *, ep: int = 1,
             etp: int | None = None) -> str:
    """The rank map as text: each group kind's rank lists, then each rank's coordinates.

    Takes a ``ParallelState``, a dense ``Layout`` (offline, no process group needed; its expert
    groups are those of ``ep`` and ``etp``) or, by default, the current state.
    """
    if state is None:
        state = current()
    if isinstance(state, Layout):
        layout, experts = state, expert_layout(state, ep, etp)
    else:
        layout, experts = state.layout, state.expert_layout
    groups = layout_groups(layout, experts)
    lines = [f"world {layout.world_size} = {_sizes_text(layout)}   "
             f"(order {'-'.join(layout.order)}: {layout.order[0]} varies fastest)", ""]
    lines += _group_lines(groups, GROUP_KINDS)
    columns = [("tp", layout, "tp"), ("cp", layout, "cp"), ("dp", layout, "dp"),
               ("pp", layout, "pp")]
    if experts is not None:
        lines += ["", f"experts: {_sizes_text(experts, expert=True)}   (same order, cp = 1)", ""]
        lines += _group_lines(groups, EXPERT_GROUP_KINDS)
        columns += [("etp", experts, "tp"), ("ep", experts, "ep"), ("edp", experts, "dp")]
    else:
        lines += ["", "experts: none (Megatron-core's expert layout needs pp last in the order "
                      "when cp > 1 and pp > 1)"]
    lines += ["", "  rank " + " ".join(f"{title:>3}" for title, _, _ in columns)]
    for rank in range(layout.world_size):
        lines.append(f"  {rank:>4} " + " ".join(f"{grid.coordinates(rank)[axis]:>3}"
                                                for _, grid, axis in columns))
    return "\n".join(lines)


def _group_lines(groups: dict[str, list[list[int]]], kinds: tuple[str, ...]) -> list[str]:
    name_width = max(9, *(len(kind) for kind in kinds))
    width = max(len(KIND_TITLES[kind]) for kind in kinds)
    return [f"  {kind:<{name_width}} {KIND_TITLES[kind]:<{width}}  "
            + " ".join(str(g).replace(" ", "") for g in groups[kind]) for kind in kinds]


def _sizes_text(layout: Layout, expert: bool = False) -> str:
    # Each layout leaves one axis at 1 (ep in the dense one, cp in the expert one): skip it.
    skip, names = ("cp", {"tp": "expert tp", "dp": "expert dp"}) if expert else ("ep", {})
    return " x ".join(f"{names.get(a, a)} {layout.size(a)}" for a in layout.axes if a != skip)
