"""An experiment directory, loaded for reporting.

``mmbalance tune`` writes ``DIR/results.parquet`` (one row per trial: its searched keys, seed,
scores) and ``DIR/trials/<trial_id>/{config.yaml, metrics.jsonl}``. Loading adds to each row
the trial's resolved objective (``objective.name`` and every objective parameter, defaults
filled in from the objective's parameter model) and ``model.fusion``, read from its own
``config.yaml``: a search over a bundle (``method``) or with ``objective.name`` fixed in the
space's ``set`` has no such column, and the report needs them (λ, warm-up, guidance, scope).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from mmbalance.layout import RESULTS_FILE, RunDir, SearchDir

OBJECTIVE = "objective.name"
LAM = "objective.lam"
WARMUP = "objective.warmup_epochs"
GUIDANCE = "objective.guidance"
SCOPE = "objective.scope"
FUSION = "model.fusion"
FIXED_COLUMNS = (
    "trial_id",
    "seed",
    "epochs_run",
    "stop_reason",
    "run_dir",
    "best_val",
    "best_epoch",
    "test_acc",
    "test_imbalance_ratio",
    "test_samples",
)
FIXED_PREFIXES = ("test_acc_", "robust_", "test_shapley_")  # scores, never searched keys


@dataclass(frozen=True)
class RobustColumn:
    """One robustness score column: ``robust_missing_<m>`` or ``robust_<corruption>_<m>_<level>``."""

    column: str
    corruption: str  # "missing" for a missing modality
    modality: str
    level: float | None = None

    @property
    def label(self) -> str:
        if self.level is None:
            return f"{self.modality} missing"
        return f"{self.corruption} {self.modality} ε={self.level:g}"


@dataclass
class Experiment:
    name: str
    directory: Path
    results: pd.DataFrame  # results.parquet + resolved recipe keys (see the module docstring)
    searched: list[str]  # the searched-key columns of results.parquet
    modalities: list[str]
    robust: list[RobustColumn] = field(default_factory=list)

    @property
    def missing(self) -> list[RobustColumn]:
        return [r for r in self.robust if r.level is None]

    @property
    def corrupted(self) -> list[RobustColumn]:
        return [r for r in self.robust if r.level is not None]

    @cached_property
    def curves(self) -> pd.DataFrame:
        """Every trial's metrics.jsonl, one row per (trial_id, epoch); empty when none exist."""
        frames = []
        for trial_id, run_dir in zip(self.results["trial_id"], self.results["_trial_dir"]):
            lines = _read_jsonl(RunDir(run_dir).metrics)
            if lines:
                frames.append(pd.DataFrame(lines).assign(trial_id=trial_id))
        if not frames:
            return pd.DataFrame(columns=["trial_id", "epoch"])
        return pd.concat(frames, ignore_index=True)


def load_experiment(directory: str | Path) -> Experiment:
    directory = Path(directory)
    path = directory / RESULTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: pass an experiment directory written by `mmbalance tune`")
    frame = pd.read_parquet(path)
    searched = searched_keys(frame)
    modalities = [c[len("test_acc_") :] for c in frame.columns if c.startswith("test_acc_")]
    frame = frame.assign(_trial_dir=[str(_trial_dir(directory, row)) for _, row in frame.iterrows()])
    frame = _with_resolved_keys(frame)
    if not modalities:
        modalities = _modalities_from_configs(frame)
    robust = [r for r in (parse_robust_column(c, modalities) for c in frame.columns) if r is not None]
    return Experiment(directory.resolve().name, directory, frame, searched, modalities, robust)


def searched_keys(frame: pd.DataFrame) -> list[str]:
    """Every column outside the fixed results schema: the space's keys and bundle labels."""
    return [
        c
        for c in frame.columns
        if c not in FIXED_COLUMNS and not c.startswith(FIXED_PREFIXES) and not c.startswith("_")
    ]


def parse_robust_column(column: str, modalities: list[str]) -> RobustColumn | None:
    if not column.startswith("robust_"):
        return None
    name = column[len("robust_") :]
    for m in modalities:
        if name == f"missing_{m}":
            return RobustColumn(column, "missing", m)
    head, _, level = name.rpartition("_")
    for m in sorted(modalities, key=len, reverse=True):
        if head.endswith(f"_{m}"):
            try:
                return RobustColumn(column, head[: -len(m) - 1], m, float(level))
            except ValueError:
                return None
    return None


def _trial_dir(directory: Path, row: pd.Series) -> Path:
    """The trial's own folder under the experiment (``run_dir`` may be relative to another cwd)."""
    local = SearchDir(directory).trial(row["trial_id"]).path
    if local.is_dir() or not isinstance(row.get("run_dir"), str):
        return local
    return Path(row["run_dir"])


def _with_resolved_keys(frame: pd.DataFrame) -> pd.DataFrame:
    resolved = pd.DataFrame([_resolved_keys(RunDir(d).config) for d in frame["_trial_dir"]], index=frame.index)
    extra = [c for c in resolved.columns if c not in frame.columns]
    return pd.concat([frame, resolved[extra]], axis=1)


def _resolved_keys(config_path: Path) -> dict[str, Any]:
    """``objective.*`` (with the objective's defaults) and ``model.fusion`` of one trial."""
    from mmbalance.objectives import OBJECTIVES

    if not config_path.is_file():
        return {}
    tree = yaml.safe_load(config_path.read_text()) or {}
    objective = dict(tree.get("objective") or {})
    name = objective.pop("name", "lf")
    params = OBJECTIVES[name].params().model_dump() if name in OBJECTIVES else {}
    params.update(objective)
    keys = {OBJECTIVE: name, **{f"objective.{k}": _cell(v) for k, v in params.items()}}
    keys[FUSION] = (tree.get("model") or {}).get("fusion", "mean")
    keys["_modalities"] = ",".join(tree.get("modalities") or {})
    tracking = tree.get("tracking") or {}
    keys["_wandb_project"], keys["_wandb_entity"] = tracking.get("project"), tracking.get("entity")
    return keys


def _cell(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, (list, dict)) else value


def _modalities_from_configs(frame: pd.DataFrame) -> list[str]:
    names = frame.get("_modalities", pd.Series(dtype=str)).dropna()
    return names.iloc[0].split(",") if len(names) and names.iloc[0] else []


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def strategy_labels(results: pd.DataFrame) -> pd.Series:
    """The ablation's row label per trial: the objective, and for MNL its guidance strategy
    (and scope where the experiment varies it): ``lf``, ``mnl (confidence_ucom, nontarget)``."""
    if OBJECTIVE not in results:
        return pd.Series("all", index=results.index, dtype=object)
    mnl = results[OBJECTIVE] == "mnl"
    scope_varies = SCOPE in results and results.loc[mnl, SCOPE].nunique() > 1

    def label(row: pd.Series) -> str:
        if row[OBJECTIVE] != "mnl" or GUIDANCE not in row:
            return str(row[OBJECTIVE])
        return f"mnl ({row[GUIDANCE]}, {row[SCOPE]})" if scope_varies else f"mnl ({row[GUIDANCE]})"

    return results.apply(label, axis=1).astype(object)
