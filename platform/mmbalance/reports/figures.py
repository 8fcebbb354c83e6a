"""The report's PNG figures (matplotlib, Agg canvas; no pyplot global state).

Each function draws one figure from numbers already chosen by the report (which trials, which
table) and writes it to ``path``. Curves are means over seeds per epoch with a ±1 std band
(sample std; no band where one seed reports an epoch).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

DPI = 110
BASELINE = "lf"


def epoch_mean_std(curves: pd.DataFrame, trial_ids: list[str], metric: str) -> pd.DataFrame:
    """Per epoch: mean and sample std of ``metric`` over the given trials (a stopped trial just
    stops contributing). Columns ``epoch``, ``mean``, ``std``, ``n``."""
    if metric not in curves.columns:
        return pd.DataFrame(columns=["epoch", "mean", "std", "n"])
    rows = curves[curves["trial_id"].isin(trial_ids)].dropna(subset=[metric])
    table = rows.groupby("epoch")[metric].agg(["mean", "std", "count"]).reset_index()
    return table.rename(columns={"count": "n"}).sort_values("epoch")


def _line(ax, table: pd.DataFrame, label: str, **style) -> None:
    if table.empty:
        return
    epochs = table["epoch"].to_numpy(dtype=float) + 1  # epochs done, as the schedulers count
    mean, std = table["mean"].to_numpy(dtype=float), table["std"].to_numpy(dtype=float)
    (line,) = ax.plot(epochs, mean, marker="o", markersize=3, label=label, **style)
    band = np.nan_to_num(std)
    ax.fill_between(epochs, mean - band, mean + band, color=line.get_color(), alpha=0.15, linewidth=0)


def accuracy_curves(curves: pd.DataFrame, selections: dict[str, list[str]], modalities: list[str], path: Path) -> Path:
    """One panel per selection (an objective's best configuration): val/acc_fused and
    val/acc_<m> per epoch."""
    count = max(len(selections), 1)
    cols = min(count, 3)
    rows = math.ceil(count / cols)
    fig = Figure(figsize=(4.2 * cols, 3.3 * rows), dpi=DPI, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, sharey=True)
    for ax, (title, trial_ids) in zip(axes.flat, selections.items()):
        _line(ax, epoch_mean_std(curves, trial_ids, "val/acc_fused"), "fused", color="black", linewidth=2)
        for m in modalities:
            _line(ax, epoch_mean_std(curves, trial_ids, f"val/acc_{m}"), m)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes.flat[len(selections) :]:
        ax.set_visible(False)
    axes[0, 0].set_ylabel("val accuracy")
    fig.savefig(path, format="png")
    return path


def imbalance_curves(curves: pd.DataFrame, selections: dict[str, list[str]], path: Path) -> Path:
    """val/imbalance_ratio per epoch, one line per selection; LF dashed black (the baseline)."""
    fig = Figure(figsize=(6.4, 3.8), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    for title, trial_ids in selections.items():
        style = {"color": "black", "linestyle": "--", "linewidth": 2} if title == BASELINE else {}
        _line(ax, epoch_mean_std(curves, trial_ids, "val/imbalance_ratio"), title, **style)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("val imbalance ratio (strong / weak acc)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.savefig(path, format="png")
    return path


def sensitivity_plot(table: pd.DataFrame, key: str, by: str, path: Path, label: str) -> Path:
    """Val and test accuracy (mean ± std error bars) against ``key``, one line per ``by`` value."""
    fig = Figure(figsize=(8.4, 3.4), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    values = pd.to_numeric(table[key], errors="coerce")
    log = bool(values.min() > 0 and values.max() / values.min() >= 10)
    for ax, score, title in zip(axes, ("best_val", "test_acc"), ("best val acc", "test acc")):
        for name, part in table.groupby(by, sort=False):
            ax.errorbar(
                pd.to_numeric(part[key]),
                part[f"{score}_mean"],
                yerr=part[f"{score}_std"].fillna(0),
                marker="o",
                capsize=3,
                label=str(name),
            )
        ax.set_xscale("log" if log else "linear")
        ax.set_xlabel(label)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[1].legend(fontsize=7)
    fig.savefig(path, format="png")
    return path
