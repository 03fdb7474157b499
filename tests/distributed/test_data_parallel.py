"""DistributedDataParallel against one process on the whole batch, and against torch's DDP.

Every rank also trains the single-process reference on the concatenated global batch (cheap at
this size), so each rank checks its own parameters. Data: a global batch ``[s, dp * b]``; DP rank
d takes columns ``[d*b, (d+1)*b)`` and, with CP, CP rank c takes rows ``[c*s/cp, (c+1)*s/cp)`` of
them. The loss is a per-token mean, so the average of the ranks' losses is the global loss; with
CP the model has no attention (``layers=0``: embed → norm → head is per token), so a token slice
needs no ring attention for the math to hold.
"""

import contextlib
import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as TorchDDP

from parallelkit import mpu
from parallelkit.data_parallel import (Bucket, DistributedDataParallel, DistributedOptimizer,
                                       plan_buckets)
from parallelkit.distributed import comm
from parallelkit.testing import run_on_ranks
from parallelkit.testing.tiny_models import TinyConfig, TinyLM

EXACT = dict(rtol=1e-12, atol=1e-12)
SMALL_BUCKETS = 4096  # bytes: TinyLM in float64 then spans several buckets
# The key biases' gradient is zero in exact arithmetic (softmax ignores a per-query shift), so in
# floats it is rounding noise, different for every summation order; Adam divides it by
# sqrt(v) + eps, which turns ~1e-17 into an lr-sized step with eps=1e-8. eps=1e-6 keeps the noise
# well below 1e-12 while every real gradient still gets Adam's normalisation.
ADAMW = dict(lr=1e-2, weight_decay=0.1, eps=1e-6)


def global_batch(seed, s=8, b=4, vocab=64):
    g = torch.Generator().manual_seed(seed)
    ids, targets = (torch.randint(0, vocab, (s, b), generator=g) for _ in range(2))
    return ids, targets


def local_slice(tensor, state):
    """This rank's samples (DP) and tokens (CP) of a global ``[s, B]`` tensor."""
    rows = tensor.chunk(state.cp.size, dim=0)[state.cp.rank]
    return rows.chunk(state.dp.size, dim=1)[state.dp.rank]


