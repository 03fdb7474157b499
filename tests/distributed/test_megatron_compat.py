"""Megatron-style code on parallelkit.compat.megatron, on 8 gloo ranks: a Column -> Row MLP and
the embedding + vocab-parallel loss against the dense float64 computation (outputs and every
gradient), every parallel_state getter against the MPU and Megatron's semantics, and the errors."""

import functools

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from parallelkit import mpu
from parallelkit.compat.megatron import ModelParallelConfig, parallel_state, tensor_parallel
from parallelkit.distributed.rank_groups import rank_groups
from parallelkit.tensor_parallel import random as pk_random
from parallelkit.testing import run_on_ranks
from parallelkit.testing.tolerances import assert_close

SEED, S, B, H, FFN, VOCAB = 1234, 8, 2, 16, 32, 64
TERMS = S * B + H + FFN + VOCAB  # the longest chain of sums any compared value went through


def init_method_normal(sigma):  # megatron.core.utils.init_method_normal
    return functools.partial(torch.nn.init.normal_, mean=0.0, std=sigma)


def dense_weights(init, *shapes):
    """The full weights a seeded Megatron CPU initialisation draws, in order (float32 masters,
    as float64 leaves)."""
    torch.manual_seed(SEED)
    weights = []
    for shape in shapes:
        master = torch.empty(shape)
        init(master)
        weights.append(master.double().requires_grad_())
    return weights


def data(*shapes, high=None):
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, high, shape, generator=g) if high else
            torch.randn(shape, generator=g, dtype=torch.float64) for shape in shapes]


def _mlp(sequence_parallel):
    # Written as a Megatron-core user writes it (only the import differs).
    parallel_state.initialize_model_parallel(2, 2)
    torch.manual_seed(SEED)
    tensor_parallel.model_parallel_cuda_manual_seed(SEED)
    config = ModelParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
                                 sequence_parallel=sequence_parallel, params_dtype=torch.float64,
                                 use_cpu_initialization=True)
    init = init_method_normal(0.1)
    fc1 = tensor_parallel.ColumnParallelLinear(H, FFN, config=config, init_method=init,
                                               bias=True, gather_output=False, skip_bias_add=True)
    fc2 = tensor_parallel.RowParallelLinear(FFN, H, config=config, init_method=init, bias=True,
                                            input_is_parallel=True, skip_bias_add=False)
    x_full, g_full = data((S, B, H), (S, B, H))
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_group = parallel_state.get_tensor_model_parallel_group()
    local = (lambda t: t.chunk(2)[tp_rank]) if sequence_parallel else (lambda t: t)
    x = local(x_full).clone().requires_grad_()
    h, bias = fc1(x)
    y, no_bias = fc2(F.gelu(h + bias))
    (y * local(g_full)).sum().backward()
    if sequence_parallel:  # Megatron's finalize_model_grads sums these over TP
        dist.all_reduce(fc2.bias.grad, group=tp_group)

    w1, w2 = dense_weights(init, (FFN, H), (H, FFN))
    b1, b2 = torch.zeros(FFN, dtype=torch.float64, requires_grad=True), \
        torch.zeros(H, dtype=torch.float64, requires_grad=True)
    xd = x_full.clone().requires_grad_()
    yd = F.linear(F.gelu(F.linear(xd, w1, b1)), w2, b2)
    (yd * g_full).sum().backward()

    assert bias is fc1.bias and no_bias is None
    # One seed, one model: each rank holds exactly its shard of the dense weights.
    assert torch.equal(fc1.weight, w1.detach().chunk(2, 0)[tp_rank])
    assert torch.equal(fc2.weight, w2.detach().chunk(2, 1)[tp_rank])
    assert (fc1.weight.partition_dim, fc2.weight.partition_dim) == (0, 1)
    assert fc1.bias.tensor_model_parallel and fc2.bias.sequence_parallel == sequence_parallel
    assert_close(y, local(yd), name="output", terms=TERMS)
    for name, actual, expected in [
            ("x", x.grad, local(xd.grad)), ("fc1.weight", fc1.weight.grad, w1.grad.chunk(2, 0)),
            ("fc1.bias", fc1.bias.grad, b1.grad.chunk(2)), ("fc2.bias", fc2.bias.grad, b2.grad),
            ("fc2.weight", fc2.weight.grad, w2.grad.chunk(2, 1))]:
        expected = expected[tp_rank] if isinstance(expected, tuple) else expected
        assert_close(actual, expected, name=name, terms=TERMS)

    # runtime_gather_output, and a tied layer that takes its weight at the call.
    with torch.no_grad():
        gathered, _ = fc1(x, runtime_gather_output=True)
        assert_close(gathered, F.linear(x_full, w1), name="gathered", terms=TERMS)
        tied = tensor_parallel.ColumnParallelLinear(H, FFN, config=config, init_method=init,
                                                    bias=False, skip_weight_param_allocation=True)
        assert tied.weight is None
        assert torch.equal(tied(x, weight=fc1.weight)[0], fc1(x)[0])
        with pytest.raises(ValueError, match=r"no weight of its own: pass weight="):
            tied(x)
        with pytest.raises(ValueError, match=r"supplied weight has shape \(16, 32\), expected"):
            tied(x, weight=torch.zeros(H, FFN, dtype=torch.float64))

    # Dropout streams: the TP stream differs between TP ranks, the default one does not.
    tracker = tensor_parallel.get_cuda_rng_tracker()
    with tracker.fork():
        sharded = torch.rand(4, device=tracker.device_type)
    replicated = torch.rand(4, device=tracker.device_type)
    for draw, same in ((sharded, False), (replicated, True)):
        both = [torch.empty_like(draw) for _ in range(2)]
        dist.all_gather(both, draw, group=tp_group)
        assert torch.equal(*both) == same


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_megatron_mlp_matches_dense(sequence_parallel):
    run_on_ranks(_mlp, 8, sequence_parallel)


