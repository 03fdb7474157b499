"""Dynamic loss scaling for fp16 training, across every rank that holds a part of the model.

    optimizer = MixedPrecisionOptimizer(model, torch.optim.AdamW, lr=1e-3)  # fp16: scaler on
    optimizer.scale_loss(loss).backward()       # loss * scale: small gradients stay above fp16's
    model.finish_grad_sync()                    # smallest normal number (6e-5)
    stepped = optimizer.step()                  # unscale, check, step or skip, update the scale

fp16 keeps 5 exponent bits: gradients below ~6e-8 flush to zero, above 65504 overflow to inf. The
loss is multiplied by ``scale`` before backward, and the fp32 main grads divided by it before the
step. If any of them is inf or nan on any rank, every rank skips the step and halves the scale;
after ``growth_interval`` good steps in a row the scale doubles (torch.amp.GradScaler's and
Megatron's DynamicGradScaler's rule; ``min_scale`` is Megatron's floor). bf16 has fp32's exponent
range and needs none of this: its optimizers take ``grad_scaler=None`` (scale fixed at 1).

All ranks must agree on "skip", or replicas drift apart (a rank that stepped on a finite shard
while another found an inf). So the found-inf flag is all-reduced (MAX) over the groups that
together cover every rank holding gradients of the model: the model-parallel group (TP x PP) and
the data-parallel one; with ZeRO the latter matters most, as an overflow lands in one rank's shard.
The scale is a Python float, equal on every rank since every rank applies the same decisions.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from parallelkit.distributed import comm, mpu


class DynamicGradScaler:
    """The loss scale and its update rule (see the module docstring).

    Args:
        initial_scale: the first scale (torch's default 2**16).
        growth_factor: multiplies the scale after ``growth_interval`` steps without overflow.
        backoff_factor: multiplies the scale after an overflow (in (0, 1)).
        growth_interval: good steps in a row before the scale grows.
        min_scale: the scale never backs off below this.
    """

    def __init__(self, initial_scale: float = 2.0 ** 16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 1000,
                 min_scale: float = 1.0):
        for name, value, ok, want in [
                ("initial_scale", initial_scale, 0 < initial_scale < math.inf, "finite, > 0"),
                ("growth_factor", growth_factor, 1 < growth_factor < math.inf, "finite, > 1"),
                ("backoff_factor", backoff_factor, 0 < backoff_factor < 1, "in (0, 1)"),
                ("growth_interval", growth_interval,
                 isinstance(growth_interval, int) and growth_interval >= 1, "an integer >= 1"),
                ("min_scale", min_scale, 0 < min_scale <= initial_scale, "in (0, initial_scale]")]:
            if not ok:
                raise ValueError(f"DynamicGradScaler: {name}={value!r} must be {want}")
        self.scale = float(initial_scale)
        self.growth_factor, self.backoff_factor = float(growth_factor), float(backoff_factor)
        self.growth_interval, self.min_scale = growth_interval, float(min_scale)
        self.growth_tracker = 0  # good steps since the last change of scale
        self._scaled = False  # scale_loss() was called since the last unscale_()

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss * scale``: call backward on this."""
        self._scaled = True
        return loss * self.scale

    @torch.no_grad()
    def unscale_(self, grads: list[torch.Tensor], groups: list[dist.ProcessGroup]) -> bool:
        """Divide ``grads`` (this rank's fp32 main grads) by the scale in place; return whether
        any rank of ``groups`` found an inf or nan, the same answer on every rank.

        Raises RuntimeError on every rank if no rank called :meth:`scale_loss` since the last
        call (under pipeline parallelism only the last stage has a loss to scale), because
        unscaling unscaled gradients would silently divide them by the scale.
        """
        device = grads[0].device if grads else comm.metadata_device(groups[0])
        flags = torch.zeros(2, dtype=torch.float32, device=device)  # [found inf, scaled]
        flags[1] = float(self._scaled)
        by_kind: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
        for grad in grads:
            by_kind.setdefault((grad.dtype, grad.device), []).append(grad)
        for (_, grad_device), same in by_kind.items():
            found = torch.zeros(1, dtype=torch.float32, device=grad_device)
            inverse = torch.full((1,), 1.0 / self.scale, dtype=torch.float32, device=grad_device)
            torch._amp_foreach_non_finite_check_and_unscale_(same, found, inverse)
            flags[0] = torch.maximum(flags[0], found.to(device)[0])
        for group in groups:
            flags = comm.all_reduce(flags, group, op="max")
        found_inf, scaled = (bool(v) for v in flags.tolist())
        self._scaled = False
        if not scaled:
            raise RuntimeError("the fp16 gradients were not computed from a scaled loss: call "
                               "optimizer.scale_loss(loss).backward() (or pass grad_scaler=None "
                               "to the optimizer to train without loss scaling)")
        return found_inf

    def update(self, found_inf: bool) -> None:
        """Back off after an overflow; grow after ``growth_interval`` good steps in a row."""
        if found_inf:
            self.scale = max(self.scale * self.backoff_factor, self.min_scale)
            self.growth_tracker = 0
            return
        self.growth_tracker += 1
        if self.growth_tracker == self.growth_interval:
            self.scale *= self.growth_factor
            self.growth_tracker = 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "growth_factor": self.growth_factor,
                "backoff_factor": self.backoff_factor, "growth_interval": self.growth_interval,
                "min_scale": self.min_scale, "growth_tracker": self.growth_tracker}

    def load_state_dict(self, state: dict) -> None:
        missing = sorted(set(self.state_dict()) - set(state))
        if missing:
            raise ValueError(f"DynamicGradScaler.load_state_dict: the state lacks {missing}: "
                             "pass what DynamicGradScaler.state_dict() returned")
        restored = DynamicGradScaler(state["scale"], state["growth_factor"],
                                     state["backoff_factor"], state["growth_interval"],
                                     state["min_scale"])  # validates the values
        restored.growth_tracker = int(state["growth_tracker"])
        self.__dict__.update(restored.__dict__)


