"""bf16/fp16 data parallelism: fp32 main-grad buckets, fp32 master weights, dynamic loss scaling
and clipping, against independent references.

The reference gradient of a bf16 model is not an fp32 model's gradient (that differs by the bf16
forward's rounding, ~1e-2): it is the exact sum of the bf16 gradients this very model computes per
micro-batch and per rank. Each rank gets its own from a copy of the model (``torch.autograd.grad``,
bitwise what the wrapper's hook receives), sums them in float64, and the ranks' sums are
all-reduced in float64. fp32 accumulation must match it to fp32 rounding; bf16 accumulation is
shown to be far worse.
"""

import contextlib
import copy
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from parallelkit import mpu
from parallelkit.data_parallel import (DistributedDataParallel, DistributedOptimizer,
                                       DynamicGradScaler, MixedPrecisionOptimizer,
                                       clip_grad_norm_)
from parallelkit.distributed import comm
from parallelkit.models.tinylm import TinyConfig, TinyLM
from parallelkit.tensor_parallel.sequence_parallel import mark_sequence_parallel
from parallelkit.testing import run_on_ranks
from parallelkit.testing.tolerances import assert_close, rms, tolerance, transformer_terms
from test_data_parallel import (ADAMW, SMALL_BUCKETS, Partly,  # the sibling test module
                                global_batch, local_slice)
from test_zero_and_clip import no_decay_for_vectors

BF16 = torch.bfloat16


def reference_grads(reference, losses):
    """Per parameter of ``reference``: the float64 sum over the DP group of this rank's bf16
    gradients of ``losses`` (callables of the model, one per micro-batch) / the group's size,
    and the same sum of their absolute values (the scale of terms that cancel)."""
    params = list(reference.parameters())
    total = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    magnitude = [torch.zeros_like(t) for t in total]
    for loss in losses:
        for t, m, g in zip(total, magnitude, torch.autograd.grad(loss(reference), params)):
            t += g.double()
            m += g.double().abs()
    group = mpu.get_dp_group()
    return ([comm.all_reduce(t, group) / dist.get_world_size(group) for t in total],
            [comm.all_reduce(m, group) / dist.get_world_size(group) for m in magnitude])


def relative_error(grads, expected):
    error = sum((g.double() - e).square().sum() for g, e in zip(grads, expected))
    return math.sqrt(error / sum(e.square().sum() for e in expected))


def _fp32_accumulation(micro_batches=8):
    state = mpu.initialize()
    torch.manual_seed(0)
    base = TinyLM(TinyConfig()).to(BF16)
    models = {name: DistributedDataParallel(copy.deepcopy(base), bucket_bytes=SMALL_BUCKETS,
                                            **options)
              for name, options in [("fp32", {}), ("bf16", dict(grad_dtype=BF16)),
                                    ("bf16 reduce", dict(reduce_dtype=BF16)),
                                    ("zero bf16 reduce", dict(reduce_dtype=BF16,
                                                              use_distributed_optimizer=True))]}
    batches = [[local_slice(t, state) for t in global_batch(i, b=2 * state.dp.size)]
               for i in range(micro_batches)]
    traffic = {}
    for i, batch in enumerate(batches):
        for name, model in models.items():
            last = i == micro_batches - 1
            with (contextlib.nullcontext() if last else model.no_sync()), \
                    comm.count_traffic() as counted:
                (model.module.loss(*batch) / micro_batches).backward()
            traffic[name] = sum(counted.payload.values())
    for model in models.values():
        model.finish_grad_sync()
    expected, magnitude = reference_grads(
        copy.deepcopy(base), [lambda m, b=b: m.loss(*b) / micro_batches for b in batches])

    fp32 = models["fp32"]
    numel = sum(b.numel for b in fp32.buckets)
    assert all(b.grad_data.dtype == torch.float32 for b in fp32.buckets)
    zero = models.pop("zero bf16 reduce")
    assert traffic == {"fp32": 4 * numel, "bf16": 2 * numel, "bf16 reduce": 2 * numel,
                       "zero bf16 reduce": 2 * sum(b.numel for b in zero.buckets)}
    check_shards(zero, expected, magnitude, terms=micro_batches * zero.dp_size)
    errors = {}
    for name, model in models.items():
        params = list(model.module.parameters())
        if name == "bf16":  # the old path: .grad is the bucket's bf16 view, and main_grad too
            assert all(p.grad.data_ptr() == p.main_grad.data_ptr() for p in params)
        else:  # the half-precision .grad was added into main_grad and freed
            assert all(p.grad is None and p.main_grad.dtype == torch.float32 for p in params)
        errors[name] = relative_error([p.main_grad for p in params], expected)
        # stored in, summed in: fp32 | bf16 additions | fp32 sums, one bf16 rounding to reduce
        stored, summed = {"fp32": (torch.float32, None), "bf16": (BF16, BF16),
                          "bf16 reduce": (BF16, torch.float32)}[name]
        for (pname, p), e, m in zip(model.module.named_parameters(), expected, magnitude):
            # the sums: micro_batches terms per rank, then the ranks'
            assert_close(p.main_grad, e, stored, f"{name} {pname}",
                         terms=micro_batches * model.dp_size, accumulate=summed, scale=rms(m))
    # fp32 accumulation of bf16 gradients is all but exact; bf16 rounds every addition.
    assert errors["fp32"] * 8 < errors["bf16"], errors
    return errors


