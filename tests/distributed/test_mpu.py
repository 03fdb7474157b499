"""The MPU on 8 gloo ranks: dense and expert groups, membership proven by collectives, getters,
mesh, re-init."""

import pytest
import torch
import torch.distributed as dist

from parallelkit import mpu
from parallelkit.distributed import comm
from parallelkit.distributed.rank_groups import EXPERT_GROUP_KINDS, GROUP_KINDS, rank_groups
from parallelkit.testing import run_on_ranks

ALL_KINDS = GROUP_KINDS + EXPERT_GROUP_KINDS
LAYOUTS = [  # (tp, pp, cp, order, ep, etp) on 8 ranks
    (2, 2, 2, "tp-cp-dp-pp", 1, None),
    (2, 1, 2, "tp-cp-dp-pp", 1, None),
    (2, 2, 1, "tp-pp-dp-cp", 1, None),
    (1, 4, 1, "pp-dp-tp-cp", 1, None),
    (2, 1, 1, "tp-cp-ep-dp-pp", 2, None),   # expert dp 2
    (2, 2, 2, "tp-cp-ep-dp-pp", 2, None),   # cp in the dense layout, ep in the expert one
    (2, 1, 1, "tp-ep-cp-dp-pp", 4, 1),      # etp != tp: expert_tp is new, ep spans 4
    (2, 2, 1, "ep-tp-pp-dp", 2, 1),         # pp not last: expert dp = dense dp = 2
]


