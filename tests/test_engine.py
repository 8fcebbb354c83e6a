import json

import pytest
import torch

from helpers import recipe_dict
from mmbalance.config import validate_recipe
from mmbalance.data.manifest import read_manifest
from mmbalance.data.synthetic import prepare_synthetic
from mmbalance.engine.build import (
    add_param_group,
    build_bound_objective,
    build_model,
    build_optimizer,
    build_scheduler,
    load_model_state,
)
from mmbalance.engine.distributed import ProcessGroup
from mmbalance.engine.loop import Trainer, run_training
from mmbalance.engine.run_spec import RunSpec
from mmbalance.engine.sources import InMemorySource
from mmbalance.objectives import OBJECTIVES
from mmbalance.tracking.records import RunRecord

# Every objective at its defaults (model.fusion: auto), plus AUG's official frozen heads.
VARIANTS = {
    **{name: {"name": name} for name in OBJECTIVES},
    "aug-frozen-heads": {"name": "aug", "train_new_heads": False},
}


def _run(tmp_path, name, tree, **extra):
    recipe = validate_recipe(tree)
    out = tmp_path / name
    result = run_training(RunSpec(recipe, out, verbose=False, **extra))
    return result, RunRecord(out).read_metrics()


def test_run_writes_config_metrics_result_and_checkpoints(tmp_path, small_shards):
    result, metrics = _run(tmp_path, "run", recipe_dict(small_shards))
    run = tmp_path / "run"
    assert (run / "config.yaml").is_file()
    assert [m["epoch"] for m in metrics] == [0, 1, 2]
    for key in (
        "train/loss_total",
        "train/loss_fused",
        "val/acc_fused",
        "val/acc_audio",
        "val/acc_visual",
        "val/tcp_audio",
        "val/ucom_visual",
        "val/imbalance_ratio",
        "train/samples_per_s",
        "lr",
    ):
        assert key in metrics[0], key
    saved = json.loads((run / "result.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert set(saved["test"]["acc_per_modality"]) == {"audio", "visual"}
    assert saved["val"]["best_acc"] == max(m["val/acc_fused"] for m in metrics)
    assert (run / "checkpoints" / "best" / "state.pt").is_file() and (
        run / "checkpoints" / "latest" / "state.pt"
    ).is_file()


def test_two_runs_with_the_same_seed_give_identical_metrics(tmp_path, small_shards):
    _, first = _run(tmp_path, "a", recipe_dict(small_shards))
    _, second = _run(tmp_path, "b", recipe_dict(small_shards))

    def strip(rows):
        return [{k: v for k, v in r.items() if k != "train/samples_per_s"} for r in rows]

    assert strip(first) == strip(second)
    tree = recipe_dict(small_shards)
    tree["seed"] = 1
    _, other = _run(tmp_path, "c", tree)
    assert strip(other) != strip(first)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_resumed_run_equals_uninterrupted_run(tmp_path, small_shards, variant):
    tree = recipe_dict(small_shards, objective=dict(VARIANTS[variant]))
    if tree["objective"]["name"] == "aug":
        tree["objective"]["check_every_epochs"] = 1
    full, full_metrics = _run(tmp_path, "full", tree)
    short = dict(tree, schedule={"epochs": 2, "batch_size": 32})
    _run(tmp_path, "part", short)
    resumed, resumed_metrics = _run(tmp_path, "part", tree, resume=True)

    def strip(rows):
        return [{k: v for k, v in r.items() if k != "train/samples_per_s"} for r in rows]

    assert strip(resumed_metrics) == strip(full_metrics)
    assert resumed["test"] == full["test"]


def test_test_split_is_scored_with_the_best_val_checkpoint(tmp_path, small_shards):
    tree = recipe_dict(small_shards)
    tree["schedule"]["epochs"] = 4
    tree["optim"]["lr"] = 0.05  # large steps: val accuracy is unlikely to be monotone
    result, metrics = _run(tmp_path, "run", tree)
    best = max(range(len(metrics)), key=lambda i: (metrics[i]["val/acc_fused"], -i))
    assert result["val"]["best_epoch"] == best


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_every_objective_trains_with_three_modalities(tmp_path, tri_shards, objective):
    tree = recipe_dict(tri_shards, modalities=("audio", "visual", "text"), objective={"name": objective})
    result, metrics = _run(tmp_path, objective, tree)
    assert set(result["test"]["acc_per_modality"]) == {"audio", "visual", "text"}
    assert metrics[-1]["train/loss_total"] < metrics[0]["train/loss_total"], objective


def test_aug_heads_are_added_and_survive_best_checkpoint_reload(tmp_path, small_shards):
    tree = recipe_dict(
        small_shards,
        objective={"name": "aug", "check_every_epochs": 1, "sigma": 1.0, "tau": 0.0},
        model={"fusion": "boost", "boost_hidden": 8},
    )
    tree["schedule"]["epochs"] = 3
    _, metrics = _run(tmp_path, "aug", tree)
    heads = [m["objective/aug_heads_visual"] + m["objective/aug_heads_audio"] for m in metrics]
    assert heads[-1] > 2, "the weak modality should have received heads"
    state = torch.load(tmp_path / "aug" / "checkpoints" / "latest" / "state.pt", weights_only=False)
    assert sum(state["head_counts"].values()) == heads[-1]


def test_check_epoch_validates_the_model_before_its_new_head(small_shards):
    """AUG's official order: validate (and keep the best snapshot), then add the head. A head
    added first would put an untrained Xavier classifier into the validated ensemble."""
    tree = recipe_dict(small_shards, objective={"name": "aug", "check_every_epochs": 1, "tau": 0.0})
    recipe = validate_recipe(tree)
    manifest = read_manifest(small_shards)
    source = InMemorySource(recipe, manifest, torch.device("cpu"))
    trainer = Trainer(recipe, manifest, ProcessGroup(), source, torch.device("cpu"))
    metrics = trainer.run_epoch(0)
    assert sum(trainer.model.head_counts().values()) == 3, "epoch 0 is a check epoch: one head is added"
    assert sum(metrics[f"objective/aug_heads_{m}"] for m in trainer.modalities) == 3
    assert sum(trainer.best["head_counts"].values()) == 2  # the best snapshot is the validated model
    torch.manual_seed(recipe.seed)
    validated = build_model(recipe, manifest)
    load_model_state(validated, build_bound_objective(recipe, validated), trainer.best)
    trainer.model, grown = validated, trainer.model
    before = trainer.score("val", 0)
    assert before == {k: v for k, v in metrics.items() if k.startswith("val/")}
    trainer.model = grown
    after = trainer.score("val", 0)
    assert any(after[f"val/tcp_{m}"] != before[f"val/tcp_{m}"] for m in trainer.modalities)  # the head counts


def test_added_param_group_follows_the_lr_schedule():
    layer, extra = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    tree_optim = validate_recipe(
        {
            "data": {"path": "x"},
            "modalities": {"a": {"encoder": "mlp"}, "b": {"encoder": "mlp"}},
            "schedule": {"epochs": 4, "batch_size": 2},
            "optim": {"name": "sgd", "lr": 1.0, "scheduler": "step", "step_size": 1, "step_gamma": 0.5},
        }
    ).optim
    optimizer = build_optimizer(tree_optim, layer.parameters())
    scheduler = build_scheduler(tree_optim, optimizer, 4)
    optimizer.step()
    scheduler.step()
    add_param_group(optimizer, scheduler, list(extra.parameters()))
    assert optimizer.param_groups[1]["lr"] == optimizer.param_groups[0]["lr"] == 0.5
    scheduler.step()
    assert optimizer.param_groups[1]["lr"] == optimizer.param_groups[0]["lr"] == 0.25


def test_synthetic_default_shows_the_imbalance_under_lf(tmp_path):
    """Acceptance: on the default dataset, LF's strong modality beats the weak one by >= 15
    points on test, and fusion is at least as good as the strong modality."""
    shards = tmp_path / "default"
    prepare_synthetic(shards)
    tree = recipe_dict(shards)
    tree["modalities"] = {
        m: {"encoder": "mlp", "params": {"hidden": [128], "out_dim": 64}} for m in ("audio", "visual")
    }
    tree["schedule"] = {"epochs": 8, "batch_size": 64}
    result, _ = _run(tmp_path, "lf", tree)
    accs = result["test"]["acc_per_modality"]
    assert accs["audio"] - accs["visual"] >= 0.15
    assert result["test"]["acc"] >= accs["audio"]


def test_no_secret_reaches_any_file_a_tracked_run_writes(tmp_path, small_shards, monkeypatch):
    fake = "fakekey-" + "0123456789abcdef" * 2 + "XYZ"
    monkeypatch.setenv("WANDB_API_KEY", fake)
    tree = recipe_dict(small_shards, tracking={"wandb": "offline"})
    tree["schedule"]["epochs"] = 2
    _run(tmp_path, "run", tree)
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert any("wandb" in p.parts for p in files), "the run must have logged to W&B offline"
    leaks = [p for p in files if fake.encode() in p.read_bytes()]
    assert leaks == []
