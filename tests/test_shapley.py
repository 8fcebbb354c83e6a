"""Exact Shapley values of modalities (``engine/shapley.py``) and their place in ``evaluate_run``."""

from __future__ import annotations

import math
import random

import pytest

from helpers import recipe_dict
from mmbalance.config import validate_recipe
from mmbalance.engine.loop import run_training
from mmbalance.engine.run_spec import RunSpec
from mmbalance.engine.shapley import coalitions, shapley_values


def _table(values: dict[str, float]):
    """A game from ``{"": v(∅), "a": v({a}), "a+b": v({a, b}), ...}``."""
    return lambda s: values["+".join(sorted(s))]


def test_two_modalities_by_hand():
    game = _table({"": 0.25, "audio": 0.6, "visual": 0.4, "audio+visual": 0.8})
    phi = shapley_values(game, ["audio", "visual"])
    # audio: (0.6 - 0.25) / 2 + (0.8 - 0.4) / 2; visual: (0.4 - 0.25) / 2 + (0.8 - 0.6) / 2
    assert phi == pytest.approx({"audio": 0.375, "visual": 0.175}, abs=1e-15)


def test_three_modality_glove_game_by_hand():
    # Worth 1 only when a is present with b or c: a gets 2/3, b and c 1/6 each.
    phi = shapley_values(lambda s: float("a" in s and bool(s & {"b", "c"})), ["a", "b", "c"])
    assert phi == pytest.approx({"a": 2 / 3, "b": 1 / 6, "c": 1 / 6}, abs=1e-15)


@pytest.mark.parametrize("players", [["a", "b"], ["a", "b", "c"]])
def test_an_additive_game_gives_each_modality_its_own_value(players):
    own = {"a": 0.3, "b": 0.125, "c": -0.05}
    phi = shapley_values(lambda s: 0.1 + sum(own[m] for m in s), players)
    assert phi == pytest.approx({m: own[m] for m in players}, abs=1e-15)


@pytest.mark.parametrize("players", [["a", "b"], ["a", "b", "c"], ["a", "b", "c", "d"]])
def test_a_symmetric_game_is_split_equally(players):
    by_size = [0.25, 0.5, 0.6, 0.9, 1.0]
    phi = shapley_values(lambda s: by_size[len(s)], players)
    share = (by_size[len(players)] - by_size[0]) / len(players)
    assert phi == pytest.approx({m: share for m in players}, abs=1e-15)


@pytest.mark.parametrize("players", [["audio", "visual"], ["audio", "visual", "text"]])
def test_a_modality_that_never_matters_gets_zero(players):
    phi = shapley_values(lambda s: 0.9 if "audio" in s else 0.25, players)
    assert phi["audio"] == pytest.approx(0.65, abs=1e-15)
    assert all(phi[m] == 0.0 for m in players if m != "audio")


@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_values_add_up_to_all_minus_none_on_random_games(size):
    rng = random.Random(size)
    players = ["audio", "visual", "text", "depth"][:size]
    for _ in range(50):
        values = {s: rng.random() for s in coalitions(players)}
        phi = shapley_values(values.__getitem__, players)
        total = values[frozenset(players)] - values[frozenset()]
        assert math.isclose(math.fsum(phi.values()), total, rel_tol=0, abs_tol=1e-12)


def test_each_coalition_is_read_once():
    calls = []
    shapley_values(lambda s: calls.append(s) or len(s) ** 2, ["a", "b", "c", "d"])
    assert sorted(calls, key=len) == coalitions(["a", "b", "c", "d"]) and len(calls) == 16


def test_five_modalities_are_refused():
    with pytest.raises(ValueError, match="at most 4 modalities"):
        shapley_values(lambda s: 0.0, ["a", "b", "c", "d", "e"])
    with pytest.raises(ValueError, match="repeat"):
        shapley_values(lambda s: 0.0, ["a", "a"])


def test_evaluate_run_splits_fused_accuracy_into_shapley_values(small_shards, tmp_path, monkeypatch):
    from mmbalance.engine import evaluation

    tree = recipe_dict(small_shards, optim={"lr": 0.01})
    tree["schedule"]["epochs"] = 2
    tree["eval"]["corruptions"] = [{"modality": "visual", "name": "feature_noise", "levels": [1]}]
    tree = validate_recipe(tree).to_dict()
    run_training(RunSpec.of(tree, tmp_path / "run", verbose=False))
    passes = []
    score_arrays = evaluation.score_arrays
    monkeypatch.setattr(evaluation, "score_arrays", lambda *a, **k: passes.append(1) or score_arrays(*a, **k))

    scores = evaluation.evaluate_run(tmp_path / "run", tree)
    test, robust = scores["test"], scores["robustness"]
    assert set(test) >= {
        "shapley_audio",
        "shapley_visual",
        "coalition_audio+visual",
        "coalition_audio",
        "coalition_visual",
        "coalition_none",
    }
    assert math.isclose(
        test["shapley_audio"] + test["shapley_visual"], test["acc"] - test["coalition_none"], rel_tol=0, abs_tol=1e-12
    )
    assert test["coalition_audio+visual"] == test["acc"]
    assert test["coalition_audio"] == robust["missing_visual"] and test["coalition_visual"] == robust["missing_audio"]
    # clean + missing_audio + missing_visual + feature_noise_visual_1, then only the all-missing pass
    assert len(passes) == 4 + 1
