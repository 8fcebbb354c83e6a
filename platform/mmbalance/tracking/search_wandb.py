"""W&B for searches: logged from the Tune driver, not from inside trials.

A scheduler ends a trial at any report, and a trial process that is ended while a W&B run
is open loses the tail of that run. So for a search, every result Tune receives is logged
by Ray's ``WandbLoggerCallback`` (a logging actor per trial that outlives the trial), one
run per trial (id = the experiment's stored id + the trial id, ``records.trial_run_id``)
grouped by the experiment, and the final scores — computed after the search — are added to
each trial's run as its summary.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

from mmbalance.config import TrackingConfig
from mmbalance.tracking.records import PART, RunRecord, experiment_group, experiment_id, trial_run_id
from mmbalance.tracking.wandb_tracker import WandbTracker, _quiet_exit_hooks, _say, _settings, resolve_mode

# Marks a result a restored trial reports again without training (tune/search.py ended_result):
# the trial's run already holds it, so it is not logged twice.
REPLAYED = "replayed"

# How long the end of a search (or a Ctrl-C) waits for the logging actors to finish their runs.
# Offline, a finish writes local files in well under a second; a run cut short keeps what it wrote.
FINISH_WAIT_S = 20

# Tune's bookkeeping keys carry nothing a reader of the run needs.
EXCLUDED_RESULTS = [
    "improved",
    "date",
    "hostname",
    "node_ip",
    "pid",
    "timestamp",
    "time_this_iter_s",
    "time_total_s",
    "time_since_restore",
    "iterations_since_restore",
    "checkpoint_dir_name",
]


KEY_VARIABLE = "WANDB_API_KEY"
KEY_FILE_NAME = "api_key"


def write_key_file(key: str) -> Path:
    """Write ``key`` where only this user can read it: a fresh directory (mode 0700, from
    ``mkdtemp``) holding one file created with mode 0600, so no other user of the node, and
    no Ray log, ever sees the key; the logging actors get only this path."""
    folder = Path(tempfile.mkdtemp(prefix="mmbalance-wandb-"))
    path = folder / KEY_FILE_NAME
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(key)
    return path


def remove_key_file(path: Path | str | None) -> None:
    """Delete a file from ``write_key_file`` and its directory; safe to call twice (it runs
    at the end of the search and again at exit, in case the search failed)."""
    if path is None:
        return
    path = Path(path)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    with contextlib.suppress(OSError):
        path.parent.rmdir()


def load_key_file(path: str | None) -> None:
    """In a logging actor: set the key from the driver's file in this process only. A file
    that is not there (a driver on another machine, e.g. Ray Client) leaves the node's own
    environment to provide the key, as docs/clusters.md describes."""
    if not path:
        return
    try:
        os.environ[KEY_VARIABLE] = Path(path).read_text().strip()
    except OSError as error:
        _say(f"wandb: cannot read the driver's key file ({type(error).__name__}); using this node's environment")


def driver_key_file(mode: str) -> Path | None:
    """The key file for this search's logging actors: only online runs need a key, and only a
    key set in the driver's environment needs passing (a ``wandb login`` key is in the user's
    ``~/.netrc``, which actors on this node read themselves)."""
    key = os.environ.get(KEY_VARIABLE)
    if mode != "online" or not key:
        return None
    path = write_key_file(key)
    atexit.register(remove_key_file, path)  # a failed or interrupted search still removes it
    return path


def logging_actor_options() -> dict[str, Any]:
    """Ray options for a logging actor: no CPU, on the driver's node, and no runtime_env.

    ``max_restarts=0`` (Ray's callback uses -1): a restarted actor would rerun its constructor
    from arguments Ray keeps in the object store, which Ray flags with a ``core_worker.cc``
    error line every search, and a restart would resume a W&B run whose queued results were
    lost anyway. The trade-off: if a logging actor dies, that trial's W&B run stops there; the
    trial itself, and its local records, carry on."""
    from ray.air.util.node import _force_on_current_node

    return {"num_cpus": 0, **_force_on_current_node(), "max_restarts": 0, "max_task_retries": 0}


def prepare_driver(cfg: TrackingConfig, out_dir: Path) -> str:
    """Resolve the mode for this search and ready the driver process for it; returns the mode.
    Also needed when a search is resumed: the restored callback sets itself up again."""
    mode, reason = resolve_mode(cfg)
    wandb_dir = Path(out_dir).resolve()
    if reason is not None:
        _say(
            f"wandb: {reason}; logging offline to {wandb_dir / 'wandb'} "
            f"(sync later with: wandb sync {wandb_dir / 'wandb'})"
        )
    if mode == "offline":
        # Ray's callback demands an API key unless WANDB_MODE says offline (this driver process only).
        os.environ["WANDB_MODE"] = "offline"
    return mode


def search_callback(
    cfg: TrackingConfig, out_dir: Path, trials_dir: "Path | dict[Any, Path]", groups: "dict[Any, str] | None" = None
):
    """The Tune callback logging every trial's reports, or ``None`` when tracking is disabled.
    Its runs' group is ``records.experiment_group``, made from the search's new id; a trial's
    run directory is ``trials_dir / <trial id>``. When one Tuner runs several searches
    (``tune/search.Part``), ``trials_dir`` and ``groups`` are per part, keyed by the part key in
    a trial's params."""
    trials = (
        {k: Path(v).resolve() for k, v in trials_dir.items()}
        if isinstance(trials_dir, dict)
        else {None: Path(trials_dir).resolve()}
    )
    mode = prepare_driver(cfg, out_dir)
    if mode == "disabled":
        return None
    wandb_dir = Path(out_dir).resolve()
    wandb_dir.mkdir(parents=True, exist_ok=True)
    experiment = experiment_id(
        out_dir, fresh=True
    )  # only a new search builds this callback; a resumed one unpickles it
    group = experiment_group(out_dir)
    groups = dict(groups or {None: group})

    def part_of(trial) -> Any:
        return trial.config.get("params", {}).get(PART)

    import ray
    from ray.air.integrations.wandb import WandbLoggerCallback, _WandbLoggingActor
    from ray.util.queue import Queue

    class QuietLoggingActor(_WandbLoggingActor):
        """Ray's logging actor with wandb's exit hooks muted (see ``_quiet_exit_hooks``): the
        actor is ended right after its run finishes, and the hooks' failure is only noise."""

        def __init__(self, *args, key_file: str | None = None, **kwargs):
            load_key_file(key_file)  # before wandb.init: the key is set in this process only
            # Ray's callback sets id = Tune's trial id, unique only within this experiment.
            super().__init__(*args, **{**kwargs, "id": trial_run_id(experiment, kwargs["id"])})

        def run(self):
            with _quiet_exit_hooks():
                return super().run()

    class Callback(WandbLoggerCallback):
        _logger_actor_cls = QuietLoggingActor
        _key_file: Path | None = None

        def setup(self, *args, **kwargs):
            super().setup(*args, **kwargs)
            remove_key_file(self._key_file)  # a restored search sets itself up again
            self._key_file = driver_key_file(self.kwargs.get("mode", "offline"))

        def _start_logging_actor(self, trial, exclude_results, **wandb_init_kwargs):
            """Ray's version, less the runtime_env that would carry the key into Ray's logs."""
            if trial in self._trial_logging_futures:  # a restarted trial keeps its actor
                return
            if not self._remote_logger_class:
                self._remote_logger_class = ray.remote(**logging_actor_options())(self._logger_actor_cls)
            # The queue actor is Ray's, as Ray's callback makes it: it holds no key.
            queue_options = {**logging_actor_options(), "max_restarts": -1, "max_task_retries": -1}
            self._trial_queues[trial] = Queue(actor_options=queue_options)
            wandb_init_kwargs = {**wandb_init_kwargs, "group": groups.get(part_of(trial), group)}
            actor = self._remote_logger_class.remote(
                logdir=trial.local_path,
                queue=self._trial_queues[trial],
                exclude=exclude_results,
                to_config=self.AUTO_CONFIG_KEYS,
                key_file=str(self._key_file) if self._key_file else None,
                **wandb_init_kwargs,
            )
            self._trial_logging_actors[trial] = actor
            future = actor.run.remote()
            self._trial_logging_futures[trial] = future
            self._logging_future_to_trial[future] = trial

        def log_trial_result(self, iteration, trial, result):
            """Each epoch once. A trial restored after a Ctrl-C reports again the epochs its run
            directory has past Tune's checkpoint (``Session.report_missed``); which of those this
            driver had logged is in the trial's record, since Tune's saved state may predate them."""
            if result.get(REPLAYED):
                return
            record = RunRecord(trials[part_of(trial)] / trial.trial_id)
            epoch = result.get("epoch")
            if isinstance(epoch, int) and epoch <= record.last_logged_epoch():
                return
            super().log_trial_result(iteration, trial, result)
            if isinstance(epoch, int):
                record.mark_logged(epoch)

        def on_experiment_end(self, trials, **info):
            # Ray waits up to upload_timeout (30 min by default) for every logging actor, and the
            # actor of a trial that a SIGINT left unfinished never gets its end signal: Ctrl-C then
            # hangs. End every actor, wait a bounded time, then kill what is left.
            import ray

            for trial in list(self._trial_logging_futures):
                self._signal_logging_actor_stop(trial=trial)
            futures = list(self._trial_logging_futures.values())
            late = ray.wait(futures, num_returns=len(futures), timeout=FINISH_WAIT_S)[1] if futures else []
            self._cleanup_logging_actors(timeout=0, kill_on_timeout=True)
            if late:
                _say(
                    f"wandb: {len(late)} trial run(s) did not finish within {FINISH_WAIT_S} s and were stopped; "
                    f"what they logged is in {wandb_dir / 'wandb'}"
                )
            remove_key_file(self._key_file)  # every actor has read it by now; atexit covers a failure
            self._key_file = None

    # Ray's callback passes reinit=True, which wandb 0.31 deprecates with a warning per trial; a
    # keyword given here replaces it. "finish_previous" is what True meant. Not "create_new": that
    # leaves the module-level run unset, and Ray's actor logs through wandb.log / wandb.config, so
    # every result would be dropped (tests/test_tune.py reads the logged history back).
    return Callback(
        project=cfg.project,
        entity=cfg.entity,
        group=group,
        excludes=EXCLUDED_RESULTS,
        dir=str(wandb_dir),
        mode=mode,
        settings=_settings(mode),
        reinit="finish_previous",
    )


def record_scores(cfg: TrackingConfig, group: str, out_dir: Path, trial_id: str, score: dict[str, Any]) -> None:
    """Add a trial's final scores (test, robustness) to its W&B run's summary: the run the
    callback's actor logged, so the same id and ``resume``."""
    if cfg.wandb == "disabled":
        return
    run_id = trial_run_id(experiment_id(out_dir), trial_id)
    tracker = WandbTracker.start(
        cfg,
        run_dir=Path(out_dir),
        run_id=run_id,
        run_name=trial_id,
        group=group,
        config={},
        job_type="score",
        resume=True,
    )
    with tracker:
        tracker.summary(score)
