"""``build_report``: an experiment directory -> report.html (self-contained), report.md, PNGs.

Sections, in order (one skipped with a one-line note when the experiment lacks what it needs):
leaderboard; robustness in the MNL paper's ablation form; per-modality accuracy curves; λ and
warm-up sensitivity; imbalance ratio over epochs; missing-modality and corruption robustness.
Every selection (rank, "best configuration") reads val only; test is only ever reported.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from mmbalance.config import ConfigError
from mmbalance.layout import SearchDir
from mmbalance.reports import figures
from mmbalance.reports.experiment import LAM, OBJECTIVE, WARMUP, Experiment, load_experiment, strategy_labels
from mmbalance.reports.tables import best_configuration, display_table, leaderboard, selected_rows, sensitivity

CSS = (  # inline: the page makes no request (no CDN, no remote fonts)
    "body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1100px;margin:2em auto;"
    "padding:0 1em;color:#222;line-height:1.45}h1{font-size:1.6em}"
    "h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}"
    "table{border-collapse:collapse;margin:.8em 0;font-size:.85em;font-variant-numeric:tabular-nums}"
    "caption{text-align:left;font-weight:600;padding:.3em 0}"
    "th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left}th{background:#f3f3f3}"
    "tbody tr:nth-child(even){background:#fafafa}figure{margin:1em 0}img{max-width:100%}"
    "p{margin:.4em 0}nav ol{columns:2}"
)
STD_NOTE = "mean ± sample std (ddof=1) over the n seeds of a configuration; '–' where n = 1."


@dataclass
class Table:
    caption: str
    frame: pd.DataFrame  # the rendered strings
    data: pd.DataFrame  # the numbers behind them (``<score>_mean``, ``<score>_std``, n)


@dataclass
class Section:
    key: str
    title: str
    notes: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)


def build_report(
    experiment_dir: str | Path, out_dir: str | Path | None = None, group_by: list[str] | None = None
) -> Path:
    """Write report.html, report.md and the PNG figures to ``out_dir`` (default
    ``experiment_dir/report``); returns the path of report.html."""
    experiment = load_experiment(experiment_dir)
    out = Path(out_dir) if out_dir is not None else SearchDir(experiment_dir).report
    out.mkdir(parents=True, exist_ok=True)
    sections = report_sections(experiment, group_by, figures_dir=out)
    title = f"Experiment report: {experiment.name}"
    (out / "report.md").write_text(to_markdown(title, sections))
    (out / "report.html").write_text(to_html(title, sections))
    return out / "report.html"


def report_sections(
    experiment: Experiment, group_by: list[str] | None = None, figures_dir: Path | None = None
) -> list[Section]:
    """The report's sections; figures are drawn only when ``figures_dir`` is given."""
    keys = group_keys(experiment, group_by)
    frame = experiment.results.assign(strategy=strategy_labels(experiment.results))
    selections = objective_selections(frame, keys)
    return [
        leaderboard_section(experiment, frame, keys),
        ablation_section(experiment, frame, keys),
        curves_section(experiment, frame, keys, selections, figures_dir),
        sensitivity_section(frame, LAM, "λ", "lambda", figures_dir),
        sensitivity_section(frame, WARMUP, "warm-up epochs", "warmup", figures_dir),
        imbalance_section(experiment, selections, figures_dir),
        robustness_section(experiment, frame, keys),
    ]


def group_keys(experiment: Experiment, group_by: list[str] | None) -> list[str]:
    if group_by is None:
        return list(experiment.searched)
    unknown = [k for k in group_by if k not in experiment.results.columns or k.startswith("_")]
    if unknown:
        usable = sorted(c for c in experiment.results.columns if not c.startswith("_"))
        raise ConfigError(f"--group-by {','.join(unknown)}: no such column; available: {', '.join(usable)}")
    return list(group_by)


def objective_selections(frame: pd.DataFrame, keys: list[str]) -> dict[str, list[str]]:
    """Per objective (LF first), the trial ids of its best-val configuration."""
    chosen = {}
    names = sorted(frame[OBJECTIVE].dropna().unique(), key=lambda n: (n != "lf", n)) if OBJECTIVE in frame else []
    for name in names:
        best = best_configuration(frame[frame[OBJECTIVE] == name], keys)
        if not best.empty:
            chosen[str(name)] = list(best["trial_id"])
    return chosen


