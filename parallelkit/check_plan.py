"""``check-plan``: prove a ``parallelize`` plan on a shrunken copy of a model before a real job.

    report = check_plan("config.json", tp=2, cp=2)          # or a dict, or a PretrainedConfig
    print(report.format()); sys.exit(report.exit_code)      # 0 match, 1 differ, 2 conversion error

The transformers config is shrunk (2 layers, head_dim 16, few heads with the GQA ratio kept,
vocab 128; biases, norms, tied embeddings and rope settings as they are), the model is built in
float64 on tp·cp local gloo ranks, and one loss and every gradient of the converted model are
compared with the unconverted one's. The expected gradient shards come from converting a copy of
the dense model whose weights are its gradients with the same call, so any plan (fused parts,
interleaved projections) is checked without knowing how it splits.
"""

from __future__ import annotations

import copy
import importlib
import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from parallelkit.models.shrink import (HEAD_DIM, LAYERS, VOCAB, build_model, load_config,
                                      shrink_config)

BATCH, MIN_TOKENS = 2, 16
# Both sides run in float64, so two correct results differ by rounding only: a sum of n terms in
# another order (the ranks' partial sums, another blocking) errs like a random walk, eps·sqrt(n)
# times the terms' magnitude. n is counted generously: per layer (and once more for the
# embedding, head and loss) the tokens, hidden, FFN and vocabulary sizes. SAFETY = 8 keeps the
# largest of ~1e6 elements inside (5 sigma) with room for both sides' own rounding; a plan bug (a
# wrong shard, a missing reduction) is off by O(1) of the tensor's scale, ~1e12 times more.
SAFETY = 8.0


@dataclass
class Row:
    """One compared quantity: the loss or a parameter's gradient (its rank-0 local shape)."""
    name: str
    shape: tuple
    max_diff: float
    tolerance: float
    ok: bool
    note: str = ""

    @property
    def ratio(self) -> float:
        """max_diff / tolerance; inf where nothing could be compared (a missing gradient)."""
        if math.isnan(self.max_diff):
            return math.inf
        return self.max_diff / self.tolerance if self.tolerance else 0.0


@dataclass
class CheckReport:
    """What ``check_plan`` found: ``error`` (the conversion failed) or one row per quantity."""
    tp: int
    cp: int
    options: dict
    model: str = ""
    rows: list[Row] = field(default_factory=list)
    error: str | None = None   # parallelize refused the model: exit code 2
    crash: str | None = None   # the converted model raised or hung on a rank: exit code 1

    @property
    def failures(self) -> list[Row]:
        return [row for row in self.rows if not row.ok]

    @property
    def exit_code(self) -> int:
        return 2 if self.error else 1 if self.crash or self.failures else 0

    def format(self) -> str:
        where = ", ".join([f"tp={self.tp}", f"cp={self.cp}"] +
                          [f"{k}={v}" for k, v in self.options.items()])
        if self.error:
            return f"{self.model}\nplan cannot be applied at {where}:\n  {self.error}"
        if self.crash:
            return (f"{self.model}\n{self.crash}\nplan FAILS: the converted model did not run "
                    f"at {where} (the ranks' errors above)")
        cells = [("quantity", "local shape", "max |diff|", "tolerance", "result")]
        cells += [(r.name, str(list(r.shape)), f"{r.max_diff:.3g}", f"{r.tolerance:.3g}",
                   ("OK" if r.ok else "FAIL") + (f" ({r.note})" if r.note else ""))
                  for r in self.rows]
        widths = [max(len(c[i]) for c in cells) for i in range(4)]
        lines = [self.model] + ["  ".join(c.ljust(w) for c, w in zip(line, widths)) + "  " +
                                line[4] for line in cells]
        if self.failures:
            lines.append(f"plan FAILS: {len(self.failures)} of {len(self.rows)} differ at {where}")
        else:
            lines.append(f"plan OK: {len(self.rows) - 1} gradients and the loss match the "
                         f"unconverted model at {where}")
        return "\n".join(lines)


