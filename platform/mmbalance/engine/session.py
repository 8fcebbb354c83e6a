"""Where the loop runs: in-process, or on a Ray Train worker.

The only place the loop touches Ray's per-worker API (context, device, dataset shards,
checkpoints, report). In-process every call has a local meaning, so the loop is the same.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from mmbalance.config import Recipe
from mmbalance.data.manifest import Manifest
from mmbalance.engine.build import resolve_device
from mmbalance.engine.checkpoint import load_state
from mmbalance.engine.distributed import ProcessGroup
from mmbalance.engine.run_spec import RunSpec
from mmbalance.engine.sources import BatchSource, InMemorySource
from mmbalance.layout import RunDir
from mmbalance.tracking.records import RunRecord


class Session:
    """The loop's view of where it runs. ``api`` is the Ray module whose ``get_checkpoint``,
    ``Checkpoint`` and ``report`` it uses (``ray.train`` on a Train worker, ``ray.tune`` in a
    Tune trial that trains in-process, ``None`` in-process); ``train_worker`` selects Ray's
    device and dataset shard over the local ones."""

    def __init__(self, spec: RunSpec, group: ProcessGroup, api: Any = None, train_worker: bool = False):
        self.spec, self.group, self.api, self.train_worker = spec, group, api, train_worker
        self.missed: list[dict[str, Any]] = []  # recorded epochs Tune may not have seen (``_tune_trial_state``)

    def device(self, recipe: Recipe) -> torch.device:
        if self.train_worker:
            import ray.train.torch

            return ray.train.torch.get_device()
        return resolve_device(recipe.scaling.device)

    def source(self, recipe: Recipe, manifest: Manifest) -> BatchSource:
        if self.train_worker:
            from mmbalance.engine.ray_data import RayShardSource

            return RayShardSource(recipe, manifest, self.device(recipe), train_cached=self.spec.train_cached)
        return InMemorySource(recipe, manifest, self.device(recipe))

    def restored_state(self) -> dict[str, Any] | None:
        # Ray hands back the latest reported checkpoint after a worker restart or a restored
        # trial; otherwise `--resume` restores the run directory's latest checkpoint.
        if self.api is not None and not self.train_worker:
            return self._tune_trial_state()
        checkpoint = self.api.get_checkpoint() if self.api is not None else None
        if checkpoint is not None:
            with checkpoint.as_directory() as directory:
                return load_state(directory)
        if not self.spec.resume:
            return None
        return load_state(RunDir(self.spec.output).checkpoint("latest"))

    def _tune_trial_state(self) -> dict[str, Any] | None:
        """A Tune trial that trains in its own process owns its run directory, so the newest of
        the checkpoint Tune hands back and the run directory's latest is where it continues.
        Tune's is older when the driver was killed: Tune saves which checkpoint a trial has only
        every few seconds, and may since have deleted that one (``CheckpointConfig(num_to_keep)``).
        The run directory's is used only if ``metrics.jsonl`` records its last epoch (a process
        killed between the two writes must not leave an epoch out of the record).

        When the run directory is ahead, the epochs after Tune's checkpoint were recorded but
        their reports may never have reached the driver (a Ctrl-C stops the search before it
        reads them), and the driver is what logs a trial to W&B: ``report_missed`` sends them."""
        tune_state = None
        checkpoint = self.api.get_checkpoint()
        if checkpoint is not None:
            try:
                with checkpoint.as_directory() as directory:
                    tune_state = load_state(directory)
            except FileNotFoundError:
                pass
        tune_epoch = tune_state["progress"]["epoch"] if tune_state is not None else 0
        output_dir = self.spec.output
        run = RunDir(output_dir)
        if run.has_checkpoint("latest"):
            state = load_state(run.checkpoint("latest"))
            epoch = state["progress"]["epoch"]
            recorded = RunRecord(output_dir).read_metrics()
            if epoch - 1 in {m["epoch"] for m in recorded} and epoch > tune_epoch:
                self.missed = [m for m in recorded if tune_epoch <= m["epoch"] < epoch]
                return state
        return tune_state

    def report_missed(self) -> None:
        """Report the recorded epochs Tune has no checkpoint for, the last with the run
        directory's latest checkpoint, before training goes on. Tune counts them as new
        iterations, so W&B gets them at the steps they would have had."""
        latest = RunDir(self.spec.output).checkpoint("latest")  # the state restored from
        for i, metrics in enumerate(self.missed):
            self.report(metrics, latest if i == len(self.missed) - 1 else None)
        self.missed = []

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        if self.api is None:
            return
        checkpoint = self.api.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        self.api.report(metrics, checkpoint=checkpoint)  # on Train workers a barrier: every rank, once per epoch

    def step_hook(self) -> Callable[[int, int], None] | None:
        return fault_hook(self.spec.fault, self.group.rank)


def make_session(spec: RunSpec) -> Session:
    if spec.where == "train":
        import ray.train

        return Session(spec, ProcessGroup.from_torch(), api=ray.train, train_worker=True)
    if spec.where == "tune":
        import ray.tune

        return Session(spec, ProcessGroup(), api=ray.tune)
    return Session(spec, ProcessGroup())


def fault_hook(fault: Mapping[str, Any] | None, rank: int) -> Callable[[int, int], None] | None:
    """Test-only: kill this worker process once at (epoch, step) to exercise recovery.
    ``fault = {"rank": r, "epoch": e, "step": s, "once_file": path}``; the file makes it fire once,
    in one process only: the first to create it dies (a search hands the same fault to every
    trial, and concurrent trials reach the same step together). With ``"kind": "raise"`` and
    ``"attempts_file"`` instead, every attempt raises a ``ValueError`` there (a deterministic
    error) after appending a line to that file, so a test can count the attempts."""
    if not fault or fault["rank"] != rank:
        return None
    if fault.get("kind") == "raise":
        return _raise_hook(fault)
    marker = Path(fault["once_file"])

    def maybe_die(epoch: int, step: int) -> None:
        if epoch == fault["epoch"] and step == fault["step"] and _claim(marker):
            # Die a moment after the last report, as a real failure would: Ray's controller
            # registers a reported checkpoint asynchronously, and a kill within milliseconds of
            # the report restarts from the checkpoint before it.
            time.sleep(fault.get("delay_s", 3.0))
            os._exit(17)

    return maybe_die


def _raise_hook(fault: dict[str, Any]) -> Callable[[int, int], None]:
    def always_raise(epoch: int, step: int) -> None:
        if epoch == fault["epoch"] and step == fault["step"]:
            with open(fault["attempts_file"], "a") as attempts:
                attempts.write(f"{os.getpid()}\n")
            raise ValueError(f"planted deterministic error at epoch {epoch}, step {step}")

    return always_raise


def _claim(marker: Path) -> bool:
    """Create ``marker``; False if it already exists (atomic: exactly one process wins)."""
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True
