"""--overwrite replaces only what mmbalance wrote: foreign files survive every command, and the
working directory, a home directory, / and any directory holding the data are never replaced."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import REPO, small_spec
from mmbalance import outputs
from mmbalance.cli import main
from mmbalance.data.synthetic import prepare_synthetic

RECIPE = str(REPO / "trainables" / "synthetic.yaml")


def _train(shards: Path, out: Path, *extra: str) -> int:
    return main(
        [
            "train",
            "--recipe",
            RECIPE,
            "--set",
            f"data.path={shards}",
            "schedule.epochs=1",
            "tracking.wandb=disabled",
            "--output",
            str(out),
            *extra,
        ]
    )


def _plant(directory: Path) -> list[Path]:
    """A user's own files: one at the top level, one in a sub-folder."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "notes").mkdir(exist_ok=True)
    planted = [directory / "my_results.csv", directory / "notes" / "todo.txt"]
    for path in planted:
        path.write_text("mine\n")
    return planted


# -- the rules ------------------------------------------------------------------------------------


def test_layout_entries_are_removed_and_nothing_else(tmp_path):
    run = tmp_path / "run"
    outputs.claim(run, outputs.RUN)
    (run / "checkpoints" / "latest").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("{}\n")
    (run / "eval-test.json").write_text("{}\n")
    outputs.clear(run, outputs.RUN)
    assert run.is_dir() and list(run.iterdir()) == []
    assert json.loads((outputs.claim(run, outputs.RUN) / outputs.MARKER).read_text())["kind"] == "run"


def test_foreign_entries_make_replacing_refuse_and_are_named(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    planted = _plant(run)
    with pytest.raises(outputs.UnsafeOutput, match="my_results.csv.*notes|notes.*my_results.csv"):
        outputs.clear(run, outputs.RUN)
    assert all(p.is_file() for p in planted) and (run / "checkpoints").is_dir()


@pytest.mark.parametrize("where", ["cwd", "cwd_parent", "home", "root", "data_parent", "data_itself"])
def test_protected_directories_are_never_replaced(tmp_path, monkeypatch, where):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "project" / "shards"
    data.mkdir(parents=True)
    target = {
        "cwd": tmp_path,
        "cwd_parent": tmp_path.parent,
        "home": Path.home(),
        "root": Path("/"),
        "data_parent": tmp_path / "project",
        "data_itself": data,
    }[where]
    with pytest.raises(outputs.UnsafeOutput, match="refusing to replace"):
        outputs.check_replaceable(target, outputs.RUN, reads=[data])


def test_shards_layout_is_the_manifest_and_its_splits(small_shards):
    layout = outputs.shards_layout(small_shards)
    assert {p.name for p in small_shards.iterdir() if layout.owns(p.name)} == {p.name for p in small_shards.iterdir()}
    assert not layout.owns("my_results.csv")


# -- every command with --overwrite ----------------------------------------------------------------


def test_train_overwrite_replaces_a_run_and_refuses_foreign_files(small_shards, tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(small_shards, run) == 0
    assert (run / outputs.MARKER).is_file()
    first = (run / "result.json").read_text()
    assert _train(small_shards, run, "--overwrite", "--set", "seed=5") == 0  # a pure run is replaced
    assert (run / "result.json").read_text() != first
    planted = _plant(run)
    capsys.readouterr()
    assert _train(small_shards, run, "--overwrite") == 2
    err = capsys.readouterr().err
    assert "my_results.csv" in err and "refusing to replace" in err and "Traceback" not in err
    assert all(p.read_text() == "mine\n" for p in planted) and (run / "result.json").is_file()


def test_train_overwrite_refuses_the_working_directory(small_shards, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert _train(small_shards, Path(".")) == 0
    assert _train(small_shards, Path("."), "--overwrite") == 2
    assert "it is the working directory" in capsys.readouterr().err
    assert (tmp_path / "result.json").is_file()


def test_train_overwrite_refuses_a_directory_holding_the_data(tmp_path, capsys):
    project = tmp_path / "project"
    prepare_synthetic(project / "shards", small_spec())
    (project / "config.yaml").write_text("a previous run's config\n")
    assert _train(project / "shards", project, "--overwrite") == 2
    assert "which this command reads" in capsys.readouterr().err
    assert (project / "shards" / "manifest.json").is_file()


def test_prepare_overwrite_replaces_shards_and_refuses_foreign_files(tmp_path, capsys):
    out = tmp_path / "shards"
    args = [
        "prepare",
        "synthetic",
        "--out",
        str(out),
        "--samples",
        "64",
        "--val-samples",
        "16",
        "--test-samples",
        "16",
        "--classes",
        "4",
        "--dim",
        "4",
    ]
    assert main(args) == 0
    assert main([*args, "--seed", "1", "--overwrite"]) == 0
    planted = _plant(out)
    capsys.readouterr()
    assert main([*args, "--overwrite"]) == 2
    assert "not part of a shards" in capsys.readouterr().err
    assert all(p.is_file() for p in planted) and (out / "manifest.json").is_file()


def test_tune_overwrite_refuses_foreign_files_before_any_search(small_shards, tmp_path, capsys):
    search = tmp_path / "search"
    (search / "tune").mkdir(parents=True)  # looks like a previous search
    planted = _plant(search)
    code = main(
        [
            "tune",
            str(REPO / "search_spaces" / "quickstart.yaml"),
            "--recipe",
            RECIPE,
            "--set",
            f"data.path={small_shards}",
            "--output",
            str(search),
            "--overwrite",
        ]
    )
    assert code == 2 and "not part of a search" in capsys.readouterr().err
    assert all(p.is_file() for p in planted) and (search / "tune").is_dir()


def test_report_refuses_an_output_directory_with_foreign_files(tmp_path, capsys):
    out = tmp_path / "elsewhere"
    planted = _plant(out)
    (tmp_path / "experiment").mkdir()
    assert main(["report", str(tmp_path / "experiment"), "--out", str(out)]) == 2
    assert "not part of a report" in capsys.readouterr().err
    assert all(p.is_file() for p in planted)