def check_shards(model, expected, magnitude, terms):
    """With ZeRO and a bf16 reduce-scatter: each bucket's fp32 ``grad_shard`` holds this rank's
    range of the expected average, rounded once to bf16 on the way."""
    index = {id(p): i for i, p in enumerate(model.module.parameters())}
    rank = dist.get_rank(model.dp_group)
    for bucket in model.buckets:
        assert bucket.grad_shard.dtype == torch.float32
        for param, lo, hi in bucket.shard_pieces(rank):
            start, i = bucket.param_range(param)[0], index[id(param)]
            got = bucket.grad_shard[lo - rank * bucket.shard_numel:hi - rank * bucket.shard_numel]
            assert_close(got, expected[i].view(-1)[lo - start:hi - start], BF16, "zero shard",
                         terms=terms, accumulate=torch.float32, scale=rms(magnitude[i]))


def test_fp32_main_grads_accumulate_bf16_micro_batches_exactly():
    errors = run_on_ranks(_fp32_accumulation, 2, timeout=120)
    assert errors[0] == errors[1]


class PartlyBF16(Partly):
    """Partly in bf16 (its data cast), its loss in fp32."""

    def __init__(self):
        super().__init__()
        self.to(BF16)

    def loss(self, step, rank):
        x, y = self.data(step, rank)
        return F.mse_loss(self(x.to(BF16), self.BRANCH[step][rank]).float(), y.float())


def _unused_main_grads():
    mpu.initialize()
    rank = dist.get_rank()
    torch.manual_seed(0)
    base = PartlyBF16()
    never = base.never.weight.detach().clone()
    model = DistributedDataParallel(copy.deepcopy(base), bucket_bytes=128)
    assert len(model.buckets) > 1
    optimizer = MixedPrecisionOptimizer(model, torch.optim.AdamW, **ADAMW)
    reference = copy.deepcopy(base)
    for step in range(len(Partly.BRANCH)):  # the branch: used by one rank, both, none, the other
        reference.load_state_dict(model.module.state_dict())
        model.module.loss(step, rank).backward()
        model.finish_grad_sync()
        grads = []
        for r in range(2):  # every rank's bf16 gradient, computed locally (None: unused there)
            loss = reference.loss(step, r)
            grads.append(torch.autograd.grad(loss, list(reference.parameters()),
                                             allow_unused=True))
        for (name, param), g0, g1 in zip(model.module.named_parameters(), *grads):
            assert param.grad is None, name  # freed by the hook, or never produced
            if g0 is None and g1 is None:  # no rank used it: None, like .grad in fp32
                assert param.main_grad is None, (step, name)
                continue
            want = sum(g.double() for g in (g0, g1) if g is not None) / 2
            assert_close(param.main_grad, want, torch.float32, f"step {step} {name}", terms=2)
        assert optimizer.step()
        optimizer.zero_grad()
        assert all(p.main_grad is not None and not p.main_grad.any()
                   for p in model.module.parameters())
    assert torch.equal(model.module.never.weight, never)  # no decay without a gradient


