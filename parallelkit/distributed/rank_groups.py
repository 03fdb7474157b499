"""Which global ranks form each parallel group: pure arithmetic, no process group needed.

The world is viewed as a grid whose axes are the four parallelisms, listed in ``order`` from the
fastest-varying axis to the slowest (Megatron-core's convention). With the default order
``"tp-cp-dp-pp"`` and sizes tp=2, cp=2, dp=2, pp=2 a global rank decomposes as

    rank = tp_rank + 2 * cp_rank + 4 * dp_rank + 8 * pp_rank

so TP neighbours are adjacent ranks (they share a node and its fast links) and pipeline stages are
the farthest apart. A group "of kind X" is the set of ranks that differ only in the axes of X.
Groups are listed in Megatron's order, which is also ascending order of their smallest rank, and
each group's ranks are ascending: the lists equal those of Megatron-core's ``RankGenerator`` for
the same sizes and order, so checkpoints and launch scripts written for it line up with ours.
"""

from __future__ import annotations

from dataclasses import dataclass

AXES = ("tp", "cp", "dp", "pp")
DEFAULT_ORDER = "tp-cp-dp-pp"

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


@dataclass(frozen=True)
class Layout:
    """Validated parallel sizes and axis order of one world.

    Build it with :meth:`Layout.create`, which infers dp and explains every bad value.
    """

    world_size: int
    tp: int
    pp: int
    cp: int
    dp: int
    order: tuple[str, ...]

    @classmethod
    def create(cls, world_size: int, tp: int = 1, pp: int = 1, cp: int = 1,
               dp: int | None = None, order: str = DEFAULT_ORDER) -> "Layout":
        check_positive_int("world_size", world_size)
        for name, size in (("tp", tp), ("pp", pp), ("cp", cp)):
            check_positive_int(name, size)
        model_size = tp * pp * cp
        if dp is None:
            if world_size % model_size:
                raise ValueError(
                    f"world_size={world_size} is not divisible by tp*pp*cp = {tp}*{pp}*{cp} = "
                    f"{model_size}; choose sizes whose product divides the number of processes")
            dp = world_size // model_size
        check_positive_int("dp", dp)
        if tp * pp * cp * dp != world_size:
            raise ValueError(
                f"tp*pp*cp*dp = {tp}*{pp}*{cp}*{dp} = {tp * pp * cp * dp} does not equal "
                f"world_size={world_size}; leave dp=None to infer it")
        sizes = {"tp": tp, "pp": pp, "cp": cp, "dp": dp}
        return cls(world_size, tp, pp, cp, dp, parse_order(order, sizes))

    def size(self, axis: str) -> int:
        return getattr(self, axis)

    def strides(self) -> dict[str, int]:
        """Distance in global rank between neighbours along each axis."""
        strides, stride = {}, 1
        for axis in self.order:
            strides[axis] = stride
            stride *= self.size(axis)
        return strides

    def coordinates(self, rank: int) -> dict[str, int]:
        """This rank's index along each axis, e.g. ``{"tp": 1, "cp": 0, "dp": 1, "pp": 0}``."""
        return {axis: (rank // stride) % self.size(axis) for axis, stride in self.strides().items()}


def parse_order(order: str, sizes: dict[str, int]) -> tuple[str, ...]:
    """Split ``"tp-cp-dp-pp"`` into axis names, fastest-varying first.

    As in Megatron-core, an axis of size 1 may be left out (it is appended); an axis of size > 1
    must be named, and names may not repeat.
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
    missing = [axis for axis in AXES if axis not in names]
    needed = [axis for axis in missing if sizes[axis] > 1]
    if needed:
        raise ValueError(f"order={order!r} leaves out {needed}, whose size is > 1; "
                         f"name every parallelism used, e.g. {DEFAULT_ORDER!r}")
    return names + tuple(missing)


def rank_groups(world_size: int, tp: int = 1, pp: int = 1, cp: int = 1, dp: int | None = None,
                order: str = DEFAULT_ORDER) -> dict[str, list[list[int]]]:
    """Every group of every kind, as lists of global ranks.

    Returns ``{"tp", "pp", "dp", "cp", "dp_cp", "mp", "tp_cp", "embedding"}`` → list of groups.
    Each rank appears in exactly one group of each kind, except ``embedding``: it holds only the
    first and last stage of each pipeline (where tied input/output embeddings live), or the one
    stage if pp=1, so ranks of middle stages belong to no embedding group.
    """
    layout = Layout.create(world_size, tp=tp, pp=pp, cp=cp, dp=dp, order=order)
    groups = {kind: groups_along(layout, axes) for kind, axes in GROUP_AXES.items()}
    groups["embedding"] = [sorted({g[0], g[-1]}) for g in groups["pp"]]
    return groups


def groups_along(layout: Layout, axes: tuple[str, ...]) -> list[list[int]]:
    """The groups whose members differ only along ``axes``.

    A group's rank is (offset of the group) + (position inside it); both are mixed-radix numbers
    over the axes in ``layout.order``, so enumerating positions with the fastest axis first yields
    ascending ranks, and enumerating groups the same way yields ascending first ranks.
    """
    strides = layout.strides()
    inner = [a for a in layout.order if a in axes]
    outer = [a for a in layout.order if a not in axes]
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
