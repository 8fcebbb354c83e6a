"""One Tune scheduler per search when one Tuner runs several (``search.run_searches``).

A comparison study runs every method's search in a single Tuner, to pay for one Tuner start,
one set of trial processes and one scoring round instead of one per method. Its budget rule
still holds: ASHA compares a method's trials with each other only. This scheduler keeps an
independent scheduler (ASHA or FIFO, with its own rungs) per part and hands each trial's
events to its part's scheduler, named by the part key in the trial's params. Trials start in
the order Tune created them, as with Tune's FIFO scheduler.
"""

from __future__ import annotations

from typing import Any

from ray.tune.schedulers import FIFOScheduler, TrialScheduler


class PerPartScheduler(FIFOScheduler):
    def __init__(self, schedulers: dict[Any, TrialScheduler], part_key: str):
        super().__init__()
        self.schedulers, self.part_key = schedulers, part_key

    def _of(self, trial) -> TrialScheduler:
        return self.schedulers[trial.config["params"].get(self.part_key)]

    @property
    def supports_buffered_results(self) -> bool:
        return all(s.supports_buffered_results for s in self.schedulers.values())

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return all([s.set_search_properties(metric, mode, **spec) for s in self.schedulers.values()])

    def on_trial_add(self, tune_controller, trial) -> None:
        self._of(trial).on_trial_add(tune_controller, trial)

    def on_trial_error(self, tune_controller, trial) -> None:
        self._of(trial).on_trial_error(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result) -> str:
        return self._of(trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial, result) -> None:
        self._of(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial) -> None:
        self._of(trial).on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return "\n".join(f"{name}: {s.debug_string()}" for name, s in self.schedulers.items())
