"""Search spaces: which recipe keys to search, how, over which seeds, with which scheduler.

A search space names recipe keys (``objective.lam``), or bundles of them under an undotted
label (``method: {grid: [{objective.name: aug, objective.check_every_epochs: 1}, ...]}``), and never a
recipe, so any space can be
combined with any recipe. ``validate_against`` checks the combination before Ray starts:
every searched or fixed key must exist in the recipe (with the objective the trials will
use), every categorical value and both ends of every range must be valid values, and
ASHA's grace period must cover the longest warm-up, since before warm-up ends the
objectives behave like the baseline and early rungs cannot tell them apart.

Values interact (``objective.name: arm`` needs ``model.fusion: concat``; ``objective.lam``
exists for MNL only), so validation checks every *combination* of categorical values and
range ends, not each value alone, through the same ``validate_recipe`` a run uses: a bad
combination fails with exit 2 before Ray starts, instead of as FAILED trials. At most
``MAX_CHECKED_COMBINATIONS`` combinations are checked (each value is always checked on its
own as well); a larger space has only its first combinations (in product order) checked.

Precedence of a trial's recipe keys, lowest to highest (``trial_recipe``): the recipe file,
the space's ``set:``, the user's ``--set`` (``overrides``), the drawn value and seed. A
``--set`` of a key the space searches (or of ``seed``) is refused: the draw would silently
beat it.

``max_failed_fraction`` (default 0.5): a search whose trials all failed, or more than this
fraction of them, ends with exit 1 after its results are written (``tune/search.py``).
``1.0`` fails the command only when every trial failed.
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
MAX_CHECKED_COMBINATIONS = 256  # each is one recipe validation (~10 ms); mnl_asha, the largest shipped space, has 60


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
    reduction_factor: float = Field(
        4.0,
        gt=1.0,
        description="ASHA keeps 1 of every reduction_factor trials at each rung; 4, not Tune's 3: "
        "asynchronous halving at low concurrency promotes early (a rung's first arrivals are judged "
        "against few peers), and the larger factor offsets that (bench/asha.py, docs/architecture.md)",
    )
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
    workers: int = Field(
        0, ge=0, description="per trial: 0 trains inside the trial process; N >= 1 runs a TorchTrainer with N workers"
    )
    gpus_per_worker: float = Field(0.0, ge=0.0)
    max_failed_fraction: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="the command fails (exit 1) when more than this fraction of the trials failed, or all of them did",
    )

    @model_validator(mode="after")
    def _keys_are_dotted(self) -> "SearchSpace":
        for key in [*self.space, *self.set]:
            if key == "seed" or key.startswith("data."):
                raise ValueError(f"{key}: seeds go in `seeds`, data in the recipe; a search space never sets them")
            if not all(key.split(".")):
                raise ValueError(f"{key}: not a dotted recipe key")
        for key, dist in self.space.items():
            if "." not in key and not all(isinstance(v, dict) for v in dist.probe_values()):
                raise ValueError(
                    f"{key}: a key without a dot is a bundle; every value must map recipe keys to values "
                    "(e.g. {objective.name: aug, objective.check_every_epochs: 1})"
                )
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
    return load_model(SearchSpace, path, "search space")


def load_model(model: type[BaseModel], path: str | Path, what: str):
    """A YAML file validated as ``model``; every problem in one ConfigError naming its key."""
    file = Path(path)
    tree = read_yaml_mapping(file, what)
    try:
        return model.model_validate(tree)
    except ValidationError as err:
        lines = [
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg'].removeprefix('Value error, ')}" for e in err.errors()
        ]
        raise ConfigError(f"{what} {file} is invalid:\n  " + "\n  ".join(lines)) from None


def trial_recipe(
    base: dict[str, Any],
    fixed: dict[str, Any],
    sampled: dict[str, Any],
    seed: int,
    *,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The recipe one trial trains, lowest to highest precedence: the recipe file (``base``),
    the space's ``set:`` (``fixed``), the user's ``--set`` (``overrides``), the draw, the seed.
    ``--set`` sits above ``set:`` because the user typed it for this search; below the draw
    because a searched key cannot also be fixed (``check_overrides`` refuses it)."""
    tree = yaml.safe_load(yaml.safe_dump(base))  # deep copy of plain data
    _apply(tree, fixed, bundles=True)
    _apply(tree, overrides or {}, bundles=False)  # `--set model={...}` replaces a section, as in `train`
    _apply(tree, sampled, bundles=True)
    tree["seed"] = seed
    return tree


