"""Search spaces: parsing, trial expansion and validation against a recipe (no Ray)."""

import pytest
import yaml

from helpers import REPO, recipe_dict
from mmbalance.config import ConfigError
from mmbalance.tune.space import SearchSpace, load_space, trial_recipe, validate_against


def _space(**fields) -> SearchSpace:
    return SearchSpace.model_validate(fields)


def test_every_shipped_space_loads_and_fits_the_synthetic_recipe(small_shards):
    spaces = sorted(p for p in (REPO / "search_spaces").glob("*.yaml") if not p.stem.startswith("study_"))
    assert {p.stem for p in spaces} >= {"quickstart", "mnl_asha", "guidance_ablation", "objectives_compare"}
    for path in spaces:
        validate_against(load_space(path), recipe_dict(small_shards))


def test_draws_are_shared_by_seeds_and_crossed_with_grids():
    space = _space(
        space={"objective.lam": {"loguniform": [0.1, 1.0]}, "objective.scope": {"grid": ["nontarget", "all"]}},
        seeds=[0, 1, 2],
        samples=4,
    )
    configs = space.configurations()
    assert len(configs) == space.trial_count() == 4 * 2 * 3
    by_draw = {}
    for config in configs:
        by_draw.setdefault((config["objective.lam"], config["objective.scope"]), []).append(config["seed"])
    assert len(by_draw) == 8 and all(sorted(seeds) == [0, 1, 2] for seeds in by_draw.values())
    assert all(0.1 <= lam <= 1.0 for lam, _ in by_draw)
    assert configs == _space(**space.model_dump()).configurations()  # same space -> same trials


def test_unknown_recipe_key_in_a_space_is_named(small_shards):
    space = _space(space={"objective.lamm": {"choice": [0.1, 0.5]}}, set={"objective.name": "mnl"})
    with pytest.raises(ConfigError, match="lamm: unknown key"):
        validate_against(space, recipe_dict(small_shards))


def test_every_categorical_value_is_checked(small_shards):
    space = _space(
        space={"objective.guidance": {"choice": ["confidence", "loudest"]}},
        set={"objective.name": "mnl"},
        scheduler={"name": "fifo"},
    )
    with pytest.raises(ConfigError, match="loudest"):
        validate_against(space, recipe_dict(small_shards))


def test_range_ends_are_checked(small_shards):
    space = _space(space={"optim.lr": {"uniform": [-0.1, 0.1]}}, scheduler={"name": "fifo"})
    with pytest.raises(ConfigError, match="optim.lr"):
        validate_against(space, recipe_dict(small_shards))


def test_grace_period_must_cover_the_longest_warmup(small_shards):
    space = _space(
        space={"objective.warmup_epochs": {"choice": [0, 2]}},
        set={"objective.name": "mnl"},
        scheduler={"name": "asha", "grace_period": 1},
    )
    tree = recipe_dict(small_shards)
    tree["schedule"]["epochs"] = 6
    with pytest.raises(ConfigError, match="longest warm-up"):
        validate_against(space, tree)


def test_max_t_beyond_the_recipe_epochs_is_refused(small_shards):
    space = _space(scheduler={"name": "asha", "grace_period": 1, "max_t": 50})
    with pytest.raises(ConfigError, match="exceeds the recipe's schedule.epochs"):
        validate_against(space, recipe_dict(small_shards))


def test_bundles_set_several_keys_together():
    tree = trial_recipe(
        {"objective": {"name": "lf"}}, {}, {"method": {"objective.name": "arm", "model.fusion": "concat"}}, 3
    )
    assert tree["objective"]["name"] == "arm" and tree["model"]["fusion"] == "concat" and tree["seed"] == 3
    with pytest.raises(ValueError, match="bundle"):
        _space(space={"method": {"grid": ["lf", "mnl"]}})


def test_seeds_and_data_are_not_searchable():
    with pytest.raises(ValueError, match="seeds go in"):
        _space(space={"seed": {"choice": [1, 2]}})
    with pytest.raises(ValueError, match="seeds go in"):
        _space(set={"data.path": "/elsewhere"})


def test_distribution_needs_exactly_one_valid_form():
    with pytest.raises(ValueError, match="exactly one"):
        _space(space={"optim.lr": {"uniform": [0.1, 0.2], "choice": [1]}})
    with pytest.raises(ValueError, match="lo > 0"):
        _space(space={"optim.lr": {"loguniform": [0.0, 0.2]}})


def test_selection_metric_is_val_only():
    with pytest.raises(ValueError):
        _space(metric="test/acc_fused")


def test_unknown_space_section_is_refused(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"spaces": {}}))
    with pytest.raises(ConfigError, match="spaces"):
        load_space(path)
