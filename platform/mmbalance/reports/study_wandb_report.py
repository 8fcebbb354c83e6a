"""A study's W&B Report, grouped by method, built without network (``mmbalance report STUDY --wandb``).

The tables (verdicts, paired differences, under-training gaps, budgets) come from
``study.json``, computed locally: test scores never reach W&B during training. The panels read
the study's runs live, one runset per method, each selected by the method's W&B group
(``records.experiment_group``: method name + the study's id), so every curve is a method's
search and final runs and nothing of another method. Saved with an API key; otherwise written
as a JSON spec exactly like a search's report (``reports/wandb_report.py``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mmbalance.layout import EXPERIMENT_ID_FILE, StudyDir
from mmbalance.reports.study_summary import read_summary
from mmbalance.reports.verdicts import verdict_rows, weak_modality
from mmbalance.reports.wandb_report import DEFAULT_PROJECT, MEAN_STD, reports_api, run_filter
from mmbalance.tracking.records import experiment_group

VERDICT_HEADER = [
    "method",
    "test fused",
    "test weak modality",
    "fused − baseline [95% CI]",
    "vs baseline",
    "vs best alone",
]


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def gap_rows(summary: dict[str, Any]) -> list[list[str]]:
    rows = []
    for modality, block in summary.get("undertraining", {}).items():
        ceiling = block["ceiling"]["mean"]
        for name, item in block["by_method"].items():
            gap = item["gap"]
            rows.append(
                [
                    modality,
                    f"{ceiling:.4f}",
                    name,
                    f"{item['in_fusion']['mean']:.4f}",
                    f"{gap['mean']:+.4f} ± {gap['half_width']:.4f}"
                    if gap.get("half_width") is not None
                    else f"{gap['mean']:+.4f}",
                ]
            )
    return rows


def budget_rows(summary: dict[str, Any]) -> list[list[str]]:
    return [
        [
            name,
            str(m["budget"]["trials"]),
            str(m["budget"]["epochs"]),
            str(m["budget"]["stopped_early"]),
            str(m["budget"]["failed"]),
        ]
        for name, m in summary["methods"].items()
    ]


def build_study_wandb_report(study_dir: str | Path, project: str | None, entity: str | None):
    wr = reports_api()
    study_dir = Path(study_dir)
    summary = read_summary(study_dir)
    project = project or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT
    entity = entity or os.environ.get("WANDB_ENTITY")
    if not entity:
        from mmbalance.config import ConfigError

        raise ConfigError(
            "a W&B report needs an explicit entity (--wandb-entity or WANDB_ENTITY): looking up the "
            "default entity needs the W&B server"
        )
    groups = method_groups(study_dir, list(summary["methods"]))
    weak = weak_modality(summary)
    metrics = ["val/acc_fused", *([f"val/acc_{weak}"] if weak else [])]
    runsets = [
        wr.Runset(entity=entity, project=project, name=name, filters=run_filter(group))
        for name, group in groups.items()
    ]
    blocks = [
        wr.TableOfContents(),
        wr.H1("Verdict"),
        wr.P(
            f"Each method's configuration was chosen on val from the same search budget, then trained on "
            f"{len(summary['seeds'])} seeds; {summary['interval']}; {summary['test']} ({summary['correction']}, "
            f"alpha {summary['alpha']:g}). Better or worse only where the corrected test rejects and the interval "
            "excludes zero; otherwise no significant difference."
        ),
        wr.MarkdownBlock(markdown_table(VERDICT_HEADER, verdict_rows(summary))),
        wr.H1("Curves by method"),
        wr.PanelGrid(
            runsets=runsets,
            panels=[wr.LinePlot(title=m, x="Step", title_x="epoch", y=[m], **MEAN_STD) for m in metrics],
        ),
        wr.H1("Under-training gaps"),
        wr.P("Gap = the modality's test accuracy trained alone minus its head's accuracy inside the method."),
        wr.MarkdownBlock(
            markdown_table(["modality", "alone", "method", "in fusion", "gap ± 95% CI"], gap_rows(summary))
        ),
        wr.H1("Search budget"),
        wr.MarkdownBlock(
            markdown_table(["method", "trials", "epochs", "stopped early", "failed"], budget_rows(summary))
        ),
    ]
    return wr.Report(
        entity=entity,
        project=project,
        title=f"{study_dir.resolve().name}: equal-budget study"[:128],
        description=f"{len(groups)} methods; tables from study.json, panels from each method's W&B group",
        blocks=blocks,
        width="fluid",
    )


def method_groups(study_dir: Path, methods: list[str]) -> dict[str, str]:
    """Each method's W&B group, as its runs were logged (needs the study's stored id)."""
    if not (study_dir / EXPERIMENT_ID_FILE).is_file():
        return {}
    return {name: experiment_group(StudyDir(study_dir).method_stage(name, "final").path) for name in methods}
