"""rank_groups against lists written out by hand and against a brute-force construction."""

import itertools

import pytest

from parallelkit.distributed.rank_groups import Layout, rank_groups

SINGLETONS_8 = [[r] for r in range(8)]

# (world, sizes, order) -> expected lists, worked out on paper from rank = sum(coord * stride).
HAND_WRITTEN = [
    (1, dict(), "tp-cp-dp-pp", {kind: [[0]] for kind in
                                ("tp", "pp", "dp", "cp", "dp_cp", "mp", "tp_cp", "embedding")}),
    (4, dict(tp=2), "tp-cp-dp-pp", {
        "tp": [[0, 1], [2, 3]], "dp": [[0, 2], [1, 3]], "pp": [[0], [1], [2], [3]],
        "cp": [[0], [1], [2], [3]], "dp_cp": [[0, 2], [1, 3]], "mp": [[0, 1], [2, 3]],
        "tp_cp": [[0, 1], [2, 3]], "embedding": [[0], [1], [2], [3]]}),
    # rank = tp + 2*cp + 4*pp
    (8, dict(tp=2, pp=2, cp=2), "tp-cp-dp-pp", {
        "tp": [[0, 1], [2, 3], [4, 5], [6, 7]], "cp": [[0, 2], [1, 3], [4, 6], [5, 7]],
        "pp": [[0, 4], [1, 5], [2, 6], [3, 7]], "dp": SINGLETONS_8,
        "dp_cp": [[0, 2], [1, 3], [4, 6], [5, 7]], "mp": [[0, 1, 4, 5], [2, 3, 6, 7]],
        "tp_cp": [[0, 1, 2, 3], [4, 5, 6, 7]], "embedding": [[0, 4], [1, 5], [2, 6], [3, 7]]}),
    # rank = tp + 2*pp + 4*dp (another order)
    (8, dict(tp=2, pp=2), "tp-pp-dp", {
        "tp": [[0, 1], [2, 3], [4, 5], [6, 7]], "pp": [[0, 2], [1, 3], [4, 6], [5, 7]],
        "dp": [[0, 4], [1, 5], [2, 6], [3, 7]], "cp": SINGLETONS_8,
        "dp_cp": [[0, 4], [1, 5], [2, 6], [3, 7]], "mp": [[0, 1, 2, 3], [4, 5, 6, 7]],
        "tp_cp": [[0, 1], [2, 3], [4, 5], [6, 7]], "embedding": [[0, 2], [1, 3], [4, 6], [5, 7]]}),
    # Megatron's documented example: 16 GPUs, tp=2, pp=4 -> dp=2; rank = tp + 2*dp + 4*pp
    (16, dict(tp=2, pp=4), "tp-cp-dp-pp", {
        "tp": [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11], [12, 13], [14, 15]],
        "dp": [[0, 2], [1, 3], [4, 6], [5, 7], [8, 10], [9, 11], [12, 14], [13, 15]],
        "pp": [[0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, 14], [3, 7, 11, 15]],
        "mp": [[0, 1, 4, 5, 8, 9, 12, 13], [2, 3, 6, 7, 10, 11, 14, 15]],
        "embedding": [[0, 12], [1, 13], [2, 14], [3, 15]]}),
    # cp outermost but tp: rank = tp + 2*dp + 4*pp + 8*cp
    (16, dict(tp=2, pp=2, cp=2), "tp-dp-pp-cp", {
        "tp": [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11], [12, 13], [14, 15]],
        "cp": [[0, 8], [1, 9], [2, 10], [3, 11], [4, 12], [5, 13], [6, 14], [7, 15]],
        "dp": [[0, 2], [1, 3], [4, 6], [5, 7], [8, 10], [9, 11], [12, 14], [13, 15]],
        "pp": [[0, 4], [1, 5], [2, 6], [3, 7], [8, 12], [9, 13], [10, 14], [11, 15]],
        "dp_cp": [[0, 2, 8, 10], [1, 3, 9, 11], [4, 6, 12, 14], [5, 7, 13, 15]],
        "tp_cp": [[0, 1, 8, 9], [2, 3, 10, 11], [4, 5, 12, 13], [6, 7, 14, 15]]}),
]


