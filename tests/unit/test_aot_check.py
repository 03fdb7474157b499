"""python -m parallelkit.aot_check: every kernel compiles for sm_90 at the launchers' own choices
with no register spill (on a subset of the cases, ~1 minute on 2 CPUs), and a tile known to spill
fails it, naming the kernel. The check runs in its own process: this one imported the kernels
interpreted."""

import json
import os
import subprocess
import sys
from pathlib import Path

from parallelkit.kernels import cross_entropy, flash_attention, norms
from parallelkit.kernels._launch import ATTENTION_TILES

ROOT = Path(__file__).resolve().parents[2]
# One launch of each kernel: the split norm path's four (residual on), the fused path's two, the
# cross-entropy's two, and attention's three with the 16-bit and the float32 tiles (float32 spilt
# up to 12 KB per thread before it had tiles of its own) at the GPU test's ragged shape.
SUBSET = "|".join(["norm/layer/tp2/H4096/bf16/residual", "norm/rms/tp1/H4096/bf16/residual",
                   "cross_entropy/V32000@0/T4096/bf16$", "attention/D128/(bf16|fp32)/ragged"])
KERNELS = {name for module in (norms, cross_entropy, flash_attention) for name in vars(module)
           if name.endswith("_kernel")}

FAILING_CASES = """
import sys
import torch
from parallelkit.aot_check import Case
from parallelkit.aot_check.__main__ import main

def float32_attention_in_64x64_tiles():  # the 16-bit tiles: ptxas spills kilobytes per thread
    from parallelkit.kernels.flash_attention import flash_attention_block_forward
    q = torch.empty(1, 8, 4096, 128, device="cuda")
    ranges = torch.zeros(1, 4096, dtype=torch.int32, device="cuda")
    flash_attention_block_forward(q, q, q, ranges, ranges, block_m=64, block_n=64)

def head_dim_over_the_maximum():  # the launcher refuses: the case fails, it is not skipped
    from parallelkit.kernels.flash_attention import flash_attention_block_forward
    q = torch.empty(1, 1, 16, 256, device="cuda")
    ranges = torch.zeros(1, 16, dtype=torch.int32, device="cuda")
    flash_attention_block_forward(q, q, q, ranges, ranges)

sys.exit(main(["--jobs", "1"], cases=[Case("fp32-64x64", float32_attention_in_64x64_tiles),
                                      Case("d256", head_dim_over_the_maximum)]))
"""


def run(args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)


def test_every_kernel_compiles_for_sm90_without_spills(tmp_path):
    result = run(["-m", "parallelkit.aot_check", "--only", SUBSET, "--json",
                  str(tmp_path / "check.json")])
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "OK: no compile error, no spill" in result.stdout
    report = json.loads((tmp_path / "check.json").read_text())
    launches = report["launches"]
    assert {launch["kernel"] for launch in launches} == KERNELS
    for launch in launches:
        assert launch["error"] is None and launch["problems"] == [], launch
        assert launch["spill_bytes"] == 0 and 0 < launch["registers"] <= 255, launch
        assert launch["shared_bytes"] <= report["shared_limit_bytes"], launch

    # What was compiled is what the launcher chose for a GPU, not the interpreter's tiles.
    tiles = ATTENTION_TILES[("forward", False, False)]
    forward = next(launch for launch in launches
                   if launch["case"] == "attention/D128/fp32/ragged/gpu-test"
                   and launch["kernel"] == "_attention_block_forward_kernel")
    assert (forward["constexprs"]["BLOCK_M"], forward["constexprs"]["BLOCK_N"],
            forward["num_warps"], forward["num_stages"]) == (
        str(tiles.block_m), str(tiles.block_n), tiles.num_warps, tiles.num_stages)
    assert forward["grid"] == [-(-300 // tiles.block_m), 2 * 8]


def test_a_spilling_tile_or_a_refused_launch_fails_the_check():
    result = run(["-c", FAILING_CASES])
    assert result.returncode == 1, result.stdout[-4000:] + result.stderr[-4000:]
    spilt = [line for line in result.stdout.splitlines()
             if line.startswith("FAIL _attention_block_forward_kernel [fp32-64x64]")]
    assert len(spilt) == 1 and "BLOCK_M=64 BLOCK_N=64" in spilt[0], result.stdout[-4000:]
    assert "bytes per thread to local memory" in spilt[0]
    assert "FAIL (launcher) [d256]" in result.stdout and "head dim 256" in result.stdout
