"""Commands work from any directory: a run records where its data is, and `prepare` checks the
raw root before starting anything."""

from __future__ import annotations

import json
import shutil

import yaml

from helpers import REPO
from mmbalance.cli import main


def test_a_run_trained_with_a_relative_data_path_evaluates_from_another_directory(small_shards, tmp_path, monkeypatch):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir(), elsewhere.mkdir()
    shutil.copytree(small_shards, work / "shards")
    monkeypatch.chdir(work)
    assert (
        main(
            [
                "train",
                "--recipe",
                str(REPO / "trainables" / "synthetic.yaml"),
                "--set",
                "data.path=shards",
                "schedule.epochs=1",
                "tracking.wandb=disabled",
                "--output",
                "run",
            ]
        )
        == 0
    )
    recorded = yaml.safe_load((work / "run" / "config.yaml").read_text())["data"]["path"]
    assert recorded == str(work / "shards")  # absolute, not "shards"
    monkeypatch.chdir(elsewhere)
    assert main(["eval", str(work / "run"), "--missing", "audio", "--out", "eval.json"]) == 0
    assert "missing_audio" in json.loads((elsewhere / "eval.json").read_text())["accuracy"]


def test_prepare_refuses_a_missing_root_before_starting_ray(tmp_path, capsys):
    import ray

    assert main(["prepare", "cremad", "--root", str(tmp_path / "nonexistent"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmbalance prepare: error: --root ") and "dataset root does not exist" in err
    assert not ray.is_initialized() and not (tmp_path / "out").exists()