def test_unused_parameters_get_no_main_grad_and_are_skipped():
    run_on_ranks(_unused_main_grads, 2, timeout=60)


def _sequence_parallel_main_grads():
    state = mpu.initialize(tp=2)
    torch.manual_seed(0)
    base = torch.nn.Linear(4, 4).to(BF16)
    reference = copy.deepcopy(base)
    mark_sequence_parallel(base.bias)  # a partial gradient on each TP rank
    model = DistributedDataParallel(base)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(dist.get_rank())).to(BF16)
    model(x).square().sum().backward()
    model.finish_grad_sync()
    local = [g.double() for g in torch.autograd.grad(reference(x).square().sum(),
                                                     list(reference.parameters()))]
    weight = comm.all_reduce(local[0], state.dp.group) / state.dp.size
    bias = comm.all_reduce(comm.all_reduce(local[1], state.dp.group), state.tp.group)
    assert_close(model.module.weight.main_grad, weight, torch.float32, "weight", terms=2)
    assert_close(model.module.bias.main_grad, bias / state.dp.size, torch.float32, "bias",
                 terms=4)


def test_sequence_parallel_main_grads_are_summed_over_tp():
    run_on_ranks(_sequence_parallel_main_grads, 4, timeout=60)


def _training_tracks_fp32(steps=20, lr=3e-3):
    state = mpu.initialize()
    torch.manual_seed(0)
    config = TinyConfig()
    base = TinyLM(config).to(BF16)
    # A fixed batch, so that the loss falls steadily and lost updates show.
    ids, targets = (local_slice(t, state) for t in global_batch(0, s=16, b=4 * state.dp.size))
    runs = {}
    for kind in ("fp32", "masters", "pure bf16"):
        module = copy.deepcopy(base).float() if kind == "fp32" else copy.deepcopy(base)
        model = DistributedDataParallel(module, grad_dtype=BF16 if kind == "pure bf16" else None)
        optimizer = (MixedPrecisionOptimizer(model, torch.optim.AdamW, lr=lr) if kind == "masters"
                     else torch.optim.AdamW(model.parameters(), lr=lr))
        losses = []
        for _ in range(steps):
            loss = model.module.loss(ids, targets)
            loss.backward()
            model.finish_grad_sync()
            optimizer.step()
            model.zero_grad_buffer()
            losses.append(comm.all_reduce(loss.detach().double(), state.dp.group).item()
                          / state.dp.size)
        runs[kind] = losses, torch.cat([p.detach().double().flatten()
                                        for p in model.module.parameters()])
    (fp32, fp32_params), (masters, masters_params), (bf16, bf16_params) = runs.values()
    assert fp32[-1] < fp32[0] - 1.0  # it learns
    # Each loss of the bf16 model differs from the fp32 model's by the bf16 rounding of the
    # forward (2 eps of bf16, sums in fp32); the masters keep the trajectories from drifting.
    terms = transformer_terms(ids.numel(), ids.shape[0], config.hidden, config.ffn, config.vocab,
                              config.layers)
    rtol = tolerance(BF16, terms)["rtol"]
    for step, (a, b) in enumerate(zip(masters, fp32)):
        assert abs(a - b) <= rtol * b, (step, a, b, rtol)
    # Pure bf16 AdamW loses every update below half an ulp of its weight (a norm's gain of 1
    # never moves at lr 3e-3): its losses and weights drift well away (measured ~40x and ~9x).
    gap = lambda losses: max(abs(a - b) for a, b in zip(losses, fp32))
    assert gap(masters) * 5 < gap(bf16), (gap(masters), gap(bf16))
    distance = lambda params: (params - fp32_params).norm().item()
    assert distance(masters_params) * 3 < distance(bf16_params)
    return masters


def test_bf16_training_with_fp32_masters_tracks_fp32():
    losses = run_on_ranks(_training_tracks_fp32, 2, timeout=180)
    assert losses[0] == losses[1]


