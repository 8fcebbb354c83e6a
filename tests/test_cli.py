"""End-to-end runs of the installed ``mmbalance`` command."""

import json
import shutil
from pathlib import Path
import subprocess
import sys

import pandas as pd
import pytest

from conftest import REPO, SHARED_DATA

pytestmark = pytest.mark.integration


def _cli(*args, cwd=REPO):
    exe = shutil.which("mmbalance")
    command = [exe] if exe else [sys.executable, "-m", "mmbalance.cli"]
    return subprocess.run([*command, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_console_script_is_installed():
    assert shutil.which("mmbalance"), "pip install -e . should provide the mmbalance command"


def test_prepare_then_train_writes_a_complete_run(tmp_path):
    shards = tmp_path / "shards"
    done = _cli("prepare", "synthetic", "--out", shards, "--samples", 400, "--val-samples", 100, "--test-samples", 100,
                "--classes", 4, "--dim", 8)
    assert done.returncode == 0, done.stderr
    assert "train 400, val 100, test 100" in done.stdout
    run = tmp_path / "run"
    done = _cli("train", "--recipe", REPO / "trainables" / "synthetic.yaml", "--set", f"data.path={shards}",
                "--set", "schedule.epochs=2", "--output", run)
    assert done.returncode == 0, done.stderr
    assert "val_acc" in done.stdout and "test acc" in done.stdout  # per-epoch table and summary
    result = json.loads((run / "result.json").read_text())
    assert set(result) >= {"val", "test", "epochs"} and result["epochs"] == 2
    assert set(result["test"]["acc_per_modality"]) == {"audio", "visual"}
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2

    again = _cli("train", "--recipe", REPO / "trainables" / "synthetic.yaml", "--set", f"data.path={shards}", "--output", run)
    assert again.returncode == 2 and "--resume" in again.stderr  # a finished run is never silently overwritten


def test_bad_recipe_fails_before_any_work_with_the_key_named(tmp_path):
    done = _cli("train", "--recipe", REPO / "trainables" / "synthetic.yaml", "--set", "optim.lr=-1",
                "--set", "objective.lamm=2", "--output", tmp_path / "run")
    assert done.returncode == 2
    assert "optim.lr" in done.stderr and "lamm: unknown key" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "run").exists()


def test_objective_with_a_fusion_it_cannot_use_fails_before_any_work(tmp_path):
    done = _cli("train", "--recipe", REPO / "trainables" / "synthetic.yaml", "--set", "objective.name=arm",
                "--set", "model.fusion=mean", "--output", tmp_path / "run")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "objective.name=arm" in done.stderr and "model.fusion=mean" in done.stderr and "[concat]" in done.stderr
    assert not (tmp_path / "run").exists()


def test_demo_prepares_searches_and_reports_from_outside_the_checkout(tmp_path):
    done = _cli("demo", "--out", "demo", "--samples", "2", cwd=tmp_path)  # the shipped recipe and space
    assert done.returncode == 0, done.stderr
    search = tmp_path / "demo" / "search"
    assert len(pd.read_parquet(search / "results.parquet")) == 4  # 2 draws x 2 seeds
    assert "val acc (mean ± std)" in done.stdout  # the leaderboard
    assert f"report written to {Path('demo') / 'search' / 'report' / 'report.html'}" in done.stdout
    assert (search / "report" / "report.html").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # nothing written beside --out
    # Quiet by default: one progress line per trial, no Ray worker output, no timing or W&B warnings.
    log = done.stdout + done.stderr
    assert len([line for line in done.stdout.splitlines() if line.startswith("[") and "] trial " in line]) == 4
    assert "pid=" not in log, log  # Ray prefixes worker lines with "(<actor> pid=...)"
    assert "performance bottleneck" not in log and "reinit" not in log and "Token authentication" not in log, log
    assert len(log.splitlines()) < 40, log


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
    done = _cli("train", "--recipe", REPO / "trainables" / "synthetic.yaml", "--set", f"data.path={small_shards}",
                "--set", "schedule.epochs=2", "--output", run)
    assert done.returncode == 0, done.stderr
    done = _cli("eval", run, "--corrupt", "visual=gaussian:0,50", "--missing", "audio,visual")
    assert done.returncode == 0, done.stderr
    table = json.loads((run / "eval-test.json").read_text())["accuracy"]
    assert list(table) == ["clean", "gaussian:0 on visual", "gaussian:50 on visual", "missing audio", "missing visual"]
    assert table["gaussian:0 on visual"] == table["clean"]  # level 0 is the identity
    assert table["missing visual"]["acc_visual"] != table["clean"]["acc_visual"]
    assert "gaussian:50 on visual" in done.stdout
    implicit = _cli("eval", run, "--corrupt", "gaussian:5", "--out", tmp_path / "implicit.json")
    assert implicit.returncode == 0 and "gaussian:5 on visual" in implicit.stdout  # the one image-like modality
    wrong = _cli("eval", run, "--corrupt", "audio_snr:5")
    assert wrong.returncode == 2 and "say which modality" in wrong.stderr
