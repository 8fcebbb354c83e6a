"""Scoring a finished (or early-stopped) run from its best-val checkpoint, as a separate phase.

A Tune scheduler may stop a trial at any report, so nothing after a trial's last report is
guaranteed to run. The search therefore scores every trial here, from the best-val
checkpoint it reported: test accuracy (fused and per modality) and robustness — accuracy
with each modality missing (its input zeroed) and under each configured corruption level.
With 2-4 modalities it also splits fused test accuracy into each modality's Shapley value
(``shapley.py``): every coalition is scored with the modalities outside it missing, the same
masking as the missing-modality scores. The test split is read here and nowhere in model selection.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from mmbalance.config import EvalCorruption, Recipe
from mmbalance.data.manifest import Manifest, read_manifest
from mmbalance.data.shards import SplitArrays, load_split
from mmbalance.engine.batches import InMemorySplit
from mmbalance.engine.build import build_bound_objective, build_model, load_model_state, resolve_device
from mmbalance.engine.checkpoint import load_state
from mmbalance.engine.metrics import imbalance_ratio
from mmbalance.engine.shapley import MAX_PLAYERS, coalitions, shapley_values
from mmbalance.engine.steps import evaluate
from mmbalance.layout import RunDir

ArrayTransform = Callable[[SplitArrays], SplitArrays]


def missing(modality: str, fill: dict[str, Any] | None = None) -> ArrayTransform:
    """The modality absent from every sample: zeros, or ``fill`` (``corruptions.neutral_fill``
    of its manifest spec: the raw value that the model's normalisation maps to zero)."""
    return corrupted(modality, "missing", 1.0, 1.0, 0, **(fill or {}))


class Corrupted:
    """A per-sample seeded ``CorruptionPlan`` as an ``ArrayTransform``. ``for_data`` adapts its
    specs to a run's data (``corruptions.for_data``: ``missing``'s neutral fill, ``feature_noise``'s
    train-split std); ``robustness_transforms`` and ``sweep`` do that before scoring."""

    def __init__(self, plan):
        self.plan = plan

    def __call__(self, arrays: SplitArrays) -> SplitArrays:
        from mmbalance.data.corruptions import apply_corruption

        return SplitArrays(
            arrays.sample_ids, arrays.labels, apply_corruption(arrays.modalities, arrays.sample_ids, self.plan)
        )

    def for_data(
        self, shard_dir: str, manifest: Manifest, train_split: str, cache: dict[str, Any] | None = None
    ) -> "Corrupted":
        from mmbalance.data.corruptions import for_data

        specs = for_data(self.plan.corruptions, shard_dir, manifest, train_split, cache)
        return Corrupted(self.plan.model_copy(update={"corruptions": specs}))


def corrupted(modality: str, name: str, level: float, p: float, seed: int, **params) -> Corrupted:
    """Per-sample seeded corruption of one modality (the same noise for a sample id wherever
    and however often it is scored); ``params`` are the corruption's own settings."""
    from mmbalance.data.corruptions import CorruptionPlan, make_spec

    return Corrupted(
        CorruptionPlan(corruptions=[make_spec(name, **params, modality=modality, level=level, p=p)], seed=seed)
    )


def condition_label(name: str, modality: str, level: float) -> str:
    """How a corruption condition is named in ``result.json``'s robustness scores, in the search's
    ``robust_*`` columns and in ``mmbalance eval``'s table: ``gaussian_visual_5``."""
    return f"{name}_{modality}_{level:g}"


def missing_transforms(modalities, manifest: Manifest) -> dict[str, ArrayTransform]:
    """``missing_<m>``: modality m absent from every sample, filled with its neutral value."""
    from mmbalance.data.corruptions import neutral_fill

    return {f"missing_{m}": missing(m, neutral_fill(manifest.modalities[m])) for m in modalities}


def sweep_transforms(sweeps: list[EvalCorruption], seed: int, manifest: Manifest) -> dict[str, ArrayTransform]:
    """Every level of every sweep, labelled by ``condition_label``; not yet adapted to a run's
    data (``Corrupted.for_data``: ``sweep`` does it, or ``robustness_transforms``)."""
    from mmbalance.data.corruptions import neutral_fill

    transforms: dict[str, ArrayTransform] = {}
    for item in sweeps:
        params = item.params
        if item.name == "missing" and item.modality in manifest.modalities:
            params = {**neutral_fill(manifest.modalities[item.modality]), **item.params}
        for level in item.levels:
            transforms[condition_label(item.name, item.modality, level)] = corrupted(
                item.modality, item.name, level, item.p, seed, **params
            )
    return transforms


def robustness_transforms(recipe: Recipe, manifest: Manifest) -> dict[str, ArrayTransform]:
    """Each modality missing, then every configured corruption level (``eval.corruptions``),
    adapted to the recipe's data (``feature_noise``: the std of its ``data.train_split``)."""
    transforms = missing_transforms(recipe.modalities, manifest)
    cache: dict[str, Any] = {}  # modality -> train std, computed once for all levels
    for label, transform in sweep_transforms(recipe.eval.corruptions, recipe.eval.corruption_seed, manifest).items():
        transforms[label] = transform.for_data(recipe.data.path, manifest, recipe.data.train_split, cache)
    return transforms


def for_run(transforms: dict[str, ArrayTransform], recipe: Recipe, manifest: Manifest) -> dict[str, ArrayTransform]:
    """``sweep``'s check before any scoring: every ``Corrupted`` transform names a modality of
    the run whose manifest dtype its corruptions take (else a ``CorruptionError`` naming the
    condition), and is adapted to the run's data (``Corrupted.for_data``, train split only).
    Other callables pass through unchanged."""
    from mmbalance.data.corruptions import CorruptionError, accepts_dtype

    for label, transform in transforms.items():
        for spec in transform.plan.corruptions if isinstance(transform, Corrupted) else ():
            if spec.modality not in recipe.modalities:
                raise CorruptionError(
                    f"{label}: {spec.modality!r} is not a modality of this run; allowed: {sorted(recipe.modalities)}"
                )
            dtype = manifest.modalities[spec.modality].dtype
            if not accepts_dtype(spec, dtype):
                raise CorruptionError(
                    f"{label}: {spec.name} cannot corrupt {spec.modality!r} of dtype {dtype}; "
                    f"it takes {'/'.join(spec.accepts)} (dtype name or numpy kind)"
                )
    cache: dict[str, Any] = {}
    return {
        label: transform.for_data(recipe.data.path, manifest, recipe.data.train_split, cache)
        if isinstance(transform, Corrupted)
        else transform
        for label, transform in transforms.items()
    }


def load_best_model(run_dir: str | Path, recipe: Recipe, device: torch.device):
    """The best-val model of a run, rebuilt with its own head count, and its objective state."""
    manifest = read_manifest(recipe.data.path)
    state = load_state(RunDir(run_dir).checkpoint("best"))
    torch.manual_seed(recipe.seed)
    model = build_model(recipe, manifest).to(device)
    objective = build_bound_objective(recipe, model)
    load_model_state(model, objective, state)
    return model, objective, state


def score_arrays(
    model, objective, arrays: SplitArrays, modalities: list[str], batch_size: int, epoch: int, device: torch.device
) -> dict[str, float]:
    split = InMemorySplit(arrays, modalities)
    batches = split.iterate(batch_size, shuffle_seed=None, drop_last=False, device=device)
    metrics = evaluate(model, objective, batches, epoch).means()
    metrics["imbalance_ratio"] = imbalance_ratio(metrics, modalities, "")
    return metrics


def sweep(
    run_dir: str | Path, recipe_tree: dict[str, Any], split: str, transforms: dict[str, ArrayTransform]
) -> dict[str, dict[str, float]]:
    """Fused and per-modality accuracy of the best-val checkpoint on ``split`` under each
    transform (``"clean"`` first), for `mmbalance eval`. ``Corrupted`` transforms are checked
    and adapted to the run's data first (``for_run``: e.g. ``feature_noise`` gets the std of the
    run's train split, whichever split is scored)."""
    recipe = Recipe.model_validate(recipe_tree)
    manifest = read_manifest(recipe.data.path)
    transforms = for_run(transforms, recipe, manifest)  # a corruption that cannot apply fails before any work
    device = resolve_device(recipe.scaling.device)
    model, objective, state = load_best_model(run_dir, recipe, device)
    modalities = list(recipe.modalities)
    name = getattr(recipe.data, f"{split}_split")
    arrays = load_split(recipe.data.path, manifest, name, modalities)
    table = {}
    for label, transform in {"clean": None, **transforms}.items():
        metrics = score_arrays(
            model,
            objective,
            transform(arrays) if transform else arrays,
            modalities,
            recipe.eval.batch_size,
            state["progress"]["best_epoch"],
            device,
        )
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
    transforms = robustness_transforms(recipe, manifest)
    robustness = {name: score(transform(test))["acc_fused"] for name, transform in transforms.items()}
    known = {
        frozenset(modalities): clean["acc_fused"],
        **{frozenset(modalities) - {m}: robustness[f"missing_{m}"] for m in modalities},
    }
    contributions = shapley_scores(lambda arrays: score(arrays)["acc_fused"], test, modalities, transforms, known)
    return {
        "best_epoch": epoch,
        "best_val": state["progress"]["best_val"],
        "test": {
            "acc": clean["acc_fused"],
            "acc_per_modality": {m: clean[f"acc_{m}"] for m in modalities},
            "imbalance_ratio": clean["imbalance_ratio"],
            "samples": len(test),
            **contributions,
        },
        "robustness": robustness,
    }


def shapley_scores(
    fused: Callable[[SplitArrays], float],
    arrays: SplitArrays,
    modalities: list[str],
    transforms: dict[str, ArrayTransform],
    known: dict[frozenset[str], float],
) -> dict[str, float]:
    """``shapley_<m>`` (``shapley.shapley_values`` of fused accuracy) for each modality and
    ``coalition_<a+b>`` (fused accuracy with only a and b present; ``coalition_none``: all
    missing) for every coalition, when there are 2 to ``MAX_PLAYERS`` modalities; else nothing.
    A coalition's absent modalities go through their ``transforms["missing_<m>"]`` in turn;
    coalitions in ``known`` (the clean and single-missing passes) are not scored again."""
    if not 2 <= len(modalities) <= MAX_PLAYERS:
        return {}
    values = dict(known)

    def value(present: frozenset[str]) -> float:
        if present not in values:
            masked = arrays
            for m in modalities:
                if m not in present:
                    masked = transforms[f"missing_{m}"](masked)
            values[present] = fused(masked)
        return values[present]

    phi = shapley_values(value, modalities)
    names = {s: "+".join(m for m in modalities if m in s) or "none" for s in coalitions(modalities)}
    return {
        **{f"shapley_{m}": phi[m] for m in modalities},
        **{f"coalition_{names[s]}": values[s] for s in reversed(coalitions(modalities))},
    }
