"""rank_groups against lists written out by hand, a brute-force construction and (expert
groups) an independent re-implementation of Megatron-core 0.16's RankGenerator."""

import itertools

import pytest

from parallelkit.distributed.rank_groups import (AXES, EXPERT_GROUP_KINDS, GROUP_KINDS, Layout,
                                                 rank_groups)

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
        groups = rank_groups(world, order=order, **sizes)
        assert {k: groups[k] for k in GROUP_KINDS} == brute_force(world, sizes, order), sizes


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
    # 13 = 1 + 2*2 + 8*1
    assert layout.coordinates(13) == {"tp": 1, "cp": 0, "ep": 0, "dp": 2, "pp": 1}


@pytest.mark.parametrize("kwargs, message", [
    (dict(world_size=8, tp=3), r"world_size=8 is not divisible by tp\*pp\*cp = 3\*1\*1 = 3"),
    (dict(world_size=8, tp=0), r"tp=0 must be an integer >= 1"),
    (dict(world_size=8, pp=-2), r"pp=-2 must be an integer >= 1"),
    (dict(world_size=8, cp=1.5), r"cp=1.5 must be an integer >= 1"),
    (dict(world_size=0), r"world_size=0 must be an integer >= 1"),
    (dict(world_size=8, tp=2, dp=2), r"tp\*pp\*cp\*dp = 2\*1\*1\*2 = 4 does not equal world_size=8"),
    (dict(world_size=8, order="tp-cp-xp-dp-pp"), r"unknown parallelism\(s\) \['xp'\]"),
    (dict(world_size=8, order="tp-tp-dp-pp"), r"repeats \['tp'\]"),
    (dict(world_size=8, tp=2, pp=2, order="tp-dp"), r"leaves out \['pp'\], whose size is > 1"),
])
def test_bad_sizes_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        rank_groups(**kwargs)


def test_size_one_axes_may_be_left_out_of_order():
    assert rank_groups(4, tp=2, order="tp-dp") == rank_groups(4, tp=2)
    # today's order without "ep" and Megatron's default give the same dense and expert groups
    for sizes in CONFIGS:
        world = sizes["tp"] * sizes["pp"] * sizes["cp"] * sizes["dp"]
        assert rank_groups(world, order="tp-cp-dp-pp", **sizes) == rank_groups(world, **sizes)


# Expert groups. (world, sizes, order) -> lists worked out on paper; expert layout rank =
# etp_rank + etp * ep_rank + etp * ep * edp_rank + ... (cp = 1 there).
EXPERT_HAND_WRITTEN = [
    # rank = etp + 2*ep + 4*edp
    (8, dict(tp=2, ep=2), "tp-cp-ep-dp-pp", {
        "ep": [[0, 2], [1, 3], [4, 6], [5, 7]], "expert_tp": [[0, 1], [2, 3], [4, 5], [6, 7]],
        "expert_tp_ep": [[0, 1, 2, 3], [4, 5, 6, 7]],
        "expert_tp_ep_pp": [[0, 1, 2, 3], [4, 5, 6, 7]], "expert_dp": [[0, 4], [1, 5], [2, 6], [3, 7]]}),
    # etp=1: rank = ep + 2*edp + 8*pp, while dense rank = tp + 2*dp + 8*pp
    (16, dict(tp=2, pp=2, ep=2, etp=1), "tp-cp-ep-dp-pp", {
        "ep": [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11], [12, 13], [14, 15]],
        "expert_tp": [[r] for r in range(16)],
        "expert_tp_ep": [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11], [12, 13], [14, 15]],
        "expert_tp_ep_pp": [[0, 1, 8, 9], [2, 3, 10, 11], [4, 5, 12, 13], [6, 7, 14, 15]],
        "expert_dp": [[0, 2, 4, 6], [1, 3, 5, 7], [8, 10, 12, 14], [9, 11, 13, 15]],
        "pp": [[0, 8], [1, 9], [2, 10], [3, 11], [4, 12], [5, 13], [6, 14], [7, 15]]}),
    # cp in the dense layout only: dense rank = tp + 2*cp + 4*pp, expert rank = etp + 2*ep + 4*pp
    (8, dict(tp=2, cp=2, pp=2, ep=2), "tp-cp-ep-dp-pp", {
        "cp": [[0, 2], [1, 3], [4, 6], [5, 7]], "ep": [[0, 2], [1, 3], [4, 6], [5, 7]],
        "expert_dp": [[r] for r in range(8)], "expert_tp_ep_pp": [list(range(8))]}),
    # ep before tp: rank = ep + 2*etp + 4*edp
    (8, dict(tp=2, ep=2), "ep-tp-dp-pp", {
        "ep": [[0, 1], [2, 3], [4, 5], [6, 7]], "expert_tp": [[0, 2], [1, 3], [4, 6], [5, 7]],
        "tp": [[0, 1], [2, 3], [4, 5], [6, 7]], "expert_dp": [[0, 4], [1, 5], [2, 6], [3, 7]]}),
]


