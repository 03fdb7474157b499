"""LayerNorm and RMSNorm layers whose hidden dim is split across TP ranks.

Rank r holds columns ``[r * H/tp, (r+1) * H/tp)`` of every token and of the weight and bias, as a
column-parallel layer's output does; the layer normalizes with statistics of the full row (see
``parallelkit.ops.norms``). ``forward(x, residual)`` fuses the transformer's skip connection: it
normalizes ``x + residual`` and also returns that sum, the next block's residual stream.

(Under sequence parallelism a norm instead sees ``[s/tp, b, h]`` with the full hidden dim: that is
a plain ``nn.LayerNorm`` with its parameters marked, see ``sequence_parallel.py``.)
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from parallelkit.distributed.groups import bind_group
from parallelkit.ops.norms import parallel_layer_norm, parallel_rms_norm
from parallelkit.tensor_parallel.sharding import (check_eps, check_input, check_positive_int,
                                                  copy_shard_, divide, new_parameter)


class _ParallelNorm(nn.Module):
    """What both norms share: shapes, the sharded weight and bias, and conversion."""

    def __init__(self, hidden: int, eps: float | None, elementwise_affine: bool, bias: bool,
                 tp_group: dist.ProcessGroup | None, device, dtype, skip_init: bool):
        super().__init__()
        name = type(self).__name__
        check_positive_int(name, "hidden", hidden)
        check_eps(name, eps, allow_none=isinstance(self, ParallelRMSNorm))
        self._group = bind_group(tp_group, "tp")
        self.tp_group, self.tp = self._group.group, self._group.size
        self.hidden, self.eps = hidden, eps
        self.local_hidden = divide(hidden, self.tp, f"{type(self).__name__} hidden")
        shard = (self.local_hidden,)
        self.weight = new_parameter(shard, dtype, device, 0) if elementwise_affine else None
        self.bias = new_parameter(shard, dtype, device, 0) if elementwise_affine and bias else None
        if not skip_init:
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """weight 1, bias 0, as the dense norms (the same on every rank, so no RNG to share)."""
        with torch.no_grad():
            if self.weight is not None:
                self.weight.fill_(1.0)
            if self.bias is not None:
                self.bias.zero_()

    def _load_dense(self, dense: nn.Module) -> None:
        for name in ("weight", "bias"):
            param = getattr(self, name)
            if param is not None:
                copy_shard_(param, getattr(dense, name).detach(), 0, self.tp_group)

    @classmethod
    def _from_dense(cls, dense: nn.Module, dense_type: type, tp_group, **kwargs):
        if not isinstance(dense, dense_type):
            raise TypeError(f"{cls.__name__}.from_dense takes nn.{dense_type.__name__}, got "
                            f"{type(dense).__name__}")
        if len(dense.normalized_shape) != 1:
            raise ValueError(f"{cls.__name__}.from_dense normalizes one hidden dim, but the "
                             f"{dense_type.__name__} has normalized_shape "
                             f"{tuple(dense.normalized_shape)}; flatten those dims into one")
        weight = dense.weight
        layer = cls(dense.normalized_shape[0], dense.eps, elementwise_affine=weight is not None,
                    tp_group=tp_group, skip_init=True,
                    device=None if weight is None else weight.device,
                    dtype=None if weight is None else weight.dtype, **kwargs)
        layer._load_dense(dense)
        return layer

    def _check_input(self, x: torch.Tensor) -> None:
        self._group.check_input(self, lambda: self._local_checks(x))

    def _local_checks(self, x: torch.Tensor) -> None:
        # Mixed precision is allowed here (bf16 rows, fp32 weight): the kernels upcast.
        check_input(type(self).__name__, x, self.weight, same_dtype=False)
        if x.dim() == 0 or x.shape[-1] != self.local_hidden:
            raise ValueError(f"{type(self).__name__}(hidden={self.hidden}) on tp={self.tp} ranks "
                             f"expects this rank's hidden slice [..., {self.local_hidden}], got "
                             f"shape {tuple(x.shape)}")

    def extra_repr(self) -> str:
        return (f"hidden={self.hidden}, eps={self.eps}, affine={self.weight is not None}, "
                f"bias={self.bias is not None}, tp={self.tp}")


class ParallelLayerNorm(_ParallelNorm):
    """``nn.LayerNorm(hidden)`` with the hidden dim split across TP ranks.

    Shapes: x, residual, y, new residual ``[..., hidden/tp]``; weight, bias ``[hidden/tp]``
    (``tp_shard_dim`` 0). ``elementwise_affine=False`` keeps neither; ``bias=False`` no bias.
    """

    def __init__(self, hidden: int, eps: float = 1e-5, bias: bool = True, *,
                 elementwise_affine: bool = True, tp_group: dist.ProcessGroup | None = None,
                 device=None, dtype=None, skip_init: bool = False):
        super().__init__(hidden, eps, elementwise_affine, bias, tp_group, device, dtype, skip_init)

    @classmethod
    def from_dense(cls, norm: nn.LayerNorm, *,
                   tp_group: dist.ProcessGroup | None = None) -> "ParallelLayerNorm":
        """This rank's shard of ``norm``; the layer computes this rank's slice of its output."""
        return cls._from_dense(norm, nn.LayerNorm, tp_group,
                               bias=getattr(norm, "bias", None) is not None)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """y, or ``(y, x + residual)`` when residual is given."""
        self._check_input(x)
        return parallel_layer_norm(x, self.weight, self.bias, self.eps, self.tp_group, residual)


class ParallelRMSNorm(_ParallelNorm):
    """``nn.RMSNorm(hidden)`` with the hidden dim split across TP ranks.

    Shapes as :class:`ParallelLayerNorm`, without a bias. ``eps=None`` means
    ``torch.finfo(float32).eps`` (``finfo(float64).eps`` for float64 inputs), as in ``nn.RMSNorm``.
    """

    def __init__(self, hidden: int, eps: float | None = 1e-6, *, elementwise_affine: bool = True,
                 tp_group: dist.ProcessGroup | None = None, device=None, dtype=None,
                 skip_init: bool = False):
        super().__init__(hidden, eps, elementwise_affine, False, tp_group, device, dtype, skip_init)

    @classmethod
    def from_dense(cls, norm: nn.RMSNorm, *,
                   tp_group: dist.ProcessGroup | None = None) -> "ParallelRMSNorm":
        """This rank's shard of ``norm`` (its eps, None included, is kept)."""
        return cls._from_dense(norm, nn.RMSNorm, tp_group)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """y, or ``(y, x + residual)`` when residual is given."""
        self._check_input(x)
        return parallel_rms_norm(x, self.weight, self.eps, self.tp_group, residual)
