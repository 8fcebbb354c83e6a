"""W&B run ids come from the run's identity, never from a directory name: two runs whose
``--output`` share a basename are two W&B runs, ``--resume`` continues its own run (and only a
true resume lets W&B append), ``--overwrite`` starts a new one; a search's trial ids carry the
experiment's own id, the same in the driver's logger and in the scores added later. No Ray
cluster: the search callback's actor class is built and constructed in this process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from helpers import recipe_dict
from helpers.wandb_offline import no_credentials, read_offline_run  # noqa: F401 - no_credentials is autouse
from mmbalance import outputs
from mmbalance.cli import main
from mmbalance.config import TrackingConfig
from mmbalance.layout import EXPERIMENT_ID_FILE, RunDir
from mmbalance.tracking import records
from mmbalance.tracking.records import RunRecord, experiment_group, experiment_id, new_id, trial_run_id

# -- the id helpers ---------------------------------------------------------------------------------


def test_new_ids_are_random_and_safe_for_wandb():
    ids = {new_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(len(i) == records.ID_LENGTH and all(c in "0123456789abcdef" for c in i) for i in ids)


def test_a_run_directory_keeps_its_id_only_when_a_start_continues_it(tmp_path):
    record = RunRecord(tmp_path / "exp" / "a" / "lf")
    first = record.identity(continuing=False)
    assert not first.resumed and first.run_id != "lf"
    assert json.loads((record.dir / RunDir.RUN_ID).read_text()) == {"id": first.run_id}
    again = record.identity(continuing=True)
    assert again == records.RunIdentity(first.run_id, resumed=True)
    fresh = record.identity(continuing=False)  # a new run in the same directory
    assert not fresh.resumed and fresh.run_id != first.run_id
    assert record.identity(continuing=True).run_id == fresh.run_id


def test_same_basename_gives_different_ids(tmp_path):
    a = RunRecord(tmp_path / "a" / "lf").identity(continuing=False)
    b = RunRecord(tmp_path / "b" / "lf").identity(continuing=False)
    assert a.run_id != b.run_id


def test_a_continued_run_without_a_readable_id_starts_a_new_wandb_run(tmp_path):
    record = RunRecord(tmp_path / "run")
    made = record.identity(continuing=True)  # e.g. a run that was not tracked before
    assert not made.resumed
    (record.dir / RunDir.RUN_ID).write_text("not json")
    remade = record.identity(continuing=True)
    assert not remade.resumed and remade.run_id != made.run_id


def test_experiment_id_is_new_for_a_new_search_and_shared_otherwise(tmp_path):
    first = experiment_id(tmp_path / "search", fresh=True)
    assert experiment_id(tmp_path / "search") == first
    assert experiment_id(tmp_path / "search", fresh=True) != first  # --overwrite, or a new search
    assert experiment_id(tmp_path / "other", fresh=True) != first
    assert trial_run_id("abc", "f00d1_00002") == "abc-f00d1_00002"


def test_experiment_id_created_by_concurrent_readers_is_one_id(tmp_path):
    seen: list[str] = []
    threads = [threading.Thread(target=lambda: seen.append(experiment_id(tmp_path / "s"))) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(seen)) == 1 and len(seen) == 16
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [EXPERIMENT_ID_FILE]  # no temp files left


def test_the_id_files_belong_to_their_layouts(tmp_path):
    run = outputs.claim(tmp_path / "run", outputs.RUN)
    RunRecord(run).identity(continuing=False)
    (run / f"{RunDir.RUN_ID}.1234abcd.tmp").write_text("{}")  # left by a killed process
    outputs.clear(run, outputs.RUN)
    assert list(run.iterdir()) == []
    search = outputs.claim(tmp_path / "search", outputs.SEARCH)
    experiment_id(search, fresh=True)
    outputs.clear(search, outputs.SEARCH)
    assert list(search.iterdir()) == []


# -- mmbalance train, offline W&B, in-process -------------------------------------------------------


@pytest.fixture
def recipe_file(tmp_path, small_shards) -> Path:
    tree = recipe_dict(small_shards, tracking={"wandb": "offline"})
    tree["schedule"] = {"epochs": 2, "batch_size": 64}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def train(recipe: Path, output: Path, *flags: str) -> None:
    assert main(["train", "--recipe", str(recipe), "--output", str(output), *flags]) == 0


def fragments(run_dir: Path) -> list[dict]:
    """Every offline W&B run under ``run_dir/wandb``, oldest first."""
    return [read_offline_run(d) for d in sorted((run_dir / "wandb").glob("offline-run-*"))]


def stored_id(run_dir: Path) -> str:
    return json.loads((run_dir / RunDir.RUN_ID).read_text())["id"]


def test_outputs_with_the_same_basename_are_two_wandb_runs(tmp_path, recipe_file):
    a, b = tmp_path / "exp" / "a" / "lf", tmp_path / "exp" / "b" / "lf"
    train(recipe_file, a)
    train(recipe_file, b, "--set", "seed=1")
    ids = []
    for run_dir in (a, b):
        [only] = fragments(run_dir)
        assert only["run"]["run_id"] == stored_id(run_dir) != "lf"
        assert not only["run"].get("resume")  # a new run never asks W&B to append to an existing one
        assert sorted(only["history"]) == [0, 1]
        ids.append(only["run"]["run_id"])
    assert ids[0] != ids[1]


def test_resume_continues_the_same_wandb_run_and_overwrite_starts_a_new_one(tmp_path, recipe_file):
    run_dir = tmp_path / "exp" / "lf"
    train(recipe_file, run_dir)
    first_id = stored_id(run_dir)
    train(recipe_file, run_dir, "--resume", "--set", "schedule.epochs=3")
    assert stored_id(run_dir) == first_id
    before, after = fragments(run_dir)
    assert before["run"]["run_id"] == after["run"]["run_id"] == first_id
    assert not before["run"].get("resume") and after["run"]["resume"] is True
    assert sorted(before["history"]) == [0, 1] and sorted(after["history"]) == [2]  # history continues
    assert after["summary"]["test/acc"] == json.loads((run_dir / "result.json").read_text())["test"]["acc"]

    train(recipe_file, run_dir, "--overwrite")
    [fresh] = fragments(run_dir)  # the old run's files went with --overwrite
    assert fresh["run"]["run_id"] == stored_id(run_dir) != first_id
    assert not fresh["run"].get("resume") and sorted(fresh["history"]) == [0, 1]


def test_a_run_killed_with_its_wandb_run_open_logs_its_last_epoch_again_on_resume(tmp_path, recipe_file):
    """kill -9 right after an epoch is recorded can lose that epoch's W&B row (the W&B service
    had not flushed it); the resumed start logs the last recorded epoch again, so the synced
    history has every epoch."""
    run_dir = tmp_path / "run"
    tree = yaml.safe_load(recipe_file.read_text())
    tree["schedule"]["epochs"] = 3
    recipe = tmp_path / "three.yaml"
    recipe.write_text(yaml.safe_dump(tree))
    fault = {"rank": 0, "epoch": 1, "step": 0, "once_file": str(tmp_path / "fired"), "delay_s": 0}
    script = (
        "from mmbalance.engine.loop import run_training; from mmbalance.engine.run_spec import RunSpec; "
        f"run_training(RunSpec.of({tree!r}, {str(run_dir)!r}, verbose=False, fault={fault!r}))"
    )
    # Its own W&B service, as a separate command has: wandb hands its service address to child
    # processes, and a stream that a killed child left in this process's service keeps its id busy.
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_SERVICE")}
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert killed.returncode == 17, killed.stderr[-2000:]  # the fault hook's os._exit: no cleanup ran
    assert (run_dir / RunDir.TRACKING_OPEN).is_file()
    train(recipe, run_dir, "--resume")
    # The killed start's own file may be unreadable (here it usually holds not even the run record).
    resumed = read_offline_run(sorted((run_dir / "wandb").glob("offline-run-*"))[-1])
    assert sorted(resumed["history"]) == [0, 1, 2]  # epoch 0 again, then the epochs it trained
    assert not (run_dir / RunDir.TRACKING_OPEN).exists()

    train(recipe, run_dir, "--resume")  # a start that finished cleanly: nothing is logged again
    again = read_offline_run(sorted((run_dir / "wandb").glob("offline-run-*"))[-1])
    assert again["run"]["run_id"] == resumed["run"]["run_id"] and sorted(again["history"]) == []


def test_an_untracked_run_creates_no_id(tmp_path, recipe_file):
    run_dir = tmp_path / "quiet"
    train(recipe_file, run_dir, "--wandb", "disabled")
    assert not (run_dir / RunDir.RUN_ID).exists() and not (run_dir / "wandb").exists()


# -- a search: the driver's logger and the scoring phase ----------------------------------------------


def logger_actor_id(callback, trial_id: str, logdir: Path) -> str:
    """The id the callback's logging actor would pass to ``wandb.init`` for ``trial_id`` (Ray
    builds the actor with ``id=trial.trial_id``); constructing it starts no run."""
    actor = callback._logger_actor_cls(
        logdir=str(logdir), queue=None, exclude=[], to_config=[], id=trial_id, name=trial_id, project="mmbalance"
    )
    return actor.kwargs["id"]


def test_search_logger_and_scores_use_one_experiment_specific_trial_id(tmp_path, monkeypatch):
    from mmbalance.tracking.search_wandb import record_scores, search_callback

    monkeypatch.setenv("WANDB_MODE", "offline")  # prepare_driver sets it; restored after the test
    monkeypatch.chdir(tmp_path)  # the actor chdirs into its logdir
    cfg = TrackingConfig(wandb="offline")
    trial = "a1b2c_00000"
    ids, groups = {}, {}
    for name in ("study1", "study2"):
        out = tmp_path / name / "search"  # two experiments, same directory name, same trial id
        callback = search_callback(cfg, out, out / "trials")
        logged = logger_actor_id(callback, trial, tmp_path)
        record_scores(cfg, experiment_group(out), out, trial, {"test": {"acc": 0.5}})
        [scored] = [read_offline_run(d) for d in (out / "wandb").glob("offline-run-*")]
        assert scored["run"]["run_id"] == logged == trial_run_id(experiment_id(out), trial)
        assert callback.group == scored["run"]["run_group"] == experiment_group(out) != "search"
        groups[name] = callback.group
        assert scored["run"]["resume"] is True and scored["summary"]["test/acc"] == 0.5
        assert logged.endswith(trial)
        ids[name] = logged
    assert ids["study1"] != ids["study2"] and groups["study1"] != groups["study2"]


def test_scores_of_an_untracked_search_write_nothing(tmp_path):
    from mmbalance.tracking.search_wandb import record_scores

    record_scores(TrackingConfig(wandb="disabled"), "search", tmp_path / "s", "t_00000", {"test": {"acc": 1.0}})
    assert not (tmp_path / "s").exists()


def test_a_studys_runs_are_grouped_by_method_with_the_studys_id(tmp_path):
    study = tmp_path / "study"
    study_id = experiment_id(study, fresh=True)
    groups = {phase: experiment_group(study / "methods" / "mnl" / phase) for phase in ("search", "final")}
    assert groups == {"search": f"mnl-{study_id[:8]}", "final": f"mnl-{study_id[:8]}"}
    assert experiment_group(study / "methods" / "lf" / "search") == f"lf-{study_id[:8]}"
    # Outside a study (no study id above it) a "methods/<m>/search" folder is an ordinary search.
    plain = tmp_path / "other" / "methods" / "lf" / "search"
    assert experiment_group(plain) == f"search-{experiment_id(plain)[:8]}"
