"""Ray Train + Ray Data integration: real TorchTrainer runs on a local 4-CPU Ray (slow)."""

import json
import shutil
import subprocess
import sys

import pytest

from helpers import REPO, recipe_dict
from mmbalance.config import validate_recipe
from mmbalance.data.manifest import read_manifest
from mmbalance.engine.run_spec import RunSpec
from mmbalance.launch.cluster import DoesNotFit, Request, check_fits
from mmbalance.launch.train_driver import fit
from mmbalance.tracking.records import RunRecord

pytestmark = pytest.mark.integration


def _fit(shards, out, epochs=3, **kwargs):
    tree = recipe_dict(shards)
    tree["schedule"] = {"epochs": epochs, "batch_size": 32}
    spec = RunSpec(validate_recipe(tree), out, verbose=False, fault=kwargs.pop("fault", None))
    fit(spec, read_manifest(shards), workers=2, **kwargs)
    return json.loads((out / "result.json").read_text()), RunRecord(out).read_metrics()


def test_two_workers_train_with_ray_data_and_split_eval_exactly(ray_cluster, small_shards, tmp_path):
    result, metrics = _fit(small_shards, tmp_path / "run")
    assert [m["epoch"] for m in metrics] == [0, 1, 2]
    for row in metrics:
        assert row["val/samples"] == 128  # every val row scored once, none dropped
        assert row["val/max_rank_share"] < 1.0  # no worker evaluated the whole split alone
    assert result["test"]["samples"] == 128 and result["workers"] == 2 and result["resumed_from_epoch"] is None
    assert set(result) >= {"val", "test", "epochs"} and set(result["test"]["acc_per_modality"]) == {"audio", "visual"}
    assert metrics[-1]["train/loss_total"] < metrics[0]["train/loss_total"]
    assert (tmp_path / "run" / "checkpoints" / "best" / "state.pt").is_file()


def test_killed_worker_recovers_from_latest_checkpoint_without_duplicate_epochs(ray_cluster, small_shards, tmp_path):
    marker = tmp_path / "fault-fired"
    fault = {"rank": 1, "epoch": 1, "step": 2, "once_file": str(marker)}
    result, metrics = _fit(small_shards, tmp_path / "run", epochs=3, fault=fault, max_failures=1)
    assert marker.exists(), "the fault hook must have killed a worker"
    assert [m["epoch"] for m in metrics] == [0, 1, 2]
    assert result["resumed_from_epoch"] == 1  # restarted from epoch 0's checkpoint, not from scratch
    assert result["epochs"] == 3


def test_deterministic_error_in_a_worker_is_raised_without_retry(ray_cluster, small_shards, tmp_path):
    """max_failures=2 would give three attempts; a ValueError raised by the training function
    is a deterministic error (launch/failure_policy.py) and must cost exactly one."""
    from ray.train.v2.api.exceptions import WorkerGroupError

    attempts = tmp_path / "attempts"
    fault = {"kind": "raise", "rank": 0, "epoch": 1, "step": 0, "attempts_file": str(attempts)}
    with pytest.raises(WorkerGroupError, match="planted deterministic error"):
        _fit(small_shards, tmp_path / "run", epochs=3, fault=fault, max_failures=2)
    assert len(attempts.read_text().splitlines()) == 1


def test_request_that_cannot_fit_is_refused_before_scheduling(ray_cluster):
    with pytest.raises(DoesNotFit, match="50 workers x 1.0 CPU"):
        check_fits(Request(workers=50))
    with pytest.raises(DoesNotFit, match="GPUs, the cluster has 0"):
        check_fits(Request(workers=1, gpus_per_worker=1))


def test_cli_train_with_workers_writes_the_in_process_schema(ray_cluster, small_shards, tmp_path):
    address = ray_cluster.get_runtime_context().gcs_address
    exe = shutil.which("mmbalance") or sys.executable
    command = [exe] if exe.endswith("mmbalance") else [exe, "-m", "mmbalance.cli"]
    common = [
        "train",
        "--recipe",
        str(REPO / "trainables" / "synthetic.yaml"),
        "--set",
        f"data.path={small_shards}",
        "--set",
        "schedule.epochs=2",
        "--set",
        "modalities.audio.params.hidden=[16]",
        "--set",
        "modalities.visual.params.hidden=[16]",
    ]
    local = subprocess.run([*command, *common, "--output", str(tmp_path / "local")], capture_output=True, text=True)
    assert local.returncode == 0, local.stderr
    done = subprocess.run(
        [*command, *common, "--workers", "2", "--address", address, "--output", str(tmp_path / "ray")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    on_ray = json.loads((tmp_path / "ray" / "result.json").read_text())
    in_process = json.loads((tmp_path / "local" / "result.json").read_text())
    assert _schema(on_ray) == _schema(in_process)


def test_truncated_shard_fails_before_training_naming_the_file(small_shards, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(small_shards, shards)
    victim = shards / read_manifest(shards).splits["train"].files[0].path
    victim.write_bytes(victim.read_bytes()[:300])
    exe = shutil.which("mmbalance")
    done = subprocess.run(
        [
            exe,
            "train",
            "--recipe",
            str(REPO / "trainables" / "synthetic.yaml"),
            "--set",
            f"data.path={shards}",
            "--workers",
            "2",
            "--output",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert victim.name in done.stderr and "checksum mismatch" in done.stderr
    assert not (tmp_path / "run").exists()


def _schema(tree):
    if isinstance(tree, dict):
        return {k: _schema(v) for k, v in tree.items()}
    return type(tree).__name__ if not isinstance(tree, (int, float)) else "number"
