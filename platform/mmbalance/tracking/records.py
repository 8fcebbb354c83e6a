"""Local run records: resolved config, one metrics line per epoch, the final result, and the
W&B ids of runs and experiments.

Where each file lives is ``layout.py``'s; this module reads and writes them. A run's
``run_id.json`` holds ``{"id": ...}``, its W&B id, created by its first tracked start; a search
directory holds ``experiment_id.json`` the same way: the prefix of its trials' W&B ids.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mmbalance.layout import EXPERIMENT_ID_FILE, RunDir, StudyDir

ID_LENGTH = 16  # hex digits: 64 random bits, so ids never collide in practice


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float, at any depth, replaced by None.

    JSON has no NaN or infinity (``json.dumps`` writes the non-standard ``NaN`` that strict
    readers reject), so a metric that could not be computed is recorded as null. Tensor and
    numpy scalars (anything with ``.item()``) become Python numbers first."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        return json_safe(value.item())
    return value


def new_id() -> str:
    """A random id, never derived from a path: two runs whose directories share a name (two
    seeds, two studies: ``exp/a/lf`` and ``exp/b/lf``) must never be one W&B run. Hex digits
    only, so it is valid wherever W&B accepts an id (and in file names)."""
    return uuid.uuid4().hex[:ID_LENGTH]


def read_id(path: Path) -> str | None:
    """The id stored in ``path``, or None when there is none (a missing or unreadable file is
    treated as no id: the caller then starts a new run rather than guessing one)."""
    try:
        value = json.loads(Path(path).read_text()).get("id")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) and value else None


def write_id(path: Path, value: str) -> None:
    """Replace the stored id atomically: a reader never sees a half-written file."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}.tmp")  # owned by the layouts' "<name>*"
    tmp.write_text(json.dumps({"id": value}) + "\n")
    os.replace(tmp, path)


def shared_id(path: Path) -> str:
    """The id stored in ``path``, creating it if there is none. Safe when several processes ask
    at once (the scoring tasks of a search): the file is published with ``os.link``, which fails
    if another process published first, and then everyone reads the winner's id."""
    path = Path(path)
    existing = read_id(path)
    if existing is not None:
        return existing
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}.tmp")  # owned by the layouts' "<name>*"
    tmp.write_text(json.dumps({"id": new_id()}) + "\n")
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return read_id(path)


def experiment_id(directory: str | Path, *, fresh: bool = False) -> str:
    """The search's own id, stored in its directory: the prefix that makes its trials' W&B ids
    unique across experiments (Tune's trial ids are only unique within one). ``fresh`` (a new
    search) replaces any stored one; otherwise it is reused (a resumed search, the scoring phase)."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    path = Path(directory) / EXPERIMENT_ID_FILE
    if fresh:
        write_id(path, new_id())
    return shared_id(path)


# In a trial's params when one Tuner runs several searches (``tune/search.Part``): which one it
# belongs to. Here, not in tune/, because the W&B callback (tracking/) reads it too.
PART = "_part"


def experiment_group(directory: str | Path) -> str:
    """A search's W&B group: its directory name (readable) + its own id's first 8 characters,
    so two experiments in directories of the same name (``a/search``, ``b/search``) never share
    a group. A phase of a comparison study (``tune/compare.py``) is grouped by its method
    instead, with the study's id: both phases of a method, and no other method, in one group."""
    directory = Path(directory).resolve()
    study = StudyDir.of_stage(directory)
    study_id = read_id(study.path / EXPERIMENT_ID_FILE) if study is not None else None
    if study_id:
        return f"{directory.parent.name}-{study_id[:8]}"
    return f"{directory.name}-{experiment_id(directory)[:8]}"


def trial_run_id(experiment: str, trial_id: str) -> str:
    """A search trial's W&B id: the experiment's id, then Tune's trial id (readable in the UI)."""
    return f"{experiment}-{trial_id}"


@dataclass(frozen=True)
class RunIdentity:
    """A run's W&B id, and whether this start continues that W&B run (only then may W&B
    resume it; a new run must never append to another)."""

    run_id: str
    resumed: bool


class RunRecord:
    def __init__(self, directory: str | Path):
        self.layout = RunDir(directory)
        self.dir = self.layout.path
        self.dir.mkdir(parents=True, exist_ok=True)

    @property
    def metrics_path(self) -> Path:
        return self.layout.metrics

    def write_config(self, recipe: dict[str, Any]) -> None:
        self.layout.config.write_text(yaml.safe_dump(recipe, sort_keys=False))

    def append_metrics(self, metrics: dict[str, Any]) -> None:
        with open(self.metrics_path, "a") as handle:
            handle.write(json.dumps(json_safe(metrics), allow_nan=False) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.is_file():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    def truncate_metrics(self, epochs_done: int) -> None:
        """On resume, keep only the epochs the checkpoint covers (no duplicated epoch lines)."""
        kept = [m for m in self.read_metrics() if m["epoch"] < epochs_done]
        tmp = self.metrics_path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(m) + "\n" for m in kept))
        os.replace(tmp, self.metrics_path)

    def write_result(self, result: dict[str, Any]) -> None:
        tmp = self.layout.result.with_name(f"{RunDir.RESULT}.tmp")
        tmp.write_text(json.dumps(json_safe(result), indent=2, sort_keys=True, allow_nan=False) + "\n")
        os.replace(tmp, self.layout.result)

    def checkpoint_dir(self, which: str) -> Path:
        return self.layout.checkpoint(which)

    def open_tracking(self) -> bool:
        """Mark this run's W&B run as open; return whether an earlier start left it open, i.e.
        was killed before its W&B run finished. Such a start may have written an epoch to
        ``metrics.jsonl`` that never reached W&B (the W&B service had not flushed it)."""
        marker = self.layout.file(RunDir.TRACKING_OPEN)
        left_open = marker.is_file()
        marker.write_text(json.dumps({"pid": os.getpid()}) + "\n")
        return left_open

    def close_tracking(self) -> None:
        """The W&B run finished (flushed): nothing logged is at risk any more."""
        self.layout.file(RunDir.TRACKING_OPEN).unlink(missing_ok=True)

    def last_logged_epoch(self) -> int:
        """For a search trial, logged to W&B by the driver: the last epoch it logged (-1: none)."""
        try:
            return int(json.loads(self.layout.file(RunDir.DRIVER_LOGGED).read_text())["epoch"])
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return -1

    def mark_logged(self, epoch: int) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.layout.file(f"{RunDir.DRIVER_LOGGED}.tmp")
        tmp.write_text(json.dumps({"epoch": int(epoch)}) + "\n")
        os.replace(tmp, self.layout.file(RunDir.DRIVER_LOGGED))

    def identity(self, continuing: bool) -> RunIdentity:
        """This run's id: the stored one when this start is ``continuing`` an earlier one (``--resume``,
        a Ray worker-group restart, a Tune trial retry: the same run directory, carried on), a new
        one otherwise, stored for those later starts. A continued run that never stored an id (it
        was not tracked, or predates ids) starts a new W&B run rather than guess one."""
        path = self.layout.file(RunDir.RUN_ID)
        stored = read_id(path) if continuing else None
        if stored is not None:
            return RunIdentity(stored, resumed=True)
        fresh = new_id()
        write_id(path, fresh)
        return RunIdentity(fresh, resumed=False)
