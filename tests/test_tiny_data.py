"""Tiny and odd datasets: 80 samples with batch 8 train every objective; a one-feature modality
and a class missing from a split are ordinary data, not crashes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from helpers import recipe_dict
from mmbalance.config import ConfigError, validate_recipe
from mmbalance.data.manifest import ModalitySpec
from mmbalance.data.shards import SplitArrays, write_shards
from mmbalance.data.synthetic import SyntheticModality, SyntheticSpec, prepare_synthetic
from mmbalance.engine.loop import run_training
from mmbalance.engine.run_spec import RunSpec
from mmbalance.objectives import OBJECTIVES


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory):
    """80 training samples, 4 classes; ``visual`` has a single feature."""
    out = tmp_path_factory.mktemp("tiny") / "shards"
    spec = SyntheticSpec(
        samples={"train": 80, "val": 20, "test": 20},
        classes=4,
        modalities={"audio": SyntheticModality(dim=6, signal=1.2), "visual": SyntheticModality(dim=1, signal=0.6)},
    )
    prepare_synthetic(out, spec)
    return out


def _run(tmp_path, name, tree):
    recipe = validate_recipe(tree)
    return run_training(RunSpec(recipe, tmp_path / name, verbose=False))


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_eighty_samples_with_batch_8_train_every_objective(tiny_shards, tmp_path, objective):
    extra = {"check_every_epochs": 1} if objective == "aug" else {}
    tree = recipe_dict(tiny_shards, objective={"name": objective, **extra})
    tree["schedule"] = {"epochs": 2, "batch_size": 8}
    result = _run(tmp_path, objective, tree)
    assert 0.0 <= result["test"]["acc"] <= 1.0 and result["test"]["samples"] == 20
    assert all(math.isfinite(v) for v in result["test"]["acc_per_modality"].values())


def test_a_class_missing_from_val_and_test_is_scored_normally(tmp_path):
    rng = np.random.default_rng(0)

    def split(n, classes, prefix):
        labels = np.resize(np.array(classes), n).astype(np.int64)
        arrays = {
            "audio": (labels[:, None] + rng.standard_normal((n, 3))).astype(np.float32),
            "visual": rng.standard_normal((n, 2)).astype(np.float32),
        }
        return SplitArrays([f"{prefix}-{i}" for i in range(n)], labels, arrays)

    shards = tmp_path / "shards"
    write_shards(
        shards,
        dataset="gappy",
        classes=["a", "b", "c", "d"],
        modalities={
            "audio": ModalitySpec(dtype="float32", shape=[3]),
            "visual": ModalitySpec(dtype="float32", shape=[2]),
        },
        splits={
            "train": split(64, [0, 1, 2, 3], "tr"),
            "val": split(24, [0, 1, 2], "va"),
            "test": split(24, [1, 2], "te"),
        },
        generator={"name": "test"},
        preprocessing={},
    )
    tree = recipe_dict(shards)
    tree["schedule"] = {"epochs": 2, "batch_size": 16}
    result = _run(tmp_path, "gappy", tree)
    assert result["test"]["samples"] == 24 and 0.0 <= result["test"]["acc"] <= 1.0


def test_a_train_split_smaller_than_one_batch_is_refused_with_the_numbers(tiny_shards):
    from mmbalance.config import check_against_data
    from mmbalance.data.manifest import read_manifest

    tree = recipe_dict(tiny_shards)
    tree["schedule"] = {"epochs": 1, "batch_size": 81}
    with pytest.raises(ConfigError, match="'train' has 80 rows, fewer than schedule.batch_size=81"):
        check_against_data(validate_recipe(tree), read_manifest(tiny_shards))
    tree["schedule"]["batch_size"] = 80  # exactly one batch is fine
    check_against_data(validate_recipe(tree), read_manifest(tiny_shards))
