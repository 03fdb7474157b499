"""Pipeline schedules on gloo against the single-process model: the loss and every gradient.

Every rank builds the whole model from one seed and keeps its chunks; the reference is a copy
that computes the mean loss over the same micro-batches in one process.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from parallelkit import mpu
from parallelkit.pipeline_parallel import PipelineStage, train_step
from parallelkit.testing import run_on_ranks
from parallelkit.models.tinylm import TinyConfig, TinyLM
from parallelkit.testing.tolerances import assert_close, gradient_scale, transformer_terms

SEQ, MICRO_BATCH = 4, 2
CONFIG = TinyConfig(vocab=32, hidden=16, heads=2, ffn=32, layers=8)  # 8 blocks: pp*v = 4*2
SCHEDULE_NAMES = ["gpipe", "1f1b", "interleaved-1f1b", "zb-h1"]


def lm_loss(logits, targets):
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


class MLPLM(nn.Module):
    """An nn.Sequential of Linear + GELU layers between an embedding and a head."""

    def __init__(self, config: TinyConfig, depth: int = 6):
        super().__init__()
        self.embed = nn.Embedding(config.vocab, config.hidden)
        self.layers = nn.Sequential(*(m for _ in range(depth)
                                      for m in (nn.Linear(config.hidden, config.hidden), nn.GELU())))
        self.head = nn.Linear(config.hidden, config.vocab)

    def forward(self, ids):
        return self.head(self.layers(self.embed(ids)))


def build(kind: str, tied: bool):
    """(model, layers, pre, post) with the model's modules, not copies."""
    if kind == "mlp":
        model = MLPLM(CONFIG)
        return model, model.layers, model.embed, model.head
    model = TinyLM(CONFIG)
    if tied:
        model.lm_head.weight = model.embed.weight
    return model, model.blocks, model.embed, nn.Sequential(model.ln_f, model.lm_head)


def _parity(pp, schedule, m, dtype, kind="tinylm", tied=False, steps=1, costs=None):
    v = 2 if schedule == "interleaved-1f1b" else 1
    mpu.initialize(pp=pp, virtual_pp=v if v > 1 else None)
    torch.manual_seed(0)
    model, layers, pre, post = build(kind, tied)
    model = model.to(dtype)
    reference = copy.deepcopy(model)
    stage = PipelineStage.from_layers(layers, lm_loss, pre=pre, post=post, costs=costs)
    stage.sync_tied_parameters()

    # Micro-batch losses and gradients are summed over the m micro-batches and the steps too.
    tokens = SEQ * m * MICRO_BATCH * steps
    terms = transformer_terms(tokens, SEQ, CONFIG.hidden, CONFIG.ffn, CONFIG.vocab,
                              CONFIG.layers) + m * steps
    for step in range(steps):  # a second step checks that gradients accumulate, tied ones too
        g = torch.Generator().manual_seed(step)
        ids = torch.randint(0, CONFIG.vocab, (SEQ, m * MICRO_BATCH), generator=g)
        targets = torch.randint(0, CONFIG.vocab, (SEQ, m * MICRO_BATCH), generator=g)
        expected = sum(lm_loss(reference(i), t) for i, t in
                       zip(ids.chunk(m, dim=1), targets.chunk(m, dim=1))) / m
        expected.backward()
        loss = train_step(schedule, stage, ids, targets, m, (SEQ, MICRO_BATCH, CONFIG.hidden))
        assert_close(loss.to(dtype), expected.detach(), name="loss", terms=terms)

    reference_params = dict(reference.named_parameters())
    scale = gradient_scale(reference)
    mine = {id(p) for p in stage.parameters()}
    checked = []
    for name, param in model.named_parameters():
        if id(param) in mine:
            assert param.grad is not None, name
            assert_close(param.grad, reference_params[name].grad, name=name, terms=terms,
                         scale=scale)
            checked.append(name)
    return checked, loss.item(), [name for name, _ in model.named_parameters()]


def _assert_every_parameter_checked(results):
    checked = [name for names, _, _ in results for name in names]
    assert sorted(set(checked)) == sorted(results[0][2])
    assert len({loss for _, loss, _ in results}) == 1  # every rank returns the same loss


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("schedule", SCHEDULE_NAMES)
@pytest.mark.parametrize("m_of_pp", ["m=pp", "m=2pp+1"])
@pytest.mark.parametrize("pp", [2, 4])
def test_loss_and_every_gradient_match_single_process(pp, m_of_pp, schedule, dtype):
    m = pp if m_of_pp == "m=pp" else 2 * pp + 1
    _assert_every_parameter_checked(run_on_ranks(_parity, pp, pp, schedule, m, dtype, timeout=120))


@pytest.mark.parametrize("schedule", ["1f1b", "interleaved-1f1b", "zb-h1"])
@pytest.mark.parametrize("pp", [2, 4])
def test_tied_embedding_gradients_summed_over_embedding_group(pp, schedule):
    """The tied weight's gradient is the sum of the embedding's and the head's, over two steps."""
    results = run_on_ranks(_parity, pp, pp, schedule, pp + 1, torch.float64, "tinylm", True, 2,
                           timeout=120)
    _assert_every_parameter_checked(results)


@pytest.mark.parametrize("schedule", ["gpipe", "zb-h1"])
def test_sequential_of_linear_layers_split_by_cost(schedule):
    costs = [4.0 if i % 2 == 0 else 1.0 for i in range(12)]  # Linear heavier than GELU
    results = run_on_ranks(_parity, 4, 4, schedule, 5, torch.float64, "mlp", False, 1, costs,
                           timeout=120)
    _assert_every_parameter_checked(results)


@pytest.mark.parametrize("schedule", ["1f1b", "zb-h1"])
def test_fewer_microbatches_than_stages_runs(schedule):
    """m < pp is documented to run (the warm-up is capped at m), with the same results."""
    _assert_every_parameter_checked(
        run_on_ranks(_parity, 4, 4, schedule, 2, torch.float64, timeout=120))