def token_mean_loss(logits, targets):
    """Cross-entropy averaged over tokens, in the logits' dtype (TinyLM.loss computes in fp32)."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def lm_loss(model, ids, targets):
    return token_mean_loss(model(ids), targets)


def assert_same_parameters(model, reference, what):
    for (name, param), ref in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(param.detach(), ref.detach(), **EXACT,
                                   msg=lambda m: f"{what} {name}: {m}")


def _train_matches_single_process_and_torch_ddp(cp, overlap, steps=3):
    state = mpu.initialize(cp=cp)
    torch.manual_seed(0)
    reference = TinyLM(TinyConfig(layers=0 if cp > 1 else 2)).double()
    model = DistributedDataParallel(copy.deepcopy(reference), bucket_bytes=SMALL_BUCKETS,
                                    overlap_grad_reduce=overlap)
    assert model.dp_size == state.dp.size * cp and len(model.buckets) > 1
    torch_ddp = TorchDDP(copy.deepcopy(reference), process_group=model.dp_group)
    optimizers = [torch.optim.AdamW(m.parameters(), **ADAMW)
                  for m in (reference, model, torch_ddp)]
    model.guard_optimizer(optimizers[1])
    for step in range(steps):
        ids, targets = global_batch(step, b=2 * state.dp.size)
        local_ids, local_targets = local_slice(ids, state), local_slice(targets, state)
        lm_loss(reference, ids, targets).backward()
        token_mean_loss(torch_ddp(local_ids), local_targets).backward()
        with comm.count_traffic() as traffic:
            lm_loss(model, local_ids, local_targets).backward()
        # With overlap every bucket's all-reduce started inside backward; without, none did.
        assert traffic.calls["all_reduce"] == (len(model.buckets) if overlap else 0)
        bucket = model.buckets[0]
        assert bucket.params[0].grad.data_ptr() == bucket.grad_data.data_ptr()  # a view: no copy
        model.finish_grad_sync()
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
    assert_same_parameters(model.module, reference, "vs single process:")
    assert_same_parameters(model.module, torch_ddp.module, "vs torch DDP:")
    assert model.unused_parameters == []


@pytest.mark.parametrize("dp, cp, overlap", [(2, 1, True), (2, 1, False), (4, 1, True),
                                             (2, 2, True)],
                         ids=["dp2", "dp2-sync-after-backward", "dp4", "dp2xcp2"])
def test_training_matches_single_process_and_torch_ddp(dp, cp, overlap):
    run_on_ranks(_train_matches_single_process_and_torch_ddp, dp * cp, cp, overlap, timeout=120)


def _gradient_accumulation(micro_batches=3):
    state = mpu.initialize()
    torch.manual_seed(0)
    reference = TinyLM(TinyConfig()).double()
    model = DistributedDataParallel(copy.deepcopy(reference), bucket_bytes=SMALL_BUCKETS)
    optimizer = torch.optim.AdamW(model.parameters(), **ADAMW)
    ref_optimizer = torch.optim.AdamW(reference.parameters(), **ADAMW)
    for step in range(2):
        for i in range(micro_batches):
            ids, targets = global_batch(10 * step + i, b=2 * state.dp.size)
            (lm_loss(reference, ids, targets) / micro_batches).backward()
            last = i == micro_batches - 1
            with (contextlib.nullcontext() if last else model.no_sync()), \
                    comm.count_traffic() as traffic:
                loss = lm_loss(model, local_slice(ids, state), local_slice(targets, state))
                (loss / micro_batches).backward()
            assert sum(traffic.calls.values()) == (len(model.buckets) if last else 0), i
        model.finish_grad_sync()
        optimizer.step()
        ref_optimizer.step()
        model.zero_grad_buffer()
        ref_optimizer.zero_grad()
    assert_same_parameters(model.module, reference, "accumulated:")


def test_gradient_accumulation_syncs_only_the_last_micro_batch():
    run_on_ranks(_gradient_accumulation, 2, timeout=120)


class WithExtra(nn.Module):
    """TinyLM plus a layer that only some ranks use (and one that none does)."""

    def __init__(self):
        super().__init__()
        self.lm = TinyLM(TinyConfig(layers=1)).double()
        self.extra = nn.Linear(64, 64, dtype=torch.float64)
        self.never = nn.Linear(4, 4, dtype=torch.float64)

    def loss(self, ids, targets, use_extra):
        logits = self.lm(ids)
        if use_extra:
            logits = self.extra(logits)
        return token_mean_loss(logits, targets)


def _unused_parameters():
    mpu.initialize()
    rank = dist.get_rank()
    torch.manual_seed(0)
    reference = WithExtra()
    model = DistributedDataParallel(copy.deepcopy(reference), bucket_bytes=SMALL_BUCKETS)
    ids, targets = global_batch(0, b=4)
    halves = [(ids.chunk(2, 1)[r], targets.chunk(2, 1)[r]) for r in range(2)]
    # rank 0 uses `extra`, rank 1 does not: rank 1's bucket holding it completes only in finish.
    model.module.loss(*halves[rank], use_extra=rank == 0).backward()
    model.finish_grad_sync()
    for r in range(2):  # the expected average, computed locally from both ranks' halves
        reference.loss(*halves[r], use_extra=r == 0).backward()
    for (name, param), ref in zip(model.module.named_parameters(), reference.parameters()):
        expected = ref.grad / 2 if ref.grad is not None else torch.zeros_like(ref)
        torch.testing.assert_close(param.grad, expected, **EXACT, msg=lambda m: f"{name}: {m}")
    return model.unused_parameters


def test_unused_parameters_still_sync_and_are_reported():
    unused = run_on_ranks(_unused_parameters, 2, timeout=60)
    assert sorted(unused[0]) == ["never.bias", "never.weight"]
    assert sorted(unused[1]) == ["extra.bias", "extra.weight", "never.bias", "never.weight"]


def test_buckets_are_planned_last_parameter_first():
    a, b, c = (nn.Parameter(torch.zeros(n)) for n in (10, 30, 5))  # float32: 40, 120, 20 bytes
    d = nn.Parameter(torch.zeros(4, dtype=torch.float64))
    plans = plan_buckets([a, b, c, d], bucket_bytes=100)
    # d alone (its dtype), then c + b (reaching 100 bytes closes it), then a.
    assert [[id(p) for p in plan] for plan in plans] == [[id(d)], [id(c), id(b)], [id(a)]]
    bucket = Bucket.create(0, [c, b], shards=4)
    assert bucket.numel == 36 and bucket.param_range(b) == (5, 35)  # 35 padded to 4 shards of 9
    assert b.grad.data_ptr() == bucket.grad_data[5:].data_ptr()
    assert [(p is b, lo, hi) for p, lo, hi in bucket.shard_pieces(3)] == [(True, 27, 35)]


@pytest.mark.parametrize("bucket_bytes", [0, -1, 2.5, True])
def test_bucket_size_must_be_positive(bucket_bytes):
    with pytest.raises(ValueError, match="bucket_bytes"):
        DistributedDataParallel(nn.Linear(2, 2), bucket_bytes=bucket_bytes)


def _misuse_is_reported():
    mpu.initialize()
    ids, targets = global_batch(0, b=2)

    def fresh(**kwargs):
        torch.manual_seed(0)
        return DistributedDataParallel(TinyLM(TinyConfig(layers=1)).double(), **kwargs)

    model = fresh()
    optimizer = torch.optim.AdamW(model.parameters())
    model.guard_optimizer(optimizer)
    with model.no_sync():
        lm_loss(model, ids, targets).backward()
        with pytest.raises(RuntimeError, match="inside no_sync"):
            model.finish_grad_sync()
    with pytest.raises(RuntimeError, match="call finish_grad_sync"):
        optimizer.step()  # accumulated, never synchronised
    lm_loss(model, ids, targets).backward()
    with pytest.raises(RuntimeError, match="in flight"):  # a second backward before finishing
        lm_loss(model, ids, targets).backward()
    model.finish_grad_sync()

    model = fresh(overlap_grad_reduce=False)
    lm_loss(model, ids, targets).backward()
    with pytest.raises(RuntimeError, match="second gradient"):
        lm_loss(model, ids, targets).backward()
    model.finish_grad_sync()

    with pytest.raises(ValueError, match="use_distributed_optimizer=True"):
        DistributedOptimizer(fresh())
    zero = fresh(use_distributed_optimizer=True)
    zero_optimizer = DistributedOptimizer(zero)
    lm_loss(zero, ids, targets).backward()
    with pytest.raises(RuntimeError, match="call finish_grad_sync"):
        zero_optimizer.step()
    zero.finish_grad_sync()
    zero_optimizer.step()


def test_misuse_is_reported_clearly():
    run_on_ranks(_misuse_is_reported, 2, timeout=60)
