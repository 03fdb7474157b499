"""Collectives on parallelkit's groups. The one module that talks to the communication backend."""

from __future__ import annotations

import torch
import torch.distributed as dist


def group_members(group: dist.ProcessGroup, device: torch.device | str = "cpu") -> list[int]:
    """Global ranks of the processes that actually answer a collective on ``group``.

    Each member adds 1 at its own global rank to a vector all-reduced (SUM) over the group by the
    native op, so the result proves membership through the communicator itself rather than
    trusting its bookkeeping. A count other than 0 or 1 means a broken group and raises.
    """
    from parallelkit._native import native

    counts = native.group_membership(group, dist.get_rank(), dist.get_world_size(),
                                     torch.device(device)).tolist()
    if any(c not in (0, 1) for c in counts):
        raise RuntimeError(f"group membership counts {counts} are not all 0 or 1: some rank "
                           "joined the all-reduce twice or with another group")
    return [rank for rank, count in enumerate(counts) if count == 1]
