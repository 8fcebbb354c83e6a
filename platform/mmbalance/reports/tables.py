"""Result tables: trials grouped by configuration, mean ± std over seeds.

Standard deviations are sample standard deviations (ddof=1); a group with one seed has std
NaN, printed as "–", rather than a misleading 0.
"""

from __future__ import annotations

import math

import pandas as pd

SCORE_COLUMNS = ("best_val", "test_acc")


def leaderboard(frame: pd.DataFrame, keys: list[str], scores: tuple[str, ...] = SCORE_COLUMNS) -> pd.DataFrame:
    """One row per configuration (``keys``), sorted by mean best val (never by test)."""
    usable = frame.dropna(subset=["best_val"])
    if not keys:
        usable = usable.assign(_all="all")
        keys = ["_all"]
    grouped = usable.groupby(keys, dropna=False, sort=False)
    table = grouped.agg(**{"n": ("seed", "count"),
                           **{f"{c}_mean": (c, "mean") for c in scores},
                           **{f"{c}_std": (c, "std") for c in scores}}).reset_index()
    return table.sort_values("best_val_mean", ascending=False, kind="stable").reset_index(drop=True)


def mean_std(mean: float, std: float) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    if std is None or (isinstance(std, float) and math.isnan(std)):
        return f"{mean:.4f} ± –"
    return f"{mean:.4f} ± {std:.4f}"


def format_leaderboard(table: pd.DataFrame, keys: list[str], top: int = 10) -> str:
    header = [*keys, "n", "val acc (mean ± std)", "test acc (mean ± std)"]
    lines = []
    for _, row in table.head(top).iterrows():
        cells = [str(row[k]) if not isinstance(row[k], float) else f"{row[k]:.4g}" for k in keys]
        cells += [str(int(row["n"])), mean_std(row["best_val_mean"], row["best_val_std"]),
                  mean_std(row["test_acc_mean"], row["test_acc_std"])]
        lines.append(cells)
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
    render = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))
    return "\n".join([render(header), render(["-" * w for w in widths]), *map(render, lines)])
