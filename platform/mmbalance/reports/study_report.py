"""``write_study_report``: a study directory (``mmbalance compare``) -> report.html (self-contained),
report.md and PNGs.

Sections, in order: the verdict against the baseline; the leaderboard; paired differences (vs the
baseline, vs the best modality alone); under-training gaps; Shapley contributions; robustness;
search budget; sensitivity of best val to each searched key. Numbers come from ``study.json``
(``reports/study_summary.py``) and the final-phase rows of ``results.parquet``; the sensitivity
plots read the search-phase rows. Every choice (configuration, rank, best alone) was made on val,
and the text says so; test is only ever reported.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from mmbalance.layout import RESULTS_FILE, StudyDir
from mmbalance.reports.experiment import FIXED_COLUMNS, FIXED_PREFIXES, parse_robust_column
from mmbalance.reports.figures import DPI
from mmbalance.reports.render import Section, Table, to_html, to_markdown
from mmbalance.reports.significance import BETTER, NO_DIFFERENCE, TOO_FEW_SEEDS, WORSE
from mmbalance.reports.study_summary import read_summary
from mmbalance.reports.verdicts import verdict_rows, weak_modality

STANDARD_COLUMNS = ("method", "phase", *FIXED_COLUMNS)  # never a searched key
STANDARD_PREFIXES = (*FIXED_PREFIXES, "test_shapley_", "_")
WARN = "⚠ "  # a note starting with it is drawn in red
CSS = "td{white-space:nowrap}td:last-child{white-space:normal}"  # "0.7740 ± 0.0086" never breaks
LINES = (("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"))  # per method, so identical methods stay visible


def write_study_report(study_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write report.html, report.md and the PNGs to ``out_dir`` (default ``study_dir/report``);
    returns the path of report.html."""
    study_dir = Path(study_dir)
    if not (study_dir / RESULTS_FILE).is_file():
        raise FileNotFoundError(
            f"{study_dir / RESULTS_FILE} does not exist: pass a directory written by `mmbalance compare`"
        )
    summary, frame = read_summary(study_dir), pd.read_parquet(study_dir / RESULTS_FILE)
    out = Path(out_dir) if out_dir is not None else StudyDir(study_dir).report
    out.mkdir(parents=True, exist_ok=True)
    modalities = [c.removeprefix("test_acc_") for c in frame.columns if c.startswith("test_acc_")]
    final = frame[frame["phase"] == "final"]
    sections = [
        verdict_section(summary),
        leaderboard_section(summary, modalities),
        differences_section(summary, modalities),
        undertraining_section(summary, out),
        shapley_section(summary, final, out),
        robustness_section(final, modalities, out),
        budget_section(summary),
        sensitivity_section(frame[frame["phase"] == "search"], out),
    ]
    title = f"Study report: {study_dir.resolve().name}"
    (out / "report.md").write_text(to_markdown(title, sections))
    page = to_html(title, sections).replace("</style>", f"{CSS}</style>", 1)
    page = page.replace(f"<p>{WARN}", f'<p style="color:#b00000;font-weight:600">{WARN}')
    (out / "report.html").write_text(page)
    return out / "report.html"


# -- formatting -------------------------------------------------------------------------------


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def ci(score: dict[str, Any] | None) -> str:
    """``mean ± half-width`` of a 95% t interval, as the verdict table prints it."""
    if not score or _missing(score.get("mean")):
        return "–"
    half = score.get("half_width")
    return f"{score['mean']:.4f} ± {'–' if _missing(half) else f'{half:.4f}'}"


def _number(value, spec: str = ".4f") -> str:
    return "–" if _missing(value) else format(value, spec)


def _difference(row: dict[str, Any]) -> str:
    if _missing(row["difference"]):
        return "–"
    low, high = (_number(row[k], "+.4f") for k in ("difference_low", "difference_high"))
    return f"{row['difference']:+.4f} [{low}, {high}]"


def configuration(values: dict[str, Any]) -> str:
    text = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
    return text or "(nothing searched)"


