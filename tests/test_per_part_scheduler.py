"""One Tuner, several searches: each part's ASHA compares its own trials only (a study's
budget rule). Driven with fake trials, no Tune run."""

from __future__ import annotations

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from mmbalance.tracking.records import PART
from mmbalance.tune.per_part_scheduler import PerPartScheduler


class FakeTrial:
    def __init__(self, trial_id: str, part: str):
        self.trial_id, self.config = trial_id, {"params": {PART: part, "seed": 0}}


def _asha() -> ASHAScheduler:
    return ASHAScheduler(time_attr="epochs_done", max_t=4, grace_period=1, reduction_factor=2)


def _report(scheduler, trial, value: float) -> str:
    return scheduler.on_trial_result(None, trial, {"epochs_done": 1, "val/acc_fused": value})


def _run(scheduler) -> str:
    """Two strong trials of part a reach rung 1, then part b's first (weak) trial does."""
    scheduler.set_search_properties("val/acc_fused", "max")
    trials = [FakeTrial("t0", "a"), FakeTrial("t1", "a"), FakeTrial("t2", "b")]
    for trial in trials:
        scheduler.on_trial_add(None, trial)
    _report(scheduler, trials[0], 0.9)
    _report(scheduler, trials[1], 0.8)
    return _report(scheduler, trials[2], 0.1)


def test_a_part_is_never_cut_by_another_parts_trials():
    assert _run(_asha()) == TrialScheduler.STOP  # one shared ASHA: b's trial falls below a's rung
    assert _run(PerPartScheduler({"a": _asha(), "b": _asha()}, PART)) == TrialScheduler.CONTINUE


def test_within_a_part_asha_still_stops_the_weak_trial():
    scheduler = PerPartScheduler({"a": _asha(), "b": FIFOScheduler()}, PART)
    scheduler.set_search_properties("val/acc_fused", "max")
    a = [FakeTrial(f"t{i}", "a") for i in range(3)]
    for trial in a:
        scheduler.on_trial_add(None, trial)
    _report(scheduler, a[0], 0.9)
    _report(scheduler, a[1], 0.8)
    assert _report(scheduler, a[2], 0.1) == TrialScheduler.STOP
    b = FakeTrial("t9", "b")
    scheduler.on_trial_add(None, b)
    assert _report(scheduler, b, 0.0) == TrialScheduler.CONTINUE  # FIFO part: never stopped early
    scheduler.on_trial_complete(None, a[0], {"epochs_done": 4, "val/acc_fused": 0.95})
    scheduler.on_trial_remove(None, a[1])


def test_one_grid_holds_every_parts_trials_tagged_with_their_part(tmp_path):
    from mmbalance.tune.search import Part, tune_param_space
    from mmbalance.tune.space import SearchSpace

    a = SearchSpace.model_validate(
        {"space": {"optim.lr": {"loguniform": [0.001, 0.01]}}, "samples": 2, "seeds": [0, 1]}
    )
    b = SearchSpace.model_validate({"space": {"objective.lam": {"choice": [0.1, 1.0]}}, "samples": 3, "seeds": [0]})
    grid = tune_param_space([Part("a", a, {}, tmp_path / "a"), Part("b", b, {}, tmp_path / "b")])["params"]
    configs = grid["grid_search"]
    assert [c[PART] for c in configs] == ["a"] * 4 + ["b"] * 3
    assert [{k: v for k, v in c.items() if k != PART} for c in configs] == a.configurations() + b.configurations()
    plain = tune_param_space([Part(None, a, {}, tmp_path)])["params"]["grid_search"]
    assert plain == a.configurations()  # a plain search's trials carry no part key
