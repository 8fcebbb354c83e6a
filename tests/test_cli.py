"""End-to-end runs of the installed ``mmbalance`` command."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from helpers import REPO, SHARED_DATA
from helpers.wandb_offline import read_offline_run
from mmbalance.tracking.records import experiment_id

pytestmark = pytest.mark.integration


def _cli(*args, cwd=REPO):
    exe = shutil.which("mmbalance")
    command = [exe] if exe else [sys.executable, "-m", "mmbalance.cli"]
    return subprocess.run([*command, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_console_script_is_installed():
    assert shutil.which("mmbalance"), "pip install -e . should provide the mmbalance command"


def test_prepare_then_train_writes_a_complete_run(tmp_path):
    shards = tmp_path / "shards"
    done = _cli(
        "prepare",
        "synthetic",
        "--out",
        shards,
        "--samples",
        400,
        "--val-samples",
        100,
        "--test-samples",
        100,
        "--classes",
        4,
        "--dim",
        8,
    )
    assert done.returncode == 0, done.stderr
    assert "train 400, val 100, test 100" in done.stdout
    run = tmp_path / "run"
    done = _cli(
        "train",
        "--recipe",
        REPO / "trainables" / "synthetic.yaml",
        "--set",
        f"data.path={shards}",
        "--set",
        "schedule.epochs=2",
        "--output",
        run,
    )
    assert done.returncode == 0, done.stderr
    assert "val_acc" in done.stdout and "test acc" in done.stdout  # per-epoch table and summary
    result = json.loads((run / "result.json").read_text())
    assert set(result) >= {"val", "test", "epochs"} and result["epochs"] == 2
    assert set(result["test"]["acc_per_modality"]) == {"audio", "visual"}
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2

    again = _cli(
        "train", "--recipe", REPO / "trainables" / "synthetic.yaml", "--set", f"data.path={shards}", "--output", run
    )
    assert again.returncode == 2 and "--resume" in again.stderr  # a finished run is never silently overwritten


def test_bad_recipe_fails_before_any_work_with_the_key_named(tmp_path):
    done = _cli(
        "train",
        "--recipe",
        REPO / "trainables" / "synthetic.yaml",
        "--set",
        "optim.lr=-1",
        "--set",
        "objective.lamm=2",
        "--output",
        tmp_path / "run",
    )
    assert done.returncode == 2
    # The first, torch-free pass names the optimiser key and says the objective comes next.
    assert "optim.lr" in done.stderr and "checked once the errors above are fixed" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "run").exists()
    fixed = _cli(
        "train",
        "--recipe",
        REPO / "trainables" / "synthetic.yaml",
        "--set",
        "objective.lamm=2",
        "--output",
        tmp_path / "run",
    )
    assert fixed.returncode == 2 and "lamm: unknown key" in fixed.stderr
    assert "Traceback" not in fixed.stderr
    assert not (tmp_path / "run").exists()


def test_objective_with_a_fusion_it_cannot_use_fails_before_any_work(tmp_path):
    done = _cli(
        "train",
        "--recipe",
        REPO / "trainables" / "synthetic.yaml",
        "--set",
        "objective.name=arm",
        "--set",
        "model.fusion=mean",
        "--output",
        tmp_path / "run",
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "objective.name=arm" in done.stderr and "model.fusion=mean" in done.stderr and "[concat]" in done.stderr
    assert not (tmp_path / "run").exists()


def test_demo_prepares_compares_and_reports_from_outside_the_checkout(tmp_path):
    # The shipped recipe and demo study, on a smaller budget: 1 search trial and 2 seeds per method,
    # logged to W&B offline (the demo's default is off: it costs minutes on 2 CPUs).
    done = _cli(
        "demo",
        "--out",
        "demo",
        "--trials",
        "1",
        "--seeds",
        "0,1",
        "--set",
        "schedule.epochs=3",
        "--wandb",
        "offline",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    study = tmp_path / "demo" / "study"
    frame = pd.read_parquet(study / "results.parquet")
    methods = ["lf", "joint", "mnl", "arl", "alone:audio", "alone:visual"]
    assert sorted(frame["method"].unique()) == sorted(methods)
    assert sorted(frame.groupby("phase").size().items()) == [("final", 12), ("search", 6)]
    table = done.stdout[done.stdout.index("method ") :]
    assert "test fused (mean ± 95% CI)" in table and all(m in table for m in methods)
    assert "(baseline)" in table
    assert f"report written to {Path('demo') / 'study' / 'report' / 'report.html'}" in done.stdout
    assert (study / "report" / "report.html").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # nothing written beside --out
    # Quiet by default: one progress line per trial, no Ray worker output, no timing or W&B warnings.
    log = done.stdout + done.stderr
    progress = [line for line in done.stdout.splitlines() if re.match(r"\[\d+/\d+\] \S+ trial ", line)]
    assert len(progress) == 18, done.stdout  # every method's trials, named by method
    assert "pid=" not in log, log  # Ray prefixes worker lines with "(<actor> pid=...)"
    assert "performance bottleneck" not in log and "reinit" not in log and "Token authentication" not in log, log
    assert len(log.splitlines()) < 90, log
    assert "W&B is off" not in log
    # One Tuner per phase for every method, but W&B groups the runs by method, with the study's id,
    # and each final run's scores reach the W&B run that logged its epochs.
    study_id = experiment_id(study)
    runs = [read_offline_run(d) for d in sorted((study / "stages").glob("*/wandb/offline-run-*"))]
    assert {r["run"]["run_group"] for r in runs} == {f"{m}-{study_id[:8]}" for m in methods}
    final = frame[frame["phase"] == "final"]
    for method, trial_id, test_acc in zip(final["method"], final["trial_id"], final["test_acc"]):
        fragments = [
            r
            for r in runs
            if r["run"]["run_id"].endswith(f"-{trial_id}") and r["run"]["run_group"].startswith(f"{method}-")
        ]
        epochs = sorted(row["epoch"] for f in fragments for row in f["history"].values() if "epoch" in row)
        assert epochs == [0, 1, 2], (method, trial_id, epochs)
        summary = {k: v for f in fragments for k, v in f["summary"].items()}
        assert summary["test/acc"] == pytest.approx(test_acc), (method, trial_id)


def test_recipes_lists_the_shipped_recipes_and_spaces(tmp_path):
    done = _cli("recipes", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "synthetic" in done.stdout and "quickstart" in done.stdout


def test_avdigits_prepare_command(tmp_path):
    done = _cli("prepare", "avdigits", "--root", SHARED_DATA / "fsdd_mnist", "--out", tmp_path / "avd")
    assert done.returncode == 0, done.stderr
    assert "train 2430, val 270, test 300" in done.stdout


def test_eval_prints_and_writes_accuracy_per_corruption_level_and_missing_modality(tmp_path, small_shards):
    run = tmp_path / "run"
    done = _cli(
        "train",
        "--recipe",
        REPO / "trainables" / "synthetic.yaml",
        "--set",
        f"data.path={small_shards}",
        "--set",
        "schedule.epochs=2",
        "--output",
        run,
    )
    assert done.returncode == 0, done.stderr
    done = _cli("eval", run, "--corrupt", "visual=gaussian:0,50", "--missing", "audio,visual")
    assert done.returncode == 0, done.stderr
    table = json.loads((run / "eval-test.json").read_text())["accuracy"]
    assert list(table) == ["clean", "gaussian_visual_0", "gaussian_visual_50", "missing_audio", "missing_visual"]
    assert table["gaussian_visual_0"] == table["clean"]  # level 0 is the identity
    assert table["missing_visual"]["acc_visual"] != table["clean"]["acc_visual"]
    assert "gaussian_visual_50" in done.stdout
    implicit = _cli("eval", run, "--corrupt", "gaussian:5", "--out", tmp_path / "implicit.json")
    assert implicit.returncode == 0 and "gaussian_visual_5" in implicit.stdout  # the one image-like modality
    wrong = _cli("eval", run, "--corrupt", "audio_snr:5")
    assert wrong.returncode == 2 and "say which modality" in wrong.stderr
