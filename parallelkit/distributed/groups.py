"""Which process group a layer communicates on: the one given, else the MPU's, checked at use.

A layer built without an explicit group takes the MPU's group of its kind at construction. If
the MPU is later destroyed, or initialized again with another layout, that group is no longer
the one the program means, and a layer that kept it would compute silently with the old ranks.
So a layer holds a :class:`BoundGroup` and calls ``check(owner)`` in its forward: an identity
check against the MPU's current group, no communication. A group passed explicitly is the
caller's to manage and is never second-guessed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from parallelkit.distributed import comm, mpu


@dataclass(frozen=True)
class BoundGroup:
    """A layer's group of ``kind`` ("tp", "cp", ...), and whether it came from the MPU."""

    group: dist.ProcessGroup
    kind: str
    ranks: tuple[int, ...]
    from_mpu: bool

    @property
    def size(self) -> int:
        return len(self.ranks)

    def check(self, owner: object) -> None:
        """Raise if the layer took the MPU's group and the MPU now has another (or none)."""
        if not self.from_mpu:
            return
        name = type(owner).__name__
        fix = (f"build (or convert) the layer again after mpu.initialize(), or pass "
               f"{self.kind}_group= explicitly to bind it to a group of your own")
        if not mpu.is_initialized():
            raise RuntimeError(f"{name} was built on the MPU's {self.kind} group (ranks "
                               f"{list(self.ranks)}), but parallelkit.mpu has been destroyed "
                               f"since: {fix}")
        current = mpu.current().info(self.kind)
        if current.group is not self.group:
            raise RuntimeError(f"{name} was built on the MPU's {self.kind} group (ranks "
                               f"{list(self.ranks)}), but the MPU has been initialized again and "
                               f"its {self.kind} group is now ranks {list(current.ranks)}: the "
                               f"layer would compute with the old group; {fix}")

    def check_input(self, owner: object, local_check) -> None:
        """``local_check()`` (this rank's input checks) run so that if it fails on any member,
        every member raises (through ``comm.check_ranks_agree``): a layer that raised on one
        rank alone would leave the others waiting in its collective."""
        self.check(owner)
        comm.check_ranks_agree(self.group, type(owner).__name__, check=local_check,
                               ranks={"tp": "tensor-parallel", "cp": "context-parallel"}.get(
                                   self.kind, self.kind))


def bind_group(group: dist.ProcessGroup | None, kind: str) -> BoundGroup:
    """``group`` if given, else the MPU's group of ``kind`` (a clear error if there is none)."""
    if group is None:
        info = mpu.current().info(kind)
        return BoundGroup(info.group, kind, info.ranks, from_mpu=True)
    return BoundGroup(group, kind, tuple(dist.get_process_group_ranks(group)), from_mpu=False)


def resolve_group(group: dist.ProcessGroup | None, kind: str) -> dist.ProcessGroup:
    """``group`` if given, else the MPU's group of ``kind``, for code that uses it at once."""
    return group if group is not None else mpu.current().info(kind).group
