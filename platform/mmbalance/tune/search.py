"""``mmbalance tune``: Ray Tune over the Train driver, ASHA or grids, then a scoring phase.

Each trial trains one recipe (base recipe + the space's fixed keys + its draw + its seed)
and reports every epoch with a checkpoint: in the trial process (``workers: 0``, cheap
trials on a laptop) or as a ``TorchTrainer`` with N workers whose rank-0 reports reach Tune
through ``TuneReportCallback`` (docs/architecture.md §R1). ASHA reads ``val/acc_fused`` against
``epochs_done``. After ``fit`` returns, every trial — finished or stopped early — is scored
from its best-val checkpoint by Ray tasks (``engine/evaluation.py``), and one row per trial
goes to ``results.parquet`` / ``results.csv``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from mmbalance.config import TrackingConfig, check_against_data, set_dotted, validate_recipe
from mmbalance.data.manifest import read_manifest
from mmbalance.data.storage import absolute as storage_absolute
from mmbalance.layout import RunDir, SearchDir
from mmbalance.tracking.records import PART, RunRecord, experiment_group
from mmbalance.tracking.search_wandb import REPLAYED, prepare_driver, record_scores, search_callback
from mmbalance.tune.space import SearchSpace, trial_recipe

ENDED = RunDir.ENDED  # in a trial's run directory, written by the driver when Tune ends the trial
FAILED = RunDir.FAILED  # in a trial's run directory: its deterministic error, re-raised by a retry


@dataclass(frozen=True)
class SearchRun:
    """How a search runs, as opposed to what it searches: resume, where Ray keeps state, which
    cluster, console verbosity, the fault hook (tests) and the user's ``--set`` keys. One value
    travels from the command through a study's stages to the Tuner instead of six keywords."""

    resume: bool = False
    storage: str | None = None
    address: str | None = None
    verbose: bool = False
    fault: dict[str, Any] | None = None
    overrides: dict[str, Any] | None = None


@dataclass(frozen=True)
class Part:
    """One of the searches a single Tuner runs (``run_searches``). A comparison study runs every
    method's search in one Tuner and every method's final runs in another: one Tuner start, one
    set of trial processes and one scoring round for all methods, where a Tuner per method and
    phase paid each of them twelve times in the demo study. Each part keeps its own directory
    (``output``: its ``trials/`` and ``results.parquet``), its own scheduler (ASHA rungs compare
    its trials only, ``per_part_scheduler.py``) and its own failure rule. ``name`` None: the one
    search of ``mmbalance tune``, whose trials carry no part key."""

    name: str | None
    space: SearchSpace
    base: dict[str, Any]
    output: Path


def tune_param_space(parts: list[Part]) -> dict[str, Any]:
    """All trial configurations, as one Tune grid: each draw is shared by every seed, so
    results can be averaged over seeds per configuration (Tune would redraw per seed)."""
    import ray.tune as tune

    configs = []
    for part in parts:
        configs += [c if part.name is None else {**c, PART: part.name} for c in part.space.configurations()]
    return {"params": tune.grid_search(configs)}


