"""In-process batching of an in-memory split (the path used without Ray Data).

The training order is a pure function of (seed, epoch), so a resumed run sees exactly the
batches an uninterrupted one would. Evaluation never drops samples. An optional numpy
``transform`` (train-time corruption, ``engine/augment.py``) sees each batch with its sample
ids; without one, batches are built exactly as before.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from mmbalance.data.shards import SplitArrays

Batch = tuple[dict[str, Tensor], Tensor]
# (numpy batch {modality: [B, *shape]}, its B sample ids) -> numpy batch of the same shapes
BatchTransform = Callable[[dict[str, np.ndarray], Sequence[str]], dict[str, np.ndarray]]


class InMemorySplit:
    def __init__(self, arrays: SplitArrays, modalities: list[str]):
        self.modalities = modalities
        # A private, writable copy: Arrow-backed arrays are read-only.
        self.tensors = {m: torch.from_numpy(np.array(arrays.modalities[m], copy=True)) for m in modalities}
        self.labels = torch.from_numpy(arrays.labels)
        self.sample_ids = np.asarray(arrays.sample_ids, dtype=object)  # [N]

    def __len__(self) -> int:
        return int(self.labels.numel())

    def num_batches(self, batch_size: int, drop_last: bool) -> int:
        return len(self) // batch_size if drop_last else -(-len(self) // batch_size)

    def iterate(
        self,
        batch_size: int,
        *,
        shuffle_seed: int | None,
        drop_last: bool,
        device: torch.device,
        transform: BatchTransform | None = None,
    ) -> Iterator[Batch]:
        if shuffle_seed is None:
            order = torch.arange(len(self))
        else:
            order = torch.randperm(len(self), generator=torch.Generator().manual_seed(shuffle_seed))
        for i in range(self.num_batches(batch_size, drop_last)):
            idx = order[i * batch_size : (i + 1) * batch_size]
            if transform is None:
                batch = {m: t[idx].to(device, non_blocking=True) for m, t in self.tensors.items()}
            else:
                batch = self._transformed(idx, transform, device)
            yield batch, self.labels[idx].to(device, non_blocking=True)

    def _transformed(self, idx: Tensor, transform: BatchTransform, device: torch.device) -> dict[str, Tensor]:
        # t[idx] is a fresh CPU tensor, so its numpy view can be handed out without a copy.
        arrays = transform({m: t[idx].numpy() for m, t in self.tensors.items()}, self.sample_ids[idx.numpy()])
        return {m: torch.from_numpy(arrays[m]).to(device, non_blocking=True) for m in self.tensors}


def epoch_seed(seed: int, epoch: int) -> int:
    """Distinct, reproducible shuffle seed per epoch."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])
