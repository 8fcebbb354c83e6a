"""``mmbalance eval RUN``: a run's best-val checkpoint scored under corruptions and missing
modalities.

The transforms and condition labels are those of the run's own robustness scores
(``engine/evaluation.py``: ``missing_audio``, ``gaussian_visual_5``), so a table from this
command and a search's ``robust_*`` columns name the same condition the same way."""

from __future__ import annotations

import json
from pathlib import Path

from mmbalance import errors
from mmbalance.config import ConfigError, EvalCorruption
from mmbalance.layout import RunDir

IMAGE_LIKE = ("image", "visual", "video", "frames", "rgb")


def evaluate(
    checkpoint: str,
    *,
    split: str = "test",
    corrupt: list[str] = (),
    missing: list[str] = (),
    p: float = 0.5,
    seed: int = 0,
    out: str | None = None,
) -> dict:
    """``corrupt``: ``[MODALITY=]NAME:L1,L2`` items; ``missing``: modalities to leave out, one
    condition each. Prints the table and writes it as JSON (default ``RUN/eval-<split>.json``)."""
    import yaml

    from mmbalance.data.corruptions import parse_levels
    from mmbalance.data.manifest import read_manifest
    from mmbalance.engine.evaluation import missing_transforms, sweep, sweep_transforms

    run = RunDir.of_checkpoint(checkpoint)
    if not run.config.is_file() or not run.checkpoint("best").is_dir():
        raise ConfigError(f"{checkpoint}: expected a run directory with config.yaml and checkpoints/best")
    tree = yaml.safe_load(run.config.read_text())
    modalities = list(tree["modalities"])
    for modality in missing:
        if modality not in modalities:
            raise ConfigError(f"--missing {modality}: not a modality of this run; allowed: {modalities}")
    sweeps = []
    for item in corrupt:
        modality, _, spec = item.rpartition("=")
        name, levels = parse_levels(spec)
        sweeps.append(
            EvalCorruption(modality=modality or _default_modality(name, modalities), name=name, levels=levels, p=p)
        )
    manifest = read_manifest(tree["data"]["path"])
    transforms = {**sweep_transforms(sweeps, seed, manifest), **missing_transforms(missing, manifest)}
    table = sweep(run.path, tree, split, transforms)
    _print_table(table, modalities, f"{split} accuracy of {run.path} (best-val checkpoint)")
    target = Path(out) if out else run.eval_table(split)
    with errors.naming(target):
        target.write_text(json.dumps({"split": split, "p": p, "seed": seed, "accuracy": table}, indent=1) + "\n")
    print(f"written to {target}")
    return table


def _print_table(table: dict, modalities: list[str], title: str) -> None:
    header = ["condition", "fused", *modalities]
    columns = ["acc_fused", *[f"acc_{m}" for m in modalities]]
    rows = [[label, *(f"{row[k]:.4f}" for k in columns)] for label, row in table.items()]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in [header, ["-" * w for w in widths], *rows]]
    print(title + "\n" + "\n".join(lines))


def _default_modality(name: str, modalities: list[str]) -> str:
    candidates = [m for m in modalities if m in IMAGE_LIKE] if name in ("gaussian", "salt_pepper") else []
    if len(candidates) == 1:
        return candidates[0]
    raise ConfigError(
        f"--corrupt {name}: say which modality, e.g. {modalities[0]}={name}:0,5,10 (modalities: {modalities})"
    )
