"""The verdict table a study prints at the end: each method's accuracy, its difference from
the baseline, and whether that difference is significant.

Fused accuracy and the weak modality's accuracy are a mean ± t interval over seeds, the
difference is paired, and significance is after the correction. Only a difference whose corrected test rejects and
whose interval excludes zero is called better or worse; everything else reads "no significant
difference". The weak modality is the one the baseline scores lowest on test."""

from __future__ import annotations

from typing import Any


def weak_modality(summary: dict[str, Any]) -> str | None:
    scores = summary["methods"][summary["baseline"]]["scores"]
    per_modality = {
        k.removeprefix("test_acc_"): v["mean"]
        for k, v in scores.items()
        if k.startswith("test_acc_") and v["mean"] is not None
    }
    return min(per_modality, key=per_modality.get) if per_modality else None


def _cell(score: dict[str, Any] | None) -> str:
    if not score or score.get("mean") is None:
        return "–"
    half = score.get("half_width")
    return f"{score['mean']:.4f} ± {half:.4f}" if half is not None else f"{score['mean']:.4f} ± –"


def verdict_rows(summary: dict[str, Any]) -> list[list[str]]:
    weak = weak_modality(summary)
    fused_vs = {row["method"]: row for row in summary["vs_baseline"].get("test_acc", [])}
    alone_vs = {row["method"]: row for row in summary.get("vs_best_alone", {}).get("test_acc", [])}
    rows = []
    for name, method in summary["methods"].items():
        scores = method["scores"]
        weak_score = scores.get(f"test_acc_{weak}") if weak else None
        if weak_score is None and method.get("modalities") == [weak]:
            weak_score = scores.get("test_acc")
        versus = fused_vs.get(name)
        if name == summary["baseline"]:
            diff, verdict = "(baseline)", ""
        elif versus is None:
            diff, verdict = "–", "not comparable (other modalities)"
        else:
            diff = f"{versus['difference']:+.4f} [{versus['difference_low']:+.4f}, {versus['difference_high']:+.4f}]"
            verdict = versus["verdict"]
        alone = alone_vs.get(name)
        rows.append(
            [name, _cell(scores.get("test_acc")), _cell(weak_score), diff, verdict, alone["verdict"] if alone else ""]
        )
    return rows


def format_verdicts(summary: dict[str, Any]) -> str:
    weak = weak_modality(summary) or "weak"
    best_alone = summary.get("best_alone") or "best alone"
    header = [
        "method",
        "test fused (mean ± 95% CI)",
        f"test {weak}",
        f"fused − {summary['baseline']} [95% CI]",
        f"vs {summary['baseline']}",
        f"vs {best_alone}",
    ]
    rows = verdict_rows(summary)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]

    def line(cells):
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    alpha = summary["alpha"]
    notes = (
        f"{len(summary['seeds'])} seeds per method; {summary['interval']}; {summary['test']} "
        f"({summary['correction']}, alpha {alpha:g})"
    )
    return "\n".join([line(header), *(line(r) for r in rows), notes])
