"""Where a worker's batches come from: the in-process reader or Ray Data (``engine/ray_data.py``).

Both give the same thing: per-rank training batches for an epoch (shuffled as a function of
seed and epoch, and corrupted by ``data.train_corruptions`` if any, through the one
``engine/augment.TrainCorruptor``), and evaluation batches of this rank's share of a split
(never dropped nor corrupted, so summed counts equal the split size).
"""

from __future__ import annotations

from functools import partial
from typing import Iterator, Protocol

import torch

from mmbalance.config import Recipe
from mmbalance.data.manifest import Manifest
from mmbalance.data.shards import load_split
from mmbalance.engine.augment import TrainCorruptor
from mmbalance.engine.batches import Batch, InMemorySplit, epoch_seed


class BatchSource(Protocol):
    def train_batches(self, epoch: int, batch_size: int) -> tuple[Iterator[Batch], int]:
        """(batches of ``batch_size`` for this rank, number of steps this epoch)."""

    def eval_batches(self, key: str, batch_size: int) -> Iterator[Batch]:
        """This rank's share of split ``key`` ("val" or "test")."""


class InMemorySource:
    """Reads the splits once into memory (single process, or tests with a fixed data order)."""

    def __init__(self, recipe: Recipe, manifest: Manifest, device: torch.device):
        self.seed, self.device = recipe.seed, device
        self.corruptor = TrainCorruptor.from_recipe(recipe, manifest)
        modalities = list(recipe.modalities)
        self.splits = {
            key: InMemorySplit(
                load_split(recipe.data.path, manifest, getattr(recipe.data, f"{key}_split"), modalities), modalities
            )
            for key in ("train", "val", "test")
        }

    def train_batches(self, epoch: int, batch_size: int) -> tuple[Iterator[Batch], int]:
        split = self.splits["train"]
        transform = None if self.corruptor is None else partial(self.corruptor.apply, epoch=epoch)
        batches = split.iterate(
            batch_size,
            shuffle_seed=epoch_seed(self.seed, epoch),
            drop_last=True,
            device=self.device,
            transform=transform,
        )
        return batches, split.num_batches(batch_size, drop_last=True)

    def eval_batches(self, key: str, batch_size: int) -> Iterator[Batch]:
        return self.splits[key].iterate(batch_size, shuffle_seed=None, drop_last=False, device=self.device)