def default_grad_scaler(params) -> DynamicGradScaler | None:
    """A :class:`DynamicGradScaler` if some parameter is fp16, else None (bf16, fp32: scale 1)."""
    return DynamicGradScaler() if any(p.dtype == torch.float16 for p in params) else None


def resolve_grad_scaler(grad_scaler, params) -> DynamicGradScaler | None:
    """An optimizer's ``grad_scaler`` argument: "auto" (:func:`default_grad_scaler`), None, or a
    :class:`DynamicGradScaler`."""
    if isinstance(grad_scaler, str) and grad_scaler == "auto":
        return default_grad_scaler(params)
    if grad_scaler is None or isinstance(grad_scaler, DynamicGradScaler):
        return grad_scaler
    raise ValueError(f"grad_scaler={grad_scaler!r} must be 'auto' (dynamic loss scaling for fp16 "
                     "parameters), None (no scaling) or a DynamicGradScaler")


def default_found_inf_groups(dp_group: dist.ProcessGroup) -> list[dist.ProcessGroup]:
    """The groups over which "an overflow somewhere" is agreed: the MPU's model-parallel group
    (when the MPU is initialized) and the model's data-parallel group."""
    return ([mpu.get_group("mp")] if mpu.is_initialized() else []) + [dp_group]


class LossScaling:
    """What the mixed-precision optimizers share: an optional scaler (``self.grad_scaler``), the
    loss scaling, and "skip this step" decided once per synchronised round."""

    grad_scaler: DynamicGradScaler | None = None
    found_inf: bool = False  # the last unscale found an inf/nan on some rank: step() skips

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss * loss_scale`` (``loss`` itself without a scaler): call backward on this."""
        return loss if self.grad_scaler is None else self.grad_scaler.scale_loss(loss)

    @property
    def loss_scale(self) -> float:
        return 1.0 if self.grad_scaler is None else self.grad_scaler.scale

    def _unscale(self, grads: list[torch.Tensor], groups: list[dist.ProcessGroup]) -> None:
        self.found_inf = (self.grad_scaler is not None
                          and self.grad_scaler.unscale_(grads, groups))

    def _update_scale(self) -> None:
        if self.grad_scaler is not None:
            self.grad_scaler.update(self.found_inf)
