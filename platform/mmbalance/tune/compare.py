"""``mmbalance compare``: run a study (``tune/study.py``) on Ray Tune, method by method.

For each method, in the study's order: a search on the study's budget (its own Tuner, so
ASHA's rungs compare a method's trials with each other, never with another method's), then
its best configuration by mean best val over the search seeds (test is never read), trained
again on every study seed (a second Tuner, FIFO). Both are ordinary ``tune/search.run_search``
experiments, so a study inherits their scoring phase, W&B runs, failure rules and Ctrl-C /
``--resume`` behaviour: a finished phase is read back from its ``results.parquet``, an
unfinished one is resumed.

Layout: ``<out>/methods/<method>/{search,final}/`` (each a search directory), and at the top
``results.parquet`` (every trial of every phase, with ``method`` and ``phase`` columns) and
``study.json`` (``reports/study_summary.py``). W&B groups a study's runs by method
(``records.experiment_group``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from mmbalance.tracking.records import STUDY_METHODS_DIR
from mmbalance.tune.study import Study, final_space, method_base, search_space, validate_study

METHODS_DIR = STUDY_METHODS_DIR


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


def run_study(study: Study, base: dict[str, Any], output: Path, *, resume: bool = False, storage: str | None = None,
              address: str | None = None, verbose: bool = False, overrides: dict[str, Any] | None = None,
              say: Callable[[str], None] = print):
    """Run every method's search and final runs; write ``results.parquet`` and ``study.json``.
    Returns ``(frame, summary)``."""
    import pandas as pd

    from mmbalance.reports.study_summary import summarize, write_summary
    from mmbalance.tune.search import run_search

    from mmbalance.tracking.records import experiment_id

    methods = validate_study(study, base, overrides)
    output = Path(output).resolve()
    experiment_id(output, fresh=not resume)  # the study's own id: its methods' W&B groups carry it
    frames, chosen = [], {}
    for index, (name, method) in enumerate(methods.items(), start=1):
        where = output / METHODS_DIR / name
        space = search_space(study, method)
        keys = list(space.space)
        say(f"[{index}/{len(methods)}] {name}: search, {space.trial_count()} trials")
        searched = _phase(run_search, space, method_base(base, method), where / "search", resume, storage, address,
                          verbose, overrides)
        best, best_val = best_configuration(searched, keys)
        chosen[name] = {"configuration": best, "search_best_val": best_val}
        described = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best.items())
        say(f"[{index}/{len(methods)}] {name}: best on val {best_val:.4f} ({described or 'nothing searched'}); "
            f"training it on {len(study.seeds)} seeds")
        final = _phase(run_search, final_space(study, method, best), method_base(base, method), where / "final",
                       resume, storage, address, verbose, overrides)
        frames += [searched.assign(method=name, phase="search"), final.assign(method=name, phase="final")]
    frame = pd.concat(frames, ignore_index=True)
    _write_frame(frame, output)
    summary = summarize(frame, study, methods, chosen)
    write_summary(summary, output)
    return frame, summary


def _phase(run_search, space, base, directory: Path, resume: bool, storage, address, verbose, overrides):
    """One search, or its results when an earlier (interrupted) study already finished it."""
    import pandas as pd

    if (directory / "results.parquet").is_file():
        return pd.read_parquet(directory / "results.parquet")
    in_progress = resume and (directory / "tune").exists()
    phase_storage = f"{storage.rstrip('/')}/{directory.parent.name}/{directory.name}" if storage else None
    return run_search(space, base, directory, resume=in_progress, storage=phase_storage, address=address,
                      verbose=verbose, overrides=overrides)


def _write_frame(frame, output: Path) -> None:
    frame.to_parquet(output / "results.parquet", index=False)
    frame.to_csv(output / "results.csv", index=False)
