"""Hand-made study results: final-phase rows with per-epoch metrics, search rows, and a study
directory with results.parquet and its summary, for the study summary and report tests."""

from __future__ import annotations

import json

import pandas as pd

from mmbalance.reports.study_summary import summarize, write_summary
from mmbalance.tune.study import Method, Study

SEEDS = [0, 1, 2, 3, 4]
LF = [0.80, 0.82, 0.79, 0.81, 0.80]
BROKEN = [0.10, 0.11, 0.09, 0.10, 0.12]
FUSED = ("lf", "lf_again", "broken")
LAMS = [0.1, 0.5, 2.0, 4.0]


def run_rows(tmp_path, name, seeds, test, visual, val_visual, best_val, alone=None):
    """Final-phase rows of one method, each with a metrics.jsonl of two epochs."""
    rows = []
    for i, seed in enumerate(seeds):
        run_dir = tmp_path / name.replace(":", "_") / str(seed)
        run_dir.mkdir(parents=True)
        key = "val/acc_fused" if alone else "val/acc_visual"
        run_dir.joinpath("metrics.jsonl").write_text(
            "".join(json.dumps({"epoch": e, key: val_visual[i] - 0.1 * (1 - e)}) + "\n" for e in (0, 1))
        )
        row = {
            "method": name,
            "phase": "final",
            "seed": seed,
            "best_val": best_val[i],
            "test_acc": test[i],
            "run_dir": str(run_dir),
            "epochs_run": 2,
            "stop_reason": "completed",
        }
        if alone is None:
            row.update({"test_acc_audio": test[i] - 0.05, "test_acc_visual": visual[i]})
        else:
            row[f"test_acc_{alone}"] = test[i]
        rows.append(row)
    return rows


def final_rows(tmp_path) -> list[dict]:
    visual = [0.40, 0.41, 0.39, 0.40, 0.42]
    rows = (
        run_rows(tmp_path, "lf", SEEDS, LF, visual, [0.40] * 5, [0.80, 0.81, 0.79, 0.80, 0.80])
        + run_rows(tmp_path, "lf_again", SEEDS, LF, visual, [0.40] * 5, [0.79, 0.80, 0.80, 0.79, 0.80])
        + run_rows(tmp_path, "broken", SEEDS, BROKEN, [0.10] * 5, [0.10] * 5, [0.1] * 5)
        + run_rows(
            tmp_path, "alone:visual", SEEDS, [0.60, 0.62, 0.61, 0.59, 0.63], None, [0.61] * 5, [0.6] * 5, alone="visual"
        )
        + run_rows(tmp_path, "alone:audio", SEEDS, [0.70] * 5, None, [0.7] * 5, [0.55] * 5, alone="audio")
    )
    for i, row in enumerate(rows):
        row["trial_id"] = f"final{i}"
        row["robust_missing_audio"] = row["test_acc"] - 0.3
        if not row["method"].startswith("alone:"):
            row["test_shapley_audio"], row["test_shapley_visual"] = 0.5 * row["test_acc"], 0.2 * row["test_acc"]
    return rows


def search_rows(trials: dict[str, int]) -> list[dict]:
    """``trials[method]`` search trials on seed 0: lr varies for every method, λ for lf_again only."""
    rows = []
    for name, count in trials.items():
        for i in range(count):
            row = {
                "method": name,
                "phase": "search",
                "trial_id": f"{name}-{i}",
                "seed": 0,
                "optim.lr": 1e-3 * (i + 1),
                "epochs_run": 8 if i % 2 == 0 else 2,
                "stop_reason": "completed" if i % 2 == 0 else "stopped_early",
                "run_dir": "unused",
                "best_val": 0.5 + 0.01 * i,
                "test_acc": 0.5,
            }
            if name == "lf_again":
                row["objective.lam"] = LAMS[i]
            rows.append(row)
    return rows


def study_dir(tmp_path, trials: dict[str, int] | None = None):
    names = [*FUSED, "alone:visual", "alone:audio"]
    frame = pd.DataFrame(final_rows(tmp_path) + search_rows(trials or {n: 4 for n in names}))
    study = Study.model_validate({"methods": {n: {"set": {"objective.name": "lf"}} for n in FUSED}, "seeds": SEEDS})
    methods = {
        **study.methods,
        **{f"alone:{m}": Method(set={"objective.name": "lf"}, modalities=[m]) for m in ("visual", "audio")},
    }
    chosen = {n: {"configuration": {"optim.lr": 0.002}, "search_best_val": 0.51} for n in names}
    out = tmp_path / "study"
    out.mkdir()
    frame.to_parquet(out / "results.parquet", index=False)
    write_summary(summarize(frame, study, methods, chosen), out)
    return out, frame
