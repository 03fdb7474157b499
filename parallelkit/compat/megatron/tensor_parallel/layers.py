"""Megatron-core's ``ColumnParallelLinear``, ``RowParallelLinear`` and ``VocabParallelEmbedding``:
parallelkit's layers with Megatron's constructor arguments and return values.

    fc1 = ColumnParallelLinear(h, 4 * h, config=config, init_method=init, bias=True,
                               gather_output=False, skip_bias_add=True)
    fc2 = RowParallelLinear(4 * h, h, config=config, init_method=init, bias=True,
                            input_is_parallel=True, skip_bias_add=False)
    y, bias = fc1(x)          # the linear layers return (output, output_bias), as in Megatron
    out, _ = fc2(F.gelu(y + bias))

Config fields (``ModelParallelConfig`` or any object with them):
    sequence_parallel            the layers' ``sequence_parallel`` (sequence-first [s/tp, b, h])
    tp_comm_overlap              ``overlap_comm``: the fused ring matmuls (needs sequence_parallel)
    params_dtype                 the parameters' dtype
    use_cpu_initialization       False: parameters on the current CUDA device (the CPU without
                                 CUDA); True: on the CPU, as in Megatron
    perform_initialization       False leaves the parameters uninitialised, as in Megatron
    async_tensor_model_parallel_allreduce   accepted and ignored: it only overlapped a collective
    gradient_accumulation_fusion, defer_embedding_wgrad_compute   refused (NotImplementedError)
    deterministic_mode           (embedding) needs torch.use_deterministic_algorithms(True)

Initialisation differs from Megatron-core's default on purpose: whatever
``use_cpu_initialization``, the full (master) weight is drawn in float32 from the default CPU
generator by ``init_method``, cast to ``params_dtype``, and each rank keeps its shard. That is
Megatron's ``use_cpu_initialization=True`` path, reproduced value for value, so one seed gives
one model whatever tp is. Megatron's default (GPU) path instead draws each shard from the
tracker's per-TP-rank stream, so its weights depend on tp and cannot be matched here. Biases
start at zero, as in Megatron. ``stride > 1``, ``is_expert``, ``disable_grad_reduce`` and the
embedding wgrad buffers are refused with the alternative named.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from parallelkit import tensor_parallel as tp
from parallelkit.compat.megatron import parallel_state
from parallelkit.tensor_parallel.sharding import copy_shard_


@dataclass(frozen=True)
class _Options:
    """What parallelkit's layer constructors take, read from a Megatron config."""

    sequence_parallel: bool
    overlap_comm: bool
    device: torch.device
    dtype: torch.dtype
    perform_initialization: bool

    @classmethod
    def read(cls, config, owner: str, linear: bool = True) -> "_Options":
        def get(name, default=False):
            return getattr(config, name, default)

        if linear and get("gradient_accumulation_fusion"):
            raise NotImplementedError(
                f"{owner}: config.gradient_accumulation_fusion=True accumulates weight gradients "
                "into param.main_grad with an APEX kernel; parallelkit's layers write param.grad. "
                "Set it to False (for fp32 gradients of bf16/fp16 weights see README "
                "'Mixed precision')")
        if get("defer_embedding_wgrad_compute"):
            raise NotImplementedError(f"{owner}: config.defer_embedding_wgrad_compute=True is not "
                                      "supported; set it to False")
        if linear and get("tp_comm_overlap") and not get("sequence_parallel"):
            raise ValueError(f"{owner}: config.tp_comm_overlap=True overlaps the sequence-parallel "
                             "collectives with the matmuls: it needs config.sequence_parallel=True")
        if not linear and get("deterministic_mode") \
                and not torch.are_deterministic_algorithms_enabled():
            raise ValueError(f"{owner}: config.deterministic_mode=True: call "
                             "torch.use_deterministic_algorithms(True) first, which makes the "
                             "embedding's backward deterministic")
        on_cpu = get("use_cpu_initialization") or not torch.cuda.is_available()
        device = torch.device("cpu") if on_cpu else torch.device("cuda",
                                                                 torch.cuda.current_device())
        return cls(sequence_parallel=bool(get("sequence_parallel")),
                   overlap_comm=bool(linear and get("tp_comm_overlap")), device=device,
                   dtype=get("params_dtype", torch.float32),
                   perform_initialization=bool(get("perform_initialization", True)))


