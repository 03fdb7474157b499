"""Activation recomputation (``parallelkit.recompute``) with dropout on: the loss, every gradient
and the random streams after the step are bitwise those of the same model without recompute,
under TP (with and without sequence parallelism), CP and the pipeline schedules; bad input is
refused by name.

Each comparison builds the model once per mode from one dense copy and reseeds every stream
(``model_parallel_seed``) before the step, so a mode draws exactly what the others draw.
"""

import contextlib
import copy
import functools

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint as torch_checkpoint
from torch import nn

from benchmarks.bench_recompute import saved_for_backward
from parallelkit import mpu
from parallelkit.context_parallel import context_parallel_positions, split_for_context_parallel
from parallelkit.models.tinylm import Block, TinyConfig, TinyLM
from parallelkit.parallelize import parallelize
from parallelkit.pipeline_parallel import PipelineStage, train_step
from parallelkit.recompute import apply_recompute
from parallelkit.tensor_parallel.random import get_rng_tracker, model_parallel_seed
from parallelkit.testing import run_on_ranks

MODES = [None, "selective", "full"]
SEQ, BATCH = 16, 2


def tiny_llama(attention_dropout):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, attn_implementation="sdpa",
                         attention_dropout=attention_dropout)
    return LlamaForCausalLM(config)


def tiny_lm(attention_dropout):
    return TinyLM(TinyConfig(vocab=128, layers=2, dropout=0.2, attention_dropout=attention_dropout))


def _loss(model, kind, cp, cp_rank):
    """The loss on fixed data (this CP rank's tokens)."""
    g = torch.Generator().manual_seed(1)
    seq_dim = 0 if kind == "tinylm" else 1
    ids = torch.randint(0, 128, (SEQ, BATCH) if seq_dim == 0 else (BATCH, SEQ), generator=g)
    labels = ids.roll(-1, seq_dim)

    def shard(t):
        return split_for_context_parallel(t, cp_rank, cp, dim=seq_dim)

    if kind == "tinylm":
        logits = model(shard(ids))
    else:
        positions = context_parallel_positions(SEQ, cp_rank, cp).expand(BATCH, -1)
        logits = model(input_ids=shard(ids), position_ids=positions).logits
    return F.cross_entropy(logits.flatten(0, 1), shard(labels).flatten())


def _run(state, kind, sequence_parallel, mode=None, wrap=None):
    """Loss, gradients, bytes saved for backward by the trunk (embedding and layers) and the
    streams' next draws of one model converted by parallelize(..., recompute=mode), then given
    to ``wrap`` if any."""
    cp = state.cp.size
    torch.manual_seed(0)
    dense = (tiny_lm if kind == "tinylm" else tiny_llama)(0.1 if cp == 1 else 0.0)
    model = parallelize(copy.deepcopy(dense), sequence_parallel=sequence_parallel,
                        loss_parallel=False, recompute=mode)
    if wrap is not None:
        wrap(model)
    model_parallel_seed(1234, state.tp.group)
    head = model.lm_head if kind == "tinylm" else None
    saved = saved_for_backward(model, lambda: _loss(model, kind, cp, state.cp.rank), head)
    saved["result"].backward()
    with get_rng_tracker().fork():
        tracker_next = torch.rand(4)
    grads = {name: p.grad for name, p in model.named_parameters()}
    return saved["result"].detach(), grads, saved["trunk"], (torch.rand(4), tracker_next)


def _modes_match(kind, sequence_parallel, cp):
    state = mpu.initialize(tp=2, cp=cp)
    results = {mode: _run(state, kind, sequence_parallel, mode) for mode in MODES}
    loss, grads, saved, streams = results[None]
    for mode in MODES[1:]:
        other_loss, other_grads, _, other_streams = results[mode]
        assert torch.equal(other_loss, loss), (mode, other_loss, loss)
        for name, grad in grads.items():
            assert grad is not None, name
            assert torch.equal(other_grads[name], grad), (mode, name)
        assert all(torch.equal(a, b) for a, b in zip(other_streams, streams)), mode
    return {mode: result[2] for mode, result in results.items()}


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp", "tp+sp"])
@pytest.mark.parametrize("kind", ["tinylm", "llama"])
def test_recompute_matches_no_recompute_with_dropout(kind, sequence_parallel):
    """tp=2, attention dropout (and TinyLM's residual dropout) on: bitwise the same step. Each
    mode saves less for backward: selective drops the attention probabilities, full all but
    the layers' inputs."""
    for saved in run_on_ranks(_modes_match, 2, kind, sequence_parallel, 1, timeout=180):
        assert saved["full"] < saved["selective"] < saved[None], saved


