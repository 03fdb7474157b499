"""``python -m parallelkit layout``: build the MPU on N ranks and prove every group by a collective.

Without ``torchrun`` it forks ``--world`` local CPU processes joined by gloo; under ``torchrun`` it
runs on the launched ranks (NCCL on GPUs). Rank 0 prints the rank map, then for every rank the
members that one all-reduce over each of its groups actually reached.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from parallelkit.distributed import comm, mpu
from parallelkit.distributed.rank_groups import GROUP_KINDS


def prove_groups(tp: int, pp: int, cp: int, order: str) -> dict:
    """On one rank: initialize the MPU, all-reduce over each group, return what it saw."""
    state = mpu.initialize(tp=tp, pp=pp, cp=cp, order=order)
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    kinds = [k for k in GROUP_KINDS if getattr(state, k) is not None]  # middle stages: no embedding
    seen = {kind: [] for kind in GROUP_KINDS}
    listed = {kind: [] for kind in GROUP_KINDS}
    for kind in kinds:
        seen[kind] = comm.group_members(state.info(kind).group, device)
        listed[kind] = list(state.info(kind).ranks)
    return {"rank": state.global_rank, "seen": seen, "listed": listed,
            "description": mpu.describe(state)}


def report(results: list[dict]) -> tuple[str, bool]:
    """Rank 0's text: the rank map, then the members each all-reduce reached, rank by rank."""
    cells = {kind: max(len(_compact(r["seen"][kind])) for r in results) for kind in GROUP_KINDS}
    header = "  rank  " + "  ".join(f"{k:<{max(cells[k], len(k))}}" for k in GROUP_KINDS)
    lines = [results[0]["description"], "",
             "members reached by one all-reduce over each group (each member adds 1 at its rank):",
             header]
    ok = True
    for r in sorted(results, key=lambda r: r["rank"]):
        row = []
        for kind in GROUP_KINDS:
            match = r["seen"][kind] == r["listed"][kind]
            ok &= match
            text = _compact(r["seen"][kind]) + ("" if match else "!")
            row.append(f"{text:<{max(cells[kind], len(kind))}}")
        lines.append((f"  {r['rank']:>4}  " + "  ".join(row)).rstrip())
    lines.append("")
    lines.append("OK: every all-reduce reached exactly the ranks its group lists" if ok else
                 "MISMATCH: groups marked ! reached other ranks than they list")
    return "\n".join(lines), ok


def run(world: int, tp: int, pp: int, cp: int, order: str, timeout: float = 120.0) -> bool:
    """Run under torchrun if launched by it, else on ``world`` forked local gloo ranks."""
    if "WORLD_SIZE" in os.environ:
        return _run_under_torchrun(tp, pp, cp, order)
    from parallelkit.launch import LocalWorld

    with LocalWorld(world) as local:
        results = local.run(prove_groups, tp, pp, cp, order, timeout=timeout)
    text, ok = report(results)
    print(text)
    return ok


def _run_under_torchrun(tp: int, pp: int, cp: int, order: str) -> bool:
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)
    try:
        mine = prove_groups(tp, pp, cp, order)
        results = [None] * dist.get_world_size()
        dist.all_gather_object(results, mine)
        text, ok = report(results)
        if dist.get_rank() == 0:
            print(text)
        mpu.destroy()
        return ok
    finally:
        dist.destroy_process_group()


def _compact(ranks: list[int]) -> str:
    return str(ranks).replace(" ", "") if ranks else "-"
