"""The shape of every name -> implementation table (objectives, encoders).

Pure Python on purpose: importing it needs neither torch nor Ray, so any layer (the recipe
validator, a report, a benchmark's argument parser) can read a registry entry.

An entry pairs what builds the thing (``cls``: a class or a builder function) with its typed
parameter model (``params``: a pydantic model class). The parameter model is the single source
of defaults and of validation: a recipe's section is validated by ``params`` and the resulting
instance is what ``cls`` receives.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

# The late-fusion heads (models/fusion.py), here so the recipe validator can name them without torch.
FUSIONS = ("mean", "sum", "concat", "boost", "pdf", "shared")


class Registered(NamedTuple):
    """One registry entry: ``cls`` builds it, ``params`` (a pydantic model) checks and defaults
    its parameters. A tuple, so ``entry.cls, entry.params = entry`` unpacking keeps working."""

    cls: Any
    params: Any  # type[pydantic.BaseModel]; untyped here so this module imports no pydantic

    def validated(self, values: Mapping[str, Any] | None = None) -> Any:
        """``values`` (a recipe section without its name) checked by ``params``: an instance of it."""
        return self.params.model_validate(dict(values or {}))


def add_entry(table: dict[str, Registered], name: str, entry: Registered, kind: str) -> None:
    """Put ``entry`` under ``name``, refusing a name another class already holds (the same class
    registering again, as a module reload does, replaces its own entry)."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"{kind} name must be a Python identifier (it names a module and a docs page), got {name!r}")
    held = table.get(name)
    if held is not None and _where(held.cls) != _where(entry.cls):
        raise ValueError(
            f"{kind} {name!r} is already registered by {_where(held.cls)}; {_where(entry.cls)} must use another name"
        )
    table[name] = entry


def _where(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', obj)}"
