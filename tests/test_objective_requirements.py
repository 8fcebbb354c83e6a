"""Objectives declare what they need (fusions, warm-up key, modality count, whether added heads
train); the recipe validator, the engine and the search-space validator read those declarations
and nothing else."""

from __future__ import annotations

import pytest
import torch

from helpers import REPO, recipe_dict
from mmbalance.config import ConfigError, load_recipe, validate_recipe
from mmbalance.data.manifest import read_manifest
from mmbalance.engine.build import build_bound_objective, build_model, build_optimizer
from mmbalance.engine.distributed import ProcessGroup
from mmbalance.engine.loop import Trainer, run_training
from mmbalance.engine.run_spec import RunSpec
from mmbalance.engine.sources import InMemorySource
from mmbalance.objectives import (
    OBJECTIVES,
    DistInfo,
    StepInputs,
    build_objective,
    objective_params_model,
    objective_requirements,
)
from mmbalance.objectives.base import FUSIONS, Requirements
from mmbalance.tune.space import SearchSpace, validate_against

MISFITS = [
    (name, fusion) for name in OBJECTIVES for fusion in FUSIONS if fusion not in objective_requirements(name).fusions
]


def test_every_objective_declares_its_fusions_and_warmup_key():
    for name, entry in OBJECTIVES.items():
        needs, params = entry.cls.requirements, entry.params
        assert isinstance(needs, Requirements) and set(needs.fusions) <= set(FUSIONS), name
        if needs.warmup_key is not None:
            assert needs.warmup_key in params.model_fields, f"{name}: warm-up key is not a parameter"
        assert needs.params_problems(params) == [], name
    assert MISFITS, "some objective must refuse some fusion, or the misfit tests below test nothing"


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_trains_new_heads_is_the_declared_value_or_parameter(name):
    """The engine reads ``objective.trains_new_heads``; it is what ``requirements`` declares, and
    where that names a parameter, flipping the parameter flips it."""
    needs = objective_requirements(name)
    assert build_objective(name, {}).trains_new_heads == needs.new_heads_trained(objective_params_model(name)())
    if isinstance(needs.trains_new_heads, str):
        for value in (True, False):
            assert build_objective(name, {needs.trains_new_heads: value}).trains_new_heads is value


def test_requirements_refuse_a_bad_trains_new_heads_and_report_unknown_parameter_names():
    with pytest.raises(ValueError, match="trains_new_heads"):
        Requirements(fusions=("mean",), trains_new_heads="")
    needs = Requirements(fusions=("mean",), warmup_key="warm", trains_new_heads="grow")
    problems = needs.params_problems(objective_params_model("lf"))
    assert len(problems) == 2 and "'warm'" in problems[0] and "'grow'" in problems[1]


def test_requirements_refuse_an_empty_or_unknown_fusion_list():
    with pytest.raises(ValueError, match="fusions"):
        Requirements(fusions=())
    with pytest.raises(ValueError, match="fusions"):
        Requirements(fusions=("attention",))


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_fusion_auto_picks_the_objectives_own_fusion(small_shards, name):
    tree = recipe_dict(small_shards, objective={"name": name})
    tree.pop("model", None)  # the default is auto
    recipe = validate_recipe(tree)
    assert recipe.model.fusion == objective_requirements(name).default_fusion
    assert recipe.to_dict()["model"]["fusion"] == recipe.model.fusion  # config.yaml records the fusion used


@pytest.mark.parametrize(("name", "fusion"), MISFITS)
def test_an_objective_with_a_fusion_it_cannot_use_is_a_config_error(small_shards, name, fusion):
    with pytest.raises(ConfigError) as info:
        validate_recipe(recipe_dict(small_shards, objective={"name": name}, model={"fusion": fusion}))
    message = str(info.value)
    assert f"objective.name={name}" in message and f"model.fusion={fusion}" in message
    assert all(f in message for f in objective_requirements(name).fusions)  # the allowed values