def check_plan(config, *, tp: int, cp: int = 1, plan=None, sequence_parallel: bool | None = None,
               overlap_comm: bool | None = None, loss_parallel: bool = True,
               timeout: float = 600.0) -> CheckReport:
    """Convert a shrunken ``config`` model with ``parallelize`` on tp·cp local gloo ranks and
    compare the loss and every gradient shard with the unconverted model's.

    Args:
        config: a config.json path, its dict, or a ``transformers.PretrainedConfig``.
        plan: None (the model's own), {pattern: ParallelStyle}, a callable model -> such a
            dict (module-level, it travels to the ranks), or "module:ATTR" naming either.
        sequence_parallel, overlap_comm, loss_parallel: passed to ``parallelize`` as given.
        timeout: seconds the ranks get for the whole check.

    Bad arguments raise ValueError; a ``parallelize`` error is the report's ``error``.
    """
    from parallelkit.launch import LocalWorld, RankFailure

    for name, value in (("tp", tp), ("cp", cp)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be an integer >= 1")
    unit = 2 * cp * tp  # zigzag cuts 2·cp chunks; sequence parallelism splits each rank's by tp
    seq_len = unit * math.ceil(MIN_TOKENS / unit)
    if isinstance(plan, str):
        load_plan(plan)  # fail here, once, rather than on every rank
    small = shrink_config(load_config(config), tp, seq_len)
    try:  # here, once: a shrinking that transformers rejects is not the plan's fault
        build_model(small)
    except Exception as error:
        raise ValueError(f"the shrunken {small.model_type} config does not build a model "
                         f"({type(error).__name__}: {error}); report this for check-plan") from None
    options = dict(sequence_parallel=sequence_parallel, overlap_comm=overlap_comm,
                   loss_parallel=loss_parallel)
    report = CheckReport(tp, cp, options, _describe(small, seq_len))
    try:
        with LocalWorld(tp * cp) as world:
            results = world.run(_check_on_rank, small, tp, cp, plan, options, seq_len,
                                timeout=timeout)
    except RankFailure as failure:  # the converted model raised or hung while running
        report.crash = str(failure)
        return report
    errors = [r["error"] for r in results if r["error"]]
    if errors:
        report.error = errors[0]
    else:
        report.options.update(results[0]["effective"])
        report.rows = _fold([r["rows"] for r in results])
    return report


def load_plan(spec: str):
    """The object "module:ATTR" names: a {pattern: ParallelStyle} dict or a model -> dict."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"--plan {spec!r} must be module:ATTR, e.g. myplans:llama_plan")
    try:
        plan = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"--plan {spec!r}: {error}") from None
    if not (isinstance(plan, dict) or callable(plan)):
        raise ValueError(f"--plan {spec!r} is a {type(plan).__name__}; it must be a dict "
                         "{pattern: ParallelStyle} or a callable model -> dict")
    return plan


def _check_on_rank(config, tp, cp, plan, options, seq_len) -> dict:
    """On one rank: convert, run both models, compare. Returns {"error"} (this rank's refusal,
    None if another rank refused) or {"error": None, "effective", "rows"}."""
    from parallelkit import mpu
    from parallelkit.distributed import comm
    from parallelkit.parallelize import parallelize

    state = mpu.initialize(tp=tp, cp=cp)
    dense = build_model(config)
    error = None
    try:  # a refusal (of the plan or of parallelize) is the answer, not a crash
        if isinstance(plan, str):
            plan = load_plan(plan)
        if callable(plan) and not isinstance(plan, dict):
            plan = plan(dense)  # once: the expected shards are converted with the same dict
        model = parallelize(copy.deepcopy(dense), plan, **options)
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    # Every rank stops if any refused, or the others would wait for it in a collective.
    refused = comm.all_reduce(torch.tensor([float(error is not None)]), dist.group.WORLD)
    if refused.item():
        return dict(error=error)

    with KeepFloat64():
        dense_loss = _dense_loss(dense, seq_len)
        expected, no_grad = _gradients_as_weights(dense)
        parallelize(expected, plan, **options)
        loss = _converted_loss(model, state, seq_len)
    return dict(error=None, effective=_effective_options(model),
                rows=_compare(loss, dense_loss, model, expected, no_grad, dense, config,
                              seq_len))


def _batch(seq_len: int, pad: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [b, s], the same on every rank, and their next-token labels [b, s], shifted
    before any CP split (a rank's last token predicts one that another rank holds)."""
    ids = torch.randint(0, VOCAB, (BATCH, seq_len), generator=torch.Generator().manual_seed(1))
    if isinstance(pad, int):  # the embedding's padding_idx row must keep a zero gradient
        ids[0, seq_len // 2] = pad
    shift = ids.roll(-1, 1)
    shift[:, -1] = -100
    return ids, shift


def _dense_loss(dense, seq_len: int) -> torch.Tensor:
    """The unconverted model's mean next-token loss on the whole batch, after its backward."""
    ids, shift = _batch(seq_len, dense.config.pad_token_id)
    positions = torch.arange(seq_len).expand(BATCH, -1)
    logits = dense(input_ids=ids, position_ids=positions).logits
    loss = F.cross_entropy(logits.flatten(0, 1), shift.flatten(), ignore_index=-100)
    loss.backward()
    return loss.detach()


def _converted_loss(model, state, seq_len: int) -> torch.Tensor:
    """The converted model's loss on this CP rank's tokens (zigzag), as parallelize's docstring
    says to feed it, after its backward; loss and gradients summed over the CP group."""
    from parallelkit.context_parallel import (context_parallel_positions,
                                              split_for_context_parallel)
    from parallelkit.distributed import comm

    ids, shift = _batch(seq_len, model.config.pad_token_id)
    cp_rank, cp = state.cp.rank, state.cp.size
    local_shift = split_for_context_parallel(shift, cp_rank, cp, dim=1)
    positions = context_parallel_positions(seq_len, cp_rank, cp).expand(BATCH, -1)
    out = model(input_ids=split_for_context_parallel(ids, cp_rank, cp, dim=1),
                position_ids=positions, labels=local_shift, shift_labels=local_shift)
    # A rank's loss is the mean over its tokens: weight it by their share to sum over CP.
    loss = out.loss * (local_shift != -100).sum() / (shift != -100).sum()
    loss.backward()
    for p in model.parameters():  # each CP rank saw its tokens only: partial sums over CP
        if p.grad is not None:
            p.grad = comm.all_reduce(p.grad, state.cp.group)
    return comm.all_reduce(loss.detach(), state.cp.group)


class KeepFloat64(TorchFunctionMode):
    """``x.float()`` / ``x.to(torch.float32)`` of a float64 tensor leave it float64.

    transformers computes some parts in float32 whatever the model's dtype (Gemma's RMSNorm
    multiplies by (1 + w.float()), rotary tables, the loss's ``logits.float()``). Where a
    reduction sits inside such a part (Gemma's norm weight gradient, summed over the tokens), a
    sequence-parallel sum of per-rank partials rounds at float32 and a correct plan would differ
    by ~1e-8: so both models run in float64 end to end."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if (func is torch.Tensor.float or func is torch.Tensor.to) and \
                args[0].dtype == torch.float64 and out.dtype == torch.float32:
            return args[0].to(out.device, copy=True)  # a new tensor, as the cast made
        return out


def _gradients_as_weights(dense) -> tuple[torch.nn.Module, set[str]]:
    """A copy of ``dense`` whose parameters hold its gradients (zeros where there is none), and
    the names of the parameters without one (conversion makes new parameters, but keeps names)."""
    expected = copy.deepcopy(dense)
    grads = dict(dense.named_parameters())
    for name, p in expected.named_parameters():
        grad = grads[name].grad
        p.data = torch.zeros_like(p) if grad is None else grad.detach().clone()
        p.grad = None
    return expected, {name for name, p in grads.items() if p.grad is None}


def _compare(loss, dense_loss, model, expected, no_grad, dense, config,
             seq_len) -> list[Row]:
    sizes = [getattr(config, n, None) or 0 for n in ("hidden_size", "intermediate_size")]
    terms = (LAYERS + 1) * (BATCH * seq_len + sizes[0] + (sizes[1] or 4 * sizes[0]) + VOCAB)
    rtol = SAFETY * torch.finfo(torch.float64).eps * math.sqrt(terms)
    grad_scale = _rms(torch.cat([p.grad.flatten() for p in dense.parameters()
                                 if p.grad is not None] or [torch.ones(1)]))
    rows = [_row("loss", loss, dense_loss, rtol, _rms(dense_loss))]
    wanted = dict(expected.named_parameters())
    for name, p in model.named_parameters():
        ref = wanted.pop(name, None)
        shape = tuple(p.shape)
        if ref is None:
            rows.append(Row(name, shape, math.nan, math.nan, False, "not in the expected model"))
        elif (p.grad is None) != (name in no_grad):
            side = "converted" if p.grad is None else "unconverted"
            rows.append(Row(name, shape, math.nan, math.nan, False, f"no gradient in the {side}"))
        elif p.grad is None:
            rows.append(Row(name, shape, 0.0, 0.0, True, "no gradient on either side"))
        elif p.grad.shape != ref.shape:
            rows.append(Row(name, shape, math.nan, math.nan, False,
                            f"expected shape {list(ref.shape)}"))
        else:
            rows.append(_row(name, p.grad, ref.detach(), rtol, max(_rms(ref), grad_scale)))
    rows += [Row(name, tuple(ref.shape), math.nan, math.nan, False, "missing in the converted")
             for name in wanted]
    return rows


def _row(name, actual, expected, rtol, scale) -> Row:
    """max |actual - expected| against atol + rtol·max|expected|, atol = rtol·scale."""
    diff = (actual - expected).abs().max().item()
    tol = rtol * (scale + expected.abs().max().item())
    return Row(name, tuple(actual.shape), diff, tol, diff <= tol)


def _rms(t: torch.Tensor) -> float:
    value = t.detach().double().square().mean().sqrt().item()
    return value if value > 0 else 1.0  # a tensor of zeros must not make atol 0


def _effective_options(model) -> dict:
    """parallelize's defaults as it resolved them, read from a column-parallel layer (tp = 1:
    none, both off)."""
    from parallelkit.tensor_parallel import ColumnParallelLinear

    layer = next((m for m in model.modules() if isinstance(m, ColumnParallelLinear)), None)
    return {name: bool(getattr(layer, name, False)) for name in ("sequence_parallel",
                                                                 "overlap_comm")}


def _fold(per_rank: list[list[Row]]) -> list[Row]:
    """One row per name over all ranks, with the worst rank's numbers: it fails if any rank's
    does (a shard may differ on one rank only) or a rank lacks it; failing ranks are noted."""
    folded = []
    for name in dict.fromkeys(row.name for rows in per_rank for row in rows):
        seen = {rank: row for rank, rows in enumerate(per_rank) for row in rows if row.name == name}
        bad = [rank for rank in range(len(per_rank)) if rank not in seen or not seen[rank].ok]
        worst = max(seen.values(), key=lambda row: (not row.ok, row.ratio))
        ranks = f"rank(s) {bad}" if 0 < len(bad) < len(per_rank) else ""
        folded.append(Row(name, seen[min(seen)].shape, worst.max_diff, worst.tolerance, not bad,
                          "; ".join(filter(None, [worst.note, ranks]))))
    return folded


def _describe(config, seq_len: int) -> str:
    name = (config.architectures or [type(config).__name__])[0]
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    return (f"{name} shrunk to {LAYERS} layers, {heads} heads ({kv} key/value) x {HEAD_DIM}, "
            f"hidden {config.hidden_size}, vocab {VOCAB}; float64, batch {BATCH} x {seq_len} "
            "tokens")