@pytest.mark.parametrize("kind", ["tinylm", "llama"])
def test_recompute_replays_ring_attention(kind):
    """tp=2 x cp=2: the recomputed layer (or core) runs ring attention again in backward; the
    residual dropout of TinyLM (CP has no attention dropout) still replays exactly."""
    run_on_ranks(_modes_match, 4, kind, True, 2, timeout=240)


def _torch_checkpoint(model):
    """torch's own checkpoint around each block: it restores only the default generators."""
    for block in model.blocks:
        block.forward = functools.partial(torch_checkpoint.checkpoint, block.forward,
                                          use_reentrant=False, preserve_rng_state=True)


def _torch_checkpoint_misses_the_tracker():
    state = mpu.initialize(tp=2)
    plain = _run(state, "tinylm", False)
    theirs = _run(state, "tinylm", False, wrap=_torch_checkpoint)
    assert torch.equal(theirs[0], plain[0])  # the forward is the same ...
    # ... but the recompute draws the heads' dropout from where the TP stream stood after the
    # forward, not where it stood when the layer first ran
    differ = [name for name, grad in plain[1].items() if not torch.equal(grad, theirs[1][name])]
    assert differ, "torch's checkpoint replayed the tracker's stream after all"
    assert not torch.equal(plain[3][1], theirs[3][1])  # and it advanced the TP stream


def test_torch_checkpoint_alone_would_not_replay_the_tracker():
    """Why recompute snapshots the tracker: torch's preserve_rng_state is not enough."""
    run_on_ranks(_torch_checkpoint_misses_the_tracker, 2, timeout=120)


PIPE_CONFIG = TinyConfig(vocab=32, hidden=16, heads=2, ffn=32, layers=4, dropout=0.2,
                         attention_dropout=0.2)


def _pipeline(schedule, m):
    """pp=2: each mode's step and gradients, and how often each block's ln1 ran."""
    mpu.initialize(pp=2)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, PIPE_CONFIG.vocab, (4, 2 * m), generator=g)
    targets = torch.randint(0, PIPE_CONFIG.vocab, (4, 2 * m), generator=g)
    results = {}
    for mode in MODES:
        torch.manual_seed(0)
        model = apply_recompute(TinyLM(PIPE_CONFIG), mode)
        runs = [0]
        for block in model.blocks:
            block.ln1.register_forward_pre_hook(lambda *_: runs.__setitem__(0, runs[0] + 1))
        stage = PipelineStage.from_layers(
            model.blocks, lambda y, t: F.cross_entropy(y.flatten(0, 1), t.flatten()),
            pre=model.embed, post=nn.Sequential(model.ln_f, model.lm_head))
        torch.manual_seed(5)
        loss = train_step(schedule, stage, ids, targets, m, (4, 2, PIPE_CONFIG.hidden))
        blocks_here = sum(isinstance(mod, Block)
                          for chunk in stage.chunks for mod in chunk.modules())
        results[mode] = (loss, [p.grad for p in stage.parameters()], runs[0] / (m * blocks_here))
    for mode in MODES[1:]:
        assert torch.equal(results[mode][0], results[None][0]), mode
        assert all(torch.equal(a, b) for a, b in zip(results[mode][1], results[None][1])), mode
    return {mode: result[2] for mode, result in results.items()}


@pytest.mark.parametrize("schedule", ["1f1b", "zb-h1"])
def test_pipeline_gradients_match_without_recompute(schedule):
    """1F1B recomputes each block once per micro-batch. ZB-H1's split backward recomputes in B
    and again in W (torch frees what B unpacked), once for all of W's autograd calls; its first
    stage has no B (its W is the whole backward), so once."""
    runs = run_on_ranks(_pipeline, 2, schedule, 3, timeout=180)
    first, last = runs
    assert first[None] == last[None] == 1 and first["selective"] == last["selective"] == 1
    assert first["full"] == 2
    assert last["full"] == (2 if schedule == "1f1b" else 3)


