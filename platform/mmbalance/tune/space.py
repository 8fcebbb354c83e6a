"""Search spaces: which recipe keys to search, how, over which seeds, with which scheduler.

A search space names recipe keys (``objective.lam``), or bundles of them under an undotted
label (``method: {grid: [{objective.name: aug, objective.check_every_epochs: 1}, ...]}``), and never a
recipe, so any space can be
combined with any recipe. ``validate_against`` checks the combination before Ray starts:
every searched or fixed key must exist in the recipe (with the objective the trials will
use), every categorical value and both ends of every range must be valid values, and
ASHA's grace period must cover the longest warm-up, since before warm-up ends the
objectives behave like the baseline and early rungs cannot tell them apart.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mmbalance.config import ConfigError, Recipe, read_yaml_mapping, set_dotted, validate_recipe
from mmbalance.objectives import objective_params_model, objective_requirements

DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Distribution(_Strict):
    """Exactly one of: ``choice: [..]``, ``grid: [..]``, ``uniform: [lo, hi]``,
    ``loguniform: [lo, hi]`` (lo > 0), ``randint: [lo, hi]`` (hi exclusive, as in Tune)."""

    choice: list[Any] | None = None
    grid: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> "Distribution":
        given = [name for name in DISTRIBUTIONS if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {list(DISTRIBUTIONS)}, got {given or 'none'}")
        kind = given[0]
        value = getattr(self, kind)
        if kind in ("choice", "grid") and not value:
            raise ValueError(f"{kind} needs at least one value")
        if kind in ("uniform", "loguniform", "randint") and not value[0] < value[1]:
            raise ValueError(f"{kind} needs lo < hi, got {list(value)}")
        if kind == "loguniform" and value[0] <= 0:
            raise ValueError(f"loguniform needs lo > 0, got {value[0]}")
        return self

    @property
    def kind(self) -> str:
        return next(name for name in DISTRIBUTIONS if getattr(self, name) is not None)

    def draw(self, rng: np.random.Generator) -> Any:
        kind, value = self.kind, getattr(self, self.kind)
        if kind == "choice":
            return value[int(rng.integers(len(value)))]
        if kind == "uniform":
            return float(rng.uniform(*value))
        if kind == "loguniform":
            return float(np.exp(rng.uniform(np.log(value[0]), np.log(value[1]))))
        return int(rng.integers(*value))  # randint; grids are expanded, not drawn

    def probe_values(self) -> list[Any]:
        """Values that must all be valid recipe values: every category, both range ends."""
        value = getattr(self, self.kind)
        if self.kind == "randint":
            return [value[0], value[1] - 1]
        return list(value)


class SchedulerConfig(_Strict):
    name: Literal["asha", "fifo"] = "asha"
    grace_period: int = Field(1, ge=1, description="epochs every trial runs before ASHA may stop it")
    reduction_factor: float = Field(3.0, gt=1.0)
    max_t: int | None = Field(None, ge=1, description="epochs; defaults to the recipe's schedule.epochs")


class SearchSpace(_Strict):
    space: dict[str, Distribution] = Field(default_factory=dict)
    set: dict[str, Any] = Field(default_factory=dict, description="recipe keys fixed for every trial")
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    samples: int = Field(1, ge=1, description="random draws, each crossed with every grid value and seed")
    sample_seed: int = Field(0, description="seeds the random draws, so a space always yields the same trials")
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    metric: Literal["val/acc_fused"] = "val/acc_fused"  # selection never reads test
    mode: Literal["max"] = "max"
    max_concurrent: int = Field(1, ge=1)
    workers: int = Field(0, ge=0, description="per trial: 0 trains inside the trial process; N >= 1 runs a TorchTrainer with N workers")
    gpus_per_worker: float = Field(0.0, ge=0.0)

    @model_validator(mode="after")
    def _keys_are_dotted(self) -> "SearchSpace":
        for key in [*self.space, *self.set]:
            if key == "seed" or key.startswith("data."):
                raise ValueError(f"{key}: seeds go in `seeds`, data in the recipe; a search space never sets them")
            if not all(key.split(".")):
                raise ValueError(f"{key}: not a dotted recipe key")
        for key, dist in self.space.items():
            if "." not in key and not all(isinstance(v, dict) for v in dist.probe_values()):
                raise ValueError(f"{key}: a key without a dot is a bundle; every value must map recipe keys to values "
                                 "(e.g. {objective.name: aug, objective.check_every_epochs: 1})")
        return self

    def trial_count(self) -> int:
        return len(self.configurations())

    def configurations(self) -> list[dict[str, Any]]:
        """Every trial's searched values and seed: ``samples`` random draws (seeded by
        ``sample_seed``) x every grid combination x every seed, in a seeded random order; a
        draw is shared by its seeds."""
        rng = np.random.default_rng(self.sample_seed)
        random_keys = [k for k, d in self.space.items() if d.kind != "grid"]
        grid_keys = [k for k, d in self.space.items() if d.kind == "grid"]
        configs = []
        for _ in range(self.samples):
            draw = {k: self.space[k].draw(rng) for k in random_keys}
            for combo in itertools.product(*(self.space[k].grid for k in grid_keys)):
                for seed in self.seeds:
                    configs.append({**draw, **dict(zip(grid_keys, combo)), "seed": seed})
        # Seeded shuffle: trials start in mixed order, so ASHA's first rung decisions are not
        # made among near-identical neighbours of a grid.
        return [configs[i] for i in rng.permutation(len(configs))]


def load_space(path: str | Path) -> SearchSpace:
    file = Path(path)
    tree = read_yaml_mapping(file, "search space")
    try:
        return SearchSpace.model_validate(tree)
    except ValidationError as err:
        lines = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()]
        raise ConfigError(f"search space {file} is invalid:\n  " + "\n  ".join(lines)) from None


def trial_recipe(base: dict[str, Any], fixed: dict[str, Any], sampled: dict[str, Any], seed: int) -> dict[str, Any]:
    """The recipe one trial trains: base recipe, then the space's fixed keys, then its draw."""
    tree = yaml.safe_load(yaml.safe_dump(base))  # deep copy of plain data
    for key, value in {**fixed, **sampled}.items():
        # A bundle (an undotted key) sets several recipe keys together, e.g. an objective and
        # the fusion it needs, so a grid over it never produces an invalid pair.
        for path, item in (value.items() if "." not in key else [(key, value)]):
            set_dotted(tree, path, item)
    tree["seed"] = seed
    return tree


