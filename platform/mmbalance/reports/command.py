"""``mmbalance report EXPERIMENT_DIR``: the HTML/Markdown report, and optionally the W&B Report."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_report_parser(subparsers) -> argparse.ArgumentParser:
    report = subparsers.add_parser(
        "report", help="write report.html (self-contained), report.md and PNG figures for a tune experiment")
    report.add_argument("experiment_dir",
                        help="experiment directory written by `mmbalance tune` (holds results.parquet)")
    report.add_argument("--out", help="output directory (default EXPERIMENT_DIR/report)")
    report.add_argument("--group-by", help="comma-separated result columns that define a configuration "
                        "(default: the searched keys)")
    report.add_argument("--wandb", action="store_true", help="also build the W&B Report (needs the `reports` extra); "
                        "saved with an API key, else written as OUT/wandb_report.json")
    report.add_argument("--wandb-project", help="W&B project of the runs (default: the trials' tracking.project, "
                        "else WANDB_PROJECT)")
    report.add_argument("--wandb-entity", help="W&B entity owning the project (default: the trials' tracking.entity, "
                        "else WANDB_ENTITY)")
    report.set_defaults(func=run_report)
    return report


def run_report(args: argparse.Namespace) -> Path:
    from mmbalance.reports.render import build_report

    group_by = [k.strip() for k in args.group_by.split(",") if k.strip()] if args.group_by else None
    out = Path(args.out) if args.out else Path(args.experiment_dir) / "report"
    if args.wandb:
        _wandb_report(args, out, group_by)
    html = build_report(args.experiment_dir, out, group_by)
    print(f"report written to {html}")
    return html


def _wandb_report(args: argparse.Namespace, out: Path, group_by: list[str] | None) -> None:
    from mmbalance.reports.wandb_report import (build_wandb_report, can_publish, publish_hint,
                                                write_wandb_report)

    report = build_wandb_report(args.experiment_dir, args.wandb_project, args.wandb_entity, group_by)
    spec = write_wandb_report(report, out)
    if not can_publish():
        print(publish_hint(spec, args.experiment_dir, report.project, report.entity))
        return
    try:
        report.save()
    except Exception as err:  # noqa: BLE001 - the local report still gets written
        print(f"W&B report not saved ({type(err).__name__}: {err})")
        print(publish_hint(spec, args.experiment_dir, report.project, report.entity))
        return
    print(f"W&B report saved: {report.url} (spec: {spec})")
