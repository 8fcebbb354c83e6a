"""Where the loop runs: in-process, or on a Ray Train worker.

The only place the loop touches Ray's per-worker API (context, device, dataset shards,
checkpoints, report). In-process every call has a local meaning, so the loop is the same.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch

from mmbalance.config import Recipe
from mmbalance.data.manifest import Manifest
from mmbalance.engine.build import resolve_device
from mmbalance.engine.checkpoint import load_state
from mmbalance.engine.distributed import ProcessGroup
from mmbalance.engine.sources import BatchSource, InMemorySource


class Session:
    def __init__(self, config: dict[str, Any], group: ProcessGroup):
        self.config, self.group = config, group

    def device(self, recipe: Recipe) -> torch.device:
        return resolve_device(recipe.scaling.device)

    def source(self, recipe: Recipe, manifest: Manifest) -> BatchSource:
        return InMemorySource(recipe, manifest, self.device(recipe))

    def restored_state(self) -> dict[str, Any] | None:
        if not self.config.get("resume"):
            return None
        return load_state(Path(self.config["output_dir"]) / "checkpoints" / "latest")

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        return None

    def step_hook(self) -> Callable[[int, int], None] | None:
        return fault_hook(self.config.get("fault"), self.group.rank)


class RaySession(Session):
    def device(self, recipe: Recipe) -> torch.device:
        import ray.train.torch

        return ray.train.torch.get_device()

    def source(self, recipe: Recipe, manifest: Manifest) -> BatchSource:
        from mmbalance.engine.ray_data import RayShardSource

        return RayShardSource(recipe, manifest, self.device(recipe), train_cached=self.config.get("train_cached", False))

    def restored_state(self) -> dict[str, Any] | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()  # set after a worker-failure restart
        if checkpoint is None:
            return super().restored_state()
        with checkpoint.as_directory() as directory:
            return load_state(directory)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)  # a barrier: every rank calls it once per epoch


class TuneTrialSession(Session):
    """In-process training inside a Tune trial (search spaces with ``workers: 0``): reports
    go straight to Tune, so its scheduler sees every epoch."""

    def restored_state(self) -> dict[str, Any] | None:
        import ray.tune

        checkpoint = ray.tune.get_checkpoint()  # set when a trial is restored after an interruption
        if checkpoint is None:
            return super().restored_state()
        with checkpoint.as_directory() as directory:
            return load_state(directory)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        import ray.tune

        checkpoint = ray.tune.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.tune.report(metrics, checkpoint=checkpoint)


def make_session(config: dict[str, Any]) -> Session:
    if config.get("ray"):
        return RaySession(config, ProcessGroup.from_torch())
    if config.get("tune"):
        return TuneTrialSession(config, ProcessGroup())
    return Session(config, ProcessGroup())


def fault_hook(fault: dict[str, Any] | None, rank: int) -> Callable[[int, int], None] | None:
    """Test-only: kill this worker process once at (epoch, step) to exercise recovery.
    ``fault = {"rank": r, "epoch": e, "step": s, "once_file": path}``; the file makes it fire once."""
    if not fault or fault["rank"] != rank:
        return None
    marker = Path(fault["once_file"])

    def maybe_die(epoch: int, step: int) -> None:
        if epoch == fault["epoch"] and step == fault["step"] and not marker.exists():
            marker.touch()
            os._exit(17)

    return maybe_die
