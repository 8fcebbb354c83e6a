"""``train_loop_per_worker``: the one training loop, for every objective.

Per epoch: train batches (forward -> objective.step -> backward/step per loss group),
epoch-end structural changes, validation, scheduler step, checkpoints (latest and
best-by-val), one metrics record. After the last epoch the best-val weights are scored
once on the test split. Model selection reads val only.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from mmbalance.config import Recipe, check_against_data
from mmbalance.data.shards import load_split, validate_shards
from mmbalance.engine.batches import InMemorySplit, epoch_seed
from mmbalance.engine.build import (add_param_group, build_bound_objective, build_model, build_optimizer,
                                    build_scheduler, resolve_device)
from mmbalance.engine.checkpoint import load_state, rng_state, save_state, set_rng_state
from mmbalance.engine.console import EpochTable, progress_bar
from mmbalance.engine.metrics import SumCounter, imbalance_ratio
from mmbalance.engine.steps import StepClock, evaluate, train_batch
from mmbalance.objectives import DistInfo
from mmbalance.tracking.records import RunRecord


@dataclass
class Progress:
    epoch: int = 0  # next epoch to run
    step: int = 0
    best_val: float = -math.inf
    best_epoch: int = -1


class Trainer:
    """Holds the run's pieces so each phase below stays a short function."""

    def __init__(self, recipe: Recipe, record: RunRecord, world: DistInfo, verbose: bool = True):
        self.recipe, self.record, self.world, self.verbose = recipe, record, world, verbose
        self.manifest = validate_shards(recipe.data.path)
        check_against_data(recipe, self.manifest)
        self.device = resolve_device(recipe.scaling.device)
        self.modalities = list(recipe.modalities)
        self._rebuild()
        self.progress = Progress()
        self.splits = {key: InMemorySplit(load_split(recipe.data.path, self.manifest, getattr(recipe.data, f"{key}_split"),
                                                     self.modalities), self.modalities)
                       for key in ("train", "val", "test")}

    def _rebuild(self) -> None:
        torch.manual_seed(self.recipe.seed)  # model initialisation
        self.model = build_model(self.recipe, self.manifest).to(self.device)
        self.objective = build_bound_objective(self.recipe, self.model)
        self.optimizer = build_optimizer(self.recipe.optim, self.model.parameters())
        self.scheduler = build_scheduler(self.recipe.optim, self.optimizer, self.recipe.schedule.epochs)

    # -- state -----------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "objective": self.objective.state_dict(),
                "head_counts": self.model.head_counts(), "progress": asdict(self.progress), "rng": rng_state()}

    def restore(self, state: dict[str, Any]) -> None:
        if any(self.model.head_counts()[m] > n for m, n in state["head_counts"].items()):
            self._rebuild()  # the saved model is smaller (best epoch came before a head was added)
        self._grow_heads(state["head_counts"])
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.objective.load_state_dict(state["objective"])
        self.progress = Progress(**state["progress"])
        set_rng_state(state["rng"])

    def _grow_heads(self, counts: dict[str, int]) -> None:
        for m, count in counts.items():
            while self.model.head_counts()[m] < count:
                self._add_head(m)

    def _add_head(self, modality: str) -> None:
        params = self.model.add_head(modality)
        # AUG's official code never gives new heads to the optimizer; the paper does.
        if getattr(self.objective, "trains_new_heads", True):
            add_param_group(self.optimizer, self.scheduler, params)

    # -- phases ----------------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> dict[str, float]:
        split, batch_size = self.splits["train"], self.recipe.schedule.batch_size
        steps = split.num_batches(batch_size, drop_last=True)
        counter, started = SumCounter(), time.perf_counter()
        batches = split.iterate(batch_size, shuffle_seed=epoch_seed(self.recipe.seed, epoch), drop_last=True, device=self.device)
        for batch, labels in progress_bar(batches, total=steps, desc=f"epoch {epoch}", enabled=self.verbose):
            clock = StepClock(self.progress.step, epoch, steps)
            train_batch(self.model, self.objective, self.optimizer, batch, labels, clock, self.world,
                        self.recipe.optim.grad_clip, counter)
            self.progress.step += 1
        elapsed = time.perf_counter() - started
        for change in self.objective.on_epoch_end(epoch, _stat_pairs(counter, self.world), self.world):
            self._add_head(change.modality)
        means = {k: v for k, v in counter.means(self.world.all_reduce_sum).items() if not k.startswith("stat:")}
        metrics = {f"train/{k}": v for k, v in means.items()}
        metrics["train/imbalance_ratio"] = imbalance_ratio(metrics, self.modalities, "train/")
        metrics["train/samples_per_s"] = steps * batch_size * self.world.world_size / max(elapsed, 1e-9)
        return metrics

    def score(self, key: str, epoch: int, prefix: str) -> dict[str, float]:
        batches = self.splits[key].iterate(self.recipe.eval.batch_size, shuffle_seed=None, drop_last=False, device=self.device)
        means = evaluate(self.model, self.objective, batches, epoch).means(self.world.all_reduce_sum)
        metrics = {f"{prefix}/{k}": v for k, v in means.items()}
        metrics[f"{prefix}/imbalance_ratio"] = imbalance_ratio(metrics, self.modalities, f"{prefix}/")
        return metrics

    def run_epoch(self, epoch: int) -> dict[str, float]:
        metrics = {"epoch": epoch, "lr": self.optimizer.param_groups[0]["lr"], **self.train_epoch(epoch)}
        metrics.update(self.score("val", epoch, "val"))
        metrics.update({f"objective/{k}": v for k, v in self.objective.epoch_metrics().items()})
        self.scheduler.step()
        self.progress.epoch = epoch + 1
        if metrics["val/acc_fused"] > self.progress.best_val:
            self.progress.best_val, self.progress.best_epoch = metrics["val/acc_fused"], epoch
            save_state(self.record.checkpoint_dir("best"), self.state())
        save_state(self.record.checkpoint_dir("latest"), self.state())
        return metrics

    def final_test(self) -> dict[str, Any]:
        """Score the best-val checkpoint on test, once."""
        self.restore(load_state(self.record.checkpoint_dir("best")))
        test = self.score("test", self.progress.best_epoch, "test")
        return {
            "val": {"best_acc": self.progress.best_val, "best_epoch": self.progress.best_epoch},
            "test": {"acc": test["test/acc_fused"],
                     "acc_per_modality": {m: test[f"test/acc_{m}"] for m in self.modalities},
                     "tcp_per_modality": {m: test[f"test/tcp_{m}"] for m in self.modalities},
                     "ucom_per_modality": {m: test[f"test/ucom_{m}"] for m in self.modalities},
                     "imbalance_ratio": test["test/imbalance_ratio"]},
            "epochs": self.recipe.schedule.epochs,
            "objective": self.recipe.objective.name,
            "seed": self.recipe.seed,
        }


def _stat_pairs(counter: SumCounter, world: DistInfo) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Objective statistics, summed over the epoch and over ranks."""
    return {k[len("stat:"):]: v for k, v in counter.pairs(world.all_reduce_sum).items() if k.startswith("stat:")}


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """``config = {"recipe": <recipe dict>, "output_dir": str, "resume": bool, "verbose": bool}``."""
    recipe = Recipe.model_validate(config["recipe"])
    record = RunRecord(config["output_dir"])
    verbose = config.get("verbose", True)
    trainer = Trainer(recipe, record, DistInfo(), verbose=verbose)
    if config.get("resume"):
        trainer.restore(load_state(record.checkpoint_dir("latest")))
        record.truncate_metrics(trainer.progress.epoch)
    else:
        record.write_config(recipe.to_dict())
        record.truncate_metrics(0)
    table = EpochTable(trainer.modalities, enabled=verbose)
    for epoch in range(trainer.progress.epoch, recipe.schedule.epochs):
        metrics = trainer.run_epoch(epoch)
        record.append_metrics(metrics)
        table.row(metrics)
    result = trainer.final_test()
    record.write_result(result)
    return result