def _apply(tree: dict[str, Any], layer: dict[str, Any], *, bundles: bool) -> None:
    for key, value in layer.items():
        # A bundle (an undotted key of a space) sets several recipe keys together, e.g. an
        # objective and the fusion it needs, so a grid over it never produces an invalid pair.
        for path, item in value.items() if bundles and "." not in key else [(key, value)]:
            set_dotted(tree, path, item)


def searched_keys(space: SearchSpace) -> set[str]:
    """Every recipe key a trial's draw sets: dotted space keys, the keys inside bundles, ``seed``."""
    keys = {"seed"}
    for key, dist in space.space.items():
        if "." in key:
            keys.add(key)
        else:
            keys.update(k for bundle in dist.probe_values() for k in bundle)
    return keys


def check_overrides(space: SearchSpace, overrides: dict[str, Any]) -> None:
    """A ``--set`` of a key the space searches (or of a key above or below one) is an error:
    the draw would beat it in every trial, so the user's value would silently never be used."""
    searched = searched_keys(space)
    for key in overrides:
        clash = sorted(k for k in searched if k == key or k.startswith(key + ".") or key.startswith(k + "."))
        if clash:
            what = (
                "seeds come from the space's `seeds`" if clash == ["seed"] else f"the search space searches {clash[0]}"
            )
            raise ConfigError(f"--set {key}: {what}; remove it from --set or from the space")


def validate_against(space: SearchSpace, base: dict[str, Any], overrides: dict[str, Any] | None = None) -> Recipe:
    """Check every key, value and combination of ``space`` against ``base`` with the space's
    ``set:`` and the user's ``overrides``; return the fixed recipe (no draw)."""
    overrides = dict(overrides or {})
    check_overrides(space, overrides)
    seed = space.seeds[0]
    fixed = validate_recipe(
        trial_recipe(base, space.set, {}, seed, overrides=overrides), source="recipe with the space's `set` and --set"
    )
    # The recipe's own warm-up counts only if no trial replaces it with a drawn one.
    key = objective_requirements(fixed.objective.name).warmup_key
    warmups = [] if key and f"objective.{key}" in searched_keys(space) else [warmup_epochs(fixed)]
    for sampled in probe_combinations(space):
        try:
            probe = validate_recipe(
                trial_recipe(base, space.set, sampled, seed, overrides=overrides), source="trial recipe"
            )
        except ConfigError as err:
            raise ConfigError(
                f"search space combination {_describe_combination(sampled)} does not fit the recipe:\n{err}"
            ) from None
        warmups.append(warmup_epochs(probe))
    _check_scheduler(space, fixed, max(warmups, default=0))
    return fixed


def probe_combinations(space: SearchSpace, limit: int = MAX_CHECKED_COMBINATIONS) -> list[dict[str, Any]]:
    """Draws to validate: each probe value alone (the other keys at their first value), then
    every combination of all keys' probe values, up to ``limit`` combinations in all. Each
    value alone comes first so that a capped space still has every value checked."""
    keys = list(space.space)
    if not keys:
        return [{}]
    probes = [space.space[k].probe_values() for k in keys]
    first = {k: values[0] for k, values in zip(keys, probes)}
    singles = [{**first, k: v} for k, values in zip(keys, probes) for v in values]
    combos = (dict(zip(keys, values)) for values in itertools.product(*probes))
    seen, chosen = set(), []
    for sampled in itertools.chain(singles, combos):
        marker = yaml.safe_dump(sampled, sort_keys=True)
        if marker in seen:
            continue
        if len(chosen) >= max(limit, len(singles)):
            break
        seen.add(marker)
        chosen.append(sampled)
    return chosen


def _describe_combination(sampled: dict[str, Any]) -> str:
    """``{objective.name: arm, objective.lam: 0.1}``: the keys as the space names them."""
    cells = [f"{k}: {_label(v)}" for k, v in sampled.items()]
    return "{" + ", ".join(cells) + "}"


def _label(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {v}" for k, v in value.items()) + "}"
    return str(value)


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
        raise ConfigError(
            f"scheduler.grace_period={space.scheduler.grace_period} is shorter than the longest warm-up "
            f"in the space ({longest_warmup} epochs): early rungs could not tell the trials apart"
        )
    if space.scheduler.grace_period >= max_t:
        raise ConfigError(
            f"scheduler.grace_period={space.scheduler.grace_period} must be below max_t={max_t}, "
            "or ASHA can never stop a trial"
        )
