"""``train_loop_per_worker``: the one training loop, for every objective, in-process or on a
Ray Train worker.

Per epoch: train batches (forward -> objective.step -> backward/average/step per loss
group), validation, best-by-val snapshot, epoch-end decisions and structural changes (after
validation, as AUG's official code orders them: a head added at a check epoch is scored from
the next epoch on), scheduler step, checkpoints (latest and best-by-val), one report. In the
last epoch, before its report, the best-val weights are scored once on the test split, so the
result exists even where a scheduler ends the run at its final report. Model selection reads
val only.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from mmbalance.config import Recipe, check_against_data
from mmbalance.data.shards import validate_shards
from mmbalance.engine.build import (
    add_param_group,
    build_bound_objective,
    build_model,
    build_optimizer,
    build_scheduler,
    load_model_state,
)
from mmbalance.engine.checkpoint import rng_state, save_state, set_rng_state
from mmbalance.engine.console import EpochTable, progress_bar, startup_line, write_line
from mmbalance.engine.distributed import ProcessGroup
from mmbalance.engine.metrics import SumCounter, imbalance_ratio
from mmbalance.engine.precision import MixedPrecision
from mmbalance.engine.run_spec import RunSpec
from mmbalance.engine.session import Session, make_session
from mmbalance.engine.sources import BatchSource
from mmbalance.engine.steps import StepClock, evaluate, train_batch
from mmbalance.tracking.records import RunRecord
from mmbalance.tracking.wandb_tracker import WandbTracker

StepHook = Callable[[int, int], None]  # (epoch, step within epoch) -> None


@dataclass
class Progress:
    epoch: int = 0  # next epoch to run
    step: int = 0
    best_val: float = -math.inf
    best_epoch: int = -1


class Trainer:
    """Holds the run's pieces so each phase below stays a short function."""

    def __init__(
        self,
        recipe: Recipe,
        manifest,
        group: ProcessGroup,
        source: BatchSource,
        device: torch.device,
        on_step: StepHook | None = None,
        verbose: bool = False,
    ):
        self.recipe, self.manifest, self.group, self.source, self.device = recipe, manifest, group, source, device
        self.on_step, self.verbose = on_step, verbose
        self.world = group.info()
        self.modalities = list(recipe.modalities)
        if recipe.schedule.batch_size % group.world_size:
            raise ValueError(
                f"schedule.batch_size={recipe.schedule.batch_size} is not divisible by {group.world_size} workers"
            )
        self.batch_size = recipe.schedule.batch_size // group.world_size  # per rank
        if self.batch_size % recipe.optim.accumulate:
            raise ValueError(
                f"optim.accumulate={recipe.optim.accumulate} does not divide the per-worker batch of {self.batch_size} "
                f"(schedule.batch_size={recipe.schedule.batch_size} over {group.world_size} workers)"
            )
        self._rebuild()
        self.progress = Progress()
        self.best: dict[str, Any] | None = None  # best-val model, kept on every rank
        self.resumed_from_epoch: int | None = None  # set when a checkpoint was restored
        self._epoch_stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # the last train epoch's

    def _rebuild(self) -> None:
        torch.manual_seed(self.recipe.seed)  # model initialisation, identical on every rank
        self.model = build_model(self.recipe, self.manifest).to(self.device)
        self.group.broadcast_module(self.model)
        self.objective = build_bound_objective(self.recipe, self.model)
        self.optimizer = build_optimizer(self.recipe.optim, self.model.parameters())
        self.precision = MixedPrecision(self.recipe.optim.precision, self.device)
        self.scheduler = build_scheduler(self.recipe.optim, self.optimizer, self.recipe.schedule.epochs)

    # -- state -----------------------------------------------------------------------------
    def model_state(self) -> dict[str, Any]:
        return {
            "model": copy.deepcopy(self.model.state_dict()),
            "objective": copy.deepcopy(self.objective.state_dict()),
            "head_counts": self.model.head_counts(),
        }

    def state(self) -> dict[str, Any]:
        return {
            **self.model_state(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "grad_scaler": self.precision.state_dict(),
            "progress": asdict(self.progress),
            "rng": rng_state(),
            "best": self.best,
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.load_model_state(state)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.precision.load_state_dict(state.get("grad_scaler"))
        self.progress = Progress(**state["progress"])
        self.best = state["best"]
        set_rng_state(state["rng"])

    def load_model_state(self, state: dict[str, Any]) -> None:
        if any(self.model.head_counts()[m] > n for m, n in state["head_counts"].items()):
            self._rebuild()  # the saved model is smaller (it predates a head addition)
        load_model_state(self.model, self.objective, state, on_new_head=self._train_new_head)

    def _add_head(self, modality: str) -> None:
        self._train_new_head(self.model.add_head(modality))

    def _train_new_head(self, params) -> None:
        # AUG's official code never gives new heads to the optimizer; the paper does. A head the
        # optimizer does not step is frozen outright: it still passes gradient to the encoder and
        # the shared head, but never holds a .grad that clipping or the rank average could count.
        if self.objective.trains_new_heads:
            add_param_group(self.optimizer, self.scheduler, params)
        else:
            for param in params:
                param.requires_grad_(False)

    # -- phases ----------------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> dict[str, float]:
        counter, started = SumCounter(), time.perf_counter()
        batches, steps = self.source.train_batches(epoch, self.batch_size)
        done = 0
        for batch, labels in progress_bar(batches, total=steps, desc=f"epoch {epoch}", enabled=self.verbose):
            if self.on_step is not None:
                self.on_step(epoch, done)
            clock = StepClock(self.progress.step, epoch, steps, self.recipe.seed)
            train_batch(
                self.model,
                self.objective,
                self.optimizer,
                batch,
                labels,
                clock,
                self.world,
                self.group,
                self.recipe.optim.grad_clip,
                counter,
                self.precision,
                self.recipe.optim.accumulate,
            )
            self.progress.step += 1
            done += 1
        elapsed = time.perf_counter() - started
        self._epoch_stats = _stat_pairs(counter, self.group)  # read by end_epoch, after validation
        self.group.broadcast_module(self.model)  # BatchNorm running stats: rank 0's, as DDP does
        means = {k: v for k, v in counter.means(self.group.all_reduce_sum).items() if not k.startswith("stat:")}
        metrics = {f"train/{k}": v for k, v in means.items()}
        metrics["train/imbalance_ratio"] = imbalance_ratio(metrics, self.modalities, "train/")
        metrics["train/samples_per_s"] = done * self.batch_size * self.group.world_size / max(elapsed, 1e-9)
        return metrics

    def end_epoch(self, epoch: int) -> None:
        """The objective's epoch-end decisions from this epoch's reduced statistics; every rank
        applies the same structural changes (rank 0 decides inside the objective)."""
        changes = self.objective.on_epoch_end(epoch, self._epoch_stats, self.world)
        for change in changes:
            self._add_head(change.modality)
        if changes:  # a new head is initialised from each rank's RNG: make every rank hold rank 0's
            self.group.broadcast_module(self.model)

    def score(self, key: str, epoch: int) -> dict[str, float]:
        batches = self.source.eval_batches(key, self.recipe.eval.batch_size)
        counter = evaluate(self.model, self.objective, batches, epoch, self.precision)
        metrics = {f"{key}/{k}": v for k, v in counter.means(self.group.all_reduce_sum).items()}
        metrics.update(self._eval_shares(key, counter.counts["acc_fused"]))
        metrics[f"{key}/imbalance_ratio"] = imbalance_ratio(metrics, self.modalities, f"{key}/")
        return metrics

    def _eval_shares(self, key: str, local_count: torch.Tensor) -> dict[str, float]:
        """How many samples were scored, and the largest share one rank scored (evidence
        that the split is divided across ranks and nothing is dropped)."""
        per_rank = torch.zeros(self.group.world_size, dtype=torch.float64, device=local_count.device)
        per_rank[self.group.rank] = local_count
        per_rank = self.group.all_reduce_sum(per_rank).cpu()
        total = float(per_rank.sum())
        return {f"{key}/samples": total, f"{key}/max_rank_share": float(per_rank.max()) / max(total, 1.0)}

    def run_epoch(self, epoch: int) -> dict[str, float]:
        # ``epochs_done`` is the schedulers' clock (ASHA's time_attr): 1 after the first epoch.
        metrics = {
            "epoch": epoch,
            "epochs_done": epoch + 1,
            "lr": self.optimizer.param_groups[0]["lr"],
            **self.train_epoch(epoch),
        }
        metrics.update(self.score("val", epoch))
        metrics["improved"] = metrics["val/acc_fused"] > self.progress.best_val
        if metrics["improved"]:  # the same decision on every rank: val metrics are all-reduced
            self.progress.best_val, self.progress.best_epoch = metrics["val/acc_fused"], epoch
            self.best = self.model_state()  # the model that was validated, before any new head
        self.end_epoch(epoch)
        metrics.update({f"objective/{k}": v for k, v in self.objective.epoch_metrics().items()})
        self.scheduler.step()
        self.progress.epoch = epoch + 1
        return metrics

    def final_test(self) -> dict[str, Any]:
        """Score the best-val weights on test, once. Leaves the model holding them."""
        self.load_model_state(self.best)
        test = self.score("test", self.progress.best_epoch)
        return {
            "val": {"best_acc": self.progress.best_val, "best_epoch": self.progress.best_epoch},
            "test": {
                "acc": test["test/acc_fused"],
                "acc_per_modality": {m: test[f"test/acc_{m}"] for m in self.modalities},
                "tcp_per_modality": {m: test[f"test/tcp_{m}"] for m in self.modalities},
                "ucom_per_modality": {m: test[f"test/ucom_{m}"] for m in self.modalities},
                "imbalance_ratio": test["test/imbalance_ratio"],
                "samples": test["test/samples"],
            },
            "epochs": self.recipe.schedule.epochs,
            "objective": self.recipe.objective.name,
            "seed": self.recipe.seed,
            "workers": self.group.world_size,
            "resumed_from_epoch": self.resumed_from_epoch,
        }


def _stat_pairs(counter: SumCounter, group: ProcessGroup) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Objective statistics, summed over the epoch and over ranks."""
    return {k[len("stat:") :]: v for k, v in counter.pairs(group.all_reduce_sum).items() if k.startswith("stat:")}


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """What a ``TorchTrainer`` runs on each worker: ``config = {"spec": RunSpec}``."""
    return run_training(config["spec"])


def run_training(spec: RunSpec) -> dict[str, Any]:
    """One training run, in-process or as one rank of a ``TorchTrainer`` (``spec.where``).

    Rank 0 alone writes the run record and checkpoints; every rank reports each epoch. Shards
    are read against their checksums here unless the starter already did (``shards_checked``);
    the schema is always checked, so a worker never trains on columns it cannot decode.
    """
    entered = time.time()
    recipe = spec.recipe
    session = make_session(spec)
    rank0 = session.group.rank == 0
    full_check = not spec.shards_checked
    manifest = validate_shards(recipe.data.path, checksums=full_check, values=full_check and rank0)
    check_against_data(recipe, manifest)
    record = RunRecord(spec.output) if rank0 else None
    source = session.source(recipe, manifest)
    trainer = Trainer(
        recipe,
        manifest,
        session.group,
        source,
        session.device(recipe),
        on_step=_with_startup_line(spec, session.step_hook(), entered, time.time()) if rank0 else session.step_hook(),
        verbose=rank0 and spec.verbose,
    )
    state = session.restored_state()
    if state is not None:
        trainer.restore(state)
        trainer.resumed_from_epoch = trainer.progress.epoch
    if rank0:
        _start_record(record, recipe, trainer.progress.epoch)
    table = EpochTable(trainer.modalities, enabled=rank0 and spec.verbose)
    tracked = _tracker(spec, record, continuing=state is not None or spec.on_ray())
    tracking = record is not None and tracked.active
    try:
        with tracked as tracker:
            result = _train_epochs(session, trainer, recipe, record, table, tracker, state is not None)
    finally:
        if tracking:
            record.close_tracking()  # W&B finished (also after an error): everything logged is flushed
    return result


def _with_startup_line(spec: RunSpec, hook: StepHook | None, entered: float, data_ready: float) -> StepHook | None:
    """``hook``, plus one verbose line at the first batch saying where the start-up went."""
    if not (spec.verbose and spec.launched_at is not None):
        return hook
    pending = True

    def on_step(epoch: int, step: int) -> None:
        nonlocal pending
        if pending:
            pending = False
            write_line(startup_line(spec.launched_at, spec.ray_ready_at, entered, data_ready, time.time()))
        if hook is not None:
            hook(epoch, step)

    return on_step


def _train_epochs(
    session: Session,
    trainer: Trainer,
    recipe: Recipe,
    record: RunRecord | None,
    table: EpochTable,
    tracker: WandbTracker,
    restored: bool,
) -> dict[str, Any]:
    if record is not None and tracker.active and record.open_tracking() and restored:
        # The start before this one was killed with its W&B run open: the last epoch it
        # recorded may never have reached W&B. Log it again at its step: W&B drops a row for
        # a step it already has, so this fills the gap and never duplicates (log_epoch_again).
        recorded = [m for m in record.read_metrics() if m["epoch"] < trainer.progress.epoch]
        if recorded:
            tracker.log_epoch_again(recorded[-1])
    session.report_missed()
    result = None
    for epoch in range(trainer.progress.epoch, recipe.schedule.epochs):
        metrics = trainer.run_epoch(epoch)
        if epoch == recipe.schedule.epochs - 1:
            latest = trainer.state()  # before final_test swaps in the best weights
            result = trainer.final_test()
        _finish_epoch(session, trainer, record, table, tracker, metrics, latest if result else trainer.state(), result)
    if result is None:  # resumed after the last epoch had already been reported
        result = trainer.final_test()
        if record is not None:
            record.write_result(result)
        tracker.summary(result)
    return result


def _tracker(spec: RunSpec, record: RunRecord | None, continuing: bool) -> WandbTracker:
    """W&B on rank 0 only (``record`` is None elsewhere): one run per training run, with the run
    directory's own id (``RunRecord.identity``), so a restart continues its run and a new run
    never joins another whose directory has the same name. A search's trials are logged by the
    driver instead (their recipes say ``disabled``)."""
    recipe = spec.recipe
    if record is None or recipe.tracking.wandb == "disabled":
        return WandbTracker()  # no id is created for a run that is not tracked
    identity = record.identity(continuing)
    return WandbTracker.start(
        recipe.tracking,
        run_dir=spec.output,
        run_id=identity.run_id,
        run_name=spec.output.name,
        group=None,
        config=recipe.to_dict(),
        resume=identity.resumed,
    )


def _start_record(record: RunRecord, recipe: Recipe, next_epoch: int) -> None:
    if next_epoch == 0:
        record.write_config(recipe.to_dict())
    record.truncate_metrics(next_epoch)  # a restarted run never duplicates an epoch line


def _finish_epoch(
    session: Session,
    trainer: Trainer,
    record: RunRecord | None,
    table: EpochTable,
    tracker: WandbTracker,
    metrics: dict[str, Any],
    state: dict[str, Any],
    result: dict[str, Any] | None,
) -> None:
    """Persist, log, then report — in that order: the report is where a scheduler may end the
    trial, so everything about this epoch is on disk and in W&B before it."""
    checkpoint_dir = None
    if record is not None:
        if metrics["improved"]:
            save_state(record.checkpoint_dir("best"), state)
        checkpoint_dir = record.checkpoint_dir("latest")
        save_state(checkpoint_dir, state)
        record.append_metrics(metrics)
        if result is not None:
            record.write_result(result)
        table.row(metrics)
    tracker.log_epoch(metrics)  # after the checkpoint: a restarted run never logs an epoch twice
    if result is not None:
        tracker.summary(result)
    session.report(metrics, checkpoint_dir)
