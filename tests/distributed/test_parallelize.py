"""parallelize() on existing models: logits, loss and every gradient equal the unconverted model."""

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from parallelkit import mpu
from parallelkit.context_parallel import (context_parallel_positions, gather_from_context_parallel,
                                          split_for_context_parallel)
from parallelkit.distributed import comm
from parallelkit.launch import RankFailure
from parallelkit.parallelize import parallelize
from parallelkit.testing import run_on_ranks
from parallelkit.models.tinylm import TinyConfig, TinyLM
from parallelkit.testing.tolerances import assert_close, gradient_scale, transformer_terms


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, attn_implementation="sdpa")
    return LlamaForCausalLM(config)


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=128, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        attn_implementation="sdpa")
    return GPT2LMHeadModel(config)


def hf(config_name, model_name, **extra):
    """A tiny transformers model of one family: hidden 64, 4 heads (2 KV heads where the family
    has GQA), 2 layers, vocab 128, no dropout, SDPA attention."""
    def build():
        import transformers

        config = getattr(transformers, config_name)(
            vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=256, attn_implementation="sdpa",
            **extra)
        return getattr(transformers, model_name)(config)
    return build


FAMILY_MODELS = {
    "mistral": hf("MistralConfig", "MistralForCausalLM", num_key_value_heads=2),
    "qwen2": hf("Qwen2Config", "Qwen2ForCausalLM", num_key_value_heads=2),
    "qwen3": hf("Qwen3Config", "Qwen3ForCausalLM", num_key_value_heads=2, head_dim=16),
    "gemma": hf("GemmaConfig", "GemmaForCausalLM", num_key_value_heads=2, head_dim=16),
    "phi3": hf("Phi3Config", "Phi3ForCausalLM", num_key_value_heads=2, pad_token_id=0),
    "gpt_neox": hf("GPTNeoXConfig", "GPTNeoXForCausalLM", hidden_dropout=0.0,
                   attention_dropout=0.0),
    # No family file: the structural plan, whose q/k norms over the whole projection become
    # parallel norms (their statistics span the TP ranks).
    "olmo2": hf("Olmo2Config", "Olmo2ForCausalLM", num_key_value_heads=2),
    # The structural plan; its attention views q with the head count it stores (made local).
    "stablelm": hf("StableLmConfig", "StableLmForCausalLM", num_key_value_heads=2,
                   hidden_dropout=0.0, attention_dropout=0.0),
}

# Fused projections split part by part: name suffix -> the parts' sizes (4 heads x 16, 2 KV heads).
FUSED_PARTS = {"attn.c_attn": [64, 64, 64], "self_attn.qkv_proj": [64, 32, 32],
               "mlp.gate_up_proj": [128, 128]}


def expected_shard(name, dense_grad, tp, rank, dim):
    """This rank's part of a dense gradient, worked out here from the layer's definition."""
    if dense_grad.dim() == 2 and name.startswith("transformer.h."):  # Conv1D: W is [in, out]
        dense_grad = dense_grad.t()
    parts = next((p for suffix, p in FUSED_PARTS.items() if name.rsplit(".", 1)[0].endswith(suffix)),
                 None)
    if parts is not None:  # each rank keeps its slice of every part (its heads of q, k and v)
        return torch.cat([part.chunk(tp, 0)[rank] for part in dense_grad.split(parts, 0)], 0)
    return dense_grad if dim is None else dense_grad.chunk(tp, dim)[rank]


def next_token_labels(ids, seq_dim):
    """labels[t] = ids[t + 1], the last position ignored: shifted before any CP split."""
    labels = ids.roll(-1, seq_dim)
    labels.select(seq_dim, ids.shape[seq_dim] - 1).fill_(-100)
    return labels


def MODELS_RUN_HF(m, ids, pos):
    return m(input_ids=ids, position_ids=pos).logits


# Per model: build it, run it on (ids, positions) -> logits, and where its sequence dim is.
MODELS = {
    "llama": (tiny_llama, lambda m, ids, pos: m(input_ids=ids, position_ids=pos).logits, 1),
    "gpt2": (tiny_gpt2, lambda m, ids, pos: m(input_ids=ids, position_ids=pos).logits, 1),
    "tinylm": (lambda: TinyLM(TinyConfig(vocab=128, layers=2)), lambda m, ids, pos: m(ids), 0),
    **{name: (build, MODELS_RUN_HF, 1) for name, build in FAMILY_MODELS.items()},
    "mixtral": (hf("MixtralConfig", "MixtralForCausalLM", num_key_value_heads=2,
                   num_local_experts=4), MODELS_RUN_HF, 1),
    "phi3_window16": (hf("Phi3Config", "Phi3ForCausalLM", num_key_value_heads=2, pad_token_id=0,
                         sliding_window=16), MODELS_RUN_HF, 1),
}


