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
from parallelkit.models.tinylm import TinyConfig, TinyLM

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
        if ref.grad is None:  # no rank used it: like torch DDP, no gradient (not a zero one)
            assert param.grad is None, name
            continue
        torch.testing.assert_close(param.grad, ref.grad / 2, **EXACT, msg=lambda m: f"{name}: {m}")
    return model.unused_parameters


def test_unused_parameters_still_sync_and_are_reported():
    unused = run_on_ranks(_unused_parameters, 2, timeout=60)
    assert sorted(unused[0]) == ["never.bias", "never.weight"]
    assert sorted(unused[1]) == ["extra.bias", "extra.weight", "never.bias", "never.weight"]


class Partly(nn.Module):
    """A body and a head, a branch that some ranks use on some steps, and a layer none uses."""

    # Per step, whether (rank 0, rank 1) use the branch: one, both, neither, the other.
    BRANCH = [(True, False), (True, True), (False, False), (False, True)]

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(6, 8, dtype=torch.float64)
        self.branch = nn.Linear(8, 8, dtype=torch.float64)
        self.never = nn.Linear(8, 8, dtype=torch.float64)
        self.head = nn.Linear(8, 1, dtype=torch.float64)

    def forward(self, x, use_branch):
        h = torch.tanh(self.body(x))
        return self.head(h + self.branch(h) if use_branch else h)

    @staticmethod
    def data(step, rank=None):
        """The step's global batch ``(x [8, 6], y [8, 1])``, or DP rank ``rank``'s half of it."""
        g = torch.Generator().manual_seed(step)
        x, y = (torch.randn(8, n, generator=g, dtype=torch.float64) for n in (6, 1))
        return (x, y) if rank is None else (x.chunk(2)[rank], y.chunk(2)[rank])

    def loss(self, step, rank):
        x, y = self.data(step, rank)
        return F.mse_loss(self(x, self.BRANCH[step][rank]), y)


def _unused_like_torch_ddp(reset):
    """Ours and torch's DDP (find_unused_parameters) train Partly side by side."""
    mpu.initialize()
    rank = dist.get_rank()
    torch.manual_seed(0)
    reference = Partly()
    model = DistributedDataParallel(copy.deepcopy(reference), bucket_bytes=256)
    assert len(model.buckets) > 1
    torch_ddp = TorchDDP(copy.deepcopy(reference), find_unused_parameters=True)
    optimizers = [torch.optim.AdamW(m.parameters(), **ADAMW) for m in (model, torch_ddp)]
    for step in range(len(Partly.BRANCH)):
        x, y = Partly.data(step, rank)
        for m in (model, torch_ddp):
            F.mse_loss(m(x, Partly.BRANCH[step][rank]), y).backward()
        model.finish_grad_sync()
        for (name, ours), theirs in zip(model.module.named_parameters(), torch_ddp.parameters()):
            where = f"step {step} {name}"
            assert (ours.grad is None) == (theirs.grad is None), (where, ours.grad, theirs.grad)
            if ours.grad is not None:
                torch.testing.assert_close(ours.grad, theirs.grad, **EXACT, msg=where)
        for optimizer in optimizers:
            optimizer.step()
        optimizers[1].zero_grad()
        # set_to_none leaves stale gradients in the buckets: a rank without a gradient must
        # still contribute zero to the average, as torch's does.
        model.zero_grad_buffer() if reset == "zero_grad_buffer" else optimizers[0].zero_grad()
        assert_same_parameters(model.module, torch_ddp.module, f"step {step}:")
    never = reference.never.weight
    torch.testing.assert_close(model.module.never.weight, never, rtol=0, atol=0)  # no decay


@pytest.mark.parametrize("reset", ["zero_grad_buffer", "set_to_none"])
def test_unused_parameters_match_torch_ddp_grad_none_and_adamw(reset):
    run_on_ranks(_unused_like_torch_ddp, 2, reset, timeout=60)


def _rank_without_gradients():
    mpu.initialize()
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = DistributedDataParallel(Partly())
    x, y = Partly.data(0, rank)
    out = model(x, use_branch=False)
    if rank == 0:  # rank 1 ran forward but computes no gradient at all this step
        F.mse_loss(out, y).backward()
    model.finish_grad_sync()  # rank 1 must join the collectives rank 0 waits in
    return [None if p.grad is None else p.grad.clone() for p in model.module.parameters()]