def run_trial(
    config: dict[str, Any],
    *,
    parts: dict[str | None, dict[str, Any]],
    workers: int,
    gpus_per_worker: float,
    storage: str | None = None,
    fault: dict[str, Any] | None = None,
    overrides: dict[str, Any] | None = None,
    checked_data: frozenset[str] = frozenset(),
) -> None:
    """One Tune trial == one training run, named after its (stable) trial id, in its part's
    directory (``parts[name] = {"base", "fixed", "output"}``). ``fault`` is the test-only hook of
    ``engine/session.fault_hook`` (docs/faults.md). ``checked_data``: the shard directories the
    driver read against their checksums, which the trial then checks only for their schema.

    Tune's ``FailureConfig`` retries any exception, Ray Train's only recoverable ones
    (``launch/failure_policy.py``). So the trial checks its recipe against its data before a
    ``TorchTrainer`` starts, and a deterministic error is recorded in the run directory
    (``failed.json``): Tune's retry then re-raises it at once instead of training again."""
    import logging

    import ray.tune

    from mmbalance.engine.loop import run_training
    from mmbalance.engine.run_spec import RunSpec

    # Per-checkpoint INFO lines from every trial would bury the search's own progress lines.
    for name in ("ray.tune", "ray.train"):
        logging.getLogger(name).setLevel(logging.WARNING)
    trial_id = ray.tune.get_context().get_trial_id()
    params = dict(config["params"])
    part = parts[params.pop(PART, None)]
    base, fixed, output = part["base"], part["fixed"], part["output"]
    seed = params.pop("seed")
    tree = trial_recipe(base, fixed, params, seed, overrides=overrides)
    tree.setdefault("tracking", {})["wandb"] = "disabled"  # the driver logs this trial (tracking/search_wandb.py)
    run_dir = SearchDir(output).trial(trial_id).path
    last = ended_result(run_dir)
    if last is not None:
        # Restored after the driver died: Tune's saved state (written every few seconds) may still
        # call this trial running though it had ended. Report how it ended, train nothing.
        ray.tune.report({**last, REPLAYED: True})
        return
    raise_recorded_failure(run_dir)
    try:
        recipe = validate_recipe(tree, source=f"trial {trial_id} recipe")
        spec = RunSpec(
            recipe, run_dir, where="tune", verbose=False, fault=fault, shards_checked=recipe.data.path in checked_data
        )
        if workers == 0:
            run_training(spec)
            return
        from ray.tune.integration.ray_train import TuneReportCallback

        from mmbalance.launch.train_driver import fit

        manifest = read_manifest(recipe.data.path)
        check_against_data(recipe, manifest)
        fit(
            spec,
            manifest,
            workers=workers,
            gpus_per_worker=gpus_per_worker,
            name=f"train-{trial_id}",
            storage_path=f"{(storage or str(Path(output).resolve())).rstrip('/')}/train",
            callbacks=[TuneReportCallback()],
        )
    except Exception as err:
        record_failure(run_dir, err)
        raise


class RepeatedTrialError(RuntimeError):
    """A retried trial whose previous attempt raised a deterministic error: raised again
    without training. ``kind`` is the original exception's type, for the failure summary."""

    def __init__(self, kind: str, message: str):
        super().__init__(f"{message} (not retried: the previous attempt of this trial raised it)")
        self.kind = kind


def record_failure(run_dir: Path, error: BaseException) -> None:
    """Write ``failed.json`` when ``error`` would recur on a retry (nothing otherwise)."""
    from mmbalance.launch.failure_policy import is_deterministic

    if not is_deterministic(error):
        return
    failures = getattr(error, "worker_failures", None)
    first = next(iter(failures.values())) if failures else error
    first = getattr(first, "_base_exc", first)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / FAILED).write_text(json.dumps({"kind": type(first).__name__, "message": str(first)}) + "\n")


def raise_recorded_failure(run_dir: Path) -> None:
    file = run_dir / FAILED
    if file.is_file():
        recorded = json.loads(file.read_text())
        raise RepeatedTrialError(recorded["kind"], recorded["message"])


def ended_result(run_dir: Path) -> dict[str, Any] | None:
    """The last result of a trial that has already ended, from its run directory, or ``None``.

    A trial has ended when its loop wrote ``result.json`` (every epoch trained) or when the
    driver recorded ``ended.json`` (Tune ended it, e.g. ASHA stopped it early); both are on disk
    before Tune's next periodic state snapshot, which a killed driver never writes."""
    if RunDir(run_dir).result.is_file():
        epochs = None
    elif (run_dir / ENDED).is_file():
        epochs = json.loads((run_dir / ENDED).read_text())["epochs_done"]
    else:
        return None
    rows = [m for m in RunRecord(run_dir).read_metrics() if epochs is None or m["epochs_done"] <= epochs]
    return rows[-1] if rows else None


