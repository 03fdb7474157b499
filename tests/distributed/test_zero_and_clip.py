"""ZeRO-1 against plain data parallelism, bf16 with fp32 masters, and global-norm clipping on a
TP x PP x DP layout against the dense model's ``torch.nn.utils.clip_grad_norm_``."""

import copy
import math

import pytest
import torch
import torch.distributed as dist
from torch import nn

from parallelkit import mpu
from parallelkit.parallelize import parallelize
from parallelkit.data_parallel import (DistributedDataParallel, DistributedOptimizer,
                                       clip_grad_norm_)
from parallelkit.distributed import comm
from parallelkit.testing import run_on_ranks
from parallelkit.models.tinylm import TinyConfig, TinyLM
from test_data_parallel import (ADAMW, EXACT, SMALL_BUCKETS,  # the sibling test module
                                Partly, TwoLayers, assert_same_parameters, global_batch,
                                local_slice, lm_loss)


def adam_state_bytes(optimizer):
    return sum(v.numel() * v.element_size() for state in optimizer.state.values()
               for v in state.values() if torch.is_tensor(v))


def no_decay_for_vectors(model):
    """Param groups as in GPT training: weight decay on matrices, none on norms and biases."""
    params = list(model.parameters())
    return [{"params": [p for p in params if p.dim() > 1]},
            {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0}]


def _zero_matches_plain_dp(steps=3):
    state = mpu.initialize()
    torch.manual_seed(0)
    reference = TinyLM(TinyConfig()).double()
    plain = DistributedDataParallel(copy.deepcopy(reference), bucket_bytes=SMALL_BUCKETS)
    zero = DistributedDataParallel(copy.deepcopy(reference), bucket_bytes=SMALL_BUCKETS,
                                   use_distributed_optimizer=True)
    plain_optimizer = torch.optim.AdamW(no_decay_for_vectors(plain), **ADAMW)
    zero_optimizer = DistributedOptimizer(zero, torch.optim.AdamW, no_decay_for_vectors(zero),
                                          **ADAMW)
    for step in range(steps):
        ids, targets = global_batch(step, b=2 * state.dp.size)
        local = local_slice(ids, state), local_slice(targets, state)
        for model in (plain, zero):
            with comm.count_traffic() as traffic:
                lm_loss(model, *local).backward()
            if model is zero:  # reduce-scatter, started from backward, instead of all-reduce
                assert traffic.calls == {"reduce_scatter": len(zero.buckets)}
            model.finish_grad_sync()
        norm = clip_grad_norm_(plain.parameters(), max_norm=0.5)
        torch.testing.assert_close(zero_optimizer.clip_grad_norm(0.5), norm, **EXACT)
        plain_optimizer.step()
        with comm.count_traffic() as traffic:
            zero_optimizer.step()
        assert traffic.calls == {"all_gather": len(zero.buckets)}
        plain.zero_grad_buffer()
        zero_optimizer.zero_grad()
    assert_same_parameters(zero.module, plain.module, "ZeRO vs plain DP:")
    # Each parameter's .data is a view into its bucket's buffer, which the all-gather filled.
    bucket = zero.buckets[0]
    assert bucket.params[0].data_ptr() == bucket.param_data.data_ptr()
    return zero_optimizer.state_bytes(), adam_state_bytes(plain_optimizer)


@pytest.mark.parametrize("dp", [2, 4])
def test_zero1_matches_plain_dp_with_1_over_dp_optimizer_state(dp):
    results = run_on_ranks(_zero_matches_plain_dp, dp, timeout=120)
    full = results[0][1]
    for sharded, _ in results:
        # Adam's two moments for 1/dp of the elements (+ bucket padding and per-piece step counts)
        assert abs(sharded * dp / full - 1) < 0.05, (sharded, full)
    assert abs(sum(sharded for sharded, _ in results) / full - 1) < 0.05


def _bf16_with_fp32_masters(steps=2):
    state = mpu.initialize()
    torch.manual_seed(0)
    # bf16 buckets (fp32 is the default, tested in test_mixed_precision.py): the masters'
    # gradients are then cast copies of the reduce-scatter output, not views of it.
    model = DistributedDataParallel(TinyLM(TinyConfig()).to(torch.bfloat16),
                                    bucket_bytes=SMALL_BUCKETS, use_distributed_optimizer=True,
                                    grad_dtype=torch.bfloat16)
    optimizer = DistributedOptimizer(model, torch.optim.AdamW, lr=1e-2)
    before = [p.detach().clone() for p in model.parameters()]
    for step in range(steps):
        ids, targets = global_batch(step, b=2 * state.dp.size)
        model.module.loss(local_slice(ids, state), local_slice(targets, state)).backward()
        model.finish_grad_sync()
        # The masters' fp32 gradients are copied from the bf16 shard once per round: a second
        # clip sees the first one's result, and step() must not copy the unclipped ones again.
        assert optimizer.clip_grad_norm(0.01) > 0.02
        torch.testing.assert_close(optimizer.clip_grad_norm(0.01).item(), 0.01, rtol=1e-4, atol=0)
        optimizer.step()
        optimizer.zero_grad()
    for shard in optimizer.shards:  # the bf16 weights are the fp32 masters' rounding
        assert shard.master.dtype == torch.float32
        mine = shard.bucket.param_data[shard.start:shard.start + shard.bucket.shard_numel]
        assert torch.equal(mine, shard.master.to(torch.bfloat16))
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
    return torch.cat([p.detach().view(-1).float() for p in model.parameters()])


def test_bf16_model_with_fp32_master_weights():
    flat = run_on_ranks(_bf16_with_fp32_masters, 2, timeout=60)
    assert torch.equal(flat[0], flat[1])  # the all-gather left every rank the same model


