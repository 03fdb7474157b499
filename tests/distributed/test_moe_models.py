"""transformers mixture-of-experts models (Mixtral, Qwen2-MoE with its shared expert, Qwen3-MoE)
converted by parallelize() with expert parallelism and trained 3 steps next to the unconverted
model: the loss of every step, and every parameter after the last, equal the dense model's."""

import copy

import pytest
import torch
import torch.distributed as dist

from parallelkit import mpu
from parallelkit.distributed import comm
from parallelkit.parallelize import parallelize
from parallelkit.testing import run_on_ranks
from parallelkit.testing.tolerances import assert_close, transformer_terms


def tiny(config_name, model_name, **extra):
    def build():
        import transformers

        config = getattr(transformers, config_name)(
            vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            attn_implementation="sdpa", experts_implementation="eager", num_experts_per_tok=2,
            **extra)
        return getattr(transformers, model_name)(config)
    return build


MODELS = {
    "mixtral": tiny("MixtralConfig", "MixtralForCausalLM", num_local_experts=4),
    "qwen2_moe": tiny("Qwen2MoeConfig", "Qwen2MoeForCausalLM", num_experts=4,
                      moe_intermediate_size=32, shared_expert_intermediate_size=48),
    "qwen3_moe": tiny("Qwen3MoeConfig", "Qwen3MoeForCausalLM", num_experts=4,
                      moe_intermediate_size=32, head_dim=16),
}
STEPS, LR = 3, 0.5


def sync_gradients(model, state):
    """What data parallelism does to the gradients: the mean over the dense DP x CP ranks; an
    expert's gradient already sums its tokens over the EP group, so over the expert-DP ranks it
    is summed and divided by the dense DP x CP size (Megatron's scaling)."""
    dp = state.dp_cp.size
    for p in model.parameters():
        group = state.expert_dp.group if getattr(p, "expert_parallel", False) else \
            state.dp_cp.group
        p.grad = comm.all_reduce(p.grad, group) / dp


def _train(name, tp, ep):
    state = mpu.initialize(tp=tp, ep=ep)
    torch.manual_seed(0)
    dense = MODELS[name]().double()
    model = parallelize(copy.deepcopy(dense))
    assert any(type(m).__name__ == "ExpertParallelExperts" for m in model.modules())
    g = torch.Generator().manual_seed(1)
    dp, dp_rank = state.dp.size, state.dp.rank
    batches = [torch.randint(0, 128, (dp, 16), generator=g) for _ in range(STEPS)]
    terms = transformer_terms(tokens=16 * dp, seq=16, hidden=64, ffn=128, vocab=128, layers=2)
    for step, ids in enumerate(batches):
        dense_loss = dense(input_ids=ids, labels=ids).loss
        dense_loss.backward()
        mine = ids[dp_rank:dp_rank + 1]  # each DP rank: its sample
        loss = model(input_ids=mine, labels=mine).loss
        loss.backward()
        sync_gradients(model, state)
        # Every DP rank's sample has as many tokens: the mean of their means is the loss.
        total = comm.all_reduce(loss.detach(), state.dp.group) / dp
        assert_close(total, dense_loss.detach(), dtype=torch.float32, name=f"loss {step}",
                     terms=terms)
        with torch.no_grad():
            for module in (dense, model):
                for p in module.parameters():
                    p -= LR * p.grad
                    p.grad = None
    _compare_parameters(dense, model, state, terms)


def _compare_parameters(dense, model, state, terms):
    """Each converted parameter against its slice of the dense one."""
    dense_params = dict(dense.named_parameters())
    for pname, param in model.named_parameters():
        full = dense_params[pname].detach()
        if getattr(param, "expert_parallel", False):
            experts = next(m for n, m in model.named_modules() if pname.startswith(n + ".")
                           and type(m).__name__ == "ExpertParallelExperts")
            want = _expert_slice(experts, pname.rsplit(".", 1)[-1], full)
        else:
            dim = getattr(param, "tp_shard_dim", None)
            want = full if dim is None else full.chunk(state.tp.size, dim)[state.tp.rank]
        # float32 losses (transformers upcasts the logits) steer three float64 SGD steps
        assert_close(param.detach(), want, dtype=torch.float32, name=pname, terms=terms,
                     scale=full.abs().max().item())


def _expert_slice(experts, which, full):
    mine = slice(experts.first_expert, experts.first_expert + experts.local_experts)
    shard = experts.intermediate // experts.etp
    r = dist.get_rank(experts.etp_group)
    cols = slice(r * shard, (r + 1) * shard)
    if which == "gate_up_proj":
        gate, up = full[mine].split(experts.intermediate, dim=1)
        return torch.cat([gate[:, cols], up[:, cols]], 1)
    return full[mine][:, :, cols]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_moe_model_trains_like_the_dense_model(name):
    run_on_ranks(_train, 4, name, 2, 2, timeout=240)


def test_expert_parallel_without_tensor_parallel():
    run_on_ranks(_train, 4, "mixtral", 1, 4, timeout=240)


def _needs_sequence_parallel():
    mpu.initialize(tp=2, ep=2)
    with pytest.raises(ValueError, match=r"need sequence parallelism .* sequence_parallel=True"):
        parallelize(MODELS["mixtral"](), sequence_parallel=False)


def test_moe_at_tp2_needs_sequence_parallelism():
    run_on_ranks(_needs_sequence_parallel, 4)
