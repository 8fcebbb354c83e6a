"""Objective registry: a recipe's ``objective.name`` -> ``Registered(cls, params)``.

Every module of this package is imported here, and each objective class in it registers itself
with ``@register_objective`` (``base.py``), so adding an objective is adding its module: no table
to edit. Modules without objectives (``base``, ``arm_estimators``) register nothing; modules whose
name starts with ``_`` are not imported. ``params`` is the objective's pydantic model: a recipe's
``objective`` section is validated by it (unknown keys, wrong types, impossible values) before any
work starts, it holds the only defaults, and the validated instance is what the class receives.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Mapping

from pydantic import BaseModel

from mmbalance.objectives.base import (
    OBJECTIVES,
    AddHead,
    DistInfo,
    ForwardContext,
    GradientContext,
    HeadOutputs,
    LossGroup,
    Objective,
    ParameterGroups,
    Requirements,
    StatelessObjective,
    StepInputs,
    StepResult,
    register_objective,
)
from mmbalance.registry import Registered


def discover() -> dict[str, Registered]:
    """Import every module of the package (each registers its objectives), then order the table
    by name so it does not depend on which module imported which first. Idempotent."""
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
    ordered = sorted(OBJECTIVES.items())
    OBJECTIVES.clear()
    OBJECTIVES.update(ordered)
    return OBJECTIVES


def objective_entry(name: str) -> Registered:
    if name not in OBJECTIVES:
        raise KeyError(f"unknown objective {name!r}; allowed: {sorted(OBJECTIVES)}")
    return OBJECTIVES[name]


def objective_params_model(name: str) -> type[BaseModel]:
    return objective_entry(name).params


def objective_requirements(name: str) -> Requirements:
    """What objective ``name`` needs (fusions, warm-up key, modality count, new heads), from its class."""
    return objective_entry(name).cls.requirements


def build_objective(name: str, params: Mapping[str, Any] | None = None) -> Objective:
    """Validate ``params`` (a recipe's ``objective`` section without ``name``) and build the objective."""
    entry = objective_entry(name)
    return entry.cls(entry.validated(params))


discover()

__all__ = [
    "OBJECTIVES",
    "AddHead",
    "DistInfo",
    "ForwardContext",
    "GradientContext",
    "HeadOutputs",
    "LossGroup",
    "Objective",
    "ParameterGroups",
    "Registered",
    "Requirements",
    "StatelessObjective",
    "StepInputs",
    "StepResult",
    "build_objective",
    "discover",
    "objective_entry",
    "objective_params_model",
    "objective_requirements",
    "register_objective",
]
