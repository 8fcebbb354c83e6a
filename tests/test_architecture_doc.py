"""docs/architecture.md stays true: its module table is the one the code's docstrings give, and
the import rules it states hold (objectives/ and models/ import no Ray; nothing in the package
imports the command line or a command module except cli.py)."""

from __future__ import annotations

import ast

from helpers import REPO
from helpers.module_table import PACKAGE, current, table


def test_module_table_matches_the_code():
    assert current() == table(), (
        "docs/architecture.md's module table is stale: run python tests/helpers/module_table.py"
    )


def _imports(path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_objectives_and_models_import_no_ray():
    for folder in ("objectives", "models"):
        for path in (PACKAGE / folder).rglob("*.py"):
            ray = {name for name in _imports(path) if name == "ray" or name.startswith("ray.")}
            assert not ray, f"{path.relative_to(REPO)} imports {sorted(ray)}"


def test_only_the_command_line_imports_commands():
    for path in PACKAGE.rglob("*.py"):
        if path.name == "cli.py" or "commands" in path.relative_to(PACKAGE).parts:
            continue
        bad = {n for n in _imports(path) if n == "mmbalance.cli" or n.startswith("mmbalance.commands")}
        assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}"
