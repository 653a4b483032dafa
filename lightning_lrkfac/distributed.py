"""Data-parallel K-FAC: sum the sketches over ranks, and optionally split the per-layer work.

Every rank holds the same O(k·d) curvature state. Once per factor update, the pending
sums (sketch F·V, diag B, trace: all linear in the statistics) go into one flat
all-reduce, so every rank folds the statistics of the global batch. Dense d×d factors are
never communicated unless the factor is dense itself (exact mode).

With ``layerwise`` work, each layer has an owner, chosen by a greedy cost balance.
Only the owner refreshes the layer's basis and preconditions its gradient. The results
go out with one broadcast per owner rank: the new bases on refresh steps (O(k·d)), the
preconditioned gradients every step (gradient-sized).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

try:  # torch ≥ 2.4 (FSDP2's sharded parameters)
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - older torch: nothing is ever sharded
    DTensor = None  # type: ignore[assignment,misc]


def is_dtensor(tensor: object) -> bool:
    return DTensor is not None and isinstance(tensor, DTensor)


def local_tensor(tensor: Tensor) -> Tensor:
    """This rank's part of a DTensor (a view), or the tensor itself."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def balanced_owners(costs: Sequence[float], world_size: int) -> list[int]:
    """Owner rank of each item: largest cost first onto the least-loaded rank (LPT greedy).

    Deterministic (ties go to the lower index / lower rank), so every rank computes the same map.
    """
    loads = [0.0] * world_size
    owners = [0] * len(costs)
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owners[index] = rank
        loads[rank] += costs[index]
    return owners


def _flatten(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _unflatten_into(flat: Tensor, tensors: Sequence[Tensor]) -> None:
    offset = 0
    for tensor in tensors:
        count = tensor.numel()
        tensor.copy_(flat[offset : offset + count].view_as(tensor))
        offset += count


@dataclass
class Communicator:
    """The collectives the callback needs, with a count of the bytes each rank sends into them."""

    rank: int = 0
    world_size: int = 1
    bytes_by_kind: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_default_group(cls) -> Communicator:
        rank, world_size = world()
        return cls(rank, world_size)

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def _count(self, kind: str, tensor: Tensor) -> None:
        self.bytes_by_kind[kind] = self.bytes_by_kind.get(kind, 0) + tensor.numel() * tensor.element_size()

    def all_reduce_sum(self, tensors: Sequence[Tensor], kind: str = "statistics") -> None:
        """In-place sum over ranks of same-dtype tensors, as one flat collective."""
        if not self.active or not tensors:
            return
        flat = _flatten(tensors)
        self._count(kind, flat)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        _unflatten_into(flat, tensors)

    def all_reduce_mean(self, tensors: Sequence[Tensor], kind: str) -> None:
        """In-place mean over ranks (one flat collective)."""
        self.all_reduce_sum(tensors, kind)
        if self.active:
            for tensor in tensors:
                tensor.div_(self.world_size)

    def broadcast_from_owners(self, groups: Sequence[Sequence[Tensor]], owners: Sequence[int], kind: str) -> None:
        """For each owner rank, one broadcast of the tensors of the groups it owns (in place elsewhere)."""
        if not self.active:
            return
        for source in range(self.world_size):
            tensors = [t for group, owner in zip(groups, owners) if owner == source for t in group]
            if not tensors:
                continue
            flat = (
                _flatten(tensors)
                if source == self.rank
                else torch.empty(sum(t.numel() for t in tensors), dtype=tensors[0].dtype, device=tensors[0].device)
            )
            if source == self.rank:
                self._count(kind, flat)
            dist.broadcast(flat, src=source)
            if source != self.rank:
                _unflatten_into(flat, tensors)