def _refuse(owner: str, stride=1, is_expert=False, disable_grad_reduce=False,
            wgrad_buffers=False) -> None:
    if stride != 1:
        raise NotImplementedError(
            f"{owner}(stride={stride}): strided partitions of a fused weight are not supported; "
            "use stride=1, or convert the dense layer with "
            "parallelkit.parallel_styles.ColwiseParallel(parts=[...]), which shards each part")
    if is_expert:
        raise NotImplementedError(
            f"{owner}(is_expert=True): expert layers run on the expert groups with their own "
            "token exchange: use parallelkit.moe.MoELayer or moe.ExpertParallelExperts")
    if disable_grad_reduce:
        raise NotImplementedError(f"{owner}(disable_grad_reduce=True) is not supported: the "
                                  "input gradient is always summed over TP")
    if wgrad_buffers:
        raise NotImplementedError(f"{owner}: embedding_activation_buffer/grad_output_buffer "
                                  "(deferred embedding wgrad) are not supported; pass None")


def _init_shard(param: torch.Tensor, init_method: Callable, full_shape: tuple[int, ...],
                dim: int, group: dist.ProcessGroup, keep_master: bool) -> torch.Tensor | None:
    """Megatron's CPU initialisation: ``init_method`` on the float32 master weight, cast to the
    parameter's dtype, this rank's chunk along ``dim`` kept. Returns the master if asked."""
    master = torch.empty(full_shape, dtype=torch.float32)
    init_method(master)
    copy_shard_(param, master.to(param.dtype), dim, group)
    return master if keep_master else None


def _tag(param: torch.Tensor | None, partition_dim: int | None) -> None:
    """Megatron's parameter attributes, which its optimizers and clipping read."""
    if param is None:
        return
    param.allreduce = True
    if partition_dim is not None:
        param.tensor_model_parallel, param.partition_dim, param.partition_stride = \
            True, partition_dim, 1


@contextlib.contextmanager
def _overriding(module: torch.nn.Module, **values):
    """Run parallelkit's forward with some attributes replaced for one call. Megatron passes
    per call what parallelkit's layers hold as attributes: a supplied weight, the runtime
    gather, and skip_bias_add (the bias kept out of the sum)."""
    saved = {}
    for name, value in values.items():
        where = module._parameters if name in module._parameters else module.__dict__
        saved[name] = (where, where[name])
        where[name] = value
    try:
        yield
    finally:
        for name, (where, old) in saved.items():
            where[name] = old