def _parity(name, tp, cp, options=None):
    state = mpu.initialize(tp=tp, cp=cp)
    build, run, seq_dim = MODELS[name]
    torch.manual_seed(0)
    dense = build()
    options = dict(options or {})
    if callable(options.get("plan")):
        options["plan"] = options["plan"](dense)
    model = parallelize(copy.deepcopy(dense), **options)
    g = torch.Generator().manual_seed(1)
    shape = (2, 16) if seq_dim == 1 else (16, 2)
    ids = torch.randint(0, 128, shape, generator=g)
    labels = next_token_labels(ids, seq_dim)
    positions = torch.arange(16).expand(2, 16) if seq_dim == 1 else None

    dense_logits = run(dense, ids, positions)
    dense_loss = F.cross_entropy(dense_logits.flatten(0, 1), labels.flatten(), reduction="sum")
    tokens = (labels != -100).sum()
    (dense_loss / tokens).backward()

    cp_rank = state.cp.rank

    def shard(t):
        return split_for_context_parallel(t, cp_rank, cp, dim=seq_dim)

    local_positions = None
    if positions is not None:
        local_positions = context_parallel_positions(16, cp_rank, cp).expand(2, -1)
    logits = run(model, shard(ids), local_positions)
    loss_sum = F.cross_entropy(logits.flatten(0, 1), shard(labels).flatten(), reduction="sum")
    (loss_sum / tokens).backward()
    # Each CP rank saw its tokens only: its gradients and loss are partial sums over CP.
    for p in model.parameters():
        p.grad = comm.all_reduce(p.grad, state.cp.group)
    # The models are float32 with hidden 64, ffn <= 256, vocab 128, 2 layers over 16 x 2 tokens.
    terms = transformer_terms(tokens=32, seq=16, hidden=64, ffn=256, vocab=128, layers=2)
    assert_close(comm.all_reduce(loss_sum.detach(), state.cp.group), dense_loss.detach(),
                 name="loss", terms=terms)
    assert_close(gather_from_context_parallel(logits.detach(), state.cp.group, dim=seq_dim),
                 dense_logits.detach(), name="logits", terms=terms)

    dense_params = dict(dense.named_parameters())
    scale = gradient_scale(dense)
    for pname, param in model.named_parameters():
        ref = expected_shard(pname, dense_params[pname].grad, tp, state.tp.rank,
                             getattr(param, "tp_shard_dim", None))
        assert_close(param.grad, ref, name=pname, terms=terms, scale=scale)
    paths = set().union(*(m.calls_by_path for m in model.modules() if hasattr(m, "calls_by_path")))
    return sorted(type(m).__name__ for m in model.modules()), paths


@pytest.mark.parametrize("name, tp, cp", [("llama", 2, 1), ("llama", 2, 2), ("gpt2", 2, 1),
                                          ("gpt2", 2, 2), ("gpt2", 4, 1), ("tinylm", 2, 1),
                                          ("tinylm", 2, 2), ("tinylm", 4, 1)])
def test_converted_model_matches_dense(name, tp, cp):
    modules, paths = run_on_ranks(_parity, 4, name, tp, cp, timeout=180)[0]
    assert "ColumnParallelLinear" in modules and "VocabParallelEmbedding" in modules
    assert ("ContextParallelAttention" in modules) == (cp > 1 and name == "tinylm")
    assert "fused matmul_reduce_scatter" in paths  # the defaults: SP with the fused ring matmuls


def readme_plan():
    """The README's hand-written plan for a Llama-like model."""
    from parallelkit.parallel_styles import (ColwiseParallel, LMHead, ParallelRegion,
                                             RowwiseParallel, SequenceParallelEntry,
                                             SequenceParallelNorm, VocabParallel)
    return {
        "model.embed_tokens": VocabParallel(),
        "model.layers.0": SequenceParallelEntry(),
        "model.layers.*.*_layernorm": SequenceParallelNorm(),
        "model.layers.*.self_attn": ParallelRegion(),
        "model.layers.*.self_attn.[qkv]_proj": ColwiseParallel(),
        "model.layers.*.self_attn.o_proj": RowwiseParallel(),
        "model.layers.*.mlp": ParallelRegion(),
        "model.layers.*.mlp.[gu]*_proj": ColwiseParallel(),
        "model.layers.*.mlp.down_proj": RowwiseParallel(),
        "model.norm": SequenceParallelNorm(),
        "lm_head": LMHead(),
    }


