"""W&B for searches: logged from the Tune driver, not from inside trials.

A scheduler ends a trial at any report, and a trial process that is ended while a W&B run
is open loses the tail of that run. So for a search, every result Tune receives is logged
by Ray's ``WandbLoggerCallback`` (a logging actor per trial that outlives the trial), one
run per trial (id = trial id) grouped by the experiment, and the final scores — computed
after the search — are added to each trial's run as its summary.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mmbalance.tracking.wandb_tracker import (TrackingConfig, WandbTracker, _quiet_exit_hooks, _say, _settings,
                                             resolve_mode)

# Marks a result a restored trial reports again without training (tune/search.py ended_result):
# the trial's run already holds it, so it is not logged twice.
REPLAYED = "replayed"

# Tune's bookkeeping keys carry nothing a reader of the run needs.
EXCLUDED_RESULTS = ["improved", "date", "hostname", "node_ip", "pid", "timestamp", "time_this_iter_s",
                    "time_total_s", "time_since_restore", "iterations_since_restore", "checkpoint_dir_name"]


def prepare_driver(cfg: TrackingConfig, out_dir: Path) -> str:
    """Resolve the mode for this search and ready the driver process for it; returns the mode.
    Also needed when a search is resumed: the restored callback sets itself up again."""
    mode, reason = resolve_mode(cfg)
    wandb_dir = Path(out_dir).resolve()
    if reason is not None:
        _say(f"wandb: {reason}; logging offline to {wandb_dir / 'wandb'} (sync later with: wandb sync {wandb_dir / 'wandb'})")
    if mode == "offline":
        # Ray's callback demands an API key unless WANDB_MODE says offline (this driver process only).
        os.environ["WANDB_MODE"] = "offline"
    return mode


def search_callback(cfg: TrackingConfig, group: str, out_dir: Path):
    """The Tune callback logging every trial's reports, or ``None`` when tracking is disabled."""
    mode = prepare_driver(cfg, out_dir)
    if mode == "disabled":
        return None
    wandb_dir = Path(out_dir).resolve()
    wandb_dir.mkdir(parents=True, exist_ok=True)
    from ray.air.integrations.wandb import WandbLoggerCallback, _WandbLoggingActor

    class QuietLoggingActor(_WandbLoggingActor):
        """Ray's logging actor with wandb's exit hooks muted (see ``_quiet_exit_hooks``): the
        actor is ended right after its run finishes, and the hooks' failure is only noise."""

        def run(self):
            with _quiet_exit_hooks():
                return super().run()

    class Callback(WandbLoggerCallback):
        _logger_actor_cls = QuietLoggingActor

        def log_trial_result(self, iteration, trial, result):
            if not result.get(REPLAYED):
                super().log_trial_result(iteration, trial, result)

    # Ray's callback passes reinit=True, which wandb 0.31 deprecates with a warning per trial; a
    # keyword given here replaces it. "finish_previous" is what True meant. Not "create_new": that
    # leaves the module-level run unset, and Ray's actor logs through wandb.log / wandb.config, so
    # every result would be dropped (tests/test_tune.py reads the logged history back).
    return Callback(project=cfg.project, entity=cfg.entity, group=group, excludes=EXCLUDED_RESULTS,
                    dir=str(wandb_dir), mode=mode, settings=_settings(mode), reinit="finish_previous")


def record_scores(cfg: TrackingConfig, group: str, out_dir: Path, trial_id: str, score: dict[str, Any]) -> None:
    """Add a trial's final scores (test, robustness) to its W&B run's summary."""
    tracker = WandbTracker.start(cfg, run_dir=Path(out_dir), run_id=trial_id, run_name=trial_id, group=group,
                                 config={}, job_type="score")
    with tracker:
        tracker.summary(score)
