import pytest
import yaml

from helpers import REPO, recipe_dict
from mmbalance.config import ConfigError, check_against_data, load_recipe, parse_override, validate_recipe
from mmbalance.data.manifest import read_manifest


def _error(tree) -> str:
    with pytest.raises(ConfigError) as info:
        validate_recipe(tree)
    return str(info.value)


def test_every_shipped_recipe_loads_into_its_model():
    recipes = sorted((REPO / "trainables").glob("*.yaml"))
    assert recipes, "no recipes shipped"
    for path in recipes:
        load_recipe(path)


def test_unknown_key_is_named_with_its_path(small_shards):
    tree = recipe_dict(small_shards)
    tree["optim"]["learning_rate"] = 0.1
    assert "optim.learning_rate: unknown key" in _error(tree)


def test_unknown_objective_parameter_is_named(small_shards):
    tree = recipe_dict(small_shards, objective={"name": "mnl", "lamm": 0.5})
    assert "lamm: unknown key" in _error(tree)


def test_wrong_type_and_negative_lr_are_reported_together(small_shards):
    tree = recipe_dict(small_shards)
    tree["optim"]["lr"] = -0.1
    tree["schedule"]["epochs"] = "ten"
    message = _error(tree)
    assert "optim.lr: Input should be greater than 0" in message
    assert "schedule.epochs" in message


def test_unknown_encoder_lists_the_allowed_ones(small_shards):
    tree = recipe_dict(small_shards)
    tree["modalities"]["audio"]["encoder"] = "transformer9000"
    message = _error(tree)
    assert "modalities.audio" in message and "'cnn', 'mlp', 'resnet18', 'text'" in message


def test_encoder_params_are_validated(small_shards):
    tree = recipe_dict(small_shards)
    tree["modalities"]["audio"]["params"]["out_dim"] = 0
    assert "params.out_dim" in _error(tree)


def test_unknown_objective_and_fusion_list_allowed_values(small_shards):
    message = _error(recipe_dict(small_shards, objective={"name": "magic"}))
    assert "unknown objective 'magic'" in message and "'lf'" in message
    message = _error(recipe_dict(small_shards, model={"fusion": "attention"}))
    assert "model.fusion" in message and "'mean'" in message


def test_recipe_with_val_equal_test_is_refused(small_shards):
    tree = recipe_dict(small_shards)
    tree["data"]["val_split"] = "test"
    assert "model selection must never see the test split" in _error(tree)


def test_modality_missing_from_the_data_is_refused(small_shards):
    recipe = validate_recipe(recipe_dict(small_shards, modalities=("audio", "depth")))
    with pytest.raises(ConfigError, match=r"modalities.depth: not in the data .* allowed: \['audio', 'visual'\]"):
        check_against_data(recipe, read_manifest(small_shards))


def test_dotted_overrides_parse_yaml_values(tmp_path, small_shards):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(small_shards)))
    recipe = load_recipe(
        path, ["objective.name=mnl", "objective.lam=0.25", "optim.grad_clip=null", "schedule.epochs=7"]
    )
    assert recipe.objective.params == {"lam": 0.25}
    assert recipe.optim.grad_clip is None and recipe.schedule.epochs == 7


def test_malformed_override_is_an_error():
    with pytest.raises(ConfigError, match="key.path=value"):
        parse_override("no-equals-sign")


def test_stdlib_platform_module_is_not_shadowed():
    import platform

    assert platform.python_version()
    assert not (REPO / "platform" / "__init__.py").exists()


def test_corruption_items_take_the_corruptions_own_settings(small_shards):
    from mmbalance.engine.evaluation import robustness_transforms

    tree = recipe_dict(small_shards)
    tree["eval"] = {
        "corruptions": [{"modality": "visual", "name": "gaussian", "levels": [5], "params": {"pixel_range": 4.0}}]
    }
    recipe = validate_recipe(tree)
    assert recipe.eval.corruptions[0].spec(5).pixel_range == 4.0
    assert "gaussian_visual_5" in robustness_transforms(recipe, read_manifest(small_shards))
    tree["eval"]["corruptions"][0]["params"] = {"pixel_rang": 4.0}
    assert "pixel_rang: unknown key" in _error(tree)
    tree["eval"]["corruptions"][0]["params"] = {"level": 3}
    assert "are set by the item itself" in _error(tree)
    tree = recipe_dict(small_shards)
    tree["data"]["train_corruptions"] = [
        {"modality": "visual", "name": "salt_pepper", "level": 10, "params": {"channel_axis": -7, "bogus": 1}}
    ]
    assert "bogus: unknown key" in _error(tree)


