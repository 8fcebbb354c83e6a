"""WandbTracker: offline runs under the trial's run dir, read back with wandb's own reader
(``wandb leet inspect --json``, which parses the ``.wandb`` transaction log); the online ->
offline fallback; no-op trackers; no credential in any written file. No network, no Ray."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from helpers.wandb_offline import no_credentials, read_offline_run  # noqa: F401 - no_credentials is autouse
from mmbalance.config import TrackingConfig
from mmbalance.tracking import wandb_tracker
from mmbalance.tracking.wandb_tracker import WandbTracker, flatten_result, sanitize

FAKE_KEY = "fake-secret-" + "0123456789abcdef" * 2  # 44 chars: wandb rejects keys shorter than 40
assert len(FAKE_KEY) >= 40
RESULT = {
    "val": {"best_acc": 0.7, "best_epoch": 2},
    "test": {"acc": 0.65, "acc_per_modality": {"audio": 0.6, "visual": 0.4}, "imbalance_ratio": 1.5},
    "robustness": {"noise": {"0.5": 0.55}},
    "objective": "mnl",
    "resumed_from_epoch": None,
}


def start(
    run_dir: Path,
    run_id: str = "trial_00001",
    group: str | None = "exp-a",
    mode: str = "offline",
    config: dict | None = None,
    **kwargs,
) -> WandbTracker:
    return WandbTracker.start(
        TrackingConfig(wandb=mode),
        run_dir=run_dir,
        run_id=run_id,
        run_name=run_id,
        group=group,
        config=config if config is not None else {"seed": 1, "objective": {"name": "mnl", "lam": 0.5}},
        **kwargs,
    )


def epoch_metrics(epoch: int) -> dict:
    return {
        "epoch": epoch,
        "epochs_done": epoch + 1,
        "train/loss_total": 1.0 / (epoch + 1),
        "val/acc_fused": 0.5 + 0.1 * epoch,
        "val/acc_audio": 0.4,
        "improved": epoch != 1,
        "note": "not a number",
    }


def files_containing(root: Path, needle: str) -> list[Path]:
    """Every file under ``root`` (following links, e.g. logs/debug-core.log) whose bytes hold ``needle``."""
    hits = []
    for path in root.rglob("*"):
        if path.is_file() and needle.encode() in path.read_bytes():
            hits.append(path)
    return hits


def test_offline_run_holds_epochs_summary_group_id_and_config(tmp_path):
    run_dir = tmp_path / "trial_00001"
    tracker = start(run_dir)
    assert tracker.active and tracker.mode == "offline"
    sync_dir = tracker.sync_dir
    for epoch in range(3):
        tracker.log_epoch(epoch_metrics(epoch))
    tracker.summary(RESULT)
    tracker.finish()
    tracker.finish()  # idempotent

    assert sync_dir.parent == run_dir / "wandb" and sync_dir.name.startswith("offline-run-")
    assert (sync_dir / "run-trial_00001.wandb").is_file()
    assert not (sync_dir / "files" / "wandb-metadata.json").exists()
    assert not (sync_dir / "files" / "requirements.txt").exists()
    data = read_offline_run(sync_dir)
    run = data["run"]
    assert (run["run_id"], run["run_group"], run["project"], run["job_type"]) == (
        "trial_00001",
        "exp-a",
        "mmbalance",
        "train",
    )
    assert run["config"]["update"]["objective"] == {"name": "mnl", "lam": 0.5}
    assert run["config"]["update"]["seed"] == 1
    assert sorted(data["history"]) == [0, 1, 2]
    for epoch, row in data["history"].items():
        assert row["epoch"] == epoch and row["epochs_done"] == epoch + 1
        assert row["val/acc_fused"] == pytest.approx(0.5 + 0.1 * epoch)
        assert row["train/loss_total"] == pytest.approx(1.0 / (epoch + 1))
        assert row["improved"] == int(epoch != 1)  # bool logged as 0/1
        assert "note" not in row  # strings stay in the local record only
    summary = data["summary"]
    assert summary["test/acc"] == 0.65 and summary["val/best_acc"] == 0.7 and summary["val/best_epoch"] == 2
    assert summary["test/acc_audio"] == 0.6 and summary["test/acc_visual"] == 0.4
    assert summary["robustness/noise/0.5"] == 0.55 and summary["objective"] == "mnl"
    assert "resumed_from_epoch" not in summary


def test_two_trackers_in_one_group_write_two_runs(tmp_path):
    dirs = [tmp_path / "trial_a", tmp_path / "trial_b"]
    trackers = [start(d, run_id=d.name, group="exp-two") for d in dirs]  # both live at once
    for tracker in trackers:
        tracker.log_epoch(epoch_metrics(0))
    sync_dirs = [t.sync_dir for t in trackers]
    with pytest.raises(RuntimeError):
        with trackers[1]:  # context manager: an exception finishes the run with exit code 1
            raise RuntimeError("trial failed")
    trackers[0].finish()

    assert sync_dirs[0] != sync_dirs[1]
    for run_dir, sync_dir in zip(dirs, sync_dirs):
        assert sync_dir.parent == run_dir / "wandb"
        run = read_offline_run(sync_dir)["run"]
        assert run["run_id"] == run_dir.name and run["run_group"] == "exp-two"
    assert list((dirs[0] / "wandb").glob("offline-run-*")) == [sync_dirs[0]]


def test_online_without_key_falls_back_to_offline_with_one_line(tmp_path, capsys):
    capsys.readouterr()
    started = time.perf_counter()
    tracker = start(tmp_path / "trial_online", run_id="trial_online", mode="online")
    elapsed = time.perf_counter() - started
    tracker.log_epoch(epoch_metrics(0))
    tracker.finish()
    captured = capsys.readouterr()
    lines = (captured.out + captured.err).strip().splitlines()
    assert elapsed < 20
    assert tracker.mode == "offline"
    assert len(lines) == 1, lines
    assert "no API key" in lines[0] and lines[0].endswith(
        f"(sync later with: wandb sync {tmp_path / 'trial_online' / 'wandb'})"
    )
    assert list((tmp_path / "trial_online" / "wandb").glob("offline-run-*/run-trial_online.wandb"))


def test_online_with_unreachable_server_falls_back_to_offline(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setattr(wandb_tracker, "_base_url", lambda: "http://127.0.0.1:9")  # discard port: refused at once
    capsys.readouterr()
    started = time.perf_counter()
    tracker = start(tmp_path / "trial_net", mode="online")
    tracker.finish()
    lines = "".join(capsys.readouterr()).strip().splitlines()
    assert time.perf_counter() - started < 20
    assert tracker.mode == "offline" and len(lines) == 1 and "unreachable" in lines[0], lines
    assert files_containing(tmp_path / "trial_net", FAKE_KEY) == []


def test_disabled_and_nonzero_rank_write_nothing(tmp_path):
    for tracker, run_dir in [
        (start(tmp_path / "off", mode="disabled"), tmp_path / "off"),
        (start(tmp_path / "rank1", rank=1), tmp_path / "rank1"),
    ]:
        assert not tracker.active and tracker.sync_dir is None
        with tracker:
            tracker.log_epoch(epoch_metrics(0))
            tracker.summary(RESULT)
        assert not run_dir.exists()


def test_api_key_never_reaches_a_written_file(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    run_dir = tmp_path / "trial_secret"
    config = {
        "seed": 1,
        "tracking": {"api_key": FAKE_KEY, "wandb": "offline"},
        "notes": [f"key={FAKE_KEY}"],
        "cluster": {"env": {"WANDB_API_KEY": FAKE_KEY, "HF_TOKEN": "hf_abc"}},
    }
    with start(run_dir, config=config) as tracker:
        tracker.log_epoch(epoch_metrics(0))
        tracker.summary(RESULT)
        sync_dir = tracker.sync_dir

    assert files_containing(run_dir, FAKE_KEY) == []
    logged = read_offline_run(sync_dir)["run"]["config"]["update"]
    assert logged["tracking"] == {"api_key": "<redacted>", "wandb": "offline"}
    assert logged["cluster"]["env"] == {"WANDB_API_KEY": "<redacted>", "HF_TOKEN": "<redacted>"}
    assert logged["notes"] == ["<redacted>"]
    # The scanner would have caught a leak.
    (sync_dir / "files").mkdir(exist_ok=True)
    (sync_dir / "files" / "leak.bin").write_bytes(b"\x00\x01" + FAKE_KEY.encode() + b"\xff")
    assert files_containing(run_dir, FAKE_KEY) == [sync_dir / "files" / "leak.bin"]


def test_sanitize_and_flatten_are_pure():
    config = {"a": {"Secret_Thing": 1, "apiKey": 2, "b": [{"password": "x"}, "y"]}, "token_count": 3}
    assert sanitize(config) == {
        "a": {"Secret_Thing": "<redacted>", "apiKey": "<redacted>", "b": [{"password": "<redacted>"}, "y"]},
        "token_count": "<redacted>",
    }
    assert config["a"]["apiKey"] == 2  # input untouched
    assert flatten_result({"test": {"tcp_per_modality": {"audio": 0.1}}, "flag": True}) == {
        "test/tcp_audio": 0.1,
        "flag": True,
    }


def test_tracking_config_forbids_unknown_keys():
    with pytest.raises(ValueError):
        TrackingConfig(wandb="offline", log_checkpoints=True)
    with pytest.raises(ValueError):
        TrackingConfig(wandb="shared")
