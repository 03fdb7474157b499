"""How the kernels launch on a GPU: the options every launch passes, and flash attention's tiles.

``python -m parallelkit.aot_check`` compiles every launch for sm_90 at the shapes the ops use
and fails on any register spill: what is chosen here is what it holds to that.
"""

from __future__ import annotations

from dataclasses import dataclass

import triton

# 32-bit registers per block on sm_80/sm_90 (the whole register file of an SM); ptxas allows 255
# per thread at most.
_REGISTERS_PER_BLOCK = 65536
_MAX_REGISTERS_PER_THREAD = 255


def cuda_options(num_warps: int, num_stages: int | None = None) -> dict:
    """Triton's launch options for blocks of ``num_warps`` warps.

    ``maxnreg`` is the most registers a thread of such a block can have anyway. Stating it stops
    ptxas from trading a few bytes of spill for one more resident block per SM (it spilt 4 bytes
    at 40 registers in a norm kernel to fit a third 512-thread block), so that a kernel spills
    only when its tile truly does not fit, which ``python -m parallelkit.aot_check`` rules out.
    The interpreter ignores all three.
    """
    options = {"num_warps": num_warps,
               "maxnreg": min(_MAX_REGISTERS_PER_THREAD, _REGISTERS_PER_BLOCK // (32 * num_warps))}
    if num_stages is not None:
        options["num_stages"] = num_stages
    return options


@dataclass(frozen=True)
class Tiles:
    """One kernel's launch: BLOCK_M queries x BLOCK_N keys per tile, and on a GPU its warps and
    software-pipeline stages (None in the interpreter, which ignores them)."""

    block_m: int
    block_n: int
    num_warps: int | None = None
    num_stages: int | None = None

    def meta(self, head_dim: int) -> dict:
        """The launch's tile constexprs (BLOCK_D: tl.dot needs every dim >= 16) and options."""
        meta = dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n,
                    BLOCK_D=max(16, triton.next_power_of_2(head_dim)))
        if self.num_warps is not None:
            meta.update(cuda_options(self.num_warps, self.num_stages))
        return meta


# Flash attention's tiles (kernels/flash_attention.py) by (kernel, dots on tensor cores, head
# dim <= 64). Sized so that no kernel spills registers on sm_90; not tuned for speed.
# - 16-bit inputs (tensor cores): 64 x 64 tiles. dk/dv streams 32 queries per step: it holds two
#   [64, D] float32 accumulators plus its k and v tiles, and with 64 queries ptxas took all 255
#   registers at D = 128 and spilt at ragged shapes.
# - float32 dots (float32 inputs, or a float32 dout next to 16-bit q, k, v, as ring attention's
#   backward passes it): IEEE dots run on the FMA units, unrolled over the whole reduction dim,
#   each thread holding its rows and columns of both operands. 64 x 64 tiles spilt up to 12 KB
#   per thread; small tiles over 8 warps (one to four scores per thread) and no software
#   pipelining where it cost registers (in dk/dv the prefetched tiles took ~100) keep every
#   kernel at <= 110 registers.
ATTENTION_TILES = {
    ("forward", True, True): Tiles(64, 64, 4, 2),
    ("forward", True, False): Tiles(64, 64, 8, 2),
    ("dq", True, True): Tiles(64, 64, 4, 2),
    ("dq", True, False): Tiles(64, 64, 8, 2),
    ("dkdv", True, True): Tiles(32, 64, 4, 2),
    ("dkdv", True, False): Tiles(32, 64, 8, 2),
    ("forward", False, True): Tiles(32, 32, 8, 1),
    ("forward", False, False): Tiles(16, 16, 8, 2),
    ("dq", False, True): Tiles(32, 32, 8, 1),
    ("dq", False, False): Tiles(16, 16, 8, 1),
    ("dkdv", False, True): Tiles(32, 16, 8, 1),
    ("dkdv", False, False): Tiles(16, 16, 8, 1),
}