def metric_label(column: str, modalities: list[str]) -> str:
    """A test score's short name: ``acc fused``, ``acc audio``, ``acc, audio missing``, ``Shapley audio``."""
    if column == "test_acc":
        return "acc fused"
    if column.startswith("test_acc_"):
        return f"acc {column.removeprefix('test_acc_')}"
    if column.startswith("test_shapley_"):
        return f"Shapley {column.removeprefix('test_shapley_')}"
    robust = parse_robust_column(column, modalities)
    return f"acc, {robust.label}" if robust else column


def _table(caption: str, rows: list[dict[str, str]]) -> Table:
    frame = pd.DataFrame(rows)
    return Table(caption, frame, frame)


def _file_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", name)


# -- sections ---------------------------------------------------------------------------------


def verdict_sentence(name: str, baseline: str, row: dict[str, Any] | None, correction: str) -> str:
    """A winner only where the corrected test rejects and the interval excludes zero."""
    if row is None:
        return f"{name} sees other modalities than {baseline}: not compared with it."
    low, high = (_number(row[k], "+.4f") for k in ("difference_low", "difference_high"))
    evidence = (
        f"fused test accuracy difference {_number(row['difference'], '+.4f')}, 95% CI [{low}, {high}], "
        f"{correction}-adjusted p = {_number(row['p_adjusted'], '.3g')}"
    )
    if row["verdict"] == BETTER:
        return f"{name} vs {baseline}: {name} wins, it is significantly better; {evidence}."
    if row["verdict"] == WORSE:
        return f"{name} vs {baseline}: {baseline} wins, {name} is significantly worse; {evidence}."
    reason = " (too few seeds to test)" if row["verdict"] == TOO_FEW_SEEDS else ""
    return f"{name} vs {baseline}: {NO_DIFFERENCE}{reason}; {evidence}."


def verdict_section(summary: dict[str, Any]) -> Section:
    baseline = summary["baseline"]
    fused_vs = {row["method"]: row for row in summary["vs_baseline"].get("test_acc", [])}
    notes = [
        verdict_sentence(name, baseline, fused_vs.get(name), summary["correction"])
        for name in summary["methods"]
        if name != baseline
    ]
    notes.append(
        f"{len(summary['seeds'])} seeds per method; {summary['interval']}; {summary['test']} "
        f"({summary['correction']}, alpha {summary['alpha']:g}). A method is called better or worse only "
        "when the corrected test rejects and the interval excludes zero. Each method's configuration "
        "was chosen on val in its own search; test is only reported."
    )
    alone = summary.get("best_alone")
    header = [
        "method",
        "test fused (mean ± 95% CI)",
        f"test {weak_modality(summary) or 'weak'}",
        f"fused − {baseline} [95% CI]",
        f"vs {baseline}",
        f"vs {alone} (best alone on val)" if alone else "vs best modality alone",
    ]
    rows = [dict(zip(header, row)) for row in verdict_rows(summary)]
    return Section("verdict", "Verdict", notes, [_table("Verdict (fused test accuracy)", rows)])


def leaderboard_section(summary: dict[str, Any], modalities: list[str]) -> Section:
    methods = summary["methods"]

    def val(name):
        return methods[name]["scores"].get("best_val", {}).get("mean")

    order = sorted(methods, key=lambda n: (val(n) is None, -(val(n) or 0.0)))
    rows = []
    for rank, name in enumerate(order, start=1):
        scores = methods[name]["scores"]
        row = {
            "rank": str(rank),
            "method": name,
            "n": str(scores.get("best_val", {}).get("n", 0)),
            "val acc": ci(scores.get("best_val")),
            "test acc fused": ci(scores.get("test_acc")),
        }
        row.update({f"test acc {m}": ci(scores.get(f"test_acc_{m}")) for m in modalities})
        row["search val"] = _number(methods[name]["search_best_val"])
        row["configuration (chosen on val)"] = configuration(methods[name]["configuration"])
        rows.append(row)
    notes = [
        "Ranked by the final runs' mean best val accuracy (never by test). Each method's configuration is "
        "the one with the best mean val in its search ('search val'), then trained on every study seed. "
        "Cells: mean ± half-width of the 95% Student-t interval over seeds; test is reported beside, never "
        "used for a choice."
    ]
    return Section("leaderboard", "Leaderboard", notes, [_table("Leaderboard (final runs, ranked by val)", rows)])