def trial_progress_callback(total: int, max_t: dict[str | None, int], trials_dir: dict[str | None, Path]):
    """One line per ended trial (Tune's own tables are turned off): which, how far, how good;
    it also records in each trial's run directory that (and how) it ended. ``max_t`` and
    ``trials_dir`` are per part (``Part.name``); with several parts a line names the part."""
    import ray.tune

    def of_part(value, trial):
        return value[trial.config["params"].get(PART)]

    class TrialProgress(ray.tune.Callback):
        def __init__(self):
            self.ended = 0

        def _line(self, trial, how: str) -> None:
            self.ended += 1
            result = trial.last_result or {}
            val = result.get("val/acc_fused")
            val_text = f"val acc {val:.4f}" if isinstance(val, float) else "no result"
            part = trial.config["params"].get(PART)
            print(
                f"[{self.ended}/{total}] {f'{part} ' if part is not None else ''}trial {trial.trial_id}: {how} after "
                f"{result.get('epochs_done', 0)}/{of_part(max_t, trial)} epochs, {val_text}",
                flush=True,
            )

        def on_trial_complete(self, iteration, trials, trial, **info):
            epochs_done = (trial.last_result or {}).get("epochs_done", 0)
            if epochs_done:
                run_dir = of_part(trials_dir, trial) / trial.trial_id
                run_dir.mkdir(parents=True, exist_ok=True)
                tmp = run_dir / f"{ENDED}.tmp"
                tmp.write_text(json.dumps({"epochs_done": epochs_done}) + "\n")
                os.replace(tmp, run_dir / ENDED)
            self._line(trial, "finished" if epochs_done >= of_part(max_t, trial) else "stopped early")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._line(trial, "FAILED")

    return TrialProgress()


def _callbacks(parts: list[Part], max_t: dict[str | None, int], tracking: TrackingConfig | None, output: Path) -> list:
    trials = {part.name: SearchDir(part.output.resolve()).trials for part in parts}
    callbacks = [trial_progress_callback(sum(p.space.trial_count() for p in parts), max_t, trials)]
    # A plain search's group comes from the id search_callback makes fresh, so only named parts
    # (a study's methods, grouped with the study's id) are given here.
    groups = {part.name: experiment_group(part.output) for part in parts if part.name is not None}
    wandb = search_callback(tracking, output, trials, groups) if tracking is not None else None
    return callbacks + ([wandb] if wandb is not None else [])