def _embedding_and_loss(reduce_scatter_embeddings, label_smoothing):
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    torch.manual_seed(SEED)
    config = ModelParallelConfig(tensor_model_parallel_size=2, params_dtype=torch.float64,
                                 sequence_parallel=reduce_scatter_embeddings,
                                 use_cpu_initialization=True)
    init = init_method_normal(1.0)
    embedding = tensor_parallel.VocabParallelEmbedding(
        VOCAB, H, init_method=init, reduce_scatter_embeddings=reduce_scatter_embeddings,
        config=config)
    head = tensor_parallel.ColumnParallelLinear(H, VOCAB, config=config, init_method=init,
                                                bias=False, gather_output=False)
    ids, targets = data((B, S), (S, B), high=VOCAB)
    hidden = embedding(ids)            # [b, s, h], or [s/tp, b, h] reduce-scattered
    if not reduce_scatter_embeddings:
        hidden = hidden.transpose(0, 1).contiguous()
    logits, _ = head(hidden)           # [s, b, V/tp]
    loss = tensor_parallel.vocab_parallel_cross_entropy(logits, targets, label_smoothing)
    loss.sum().backward()

    table, w_head = dense_weights(init, (VOCAB, H), (VOCAB, H))
    hidden_d = F.embedding(ids, table).transpose(0, 1)
    loss_d = F.cross_entropy(F.linear(hidden_d, w_head).reshape(-1, VOCAB), targets.reshape(-1),
                             reduction="none", label_smoothing=label_smoothing).view(S, B)
    loss_d.sum().backward()

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    assert torch.equal(embedding.weight, table.detach().chunk(2)[tp_rank])
    assert (embedding.vocab_start_index, embedding.vocab_end_index) == \
        (tp_rank * VOCAB // 2, (tp_rank + 1) * VOCAB // 2)
    expected_hidden = hidden_d.chunk(2)[tp_rank] if reduce_scatter_embeddings else hidden_d
    assert_close(hidden, expected_hidden, name="hidden", terms=TERMS)
    assert loss.shape == (S, B)
    assert_close(loss, loss_d, name="loss", terms=TERMS)
    assert_close(embedding.weight.grad, table.grad.chunk(2)[tp_rank], name="table", terms=TERMS)
    assert_close(head.weight.grad, w_head.grad.chunk(2)[tp_rank], name="head", terms=TERMS)


@pytest.mark.parametrize("reduce_scatter_embeddings, label_smoothing", [(False, 0.0), (True, 0.1)])
def test_embedding_and_vocab_parallel_loss_match_dense(reduce_scatter_embeddings,
                                                       label_smoothing):
    run_on_ranks(_embedding_and_loss, 8, reduce_scatter_embeddings, label_smoothing)


def _mine(groups, kind):
    return next(g for g in groups[kind] if dist.get_rank() in g)


def _check_family(state, groups, kind, group, rank, size):
    ranks = _mine(groups, kind)
    assert group() is state.info(kind).group, kind
    assert (rank(), size()) == (ranks.index(dist.get_rank()), len(ranks)), kind


def _getters():
    ps, rank = parallel_state, dist.get_rank()
    ps.initialize_model_parallel(tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
                                 virtual_pipeline_model_parallel_size=2, context_parallel_size=2)
    state, groups = mpu.current(), rank_groups(8, tp=2, pp=2, cp=2)
    assert ps.model_parallel_is_initialized() and ps.is_initialized()
    for kind, prefix in [("tp", "tensor_model"), ("pp", "pipeline_model"), ("cp", "context"),
                         ("tp_cp", "tensor_and_context")]:
        _check_family(state, groups, kind, getattr(ps, f"get_{prefix}_parallel_group"),
                      getattr(ps, f"get_{prefix}_parallel_rank"),
                      getattr(ps, f"get_{prefix}_parallel_world_size"))
    assert ps.get_model_parallel_group() is state.mp.group
    assert ps.get_tensor_model_parallel_src_rank() == _mine(groups, "tp")[0]
    assert ps.get_model_parallel_src_rank() == _mine(groups, "mp")[0]
    assert ps.get_context_parallel_global_ranks() == _mine(groups, "cp")
    # dp = 1 here; with the context-parallel ranks the gradient group has 2.
    assert ps.get_data_parallel_group() is state.dp.group
    assert ps.get_data_parallel_group(with_context_parallel=True) is state.dp_cp.group
    assert (ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()) == (1, 0)
    dp_cp = _mine(groups, "dp_cp")
    assert ps.get_data_parallel_world_size(with_context_parallel=True) == 2
    assert ps.get_data_parallel_rank(with_context_parallel=True) == dp_cp.index(rank)
    assert ps.get_data_parallel_src_rank(with_context_parallel=True) == dp_cp[0]
    pp = _mine(groups, "pp")
    stage = pp.index(rank)
    assert (ps.get_pipeline_model_parallel_first_rank(),
            ps.get_pipeline_model_parallel_last_rank(),
            ps.get_pipeline_model_parallel_next_rank(),
            ps.get_pipeline_model_parallel_prev_rank()) == (pp[0], pp[1], pp[1 - stage],
                                                             pp[1 - stage])
    # Two model chunks per stage: only chunk 0 of stage 0 is first, chunk 1 of stage 1 last.
    first, last = stage == 0, stage == 1
    assert ps.get_virtual_pipeline_model_parallel_world_size() == 2
    assert ps.get_virtual_pipeline_model_parallel_rank() == 0
    assert (ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()) == (first, False)
    assert ps.is_pipeline_last_stage(ignore_virtual=True) == last
    assert (ps.is_pipeline_first_stage(vp_stage=1), ps.is_pipeline_last_stage(vp_stage=1)) == \
        (False, last)
    assert ps.is_rank_in_embedding_group(vp_stage=0) == first
    ps.set_virtual_pipeline_model_parallel_rank(1)
    assert (ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()) == (False, last)
    assert ps.is_pipeline_first_stage(ignore_virtual=True) == first
    assert ps.is_rank_in_embedding_group() == last
    assert ps.is_rank_in_embedding_group(ignore_virtual=True)
    assert ps.get_embedding_group() is state.embedding.group
    with pytest.raises(ValueError, match=r"vp_stage=2 must be a model chunk index in \[0, 2\)"):
        ps.is_pipeline_first_stage(vp_stage=2)

    # A new layout forgets the virtual rank; middle stages hold no embedding.
    ps.destroy_model_parallel()
    assert not ps.model_parallel_is_initialized()
    ps.initialize_model_parallel(2, 4, virtual_pipeline_model_parallel_size=2)
    assert ps.get_virtual_pipeline_model_parallel_rank() == 0
    middle = ps.get_pipeline_model_parallel_rank() in (1, 2)
    assert ps.is_rank_in_embedding_group(ignore_virtual=True) == (not middle)
    assert (ps.get_embedding_group(check_initialized=False) is None) == middle
    if middle:
        with pytest.raises(ValueError, match="holds no embedding"):
            ps.get_embedding_group()


def _expert_getters():
    ps = parallel_state
    ps.initialize_model_parallel(tensor_model_parallel_size=2, expert_model_parallel_size=2)
    state, groups = mpu.current(), rank_groups(8, tp=2, ep=2)
    for kind, prefix in [("ep", "expert_model"), ("expert_tp", "expert_tensor"),
                         ("expert_tp_ep", "expert_tensor_and_model"), ("expert_dp", "expert_data")]:
        _check_family(state, groups, kind, getattr(ps, f"get_{prefix}_parallel_group"),
                      getattr(ps, f"get_{prefix}_parallel_rank"),
                      getattr(ps, f"get_{prefix}_parallel_world_size"))
    assert (ps.get_expert_model_parallel_world_size(), ps.get_expert_tensor_parallel_world_size(),
            ps.get_expert_data_parallel_world_size()) == (2, 2, 2)
    assert ps.get_expert_tensor_model_pipeline_parallel_group() is state.expert_tp_ep_pp.group
    assert ps.get_expert_model_parallel_src_rank() == _mine(groups, "ep")[0]
    # Megatron's expert stream: seed + 1024 + 100 * ep_rank + expert_tp_rank.
    tensor_parallel.model_parallel_cuda_manual_seed(7)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    with tracker.fork(tensor_parallel.get_expert_parallel_rng_tracker_name()):
        drawn = torch.rand(3, device=tracker.device_type)
    seed = 7 + 1024 + 100 * ps.get_expert_model_parallel_rank() \
        + ps.get_expert_tensor_parallel_rank()
    generator = torch.Generator(tracker.device_type).manual_seed(seed)
    assert torch.equal(drawn, torch.rand(3, generator=generator, device=tracker.device_type))


def test_getters_follow_the_mpu_and_megatron():
    run_on_ranks(_getters, 8)
    run_on_ranks(_expert_getters, 8)


def _mappings_and_checkpoint():
    parallel_state.initialize_model_parallel(2)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    full = torch.arange(24, dtype=torch.float64).reshape(4, 3, 2)   # the same on every rank
    mine = full.chunk(2, -1)[tp_rank].clone().requires_grad_()
    gathered = tensor_parallel.all_gather_last_dim_from_tensor_parallel_region(mine)
    assert torch.equal(gathered, full)
    (gathered * (tp_rank + 1)).sum().backward()        # the backward sums over TP: 1 + 2
    assert torch.equal(mine.grad, torch.full_like(mine, 3.0))
    assert torch.equal(tensor_parallel.gather_from_tensor_model_parallel_region(mine), full)
    assert torch.equal(tensor_parallel.scatter_to_sequence_parallel_region(full),
                       full.chunk(2)[tp_rank])
    assert torch.equal(tensor_parallel.reduce_scatter_to_sequence_parallel_region(full),
                       2 * full.chunk(2)[tp_rank])
    assert torch.equal(tensor_parallel.gather_from_sequence_parallel_region(
        full.chunk(2)[tp_rank]), full)
    with pytest.raises(NotImplementedError, match="uneven split sizes"):
        tensor_parallel.gather_from_sequence_parallel_region(full, output_split_sizes=[1, 3])
    # checkpoint recomputes in backward: same gradient as without.
    x = full.clone().requires_grad_()
    tensor_parallel.checkpoint(lambda t: F.gelu(t).square(), False, x).sum().backward()
    y = full.clone().requires_grad_()
    F.gelu(y).square().sum().backward()
    assert torch.equal(x.grad, y.grad)


def test_mappings_and_checkpoint():
    run_on_ranks(_mappings_and_checkpoint, 8)


def _errors():
    ps = parallel_state
    assert not ps.model_parallel_is_initialized()
    for getter in (ps.get_tensor_model_parallel_group, ps.get_tensor_model_parallel_rank,
                   ps.get_data_parallel_world_size, ps.get_expert_model_parallel_rank,
                   ps.is_pipeline_first_stage, tensor_parallel.model_parallel_cuda_manual_seed):
        with pytest.raises(ValueError, match=r"not initialized: call "
                                             r"parallel_state.initialize_model_parallel"):
            getter(0) if getter is tensor_parallel.model_parallel_cuda_manual_seed else getter()
    assert ps.get_tensor_model_parallel_group(check_initialized=False) is None
    assert ps.get_virtual_pipeline_model_parallel_rank() is None
    with pytest.raises(NotImplementedError, match=r"use_sharp=True\) is not supported"):
        ps.initialize_model_parallel(2, use_sharp=True)
    assert not ps.model_parallel_is_initialized()

    ps.initialize_model_parallel(2)
    config = ModelParallelConfig(use_cpu_initialization=True)
    for changes, error, message in [
            (dict(stride=3), NotImplementedError, r"stride=3.*ColwiseParallel\(parts="),
            (dict(is_expert=True), NotImplementedError, r"moe.MoELayer"),
            (dict(config=ModelParallelConfig(gradient_accumulation_fusion=True)),
             NotImplementedError, r"gradient_accumulation_fusion=True .* param.main_grad"),
            (dict(config=ModelParallelConfig(tp_comm_overlap=True)), ValueError,
             r"needs config.sequence_parallel=True"),
            (dict(output_size=5), ValueError, r"out_features=5 is not divisible .* tp=2")]:
        kwargs = dict(input_size=4, output_size=4, config=config, init_method=torch.nn.init.ones_)
        with pytest.raises(error, match=message):
            tensor_parallel.ColumnParallelLinear(**{**kwargs, **changes})
    with pytest.raises(NotImplementedError, match=r"mpu.rank_groups"):
        ps.set_tensor_model_parallel_world_size(4)
    with pytest.raises(NotImplementedError, match=r"no gloo side groups"):
        ps.get_data_parallel_group_gloo()
    seeded, pk_random._tracker = pk_random._tracker, None  # as in a fresh process
    try:
        with pytest.raises(ValueError, match=r"model_parallel_cuda_manual_seed\(seed\)"):
            tensor_parallel.get_cuda_rng_tracker()
    finally:
        pk_random._tracker = seeded
    with pytest.raises(NotImplementedError, match=r"distribute_saved_activations=True"):
        tensor_parallel.checkpoint(F.gelu, True, torch.ones(2))


def test_errors_name_the_fix():
    run_on_ranks(_errors, 8)
