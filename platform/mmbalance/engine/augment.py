"""Train-time corruption (``data.train_corruptions``), shared by both batch sources.

The in-process source (``engine/sources.py``) and the Ray Data workers (``engine/ray_data.py``)
call the same ``TrainCorruptor.apply`` on numpy batches before they become tensors, so a
sample is corrupted identically on either path. The noise of a sample is a function of
(recipe seed, epoch, corruption, sample id) only (``data/corruptions.sample_rng``): fresh each
epoch, but the same whatever its batch, batch size, shuffle position, worker or worker count,
and the same again on a rerun or a resumed run, which is what keeps resume bit-exact. Only
training batches go through here; val and test are read clean.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from mmbalance.data.corruptions import CorruptionPlan, CorruptionSpec, apply_corruption, for_data
from mmbalance.engine.batches import epoch_seed


class TrainCorruptor:
    """The recipe's training corruptions, applied in order, with one seed per epoch."""

    def __init__(self, specs: Sequence[CorruptionSpec], seed: int):
        self.specs, self.seed = list(specs), seed
        self._plans: dict[int, CorruptionPlan] = {}

    @classmethod
    def from_recipe(cls, recipe: Any, manifest: Any = None) -> "TrainCorruptor | None":
        """None when the recipe corrupts nothing, so the clean path stays exactly as it was.
        With the manifest, specs are adapted to the data (``corruptions.for_data``): ``missing``
        fills the modality's normalisation mean, ``feature_noise`` gets the per-feature std of
        ``data.train_split``, read from the shards once here (on every Ray worker alike: the
        same files in the same order give the same bits). Without it, a ``feature_noise``
        without an explicit std fails when applied."""
        items = recipe.data.train_corruptions
        if not items:
            return None
        specs = [item.spec() for item in items]
        if manifest is not None:
            specs = for_data(specs, recipe.data.path, manifest, recipe.data.train_split)
        return cls(specs, recipe.seed)

    def plan(self, epoch: int) -> CorruptionPlan:
        # The shuffle's seed for this epoch (epoch_seed) also seeds the noise: the streams are
        # keyed apart by blake2b of (corruption, modality, level, sample id), so they do not correlate.
        plan = self._plans.get(epoch)
        if plan is None:  # one plan per epoch, not per batch; kept for the latest epoch only
            plan = CorruptionPlan(corruptions=self.specs, seed=epoch_seed(self.seed, epoch))
            self._plans = {epoch: plan}
        return plan

    def apply(self, batch_np: dict[str, np.ndarray], sample_ids: Sequence[Any], epoch: int) -> dict[str, np.ndarray]:
        """Row ``i`` of every array belongs to ``sample_ids[i]``; corrupted modalities come back
        as fresh writable arrays, every other key by reference. The input is not modified."""
        return apply_corruption(batch_np, sample_ids, self.plan(epoch))