# Each option set, and the paths its TP layers must have taken (no silent fallback).
OPTIONS = {
    "defaults": ({}, {"fused all_gather_matmul shared by the region",
                      "fused matmul_reduce_scatter"}),
    "sp": ({"overlap_comm": False}, {"all-gather then matmul shared by the region",
                                     "matmul then reduce-scatter"}),
    "no-sp": ({"sequence_parallel": False}, {"matmul (all-reduce in backward)",
                                             "matmul then all-reduce"}),
}


@pytest.mark.parametrize("cp, options", [(1, "defaults"), (2, "defaults"), (1, "no-sp"),
                                         (2, "sp")])
@pytest.mark.parametrize("name", sorted(FAMILY_MODELS))
def test_every_family_matches_dense(name, cp, options):
    """Each family at tp=2 with and without CP, sequence parallelism and the fused overlap."""
    kwargs, expected_paths = OPTIONS[options]
    if name == "stablelm" and cp > 1:  # its attention does not use the attention interface
        with pytest.raises(RankFailure, match=r"cp=2 but no attention of StableLmForCausalLM was "
                                              r"made context-parallel"):
            run_on_ranks(_parity, 4, name, 2, cp, kwargs, timeout=180)
        return
    modules, paths = run_on_ranks(_parity, 4, name, 2, cp, kwargs, timeout=180)[0]
    assert expected_paths <= paths
    if name == "olmo2":
        assert modules.count("ParallelRMSNorm") == 4  # q and k norms of 2 layers


@pytest.mark.parametrize("cp", [1, 2])
def test_a_hand_written_plan_matches_dense(cp):
    _, paths = run_on_ranks(_parity, 4, "mistral", 2, cp, {"plan": readme_plan()}, timeout=180)[0]
    assert OPTIONS["defaults"][1] <= paths


def structural_only(model):
    """The structural plan alone: it leaves Mixtral's MoE block (router, 3-D experts) unplaced
    (its family plan makes the experts expert-parallel: tests/distributed/test_moe_models.py)."""
    from parallelkit.models.decoder import structural_plan

    return structural_plan(model)


def moe_plan(model):
    """The structural plan, with the experts block marked as acting on each token alone."""
    from parallelkit.parallel_styles import Replicated

    return {**structural_only(model), "model.layers.*.mlp": Replicated()}


def _mixture_of_experts_guards():
    mpu.initialize(tp=2)
    build = MODELS["mixtral"][0]
    # The experts block has no style: under SP its gradients would be partial over TP.
    with pytest.warns(UserWarning, match=r"sequence parallelism is off, because the plan places "
                                         r"no style on model.layers.0.mlp.gate.weight"):
        model = build()
        model = parallelize(model, plan=structural_only(model))
    assert not model.model.layers[0].self_attn.q_proj.sequence_parallel
    with pytest.raises(ValueError, match=r"sequence_parallel=True, but the plan for "
                                         r"MixtralForCausalLM places no style on "
                                         r"model.layers.0.mlp.gate.weight, "):
        model = build()
        parallelize(model, plan=structural_only(model), sequence_parallel=True)


def test_a_mixture_of_experts_is_never_partial():
    """Mixtral under a plan without a style for its experts: sequence parallelism stays off (and
    matches the dense model); with Replicated() on them it is on and matches too."""
    run_on_ranks(_mixture_of_experts_guards, 4, timeout=120)
    run_on_ranks(_parity, 4, "mixtral", 2, 1, {"plan": structural_only}, timeout=180)
    _, paths = run_on_ranks(_parity, 4, "mixtral", 2, 2, {"plan": moe_plan}, timeout=180)[0]
    assert OPTIONS["defaults"][1] <= paths


