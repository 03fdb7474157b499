"""Which global ranks form each parallel group: pure arithmetic, no process group needed.

The world is viewed as a grid whose axes are the parallelisms, listed in ``order`` from the
fastest-varying axis to the slowest (Megatron-core's convention). With the default order
``"tp-cp-ep-dp-pp"`` and sizes tp=2, cp=2, dp=2, pp=2 a global rank decomposes as

    rank = tp_rank + 2 * cp_rank + 4 * dp_rank + 8 * pp_rank

so TP neighbours are adjacent ranks (they share a node and its fast links) and pipeline stages are
the farthest apart. A group "of kind X" is the set of ranks that differ only in the axes of X.
Groups are listed in Megatron's order, which is also ascending order of their smallest rank, and
each group's ranks are ascending: the lists equal those of Megatron-core's ``RankGenerator`` for
the same sizes and order, so checkpoints and launch scripts written for it line up with ours.

Like Megatron-core 0.16, the world is cut twice over one order string: the dense layout (tp, cp,
dp, pp; ep = 1) for attention and dense layers, and the expert layout (tp = etp, ep, expert dp,
pp; cp = 1) for MoE layers. The two must share their pipeline groups: a stage holds both kinds.
"""

from __future__ import annotations

from dataclasses import dataclass

AXES = ("tp", "cp", "ep", "dp", "pp")
DEFAULT_ORDER = "tp-cp-ep-dp-pp"  # Megatron-core's; "tp-cp-dp-pp" gives the same dense groups

# Each group kind is the set of axes along which its members differ.
GROUP_AXES: dict[str, tuple[str, ...]] = {
    "tp": ("tp",),
    "pp": ("pp",),
    "dp": ("dp",),
    "cp": ("cp",),
    "dp_cp": ("dp", "cp"),   # gradient all-reduce when cp > 1: CP ranks hold other tokens of the same samples
    "mp": ("tp", "pp"),      # model-parallel: all ranks holding one replica of the weights
    "tp_cp": ("tp", "cp"),
}
GROUP_KINDS = (*GROUP_AXES, "embedding")

# The same, over the expert layout (Megatron's "ep", "tp", "tp-ep", "tp-ep-pp", "dp" expert groups).
EXPERT_GROUP_AXES: dict[str, tuple[str, ...]] = {
    "ep": ("ep",),                           # token all-to-all: each member holds other experts
    "expert_tp": ("tp",),                    # one expert's weights split like dense TP
    "expert_tp_ep": ("tp", "ep"),            # all experts of one layer, fully sharded
    "expert_tp_ep_pp": ("tp", "ep", "pp"),   # one replica of every expert weight
    "expert_dp": ("dp",),                    # expert gradient all-reduce: replicas of one shard
}
EXPERT_GROUP_KINDS = tuple(EXPERT_GROUP_AXES)


