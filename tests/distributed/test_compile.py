"""torch.compile(fullgraph=True) of parallelize()d models: TinyLM and a transformers Llama with
sequence parallelism, the fused overlap rings, the vocab-parallel loss and context-parallel ring
attention compile without a graph break and give eager's loss and gradients; the custom ops
pass torch.library.opcheck."""

import copy

import pytest
import torch
import torch.distributed as dist

from parallelkit import mpu
from parallelkit.context_parallel import context_parallel_positions, split_for_context_parallel
from parallelkit.models.tinylm import TinyConfig, TinyLM
from parallelkit.parallelize import parallelize
from parallelkit.testing import run_on_ranks
from parallelkit.testing.tolerances import assert_close, gradient_scale, transformer_terms


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        attn_implementation="sdpa"))


def _inputs(name, state, cp):
    """(model builder, step(model) -> loss) for one model family."""
    g = torch.Generator().manual_seed(1)
    if name == "tinylm":
        ids = torch.randint(0, 128, (16, 2), generator=g)  # [s, b]: sequence first
        local = split_for_context_parallel(ids, state.cp.rank, cp, dim=0)
        return (lambda: TinyLM(TinyConfig(vocab=128, layers=2)),
                lambda model: model(local).float().pow(2).mean())
    ids = torch.randint(0, 128, (2, 16), generator=g)
    local = split_for_context_parallel(ids, state.cp.rank, cp, dim=1)
    positions = context_parallel_positions(16, state.cp.rank, cp).expand(2, -1)
    shift = split_for_context_parallel(torch.roll(ids, -1, 1), state.cp.rank, cp, dim=1)
    return (tiny_llama, lambda model: model(input_ids=local, position_ids=positions,
                                            shift_labels=shift, labels=shift,
                                            use_cache=False).loss)


def _compiled_equals_eager(name, tp, cp, backend):
    state = mpu.initialize(tp=tp, cp=cp)
    build, step = _inputs(name, state, cp)
    torch.manual_seed(0)
    dense = build()
    eager, compiled = parallelize(copy.deepcopy(dense)), parallelize(copy.deepcopy(dense))
    explained = torch._dynamo.explain(step)(compiled)
    assert explained.graph_break_count == 0, explained.break_reasons
    loss = torch.compile(step, fullgraph=True, backend=backend)(compiled)
    loss.backward()
    expected = step(eager)
    expected.backward()
    terms = transformer_terms(tokens=32, seq=16, hidden=64, ffn=256, vocab=128, layers=2)
    assert_close(loss.detach(), expected.detach(), name="loss", terms=terms)
    scale = gradient_scale(eager)  # k biases' true gradients are 0: rounding noise alone
    for (pname, got), want in zip(compiled.named_parameters(), eager.parameters()):
        assert_close(got.grad, want.grad, name=pname, terms=terms, scale=scale)
    return explained.graph_count


@pytest.mark.parametrize("name,tp,cp,backend", [
    ("tinylm", 2, 1, "inductor"), ("tinylm", 2, 2, "aot_eager"),
    ("llama", 2, 1, "aot_eager"), ("llama", 2, 2, "inductor")])
def test_compiled_model_equals_eager(name, tp, cp, backend):
    graphs = run_on_ranks(_compiled_equals_eager, tp * cp, name, tp, cp, backend, timeout=600)
    assert graphs == [1] * (tp * cp)


def _opcheck():
    group = mpu.initialize(tp=2).tp.group
    name = dist.distributed_c10d._get_process_group_name(group)
    g = torch.Generator().manual_seed(dist.get_rank())
    rows, weight = torch.randn(8, 16, generator=g), torch.randn(12, 16, generator=g)
    torch.library.opcheck(torch.ops.parallelkit.all_gather_matmul, (rows, weight, name, 1))
    torch.library.opcheck(torch.ops.parallelkit.matmul_reduce_scatter, (rows, weight, name, 2))
    q = torch.randn(1, 4, 8, 16, generator=g)
    k, v = torch.randn(1, 2, 8, 16, generator=g), torch.randn(1, 2, 8, 16, generator=g)
    args = (name, True, [0, 16], "zigzag", None)
    torch.library.opcheck(torch.ops.parallelkit.ring_attention_forward, (q, k, v, *args))
    out, lse = torch.ops.parallelkit.ring_attention_forward(q, k, v, *args)
    torch.library.opcheck(torch.ops.parallelkit.ring_attention_backward,
                          (q, k, v, out, lse, torch.randn_like(q), *args))


def test_custom_ops_pass_opcheck():
    run_on_ranks(_opcheck, 2, timeout=300)