def test_a_rank_without_any_gradient_still_joins_the_sync():
    grads = run_on_ranks(_rank_without_gradients, 2, timeout=60)
    for mine, theirs in zip(*grads):
        assert (mine is None) == (theirs is None)
        if mine is not None:
            torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
    assert grads[0][0].abs().sum() > 0  # body.weight: rank 0's gradient / 2


class TwoLayers(nn.Module):
    def __init__(self, sizes=(4, 8, 8), dtype=torch.float32, order="ab", device=None):
        super().__init__()
        layers = {"a": nn.Linear(sizes[0], sizes[1], dtype=dtype, device=device),
                  "b": nn.Linear(sizes[1], sizes[2], dtype=dtype, device=device)}
        for name in order:
            self.add_module(name, layers[name])


def _replicas_disagree():
    mpu.initialize()
    rank = dist.get_rank()
    other = rank == 1
    cases = {
        "shape": lambda: TwoLayers(sizes=(6 if other else 4, 8, 8)),
        "count": lambda: TwoLayers(order="ab" if other else "a"),
        "dtype": lambda: TwoLayers(dtype=torch.float64 if other else torch.float32),
        "order": lambda: TwoLayers(sizes=(8, 8, 8), order="ba" if other else "ab"),
        "meta": lambda: TwoLayers(device="meta" if other else None),
        "sparse": lambda: nn.Embedding(10, 4, sparse=True),
    }
    messages = {}
    for case, build in cases.items():
        with pytest.raises(ValueError) as error:  # on every rank, not only the odd one
            DistributedDataParallel(build())
        messages[case] = str(error.value)
    with pytest.raises(ValueError) as error:
        DistributedDataParallel(TwoLayers(), bucket_bytes=1024 if other else 2048)
    messages["options"] = str(error.value)
    with comm.count_traffic() as traffic:  # agreeing replicas: one small all-gather
        DistributedDataParallel(TwoLayers(), init_sync=False)
    assert traffic.calls == {"all_gather": 1} and traffic.payload["all_gather"] == 2 * 3 * 8
    return messages


def test_replicas_that_disagree_raise_on_every_rank_naming_the_difference():
    messages = run_on_ranks(_replicas_disagree, 2, timeout=60)
    assert messages[0] == messages[1]
    got = messages[0]
    fix = "every DP replica must hold the same model"
    assert got["shape"] == ("DistributedDataParallel: data-parallel ranks disagree on parameter "
                            "'a.weight': rank 0 has (8, 4) float32, rank 1 has (8, 6) float32; "
                            f"{fix}: build it identically on every rank (same config, same "
                            "parallel sizes) before wrapping it")
    assert "parameter 'b.weight': rank 0 has nothing, rank 1 has (8, 8) float32" in got["count"]
    assert "'a.weight': rank 0 has (8, 4) float32, rank 1 has (8, 4) float64" in got["dtype"]
    assert "the order, at position 1: rank 0 has parameter 'a.weight', rank 1 has " \
           "parameter 'b.weight'" in got["order"]
    assert "bucket_bytes=2048" in got["options"] and "bucket_bytes=1024" in got["options"]
    assert got["meta"].startswith("DistributedDataParallel: rank 1: parameter 'a.weight' is on "
                                  "the meta device: materialise the model")
    assert "rank 0: module '' makes sparse gradients" in got["sparse"]
    assert "rank 1: module '' makes sparse gradients" in got["sparse"]


def _init_sync(init_sync, zero):
    mpu.initialize()
    torch.manual_seed(dist.get_rank())  # every rank initialises its replica differently
    model = DistributedDataParallel(TwoLayers(), bucket_bytes=64, init_sync=init_sync,
                                    use_distributed_optimizer=zero)
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("init_sync, zero", [(True, False), (True, True), (False, False)])
def test_parameters_are_broadcast_from_the_first_rank_at_wrap_time(init_sync, zero):
    flat = run_on_ranks(_init_sync, 4, init_sync, zero, timeout=60)
    torch.manual_seed(0)
    first = torch.cat([p.detach().flatten() for p in TwoLayers().parameters()])
    assert torch.equal(flat[0], first)
    assert all(torch.equal(f, first) == init_sync for f in flat[1:])


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

    model = fresh()
    model.module.float()  # converted after wrapping: its gradients no longer fit the buckets
    with pytest.raises(RuntimeError, match=r"converted or moved after wrapping; call model.to"):
        lm_loss(model, ids, targets).backward()

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
