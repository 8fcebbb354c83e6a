"""Where every file of a run, a search and a study lives: the one place that knows the layout.

A run directory (``mmbalance train``, a search trial, a study's final run)::

    config.yaml          the resolved, validated recipe
    metrics.jsonl        one JSON object per epoch (cut back to the resumed epoch on resume)
    result.json          {"val": {"best_acc", "best_epoch"}, "test": {...}, "epochs": n}
    checkpoints/latest/  the state to resume from; checkpoints/best/: the best-val state
    run_id.json          the run's W&B id, created by its first tracked start
    wandb/ ray/          W&B's offline run; Ray Train's own checkpoints (``--workers``)
    eval-<split>.json    what ``mmbalance eval`` scored
    ended.json failed.json wandb_open.json wandb_logged.json   search bookkeeping (tune/search.py,
                         tracking/records.py)

A search directory (``mmbalance tune``): ``results.parquet`` (+ .csv, .json), ``trials/<trial
id>/`` (one run directory each), ``tune/`` (Tune's experiment state), ``report/``, ``wandb/``,
``experiment_id.json``. A study directory (``mmbalance compare``): ``study.json`` (the summary),
``results.parquet`` (+ .csv), ``methods/<method>/{search,final}/`` (a search directory each),
``stages/{search,final}/`` (each phase's Tuner state), ``report/``, ``experiment_id.json``.

Only names and paths here: no file is read or written, so every layer may import it.
``outputs.py`` builds the lists of what ``--overwrite`` may replace from these names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

EXPERIMENT_ID_FILE = "experiment_id.json"
RESULTS_FILE = "results.parquet"
REPORT_DIR = "report"
WANDB_DIR = "wandb"
STATE_FILE = "state.pt"  # in each checkpoint directory (engine/checkpoint.py)


@dataclass(frozen=True)
class RunDir:
    path: Path

    CONFIG = "config.yaml"
    METRICS = "metrics.jsonl"
    RESULT = "result.json"
    CHECKPOINTS = "checkpoints"
    RUN_ID = "run_id.json"
    ENDED = "ended.json"  # written by the search driver when Tune ends the trial
    FAILED = "failed.json"  # a trial's deterministic error, re-raised by a retry
    TRACKING_OPEN = "wandb_open.json"  # present while a start's W&B run is open; left behind by a kill
    DRIVER_LOGGED = "wandb_logged.json"  # a search trial: the last epoch the driver passed to W&B
    RAY = "ray"
    # Top-level names a run owns (fnmatch patterns; "*" also owns the temp files of atomic writes).
    ENTRIES = (
        CONFIG,
        METRICS,
        RESULT,
        CHECKPOINTS,
        WANDB_DIR,
        RAY,
        "eval-*.json",
        f"{RUN_ID}*",
        ENDED,
        FAILED,
        TRACKING_OPEN,
        f"{DRIVER_LOGGED}*",
    )

    def __init__(self, path: str | Path) -> None:
        object.__setattr__(self, "path", Path(path))

    @classmethod
    def of_checkpoint(cls, path: str | Path) -> "RunDir":
        """A run directory named by itself or by its ``checkpoints/best``."""
        path = Path(path)
        if path.name == "best" and path.parent.name == cls.CHECKPOINTS:
            return cls(path.parent.parent)
        return cls(path)

    @property
    def config(self) -> Path:
        return self.path / self.CONFIG

    @property
    def metrics(self) -> Path:
        return self.path / self.METRICS

    @property
    def result(self) -> Path:
        return self.path / self.RESULT

    def checkpoint(self, which: str) -> Path:
        """``latest`` (resume from) or ``best`` (best val, what evaluation loads)."""
        return self.path / self.CHECKPOINTS / which

    def has_checkpoint(self, which: str) -> bool:
        return (self.checkpoint(which) / STATE_FILE).is_file()

    @property
    def ray_storage(self) -> Path:
        return self.path / self.RAY

    def eval_table(self, split: str) -> Path:
        return self.path / f"eval-{split}.json"

    def file(self, name: str) -> Path:
        """One of the bookkeeping files named above (``RunDir.ENDED``, ``RunDir.RUN_ID``, ...)."""
        return self.path / name

    def holds_run(self) -> bool:
        return self.metrics.exists() or self.config.exists()


@dataclass(frozen=True)
class SearchDir:
    path: Path

    TRIALS = "trials"
    TUNE_STATE = "tune"
    ENTRIES = (
        RESULTS_FILE,
        "results.csv",
        "results.json",
        TRIALS,
        TUNE_STATE,
        "train",
        REPORT_DIR,
        WANDB_DIR,
        f"{EXPERIMENT_ID_FILE}*",
    )

    def __init__(self, path: str | Path) -> None:
        object.__setattr__(self, "path", Path(path))

    @property
    def results(self) -> Path:
        return self.path / RESULTS_FILE

    @property
    def trials(self) -> Path:
        return self.path / self.TRIALS

    def trial(self, trial_id: str) -> RunDir:
        return RunDir(self.trials / str(trial_id))

    @property
    def tune_state(self) -> Path:
        return self.path / self.TUNE_STATE

    @property
    def report(self) -> Path:
        return self.path / REPORT_DIR

    def holds_search(self) -> bool:
        return self.results.exists() or self.tune_state.exists()


@dataclass(frozen=True)
class StudyDir:
    path: Path

    SUMMARY = "study.json"
    METHODS = "methods"
    STAGES = "stages"  # the Tuner of each phase: stages/{search,final} (its tune/ state, W&B runs)
    ENTRIES = (RESULTS_FILE, "results.csv", SUMMARY, METHODS, STAGES, REPORT_DIR, WANDB_DIR, f"{EXPERIMENT_ID_FILE}*")

    def __init__(self, path: str | Path) -> None:
        object.__setattr__(self, "path", Path(path))

    @property
    def summary(self) -> Path:
        return self.path / self.SUMMARY

    @property
    def results(self) -> Path:
        return self.path / RESULTS_FILE

    @property
    def methods(self) -> Path:
        return self.path / self.METHODS

    def method_stage(self, method: str, stage: str) -> SearchDir:
        """``methods/<method>/<stage>``: one search directory."""
        return SearchDir(self.methods / method / stage)

    def stage_state(self, phase: str) -> SearchDir:
        """``stages/<phase>``: the one Tuner that runs a phase for every method."""
        return SearchDir(self.path / self.STAGES / phase)

    @property
    def report(self) -> Path:
        return self.path / REPORT_DIR

    def holds_study(self) -> bool:
        return self.summary.exists() or self.methods.exists()

    @classmethod
    def of_stage(cls, stage_dir: str | Path) -> "StudyDir | None":
        """The study a ``methods/<method>/<stage>`` directory belongs to, or None for a plain search."""
        stage_dir = Path(stage_dir)
        if stage_dir.parent.parent.name == cls.METHODS:
            return cls(stage_dir.parent.parent.parent)
        return None