def validate_against(space: SearchSpace, base: dict[str, Any]) -> Recipe:
    """Check every key and probe value of ``space`` against ``base``; return the fixed recipe."""
    fixed = validate_recipe(trial_recipe(base, space.set, {}, space.seeds[0]), source="recipe with the space's `set`")
    keys = list(space.space)
    warmups = [warmup_epochs(fixed)]
    for values in itertools.product(*(space.space[k].probe_values() for k in keys)) if keys else [()]:
        sampled = dict(zip(keys, values))
        try:
            probe = validate_recipe(trial_recipe(base, space.set, sampled, space.seeds[0]), source="trial recipe")
        except ConfigError as err:
            raise ConfigError(f"search space value {sampled} does not fit the recipe:\n{err}") from None
        warmups.append(warmup_epochs(probe))
    _check_scheduler(space, fixed, max(warmups))
    return fixed


def warmup_epochs(recipe: Recipe) -> int:
    """Baseline-only epochs of a recipe's objective: the parameter its requirements name as the
    warm-up, with the objective's default when the recipe leaves it out (0 without one)."""
    name = recipe.objective.name
    key = objective_requirements(name).warmup_key
    if key is None:
        return 0
    return int(objective_params_model(name).model_validate(recipe.objective.params).model_dump()[key])


def _check_scheduler(space: SearchSpace, fixed: Recipe, longest_warmup: int) -> None:
    epochs = fixed.schedule.epochs
    max_t = space.scheduler.max_t or epochs
    if max_t > epochs:
        raise ConfigError(f"scheduler.max_t={max_t} exceeds the recipe's schedule.epochs={epochs}")
    if space.scheduler.name != "asha":
        return
    if space.scheduler.grace_period < longest_warmup:
        raise ConfigError(f"scheduler.grace_period={space.scheduler.grace_period} is shorter than the longest warm-up "
                          f"in the space ({longest_warmup} epochs): early rungs could not tell the trials apart")
    if space.scheduler.grace_period >= max_t:
        raise ConfigError(f"scheduler.grace_period={space.scheduler.grace_period} must be below max_t={max_t}, "
                          "or ASHA can never stop a trial")