def _scheduler(space: SearchSpace, max_t: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if space.scheduler.name == "asha":
        return ASHAScheduler(
            time_attr="epochs_done",
            max_t=max_t,
            grace_period=space.scheduler.grace_period,
            reduction_factor=space.scheduler.reduction_factor,
        )
    return FIFOScheduler()


def build_tuner(
    parts: list[Part],
    output: Path,
    resume: bool,
    max_t: dict[str | None, int],
    storage: str | None = None,
    tracking: TrackingConfig | None = None,
    fault: dict[str, Any] | None = None,
    overrides: dict[str, Any] | None = None,
    checked_data: frozenset[str] = frozenset(),
):
    """One Tuner over every part's trials; ``output`` holds its state (``tune/``) and W&B runs."""
    import ray
    import ray.tune as tune

    from mmbalance.tune.per_part_scheduler import PerPartScheduler

    space = parts[0].space  # trial resources and concurrency: the same for every part (run_searches)
    trainable = partial(
        run_trial,
        parts={p.name: {"base": p.base, "fixed": p.space.set, "output": str(p.output.resolve())} for p in parts},
        workers=space.workers,
        gpus_per_worker=space.gpus_per_worker,
        storage=storage,
        fault=fault,
        overrides=overrides,
        checked_data=checked_data,
    )
    # A workers: 0 trial trains in its own process (1 CPU); otherwise the trial is only the
    # Train driver (a sliver of CPU; Tune refuses an empty request) and its workers request
    # their own resources.
    resources = {"cpu": 1} if space.workers == 0 else {"cpu": 0.01}
    if space.workers and "TRAIN_DRIVER" in ray.cluster_resources():
        # Clusters in clusters/ advertise TRAIN_DRIVER on the non-preemptible head: drivers go there.
        resources = {"cpu": 0.01, "TRAIN_DRIVER": 0.01}
    trainable = tune.with_resources(trainable, resources)
    storage_path = storage or str(output.resolve())
    # Frequent small trials trip Tune's "snapshotting too often" warning on every report.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if resume:
        # The saved Tuner holds its run config, callbacks included (the W&B logger resumes too).
        if tracking is not None:
            prepare_driver(tracking, output)
        for recorded in SearchDir(output).trials.glob(f"*/{FAILED}"):
            recorded.unlink()  # --resume retries errored trials: the user may have fixed the cause
        return tune.Tuner.restore(
            f"{storage_path.rstrip('/')}/{SearchDir.TUNE_STATE}", trainable, resume_unfinished=True, resume_errored=True
        )
    if len(parts) == 1:
        scheduler = _scheduler(space, max_t[parts[0].name])
    else:
        scheduler = PerPartScheduler({p.name: _scheduler(p.space, max_t[p.name]) for p in parts}, PART)
    return tune.Tuner(
        trainable,
        param_space=tune_param_space(parts),
        # An in-process trial's process is reused by the next trial: a new one costs seconds of
        # imports on a small machine. Nothing carries over: a trial trains with W&B off (the
        # driver logs it), and the trainer seeds every generator from the trial's own seed.
        # Not for Train-in-Tune trials: a reused process never started the next TorchTrainer
        # (the search hung after the first trials, tests/test_tune.py), and there the worker
        # group's start costs more than the trial process.
        tune_config=tune.TuneConfig(
            metric=space.metric,
            mode=space.mode,
            num_samples=1,
            reuse_actors=space.workers == 0,
            scheduler=scheduler,
            max_concurrent_trials=space.max_concurrent,
        ),
        run_config=tune.RunConfig(
            name=SearchDir.TUNE_STATE,
            storage_path=storage_path,
            failure_config=tune.FailureConfig(max_failures=1),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            verbose=0,
            callbacks=_callbacks(parts, max_t, tracking, output),
        ),
    )


def trial_rows(grid, space: SearchSpace, output: Path, max_t: int, part: str | None = None) -> list[dict[str, Any]]:
    """One dict per trial (of ``part``) from Tune's result grid: its draw, seed, epochs and stop reason."""
    rows = []
    for result in grid:
        if result.config["params"].get(PART) != part:
            continue
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or Path(result.path).name.split("_")[-2]
        epochs_run = int(metrics.get("epochs_done", 0))
        if result.error is not None:
            reason = "error"
        elif epochs_run >= max_t:
            reason = "completed"
        else:
            reason = "stopped_early"
        params = {k: _label(v) for k, v in result.config["params"].items() if k != PART}
        row = {
            "trial_id": trial_id,
            **params,
            "epochs_run": epochs_run,
            "stop_reason": reason,
            "run_dir": str(SearchDir(output).trial(trial_id).path),
        }
        rows.append(row)
    return rows


def _label(value: Any) -> Any:
    """Bundles become one readable cell: ``objective.name=aug,objective.check_every_epochs=1``."""
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items())
    return value


def score_trial(
    run_dir: str, tree: dict[str, Any], tracking: dict[str, Any], output: str, group: str
) -> dict[str, Any]:
    """Score one trial and add the scores to its W&B run (runs as a Ray task); ``output`` is
    the Tuner's directory (the W&B runs), ``group`` the trial's W&B group."""
    from mmbalance.engine.evaluation import evaluate_run

    score = evaluate_run(run_dir, tree)
    record_scores(TrackingConfig.model_validate(tracking), group, Path(output), Path(run_dir).name, score)
    return score


def score_trials(
    rows: list[dict[str, Any]],
    space: SearchSpace,
    tracking: TrackingConfig,
    output: Path,
    groups: list[str] | None = None,
) -> list[dict[str, Any]]:
    """The scoring phase: every trial with a best checkpoint, in parallel Ray tasks. ``groups``:
    each row's W&B group (default: the group of ``output``)."""
    import ray

    remote = ray.remote(num_cpus=1, num_gpus=space.gpus_per_worker and 1)(score_trial)
    groups = groups or [experiment_group(output)] * len(rows)
    pending = {}
    for row, group in zip(rows, groups):
        run = RunDir(row["run_dir"])
        if run.has_checkpoint("best"):
            tree = yaml.safe_load(run.config.read_text())  # the trial's own recipe
            pending[row["trial_id"]] = remote.remote(
                row["run_dir"], tree, tracking.model_dump(), str(output.resolve()), group
            )
    scored = dict(zip(pending, ray.get(list(pending.values()))))
    return [{**row, **_flatten_scores(scored.get(row["trial_id"]))} for row in rows]