@pytest.mark.parametrize("world, sizes, order, expected", HAND_WRITTEN,
                         ids=[f"w{w}-{o}-{s}" for w, s, o, _ in HAND_WRITTEN])
def test_hand_written_lists(world, sizes, order, expected):
    groups = rank_groups(world, order=order, **sizes)
    for kind, lists in expected.items():
        assert groups[kind] == lists, kind


def brute_force(world, sizes, order):
    """Enumerate every coordinate tuple, then bucket ranks by the coordinates outside the group."""
    axes = order.split("-")
    axes += [a for a in ("tp", "cp", "dp", "pp") if a not in axes]
    groups = {}
    for kind, inside in [("tp", {"tp"}), ("pp", {"pp"}), ("dp", {"dp"}), ("cp", {"cp"}),
                         ("dp_cp", {"dp", "cp"}), ("mp", {"tp", "pp"}), ("tp_cp", {"tp", "cp"})]:
        buckets = {}
        for coords in itertools.product(*(range(sizes[a]) for a in axes)):
            rank, stride = 0, 1
            for axis, c in zip(axes, coords):
                rank, stride = rank + c * stride, stride * sizes[axis]
            key = tuple(c for axis, c in zip(axes, coords) if axis not in inside)
            buckets.setdefault(key, []).append(rank)
        groups[kind] = sorted(sorted(b) for b in buckets.values())
    groups["embedding"] = [sorted({g[0], g[-1]}) for g in groups["pp"]]
    assert sum(len(g) for g in groups["tp"]) == world
    return groups


CONFIGS = [dict(tp=t, pp=p, cp=c, dp=d) for t, p, c, d in
           itertools.product([1, 2, 4], [1, 2, 3], [1, 2], [1, 2])]


@pytest.mark.parametrize("order", ["tp-cp-dp-pp", "tp-pp-dp-cp", "pp-dp-cp-tp", "cp-tp-pp-dp"])
def test_matches_brute_force(order):
    for sizes in CONFIGS:
        world = sizes["tp"] * sizes["pp"] * sizes["cp"] * sizes["dp"]
        assert rank_groups(world, order=order, **sizes) == brute_force(world, sizes, order), sizes


def test_every_rank_in_exactly_one_group_of_each_kind():
    groups = rank_groups(48, tp=2, pp=3, cp=2)
    for kind, lists in groups.items():
        members = sorted(r for g in lists for r in g)
        expected = list(range(48)) if kind != "embedding" else members
        assert members == expected, kind
        assert len(set(members)) == len(members), kind


def test_dp_inferred_and_coordinates():
    layout = Layout.create(16, tp=2, pp=2)
    assert layout.dp == 4
    assert layout.coordinates(13) == {"tp": 1, "cp": 0, "dp": 2, "pp": 1}  # 13 = 1 + 2*2 + 8*1


@pytest.mark.parametrize("kwargs, message", [
    (dict(world_size=8, tp=3), r"world_size=8 is not divisible by tp\*pp\*cp = 3\*1\*1 = 3"),
    (dict(world_size=8, tp=0), r"tp=0 must be an integer >= 1"),
    (dict(world_size=8, pp=-2), r"pp=-2 must be an integer >= 1"),
    (dict(world_size=8, cp=1.5), r"cp=1.5 must be an integer >= 1"),
    (dict(world_size=0), r"world_size=0 must be an integer >= 1"),
    (dict(world_size=8, tp=2, dp=2), r"tp\*pp\*cp\*dp = 2\*1\*1\*2 = 4 does not equal world_size=8"),
    (dict(world_size=8, order="tp-cp-ep-dp-pp"), r"unknown parallelism\(s\) \['ep'\]"),
    (dict(world_size=8, order="tp-tp-dp-pp"), r"repeats \['tp'\]"),
    (dict(world_size=8, tp=2, pp=2, order="tp-dp"), r"leaves out \['pp'\], whose size is > 1"),
])
def test_bad_sizes_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        rank_groups(**kwargs)


def test_size_one_axes_may_be_left_out_of_order():
    assert rank_groups(4, tp=2, order="tp-dp") == rank_groups(4, tp=2)