def _zero_skips_parameters_without_gradient():
    mpu.initialize()
    rank = dist.get_rank()
    torch.manual_seed(0)
    reference = Partly()
    never = reference.never.weight.detach().clone()
    model = DistributedDataParallel(copy.deepcopy(reference), bucket_bytes=256,
                                    use_distributed_optimizer=True)
    optimizer = DistributedOptimizer(model, torch.optim.AdamW, **ADAMW)
    ref_optimizer = torch.optim.AdamW(reference.parameters(), **ADAMW)
    for step in range(len(Partly.BRANCH)):  # the branch: used by one rank, both, none, the other
        model.module.loss(step, rank).backward()
        model.finish_grad_sync()
        # One process on the averaged loss: what no rank used has no gradient, so AdamW skips it.
        (sum(reference.loss(step, r) for r in range(2)) / 2).backward()
        expected = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.05)
        torch.testing.assert_close(optimizer.clip_grad_norm(0.05), expected, **EXACT)
        optimizer.step()
        ref_optimizer.step()
        optimizer.zero_grad()
        ref_optimizer.zero_grad()
        assert_same_parameters(model.module, reference, f"step {step}:")
    assert torch.equal(model.module.never.weight, never)  # no weight decay without a gradient


def test_zero1_leaves_parameters_without_gradient_alone_like_torch_adamw():
    run_on_ranks(_zero_skips_parameters_without_gradient, 2, timeout=60)


def _optimizer_options_disagree():
    mpu.initialize()
    model = DistributedDataParallel(TwoLayers(), use_distributed_optimizer=True)
    with pytest.raises(ValueError) as error:
        DistributedOptimizer(model, lr=1e-3 * (1 + dist.get_rank()), weight_decay=0.1)
    return str(error.value)


def test_zero1_options_that_differ_between_ranks_raise_on_every_rank():
    messages = run_on_ranks(_optimizer_options_disagree, 2, timeout=60)
    assert messages[0] == messages[1]
    assert messages[0].startswith("DistributedOptimizer: data-parallel ranks disagree on the "
                                  "optimizer: rank 0 has torch.optim.adamw.AdamW")
    assert "lr=0.001" in messages[0] and "lr=0.002" in messages[0]
    assert messages[0].endswith("every DP rank must build the optimizer with the same class, "
                                "param groups and options")


def _stage_modules(model, pp_rank):
    """A stand-in for pipeline stages: stage 0 owns the embedding and the first half of the
    blocks, stage 1 the rest, the final norm and the head."""
    half = len(model.blocks) // 2
    if pp_rank == 0:
        return nn.ModuleDict({"embed": model.embed, "blocks": model.blocks[:half]})
    return nn.ModuleDict({"blocks": model.blocks[half:], "ln_f": model.ln_f,
                          "lm_head": model.lm_head})


def _clip_tp2_pp2_dp2(max_norm, norm_type):
    state = mpu.initialize(tp=2, pp=2)
    torch.manual_seed(0)
    dense = TinyLM(TinyConfig(layers=2)).double()
    ids, targets = global_batch(0, b=2 * state.dp.size)
    norms = {}
    for zero in (False, True):
        # Sequence parallelism: the norms' partial gradients are summed over TP by the hooks
        # parallelize registers; the wrapper must not sum them a second time.
        model = parallelize(copy.deepcopy(dense), tp_group=state.tp.group, overlap_comm=False,
                            loss_parallel=False)
        stage = _stage_modules(model, state.pp.rank)
        ddp = DistributedDataParallel(stage, bucket_bytes=SMALL_BUCKETS,
                                      use_distributed_optimizer=zero)
        # Every rank runs the whole model (cheap); only its stage's gradients are synced/clipped.
        lm_loss(model, local_slice(ids, state), local_slice(targets, state)).backward()
        ddp.finish_grad_sync()
        if zero:
            norms[zero] = DistributedOptimizer(ddp, **ADAMW).clip_grad_norm(max_norm, norm_type)
        else:
            norms[zero] = clip_grad_norm_(stage.parameters(), max_norm, norm_type)
            clipped = {id(p): p.grad for p in stage.parameters()}
            shards = {name: p for name, p in model.named_parameters() if id(p) in clipped}

    lm_loss(dense, ids, targets).backward()
    expected = torch.nn.utils.clip_grad_norm_(dense.parameters(), max_norm, norm_type)
    for zero, norm in norms.items():
        torch.testing.assert_close(norm, expected, **EXACT, msg=lambda m: f"zero={zero}: {m}")
    dense_params = dict(dense.named_parameters())
    for name, param in shards.items():  # the clipped gradients are shards of the dense ones
        want = dense_params[name].grad
        if getattr(param, "tp_shard_dim", None) is not None:
            want = want.chunk(state.tp.size, param.tp_shard_dim)[state.tp.rank]
        torch.testing.assert_close(param.grad, want, **EXACT, msg=lambda m: f"{name}: {m}")
    return expected.item()


@pytest.mark.parametrize("max_norm, norm_type", [(0.1, 2.0), (1e3, 2.0), (0.01, math.inf)],
                         ids=["clips", "under-limit", "inf-norm"])
def test_global_norm_over_tp2_pp2_dp2_equals_single_process(max_norm, norm_type):
    norms = run_on_ranks(_clip_tp2_pp2_dp2, 8, max_norm, norm_type, timeout=120)
    assert len(set(norms)) == 1


def _bad_norm_type():
    mpu.initialize()
    with pytest.raises(ValueError, match="norm_type"):
        clip_grad_norm_([], 1.0, norm_type=0.0)
    return dist.get_rank()


def test_bad_norm_type():
    run_on_ranks(_bad_norm_type, 2, timeout=30)