def _comparison_rows(by_metric: dict[str, list[dict]], modalities: list[str]) -> list[dict[str, str]]:
    return [
        {
            "metric": metric_label(metric, modalities),
            "method": row["method"],
            "method (mean ± CI)": ci({"mean": row["method_mean"], "half_width": row["method_half_width"]}),
            f"{row['reference']} mean": _number(row["reference_mean"]),
            "difference [95% CI]": _difference(row),
            "p": _number(row["p"], ".3g"),
            "p adjusted": _number(row["p_adjusted"], ".3g"),
            "verdict": row["verdict"],
        }
        for metric, table in by_metric.items()
        for row in table
    ]


def differences_section(summary: dict[str, Any], modalities: list[str]) -> Section:
    section = Section("differences", "Paired differences")
    section.notes.append(
        "Method minus reference, paired over seeds: the mean difference with its 95% t interval, "
        f"the paired t-test's p and p adjusted ({summary['correction']}) over the methods compared "
        "on that metric. Only methods that see the baseline's modalities are compared with it. "
        "Every score is higher-is-better."
    )
    if summary["vs_baseline"]:
        section.tables.append(
            _table(
                f"vs the baseline, {summary['baseline']} (test scores)",
                _comparison_rows(summary["vs_baseline"], modalities),
            )
        )
    else:
        section.notes.append(
            "No comparison with the baseline: it has no final runs, or no method shares its modalities."
        )
    if summary.get("vs_best_alone"):
        section.tables.append(
            _table(
                f"vs the best modality alone, {summary['best_alone']} (best alone on val; test scores)",
                _comparison_rows(summary["vs_best_alone"], modalities),
            )
        )
    return section


def undertraining_section(summary: dict[str, Any], out: Path) -> Section:
    section = Section("undertraining", "Under-training gaps")
    gaps = {m: part for m, part in summary.get("undertraining", {}).items() if part["by_method"]}
    if not gaps:
        section.notes.append("Skipped: the study trains no modality alone (modalities_alone: false).")
        return section
    section.notes.append(
        "Gap = the modality's ceiling (its test accuracy trained alone) minus the accuracy of its "
        "own head inside the fused model, paired over seeds, mean ± 95% CI. The plot shows the "
        "same gap on val per epoch (means over seeds); a gap that stays large means the modality "
        "is under-trained in fusion."
    )
    for modality, part in gaps.items():
        rows = [
            {
                "method": name,
                "ceiling (alone, test)": ci(part["ceiling"]),
                "in fusion (test)": ci(gap["in_fusion"]),
                "gap (test)": ci(gap["gap"]),
                "gap, last epoch (val)": _number(gap["gap_per_epoch"][-1] if gap["gap_per_epoch"] else None),
            }
            for name, gap in part["by_method"].items()
        ]
        section.tables.append(_table(f"{modality}: under-training gap", rows))
    curves = {
        m: {name: gap["gap_per_epoch"] for name, gap in part["by_method"].items() if gap["gap_per_epoch"]}
        for m, part in gaps.items()
    }
    curves = {m: lines for m, lines in curves.items() if lines}
    if curves:
        section.figures.append(gap_curves(curves, out / "undertraining_gap.png"))
    else:
        section.notes.append("No per-epoch gap: the runs' metrics.jsonl lack the val accuracies it needs.")
    return section


def shapley_section(summary: dict[str, Any], final: pd.DataFrame, out: Path) -> Section:
    section = Section("shapley", "Shapley contributions")
    columns = [c for c in final.columns if c.startswith("test_shapley_") and final[c].notna().any()]
    if not columns:
        section.notes.append("Skipped: no test_shapley_<modality> scores (a final run needs 2–4 modalities).")
        return section
    means = final.groupby("method", sort=False)[columns].mean().dropna(how="all")
    section.notes.append(
        "Each modality's exact Shapley share of fused test accuracy (the average gain from adding "
        "it, over every order), mean over the final runs' seeds; bars show the 95% CI. Near zero: "
        "the fused model ignores that modality."
    )
    rows = [
        {"method": name, **{metric_label(c, []): ci(summary["methods"][name]["scores"].get(c)) for c in columns}}
        for name in means.index
    ]
    section.tables.append(_table("Shapley contribution to fused test accuracy", rows))
    halves = pd.DataFrame(
        [[summary["methods"][n]["scores"].get(c, {}).get("half_width") for c in columns] for n in means.index],
        index=means.index,
        columns=columns,
        dtype=float,
    )
    section.figures.append(shapley_bars(means, halves, out / "shapley.png"))
    return section