def _flatten_scores(score: dict[str, Any] | None) -> dict[str, Any]:
    if score is None:
        return {"best_val": None, "best_epoch": None, "test_acc": None}
    flat = {
        "best_val": score["best_val"],
        "best_epoch": score["best_epoch"],
        "test_acc": score["test"]["acc"],
        "test_imbalance_ratio": score["test"]["imbalance_ratio"],
        "test_samples": score["test"]["samples"],
    }
    flat.update({f"test_acc_{m}": acc for m, acc in score["test"]["acc_per_modality"].items()})
    flat.update({f"robust_{name}": acc for name, acc in score["robustness"].items()})
    # Each modality's Shapley contribution to fused test accuracy (engine/shapley.py).
    flat.update({f"test_{k}": v for k, v in score["test"].items() if k.startswith("shapley_")})
    return flat


def write_results(rows: list[dict[str, Any]], output: Path) -> Path:
    import pandas as pd

    frame = pd.DataFrame(rows)
    results = SearchDir(output).results
    frame.to_parquet(results, index=False)
    frame.to_csv(results.with_suffix(".csv"), index=False)
    results.with_suffix(".json").write_text(json.dumps(rows, indent=1, default=str) + "\n")
    return results


# Tune times every callback and result; on a busy machine (or while a W&B logging actor starts)
# one takes over 0.5 s and Tune warns about a "performance bottleneck", several lines a trial.
_SLOW_WARNINGS = ("may be a performance bottleneck",)


@contextlib.contextmanager
def quiet_tune(enabled: bool = True):
    """While a search runs: Tune's legacy console output at verbosity 0, which prints nothing
    (the new engine prints an experiment banner and paths whatever the verbosity), Tune's INFO
    lines off, and its slow-operation warnings dropped. Warnings and errors — the traceback of
    a failed trial, "Trials did not complete" — still reach the console."""
    if not enabled:
        yield
        return
    from mmbalance.launch.cluster import DropMessages

    saved_env = os.environ.get("RAY_AIR_NEW_OUTPUT")
    tune_logger, util_logger = logging.getLogger("ray.tune"), logging.getLogger("ray.tune.utils.util")
    saved_level, drop = tune_logger.level, DropMessages(*_SLOW_WARNINGS)
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    tune_logger.setLevel(logging.WARNING)
    util_logger.addFilter(drop)
    try:
        yield
    finally:
        util_logger.removeFilter(drop)
        tune_logger.setLevel(saved_level)
        if saved_env is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = saved_env


SECOND_PRESS_GRACE_S = 5.0  # after a second Ctrl-C, how long the driver may take to unwind before it is ended
SECOND_PRESS_MESSAGE = (
    "interrupted; stopped without the final save: --resume continues from the search state "
    "Tune saved last (trials that were running restart from their latest checkpoint)"
)


@contextlib.contextmanager
def tune_interrupts():
    """Ctrl-C during ``Tuner.fit``: the first press asks Tune for its graceful stop (state saved,
    W&B runs finished within search_wandb.FINISH_WAIT_S); a second press stops at once, even while
    the driver waits inside Ray (``interrupts.CountedInterrupts`` says why Tune's own handler
    cannot promise that). Tune's SIGUSR1 handler is its graceful stop; its SIGINT handler is off."""
    from mmbalance.interrupts import CountedInterrupts

    saved = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    counter = CountedInterrupts(
        lambda: os.kill(os.getpid(), signal.SIGUSR1),
        grace_s=SECOND_PRESS_GRACE_S,
        message=f"mmbalance: {SECOND_PRESS_MESSAGE}",
    )
    try:
        with counter:
            yield counter
    finally:
        if saved is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = saved


class SearchInterrupted(RuntimeError):
    """The search stopped before every trial ended (SIGINT); it can be resumed."""


