"""Each region function's forward and backward against its definition, on random data.

Every rank can regenerate every other rank's input and upstream gradient from their seeds, so the
definitions below are plain torch over the per-rank lists, with no communication.
"""

import pytest
import torch

from parallelkit import mpu
from parallelkit.distributed import mappings
from parallelkit.testing import run_on_ranks

SHAPE = (4, 3, 8)  # [s, b, h]: s and h divisible by every tp tested
BATCH_FIRST_SHAPE = (3, 4, 8)  # [b, s, h], for the sequence-parallel regions with dim=1


def per_rank(seed, ranks, shape=SHAPE):
    return [torch.randn(shape, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(seed * 100 + r)) for r in ranks]


def chunk(t, dim, i, n):
    return t.chunk(n, dim)[i]


# name -> (call, forward definition, backward definition); xs, gs: every TP rank's input and
# upstream gradient (for outputs, gs have the output's shape), r: this rank's TP rank, n: tp.
DEFINITIONS = {
    "copy_to_tp_region": (mappings.copy_to_tp_region,
                          lambda xs, r, n: xs[r], lambda gs, r, n: sum(gs)),
    "reduce_from_tp_region": (mappings.reduce_from_tp_region,
                              lambda xs, r, n: sum(xs), lambda gs, r, n: gs[r]),
    "scatter_to_tp_region": (mappings.scatter_to_tp_region,
                             lambda xs, r, n: chunk(xs[r], -1, r, n),
                             lambda gs, r, n: torch.cat(gs, -1)),
    "gather_from_tp_region": (mappings.gather_from_tp_region,
                              lambda xs, r, n: torch.cat(xs, -1),
                              lambda gs, r, n: chunk(gs[r], -1, r, n)),
    "scatter_to_sp_region": (mappings.scatter_to_sp_region,
                             lambda xs, r, n: chunk(xs[r], 0, r, n),
                             lambda gs, r, n: torch.cat(gs, 0)),
    "gather_from_sp_region": (mappings.gather_from_sp_region,
                              lambda xs, r, n: torch.cat(xs, 0),
                              lambda gs, r, n: chunk(sum(gs), 0, r, n)),
    "gather_from_sp_region(no grad reduce)": (
        lambda x, g: mappings.gather_from_sp_region(x, g, tp_output_grad=False),
        lambda xs, r, n: torch.cat(xs, 0), lambda gs, r, n: chunk(gs[r], 0, r, n)),
    "reduce_scatter_to_sp_region": (mappings.reduce_scatter_to_sp_region,
                                    lambda xs, r, n: chunk(sum(xs), 0, r, n),
                                    lambda gs, r, n: torch.cat(gs, 0)),
    "scatter_to_sp_region(dim=1)": (lambda x, g: mappings.scatter_to_sp_region(x, g, dim=1),
                                    lambda xs, r, n: chunk(xs[r], 1, r, n),
                                    lambda gs, r, n: torch.cat(gs, 1)),
    "gather_from_sp_region(dim=1)": (lambda x, g: mappings.gather_from_sp_region(x, g, dim=1),
                                     lambda xs, r, n: torch.cat(xs, 1),
                                     lambda gs, r, n: chunk(sum(gs), 1, r, n)),
    "gather_from_sp_region(dim=1, no grad reduce)": (
        lambda x, g: mappings.gather_from_sp_region(x, g, tp_output_grad=False, dim=1),
        lambda xs, r, n: torch.cat(xs, 1), lambda gs, r, n: chunk(gs[r], 1, r, n)),
    "reduce_scatter_to_sp_region(dim=1)": (
        lambda x, g: mappings.reduce_scatter_to_sp_region(x, g, dim=1),
        lambda xs, r, n: chunk(sum(xs), 1, r, n), lambda gs, r, n: torch.cat(gs, 1)),
}


def _check_mapping(name, tp):
    state = mpu.initialize(tp=tp)
    call, forward_def, backward_def = DEFINITIONS[name]
    r = state.tp.rank
    xs = per_rank(1, state.tp.ranks, BATCH_FIRST_SHAPE if "dim=1" in name else SHAPE)
    x = xs[r].clone().requires_grad_()
    y = call(x, state.tp.group)
    torch.testing.assert_close(y, forward_def(xs, r, tp), rtol=1e-12, atol=1e-12)
    gs = per_rank(2, state.tp.ranks, y.shape)  # upstream gradients have the output's shape
    y.backward(gs[r])
    torch.testing.assert_close(x.grad, backward_def(gs, r, tp), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("name", list(DEFINITIONS))
def test_forward_and_backward_match_definition(name, tp):
    run_on_ranks(_check_mapping, 4, name, tp)


def _sequence_not_divisible_along_dim_1():
    group = mpu.initialize(tp=4).tp.group
    x = torch.randn(4, 6, 8)  # [b, s, h]: b divides by 4, s does not
    for split in (mappings.scatter_to_sp_region, mappings.reduce_scatter_to_sp_region):
        with pytest.raises(ValueError, match=r"shape \(4, 6, 8\) along dim 1 into 4 equal parts: "
                                             r"6 is not divisible by 4"):
            split(x, group, dim=1)


def test_sp_regions_refuse_a_sequence_that_does_not_split():
    run_on_ranks(_sequence_not_divisible_along_dim_1, 4)
