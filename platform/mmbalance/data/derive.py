"""Derived datasets: a copy of a shard directory with corruptions baked into chosen splits.

A corruption applied at evaluation (``eval.corruptions``) leaves training clean; a study of
"the image is noisy everywhere" needs the noise in train, val and test alike, fixed per
sample so every run and seed sees the same inputs. ``write_corrupted_copy`` reads each split,
applies the per-sample-seeded corruptions of ``data/corruptions.py`` to the splits named, and
writes new shards whose manifest records what was done (``preprocessing.derived_from``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from mmbalance.data.corruptions import CorruptionPlan, CorruptionSpec, apply_corruption
from mmbalance.data.manifest import Manifest, read_manifest
from mmbalance.data.shards import SplitArrays, load_split, write_shards


def write_corrupted_copy(
    source: str | Path,
    out: str | Path,
    corruptions: Sequence[CorruptionSpec],
    splits: Sequence[str] | None = None,
    seed: int = 0,
    overwrite: bool = False,
) -> Manifest:
    """Copy ``source`` to ``out`` with ``corruptions`` applied to ``splits`` (default: all).

    Splits not named are copied unchanged, so a "noisy test only" copy keeps a clean val split
    for model selection. The noise of a sample depends on (seed, corruption, sample id) only."""
    manifest = read_manifest(source)
    targets = list(manifest.splits) if splits is None else list(splits)
    unknown = [s for s in targets if s not in manifest.splits]
    if unknown:
        raise ValueError(f"splits {unknown} are not in {source}; it has {sorted(manifest.splits)}")
    plan = CorruptionPlan(corruptions=list(corruptions), seed=seed)
    data = {}
    for split in manifest.splits:
        arrays = load_split(source, manifest, split)
        if split in targets:
            arrays = SplitArrays(
                arrays.sample_ids, arrays.labels, apply_corruption(arrays.modalities, arrays.sample_ids, plan)
            )
        data[split] = arrays
    record = {
        "source": manifest.dataset,
        "corrupted_splits": targets,
        "plan": plan.model_dump(mode="json"),
        "source_preprocessing": manifest.preprocessing,
    }
    return write_shards(
        out,
        dataset=f"{manifest.dataset}+corrupted",
        classes=manifest.classes,
        modalities=manifest.modalities,
        splits=data,
        generator=manifest.generator,
        preprocessing={"derived_from": record},
        overwrite=overwrite,
    )