def _fp16_dynamic_scaling(zero):
    state = mpu.initialize()
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = DistributedDataParallel(TinyLM(TinyConfig(layers=1)).half(),
                                    bucket_bytes=SMALL_BUCKETS, use_distributed_optimizer=zero)
    scaler = DynamicGradScaler(initial_scale=2.0 ** 10, growth_interval=3)
    cls = DistributedOptimizer if zero else MixedPrecisionOptimizer
    optimizer = cls(model, torch.optim.AdamW, lr=1e-3, grad_scaler=scaler)
    scales, stepped = [], []
    for step in range(7):
        before = [p.detach().clone() for p in model.parameters()]
        ids, targets = (local_slice(t, state) for t in global_batch(step, b=2 * state.dp.size))
        loss = model.module.loss(ids, targets)
        if step == 1 and rank == 1:  # an overflow in rank 1's fp16 backward only
            loss = loss * 1e30
        optimizer.scale_loss(loss).backward()
        model.finish_grad_sync()
        if step == 3 and rank == 1:  # one inf in rank 1's own averaged gradient (its shard)
            grad = model.buckets[0].grad_shard if zero else model.buckets[0].params[0].main_grad
            grad.view(-1)[0] = math.inf
        stepped.append(optimizer.step())
        scales.append(optimizer.loss_scale)
        if step == 5:
            checkpoint = optimizer.grad_scaler.state_dict()  # 2 good steps since the back-off
        optimizer.zero_grad()
        unchanged = all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
        assert unchanged == (not stepped[-1]), (step, stepped)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    adam_steps = {int(s["step"]) for s in optimizer.optimizer.state.values()}
    assert adam_steps == {sum(stepped)}  # skipped steps left the moments alone
    # A checkpointed scaler resumes where it was: one more good step reaches the interval.
    resumed = DynamicGradScaler()
    resumed.load_state_dict(checkpoint)
    resumed.update(found_inf=False)
    return stepped, scales, resumed.scale, torch.cat([p.detach().flatten().float()
                                                      for p in model.parameters()])


@pytest.mark.parametrize("zero", [False, True], ids=["masters", "zero1"])
def test_fp16_overflow_on_one_rank_skips_the_step_everywhere_and_backs_off(zero):
    results = run_on_ranks(_fp16_dynamic_scaling, 2, zero, timeout=120)
    s = 2.0 ** 10
    for stepped, scales, resumed, _ in results:
        # overflows at steps 1 and 3 halve the scale; 3 good steps in a row (4, 5, 6) double it
        assert stepped == [True, False, True, False, True, True, True]
        assert scales == [s, s / 2, s / 2, s / 4, s / 4, s / 4, s / 2]
        assert resumed == s / 2
    assert torch.equal(results[0][3], results[1][3])


def _zero_matches_masters(steps=3):
    state = mpu.initialize()
    torch.manual_seed(0)
    base = TinyLM(TinyConfig()).to(BF16)
    plain = DistributedDataParallel(copy.deepcopy(base), bucket_bytes=SMALL_BUCKETS)
    zero = DistributedDataParallel(copy.deepcopy(base), bucket_bytes=SMALL_BUCKETS,
                                   use_distributed_optimizer=True)
    optimizers = [MixedPrecisionOptimizer(plain, torch.optim.AdamW, no_decay_for_vectors(plain),
                                          **ADAMW),
                  DistributedOptimizer(zero, torch.optim.AdamW, no_decay_for_vectors(zero),
                                       **ADAMW)]
    for shard in optimizers[1].shards:  # fp32 masters step on the fp32 reduce-scatter output
        assert shard.master_grad is shard.bucket.grad_shard
        assert shard.master_grad.dtype == torch.float32
    numel = sum(p.numel() for p in base.parameters())
    for step in range(steps):
        ids, targets = (local_slice(t, state) for t in global_batch(step, b=2 * state.dp.size))
        for model in (plain, zero):
            model.module.loss(ids, targets).backward()
            model.finish_grad_sync()
        # Under the limit, so the clip multiplies by exactly 1: the steps stay bitwise equal.
        norms = [optimizer.clip_grad_norm(1e6) for optimizer in optimizers]
        assert_close(norms[1], norms[0], torch.float32, "norm", terms=numel)
        for optimizer in optimizers:
            assert optimizer.step()
            optimizer.zero_grad()
    # The same fp32 sums (two ranks' terms in either order), the same AdamW arithmetic.
    for (name, a), b in zip(plain.module.named_parameters(), zero.module.parameters()):
        assert torch.equal(a, b), name
    names = {id(p): n for model in (plain, zero) for n, p in model.module.named_parameters()}
    masters = {names[id(p)]: m for p, m in optimizers[0]._pairs}
    for shard in optimizers[1].shards:  # each fp32 master piece equals that part of the whole
        for param, piece in shard.pieces:
            start = max(shard.bucket.param_range(param)[0], shard.start)
            start -= shard.bucket.param_range(param)[0]
            whole = masters[names[id(param)]].view(-1)
            assert torch.equal(piece, whole[start:start + piece.numel()]), names[id(param)]


