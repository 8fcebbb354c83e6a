"""A study's answer, computed from its trials: ``study.json``.

Everything here reads the ``final`` phase (each method's val-chosen configuration trained on
every study seed); the ``search`` phase only contributes each method's budget. Per method:
mean ± t interval over seeds of fused test accuracy, of each modality's accuracy, of each
robustness condition and of each modality's Shapley contribution. Comparisons
(``reports/significance.py``, paired over seeds, Holm-corrected across methods):

- every method against the tuned baseline, on fused accuracy, each modality's accuracy and
  robustness (only between methods that see the same modalities);
- every fused method against the best modality trained alone, on fused accuracy. "Best" is
  chosen on val, like everything else.

The under-training gap of modality m in method X is the accuracy m reaches trained alone (its
unimodal ceiling) minus the accuracy of m's part inside X: at the end on test, and every epoch
on val (from each run's ``metrics.jsonl``), both averaged over seeds.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from mmbalance.layout import RunDir, StudyDir
from mmbalance.reports.significance import compare_to_reference, mean_interval
from mmbalance.tracking.records import json_safe
from mmbalance.tune.study import ALONE_PREFIX, Method, Study

SUMMARY_FILE = StudyDir.SUMMARY


def summarize(frame, study: Study, methods: dict[str, Method], chosen: dict[str, dict[str, Any]]) -> dict[str, Any]:
    final = frame[frame["phase"] == "final"]
    per_seed = {name: final[final["method"] == name].sort_values("seed") for name in methods}
    modalities = _modalities(methods, frame)
    summary = {
        "baseline": study.baseline,
        "alpha": study.alpha,
        "correction": study.correction,
        "seeds": study.seeds,
        "interval": "Student t, 95% (two-sided), over seeds",
        "test": "paired t-test over seeds (two-sided), corrected across methods",
        "methods": {
            name: _method(name, per_seed[name], frame, chosen.get(name, {}), methods[name]) for name in methods
        },
    }
    summary["vs_baseline"] = _against(
        per_seed,
        study,
        study.baseline,
        _baseline_metrics(per_seed, study.baseline),
        same_modalities_as=methods[study.baseline],
        methods=methods,
    )
    alone = best_alone(per_seed)
    summary["best_alone"] = alone
    summary["vs_best_alone"] = (
        _against(
            per_seed,
            study,
            alone,
            ["test_acc"],
            methods=methods,
            only=[n for n in methods if not n.startswith(ALONE_PREFIX)] + [alone],
        )
        if alone
        else {}
    )
    summary["undertraining"] = undertraining(per_seed, modalities)
    return summary


def write_summary(summary: dict[str, Any], output: Path) -> Path:
    path = Path(output) / SUMMARY_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(json_safe(summary), indent=1, sort_keys=False, allow_nan=False) + "\n")
    tmp.replace(path)
    return path


def read_summary(output: Path) -> dict[str, Any]:
    return json.loads((Path(output) / SUMMARY_FILE).read_text())


def _modalities(methods: dict[str, Method], frame) -> list[str]:
    alone = [n.removeprefix(ALONE_PREFIX) for n in methods if n.startswith(ALONE_PREFIX)]
    return alone or [c.removeprefix("test_acc_") for c in frame.columns if c.startswith("test_acc_")]


def _interval(values) -> dict[str, Any]:
    values = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return {"mean": None, "half_width": None, "n": 0}
    interval = mean_interval(values)
    return {"mean": interval.mean, "half_width": interval.half_width, "n": interval.n}


def _score_columns(rows) -> list[str]:
    prefixes = ("test_acc", "robust_", "test_shapley_", "best_val")
    return [c for c in rows.columns if c.startswith(prefixes) and rows[c].notna().any()]


def _method(name: str, rows, frame, chosen: dict[str, Any], method: Method) -> dict[str, Any]:
    search = frame[(frame["method"] == name) & (frame["phase"] == "search")]
    return {
        "configuration": chosen.get("configuration", {}),
        "search_best_val": chosen.get("search_best_val"),
        "set": method.set,
        "modalities": method.modalities,
        "budget": {
            "trials": int(len(search)),
            "epochs": int(search["epochs_run"].sum()) if len(search) else 0,
            "stopped_early": int((search["stop_reason"] == "stopped_early").sum()),
            "failed": int((search["stop_reason"] == "error").sum()),
        },
        "seeds": [int(s) for s in rows["seed"]],
        "scores": {c: _interval(rows[c]) for c in _score_columns(rows)},
        "per_seed": {c: [None if _missing(v) else float(v) for v in rows[c]] for c in _score_columns(rows)},
    }


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _baseline_metrics(per_seed, baseline: str) -> list[str]:
    return _score_columns(per_seed[baseline]) if len(per_seed[baseline]) else ["test_acc"]


def _against(
    per_seed,
    study: Study,
    reference: str,
    metrics: list[str],
    *,
    methods: dict[str, Method],
    same_modalities_as: Method | None = None,
    only: list[str] | None = None,
) -> dict[str, list[dict]]:
    """One family of comparisons per metric: every eligible method against ``reference``."""
    names = only or list(methods)
    if same_modalities_as is not None:
        names = [n for n in names if methods[n].modalities == same_modalities_as.modalities]
    result = {}
    for metric in [m for m in metrics if m != "best_val"]:
        scores = {}
        for name in names:
            rows = per_seed[name]
            if metric not in rows.columns or rows[metric].isna().any() or len(rows) == 0:
                continue
            scores[name] = [float(v) for v in rows[metric]]
        if reference not in scores or len(scores) < 2:
            continue
        lengths = {len(v) for v in scores.values()}
        if len(lengths) != 1:  # a failed seed breaks the pairing: compare on the seeds all have
            continue
        table = compare_to_reference(scores, reference, alpha=study.alpha, correction=study.correction)
        result[metric] = [_row(row) for row in table]
    return result


def _row(row) -> dict[str, Any]:
    diff = row.comparison.difference
    return {
        "method": row.method,
        "reference": row.reference,
        "method_mean": row.method_interval.mean,
        "method_half_width": row.method_interval.half_width,
        "reference_mean": row.reference_interval.mean,
        "difference": diff.mean,
        "difference_low": diff.low,
        "difference_high": diff.high,
        "p": row.p_raw,
        "p_adjusted": row.p_adjusted,
        "verdict": row.verdict,
    }


def best_alone(per_seed) -> str | None:
    """The modality-alone method with the highest mean best val (never test)."""
    scored = {
        n: rows["best_val"].mean()
        for n, rows in per_seed.items()
        if n.startswith(ALONE_PREFIX) and len(rows) and rows["best_val"].notna().all()
    }
    return max(scored, key=scored.get) if scored else None


def undertraining(per_seed, modalities: list[str]) -> dict[str, Any]:
    """Per modality: its ceiling (trained alone) and, for every method that fuses it, its
    in-fusion accuracy and the gap, on test at the end and on val per epoch."""
    result = {}
    for modality in modalities:
        alone = per_seed.get(f"{ALONE_PREFIX}{modality}")
        if alone is None or not len(alone):
            continue
        ceiling = alone["test_acc"].astype(float).tolist()
        alone_curve = _curve(alone, "val/acc_fused")
        by_method = {}
        for name, rows in per_seed.items():
            column = f"test_acc_{modality}"
            if name.startswith(ALONE_PREFIX) or column not in rows.columns or not len(rows):
                continue
            inside = rows[column].astype(float).tolist()
            fused_curve = _curve(rows, f"val/acc_{modality}")
            steps = min(len(alone_curve), len(fused_curve))
            by_method[name] = {
                "in_fusion": _interval(inside),
                "gap": _interval([c - i for c, i in zip(ceiling, inside)])
                if len(ceiling) == len(inside)
                else _interval([sum(ceiling) / len(ceiling) - i for i in inside]),
                "gap_per_epoch": [alone_curve[e] - fused_curve[e] for e in range(steps)],
            }
        result[modality] = {"ceiling": _interval(ceiling), "by_method": by_method}
    return result


def _curve(rows, key: str) -> list[float]:
    """The mean over seeds of ``key`` per epoch, from each run's metrics.jsonl (the epochs
    every seed has)."""
    curves = []
    for run_dir in rows["run_dir"]:
        path = RunDir(run_dir).metrics
        if not path.is_file():
            continue
        values = [json.loads(line).get(key) for line in path.read_text().splitlines() if line.strip()]
        curves.append([float(v) for v in values if v is not None])
    if not curves:
        return []
    steps = min(len(c) for c in curves)
    return [sum(c[e] for c in curves) / len(curves) for e in range(steps)]
