"""Dataset converters: ``mmbalance prepare DATASET --root RAW --out SHARDS``.

Each converter module holds one dataset's raw layout (documented in its docstring and in
docs/datasets.md), a pydantic ``Params`` model with every preprocessing setting, and a class
implementing ``base.Converter``. Modules are imported on demand, so listing the datasets costs
nothing and a converter's heavy imports (PyAV, transformers) load only when it runs.
"""

from __future__ import annotations

import importlib
from typing import Any

from pydantic import ValidationError

# name -> "module:Class"; avdigits and synthetic have their own in-memory writers (data/avdigits.py, data/synthetic.py).
CONVERTERS = {
    "cremad": "mmbalance.data.convert.cremad:CremadConverter",
    "ave": "mmbalance.data.convert.ave:AveConverter",
    "kinetics_sounds": "mmbalance.data.convert.kinetics_sounds:KineticsSoundsConverter",
    "mvsa_single": "mmbalance.data.convert.mvsa:MvsaSingleConverter",
    "food101": "mmbalance.data.convert.food101:Food101Converter",
}


def converter_class(name: str):
    if name not in CONVERTERS:
        raise KeyError(f"unknown dataset {name!r}; known: {sorted(CONVERTERS)}")
    module, _, cls = CONVERTERS[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def build_converter(name: str, settings: dict[str, Any] | None = None):
    """A converter with validated params; a bad setting raises ValueError naming the key."""
    cls = converter_class(name)
    try:
        params = cls.Params.model_validate(settings or {})
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: "
                             f"{'unknown setting' if e['type'] == 'extra_forbidden' else e['msg']}"
                             for e in err.errors())
        raise ValueError(f"{name} settings: {problems}") from None
    return cls(params)