@pytest.mark.parametrize(("name", "fusion"), MISFITS[:3])
def test_the_engine_refuses_a_misfit_built_without_the_validator(small_shards, name, fusion):
    recipe = validate_recipe(recipe_dict(small_shards, objective={"name": name}))
    recipe.model.fusion = fusion  # bypasses validation, as programmatic use could
    with pytest.raises(ValueError, match=f"objective.name={name} needs model.fusion"):
        build_bound_objective(recipe, build_model(recipe, read_manifest(small_shards)))


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_shipped_synthetic_recipe_trains_every_objective_with_only_its_name_set(small_shards, tmp_path, name):
    recipe = load_recipe(
        REPO / "trainables" / "synthetic.yaml",
        [
            f"data.path={small_shards}",
            f"objective.name={name}",
            "schedule.epochs=1",
            "tracking.wandb=disabled",
            "eval.corruptions=[]",
        ],
    )
    result = run_training(RunSpec(recipe, tmp_path / name, verbose=False))
    assert result["objective"] == name and 0.0 <= result["test"]["acc"] <= 1.0


def test_a_single_modality_trains_with_lf_and_is_refused_by_the_others(small_shards, tmp_path):
    tree = recipe_dict(small_shards, modalities=("visual",), objective={"name": "lf"})
    result = run_training(RunSpec(validate_recipe(tree), tmp_path / "uni", verbose=False))
    assert list(result["test"]["acc_per_modality"]) == ["visual"]
    assert result["test"]["acc"] == result["test"]["acc_per_modality"]["visual"]  # fused = the one modality
    for name in OBJECTIVES:
        if objective_requirements(name).min_modalities > 1:
            with pytest.raises(ConfigError, match=f"objective.name={name} needs at least 2 modalities"):
                validate_recipe(recipe_dict(small_shards, modalities=("visual",), objective={"name": name}))


@pytest.mark.parametrize("name", [n for n in OBJECTIVES if objective_requirements(n).min_modalities > 1])
def test_the_engine_refuses_too_few_modalities_built_without_the_validator(small_shards, name):
    recipe = validate_recipe(recipe_dict(small_shards, objective={"name": name}))
    recipe.modalities = {"visual": recipe.modalities["visual"]}  # bypasses validation, as programmatic use could
    with pytest.raises(ValueError, match=f"objective.name={name} needs at least"):
        build_bound_objective(recipe, build_model(recipe, read_manifest(small_shards)))


def _space(**fields) -> SearchSpace:
    return SearchSpace.model_validate({"scheduler": {"name": "asha", "grace_period": 2, "max_t": 3}, **fields})


def test_search_space_grace_period_covers_each_objectives_declared_warmup_default(small_shards):
    base = recipe_dict(small_shards)
    base["schedule"]["epochs"] = 6
    arl_start = objective_params_model("arl")().model_dump()[objective_requirements("arl").warmup_key]
    assert arl_start > 2, "the test needs a default warm-up longer than the grace period"
    bundles = {"method": {"grid": [{"objective.name": "lf"}, {"objective.name": "arl"}]}}
    with pytest.raises(ConfigError, match=f"longest warm-up in the space \\({arl_start} epochs\\)"):
        validate_against(_space(space=bundles), base)
    short = {"method": {"grid": [{"objective.name": "lf"}, {"objective.name": "arl", "objective.start": 2}]}}
    assert validate_against(_space(space=short), base).objective.name == "lf"


def test_search_space_reads_the_warmup_key_of_the_objective_it_sets(small_shards):
    base = recipe_dict(small_shards)
    base["schedule"]["epochs"] = 6
    space = _space(set={"objective.name": "mnl"}, space={"objective.warmup_epochs": {"choice": [0, 3]}})
    with pytest.raises(ConfigError, match="longest warm-up in the space \\(3 epochs\\)"):
        validate_against(space, base)