def robustness_section(final: pd.DataFrame, modalities: list[str], out: Path) -> Section:
    section = Section("robustness", "Robustness")
    columns = [c for c in final.columns if c.startswith("robust_") and final[c].notna().any()]
    if not columns:
        section.notes.append("Skipped: results.parquet has no robust_* columns (set eval.corruptions).")
        return section
    labels = {"test_acc": "clean", **{c: metric_label(c, modalities).removeprefix("acc, ") for c in columns}}
    means = final.groupby("method", sort=False)[list(labels)].mean()
    section.notes.append(
        "Test accuracy of each method's final runs (mean over seeds) on the clean test set, with a "
        "modality missing (its input zeroed) and under each corruption level. '–': the method "
        "does not see that modality."
    )
    rows = [{"method": name, **{labels[c]: _number(means.at[name, c]) for c in labels}} for name in means.index]
    section.tables.append(_table("Test accuracy under each condition", rows))
    section.figures.append(robustness_lines(means.rename(columns=labels), out / "robustness.png"))
    return section


def budget_section(summary: dict[str, Any]) -> Section:
    budgets = {name: method["budget"] for name, method in summary["methods"].items()}
    rows = [
        {
            "method": n,
            "trials": str(b["trials"]),
            "epochs spent": str(b["epochs"]),
            "stopped early": str(b["stopped_early"]),
            "failed": str(b["failed"]),
        }
        for n, b in budgets.items()
    ]
    return Section("budget", "Search budget", budget_notes(budgets), [_table("Search budget per method", rows)])


def budget_notes(budgets: dict[str, dict[str, int]]) -> list[str]:
    """Equal trial counts, said plainly; unequal ones and failed trials, said loudly."""
    trials = {b["trials"] for b in budgets.values()}
    epochs = sorted({b["epochs"] for b in budgets.values()})
    if len(trials) > 1:
        counts = ", ".join(f"{n} {b['trials']}" for n, b in budgets.items())
        notes = [
            f"{WARN}BUDGETS ARE NOT EQUAL: search trials per method: {counts}. This is not an equal-budget "
            "comparison; a method with more trials had more chances to find a good configuration."
        ]
    elif trials == {0}:
        notes = [f"{WARN}No search-phase rows: the budgets cannot be checked."]
    else:
        count = trials.pop()
        notes = [
            f"The budgets are equal: every method had {count} search trial{'s' if count > 1 else ''} on the "
            "study's one scheduler and search seeds."
        ]
        if len(epochs) > 1:
            notes[0] += (
                f" Epochs spent differ ({epochs[0]}–{epochs[-1]}) because ASHA stops weaker trials early: "
                "the scheduler working, not a larger budget."
            )
    failed = {n: b["failed"] for n, b in budgets.items() if b["failed"]}
    if failed:
        notes.append(
            f"{WARN}Failed search trials: "
            + ", ".join(f"{n} {k}" for n, k in failed.items())
            + "; those methods searched fewer configurations than their budget."
        )
    return notes


def searched_columns(rows: pd.DataFrame) -> list[str]:
    """Columns outside the results schema that take more than one value in ``rows``."""
    return [
        c
        for c in rows.columns
        if c not in STANDARD_COLUMNS and not c.startswith(STANDARD_PREFIXES) and rows[c].nunique(dropna=True) > 1
    ]


def sensitivity_section(search: pd.DataFrame, out: Path) -> Section:
    section = Section("sensitivity", "Sensitivity (search trials, val)")
    section.notes.append(
        "Each search trial's best val accuracy against each key that took more than one value in "
        "that method's search; this is what the choice of configuration read. Crosses: trials "
        "ASHA stopped early (their val is from fewer epochs). Test is not shown here."
    )
    for name, rows in search.dropna(subset=["best_val"]).groupby("method", sort=False):
        keys = searched_columns(rows)
        if keys:
            section.notes.append(f"{name}: {', '.join(keys)}.")
            section.figures.append(
                sensitivity_scatter(rows, keys, str(name), out / f"sensitivity_{_file_stem(str(name))}.png")
            )
    if len(section.notes) == 1:
        section.notes.append("Skipped: no searched key took more than one value.")
    return section


