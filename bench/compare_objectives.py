"""Weak-modality test accuracy of each objective vs LF on the synthetic default, over seeds.

Runs in-process (no Ray): prepares the default synthetic dataset once, trains
``trainables/synthetic.yaml`` with each objective (paper-default parameters, the fusion the
objective needs) for every seed, and prints mean ± std of fused and per-modality test
accuracy. Model selection is by val fused accuracy; test is read once per run.

    python bench/compare_objectives.py [--seeds 0 1 2] [--out /tmp/mmbalance-compare]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from mmbalance.config import load_recipe
from mmbalance.data.synthetic import prepare_synthetic
from mmbalance.engine.loop import train_loop_per_worker

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    "lf": ["model.fusion=mean"],
    "lf(omega=0)": ["model.fusion=mean", "objective.omega=0"],
    "lf(concat,omega=0)": ["model.fusion=concat", "objective.omega=0"],
    "mnl": ["objective.name=mnl", "model.fusion=mean"],
    "arm": ["objective.name=arm", "model.fusion=concat"],
    "arl": ["objective.name=arl", "model.fusion=concat"],
    "aug": ["objective.name=aug", "model.fusion=boost", "objective.check_every_epochs=1"],
}


def mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {std:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="/tmp/mmbalance-compare")
    args = parser.parse_args()
    out = Path(args.out)
    shards = out / "shards"
    prepare_synthetic(shards, overwrite=True)
    rows = {}
    for name, overrides in VARIANTS.items():
        results = []
        for seed in args.seeds:
            recipe = load_recipe(REPO / "trainables" / "synthetic.yaml", [f"data.path={shards}", f"seed={seed}", *overrides])
            run = out / "runs" / f"{name}-seed{seed}"
            results.append(train_loop_per_worker({"recipe": recipe.to_dict(), "output_dir": str(run), "verbose": False}))
        rows[name] = results
        print(f"done {name}", flush=True)
    modalities = list(rows["lf"][0]["test"]["acc_per_modality"])
    print(f"\nsynthetic default, seeds {args.seeds}: test accuracy, mean ± std")
    print("| objective | fused | " + " | ".join(modalities) + " | weak − LF weak |")
    print("|---|---|" + "---|" * len(modalities) + "---|")
    weak = min(modalities, key=lambda m: statistics.mean(r["test"]["acc_per_modality"][m] for r in rows["lf"]))
    lf_weak = statistics.mean(r["test"]["acc_per_modality"][weak] for r in rows["lf"])
    for name, results in rows.items():
        cells = [mean_std([r["test"]["acc"] for r in results])]
        cells += [mean_std([r["test"]["acc_per_modality"][m] for r in results]) for m in modalities]
        delta = statistics.mean(r["test"]["acc_per_modality"][weak] for r in results) - lf_weak
        print(f"| {name} | " + " | ".join(cells) + f" | {delta:+.4f} |")


if __name__ == "__main__":
    main()
