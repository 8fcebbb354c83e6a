"""The command line starts without the heavy libraries: parsing ``--help`` (or any arguments)
imports neither torch, Ray nor transformers; they load only in the commands that use them."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "ray", "transformers", "wandb")


def test_building_the_parser_imports_no_heavy_library():
    code = (
        "import sys\n"
        "from mmbalance.cli import build_parser\n"
        "build_parser().parse_args(['train', '--recipe', 'x.yaml'])\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]", done.stdout


def test_help_exits_zero_and_lists_every_command():
    command = [sys.executable, "-m", "mmbalance.cli", "--help"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for command in ("prepare", "train", "tune", "eval", "report", "demo", "submit", "recipes", "compare"):
        assert command in done.stdout