# -- figures ----------------------------------------------------------------------------------


def gap_curves(curves: dict[str, dict[str, list[float]]], path: Path) -> Path:
    """One panel per modality: its under-training gap on val per epoch, one line per method."""
    fig = Figure(figsize=(4.4 * len(curves), 3.4), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, len(curves), squeeze=False, sharey=True)[0]
    for ax, (modality, lines) in zip(axes, curves.items()):
        for i, (name, values) in enumerate(lines.items()):
            style, marker = LINES[i % len(LINES)]
            ax.plot(np.arange(1, len(values) + 1), values, linestyle=style, marker=marker, markersize=4, label=name)
        ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.set_title(f"{modality}: ceiling − in fusion (val)", fontsize=9)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("accuracy gap")
    fig.savefig(path, format="png")
    return path


def shapley_bars(means: pd.DataFrame, halves: pd.DataFrame, path: Path) -> Path:
    """Grouped bars: one group per method, one bar per modality, 95% CI error bars."""
    fig = Figure(figsize=(max(5.0, 1.1 * len(means) + 2), 3.6), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(means.columns)
    for i, column in enumerate(means.columns):
        x = np.arange(len(means)) + (i - (len(means.columns) - 1) / 2) * width
        ax.bar(
            x,
            means[column],
            width,
            yerr=halves[column].fillna(0),
            capsize=3,
            label=column.removeprefix("test_shapley_"),
        )
    ax.set_xticks(np.arange(len(means)), means.index, rotation=20, ha="right", fontsize=8)
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_ylabel("Shapley contribution (test acc)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7, title="modality", title_fontsize=7)
    fig.savefig(path, format="png")
    return path


def robustness_lines(means: pd.DataFrame, path: Path) -> Path:
    """Test accuracy per condition (x, categorical), one line per method; gaps where a method
    lacks the modality."""
    fig = Figure(figsize=(max(6.4, 0.9 * len(means.columns) + 2), 3.8), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(means.columns))
    for i, (name, row) in enumerate(means.iterrows()):
        style, marker = LINES[i % len(LINES)]
        ax.plot(x, row.to_numpy(dtype=float), linestyle=style, marker=marker, markersize=5, label=str(name))
    ax.set_xticks(x, means.columns, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("test accuracy (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.savefig(path, format="png")
    return path


def sensitivity_scatter(rows: pd.DataFrame, keys: list[str], name: str, path: Path) -> Path:
    """One panel per key (three to a row): best val of each search trial against the key's value."""
    cols = min(len(keys), 3)
    fig = Figure(figsize=(3.3 * cols + 0.6, 2.9 * math.ceil(len(keys) / cols)), dpi=DPI, layout="constrained")
    grid = fig.subplots(math.ceil(len(keys) / cols), cols, squeeze=False, sharey=True)
    axes = grid.ravel()
    early = (rows["stop_reason"] == "stopped_early").to_numpy()
    for ax, key in zip(axes, keys):
        numeric = pd.to_numeric(rows[key], errors="coerce")
        values = numeric if numeric.notna().all() else rows[key].astype(str)
        for mask, marker, label in ((~early, "o", "completed"), (early, "x", "stopped early")):
            if mask.any():
                ax.scatter(values[mask], rows["best_val"][mask], marker=marker, label=label)
        if values is numeric and numeric.min() > 0 and numeric.max() / numeric.min() >= 10:
            ax.set_xscale("log")
        elif values is numeric:
            ax.xaxis.set_major_locator(MaxNLocator(4, integer=bool((numeric % 1 == 0).all())))
        ax.tick_params(axis="x", labelsize=8)
        ax.set_xlabel(key)
        ax.grid(alpha=0.3)
    for ax in axes[len(keys) :]:
        ax.set_visible(False)
    for ax in grid[:, 0]:
        ax.set_ylabel("best val acc (search trial)")
    axes[0].legend(fontsize=7)
    fig.suptitle(name, fontsize=10)
    fig.savefig(path, format="png")
    return path
