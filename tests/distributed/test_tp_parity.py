"""A tensor-parallel TinyLM against the dense one it was converted from: loss and every gradient."""

import pytest
import torch

import copy

from parallelkit import mpu
from parallelkit.parallelize import parallelize
from parallelkit.tensor_parallel import sync_sequence_parallel_grads
from parallelkit.testing import run_on_ranks
from parallelkit.models.tinylm import TinyConfig, TinyLM
from parallelkit.testing.tolerances import assert_close, gradient_scale, transformer_terms

# Which dim of the dense gradient each TP parameter holds a shard of (None: all of it).
SHARD_DIMS = {"q_proj.weight": 0, "k_proj.weight": 0, "v_proj.weight": 0, "fc1.weight": 0,
              "q_proj.bias": 0, "k_proj.bias": 0, "v_proj.bias": 0, "fc1.bias": 0,
              "lm_head.weight": 0, "embed.weight": 0, "o_proj.weight": 1, "fc2.weight": 1}


def expected_shard_dim(name):
    return next((dim for suffix, dim in SHARD_DIMS.items() if name.endswith(suffix)), None)


def batch(seed, s=8, b=2, vocab=64):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (s, b), generator=g), torch.randint(0, vocab, (s, b), generator=g)


def _parity(tp, sequence_parallel, dtype, use_hooks=False, micro_batches=1, overlap_comm=False):
    state = mpu.initialize(tp=tp)
    torch.manual_seed(0)
    config = TinyConfig()
    dense = TinyLM(config).to(dtype)
    # parallelize registers the sequence-parallel gradient hooks itself.
    model = parallelize(copy.deepcopy(dense), tp_group=state.tp.group,
                        sequence_parallel=sequence_parallel, overlap_comm=overlap_comm,
                        loss_parallel=False)
    for step in range(micro_batches):  # gradients accumulate over micro-batches
        ids, targets = batch(seed=step)
        terms = micro_batches * transformer_terms(ids.numel(), ids.shape[0], config.hidden,
                                                  config.ffn, config.vocab, config.layers)
        dense_loss = dense.loss(ids, targets)
        dense_loss.backward()
        loss = model.loss(ids, targets)
        loss.backward()
        assert_close(loss, dense_loss, name="loss", terms=terms)
    if sequence_parallel and not use_hooks:  # after the hooks, a flat sync must change nothing
        before = [p.grad.clone() for p in model.parameters()]
        sync_sequence_parallel_grads(model, state.tp.group)
        assert all(torch.equal(a, p.grad) for a, p in zip(before, model.parameters()))

    dense_params = dict(dense.named_parameters())
    assert dense_params.keys() == dict(model.named_parameters()).keys()
    scale = gradient_scale(dense)
    for name, param in model.named_parameters():
        dim = expected_shard_dim(name) if tp > 1 else None  # at tp=1 nothing is converted
        assert getattr(param, "tp_shard_dim", None) == dim, name
        ref_value, ref_grad = dense_params[name].detach(), dense_params[name].grad
        if dim is not None:
            ref_value = ref_value.chunk(tp, dim)[state.tp.rank]
            ref_grad = ref_grad.chunk(tp, dim)[state.tp.rank]
        assert torch.equal(param.detach(), ref_value), name
        assert_close(param.grad, ref_grad, name=name, terms=terms, scale=scale)
    return loss.item()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp", "tp+sp"])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_loss_and_every_gradient_match_dense(tp, sequence_parallel, dtype):
    losses = run_on_ranks(_parity, 4, tp, sequence_parallel, dtype, timeout=120)
    assert len(set(losses)) == 1  # every rank, TP or DP, computed the same loss


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("tp", [2, 4])
def test_fused_overlap_layers_match_dense(tp, dtype):
    run_on_ranks(_parity, 4, tp, True, dtype, False, 1, True, timeout=120)


def test_grad_hooks_with_accumulation_match_dense():
    """The hook route reduces each micro-batch's gradient once, before accumulation."""
    run_on_ranks(_parity, 4, 2, True, torch.float64, True, 3, timeout=120)
