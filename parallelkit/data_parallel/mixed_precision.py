"""fp32 master weights for a bf16/fp16 model without ZeRO: a torch optimizer steps fp32 copies.

    model = DistributedDataParallel(model_bf16)        # fp32 main_grad buckets (the default)
    optimizer = MixedPrecisionOptimizer(model, torch.optim.AdamW, lr=1e-3, weight_decay=0.1)
    for step in ...:
        optimizer.scale_loss(loss).backward()          # fp16: loss * scale; bf16: the loss
        model.finish_grad_sync()
        optimizer.clip_grad_norm(1.0)                  # optional; unscales first
        optimizer.step()                               # False when skipped (fp16 overflow)
        optimizer.zero_grad()

Why masters: an AdamW update is about ``lr`` in size, while bf16 keeps 8 significant bits, so on a
weight near 1 (a norm's gain) any update below 2**-9 rounds away and the weight never moves. The
wrapped optimizer (torch's, unchanged) therefore steps an fp32 copy of every bf16/fp16 parameter,
whose ``.grad`` *is* the parameter's ``main_grad`` (the fp32 bucket view: no copy), and the result
is rounded back into the parameter. A parameter already fp32 (or fp64) is its own master.

A parameter no rank computed a gradient for (``main_grad`` None after ``finish_grad_sync``) gets
``master.grad = None`` for that step, so the inner optimizer skips it: no decay, no moment update.
ZeRO-1 (:class:`~parallelkit.data_parallel.zero.DistributedOptimizer`) does the same with the
masters sharded over DP; this wrapper keeps them whole on every rank.
"""

from __future__ import annotations

from typing import Any, Type

import torch
from torch import nn

from parallelkit.data_parallel import clip
from parallelkit.data_parallel.buckets import accumulated_grad
from parallelkit.data_parallel.ddp import DistributedDataParallel
from parallelkit.data_parallel.grad_scaler import (DynamicGradScaler, LossScaling,
                                                   default_found_inf_groups, resolve_grad_scaler)
from parallelkit.data_parallel.precision import HALF_DTYPES
from parallelkit.distributed import mpu


