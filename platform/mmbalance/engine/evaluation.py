"""Scoring a finished (or early-stopped) run from its best-val checkpoint, as a separate phase.

A Tune scheduler may stop a trial at any report, so nothing after a trial's last report is
guaranteed to run. The search therefore scores every trial here, from the best-val
checkpoint it reported: test accuracy (fused and per modality) and robustness — accuracy
with each modality missing (its input zeroed) and under each configured corruption level.
The test split is read here and nowhere in model selection.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from mmbalance.config import Recipe
from mmbalance.data.manifest import Manifest, read_manifest
from mmbalance.data.shards import SplitArrays, load_split
from mmbalance.engine.batches import InMemorySplit
from mmbalance.engine.build import build_bound_objective, build_model, load_model_state, resolve_device
from mmbalance.engine.checkpoint import load_state
from mmbalance.engine.metrics import imbalance_ratio
from mmbalance.engine.steps import evaluate

ArrayTransform = Callable[[SplitArrays], SplitArrays]


def missing(modality: str, fill: dict[str, Any] | None = None) -> ArrayTransform:
    """The modality absent from every sample: zeros, or ``fill`` (``corruptions.neutral_fill``
    of its manifest spec: the raw value that the model's normalisation maps to zero)."""
    return corrupted(modality, "missing", 1.0, 1.0, 0, **(fill or {}))


def corrupted(modality: str, name: str, level: float, p: float, seed: int, **params) -> ArrayTransform:
    """Per-sample seeded corruption of one modality (the same noise for a sample id wherever
    and however often it is scored); ``params`` are the corruption's own settings."""
    from mmbalance.data.corruptions import CorruptionPlan, apply_corruption, make_spec

    plan = CorruptionPlan(corruptions=[make_spec(name, **params, modality=modality, level=level, p=p)], seed=seed)

    def apply(arrays: SplitArrays) -> SplitArrays:
        return SplitArrays(arrays.sample_ids, arrays.labels, apply_corruption(arrays.modalities, arrays.sample_ids, plan))

    return apply


def robustness_transforms(recipe: Recipe, manifest: Manifest) -> dict[str, ArrayTransform]:
    """Each modality missing, then every configured corruption level (``eval.corruptions``)."""
    from mmbalance.data.corruptions import neutral_fill

    fills = {m: neutral_fill(manifest.modalities[m]) for m in recipe.modalities}
    transforms = {f"missing_{m}": missing(m, fills[m]) for m in recipe.modalities}
    for sweep in recipe.eval.corruptions:
        params = {**fills[sweep.modality], **sweep.params} if sweep.name == "missing" else sweep.params
        for level in sweep.levels:
            transforms[f"{sweep.name}_{sweep.modality}_{level:g}"] = corrupted(
                sweep.modality, sweep.name, level, sweep.p, recipe.eval.corruption_seed, **params)
    return transforms


def load_best_model(run_dir: str | Path, recipe: Recipe, device: torch.device):
    """The best-val model of a run, rebuilt with its own head count, and its objective state."""
    manifest = read_manifest(recipe.data.path)
    state = load_state(Path(run_dir) / "checkpoints" / "best")
    torch.manual_seed(recipe.seed)
    model = build_model(recipe, manifest).to(device)
    objective = build_bound_objective(recipe, model)
    load_model_state(model, objective, state)
    return model, objective, state


def score_arrays(model, objective, arrays: SplitArrays, modalities: list[str], batch_size: int, epoch: int,
                 device: torch.device) -> dict[str, float]:
    split = InMemorySplit(arrays, modalities)
    batches = split.iterate(batch_size, shuffle_seed=None, drop_last=False, device=device)
    metrics = evaluate(model, objective, batches, epoch).means()
    metrics["imbalance_ratio"] = imbalance_ratio(metrics, modalities, "")
    return metrics


def sweep(run_dir: str | Path, recipe_tree: dict[str, Any], split: str,
          transforms: dict[str, ArrayTransform]) -> dict[str, dict[str, float]]:
    """Fused and per-modality accuracy of the best-val checkpoint on ``split`` under each
    transform (``"clean"`` first), for `mmbalance eval`."""
    recipe = Recipe.model_validate(recipe_tree)
    device = resolve_device(recipe.scaling.device)
    model, objective, state = load_best_model(run_dir, recipe, device)
    modalities = list(recipe.modalities)
    name = getattr(recipe.data, f"{split}_split")
    arrays = load_split(recipe.data.path, read_manifest(recipe.data.path), name, modalities)
    table = {}
    for label, transform in {"clean": None, **transforms}.items():
        metrics = score_arrays(model, objective, transform(arrays) if transform else arrays, modalities,
                               recipe.eval.batch_size, state["progress"]["best_epoch"], device)
        table[label] = {"acc_fused": metrics["acc_fused"], **{f"acc_{m}": metrics[f"acc_{m}"] for m in modalities}}
    return table


def evaluate_run(run_dir: str | Path, recipe_tree: dict[str, Any]) -> dict[str, Any]:
    """Test and robustness metrics of a run's best-val checkpoint."""
    recipe = Recipe.model_validate(recipe_tree)
    device = resolve_device(recipe.scaling.device)
    model, objective, state = load_best_model(run_dir, recipe, device)
    modalities = list(recipe.modalities)
    manifest = read_manifest(recipe.data.path)
    test = load_split(recipe.data.path, manifest, recipe.data.test_split, modalities)
    epoch = state["progress"]["best_epoch"]

    def score(arrays: SplitArrays) -> dict[str, float]:
        return score_arrays(model, objective, arrays, modalities, recipe.eval.batch_size, epoch, device)

    clean = score(test)
    robustness = {name: score(transform(test))["acc_fused"] for name, transform in robustness_transforms(recipe, manifest).items()}
    return {
        "best_epoch": epoch,
        "best_val": state["progress"]["best_val"],
        "test": {"acc": clean["acc_fused"], "acc_per_modality": {m: clean[f"acc_{m}"] for m in modalities},
                 "imbalance_ratio": clean["imbalance_ratio"], "samples": len(test)},
        "robustness": robustness,
    }