def selection_table(frame: pd.DataFrame, keys: list[str]) -> Table:
    """Which configuration the curves show for each objective (its best mean val)."""
    stats = selected_rows(frame, OBJECTIVE, keys, ["best_val", "test_acc"])
    stats = stats.sort_values(OBJECTIVE, key=lambda s: s != "lf", kind="stable").reset_index(drop=True)
    shown = display_table(stats, [OBJECTIVE, "configuration"], {"val acc": "best_val", "test acc": "test_acc"})
    return Table("Configurations plotted (best mean val per objective)", shown, stats)


def leaderboard_section(experiment: Experiment, frame: pd.DataFrame, keys: list[str]) -> Section:
    per_mod = {f"test acc {m}": f"test_acc_{m}" for m in experiment.modalities if f"test_acc_{m}" in frame}
    scores = {"val acc": "best_val", "test acc": "test_acc", **per_mod}
    if "test_imbalance_ratio" in frame:
        scores["test imbalance ratio"] = "test_imbalance_ratio"
    stats = leaderboard(frame, keys, tuple(scores.values()))
    shown = keys or ["_all"]
    counts = frame["stop_reason"].value_counts().to_dict() if "stop_reason" in frame else {}
    unscored = int(frame["best_val"].isna().sum())
    notes = [
        f"{len(frame)} trials ({', '.join(f'{n} {r}' for r, n in counts.items()) or 'no stop reasons'}); "
        f"modalities: {', '.join(experiment.modalities)}; "
        f"configurations grouped by: {', '.join(keys) or '(all)'}.",
        f"Ranked by mean best val accuracy (never by test); {STD_NOTE}",
    ]
    if unscored:
        notes.append(f"{unscored} trial(s) without a best checkpoint are left out.")
    table = Table("Leaderboard", display_table(stats, shown, scores), stats)
    return Section("leaderboard", "Leaderboard", notes, [table])


def ablation_section(experiment: Experiment, frame: pd.DataFrame, keys: list[str]) -> Section:
    section = Section("ablation", "Robustness in the MNL paper's ablation form")
    if not experiment.corrupted:
        section.notes.append("Skipped: no robust_<corruption>_<modality>_<level> columns (set eval.corruptions).")
        return section
    section.notes.append(
        "Rows: objective (for MNL its guidance strategy, and scope where it varies); each row shows "
        "the configuration with the best mean val among its trials. Cells: test accuracy at noise "
        f"level ε, ε = 0 being the clean test set; {STD_NOTE}"
    )
    sweeps: dict[tuple[str, str], list] = {}
    for column in experiment.corrupted:
        if column.level != 0:
            sweeps.setdefault((column.corruption, column.modality), []).append(column)
    for (corruption, modality), columns in sweeps.items():
        columns = sorted(columns, key=lambda c: c.level)
        scores = {"ε=0": "test_acc", **{f"ε={c.level:g}": c.column for c in columns}}
        stats = selected_rows(frame, "strategy", keys, list(scores.values()))
        stats = stats.sort_values("strategy", key=lambda s: s.str.split(" ").str[0] != "lf", kind="stable")
        shown = display_table(stats, ["strategy", "configuration"], scores)
        section.tables.append(Table(f"{corruption} noise on {modality}: test acc vs ε", shown, stats))
    return section


def curves_section(
    experiment: Experiment,
    frame: pd.DataFrame,
    keys: list[str],
    selections: dict[str, list[str]],
    figures_dir: Path | None,
) -> Section:
    section = Section("curves", "Per-modality accuracy over epochs")
    curves = experiment.curves
    if curves.empty or "val/acc_fused" not in curves or not selections:
        section.notes.append("Skipped: no per-epoch metrics (trials/<id>/metrics.jsonl) to plot.")
        return section
    section.notes.append(
        "val/acc_fused and val/acc_<modality> per epoch for the best-val configuration of each "
        "objective; lines are means over seeds, bands ±1 std."
    )
    section.tables.append(selection_table(frame, keys))
    if figures_dir is not None:
        section.figures.append(
            figures.accuracy_curves(curves, selections, experiment.modalities, figures_dir / "accuracy_curves.png")
        )
    return section


