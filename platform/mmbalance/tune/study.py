"""Comparison studies: which methods, each with its own search space, all on one budget.

A study answers "does method X beat a tuned late fusion on this data, and by how much?". It
is only fair if every method, the baseline included, is tuned the same way. So a study file
names its methods (recipe keys each method fixes, the keys it searches, the modalities it
sees), and one ``budget`` that every method's search gets identically: the same number of
trials, the same scheduler (ASHA rungs), the same search seeds and the same epochs. The best
configuration of each method, chosen on val only, is then trained again over ``seeds`` and the
methods are compared on those seeds (``reports/study_summary.py``).

``common_space`` (``optim.lr`` by default) is searched for every method, so the baseline is
tuned as well as the methods; a method's own ``space`` adds its keys (λ, warm-up, guidance for
MNL; γ and warm-up for ARL; ...). Search keys must be random distributions (``choice``,
``uniform``, ``loguniform``, ``randint``): a ``grid`` would give a method more trials than the
others. ``modalities_alone: true`` adds one method per modality of the recipe, trained alone
(``data.modalities``): its unimodal ceiling, against which the under-training gap is measured.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mmbalance.config import ConfigError
from mmbalance.tune.space import Distribution, SchedulerConfig, SearchSpace, load_model, validate_against

ALONE_PREFIX = "alone:"  # methods that train one modality by itself: "alone:audio"
METHOD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Method(_Strict):
    set: dict[str, Any] = Field(default_factory=dict, description="recipe keys this method fixes (objective.name, ...)")
    space: dict[str, Distribution] = Field(default_factory=dict, description="keys searched for this method only")
    modalities: list[str] | None = Field(None, description="train on these modalities only (data.modalities)")


class Budget(_Strict):
    trials: int = Field(6, ge=1, description="search trials per method: the same for every method")
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1, description="seeds of the search trials")
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    sample_seed: int = 0


class Study(_Strict):
    methods: dict[str, Method] = Field(min_length=1)
    common_space: dict[str, Distribution] = Field(
        default_factory=lambda: {"optim.lr": Distribution(loguniform=(3e-4, 3e-3))},
        description="searched for every method, the baseline included",
    )
    modalities_alone: bool = Field(True, description="add one method per recipe modality, trained alone")
    baseline: str = Field("lf", description="the method every other one is compared with")
    set: dict[str, Any] = Field(
        default_factory=dict, description="recipe keys fixed for every method (schedule.epochs, ...)"
    )
    budget: Budget = Field(default_factory=Budget)
    seeds: list[int] = Field(
        default_factory=lambda: [0, 1, 2, 3, 4],
        min_length=2,
        description="seeds the best configuration of each method is trained again on",
    )
    alpha: float = Field(0.05, gt=0.0, lt=1.0)
    correction: Literal["holm", "bonferroni", "none"] = "holm"
    max_concurrent: int = Field(2, ge=1)
    workers: int = Field(0, ge=0)
    gpus_per_worker: float = Field(0.0, ge=0.0)
    max_failed_fraction: float = Field(0.5, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _check(self) -> "Study":
        for name, method in self.methods.items():
            if not METHOD_NAME.match(name) or name.startswith(ALONE_PREFIX):
                raise ValueError(
                    f"methods.{name}: a method name is letters, digits and _ . + - "
                    f"(names starting with {ALONE_PREFIX!r} are the modalities trained alone)"
                )
            for key, dist in method.space.items():
                if dist.kind == "grid":
                    raise ValueError(
                        f"methods.{name}.space.{key}: use choice, not grid: a grid gives this method "
                        "more trials than the others, and every method gets the same budget"
                    )
            clash = sorted(set(method.space) & set(self.common_space))
            if clash:
                raise ValueError(f"methods.{name}.space.{clash[0]}: already in common_space")
        for key, dist in self.common_space.items():
            if dist.kind == "grid":
                raise ValueError(f"common_space.{key}: use choice, not grid (every method gets the same budget)")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: each seed once, got {self.seeds}")
        return self


def load_study(path: str | Path) -> Study:
    return load_model(Study, path, "study")


def all_methods(study: Study, base: dict[str, Any]) -> dict[str, Method]:
    """The study's methods, then (``modalities_alone``) one per recipe modality trained alone
    with the baseline's recipe keys: late fusion of a single modality is that modality's own
    classifier. Its ``set`` keeps only the keys that make sense for one modality."""
    methods = dict(study.methods)
    if study.modalities_alone:
        for modality in base.get("modalities", {}):
            methods[f"{ALONE_PREFIX}{modality}"] = Method(set={"objective.name": "lf"}, modalities=[modality])
    if study.baseline not in methods:
        raise ConfigError(f"baseline: {study.baseline!r} is not a method of the study; methods: {sorted(methods)}")
    return methods


def method_base(base: dict[str, Any], method: Method) -> dict[str, Any]:
    """The recipe a method's trials start from: ``base`` with its modality subset."""
    if method.modalities is None:
        return base
    return {**base, "data": {**base.get("data", {}), "modalities": list(method.modalities)}}


def search_space(study: Study, method: Method) -> SearchSpace:
    """A method's search: its keys and the common ones, on the study's one budget."""
    return SearchSpace(
        space={**study.common_space, **method.space},
        set={**study.set, **method.set},
        seeds=study.budget.seeds,
        samples=study.budget.trials,
        sample_seed=study.budget.sample_seed,
        scheduler=study.budget.scheduler,
        max_concurrent=study.max_concurrent,
        workers=study.workers,
        gpus_per_worker=study.gpus_per_worker,
        max_failed_fraction=study.max_failed_fraction,
    )


def final_space(study: Study, method: Method, best: dict[str, Any]) -> SearchSpace:
    """The re-runs of a method's best configuration: nothing searched, one trial per seed."""
    return SearchSpace(
        space={},
        set={**study.set, **method.set, **best},
        seeds=study.seeds,
        samples=1,
        scheduler=SchedulerConfig(name="fifo"),
        max_concurrent=study.max_concurrent,
        workers=study.workers,
        gpus_per_worker=study.gpus_per_worker,
        max_failed_fraction=study.max_failed_fraction,
    )


def validate_study(study: Study, base: dict[str, Any], overrides: dict[str, Any] | None = None) -> dict[str, Method]:
    """Every method's space against its recipe (every value, every combination, ASHA's grace
    period against its warm-ups) before Ray starts; returns the methods, alone-runs included.
    Equal budgets are checked here too: every method's search has the same trial count."""
    methods = all_methods(study, base)
    counts = {}
    for name, method in methods.items():
        space = search_space(study, method)
        try:
            validate_against(space, method_base(base, method), overrides)
        except ConfigError as err:
            raise ConfigError(f"methods.{name}: {err}") from None
        counts[name] = space.trial_count()
    if len(set(counts.values())) != 1:
        raise ConfigError(f"unequal search budgets (trials per method): {counts}")
    return methods