@dataclass(frozen=True)
class Layout:
    """Validated parallel sizes and axis order of one grid over the world (a Megatron
    ``RankGenerator``): the dense layout has ep = 1, the expert layout cp = 1.

    ``order`` holds the axes as the order string names them; :attr:`axes` adds the size-1 axes
    it leaves out. Build it with :meth:`Layout.create`, which infers dp and explains bad values.
    """

    world_size: int
    tp: int
    pp: int
    cp: int
    dp: int
    order: tuple[str, ...]
    ep: int = 1

    @classmethod
    def create(cls, world_size: int, tp: int = 1, pp: int = 1, cp: int = 1,
               dp: int | None = None, order: str = DEFAULT_ORDER, ep: int = 1) -> "Layout":
        check_positive_int("world_size", world_size)
        for name, size in (("tp", tp), ("pp", pp), ("cp", cp), ("ep", ep)):
            check_positive_int(name, size)
        if ep > 1 and cp > 1:
            raise ValueError(f"cp={cp} and ep={ep} in one layout: as in Megatron-core, CP belongs "
                             "to the dense layout and EP to the expert layout (where cp is 1); "
                             "pass both to mpu.initialize, which builds the two layouts")
        factors = {"tp": tp, "pp": pp, "cp": cp, **({"ep": ep} if ep > 1 else {})}
        names, values = "*".join(factors), "*".join(map(str, factors.values()))
        model_size = tp * pp * cp * ep
        if dp is None:
            if world_size % model_size:
                raise ValueError(
                    f"world_size={world_size} is not divisible by {names} = {values} = "
                    f"{model_size}; choose sizes whose product divides the number of processes")
            dp = world_size // model_size
        check_positive_int("dp", dp)
        if model_size * dp != world_size:
            raise ValueError(
                f"{names}*dp = {values}*{dp} = {model_size * dp} does not equal "
                f"world_size={world_size}; leave dp=None to infer it")
        sizes = {"tp": tp, "pp": pp, "cp": cp, "dp": dp, "ep": ep}
        return cls(world_size, tp, pp, cp, dp, parse_order(order, sizes), ep)

    @property
    def axes(self) -> tuple[str, ...]:
        """Every axis, fastest-varying first: the named ones, then those left out (size 1)."""
        return self.order + tuple(a for a in AXES if a not in self.order)

    def size(self, axis: str) -> int:
        return getattr(self, axis)

    def strides(self) -> dict[str, int]:
        """Distance in global rank between neighbours along each axis."""
        strides, stride = {}, 1
        for axis in self.axes:
            strides[axis] = stride
            stride *= self.size(axis)
        return strides

    def coordinates(self, rank: int) -> dict[str, int]:
        """This rank's index along each axis, e.g. ``{"tp": 1, "cp": 0, "ep": 0, "dp": 1, "pp": 0}``
        (the axes in :attr:`axes` order)."""
        return {axis: (rank // stride) % self.size(axis) for axis, stride in self.strides().items()}


def parse_order(order: str, sizes: dict[str, int]) -> tuple[str, ...]:
    """Split ``"tp-cp-ep-dp-pp"`` into axis names, fastest-varying first.

    As in Megatron-core, an axis of size 1 may be left out (it varies slowest of all); an axis of
    size > 1 must be named, and names may not repeat.
    """
    if not isinstance(order, str):
        raise ValueError(f"order must be a string like {DEFAULT_ORDER!r}, got {order!r}")
    names = tuple(name.strip().lower() for name in order.split("-"))
    unknown = [n for n in names if n not in AXES]
    if unknown:
        raise ValueError(f"order={order!r} names unknown parallelism(s) {unknown}; "
                         f"use a permutation of {AXES}, e.g. {DEFAULT_ORDER!r}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"order={order!r} repeats {repeated}; name each of {AXES} once")
    needed = [axis for axis in AXES if axis not in names and sizes[axis] > 1]
    if needed:
        raise ValueError(f"order={order!r} leaves out {needed}, whose size is > 1; "
                         f"name every parallelism used, e.g. {DEFAULT_ORDER!r}")
    return names


def expert_layout(dense: Layout, ep: int = 1, etp: int | None = None) -> Layout | None:
    """Megatron-core 0.16's expert layout: tp = etp (default: the dense tp), ep, expert dp =
    world / (etp*ep*pp), the dense pp, cp = 1, over the dense layout's order.

    Raises where Megatron-core asserts: a non-pp-last order (with pp > 1) needs equal dense and
    expert dp, and both layouts need the same pipeline groups. With ep=1 and etp=None (no experts
    asked for) such a dense layout stays usable and this returns None: it has no expert groups.
    """
    check_positive_int("ep", ep)
    if etp is not None:
        check_positive_int("etp", etp)
    tp = dense.tp if etp is None else etp
    world, pp, order = dense.world_size, dense.pp, "-".join(dense.order)
    if world % (tp * ep * pp):
        raise ValueError(
            f"world_size={world} is not divisible by etp*ep*pp = {tp}*{ep}*{pp} = {tp * ep * pp}; "
            "choose expert sizes whose product with pp divides the number of processes")
    expert = Layout.create(world, tp=tp, pp=pp, cp=1, ep=ep, order=order)
    problem = None
    if dense.order[-1] != "pp" and pp > 1 and expert.dp != dense.dp:
        problem = (f"order={order!r} does not put pp last, so (as in Megatron-core) the expert "
                   f"data parallel size world_size/(etp*ep*pp) = {expert.dp} must equal the dense "
                   f"dp = world_size/(tp*cp*pp) = {dense.dp}; put pp last, e.g. "
                   f"{DEFAULT_ORDER!r}, or choose etp*ep = tp*cp = {dense.tp * dense.cp}")
    else:
        dense_pp, expert_pp = groups_along(dense, ("pp",)), groups_along(expert, ("pp",))
        differ = [i for i, (a, b) in enumerate(zip(dense_pp, expert_pp)) if a != b]
        if differ:
            problem = (f"order={order!r} gives the expert layout other pipeline groups than the "
                       f"dense one (expert {expert_pp[differ[0]]}, dense {dense_pp[differ[0]]}); "
                       f"Megatron-core requires them equal: put pp last, e.g. {DEFAULT_ORDER!r}")
    if problem is None:
        return expert
    if ep == 1 and etp is None:
        return None
    raise ValueError(problem)


def rank_groups(world_size: int, tp: int = 1, pp: int = 1, cp: int = 1, dp: int | None = None,
                order: str = DEFAULT_ORDER, *, ep: int = 1,
                etp: int | None = None) -> dict[str, list[list[int]]]:
    """Every group of every kind, as lists of global ranks.

    Returns ``{"tp", "pp", "dp", "cp", "dp_cp", "mp", "tp_cp", "embedding"}`` and, from the expert
    layout (see :func:`expert_layout`; absent where it returns None), ``{"ep", "expert_tp",
    "expert_tp_ep", "expert_tp_ep_pp", "expert_dp"}`` → list of groups.
    """
    layout = Layout.create(world_size, tp=tp, pp=pp, cp=cp, dp=dp, order=order)
    return layout_groups(layout, expert_layout(layout, ep, etp))


def layout_groups(dense: Layout, expert: Layout | None = None) -> dict[str, list[list[int]]]:
    """The groups of :func:`rank_groups` for built layouts.

    Each rank appears in exactly one group of each kind, except ``embedding``: it holds only the
    first and last stage of each pipeline (where tied input/output embeddings live), or the one
    stage if pp=1, so ranks of middle stages belong to no embedding group.
    """
    groups = {kind: groups_along(dense, axes) for kind, axes in GROUP_AXES.items()}
    groups["embedding"] = [sorted({g[0], g[-1]}) for g in groups["pp"]]
    if expert is not None:
        groups.update({kind: groups_along(expert, axes)
                       for kind, axes in EXPERT_GROUP_AXES.items()})
    return groups


def groups_along(layout: Layout, axes: tuple[str, ...]) -> list[list[int]]:
    """The groups whose members differ only along ``axes``.

    A group's rank is (offset of the group) + (position inside it); both are mixed-radix numbers
    over ``layout.axes``, so enumerating positions with the fastest axis first yields ascending
    ranks, and enumerating groups the same way yields ascending first ranks.
    """
    strides = layout.strides()
    inner = [a for a in layout.axes if a in axes]
    outer = [a for a in layout.axes if a not in axes]
    offsets = _mixed_radix_values(outer, layout, strides)
    positions = _mixed_radix_values(inner, layout, strides)
    return [[offset + position for position in positions] for offset in offsets]


def _mixed_radix_values(axes: list[str], layout: Layout, strides: dict[str, int]) -> list[int]:
    values = [0]
    for axis in axes:  # fastest axis first: later axes multiply out the earlier ones
        values = [v + i * strides[axis] for i in range(layout.size(axis)) for v in values]
    return values


def check_positive_int(name: str, value) -> None:
    """``value`` must be an int (not a bool or a float) >= 1, or a ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be an integer >= 1")
