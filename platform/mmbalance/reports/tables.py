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
    table = grouped.agg(
        **{
            "n": ("seed", "count"),
            **{f"{c}_mean": (c, "mean") for c in scores},
            **{f"{c}_std": (c, "std") for c in scores},
        }
    ).reset_index()
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
        cells += [
            str(int(row["n"])),
            mean_std(row["best_val_mean"], row["best_val_std"]),
            mean_std(row["test_acc_mean"], row["test_acc_std"]),
        ]
        lines.append(cells)
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]

    def render(cells):
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths))

    return "\n".join([render(header), render(["-" * w for w in widths]), *map(render, lines)])


# -- report tables ---------------------------------------------------------------------------
# Each returns numbers (``<score>_mean``/``<score>_std`` columns, sample std) that the report
# renders with ``mean_std``; tests recompute them independently.


def config_labels(frame: pd.DataFrame, keys: list[str]) -> pd.Series:
    """One readable string per trial naming its configuration (``k=v, ...``; a bundle label as is)."""

    def cell(key: str, value) -> str:
        text = "–" if _missing(value) else (f"{value:.4g}" if isinstance(value, float) else str(value))
        return text if "=" in text else f"{key}={text}"

    if not keys:
        return pd.Series("all", index=frame.index)
    return pd.Series(
        [", ".join(cell(k, row[k]) for k in keys) for _, row in frame.iterrows()], index=frame.index, dtype=object
    )


def best_configuration(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """The trials of the configuration with the best mean val (ties: the first seen)."""
    labelled = frame.dropna(subset=["best_val"]).assign(_config=config_labels(frame, keys))
    if labelled.empty:
        return labelled
    means = labelled.groupby("_config", sort=False)["best_val"].mean()
    return labelled[labelled["_config"] == means.idxmax()]


def selected_rows(frame: pd.DataFrame, row_key: str, keys: list[str], scores: list[str]) -> pd.DataFrame:
    """One row per value of ``row_key``: mean ± std of ``scores`` over the trials of its best-val
    configuration (``keys``), the configuration's label and n. Rows keep first-seen order."""
    rows = []
    for value, trials in frame.groupby(row_key, sort=False, dropna=True):
        best = best_configuration(trials, keys)
        if best.empty:
            continue
        row = {row_key: value, "configuration": best["_config"].iloc[0], "n": int(best["seed"].count())}
        for score in scores:
            row[f"{score}_mean"] = best[score].mean()
            row[f"{score}_std"] = best[score].std(ddof=1)
        rows.append(row)
    return pd.DataFrame(rows)


def sensitivity(frame: pd.DataFrame, key: str, by: str, scores: tuple[str, ...] = SCORE_COLUMNS) -> pd.DataFrame:
    """Mean ± std of ``scores`` per (``by``, ``key``) value, over every trial with that value
    (seeds and any other varied key), sorted by ``by`` then ``key`` — a curve, not a ranking."""
    usable = frame.dropna(subset=[key])
    table = leaderboard(usable, [by, key], scores)
    return table.sort_values([by, key], kind="stable").reset_index(drop=True)


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def display_table(stats: pd.DataFrame, keys: list[str], scores: dict[str, str]) -> pd.DataFrame:
    """Strings for rendering: the key columns, n, then ``header: "mean ± std"`` per score."""
    out = pd.DataFrame(index=stats.index)
    for key in keys:
        out[key] = [("–" if _missing(v) else f"{v:.4g}" if isinstance(v, float) else str(v)) for v in stats[key]]
    if "n" in stats:
        out["n"] = [str(int(n)) for n in stats["n"]]
    for header, score in scores.items():
        out[header] = [mean_std(m, s) for m, s in zip(stats[f"{score}_mean"], stats[f"{score}_std"])]
    return out.reset_index(drop=True)
