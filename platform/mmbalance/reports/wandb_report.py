"""The experiment's W&B Report (``wandb_workspaces.reports.v2``), built without network.

Sections mirror report.html: tables computed locally from results.parquet are embedded as
Markdown (test scores and robustness never reach W&B during training), and live panels read
the experiment's runs, selected by their W&B run group (``wandb_group``: the experiment
directory's name and the search's own id). Panels address the trial's recipe
in the run config (``config.objective.lam``) and the per-epoch metrics (``val/acc_<m>``).

Saving a report needs a W&B server and an API key. Without them (or with WANDB_MODE offline
or disabled) the report is written as a JSON spec, ``out_dir/wandb_report.json``, that
``publish_wandb_report`` turns back into the same Report and saves later.
"""

from __future__ import annotations

import dataclasses
import json
import netrc
import os
from pathlib import Path
from typing import Any

from mmbalance.config import ConfigError
from mmbalance.reports.experiment import FUSION, GUIDANCE, LAM, OBJECTIVE, SCOPE, WARMUP, load_experiment
from mmbalance.reports.render import Section, group_keys, report_sections, table_markdown

SPEC_FILE = "wandb_report.json"
TYPE_TAG = "__type__"
DEFAULT_PROJECT = "mmbalance"  # the recipe's tracking.project default
BEST_VAL = "val/best_acc"  # the run summary's best val accuracy (tracking/wandb_tracker.py flatten_result)
MEAN_STD = {"groupby_aggfunc": "mean", "groupby_rangefunc": "stddev"}
EXTRA_HINT = "pip install 'mmbalance[reports]' (or: pip install wandb-workspaces==0.4.13)"


class MissingExtra(ImportError, ConfigError):
    """The optional ``reports`` extra (wandb-workspaces) is not installed."""


def reports_api():
    """``wandb_workspaces.reports.v2``, imported only when a W&B report is asked for."""
    try:
        import wandb_workspaces.reports.v2 as wr
    except ImportError as err:
        raise MissingExtra(f"W&B reports need the optional extra `reports`: {EXTRA_HINT}") from err
    return wr


def build_wandb_report(
    experiment_dir: str | Path, project: str | None, entity: str | None, group_by: list[str] | None = None
):
    """The Report object (``wandb_workspaces.reports.v2.Report``); nothing is sent anywhere.
    ``project``/``entity`` default to the trials' ``tracking`` section, then WANDB_PROJECT/ENTITY."""
    wr = reports_api()
    experiment = load_experiment(experiment_dir)
    project, entity = _destination(experiment.results, project, entity)
    sections = {s.key: s for s in report_sections(experiment, group_by)}
    keys = group_keys(experiment, group_by)
    group = wandb_group(experiment_dir)

    def runs(name, by):
        return wr.Runset(
            entity=entity, project=project, name=name, filters=run_filter(group), groupby=[f"config.{k}" for k in by]
        )

    blocks = [
        wr.TableOfContents(),
        *_text(wr, sections["leaderboard"]),
        wr.PanelGrid(
            runsets=[runs(experiment.name, _dotted(keys))],
            panels=[
                wr.BarPlot(title="best val acc (mean ± std over seeds)", metrics=[BEST_VAL], **MEAN_STD),
                wr.ScalarChart(title="best val acc, mean over runs", metric=BEST_VAL, groupby_aggfunc="mean"),
                wr.RunComparer(diff_only="split"),
            ],
        ),
        *_text(wr, sections["ablation"]),
        *_text(wr, sections["curves"]),
        wr.PanelGrid(
            runsets=[runs("by objective", [OBJECTIVE])],
            panels=[
                _epoch_plot(wr, m) for m in ["val/acc_fused", *(f"val/acc_{mod}" for mod in experiment.modalities)]
            ],
        ),
        *_text(wr, sections["lambda-sensitivity"]),
        *_text(wr, sections["warmup-sensitivity"]),
        wr.PanelGrid(
            runsets=[runs("parameters", [])],
            panels=[
                wr.ParallelCoordinatesPlot(
                    title="searched keys vs best val acc",
                    columns=[
                        *(
                            wr.ParallelCoordinatesPlotColumn(metric=wr.Config(k))
                            for k in parameter_keys(experiment.results, experiment.searched)
                        ),
                        wr.ParallelCoordinatesPlotColumn(metric=wr.SummaryMetric(BEST_VAL)),
                    ],
                ),
                wr.ParameterImportancePlot(with_respect_to=BEST_VAL),
            ],
        ),
        *_text(wr, sections["imbalance"]),
        wr.PanelGrid(runsets=[runs("by objective", [OBJECTIVE])], panels=[_epoch_plot(wr, "val/imbalance_ratio")]),
        *_text(wr, sections["robustness"]),
    ]
    return wr.Report(
        entity=entity,
        project=project,
        title=f"{experiment.name}: imbalanced multimodal learning"[:128],
        description=f"{len(experiment.results)} trials; tables computed locally from results.parquet, "
        f"panels from the runs of W&B group {group}",
        blocks=blocks,
        width="fluid",
    )