@pytest.mark.parametrize("world, sizes, order, expected", EXPERT_HAND_WRITTEN,
                         ids=[f"w{w}-{o}-{s}" for w, s, o, _ in EXPERT_HAND_WRITTEN])
def test_expert_hand_written_lists(world, sizes, order, expected):
    groups = rank_groups(world, order=order, **sizes)
    for kind, lists in expected.items():
        assert groups[kind] == lists, kind


class Refused(Exception):
    """Where Megatron-core raises or asserts."""


def megatron_ranks(sizes: dict, order: str, token: str) -> list[list[int]]:
    """Megatron-core's RankGenerator.get_ranks, written again from its documented algorithm:
    complete the order with the size-1 names, mask the axes of ``token``, then for each group
    index decompose it over the unmasked sizes and each in-group index over the masked sizes."""
    names = order.split("-")
    for name in ("tp", "pp", "dp", "ep", "cp"):
        if name not in names:
            if sizes[name] != 1:
                raise Refused(f"{name} missing from {order}")
            names.append(name)
    shape = [sizes[n] for n in names]
    stride = [1]
    for s in shape:
        stride.append(stride[-1] * s)
    mask = [n in token.split("-") for n in names]
    inner = [(s, d) for s, d, m in zip(shape, stride, mask) if m]
    outer = [(s, d) for s, d, m in zip(shape, stride, mask) if not m]

    def unflatten(index, dims):  # index -> sum of digit * global stride
        total, radix = 0, 1
        for s, d in dims:
            total += (index // radix) % s * d
            radix *= s
        return total

    group_size = 1
    for s, _ in inner:
        group_size *= s
    world = stride[-1]
    return [[unflatten(i, inner) + unflatten(g, outer) for i in range(group_size)]
            for g in range(world // group_size)]


def megatron_groups(world, tp=1, pp=1, cp=1, ep=1, etp=None, order="tp-cp-ep-dp-pp"):
    """initialize_model_parallel's two generators and its asserts; Refused where it raises."""
    if world % (tp * pp * cp):
        raise Refused("dense sizes")
    dp = world // (tp * pp * cp)
    dense = dict(tp=tp, ep=1, dp=dp, pp=pp, cp=cp)
    etp = tp if etp is None else etp
    if world % (etp * ep * pp):
        raise Refused("expert sizes")
    edp = world // (etp * ep * pp)
    expert = dict(tp=etp, ep=ep, dp=edp, pp=pp, cp=1)
    groups = {kind: megatron_ranks(dense, order, token) for kind, token in [
        ("tp", "tp"), ("pp", "pp"), ("dp", "dp"), ("cp", "cp"), ("dp_cp", "dp-cp"),
        ("mp", "tp-pp"), ("tp_cp", "tp-cp")]}
    groups["embedding"] = [sorted({g[0], g[-1]}) for g in groups["pp"]]
    expert_groups = {kind: megatron_ranks(expert, order, token) for kind, token in [
        ("ep", "ep"), ("expert_tp", "tp"), ("expert_tp_ep", "tp-ep"),
        ("expert_tp_ep_pp", "tp-ep-pp"), ("expert_dp", "dp")]}
    if not (order.endswith("pp") or pp == 1 or edp == dp):
        return groups, "dp sizes differ"
    if megatron_ranks(dense, order, "pp") != megatron_ranks(expert, order, "pp"):
        return groups, "pp groups differ"
    return {**groups, **expert_groups}, None


EXPERT_CONFIGS = [dict(tp=t, pp=p, cp=c, dp=d, ep=e, etp=x) for t, p, c, d, e, x in
                  itertools.product([1, 2], [1, 2, 3], [1, 2], [1, 2], [1, 2, 4], [None, 1, 2])]
# Every order of the five names (pp last or not), and orders that leave size-1 names out.
EXPERT_ORDERS = ["-".join(p) for p in itertools.permutations(AXES)] + [
    "tp-cp-dp-pp", "tp-ep-dp-pp", "ep-tp-pp-dp", "tp-pp-dp", "dp-tp-ep"]


@pytest.mark.parametrize("order", EXPERT_ORDERS)
def test_expert_groups_match_megatron(order):
    checked = refused = 0
    for sizes in EXPERT_CONFIGS:
        sizes = dict(sizes)
        world = sizes["tp"] * sizes["pp"] * sizes["cp"] * sizes.pop("dp")
        asked = sizes["ep"] != 1 or sizes["etp"] is not None
        try:
            expected, conflict = megatron_groups(world, order=order, **sizes)
        except Refused:
            with pytest.raises(ValueError):
                rank_groups(world, order=order, **sizes)
            continue
        if conflict and asked:
            with pytest.raises(ValueError, match="pp last"):
                rank_groups(world, order=order, **sizes)
            refused += 1
            continue
        # not asked for experts: the dense layout stays usable, without expert groups
        assert rank_groups(world, order=order, **sizes) == expected, sizes
        checked += 1
    assert checked > 0


def test_expert_groups_partition_the_world():
    groups = rank_groups(48, tp=2, pp=3, ep=4, etp=1)
    for kind in EXPERT_GROUP_KINDS:
        members = sorted(r for g in groups[kind] for r in g)
        assert members == list(range(48)), kind
    assert {len(g) for g in groups["expert_dp"]} == {48 // (1 * 4 * 3)}
    assert {len(g) for g in groups["expert_tp_ep_pp"]} == {1 * 4 * 3}


def test_without_experts_asked_a_layout_megatron_refuses_keeps_its_dense_groups():
    groups = rank_groups(16, tp=2, pp=2, cp=2, order="tp-dp-pp-cp")  # cp > 1, pp not last
    assert set(groups) == set(GROUP_KINDS)
    with pytest.raises(ValueError, match=r"does not put pp last"):
        rank_groups(16, tp=2, pp=2, cp=2, order="tp-dp-pp-cp", etp=2)


@pytest.mark.parametrize("kwargs, message", [
    (dict(world_size=8, ep=0), r"ep=0 must be an integer >= 1"),
    (dict(world_size=8, ep=True), r"ep=True must be an integer >= 1"),
    (dict(world_size=8, tp=2, etp=1.5), r"etp=1.5 must be an integer >= 1"),
    (dict(world_size=8, ep=3), r"world_size=8 is not divisible by etp\*ep\*pp = 1\*3\*1 = 3"),
    (dict(world_size=8, tp=2, pp=2, etp=3), r"not divisible by etp\*ep\*pp = 3\*1\*2 = 6; choose"),
    (dict(world_size=8, ep=2, order="tp-cp-dp-pp"), r"leaves out \['ep'\], whose size is > 1"),
    # pp not last, expert dp 2 != dense dp 4
    (dict(world_size=16, tp=2, pp=2, ep=2, order="tp-pp-ep-dp"),
     r"expert data parallel size world_size/\(etp\*ep\*pp\) = 2 must equal the dense dp = "
     r"world_size/\(tp\*cp\*pp\) = 4; put pp last, e.g. 'tp-cp-ep-dp-pp', or choose etp\*ep"),
    # equal dp sizes (2), but pp's stride is tp*cp = 4 in the dense layout, etp = 2 in the expert
    (dict(world_size=16, tp=2, pp=2, cp=2, ep=2, order="tp-cp-pp-ep-dp"),
     r"other pipeline groups than the dense one \(expert \[0, 2\], dense \[0, 4\]\); "
     r"Megatron-core requires them equal"),
])
def test_bad_expert_sizes_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        rank_groups(**kwargs)


def test_one_layout_holds_cp_or_ep_not_both():
    with pytest.raises(ValueError, match=r"cp=2 and ep=2 in one layout: .* pass both to mpu"):
        Layout.create(8, cp=2, ep=2)
