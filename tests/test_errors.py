"""The command line's one error boundary: every expected failure exits 2 with one
`mmbalance <command>: error:` message and no traceback; --debug / MMBALANCE_DEBUG=1 re-raises."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from helpers import REPO
from mmbalance.cli import build_parser, main

RECIPE = str(REPO / "trainables" / "synthetic.yaml")


@pytest.fixture(scope="module")
def trained_run(small_shards, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("errors") / "run"
    assert (
        main(
            [
                "train",
                "--recipe",
                RECIPE,
                "--set",
                f"data.path={small_shards}",
                "schedule.epochs=1",
                "tracking.wandb=disabled",
                "--output",
                str(run),
            ]
        )
        == 0
    )
    return run


def _broken_copy(small_shards: Path, tmp: Path, text: str) -> Path:
    shards = tmp / "broken"
    shutil.copytree(small_shards, shards)
    (shards / "manifest.json").write_text(text)
    return shards


def _manifest_without_classes(small_shards: Path) -> str:
    tree = json.loads((small_shards / "manifest.json").read_text())
    tree["classes"] = []
    return json.dumps(tree)


def _train(shards, out, *sets):
    return [
        "train",
        "--recipe",
        RECIPE,
        "--set",
        f"data.path={shards}",
        "tracking.wandb=disabled",
        *sets,
        "--output",
        str(out),
    ]


CASES = {
    # name: (argv builder, expected text in the message)
    "objective with a fusion it cannot use": (
        lambda s, t, r: _train(s, t / "out", "objective.name=arm", "model.fusion=mean"),
        "objective.name=arm needs model.fusion in [concat]",
    ),
    "manifest that is not JSON": (
        lambda s, t, r: _train(_broken_copy(s, t, '{"dataset": "x",\n  "classes": [,]}'), t / "out"),
        "not valid JSON at line 2, column",
    ),
    "manifest with an invalid key": (
        lambda s, t, r: _train(_broken_copy(s, t, _manifest_without_classes(s)), t / "out"),
        "invalid manifest (classes:",
    ),
    "train split smaller than a batch": (
        lambda s, t, r: _train(s, t / "out", "schedule.batch_size=4096"),
        "has 512 rows, fewer than schedule.batch_size=4096",
    ),
    "unwritable run directory": (
        lambda s, t, r: _train(s, Path("/sys/mmbalance-run")),
        "cannot write or read /sys/mmbalance-run",
    ),
    "unwritable shard directory": (
        lambda s, t, r: ["prepare", "synthetic", "--out", "/sys/mmbalance-shards", "--samples", "32"],
        "cannot write or read",
    ),
    "eval output on a full disk": (
        lambda s, t, r: ["eval", str(r), "--missing", "audio", "--out", "/dev/full"],
        "no space left for /dev/full",
    ),
    "eval output in an unwritable directory": (
        lambda s, t, r: ["eval", str(r), "--missing", "audio", "--out", "/sys/mmbalance-eval.json"],
        "cannot write or read /sys/mmbalance-eval.json",
    ),
    "recipe that does not exist": (
        lambda s, t, r: ["train", "--recipe", "no_such_recipe", "--output", str(t / "out")],
        "no shipped recipe has that name",
    ),
    "override without a value": (
        lambda s, t, r: _train(s, t / "out", "schedule.epochs"),
        "must look like key.path=value",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_with_one_error_line_and_no_traceback(case, small_shards, trained_run, tmp_path, capsys):
    build, expected = CASES[case]
    argv = build(small_shards, tmp_path, trained_run)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mmbalance {argv[0]}: error: ") and "Traceback" not in err
    assert expected in err
    assert "errors.pydantic.dev" not in err  # pydantic's help links are noise here
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_debug_flag_and_environment_show_the_traceback(small_shards, tmp_path, monkeypatch):
    argv = _train(small_shards, tmp_path / "out", "schedule.batch_size=4096")
    with pytest.raises(Exception, match="fewer than schedule.batch_size"):
        main([*argv, "--debug"])
    monkeypatch.setenv("MMBALANCE_DEBUG", "1")
    with pytest.raises(Exception, match="fewer than schedule.batch_size"):
        main(argv)


def test_set_takes_several_items_after_one_flag_and_repeated_flags(small_shards, tmp_path):
    args = build_parser().parse_args(["train", "--recipe", "r", "--set", "a=1", "b=2", "--set", "c=3", "--output", "x"])
    assert args.set == ["a=1", "b=2", "c=3"] and args.output == "x"
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--recipe",
                RECIPE,
                "--set",
                f"data.path={small_shards}",
                "schedule.epochs=1",
                "seed=7",
                "--set",
                "tracking.wandb=disabled",
                "optim.lr=0.01",
                "--output",
                str(run),
            ]
        )
        == 0
    )
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert (config["schedule"]["epochs"], config["seed"], config["optim"]["lr"]) == (1, 7, 0.01)
