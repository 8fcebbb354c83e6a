"""``mmbalance tune`` (one search space) and ``mmbalance compare`` (an equal-budget study).

Both validate everything first (every trial's recipe against the space or study, equal
budgets) and exit 2 before Ray starts and before the output is touched. ``--set`` stays apart
from the recipe file so it can beat the space's ``set:`` (the precedence table in README.md).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmbalance import outputs, shipped
from mmbalance.config import ConfigError, parse_override
from mmbalance.data import storage
from mmbalance.layout import SearchDir, StudyDir


@dataclass(frozen=True)
class SearchOptions:
    """What ``tune`` and ``compare`` share: trial resources, where results go, resume, Ray, W&B."""

    overrides: list[str] = field(default_factory=list)  # dotted KEY=VALUE for every trial's recipe
    max_concurrent: int | None = None
    workers: int | None = None
    gpus_per_worker: float | None = None
    output: str | None = None
    storage: str | None = None
    resume: bool = False
    overwrite: bool = False
    address: str | None = None
    verbose: bool = False
    command: str = "tune"  # how error messages name the command

    def resources(self) -> dict[str, Any]:
        return {
            k: v
            for k, v in {
                "max_concurrent": self.max_concurrent,
                "workers": self.workers,
                "gpus_per_worker": self.gpus_per_worker,
            }.items()
            if v is not None
        }

    def search_run(self, overrides: dict[str, Any]):
        """The ``SearchRun`` these options ask for, with the parsed ``--set`` keys."""
        from mmbalance.tune.search import SearchRun

        return SearchRun(
            resume=self.resume, storage=self.storage, address=self.address, verbose=self.verbose, overrides=overrides
        )


def tune(space: str, recipe: str, options: SearchOptions, *, samples: int | None = None) -> None:
    from mmbalance.config import load_recipe_dict
    from mmbalance.tune.search import SearchFailed, run_search
    from mmbalance.tune.space import load_space, validate_against

    space_file = shipped.resolve("search space", space)
    loaded = load_space(space_file)
    updates = {**({"samples": samples} if samples is not None else {}), **options.resources()}
    loaded = loaded.model_validate({**loaded.model_dump(), **updates})
    base = load_recipe_dict(shipped.resolve("recipe", recipe))
    overrides = dict(parse_override(item) for item in options.overrides)
    validate_against(loaded, base, overrides)  # exit 2 here, before Ray and before the output is touched
    for key in [k for k in overrides if k in loaded.set]:
        print(f"note: --set {key}={overrides[key]} beats the space's set: {key}: {loaded.set[key]}")
    output = SearchDir(options.output or Path("runs") / f"tune-{space_file.stem}")
    if not options.resume and output.holds_search() and not options.overwrite:
        raise ConfigError(
            f"{output.path} already holds a search; pass --resume to finish it or --overwrite to replace it"
        )
    _claim(output.path, outputs.SEARCH, options, base, overrides)
    print(
        f"search {space_file}: {loaded.trial_count()} trials, scheduler {loaded.scheduler.name}, "
        f"up to {loaded.max_concurrent} at once, {loaded.workers or 'in-process'} worker(s) per trial -> {output.path}"
    )
    try:
        frame = run_search(loaded, base, output.path, options.search_run(overrides))
    except SearchFailed as err:  # the search ran: exit 1 (2 is for what was refused before it ran)
        if err.frame is not None:
            _print_search(err.frame, loaded, output)
        print(f"mmbalance {options.command}: error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    _print_search(frame, loaded, output)


def compare(
    study: str, recipe: str, options: SearchOptions, *, trials: int | None = None, seeds: list[int] | None = None
) -> dict:
    """Every method's search, then every method's best on the study's seeds; prints the verdicts
    and returns the summary (``study.json``)."""
    from mmbalance.config import load_recipe_dict
    from mmbalance.reports.study_summary import summarize, write_summary
    from mmbalance.reports.verdicts import format_verdicts
    from mmbalance.tune.compare import run_study
    from mmbalance.tune.search import SearchFailed
    from mmbalance.tune.study import load_study, validate_study

    study_file = shipped.resolve("study", study)
    loaded = load_study(study_file)
    updates = options.resources()
    if seeds:
        updates["seeds"] = list(seeds)
    if trials:
        updates["budget"] = {**loaded.budget.model_dump(), "trials": trials}
    loaded = loaded.model_validate({**loaded.model_dump(), **updates})
    base = load_recipe_dict(shipped.resolve("recipe", recipe))
    overrides = dict(parse_override(item) for item in options.overrides)
    methods = validate_study(loaded, base, overrides)  # exit 2 here, before Ray
    output = StudyDir(options.output or Path("runs") / f"compare-{study_file.stem}")
    if not options.resume and output.holds_study() and not options.overwrite:
        raise ConfigError(
            f"{output.path} already holds a study; pass --resume to finish it or --overwrite to replace it"
        )
    _claim(output.path, outputs.STUDY, options, base, overrides)
    per_method = loaded.budget.trials * len(loaded.budget.seeds)
    print(
        f"study {study_file}: {len(methods)} methods ({', '.join(methods)}), each: {per_method} search trials "
        f"({loaded.budget.scheduler.name}), then its best on val trained on {len(loaded.seeds)} seeds -> {output.path}",
        flush=True,
    )
    try:
        frame, chosen = run_study(
            loaded, base, output.path, options.search_run(overrides), say=lambda line: print(line, flush=True)
        )
    except SearchFailed as err:
        print(f"mmbalance {options.command}: error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    summary = summarize(frame, loaded, methods, chosen)
    write_summary(summary, output.path)
    print()
    print(format_verdicts(summary))
    print(f"\nstudy: {output.summary}; results: {output.results}; runs: {output.methods}/<method>/{{search,final}}")
    return summary


def _claim(output: Path, layout: outputs.Layout, options: SearchOptions, base: dict, overrides: dict) -> None:
    """--overwrite replaces only what a search (or study) wrote, never the data it reads."""
    if not options.resume and options.overwrite and output.exists():
        data = overrides.get("data.path", (base.get("data") or {}).get("path"))
        outputs.clear(output, layout, storage.local_paths(data) if isinstance(data, str) else [])
    outputs.claim(output, layout)


def _print_search(frame, space, output: SearchDir) -> None:
    from mmbalance.reports.tables import format_leaderboard, leaderboard

    keys = list(space.space)
    stopped = int((frame["stop_reason"] == "stopped_early").sum())
    failed = int((frame["stop_reason"] == "error").sum())
    print(
        f"\n{len(frame)} trials ({stopped} stopped early by {space.scheduler.name}"
        + (f", {failed} failed)" if failed else ")")
    )
    print(format_leaderboard(leaderboard(frame, keys), keys))
    print(
        f"\nresults: {output.results} (also .csv, .json); trial runs: {output.trials}/<trial id>; "
        f"make the report with: mmbalance report {output.path}"
    )
    wandb_dir = output.path / "wandb"
    if wandb_dir.is_dir():
        print(f"W&B runs: {wandb_dir} (offline runs upload with: wandb sync {wandb_dir}/offline-run-*)")
