"""Helpers for converter tests: read shards back, and train one epoch on them in-process."""

from __future__ import annotations

from pathlib import Path

from helpers import recipe_dict
from mmbalance.config import check_against_data, validate_recipe
from mmbalance.data.manifest import Manifest
from mmbalance.data.shards import load_split, validate_shards
from mmbalance.engine.loop import run_training
from mmbalance.engine.run_spec import RunSpec


def shard_digest(out: Path) -> dict[str, str]:
    """Relative path -> sha256 for every file a conversion wrote (manifest included)."""
    import hashlib

    return {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.rglob("*"))
        if p.is_file()
    }


def read_back(out: Path) -> tuple[Manifest, dict[str, dict[str, int]]]:
    """Validate every shard, then return the manifest and ``{split: {sample_id: label}}``."""
    manifest = validate_shards(out)
    labels = {}
    for split in manifest.splits:
        arrays = load_split(out, manifest, split)
        labels[split] = dict(zip(arrays.sample_ids, arrays.labels.tolist()))
    return manifest, labels


def train_one_epoch(shards: Path, encoders: dict[str, dict], tmp_path: Path, batch_size: int = 4) -> dict:
    """One in-process LF epoch on converted shards; ``encoders`` maps modality ->
    ``{"encoder": name, "params": {...}}``. Returns the run's result dict."""
    tree = recipe_dict(shards, modalities=tuple(encoders))
    tree["modalities"] = encoders
    tree["schedule"] = {"epochs": 1, "batch_size": batch_size}
    tree["eval"] = {"batch_size": 16}
    recipe = validate_recipe(tree)
    check_against_data(recipe, validate_shards(shards))
    out = tmp_path / "run"
    return run_training(RunSpec(recipe, out, verbose=False))