class ColumnParallelLinear(tp.ColumnParallelLinear):
    """Megatron's ``ColumnParallelLinear``: ``y = x A^T + b``, A's output features split over TP.

    Shapes (``n = output_size``):
        input_: ``[s, b, input_size]`` replicated, or ``[s/tp, b, input_size]`` with
            ``config.sequence_parallel``.
        output: ``[s, b, n/tp]``, or ``[s, b, n]`` with ``gather_output`` (or
            ``runtime_gather_output=True`` at the call).
    Weight ``[n/tp, input_size]``, bias ``[n/tp]``. Group: ``tp_group``, else the MPU's TP group.

    ``forward(input_, weight=None, runtime_gather_output=None)`` returns ``(output,
    output_bias)``: ``output_bias`` is the bias, not added, with ``skip_bias_add``, else None.
    ``weight`` replaces the layer's weight for the call (a tied output layer); it is required
    with ``skip_weight_param_allocation``. Initialisation: see the module docstring.
    """

    def __init__(self, input_size: int, output_size: int, *, config, init_method: Callable,
                 bias: bool = True, gather_output: bool = False, stride: int = 1,
                 keep_master_weight_for_test: bool = False, skip_bias_add: bool = False,
                 skip_weight_param_allocation: bool = False, embedding_activation_buffer=None,
                 grad_output_buffer=None, is_expert: bool = False, tp_comm_buffer_name=None,
                 disable_grad_reduce: bool = False, tp_group: dist.ProcessGroup | None = None):
        name = "ColumnParallelLinear"
        _refuse(name, stride, is_expert, disable_grad_reduce,
                embedding_activation_buffer is not None or grad_output_buffer is not None)
        options = _Options.read(config, name)
        super().__init__(input_size, output_size, bias=bias, gather_output=gather_output,
                         sequence_parallel=options.sequence_parallel,
                         overlap_comm=options.overlap_comm, tp_group=tp_group,
                         device=options.device, dtype=options.dtype, skip_init=True)
        self.config, self.init_method, self.is_expert = config, init_method, False
        self.input_size, self.output_size = input_size, output_size
        self.output_size_per_partition = self.weight.shape[0]
        self.skip_bias_add, self.keep_master_weight_for_test = skip_bias_add, \
            keep_master_weight_for_test
        self.master_weight = None
        if skip_weight_param_allocation:
            self.weight = None
        if options.perform_initialization:
            self.reset_parameters()
        _tag(self.weight, 0)
        _tag(self.bias, 0)

    def reset_parameters(self) -> None:
        if self.weight is not None:
            self.master_weight = _init_shard(
                self.weight, self.init_method, (self.output_size, self.input_size), 0,
                self.tp_group, self.keep_master_weight_for_test)
        if self.bias is not None:
            with torch.no_grad():
                self.bias.zero_()

    def forward(self, input_: torch.Tensor, weight: torch.Tensor | None = None,
                runtime_gather_output: bool | None = None):
        if weight is None:
            if self.weight is None:
                raise ValueError("ColumnParallelLinear(skip_weight_param_allocation=True) has no "
                                 "weight of its own: pass weight= to forward")
            weight = self.weight
        elif tuple(weight.shape) != (self.output_size_per_partition, self.input_size):
            raise ValueError(f"ColumnParallelLinear: the supplied weight has shape "
                             f"{tuple(weight.shape)}, expected this rank's "
                             f"{(self.output_size_per_partition, self.input_size)} "
                             f"([output_size/tp, input_size])")
        gather = self.gather_output if runtime_gather_output is None else runtime_gather_output
        bias = None if self.skip_bias_add else self.bias
        with _overriding(self, weight=weight, bias=bias, gather_output=bool(gather)):
            output = super().forward(input_)
        return output, (self.bias if self.skip_bias_add else None)


