"""The command line starts without the heavy libraries: parsing ``--help`` (or any arguments)
imports neither torch, Ray nor transformers; they load only in the commands that use them."""

from __future__ import annotations

import subprocess
import sys

from helpers import REPO

HEAVY = ("torch", "ray", "transformers", "wandb")


def _probe(statement: str) -> subprocess.CompletedProcess:
    """Run ``statement`` (which binds ``result``) in a fresh interpreter from the repository
    root; its stdout is ``result`` and the heavy libraries it left imported."""
    code = f"import sys\n{statement}\nprint(result, sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)


def test_building_the_parser_imports_no_heavy_library():
    done = _probe(
        "from mmbalance.cli import build_parser\n"
        "result = build_parser().parse_args(['train', '--recipe', 'x.yaml']).command"
    )
    assert done.stdout.strip() == "train []", done.stdout + done.stderr


def test_help_exits_zero_and_lists_every_command():
    command = [sys.executable, "-m", "mmbalance.cli", "--help"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for command in ("prepare", "train", "tune", "eval", "report", "demo", "submit", "recipes", "compare"):
        assert command in done.stdout


def test_a_recipe_error_outside_the_objective_is_reported_without_torch():
    done = _probe(
        "from mmbalance.cli import main\n"
        "result = main(['train', '--recipe', 'trainables/synthetic.yaml', '--set', 'schedule.epochs=0'])"
    )
    assert done.stdout.strip() == "2 []", done.stdout + done.stderr
    assert "schedule.epochs: Input should be greater than or equal to 1" in done.stderr