def run_search(space: SearchSpace, base: dict[str, Any], output: Path, run: SearchRun = SearchRun()) -> "Any":
    """Validate, connect, search, score, write results; returns the results DataFrame.

    ``run.overrides`` are the user's ``--set`` keys: above the space's ``set:``, below the draw
    (``space.trial_recipe``). A search whose trials failed (all, or more than the space's
    ``max_failed_fraction``) raises ``SearchFailed`` after its results are written.

    Quiet by default: one line per ended trial (``trial_progress_callback``) and whatever the
    caller prints; Ray's worker output, Tune's banner and slow-operation warnings stay off the
    console (``quiet_tune``). Errors and the tracebacks of failed trials are always shown.
    ``run.verbose`` lets everything through."""
    output = Path(output).resolve()
    return run_searches([Part(None, space, base, output)], output, run)[None]


def run_searches(parts: list[Part], output: Path, run: SearchRun = SearchRun()) -> "dict[str | None, Any]":
    """``run_search`` for several searches in one Tuner (``Part`` says why); ``output`` holds the
    Tuner's state and W&B runs, each part's results go to its own directory. Every part must
    ask for the same trial resources and concurrency. Returns each part's results DataFrame; the
    failure rule applies to each part alone (``SearchFailed`` names the first part that broke it)."""
    import pandas as pd

    from mmbalance.data.shards import validate_shards
    from mmbalance.launch.cluster import Request, check_fits, connect
    from mmbalance.tune.space import validate_against

    overrides = dict(run.overrides or {})
    space = parts[0].space
    shape = {(p.space.workers, p.space.gpus_per_worker, p.space.max_concurrent) for p in parts}
    if len(shape) != 1:
        raise ValueError(f"searches run in one Tuner need the same workers, gpus_per_worker, max_concurrent: {shape}")
    fixed, checked = {}, {}
    for part in parts:
        fixed[part.name] = validate_against(part.space, part.base, overrides)
        path = fixed[part.name].data.path
        if path not in checked:
            checked[path] = validate_shards(path)
        check_against_data(fixed[part.name], checked[path])
    output = Path(output).resolve()  # trials and scoring tasks run in other working directories
    output.mkdir(parents=True, exist_ok=True)
    per_trial = Request(workers=max(space.workers, 1), gpus_per_worker=space.gpus_per_worker)
    started_here = connect(
        Request(workers=per_trial.workers * space.max_concurrent, gpus_per_worker=space.gpus_per_worker),
        run.address,
        verbose=run.verbose,
    )
    check_fits(per_trial, autoscaling=not started_here)
    ready = [
        Part(p.name, p.space, _absolute_data_path(_data_into_base(p.base, overrides)), Path(p.output).resolve())
        for p in parts
    ]
    overrides = _without_data(overrides)
    max_t = {p.name: p.space.scheduler.max_t or fixed[p.name].schedule.epochs for p in parts}
    tracking = fixed[parts[0].name].tracking
    total = sum(p.space.trial_count() for p in parts)
    with quiet_tune(enabled=not run.verbose), tune_interrupts() as presses:
        grid = build_tuner(
            ready,
            output,
            run.resume,
            max_t,
            run.storage,
            tracking,
            run.fault,
            overrides,
            checked_data=frozenset(storage_absolute(path) for path in checked),
        ).fit()
    finished = grid.num_terminated + grid.num_errors
    # Tune returns normally after a graceful stop, with the state saved. Ended-trial counts cannot
    # tell: the trials Tune stopped read as terminated here (they resume as unfinished).
    if presses.interrupted or finished < total:
        raise SearchInterrupted(
            f"the search stopped with {finished} of {total} trials ended; its state is "
            f"saved in {output}: rerun the same command with --resume to finish it"
        )
    per_part = {p.name: trial_rows(grid, p.space, p.output, max_t[p.name], p.name) for p in ready}
    rows = [row for p in ready for row in per_part[p.name]]
    groups = [experiment_group(p.output) for p in ready for _ in per_part[p.name]]
    scored = iter(score_trials(rows, space, tracking, output, groups))  # one round of tasks for every part
    frames, errors = {}, trial_errors(grid)
    for part in ready:
        part_rows = [next(scored) for _ in per_part[part.name]]
        part.output.mkdir(parents=True, exist_ok=True)
        write_results(part_rows, part.output)
        frames[part.name] = pd.DataFrame(part_rows)
    for part in ready:
        ids = {row["trial_id"] for row in per_part[part.name]}
        failure = [e for e in errors if e[0] in ids]
        try:
            check_failures(failure, len(ids), part.space.max_failed_fraction, frames[part.name], part.output)
        except SearchFailed as err:
            if part.name is not None:
                raise SearchFailed(f"{part.name}: {err}", err.frame) from None
            raise
    return frames