class _MLPStack(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(4, 4), nn.GELU()) for _ in range(2))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_bad_input_is_refused_by_name():
    with pytest.raises(ValueError, match=r"recompute='everything' is not one of \[None, "
                                         r"'selective', 'full'\]"):
        apply_recompute(TinyLM(), "everything")
    with pytest.raises(ValueError, match=r"found no decoder layers in Linear: .* pass layers="):
        apply_recompute(nn.Linear(4, 4), "full")
    with pytest.raises(ValueError, match=r"layer 0 \(Sequential\) has none: no submodule named "
                                         r"'core_attention' .* use recompute='full'"):
        apply_recompute(_MLPStack(), "selective")
    with pytest.raises(ValueError, match=r"Linear\'\] not inside the model"):
        apply_recompute(TinyLM(), "full", layers=[nn.Linear(4, 4)])
    model = apply_recompute(TinyLM(), "full")
    with pytest.raises(ValueError, match=r"Block already has recompute='full'"):
        apply_recompute(model, "selective")
    llama = tiny_llama(0.0)
    llama.activation_checkpointing_enable()
    with pytest.raises(ValueError, match=r"already checkpointed by transformers"):
        apply_recompute(llama, "full")
    cp_like = TinyLM(TinyConfig(attention_dropout=0.1))
    cp_like.blocks[0].core_attention = nn.Module()  # what ContextParallel puts there instead
    with pytest.raises(ValueError, match=r"attention_dropout=0.1\) is applied by CoreAttention, "
                                         r"which Module replaced"):
        cp_like.loss(torch.zeros(4, 1, dtype=torch.long), torch.zeros(4, 1, dtype=torch.long))


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_dense_llama_drops_its_cache_and_matches(mode):
    """One process, no conversion: transformers' default use_cache=True is dropped (with a
    warning) under full recompute, whose replay would append to the cache again; under no_grad
    nothing is checkpointed and the cache is kept."""
    torch.manual_seed(0)
    dense = tiny_llama(0.1)
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(1))
    steps = []
    for recompute in (None, mode):
        model = apply_recompute(copy.deepcopy(dense), recompute)
        torch.manual_seed(3)
        with (pytest.warns(UserWarning, match="not given its KV cache") if recompute == "full"
              else contextlib.nullcontext()):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        steps.append((loss.detach(), [p.grad for p in model.parameters()]))
        with torch.no_grad():
            assert model(input_ids=ids).past_key_values.get_seq_length() == 8
    (loss, grads), (other_loss, other_grads) = steps
    assert torch.equal(loss, other_loss)
    assert all(torch.equal(a, b) for a, b in zip(grads, other_grads))



@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_generators_and_a_cuda_tracker_replay(monkeypatch):
    """On CUDA tensors: dropout from the CUDA generator and from a CUDA tracker stream, in one
    process (a tracker of its own, without the MPU)."""
    from parallelkit.recompute import checkpoint
    from parallelkit.tensor_parallel import random as tp_random

    tracker = tp_random.RNGStatesTracker("cuda")
    tracker.add(tp_random.MODEL_PARALLEL_RNG, 99)
    monkeypatch.setattr(tp_random, "_tracker", tracker)
    torch.manual_seed(0)
    linear = nn.Linear(64, 64).cuda()
    x = torch.randn(8, 64, device="cuda")

    def layer(x):
        with tracker.fork():
            x = F.dropout(linear(x), 0.5)
        return F.dropout(x, 0.5).square().sum()

    steps = []
    for run in (layer, functools.partial(checkpoint, layer)):
        torch.cuda.manual_seed(1)
        tracker.reset()
        tracker.add(tp_random.MODEL_PARALLEL_RNG, 99)
        linear.zero_grad(set_to_none=True)
        run(x).backward()
        with tracker.fork():
            after = torch.rand(4, device="cuda")
        steps.append((linear.weight.grad, after, torch.rand(4, device="cuda")))
    assert all(torch.equal(a, b) for a, b in zip(*steps))