def test_zero1_with_fp32_buckets_matches_the_masters_optimizer():
    run_on_ranks(_zero_matches_masters, 2, timeout=120)


def _clip_main_grads(max_norm, norm_type):
    state = mpu.initialize()
    torch.manual_seed(0)
    base = TinyLM(TinyConfig()).to(BF16)
    ids, targets = (local_slice(t, state) for t in global_batch(0, b=2 * state.dp.size))
    expected, magnitude = reference_grads(copy.deepcopy(base), [lambda m: m.loss(ids, targets)])
    # The reference: torch's clip on the float64 average of the ranks' bf16 gradients.
    dense = [torch.nn.Parameter(torch.zeros_like(e)) for e in expected]
    for p, e in zip(dense, expected):
        p.grad = e.clone()
    want_norm = torch.nn.utils.clip_grad_norm_(dense, max_norm, norm_type)
    numel = sum(e.numel() for e in expected)
    for how in ("function", "masters", "zero1"):
        model = DistributedDataParallel(copy.deepcopy(base), bucket_bytes=SMALL_BUCKETS,
                                        use_distributed_optimizer=how == "zero1")
        model.module.loss(ids, targets).backward()
        model.finish_grad_sync()
        if how == "function":
            norm = clip_grad_norm_(model.parameters(), max_norm, norm_type)
        else:
            cls = DistributedOptimizer if how == "zero1" else MixedPrecisionOptimizer
            norm = cls(model, torch.optim.AdamW).clip_grad_norm(max_norm, norm_type)
        assert_close(norm, want_norm, torch.float32, f"{how} norm", terms=numel)
        if how == "zero1":
            continue  # its clipped gradients are the masters' shards; the norm is the check
        for (name, p), want, m in zip(model.module.named_parameters(), dense, magnitude):
            assert_close(p.main_grad, want.grad, torch.float32, f"{how} {name}", terms=numel,
                         scale=rms(m) * min(1.0, max_norm / want_norm.item()))
    return want_norm.item()


@pytest.mark.parametrize("max_norm, norm_type", [(0.1, 2.0), (1e3, 2.0), (0.01, math.inf)],
                         ids=["clips", "under-limit", "inf-norm"])
def test_clipping_reads_the_fp32_main_grads(max_norm, norm_type):
    norms = run_on_ranks(_clip_main_grads, 2, max_norm, norm_type, timeout=120)
    assert norms[0] == norms[1]
    assert (max_norm < norms[0]) == (max_norm != 1e3)


