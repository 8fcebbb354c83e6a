"""A search trial interrupted between recording an epoch and the driver reading its report:
on restore it reports those epochs again (engine/session.py), and the driver logs each epoch to
W&B once (tracking/search_wandb.py). Without Ray: a fake Tune API and a fake trial."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from helpers import recipe_dict
from mmbalance.engine.checkpoint import save_state
from mmbalance.engine.run_spec import RunSpec
from mmbalance.engine.session import Session
from mmbalance.tracking.records import RunRecord


class FakeCheckpoint:
    def __init__(self, directory: Path):
        self.directory = directory

    @contextlib.contextmanager
    def as_directory(self):
        yield str(self.directory)

    @classmethod
    def from_directory(cls, directory: str):
        return cls(Path(directory))


class FakeTune:
    """What Session uses of ``ray.tune``: get_checkpoint, Checkpoint, report."""

    Checkpoint = FakeCheckpoint

    def __init__(self, checkpoint: Path | None):
        self.checkpoint, self.reports = checkpoint, []

    def get_checkpoint(self):
        return FakeCheckpoint(self.checkpoint) if self.checkpoint else None

    def report(self, metrics, checkpoint=None):
        self.reports.append((metrics["epoch"], checkpoint.directory if checkpoint else None))


def _run_dir(tmp_path: Path, recorded_epochs: int) -> Path:
    run_dir = tmp_path / "trials" / "t_00000"
    record = RunRecord(run_dir)
    for epoch in range(recorded_epochs):
        record.append_metrics({"epoch": epoch, "val/acc_fused": 0.1 * epoch})
    save_state(record.checkpoint_dir("latest"), {"progress": {"epoch": recorded_epochs}})
    return run_dir


def _tune_checkpoint(tmp_path: Path, epochs_done: int) -> Path:
    return save_state(tmp_path / "tune_ckpt", {"progress": {"epoch": epochs_done}}).parent


def _session(run_dir: Path, api: FakeTune) -> Session:
    spec = RunSpec.of(recipe_dict(run_dir / "no-shards"), run_dir, where="tune")  # the session reads only output
    return Session(spec, group=None, api=api)


def test_epochs_past_tunes_checkpoint_are_reported_again_before_training_goes_on(tmp_path):
    run_dir = _run_dir(tmp_path, recorded_epochs=3)
    api = FakeTune(_tune_checkpoint(tmp_path, epochs_done=1))
    session = _session(run_dir, api)
    assert session.restored_state()["progress"]["epoch"] == 3  # the run directory is newer
    session.report_missed()
    latest = RunRecord(run_dir).checkpoint_dir("latest")
    assert api.reports == [(1, None), (2, latest)]  # the last one carries the checkpoint it resumes from
    session.report_missed()
    assert len(api.reports) == 2  # once


def test_without_any_tune_checkpoint_every_recorded_epoch_is_reported(tmp_path):
    api = FakeTune(None)
    session = _session(_run_dir(tmp_path, recorded_epochs=2), api)
    assert session.restored_state()["progress"]["epoch"] == 2
    session.report_missed()
    assert [epoch for epoch, _ in api.reports] == [0, 1]


@pytest.mark.parametrize("tune_epochs", [3, 4])
def test_nothing_is_reported_again_when_tune_is_not_behind(tmp_path, tune_epochs):
    api = FakeTune(_tune_checkpoint(tmp_path, epochs_done=tune_epochs))
    session = _session(_run_dir(tmp_path, recorded_epochs=3), api)
    assert session.restored_state()["progress"]["epoch"] == tune_epochs
    session.report_missed()
    assert api.reports == []


class FakeTrial:
    def __init__(self, trial_id: str):
        self.trial_id, self.config = trial_id, {"params": {}}


def test_the_driver_logs_each_epoch_of_a_trial_once_across_restores(tmp_path, monkeypatch):
    from ray.air.integrations.wandb import WandbLoggerCallback

    from mmbalance.config import TrackingConfig
    from mmbalance.tracking.search_wandb import REPLAYED, search_callback

    logged = []
    monkeypatch.setattr(
        WandbLoggerCallback,
        "log_trial_result",
        lambda self, iteration, trial, result: logged.append((trial.trial_id, result["epoch"])),
    )
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "search"
    trial = FakeTrial("t_00000")
    first = search_callback(TrackingConfig(wandb="offline"), out, out / "trials")
    for epoch in (0, 1):
        first.log_trial_result(epoch + 1, trial, {"epoch": epoch})
    # Restored after a Ctrl-C: Tune's checkpoint had epoch 0 only, so the trial reports 1 again.
    restored = search_callback(TrackingConfig(wandb="offline"), out, out / "trials")
    for epoch in (1, 2):
        restored.log_trial_result(epoch + 2, trial, {"epoch": epoch})
    restored.log_trial_result(5, trial, {"epoch": 2, REPLAYED: True})  # an ended trial's replay: never logged
    restored.log_trial_result(1, FakeTrial("t_00001"), {"epoch": 0})  # another trial has its own record
    assert logged == [("t_00000", 0), ("t_00000", 1), ("t_00000", 2), ("t_00001", 0)]
