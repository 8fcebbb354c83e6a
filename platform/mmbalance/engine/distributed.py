"""Every collective the engine uses, in one place.

Gradients are averaged explicitly after each loss group's backward (one flat all-reduce)
instead of through a DistributedDataParallel wrapper. DDP's reducer assumes one backward
per forward over a fixed parameter set; AUG takes one backward and one optimizer step per
modality from a single forward and adds heads mid-run (docs/methods/aug.md §4.8), and ARL/ARM
need identical coefficients on every rank. With explicit averaging, a data-parallel step
is by construction the single-process step on the global batch: every rank holds the same
parameters, averages the same gradients, and decides with all-reduced statistics. An
objective's gradient hook (``perturb_gradients``) runs on the averaged gradients, with a
generator seeded alike on every rank, so gradient modulation and noise keep that property.
The price is no overlap of communication with backward compute.

With ``world_size == 1`` every operation is the identity, so the in-process path pays nothing.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor, nn

from mmbalance.objectives import DistInfo


class ProcessGroup:
    """The engine's view of the data-parallel group (default torch.distributed group)."""

    def __init__(self, rank: int = 0, world_size: int = 1):
        self.rank, self.world_size = rank, world_size

    @classmethod
    def from_torch(cls) -> "ProcessGroup":
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return cls()
        return cls(dist.get_rank(), dist.get_world_size())

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def info(self) -> DistInfo:
        """What objectives may use: SUM all-reduce and broadcast of rank 0's decision."""
        return DistInfo(
            rank=self.rank,
            world_size=self.world_size,
            all_reduce_sum=self.all_reduce_sum,
            broadcast=self.broadcast_object,
        )

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        if not self.is_distributed:
            return tensor
        import torch.distributed as dist

        out = tensor.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        if not self.is_distributed:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def average_gradients(self, params: Iterable[nn.Parameter]) -> None:
        """Mean of every gradient over ranks, in one collective.

        A parameter whose grad is None on every rank stays None (so the optimizer still
        skips it, as set_to_none intends); one that has a grad on any rank gets the mean,
        counting a missing grad as zeros. ``engine/steps.py`` calls the objective's
        ``perturb_gradients`` right after this, on the averaged gradients."""
        if not self.is_distributed:
            return
        params = [p for p in params if p.requires_grad]
        if not params:
            return
        has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=params[0].device)
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        packed = self.all_reduce_sum(torch.cat([flat.to(torch.float32), has_grad]))
        flat, has_grad = packed[: -len(params)] / self.world_size, packed[-len(params) :]
        offset = 0
        for p, flag in zip(params, has_grad.tolist()):
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).to(p.dtype) if flag > 0 else None
            offset += n

    def broadcast_module(self, module: nn.Module) -> None:
        """Copy rank 0's parameters and buffers to every rank (start of training, and
        BatchNorm running statistics before each evaluation and checkpoint, as DDP does)."""
        if not self.is_distributed:
            return
        import torch.distributed as dist

        with torch.no_grad():
            for tensor in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(tensor.data, src=0)