class RowParallelLinear(tp.RowParallelLinear):
    """Megatron's ``RowParallelLinear``: ``y = x A^T + b``, A's input features split over TP.

    Shapes (``k = input_size``):
        input_: ``[s, b, k/tp]`` with ``input_is_parallel``, else ``[s, b, k]`` replicated.
        output: ``[s, b, output_size]`` replicated, or ``[s/tp, b, output_size]`` with
            ``config.sequence_parallel`` (which needs ``input_is_parallel``).
    Weight ``[output_size, k/tp]``; bias ``[output_size]`` replicated, added after the sum.
    Group: ``tp_group``, else the MPU's TP group.

    ``forward(input_)`` returns ``(output, output_bias)`` as ``ColumnParallelLinear`` does. Under
    sequence parallelism the bias carries ``sequence_parallel=True``: its gradient is a partial
    sum over TP, summed by ``parallelkit.tensor_parallel.sync_sequence_parallel_grads`` or
    parallelkit's DistributedDataParallel (Megatron: ``finalize_model_grads``).
    """

    def __init__(self, input_size: int, output_size: int, *, config, init_method: Callable,
                 bias: bool, input_is_parallel: bool, skip_bias_add: bool, stride: int = 1,
                 keep_master_weight_for_test: bool = False, is_expert: bool = False,
                 tp_comm_buffer_name=None, tp_group: dist.ProcessGroup | None = None):
        name = "RowParallelLinear"
        _refuse(name, stride, is_expert)
        options = _Options.read(config, name)
        super().__init__(input_size, output_size, bias=bias, input_is_parallel=input_is_parallel,
                         sequence_parallel=options.sequence_parallel,
                         overlap_comm=options.overlap_comm, tp_group=tp_group,
                         device=options.device, dtype=options.dtype, skip_init=True)
        self.config, self.init_method, self.is_expert = config, init_method, False
        self.input_size, self.output_size = input_size, output_size
        self.input_size_per_partition = self.weight.shape[1]
        self.skip_bias_add, self.keep_master_weight_for_test = skip_bias_add, \
            keep_master_weight_for_test
        self.master_weight = None
        if options.perform_initialization:
            self.reset_parameters()
        _tag(self.weight, 1)
        _tag(self.bias, None)
        if self.bias is not None:
            self.bias.sequence_parallel = self.sequence_parallel

    def reset_parameters(self) -> None:
        self.master_weight = _init_shard(
            self.weight, self.init_method, (self.output_size, self.input_size), 1,
            self.tp_group, self.keep_master_weight_for_test)
        if self.bias is not None:
            with torch.no_grad():
                self.bias.zero_()

    def forward(self, input_: torch.Tensor):
        with _overriding(self, bias=None if self.skip_bias_add else self.bias):
            output = super().forward(input_)
        return output, (self.bias if self.skip_bias_add else None)


class VocabParallelEmbedding(tp.VocabParallelEmbedding):
    """Megatron's ``VocabParallelEmbedding``: the table's rows split over TP.

    Shapes:
        input_: ids ``[b, s]`` (any shape without ``reduce_scatter_embeddings``), in [0, V).
        output: ``[b, s, h]`` replicated, or with ``reduce_scatter_embeddings``
            ``[s/tp, b, h]``: transposed to sequence-first and reduce-scattered along the
            sequence, as Megatron's sequence-parallel embedding does.
    Weight ``[V/tp, h]``, initialised by ``init_method`` as the linear layers are. Group:
    ``tp_group``, else the MPU's TP group. Returns a tensor (Megatron's embedding has no bias).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *, init_method: Callable,
                 reduce_scatter_embeddings: bool = False, config,
                 tp_group: dist.ProcessGroup | None = None):
        options = _Options.read(config, "VocabParallelEmbedding", linear=False)
        super().__init__(num_embeddings, embedding_dim,
                         sequence_parallel=reduce_scatter_embeddings, sequence_dim=0,
                         tp_group=tp_group, device=options.device, dtype=options.dtype,
                         skip_init=True)
        self.init_method, self.reduce_scatter_embeddings = init_method, reduce_scatter_embeddings
        self.vocab_start_index, self.vocab_end_index = self.vocab_start, self.vocab_end
        self.num_embeddings_per_partition = self.vocab_end - self.vocab_start
        if options.perform_initialization:
            self.reset_parameters()
        _tag(self.weight, 0)

    def reset_parameters(self) -> None:
        _init_shard(self.weight, self.init_method, (self.num_embeddings, self.embedding_dim), 0,
                    self.tp_group, keep_master=False)

    def forward(self, input_: torch.Tensor) -> torch.Tensor:
        # parallelkit's layer splits the sequence of sequence-first ids: hand it [s, b].
        return super().forward(input_.transpose(0, 1) if self.reduce_scatter_embeddings
                               else input_)


def param_is_not_tensor_parallel_duplicate(param: torch.Tensor) -> bool:
    """True for a TP-sharded parameter, and for a replicated one on TP rank 0 only (what
    Megatron's grad-norm code counts once)."""
    return bool(getattr(param, "tensor_model_parallel", False)) \
        or parallel_state.get_tensor_model_parallel_rank() == 0


__all__ = ["ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding",
           "param_is_not_tensor_parallel_duplicate"]