def sensitivity_section(frame: pd.DataFrame, key: str, label: str, stem: str, figures_dir: Path | None) -> Section:
    section = Section(f"{stem}-sensitivity", f"{label} sensitivity")
    usable = frame.dropna(subset=["best_val"])
    if key not in usable or OBJECTIVE not in usable or usable.groupby(OBJECTIVE)[key].nunique().max() < 2:
        section.notes.append(f"Skipped: {key} takes fewer than two values in this experiment.")
        return section
    stats = sensitivity(usable, key, OBJECTIVE)
    stats = stats[stats.groupby(OBJECTIVE)[key].transform("nunique") >= 2].reset_index(drop=True)
    section.notes.append(
        f"Val and test accuracy per {key} value, mean ± sample std over every trial with that "
        "value (seeds, and any other key varied alongside it)."
    )
    shown = display_table(stats, [OBJECTIVE, key], {"val acc": "best_val", "test acc": "test_acc"})
    section.tables.append(Table(f"{label} sensitivity", shown, stats))
    if figures_dir is not None:
        section.figures.append(
            figures.sensitivity_plot(stats, key, OBJECTIVE, figures_dir / f"{stem}_sensitivity.png", label)
        )
    return section


def imbalance_section(experiment: Experiment, selections: dict[str, list[str]], figures_dir: Path | None) -> Section:
    section = Section("imbalance", "Imbalance ratio over epochs")
    if experiment.curves.empty or "val/imbalance_ratio" not in experiment.curves or not selections:
        section.notes.append("Skipped: no val/imbalance_ratio in the trials' metrics.jsonl.")
        return section
    section.notes.append(
        "val/imbalance_ratio (strong / weak modality accuracy; 1 = balanced) per epoch, mean over "
        "seeds, for the best-val configuration of each objective; LF dashed."
    )
    if "lf" not in selections:
        section.notes.append("This experiment has no LF trial: there is no baseline line.")
    if figures_dir is not None:
        section.figures.append(
            figures.imbalance_curves(experiment.curves, selections, figures_dir / "imbalance_ratio.png")
        )
    return section


def robustness_section(experiment: Experiment, frame: pd.DataFrame, keys: list[str]) -> Section:
    section = Section("robustness", "Missing-modality and corruption robustness")
    if not experiment.robust:
        section.notes.append("Skipped: results.parquet has no robust_* columns.")
        return section
    scores = {"clean test acc": "test_acc", **{r.label: r.column for r in experiment.robust}}
    stats = leaderboard(frame, keys, ("best_val", *scores.values()))
    section.notes.append(
        "Test accuracy of each configuration's best-val checkpoints with one modality missing (its "
        f"input zeroed) and under each corruption level; rows ranked by val; {STD_NOTE}"
    )
    section.tables.append(Table("Robustness", display_table(stats, keys or ["_all"], scores), stats))
    return section


# -- rendering --------------------------------------------------------------------------------


def table_markdown(table: Table) -> str:
    def cells(values):
        return "| " + " | ".join(str(v).replace("|", "\\|") for v in values) + " |"

    lines = [cells(table.frame.columns), cells(["---"] * len(table.frame.columns))]
    lines += [cells(row) for row in table.frame.itertuples(index=False)]
    return "\n".join(lines)


def to_markdown(title: str, sections: list[Section]) -> str:
    parts = [f"# {title}", ""]
    for section in sections:
        parts += [f"## {section.title}", "", *[f"{n}\n" for n in section.notes]]
        for table in section.tables:
            parts += [f"**{table.caption}**", "", table_markdown(table), ""]
        parts += [f"![{section.title}]({path.name})\n" for path in section.figures]
    return "\n".join(parts).rstrip() + "\n"


def to_html(title: str, sections: list[Section]) -> str:
    esc = html.escape
    toc = "".join(f'<li><a href="#{s.key}">{esc(s.title)}</a></li>' for s in sections)
    body = [f"<h1>{esc(title)}</h1>", f"<nav><ol>{toc}</ol></nav>"]
    for section in sections:
        body.append(f'<section id="{section.key}"><h2>{esc(section.title)}</h2>')
        body += [f"<p>{esc(note)}</p>" for note in section.notes]
        body += [_table_html(table) for table in section.tables]
        body += [_image_html(path, section.title) for path in section.figures]
        body.append("</section>")
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
        f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>\n"
    )


def _table_html(table: Table) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(str(c))}</th>" for c in table.frame.columns)
    rows = "".join(
        "<tr>" + "".join(f"<td>{esc(str(v))}</td>" for v in row) + "</tr>"
        for row in table.frame.itertuples(index=False)
    )
    return f"<table><caption>{esc(table.caption)}</caption><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _image_html(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></figure>'