class MixedPrecisionOptimizer(LossScaling):
    """Wraps a torch optimizer so that it steps fp32 masters of ``model``'s half parameters.

    Args:
        model: a :class:`DistributedDataParallel` (without ``use_distributed_optimizer``) whose
            bf16/fp16 parameters have fp32 main grads (``grad_dtype=torch.float32``, its default).
        optimizer_cls: the optimizer to wrap (default ``torch.optim.AdamW``).
        param_groups: like a torch optimizer's, over the model's parameters; default one group
            with every synchronised parameter.
        grad_scaler: "auto" (a :class:`DynamicGradScaler` when some parameter is fp16, else
            none), None (no loss scaling), or a scaler of your own.
        found_inf_groups: where "an inf somewhere" is agreed; default the MPU's mp group (if
            initialized) and the model's DP group, which together cover every rank of the model.
        **optimizer_kwargs: passed to ``optimizer_cls`` (lr, betas, weight_decay, ...).
    ``self.optimizer`` is the inner optimizer (give it to an LR scheduler).
    """

    def __init__(self, model: DistributedDataParallel,
                 optimizer_cls: Type[torch.optim.Optimizer] = torch.optim.AdamW,
                 param_groups: list[dict[str, Any]] | None = None, *,
                 grad_scaler: DynamicGradScaler | None | str = "auto",
                 found_inf_groups=None, **optimizer_kwargs):
        if not isinstance(model, DistributedDataParallel) or model.use_distributed_optimizer:
            raise ValueError("MixedPrecisionOptimizer needs a DistributedDataParallel built "
                             "without use_distributed_optimizer (got "
                             f"{type(model).__name__}); with ZeRO-1 use DistributedOptimizer, "
                             "which keeps fp32 masters of its shard")
        self.model = model
        if param_groups is None:
            param_groups = [{"params": list(model.bucketed_parameters())}]
        self._pairs: list[tuple[nn.Parameter, torch.Tensor]] = []  # (parameter, its master)
        inner_groups = [{**group, "params": [self._master_for(p, index) for p in group["params"]]}
                        for index, group in enumerate(param_groups)]
        held = {id(p) for p, _ in self._pairs}
        missing = [model._name(p) for p in model.bucketed_parameters() if id(p) not in held]
        if missing:
            raise ValueError(f"parameters in no param group: {missing}; list every parameter "
                             "of the model (or freeze it: requires_grad=False before wrapping)")
        self.optimizer = optimizer_cls(inner_groups, **optimizer_kwargs)
        self.grad_scaler = resolve_grad_scaler(grad_scaler, [p for p, _ in self._pairs])
        self._groups = found_inf_groups or default_found_inf_groups(model.dp_group)
        self._prepared_round = -1  # the model's sync round whose gradients are prepared

    def _master_for(self, param: nn.Parameter, group_index: int) -> torch.Tensor:
        bucket = self.model._bucket_of.get(id(param))
        if bucket is None:
            raise ValueError(f"param_groups[{group_index}] holds a parameter of shape "
                             f"{tuple(param.shape)} that the model does not synchronise")
        if any(p is param for p, _ in self._pairs):
            raise ValueError(f"{self.model._name(param)} is in more than one param group")
        if param.dtype not in HALF_DTYPES:
            master = param  # fp32 (or wider) already: stepped in place, its .grad the view
        elif bucket.grad_data.dtype != torch.float32:
            raise ValueError(f"{self.model._name(param)} is {param.dtype} but its gradients are "
                             f"{bucket.grad_data.dtype}: MixedPrecisionOptimizer steps fp32 "
                             "masters with fp32 gradients; wrap the model with "
                             "DistributedDataParallel(module, grad_dtype=torch.float32) (the "
                             "default for bf16/fp16 parameters)")
        else:
            # A tensor that does not require grad is a leaf: torch optimizers take it.
            master = param.detach().to(torch.float32, copy=True)
        self._pairs.append((param, master))
        return master

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    def _master_grads(self) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """``(parameter, master gradient)`` of every parameter that has one, unscaled once per
        synchronised round (so that a clip before ``step`` is not undone or repeated)."""
        self.model.check_grads_synced()
        if self._prepared_round != self.model.sync_round:
            for param, master in self._pairs:
                if master is not param:
                    master.grad = accumulated_grad(param)
            self._unscale([m.grad for _, m in self._pairs if m.grad is not None], self._groups)
            self._prepared_round = self.model.sync_round
        return [(param, master.grad) for param, master in self._pairs if master.grad is not None]

    def clip_grad_norm(self, max_norm: float, norm_type: float = 2.0, *, tp_group=None,
                       mp_group=None, expert_mp_group=None) -> torch.Tensor:
        """Clip the fp32 master gradients by the global norm over TP x PP (MPU groups by
        default; DP replicas hold the same averaged gradients), expert parameters' over the
        expert tp x ep x pp group; returns that norm. inf or nan after an fp16 overflow, and
        then the step is skipped whatever the clip did."""
        pieces = self._master_grads()
        mp_group = mp_group if mp_group is not None else mpu.get_group("mp")
        # decided by the model, not by which gradients are None on this rank
        expert_groups = clip.expert_norm_groups(self.model.expert_dp_group is not None,
                                                expert_mp_group)
        return clip.clip_grads_([p for p, _ in pieces], [g for _, g in pieces], max_norm,
                                norm_type, tp_group=tp_group, sum_groups=[mp_group],
                                expert_sum_groups=expert_groups)

    @torch.no_grad()
    def step(self) -> bool:
        """Step the masters and round them into the parameters; returns False, leaving every
        rank's parameters and optimizer state alone, when some rank found an inf/nan."""
        self._master_grads()
        if not self.found_inf:
            self.optimizer.step()
            for param, master in self._pairs:
                if master is not param:
                    param.copy_(master)
        self._update_scale()
        return not self.found_inf

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the model's gradient buckets (the masters' gradients are views into them)."""
        self.model.zero_grad_buffer()

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state, the fp32 masters (the bf16 parameters are only their
        rounding) and the scaler's state."""
        return {"optimizer": self.optimizer.state_dict(),
                "masters": [m.detach().clone() for p, m in self._pairs if m is not p],
                "grad_scaler": None if self.grad_scaler is None else self.grad_scaler.state_dict()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        masters = [(p, m) for p, m in self._pairs if m is not p]
        if len(state["masters"]) != len(masters) or (state["grad_scaler"] is None) != (
                self.grad_scaler is None):
            raise ValueError(f"MixedPrecisionOptimizer.load_state_dict: the state has "
                             f"{len(state['masters'])} masters and grad_scaler "
                             f"{'off' if state['grad_scaler'] is None else 'on'}, this optimizer "
                             f"{len(masters)} and {'off' if self.grad_scaler is None else 'on'}: "
                             "load a state saved from the same model and options")
        self.optimizer.load_state_dict(state["optimizer"])
        for (param, master), saved in zip(masters, state["masters"]):
            master.copy_(saved)
            param.copy_(master)
        if self.grad_scaler is not None:
            self.grad_scaler.load_state_dict(state["grad_scaler"])