def _bad_plans():
    mpu.initialize(tp=4)
    with pytest.raises(ValueError, match=r"has 3 attention heads, not divisible by tp=4"):
        parallelize(TinyLM(TinyConfig(heads=3, hidden=24)))
    with pytest.raises(ValueError, match=r"LlamaForCausalLM has 2 key/value heads, not divisible "
                                         r"by tp=4"):
        parallelize(tiny_llama())
    with pytest.raises(ValueError, match=r"no built-in plan for Sequential; pass plan="):
        parallelize(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    with pytest.raises(ValueError, match=r"unknown parallel style\(s\) \['diagonal'\]"):
        parallelize(torch.nn.Sequential(torch.nn.Linear(4, 4)), {"0": "diagonal"})
    with pytest.raises(ValueError, match=r"plan pattern\(s\) \['1'\] matched no module"):
        parallelize(torch.nn.Sequential(torch.nn.Linear(4, 4)), {"0": "colwise", "1": "rowwise"})
    with pytest.raises(ValueError, match=r"out_features=6 is not divisible"):
        parallelize(torch.nn.Sequential(torch.nn.Linear(4, 6)), {"0": "colwise"})
    model = parallelize(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 4)),
                        {"0": "colwise", "1": "rowwise"})
    return [type(m).__name__ for m in model]


def test_user_plans_and_bad_sizes():
    assert run_on_ranks(_bad_plans, 4)[0] == ["ColumnParallelLinear", "RowParallelLinear"]


def _forward_raises(config_name, model_name, extra, match):
    state = mpu.initialize(tp=2, cp=2)
    import transformers

    config = getattr(transformers, config_name)(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **extra)
    with pytest.raises(ValueError, match=match):  # at conversion or at the first forward
        model = parallelize(getattr(transformers, model_name)(config))
        ids = split_for_context_parallel(torch.zeros(2, 16, dtype=torch.long), state.cp.rank, 2,
                                         dim=1)
        model(input_ids=ids, position_ids=context_parallel_positions(16, state.cp.rank, 2).expand(
            2, -1))


def test_attention_options_ring_attention_lacks_are_refused():
    """Under cp > 1 an attention option that changes the result and that ring attention does not
    implement raises, naming it (a window shorter than the sequence at the call; Gemma-2's
    soft-capping from its config, at conversion)."""
    run_on_ranks(_forward_raises, 4, "Phi3Config", "Phi3ForCausalLM",
                 dict(pad_token_id=0, sliding_window=15, attn_implementation="sdpa"),
                 r"Phi3Attention uses a sliding window of 15 tokens, shorter than the sequence "
                 r"\(16 tokens")
    run_on_ranks(_forward_raises, 4, "Gemma2Config", "Gemma2ForCausalLM",
                 dict(head_dim=16, attn_logit_softcapping=50.0, attn_implementation="eager"),
                 r"Gemma2ForCausalLM uses attention logit soft-capping .* \(attn_logit_softcapping"
                 r"=50.0\), .* use cp=1")


def test_a_window_as_long_as_the_sequence_matches_dense():
    """A sliding window that covers the whole (CP-split) sequence masks nothing: it is allowed."""
    run_on_ranks(_parity, 4, "phi3_window16", 2, 2, timeout=180)


def _loss_parallel(name, cp):
    """model(ids, labels=...) on vocab shards (the loss transformers would compute on full
    logits), and every gradient, against the dense model; without labels the logits are whole."""
    state = mpu.initialize(tp=2, cp=cp)
    build = MODELS[name][0]
    torch.manual_seed(0)
    dense = build().double()
    model = parallelize(copy.deepcopy(dense))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (2, 16), generator=g)
    dense_loss = dense(input_ids=ids, labels=ids).loss
    dense_loss.backward()
    shift = next_token_labels(ids, 1)  # what transformers' loss compares position t with
    local = split_for_context_parallel(ids, state.cp.rank, cp, dim=1)
    positions = context_parallel_positions(16, state.cp.rank, cp).expand(2, -1)
    local_shift = split_for_context_parallel(shift, state.cp.rank, cp, dim=1)
    out = model(input_ids=local, position_ids=positions, shift_labels=local_shift,
                labels=local_shift)
    assert out.logits.shape[-1] == 128 // 2  # the shard: the full logits never existed
    # The loss is a mean over this rank's tokens: weight it by their count to sum over CP.
    count = (local_shift != -100).sum()
    total = comm.all_reduce(out.loss.detach() * count, state.cp.group) / (shift != -100).sum()
    # transformers computes its loss in float32 (it upcasts the logits to float), ours in float64.
    assert_close(total, dense_loss.detach().double(), dtype=torch.float32, name="loss",
                 terms=128 + 32)
    (out.loss * count / (shift != -100).sum()).backward()
    for p in model.parameters():
        p.grad = comm.all_reduce(p.grad, state.cp.group)
    scale = gradient_scale(dense)
    dense_params = dict(dense.named_parameters())
    for pname, param in model.named_parameters():
        ref = expected_shard(pname, dense_params[pname].grad, 2, state.tp.rank,
                             getattr(param, "tp_shard_dim", None))
        # the dense gradients went through transformers' float32 loss too
        assert_close(param.grad, ref, dtype=torch.float32, name=pname, scale=scale,
                     terms=transformer_terms(32, 16, 64, 128, 128, 2))
    assert model(input_ids=local, position_ids=positions).logits.shape[-1] == 128


