"""Every registered objective comes with its docs page, its test file and parameters whose
defaults build it; objectives register themselves from their own module, and a misdeclared one
is refused when its module is imported."""

from __future__ import annotations

import re
import sys
import textwrap

import pytest
from pydantic import BaseModel, ConfigDict

import mmbalance.objectives as objectives_package
from helpers import REPO, recipe_dict
from mmbalance.config import parse_override, set_dotted, validate_recipe
from mmbalance.models.encoders import ENCODERS
from mmbalance.objectives import (
    OBJECTIVES,
    Registered,
    Requirements,
    StatelessObjective,
    build_objective,
    register_objective,
)
from mmbalance.objectives.lf import LF, LFParams

SECTION_HEADING = re.compile(r"^## §", re.MULTILINE)


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_registered_objective_has_a_docs_page_with_a_numbered_section(name):
    page = REPO / "docs" / "methods" / f"{name}.md"
    assert page.is_file(), f"objective {name!r} needs its page {page.relative_to(REPO)}"
    assert SECTION_HEADING.search(page.read_text()), f"{page.relative_to(REPO)} needs a '## §' heading"


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_registered_objective_has_its_test_file(name):
    tests = REPO / "tests" / "objectives" / f"test_{name}.py"
    assert tests.is_file(), f"objective {name!r} needs its tests in {tests.relative_to(REPO)}"


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_registered_objective_is_built_from_its_params_defaults(name):
    entry = OBJECTIVES[name]
    assert isinstance(entry, Registered) and entry.cls.name == name and entry.cls.Params is entry.params
    defaults = entry.params()
    objective = entry.cls(defaults)
    assert objective.params is defaults and entry.cls().params == defaults  # None -> the defaults
    assert (
        build_objective(name, {}).params == defaults and build_objective(name, defaults.model_dump()).params == defaults
    )
    assert isinstance(objective.trains_new_heads, bool)


def test_the_registry_is_sorted_and_holds_only_objectives_of_the_package():
    assert list(OBJECTIVES) == sorted(OBJECTIVES)
    for name, entry in OBJECTIVES.items():
        assert entry.cls.__module__.startswith("mmbalance.objectives."), name
    # Helper modules (base, arm_estimators, ...) are imported by the scan and register nothing.
    modules = {entry.cls.__module__ for entry in OBJECTIVES.values()}
    assert "mmbalance.objectives.base" not in modules and "mmbalance.objectives.arm_estimators" in sys.modules
    assert "mmbalance.objectives.arm_estimators" not in modules


def test_encoders_use_the_same_entry_shape():
    for name, entry in ENCODERS.items():
        assert isinstance(entry, Registered) and issubclass(entry.params, BaseModel), name
        assert entry.validated({}) == entry.params()


PROBE_MODULE = """
from mmbalance.objectives.base import register_objective
from mmbalance.objectives.lf import LF, LFParams


class ProbeParams(LFParams):
    pass


@register_objective
class Probe(LF):
    name = "registry_probe"
    Params = ProbeParams
"""


def test_a_module_dropped_into_the_package_registers_its_objective(tmp_path, monkeypatch, small_shards):
    (tmp_path / "registry_probe_module.py").write_text(textwrap.dedent(PROBE_MODULE))
    monkeypatch.setattr(objectives_package, "__path__", [*objectives_package.__path__, str(tmp_path)])
    before = list(OBJECTIVES)
    try:
        objectives_package.discover()
        assert set(OBJECTIVES) == {*before, "registry_probe"} and list(OBJECTIVES) == sorted(OBJECTIVES)
        assert type(build_objective("registry_probe", {"omega": 0.5})).__name__ == "Probe"
        recipe = validate_recipe(recipe_dict(small_shards, objective={"name": "registry_probe", "omega": 0.5}))
        assert recipe.model.fusion == LF.requirements.default_fusion
    finally:
        OBJECTIVES.pop("registry_probe", None)
        sys.modules.pop("mmbalance.objectives.registry_probe_module", None)
    assert list(OBJECTIVES) == before


class _Forbid(BaseModel):
    model_config = ConfigDict(extra="forbid")
    start: int = 0


class _Open(BaseModel):
    start: int = 0


class _NoDefault(BaseModel):
    model_config = ConfigDict(extra="forbid")
    start: int


def _objective(name: str, params=_Forbid, requirements=Requirements(fusions=("mean",))) -> type:
    return type(
        "Candidate",
        (StatelessObjective,),
        {"name": name, "Params": params, "requirements": requirements, "step": lambda self, inputs: None},
    )


@pytest.mark.parametrize(
    ("candidate", "message"),
    [
        (_objective("lf"), "already registered"),
        (_objective("not an identifier"), "identifier"),
        (_objective("cand_open", params=_Open), "extra='forbid'"),
        (_objective("cand_no_default", params=_NoDefault), "must validate"),
        (_objective("cand_dict", params=dict), "pydantic model"),
        (_objective("cand_no_needs", requirements=None), "Requirements"),
        (_objective("cand_warmup", requirements=Requirements(fusions=("mean",), warmup_key="warm")), "'warm'"),
        (_objective("cand_heads", requirements=Requirements(fusions=("mean",), trains_new_heads="grow")), "'grow'"),
        (type("V", (_objective("cand_variant_key"),), {"variants": {"paper": ("objective.sart=1",)}}), "sart"),
        (type("V", (_objective("cand_variant_str"),), {"variants": {"paper": "objective.start=1"}}), "tuple of"),
        (
            type(
                "Candidate",
                (),
                {"name": "cand_no_step", "Params": _Forbid, "requirements": Requirements(fusions=("mean",))},
            ),
            "missing protocol method bind()",
        ),
    ],
)
def test_a_misdeclared_objective_is_refused_and_not_registered(candidate, message):
    before = dict(OBJECTIVES)
    with pytest.raises((TypeError, ValueError), match=re.escape(message)):
        register_objective(candidate)
    assert OBJECTIVES == before


@pytest.mark.parametrize(
    ("name", "label"), [(name, label) for name, entry in OBJECTIVES.items() for label in entry.cls.variants]
)
def test_every_declared_variant_is_a_valid_recipe_for_its_objective(name, label, small_shards):
    tree = recipe_dict(small_shards, objective={"name": name})
    for item in OBJECTIVES[name].cls.variants[label]:
        set_dotted(tree, *parse_override(item))
    recipe = validate_recipe(tree)
    assert recipe.objective.name == name


def test_an_objective_takes_its_own_params_model_or_none():
    assert LF(None).params == LFParams()
    with pytest.raises(TypeError, match="LF takes a LFParams"):
        LF({"omega": 0.5})
    with pytest.raises(TypeError, match="MNL takes a MNLParams"):
        OBJECTIVES["mnl"].cls(LFParams())
