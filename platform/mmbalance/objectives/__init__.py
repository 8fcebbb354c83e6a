"""Objective registry: the one table from a recipe's ``objective.name`` to a class.

Each entry pairs the objective with its typed parameter model, so a recipe's
``objective`` section is validated (unknown keys, wrong types, impossible values)
before any work starts, and every other key maps to exactly one constructor argument.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from mmbalance.objectives.base import (
    AddHead,
    DistInfo,
    ForwardContext,
    HeadOutputs,
    LossGroup,
    Objective,
    Requirements,
    StepInputs,
    StepResult,
)
from mmbalance.objectives.arl import ARL, ARLParams
from mmbalance.objectives.arm import ARM, ARMParams
from mmbalance.objectives.aug import AUG, AUGParams
from mmbalance.objectives.lf import LF, LFParams
from mmbalance.objectives.mnl import MNL, MNLParams

OBJECTIVES: dict[str, tuple[type, type[BaseModel]]] = {
    "lf": (LF, LFParams),
    "mnl": (MNL, MNLParams),
    "arm": (ARM, ARMParams),
    "arl": (ARL, ARLParams),
    "aug": (AUG, AUGParams),
}


def objective_params_model(name: str) -> type[BaseModel]:
    if name not in OBJECTIVES:
        raise KeyError(f"unknown objective {name!r}; allowed: {sorted(OBJECTIVES)}")
    return OBJECTIVES[name][1]


def objective_requirements(name: str) -> Requirements:
    """What objective ``name`` needs (fusions, warm-up key, modality count), from its class."""
    objective_params_model(name)  # the same KeyError for an unknown name
    return OBJECTIVES[name][0].requirements


def build_objective(name: str, params: dict[str, Any]) -> Objective:
    cls, params_model = OBJECTIVES[name]
    checked = params_model.model_validate(params)
    return cls(**checked.model_dump())


__all__ = [
    "OBJECTIVES", "AddHead", "DistInfo", "ForwardContext", "HeadOutputs", "LossGroup", "Objective", "Requirements",
    "StepInputs", "StepResult", "build_objective", "objective_params_model", "objective_requirements",
]
