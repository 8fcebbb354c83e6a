
import pytest
import yaml

from mmbalance.config import ConfigError, check_against_data, load_recipe, parse_override, validate_recipe
from mmbalance.data.manifest import read_manifest

from conftest import REPO, recipe_dict


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
    recipe = load_recipe(path, ["objective.name=mnl", "objective.lam=0.25", "optim.grad_clip=null", "schedule.epochs=7"])
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
    tree["eval"] = {"corruptions": [{"modality": "visual", "name": "gaussian", "levels": [5],
                                     "params": {"pixel_range": 4.0}}]}
    recipe = validate_recipe(tree)
    assert recipe.eval.corruptions[0].spec(5).pixel_range == 4.0
    assert "gaussian_visual_5" in robustness_transforms(recipe, read_manifest(small_shards))
    tree["eval"]["corruptions"][0]["params"] = {"pixel_rang": 4.0}
    assert "pixel_rang: unknown key" in _error(tree)
    tree["eval"]["corruptions"][0]["params"] = {"level": 3}
    assert "are set by the item itself" in _error(tree)
    tree = recipe_dict(small_shards)
    tree["data"]["train_corruptions"] = [{"modality": "visual", "name": "salt_pepper", "level": 10,
                                          "params": {"channel_axis": -7, "bogus": 1}}]
    assert "bogus: unknown key" in _error(tree)
