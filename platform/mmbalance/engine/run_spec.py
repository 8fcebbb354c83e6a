"""``RunSpec``: everything one training run needs besides its data, typed and built once.

Each entry point (``mmbalance train``, a Tune trial, the Train driver, a test) builds one
``RunSpec``; the loop reads nothing else. It travels to Ray Train workers inside
``train_loop_config`` (pickled), so the recipe is validated once, where the run is started,
and never turned back into a dict on the way.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

from mmbalance.config import Recipe, Where, validate_recipe

# Test-only fault injection (``engine/session.fault_hook``, docs/faults.md): kill or raise in
# one worker at a given (epoch, step).
Fault = Mapping[str, Any]


@dataclass(frozen=True)
class RunSpec:
    """One training run.

    ``where``: ``local`` trains in this process; ``tune`` is a Tune trial training in its own
    process (reports go to ``ray.tune``); ``train`` is one rank of a ``TorchTrainer``.
    ``shards_checked``: the starter already read every shard byte against the manifest's
    checksums, so the loop checks only the schema (a search's trials and every Train rank would
    otherwise re-hash the whole dataset). ``train_cached``: the Train driver decided the train
    split fits Ray's object store (``engine/ray_data.train_fits_in_cache``)."""

    recipe: Recipe
    output: Path
    where: Where = "local"
    resume: bool = False
    verbose: bool = True
    fault: Fault | None = None
    shards_checked: bool = False
    train_cached: bool = False
    # Wall-clock marks for the verbose start-up line (engine/console.startup_line): when the
    # command started, and when Ray was up (a run on Ray Train only).
    launched_at: float | None = None
    ray_ready_at: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.recipe, Recipe):
            raise TypeError(
                f"RunSpec.recipe must be a validated Recipe, not {type(self.recipe).__name__} "
                "(use RunSpec.of for a recipe tree)"
            )
        object.__setattr__(self, "output", Path(self.output))

    @classmethod
    def of(cls, recipe: Recipe | Mapping[str, Any], output: str | Path, **fields: Any) -> RunSpec:
        """A spec from a recipe or a recipe tree (validated here, naming the bad key)."""
        if not isinstance(recipe, Recipe):
            recipe = validate_recipe(dict(recipe))
        return cls(recipe=recipe, output=Path(output), **fields)

    def on_ray(self) -> bool:
        """Ray may start this run again in the same directory before any checkpoint exists (a
        worker-group restart, a trial retry): that is still the same run."""
        return self.where != "local"

    def but(self, **changes: Any) -> RunSpec:
        return replace(self, **changes)