def _check_groups(tp, pp, cp, order, ep, etp):
    state = mpu.initialize(tp=tp, pp=pp, cp=cp, order=order, ep=ep, etp=etp)
    rank = dist.get_rank()
    expected = rank_groups(8, tp=tp, pp=pp, cp=cp, order=order, ep=ep, etp=etp)
    assert set(expected) == set(ALL_KINDS)
    described = {line.split()[0]: line for line in mpu.describe().splitlines()
                 if line.strip() and line.split()[0] in ALL_KINDS}
    mine = {}
    for kind in ALL_KINDS:
        owners = [g for g in expected[kind] if rank in g]
        if kind == "embedding" and not owners:  # a middle pipeline stage
            assert not mpu.is_in_embedding_group()
            with pytest.raises(ValueError, match=r"holds no embedding"):
                mpu.get_embedding_group()
            mine[kind] = []
            continue
        info = state.info(kind)
        [own] = owners
        assert list(info.ranks) == own, kind
        assert str(own).replace(" ", "") in described[kind].split(), kind
        assert dist.get_process_group_ranks(info.group) == own, kind
        assert (info.rank, info.size) == (dist.get_rank(info.group), dist.get_world_size(info.group))
        # A collective on the group reaches exactly its members, and each of them once.
        assert comm.group_members(info.group) == own, kind
        total = torch.tensor([float(rank)], dtype=torch.float64)
        dist.all_reduce(total, group=info.group)
        assert total.item() == sum(own), kind
        mine[kind] = own
    pp_ranks = mine["pp"]
    i = pp_ranks.index(rank)
    assert mpu.get_pipeline_next_rank() == pp_ranks[(i + 1) % pp]
    assert mpu.get_pipeline_prev_rank() == pp_ranks[(i - 1) % pp]
    assert mpu.is_pipeline_first_stage() == (i == 0)
    assert mpu.is_pipeline_last_stage() == (i == pp - 1)
    assert (mpu.get_tp_rank(), mpu.get_tp_world_size()) == (mine["tp"].index(rank), tp)
    assert (mpu.get_cp_rank(), mpu.get_cp_world_size()) == (mine["cp"].index(rank), cp)
    assert (mpu.get_dp_rank(), mpu.get_dp_world_size()) == (mine["dp"].index(rank), 8 // (tp * pp * cp))
    assert mpu.get_dp_group(with_context_parallel=True) is state.dp_cp.group
    etp = tp if etp is None else etp
    for kind, size in [("ep", ep), ("expert_tp", etp), ("expert_dp", 8 // (etp * ep * pp))]:
        getters = (getattr(mpu, f"get_{kind}_group"), getattr(mpu, f"get_{kind}_rank"),
                   getattr(mpu, f"get_{kind}_world_size"))
        assert [g() for g in getters] == [state.info(kind).group, mine[kind].index(rank), size]
    assert mpu.get_expert_tp_ep_group() is state.expert_tp_ep.group
    assert mpu.get_expert_tp_ep_pp_group() is state.expert_tp_ep_pp.group
    assert len(mine["expert_tp_ep_pp"]) == etp * ep * pp and mine["pp"] == list(state.pp.ranks)
    # An expert group with a dense group's ranks shares its communicator (no extra new_group).
    for kind in EXPERT_GROUP_KINDS:
        for dense in GROUP_KINDS[:-1]:
            if mine[kind] == mine[dense]:
                assert state.info(kind).group is state.info(dense).group, (kind, dense)
    return mine


@pytest.mark.parametrize("tp, pp, cp, order, ep, etp", LAYOUTS)
def test_groups_on_8_ranks(tp, pp, cp, order, ep, etp):
    per_rank = run_on_ranks(_check_groups, 8, tp, pp, cp, order, ep, etp, timeout=120)
    for kind in ALL_KINDS:
        distinct = sorted({tuple(groups[kind]) for groups in per_rank} - {()})
        members = sorted(r for g in distinct for r in g)
        if kind != "embedding":
            assert members == list(range(8)), kind
        else:  # first and last stage of each pipeline only
            pipelines = {tuple(groups["pp"]) for groups in per_rank}
            assert members == sorted(r for p in pipelines for r in {p[0], p[-1]})
        assert len(members) == len(set(members)), kind


def _reinitialize_with_other_sizes():
    mpu.initialize(tp=2, pp=2, cp=2)
    with pytest.raises(ValueError, match=r"already initialized \(tp 2 x cp 2 x dp 1 x pp 2\)"):
        mpu.initialize(tp=2)
    mpu.destroy()
    assert not mpu.is_initialized()
    with pytest.raises(ValueError, match="not initialized"):
        mpu.get_tp_group()
    state = mpu.initialize(tp=4, virtual_pp=None)
    assert state.layout.dp == 2
    assert comm.group_members(state.tp.group) == ([0, 1, 2, 3] if dist.get_rank() < 4 else [4, 5, 6, 7])
    mpu.destroy(free_communicators=True)  # and again after really freeing the communicators
    state = mpu.initialize(pp=2, virtual_pp=3)
    assert mpu.get_virtual_pp_world_size() == 3
    assert mpu.is_pipeline_first_stage(vp_stage=1) is False
    assert mpu.is_pipeline_last_stage(vp_stage=2) == (state.pp.rank == 1)
    assert mpu.is_pipeline_last_stage(vp_stage=1) is False
    mpu.destroy()
    # An order Megatron-core refuses for experts (cp > 1, pp > 1, pp not last) still works for
    # dense models, without expert groups.
    state = mpu.initialize(tp=2, pp=2, cp=2, order="tp-dp-pp-cp")
    assert state.expert_layout is None and state.ep is None
    with pytest.raises(ValueError, match=r"no ep group: order 'tp-dp-pp-cp' does not put pp last"):
        mpu.get_ep_group()
    assert "experts: none" in mpu.describe()


def test_destroy_then_initialize_other_sizes():
    run_on_ranks(_reinitialize_with_other_sizes, 8)


def _bad_sizes_on_a_world():
    for kwargs, message in [
        (dict(tp=3), r"world_size=8 is not divisible by tp\*pp\*cp = 3\*1\*1 = 3"),
        (dict(tp=2, pp=2, cp=4), r"not divisible by tp\*pp\*cp = 2\*2\*4 = 16"),
        (dict(pp=1, virtual_pp=2), r"virtual_pp=2 .* > 1 only with pp > 1 \(got pp=1\)"),
        (dict(pp=2, virtual_pp=0), r"virtual_pp=0 must be None or an integer >= 1"),
        (dict(order="tp-xp-dp-pp"), r"unknown parallelism\(s\) \['xp'\]"),
        (dict(ep=0), r"ep=0 must be an integer >= 1"),
        (dict(tp=2, etp=0), r"etp=0 must be an integer >= 1"),
        (dict(ep=3), r"world_size=8 is not divisible by etp\*ep\*pp = 1\*3\*1 = 3"),
        (dict(ep=2, order="tp-cp-dp-pp"), r"leaves out \['ep'\], whose size is > 1"),
        (dict(tp=2, pp=2, ep=2, order="tp-pp-ep-dp"), r"expert data parallel size .* = 1 must "
                                                       r"equal the dense dp .* = 2; put pp last"),
        (dict(tp=2, pp=2, cp=2, order="tp-dp-pp-cp", etp=2), r"does not put pp last"),
        (dict(cp=2, pp=2, ep=2, order="cp-pp-ep-dp"), r"other pipeline groups"),
    ]:
        with pytest.raises(ValueError, match=message):
            mpu.initialize(**kwargs)
        assert not mpu.is_initialized()


def test_bad_sizes_raise_before_creating_groups():
    run_on_ranks(_bad_sizes_on_a_world, 8)


def _sizes_differ_across_ranks():
    rank = dist.get_rank()
    try:
        mpu.initialize(tp=2 if rank == 0 else 4)
    except ValueError as exc:
        error = str(exc)
    else:
        error = None
    assert not mpu.is_initialized()
    # only rank 3's own arguments are bad: every rank raises, naming it
    try:
        mpu.initialize(tp=3 if rank == 3 else 2)
    except ValueError as exc:
        local = str(exc)
    else:
        local = None
    state = mpu.initialize(tp=2, dp=None if rank else 4)  # dp=None resolves to the same 4
    return error, local, state.dp.size


def test_different_sizes_on_different_ranks_raise_on_every_rank_instead_of_hanging():
    results = run_on_ranks(_sizes_differ_across_ranks, 8, timeout=30)
    others = ", ".join(f"rank {r} has 4" for r in range(1, 8))
    dps = ", ".join(f"rank {r} has 2" for r in range(1, 8))
    for error, local, dp in results:
        assert error == ("parallelkit.mpu.initialize: ranks disagree on the tp size: rank 0 has 2, "
                         f"{others}; and on the dp size: rank 0 has 4, {dps}; every rank must "
                         "call mpu.initialize with the same sizes, order, virtual_pp, backend and "
                         "timeout")
        assert "world_size=8 is not divisible by tp*pp*cp = 3*1*1 = 3" in local
        assert dp == 4
    assert results[3][1].startswith("world_size=8")  # rank 3 raises its own error
    assert results[0][1].startswith("parallelkit.mpu.initialize: rank 3 rejected its input")


def _check_device_mesh(tp, pp, cp, order, ep, etp):
    state = mpu.initialize(tp=tp, pp=pp, cp=cp, order=order, ep=ep, etp=etp)
    mesh = mpu.device_mesh()
    assert mesh.mesh_dim_names == ("pp", "dp", "cp", "tp")
    assert mesh.device_type == "cpu"
    experts = mpu.device_mesh(expert=True)
    assert experts.mesh_dim_names == ("pp", "expert_dp", "ep", "expert_tp")
    for m in (mesh, experts):
        for dim in m.mesh_dim_names:
            info = state.info(dim)
            assert dist.get_process_group_ranks(m.get_group(dim)) == list(info.ranks), dim
            assert m.get_local_rank(dim) == info.rank, dim
    # DTensor on the tp dimension shards and gathers over the MPU's tp group.
    from torch.distributed.tensor import Shard, distribute_tensor

    full = torch.arange(4 * tp, dtype=torch.float64).reshape(4 * tp, 1)
    sharded = distribute_tensor(full, mesh["tp"], [Shard(0)])
    assert torch.equal(sharded.to_local(), full.chunk(tp)[state.tp.rank])
    assert torch.equal(sharded.full_tensor(), full)


@pytest.mark.parametrize("tp, pp, cp, order, ep, etp", LAYOUTS[:3] + LAYOUTS[-2:])
def test_device_mesh_uses_the_mpu_groups(tp, pp, cp, order, ep, etp):
    run_on_ranks(_check_device_mesh, 8, tp, pp, cp, order, ep, etp, timeout=120)


def test_getters_before_initialize_raise():
    with pytest.raises(ValueError, match=r"not initialized: call parallelkit.mpu.initialize"):
        mpu.get_tp_rank()
    with pytest.raises(ValueError, match="not initialized"):
        mpu.describe()


def test_initialize_needs_torch_distributed():
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match=r"init_process_group\(\) first"):
        mpu.initialize(tp=1)