class SearchFailed(RuntimeError):
    """The search ran, but too many of its trials failed; its results are written. ``frame``
    holds them (failed trials with ``stop_reason: error``) for the caller to print."""

    def __init__(self, message: str, frame: Any = None):
        super().__init__(message)
        self.frame = frame


MAX_ERROR_KINDS = 5  # distinct kinds of error printed when a search fails


def trial_errors(grid) -> list[tuple[str, str, str]]:
    """``(trial id, kind, message)`` of every failed trial in Tune's result grid."""
    failed = []
    for result in grid:
        if result.error is not None:
            metrics = result.metrics or {}
            trial_id = metrics.get("trial_id") or Path(result.path).name.split("_")[-2]
            failed.append((trial_id, *error_summary(result.error)))
    return failed


def error_summary(error: Any) -> tuple[str, str]:
    """An error's kind (its exception type, unwrapped from Ray's ``RayTaskError``) and its
    message in one line: what a user needs to tell "my config is wrong" from "a node died"."""
    cause = getattr(error, "cause", None) or error
    if isinstance(cause, BaseException):
        kind, text = getattr(cause, "kind", None) or type(cause).__name__, str(cause)
    else:  # Tune's text trace, when the exception could not be pickled
        lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
        last = lines[-1] if lines else "unknown error"
        kind, _, text = last.partition(": ") if ": " in last else ("Error", "", last)
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("Traceback")]
    message = " / ".join(lines[:3]) or kind
    return kind, message if len(message) <= 400 else message[:397] + "..."


def check_failures(
    errors: list[tuple[str, str, str]], total: int, max_fraction: float, frame: Any = None, output: Path | None = None
) -> None:
    """Raise ``SearchFailed`` when every trial failed, or more than ``max_fraction`` of them:
    an exit status of 0 with an empty leaderboard reads as success to a script or a CI job."""
    if not errors or (len(errors) < total and len(errors) <= max_fraction * total):
        return
    first: dict[str, tuple[str, str, int]] = {}
    for trial_id, kind, message in errors:
        trial, text, count = first.get(kind, (trial_id, message, 0))
        first[kind] = (trial, text, count + 1)
    why = (
        "every trial failed"
        if len(errors) == total
        else f"{len(errors)} of {total} trials failed, more than max_failed_fraction={max_fraction:g} allows"
    )
    kinds = [
        f"  {kind} ({count} trial{'s' if count > 1 else ''}; first: trial {trial}): {text}"
        for kind, (trial, text, count) in list(first.items())[:MAX_ERROR_KINDS]
    ]
    if len(first) > MAX_ERROR_KINDS:
        kinds.append(f"  ... and {len(first) - MAX_ERROR_KINDS} more kinds (see each trial's error.txt under tune/)")
    where = f"; results (failed trials have stop_reason error) are in {output / 'results.parquet'}" if output else ""
    raise SearchFailed(f"the search failed: {why}{where}; first error of each kind:\n" + "\n".join(kinds), frame)


def _data_into_base(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``--set data.*`` goes into the base (a space never sets data), so the shard path made
    absolute below is the one trials read."""
    tree = yaml.safe_load(yaml.safe_dump(base))
    for key, value in overrides.items():
        if key == "data" or key.startswith("data."):
            set_dotted(tree, key, value)
    return tree


def _without_data(overrides: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in overrides.items() if not (k == "data" or k.startswith("data."))}


def _absolute_data_path(base: dict[str, Any]) -> dict[str, Any]:
    """Trials run in other processes (other working directories): make the shard path absolute."""
    from mmbalance.data.storage import absolute

    return {**base, "data": {**base["data"], "path": absolute(base["data"]["path"])}}