def _destination(results, project: str | None, entity: str | None) -> tuple[str, str]:
    """Explicit values, else the trials' recipe ``tracking`` section, else WANDB_PROJECT/WANDB_ENTITY
    (the project last defaults to ``mmbalance``; the entity has no offline default)."""

    def first(column: str):
        values = results[column].dropna() if column in results else []
        return values.iloc[0] if len(values) else None

    project = project or first("_wandb_project") or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT
    entity = entity or first("_wandb_entity") or os.environ.get("WANDB_ENTITY")
    if not entity:
        raise ConfigError(
            "a W&B report needs an explicit entity (--wandb-entity, the recipe's tracking.entity, "
            "or WANDB_ENTITY): looking up the default entity needs the W&B server"
        )
    return project, entity


def _epoch_plot(wr, metric: str):
    """One metric per epoch (the tracker logs at step = epoch), mean ± std over a group's runs."""
    return wr.LinePlot(title=metric, x="Step", title_x="epoch", y=[metric], **MEAN_STD)


def wandb_group(experiment_dir: str | Path) -> str:
    """The W&B group of a search's runs (``records.experiment_group``: its directory name and its
    own id); a directory without a stored id (made before ids existed) used its name alone."""
    from mmbalance.layout import EXPERIMENT_ID_FILE
    from mmbalance.tracking.records import experiment_group

    directory = Path(experiment_dir)
    return experiment_group(directory) if (directory / EXPERIMENT_ID_FILE).is_file() else directory.resolve().name


def run_filter(group: str) -> str:
    """The runs of one experiment: its W&B run group."""
    return f"Group = '{group}'"


def parameter_keys(results, searched: list[str]) -> list[str]:
    """Recipe keys for the parallel-coordinates plot: the dotted searched keys, then the
    resolved objective keys that vary (a bundle column is no config key)."""
    keys = [k for k in searched if "." in k]
    for key in (OBJECTIVE, FUSION, LAM, WARMUP, GUIDANCE, SCOPE):
        if key not in keys and key in results and results[key].nunique() > 1:
            keys.append(key)
    return keys


def _dotted(keys: list[str]) -> list[str]:
    return [k for k in keys if "." in k] or [OBJECTIVE]


def _text(wr, section: Section) -> list:
    blocks = [wr.H1(section.title), *(wr.P(note) for note in section.notes)]
    for table in section.tables:
        blocks += [wr.H3(table.caption), wr.MarkdownBlock(table_markdown(table))]
    return blocks


# -- offline spec and publishing ---------------------------------------------------------------


def report_spec(obj: Any) -> Any:
    """A Report (or any part of one) as plain JSON data, each object tagged with its class."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        declared = getattr(type(obj), "__pydantic_fields__", {})
        fields = {
            f.name: report_spec(getattr(obj, f.name))
            for f in dataclasses.fields(obj)
            if f.init and not f.name.startswith("_") and getattr(declared.get(f.name), "init", None) is not False
        }
        return {TYPE_TAG: type(obj).__name__, **fields}
    if isinstance(obj, (list, tuple)):
        return [report_spec(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): report_spec(v) for k, v in obj.items()}
    return obj


def load_report_spec(spec: Any):
    """The inverse of ``report_spec``: the Report object again."""
    from wandb_workspaces.reports.v2 import interface

    reports_api()
    if isinstance(spec, list):
        return [load_report_spec(v) for v in spec]
    if isinstance(spec, dict):
        values = {k: load_report_spec(v) for k, v in spec.items() if k != TYPE_TAG}
        return getattr(interface, spec[TYPE_TAG])(**values) if TYPE_TAG in spec else values
    return spec


def write_wandb_report(report, out_dir: str | Path) -> Path:
    path = Path(out_dir) / SPEC_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report_spec(report), indent=1) + "\n")
    return path


def publish_wandb_report(spec_path: str | Path, draft: bool = False):
    """Load a spec written offline and save it to W&B (needs network and an API key)."""
    report = load_report_spec(json.loads(Path(spec_path).read_text()))
    return report.save(draft=draft)


def can_publish() -> bool:
    """An API key is at hand and W&B is not switched to offline/disabled mode."""
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return False
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def publish_hint(spec_path: Path, experiment_dir: str | Path, project: str, entity: str) -> str:
    return (
        f"W&B report spec written to {spec_path}; not published (that needs an API key, network, and "
        f"WANDB_MODE neither offline nor disabled).\n"
        f"Publish it later, with WANDB_API_KEY set and network:\n"
        f"  mmbalance report {experiment_dir} --wandb --wandb-project {project} --wandb-entity {entity}\n"
        f'or: python -c "from mmbalance.reports.wandb_report import publish_wandb_report; '
        f"publish_wandb_report('{spec_path}')\""
    )
