"""ASHA vs the full grid on the same space: epochs spent and best val accuracy found.

Both searches run the same configurations (MNL lambda x warm-up x guidance on the synthetic
default, one seed) with in-process trials; the grid trains every one to the end, ASHA stops
the weak ones at its rungs. Printed as ratios ASHA / grid.

    python bench/asha.py [--out /tmp/mmbalance-asha]

Target: ASHA uses <= 35% of the grid's epochs for a best val within 1 point, with the scheduler's
defaults (reduction_factor 4: docs/architecture.md, ASHA settings).
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import yaml

from mmbalance.data.synthetic import prepare_synthetic
from mmbalance.tune.search import run_search
from mmbalance.tune.space import SearchSpace

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 9
SPACE = {
    "space": {
        "objective.lam": {"grid": [0.1, 0.3, 1.0, 3.0, 10.0]},
        "objective.warmup_epochs": {"grid": [0, 1]},
        "objective.guidance": {"grid": ["prior:audio", "confidence", "confidence_ucom"]},
    },
    "set": {"objective.name": "mnl", "model.fusion": "mean", "schedule.epochs": EPOCHS},
    "seeds": [0],
    "max_concurrent": 2,
    "workers": 0,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/mmbalance-asha")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    out = Path(args.out)
    shards = out / "shards"
    prepare_synthetic(shards, overwrite=True)
    base = yaml.safe_load((REPO / "trainables" / "synthetic.yaml").read_text())
    base["data"]["path"] = str(shards)
    runs = {}
    for name, scheduler in (
        ("grid", {"name": "fifo"}),
        ("asha", {"name": "asha", "grace_period": 1, "max_t": EPOCHS}),  # the default reduction_factor
    ):
        space = SearchSpace.model_validate({**SPACE, "scheduler": scheduler})
        shutil.rmtree(out / name, ignore_errors=True)
        frame = run_search(space, base, out / name)
        runs[name] = (
            int(frame["epochs_run"].sum()),
            float(frame["best_val"].max()),
            len(frame),
            int((frame["stop_reason"] == "stopped_early").sum()),
        )
    (grid_epochs, grid_best, trials, _), (asha_epochs, asha_best, _, stopped) = runs["grid"], runs["asha"]
    print(f"{trials} configurations x {EPOCHS} epochs; ASHA stopped {stopped} early")
    print(f"grid: {grid_epochs} epochs, best val {grid_best:.4f}")
    print(f"asha: {asha_epochs} epochs, best val {asha_best:.4f}")
    print(
        f"epochs ASHA / grid: {asha_epochs / grid_epochs:.2f} (target <= 0.35); "
        f"best val ASHA - grid: {100 * (asha_best - grid_best):+.2f} points (target >= -1)"
    )


if __name__ == "__main__":
    main()
