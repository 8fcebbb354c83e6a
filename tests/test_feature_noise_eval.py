"""``feature_noise`` at evaluation: ``eval.corruptions`` scored through ``evaluate_run`` (the
search's scoring phase) and ``mmbalance eval --corrupt``, both with the train split's std."""

from __future__ import annotations

import json

import pytest

from helpers import recipe_dict
from mmbalance.config import validate_recipe
from mmbalance.data.manifest import read_manifest
from mmbalance.data.shards import feature_std
from mmbalance.engine.loop import run_training
from mmbalance.engine.run_spec import RunSpec

SWEEP = [{"modality": "visual", "name": "feature_noise", "levels": [0, 1]}]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_shards):
    """A short run that learns (test accuracy ~0.9) whose recipe sweeps visual feature noise at levels 0 and 1."""
    tree = recipe_dict(small_shards, optim={"lr": 0.01})
    tree["eval"]["corruptions"] = SWEEP
    run = tmp_path_factory.mktemp("fn") / "run"
    tree = validate_recipe(tree).to_dict()
    run_training(RunSpec.of(tree, run, verbose=False))
    return run, tree


def test_eval_corruptions_feature_noise_through_evaluate_run(trained, small_shards):
    from mmbalance.engine.evaluation import evaluate_run, robustness_transforms

    run, tree = trained
    scores = evaluate_run(run, tree)
    clean, robust = scores["test"]["acc"], scores["robustness"]
    assert robust["feature_noise_visual_0"] == clean  # level 0 is the identity
    assert clean > 0.5 and robust["feature_noise_visual_1"] < clean  # one train std of noise on half the samples
    manifest = read_manifest(small_shards)
    spec = robustness_transforms(validate_recipe(tree), manifest)["feature_noise_visual_1"].plan.corruptions[0]
    assert spec.std == feature_std(small_shards, manifest, "train", "visual").ravel().tolist()
    assert spec.std != feature_std(small_shards, manifest, "test", "visual").ravel().tolist()
    assert scores == evaluate_run(run, tree)  # per-sample seeded: the same scores again


def test_mmbalance_eval_corrupt_feature_noise(trained, tmp_path, capsys):
    from mmbalance.cli import main

    run, _ = trained
    out = tmp_path / "eval.json"
    assert main(["eval", str(run), "--corrupt", "visual=feature_noise:0,1", "--p", "1", "--out", str(out)]) == 0
    table = json.loads(out.read_text())["accuracy"]
    assert list(table) == ["clean", "feature_noise_visual_0", "feature_noise_visual_1"]
    assert table["feature_noise_visual_0"] == table["clean"]
    assert table["feature_noise_visual_1"]["acc_visual"] < table["clean"]["acc_visual"]
    assert table["feature_noise_visual_1"]["acc_audio"] == table["clean"]["acc_audio"]  # only visual is noised
    assert "feature_noise_visual_1" in capsys.readouterr().out

    assert main(["eval", str(run), "--corrupt", "visual=feature_noise:1,-1"]) == 2
    assert "'feature_noise:1,-1': level: Input should be greater than or equal to 0" in capsys.readouterr().err
    assert main(["eval", str(run), "--corrupt", "depth=feature_noise:1"]) == 2
    assert "feature_noise_depth_1: 'depth' is not a modality of this run" in capsys.readouterr().err