def test_frozen_new_heads_never_hold_a_gradient(small_shards):
    """AUG's official variant: a head the optimizer does not step must not keep gradients."""
    tree = recipe_dict(
        small_shards, objective={"name": "aug", "train_new_heads": False, "check_every_epochs": 1, "tau": 0.0}
    )
    tree["optim"] = {"name": "sgd", "lr": 0.05, "grad_clip": 1.0}
    recipe = validate_recipe(tree)
    manifest = read_manifest(small_shards)
    source = InMemorySource(recipe, manifest, torch.device("cpu"))
    checked = []

    def after_each_step(epoch: int, step: int) -> None:  # the hook runs before each step: after the last one
        added = [p for m in trainer.modalities for layer in trainer.model.heads[m][1:] for p in layer.parameters()]
        assert all(p.grad is None and not p.requires_grad for p in added), (epoch, step)
        checked.append(len(added))

    trainer = Trainer(recipe, manifest, ProcessGroup(), source, torch.device("cpu"), on_step=after_each_step)
    for epoch in range(3):
        trainer.train_epoch(epoch)
        trainer.end_epoch(epoch)
    added = [layer for m in trainer.modalities for layer in trainer.model.heads[m][1:]]
    assert added and max(checked) > 0, "the test must cover steps with an added head"
    for layer in added:
        assert all(p.grad is None and not p.requires_grad for p in layer.parameters())
    held = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in held for layer in added for p in layer.parameters())


def test_official_aug_with_clipping_equals_a_loop_that_clears_every_grad(small_shards):
    """Frozen heads (``train_new_heads: false``) under ``grad_clip``: the engine must step exactly
    like a plain loop that clears every ``.grad`` before each backward and clips what the
    optimizer holds. Stale gradients left on a frozen head would shrink the clip factor."""
    tree = recipe_dict(
        small_shards, objective={"name": "aug", "train_new_heads": False, "check_every_epochs": 1, "tau": 0.0}
    )
    tree["optim"] = {"name": "sgd", "lr": 0.05, "momentum": 0.9, "grad_clip": 0.5}
    recipe = validate_recipe(tree)
    manifest = read_manifest(small_shards)
    source = InMemorySource(recipe, manifest, torch.device("cpu"))
    trainer = Trainer(recipe, manifest, ProcessGroup(), source, torch.device("cpu"))
    for epoch in range(3):
        trainer.train_epoch(epoch)
        trainer.end_epoch(epoch)

    torch.manual_seed(recipe.seed)  # the Trainer's initialisation; added heads draw from the same stream
    model = build_model(recipe, manifest)
    objective = build_bound_objective(recipe, model)
    optimizer = build_optimizer(recipe.optim, model.parameters())
    for epoch in range(3):
        stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        batches, steps = source.train_batches(epoch, recipe.schedule.batch_size)
        for step, (batch, labels) in enumerate(batches):
            ctx = objective.forward_context("train", epoch)
            features, outputs = model(batch, ctx)
            result = objective.step(
                StepInputs(
                    features,
                    outputs,
                    labels,
                    epoch * steps + step,
                    epoch,
                    steps,
                    "train",
                    recompute_heads=lambda: model.heads_forward(features, ctx),
                )
            )
            for group in result.losses:
                for param in model.parameters():
                    param.grad = None
                group.value().backward()
                held = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
                torch.nn.utils.clip_grad_norm_(held, recipe.optim.grad_clip)
                optimizer.step()
            for key, (total, count) in result.stats.items():
                old = stats.get(key, (0.0, 0.0))
                stats[key] = (old[0] + total.double(), old[1] + count.double())
        for change in objective.on_epoch_end(epoch, stats, DistInfo()):
            model.add_head(change.modality)  # official: never given to the optimizer
    assert trainer.model.head_counts() == model.head_counts() and sum(model.head_counts().values()) > 2
    reference = model.state_dict()
    for key, value in trainer.model.state_dict().items():
        torch.testing.assert_close(value, reference[key], rtol=0, atol=1e-6, msg=key)