@pytest.mark.parametrize("name, cp", [("llama", 1), ("llama", 2), ("gpt2", 1), ("gpt2", 2),
                                      ("qwen3", 2), *((n, 1) for n in sorted(FAMILY_MODELS))])
def test_loss_parallel_matches_the_dense_loss(name, cp):
    run_on_ranks(_loss_parallel, 4, name, cp, timeout=180)


class _DoubledEmbedding(torch.nn.Embedding):
    def forward(self, ids):
        return 2 * super().forward(ids)


def _guards():
    mpu.initialize(tp=2, cp=2)
    # Gemma's embedding multiplies by sqrt(hidden): kept (8 = sqrt(64)).
    gemma = parallelize(FAMILY_MODELS["gemma"](), sequence_parallel=False)
    assert float(gemma.get_input_embeddings().embed_scale) == 8.0
    # A subclass whose forward differs is refused, naming it.
    llama = tiny_llama()
    llama.model.embed_tokens = _DoubledEmbedding(128, 64)
    with pytest.raises(TypeError, match=r"_DoubledEmbedding is an nn.Embedding subclass"):
        parallelize(llama)
    # cp > 1 and a model whose attention cannot be made context-parallel.
    with pytest.raises(ValueError, match=r"cp=2 but no attention of Sequential was made "
                                         r"context-parallel"):
        parallelize(torch.nn.Sequential(torch.nn.Linear(4, 4)), {"0": "colwise"})
    # A user plan on a transformers model still gets context-parallel attention.
    qwen = parallelize(FAMILY_MODELS["qwen2"](),
                       {"model.layers.*.self_attn.[qkv]_proj": "colwise",
                        "model.layers.*.self_attn.o_proj": "rowwise"})
    assert qwen.config._attn_implementation.startswith("parallelkit_cp_")
    # Padding cannot be honoured under CP.
    ids = torch.zeros(1, 8, dtype=torch.long)
    mask = torch.ones(1, 8, dtype=torch.long)
    mask[0, :2] = 0
    with pytest.raises(ValueError, match=r"attention_mask with padding cannot be honoured"):
        qwen(input_ids=ids, attention_mask=mask)


def test_guards_refuse_what_would_differ():
    run_on_ranks(_guards, 4, timeout=120)


def _sequence_parallel_guards():
    mpu.initialize(tp=2)
    # Sequence parallelism needs a plan that says where the split starts.
    with pytest.raises(ValueError, match=r"sequence_parallel=True, but the plan for "
                                         r"LlamaForCausalLM has no SequenceParallelEntry"):
        parallelize(tiny_llama(), {"model.layers.*.mlp.up_proj": "colwise"},
                    sequence_parallel=True)
    # Under sequence parallelism each rank holds part of the positions: "the last ones" are not.
    llama = parallelize(tiny_llama())
    with pytest.raises(ValueError, match=r"logits_to_keep=1 \(generation\) under sequence "
                                         r"parallelism"):
        llama(input_ids=torch.zeros(1, 8, dtype=torch.long), logits_to_keep=1)
    # A region's column layer fed anything but the region's gathered input.
    mlp = llama.model.layers[0].mlp
    mlp.up_proj.forward = lambda x, layer=mlp.up_proj: type(layer).forward(layer, 2 * x)
    with pytest.raises(RuntimeError, match=r"ColumnParallelLinear belongs to a sequence-parallel "
                                           r"region and must be called with the region's input"):
        llama(input_ids=torch.zeros(1, 8, dtype=torch.long))


def test_sequence_parallel_guards():
    run_on_ranks(_sequence_parallel_guards, 4, timeout=120)
