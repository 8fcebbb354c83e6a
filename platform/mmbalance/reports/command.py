"""``mmbalance report EXPERIMENT_DIR``: the HTML/Markdown report, and optionally the W&B Report."""

from __future__ import annotations

import argparse
from pathlib import Path

from mmbalance.layout import REPORT_DIR


def add_report_parser(subparsers) -> argparse.ArgumentParser:
    report = subparsers.add_parser(
        "report", help="write report.html (self-contained), report.md and PNG figures for a tune experiment"
    )
    report.add_argument(
        "experiment_dir", help="experiment directory written by `mmbalance tune` (holds results.parquet)"
    )
    report.add_argument("--out", help="output directory (default EXPERIMENT_DIR/report)")
    report.add_argument(
        "--group-by", help="comma-separated result columns that define a configuration (default: the searched keys)"
    )
    report.add_argument(
        "--wandb",
        action="store_true",
        help="also build the W&B Report (needs the `reports` extra); "
        "saved with an API key, else written as OUT/wandb_report.json",
    )
    report.add_argument(
        "--wandb-project", help="W&B project of the runs (default: the trials' tracking.project, else WANDB_PROJECT)"
    )
    report.add_argument(
        "--wandb-entity", help="W&B entity owning the project (default: the trials' tracking.entity, else WANDB_ENTITY)"
    )
    report.set_defaults(func=run_report)
    return report


def run_report(args: argparse.Namespace) -> Path:
    group_by = [k.strip() for k in args.group_by.split(",") if k.strip()] if args.group_by else None
    out = report_dir(args.experiment_dir, args.out)
    if args.wandb:
        _wandb_report(args, out, group_by)
    html = write_report(args.experiment_dir, out, group_by)
    print(f"report written to {html}")
    return html


def report_dir(experiment_dir: str | Path, out: str | Path | None) -> Path:
    """``--out``, or EXPERIMENT_DIR/report; checked before anything is written: a report replaces
    its own files only, so the directory may hold nothing else, and it never goes into the
    working directory, a home directory or a directory holding the experiment."""
    from mmbalance import outputs

    target = Path(out) if out else Path(experiment_dir) / REPORT_DIR
    outputs.check_replaceable(target, outputs.REPORT, reads=[experiment_dir])
    return outputs.claim(target, outputs.REPORT)


def write_report(experiment_dir: str | Path, out: str | Path | None = None, group_by: list[str] | None = None) -> Path:
    """The HTML/Markdown report of an experiment, in a checked report directory; a study
    directory (``mmbalance compare``, it holds study.json) gets the study report."""
    from mmbalance.reports.render import build_report
    from mmbalance.reports.study_summary import SUMMARY_FILE

    target = report_dir(experiment_dir, out)
    if (Path(experiment_dir) / SUMMARY_FILE).is_file():
        from mmbalance.reports.study_report import write_study_report

        return write_study_report(experiment_dir, target)
    return build_report(experiment_dir, target, group_by)


def _wandb_report(args: argparse.Namespace, out: Path, group_by: list[str] | None) -> None:
    from mmbalance.reports.study_summary import SUMMARY_FILE
    from mmbalance.reports.wandb_report import build_wandb_report, can_publish, publish_hint, write_wandb_report

    if (Path(args.experiment_dir) / SUMMARY_FILE).is_file():  # a study: grouped by method
        from mmbalance.reports.study_wandb_report import build_study_wandb_report

        report = build_study_wandb_report(args.experiment_dir, args.wandb_project, args.wandb_entity)
    else:
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