def test_data_modalities_keeps_only_those_modalities(small_shards):
    tree = recipe_dict(small_shards)
    tree["data"]["modalities"] = ["audio"]
    recipe = validate_recipe(tree)
    assert list(recipe.modalities) == ["audio"] and recipe.data.modalities == ["audio"]
    assert list(validate_recipe(recipe_dict(small_shards)).modalities) == ["audio", "visual"]  # null: every modality
    tree["data"]["modalities"] = ["visual", "audio"]
    assert list(validate_recipe(tree).modalities) == ["audio", "visual"]  # the recipe's order, not the list's


def test_data_modalities_naming_an_unknown_modality_is_refused_with_the_key(small_shards, tmp_path, capsys):
    tree = recipe_dict(small_shards)
    tree["data"]["modalities"] = ["audio", "depth"]
    assert "data.modalities: ['depth'] not in the recipe's modalities; allowed: ['audio', 'visual']" in _error(tree)
    tree["data"]["modalities"] = ["audio", "audio"]
    assert "data.modalities: ['audio', 'audio'] repeats a name" in _error(tree)
    tree["data"]["modalities"] = []
    assert "data.modalities: List should have at least 1 item" in _error(tree)
    from mmbalance.cli import main

    assert (
        main(
            [
                "train",
                "--recipe",
                str(REPO / "trainables" / "synthetic.yaml"),
                "--set",
                f"data.path={small_shards}",
                "--set",
                "data.modalities=[depth]",
                "--output",
                str(tmp_path / "run"),
            ]
        )
        == 2
    )
    assert "data.modalities: ['depth'] not in the recipe's modalities" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_data_modalities_drops_the_corruptions_of_dropped_modalities(small_shards):
    tree = recipe_dict(small_shards)
    tree["eval"]["corruptions"] = [
        {"modality": "audio", "name": "gaussian", "levels": [5]},
        {"modality": "visual", "name": "feature_noise", "levels": [1]},
    ]
    tree["data"]["train_corruptions"] = [
        {"modality": "audio", "name": "feature_noise", "level": 1},
        {"modality": "visual", "name": "missing", "level": 1, "p": 0.1},
    ]
    tree["data"]["modalities"] = ["visual"]
    recipe = validate_recipe(tree)
    assert [(c.modality, c.name) for c in recipe.eval.corruptions] == [("visual", "feature_noise")]
    assert [(c.modality, c.name) for c in recipe.data.train_corruptions] == [("visual", "missing")]
    check_against_data(recipe, read_manifest(small_shards))  # what remains fits the data


def test_data_modalities_round_trips_through_to_dict_and_config_yaml(small_shards, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(small_shards)))
    recipe = load_recipe(path, ["data.modalities=[audio]"])  # --set parses the list as YAML
    assert recipe.to_dict()["data"]["modalities"] == ["audio"] and list(recipe.to_dict()["modalities"]) == ["audio"]
    assert validate_recipe(recipe.to_dict()) == recipe
    assert validate_recipe(yaml.safe_load(yaml.safe_dump(recipe.to_dict(), sort_keys=False))) == recipe


def test_train_with_data_modalities_visual_runs_a_visual_only_model(tmp_path):
    import json

    from mmbalance.cli import main
    from mmbalance.data.synthetic import SyntheticModality, SyntheticSpec, prepare_synthetic

    shards = tmp_path / "shards"
    prepare_synthetic(
        shards,
        SyntheticSpec(
            samples={"train": 96, "val": 32, "test": 32},
            classes=3,
            modalities={"audio": SyntheticModality(dim=4, signal=1.0), "visual": SyntheticModality(dim=4, signal=1.0)},
        ),
    )
    run = tmp_path / "run"
    # The shipped recipe sweeps audio noise at evaluation; the visual-only run drops that sweep.
    assert (
        main(
            [
                "train",
                "--recipe",
                str(REPO / "trainables" / "synthetic.yaml"),
                "--set",
                f"data.path={shards}",
                "--set",
                "data.modalities=[visual]",
                "--set",
                "schedule.epochs=1",
                "--set",
                "schedule.batch_size=16",
                "--set",
                "tracking.wandb=disabled",
                "--output",
                str(run),
            ]
        )
        == 0
    )
    result = json.loads((run / "result.json").read_text())
    assert list(result["test"]["acc_per_modality"]) == ["visual"] and result["test"]["samples"] == 32
    saved = validate_recipe(yaml.safe_load((run / "config.yaml").read_text()))
    assert list(saved.modalities) == ["visual"] and saved.data.modalities == ["visual"] and saved.eval.corruptions == []
    assert validate_recipe(saved.to_dict()) == saved
