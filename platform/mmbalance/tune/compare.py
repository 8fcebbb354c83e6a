"""``mmbalance compare``: run a study (``tune/study.py``) on Ray Tune.

Two phases, each one Tuner for every method (``tune/search.run_searches``): first every
method's search on the study's budget (each method has its own ASHA, so its rungs compare its
trials with each other, never with another method's), then each method's best configuration
by mean best val over the search seeds (test is never read) trained again on every study seed
(FIFO). A study inherits the searches' scoring phase, W&B runs, failure rules and Ctrl-C /
``--resume`` behaviour: a finished phase is read back from its ``results.parquet`` files, an
unfinished one is resumed.

Layout: ``<out>/methods/<method>/{search,final}/`` (each with its ``trials/`` and results, as a
search directory), ``<out>/stages/{search,final}/`` (each phase's Tuner state and W&B runs),
and at the top ``results.parquet`` (every trial of every phase, with ``method`` and ``phase``
columns) and ``study.json`` (``reports/study_summary.py``). W&B groups a study's runs by
method (``records.experiment_group``).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from mmbalance.layout import StudyDir
from mmbalance.tune.search import Part, SearchRun, run_searches
from mmbalance.tune.study import Study, final_space, method_base, search_space, validate_study


def best_configuration(frame, keys: list[str]) -> tuple[dict[str, Any], float]:
    """The searched values with the highest mean best val over the search seeds, and that
    mean. Failed trials (no best val) never win; ties go to the first configuration."""
    usable = frame.dropna(subset=["best_val"])
    if usable.empty:
        raise ValueError("no search trial has a val score")
    if not keys:
        return {}, float(usable["best_val"].mean())
    means = usable.groupby(keys, sort=False, dropna=False)["best_val"].mean()
    best = means.idxmax()
    values = best if isinstance(best, tuple) else (best,)
    return {k: _plain(v) for k, v in zip(keys, values)}, float(means.max())


def _plain(value: Any) -> Any:
    """numpy scalars from pandas back to YAML-safe Python values."""
    return value.item() if hasattr(value, "item") else value


def run_study(
    study: Study,
    base: dict[str, Any],
    output: Path,
    run: SearchRun = SearchRun(),
    *,
    say: Callable[[str], None] = print,
):
    """Run every method's search, then every method's final runs; write ``results.parquet``.
    Returns ``(frame, chosen)``: every trial's row (``method``, ``phase``), and per method the
    configuration the search chose on val and its mean best val. The statistics over the final
    runs (``study.json``) are the reports' job (``reports/study_summary.py``)."""
    import pandas as pd

    from mmbalance.tracking.records import experiment_id

    methods = validate_study(study, base, run.overrides)
    output = Path(output).resolve()
    experiment_id(output, fresh=not run.resume)  # the study's own id: its methods' W&B groups carry it
    spaces = {name: search_space(study, method) for name, method in methods.items()}
    trials = sum(space.trial_count() for space in spaces.values())
    say(
        f"phase 1/2, search: {len(methods)} methods in one Tuner, {trials} trials "
        f"({trials // len(methods)} per method, each method's ASHA separate): {', '.join(methods)}"
    )
    searched = _stage(
        "search",
        {name: (spaces[name], method_base(base, method)) for name, method in methods.items()},
        output,
        run,
    )
    chosen, finals = {}, {}
    for name, method in methods.items():
        best, best_val = best_configuration(searched[name], list(spaces[name].space))
        chosen[name] = {"configuration": best, "search_best_val": best_val}
        described = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best.items())
        say(f"  {name}: best on val {best_val:.4f} ({described or 'nothing searched'})")
        finals[name] = (final_space(study, method, best), method_base(base, method))
    say(
        f"phase 2/2, final runs: each method's best configuration on {len(study.seeds)} seeds "
        f"({len(methods) * len(study.seeds)} runs in one Tuner)"
    )
    final = _stage("final", finals, output, run)
    frames = [
        frame
        for name in methods
        for frame in (
            searched[name].assign(method=name, phase="search"),
            final[name].assign(method=name, phase="final"),
        )
    ]
    frame = pd.concat(frames, ignore_index=True)
    _write_frame(frame, output)
    return frame, chosen


def _stage(phase: str, parts: dict[str, tuple[Any, dict[str, Any]]], output: Path, run: SearchRun) -> dict[str, Any]:
    """One phase of every method in one Tuner (``search.Part``): its state and W&B runs in
    ``<out>/stages/<phase>``, each method's trials and results in ``<out>/methods/<m>/<phase>``.
    A phase every method finished earlier (an interrupted study) is read back; an unfinished
    one is resumed."""
    import pandas as pd

    study = StudyDir(output)
    directories = {name: study.method_stage(name, phase) for name in parts}
    if all(d.results.is_file() for d in directories.values()):
        return {name: pd.read_parquet(d.results) for name, d in directories.items()}
    stage = study.stage_state(phase)
    storage = f"{run.storage.rstrip('/')}/{StudyDir.STAGES}/{phase}" if run.storage else None
    return run_searches(
        [Part(name, space, base, directories[name].path) for name, (space, base) in parts.items()],
        stage.path,
        replace(run, resume=run.resume and stage.tune_state.exists(), storage=storage),
    )


def _write_frame(frame, output: Path) -> None:
    results = StudyDir(output).results
    frame.to_parquet(results, index=False)
    frame.to_csv(results.with_suffix(".csv"), index=False)