def _bad_input():
    mpu.initialize()
    rank = dist.get_rank()

    def bf16():
        return TinyLM(TinyConfig(layers=1)).to(BF16)

    # (model, options, words of the message): raised on every rank, before any bucket exists
    cases = [
        (bf16, dict(grad_dtype=torch.int32), r"grad_dtype=torch.int32 is not a floating-point"),
        (bf16, dict(grad_dtype="float32"), r"grad_dtype='float32' is not a floating-point"),
        (bf16, dict(grad_dtype=torch.float64),
         r"grad_dtype=torch.float64 concerns the bf16/fp16 parameters only .* must be "
         r"torch.float32 \(fp32 main grads, the default\) or their own dtype"),
        (lambda: TinyLM(TinyConfig(layers=1)), dict(grad_dtype=BF16),
         r"grad_dtype=torch.bfloat16 concerns .*trainable ones: none"),
        (lambda: TinyLM(TinyConfig(layers=1)), dict(reduce_dtype=BF16),
         r"reduce_dtype=torch.bfloat16 casts the fp32 main grads of torch.bfloat16 parameters "
         r"down .* but no bucket holds such main grads .*: drop reduce_dtype"),
        (bf16, dict(reduce_dtype=torch.float16), r"no bucket holds such main grads"),
        (bf16, dict(grad_dtype=BF16, reduce_dtype=torch.float32),
         r"reduce_dtype=torch.float32 is neither the dtype the gradients accumulate in "
         r"\(torch.bfloat16\) .* pass grad_dtype=torch.float32"),
        (bf16, dict(reduce_dtype=torch.int8), r"reduce_dtype=torch.int8 is not a floating-point"),
        # a bad option on rank 1 only: rank 0 must not wait for it in a collective
        (bf16, dict(reduce_dtype=torch.float16 if rank == 1 else None),
         r"DistributedDataParallel: rank 1: reduce_dtype=torch.float16"),
    ]
    for build, options, words in cases:
        with pytest.raises(ValueError, match=words):
            DistributedDataParallel(build(), **options)

    model = DistributedDataParallel(bf16(), grad_dtype=BF16)
    with pytest.raises(ValueError, match=r"its gradients are torch.bfloat16: .* wrap the model "
                                         r"with DistributedDataParallel\(module, grad_dtype"):
        MixedPrecisionOptimizer(model)
    with pytest.raises(ValueError, match=r"with ZeRO-1 use DistributedOptimizer"):
        MixedPrecisionOptimizer(DistributedDataParallel(bf16(), use_distributed_optimizer=True))
    with pytest.raises(ValueError, match=r"grad_scaler='dynamic' must be 'auto'"):
        MixedPrecisionOptimizer(DistributedDataParallel(bf16()), grad_scaler="dynamic")
    with pytest.raises(ValueError, match=r"backoff_factor=2 must be in \(0, 1\)"):
        DynamicGradScaler(backoff_factor=2)
    with pytest.raises(ValueError, match=r"the state lacks \['growth_tracker'\]"):
        DynamicGradScaler().load_state_dict({"scale": 1.0, "growth_factor": 2.0,
                                             "backoff_factor": 0.5, "growth_interval": 10,
                                             "min_scale": 1.0})

    ids, targets = global_batch(0, b=2)
    model = DistributedDataParallel(bf16())
    model.module.float()  # converted after wrapping: the fp32 buckets were built for bf16
    with pytest.raises(RuntimeError, match=r"bucket was built for torch.bfloat16 .* converted"):
        model.module.loss(ids, targets).backward()

    # fp16 without scale_loss: unscaling would divide unscaled gradients, so every rank raises.
    model = DistributedDataParallel(TinyLM(TinyConfig(layers=1)).half())
    optimizer = MixedPrecisionOptimizer(model)
    assert optimizer.loss_scale == 2.0 ** 16  # fp16: dynamic scaling by default
    model.module.loss(ids, targets).backward()
    model.finish_grad_sync()
    with pytest.raises(RuntimeError, match=r"not computed from a scaled loss: call "
                                           r"optimizer.scale_loss\(loss\).backward\(\)"):
        optimizer.step()
    assert MixedPrecisionOptimizer(DistributedDataParallel(bf16())).grad_scaler is None

    # A plain torch optimizer on the bf16 parameters would see .grad = None and do nothing.
    model = DistributedDataParallel(bf16())
    plain = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.module.loss(ids, targets).backward()
    model.finish_grad_sync()
    with pytest.raises(RuntimeError, match=r"AdamW steps bf16/fp16 parameters whose gradients "
                                           r"DistributedDataParallel accumulates in fp32"):
        plain.step()


def test_bad_precision_options_raise_clearly_on_every_rank():
    run_on_ranks(_bad_input, 2, timeout=60)
