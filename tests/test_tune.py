"""Ray Tune integration: ASHA over Train-in-Tune trials, leak check, scoring, SIGINT + resume (slow)."""

import shutil
import signal
import subprocess
import time

import pandas as pd
import pytest
import yaml

from helpers import recipe_dict
from helpers.ray_resources import settled_resources
from helpers.wandb_offline import read_offline_run
from mmbalance.tracking.records import experiment_id, trial_run_id
from mmbalance.tune.search import run_search
from mmbalance.tune.space import SearchSpace

pytestmark = pytest.mark.integration


def test_asha_over_torch_trainers_scores_every_trial_and_leaks_nothing(ray_cluster, small_shards, tmp_path):
    from ray.util import placement_group_table

    baseline = ray_cluster.available_resources()
    space = SearchSpace.model_validate(
        {
            "space": {"optim.lr": {"loguniform": [0.0005, 0.05]}},
            "seeds": [0, 1],
            "samples": 2,  # 4 Train-in-Tune trials: each costs ~50 s on 2 cores
            "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2, "max_t": 3},
            "max_concurrent": 2,
            "workers": 1,
        }
    )
    tree = recipe_dict(small_shards)
    tree["schedule"] = {"epochs": 3, "batch_size": 32}
    frame = run_search(space, tree, tmp_path / "search")

    assert len(frame) == 4
    assert set(frame["stop_reason"]) <= {"completed", "stopped_early"}
    assert (frame["epochs_run"] <= 3).all() and (frame["stop_reason"] == "completed").any()
    # Every trial, stopped early or not, is scored on test from its best-val checkpoint.
    assert frame["test_acc"].notna().all() and (frame["test_samples"] == 128).all()
    for column in ("robust_missing_audio", "robust_missing_visual", "test_acc_audio", "test_acc_visual", "best_val"):
        assert frame[column].notna().all(), column
    saved = pd.read_parquet(tmp_path / "search" / "results.parquet")
    assert list(saved["trial_id"]) == list(frame["trial_id"])
    assert (tmp_path / "search" / "results.csv").is_file()

    now = settled_resources(ray_cluster, baseline)
    assert now.get("CPU") == baseline.get("CPU") and now.get("GPU", 0) == baseline.get("GPU", 0)
    assert all(pg["state"] == "REMOVED" for pg in placement_group_table().values())


def test_a_second_sigint_stops_the_search_at_once(ray_cluster, small_shards, tmp_path):
    """Tune ends a search gracefully on the first SIGINT (saving its state, finishing the W&B
    runs within search_wandb.FINISH_WAIT_S); a second one must skip that and exit now."""
    space_file = tmp_path / "space.yaml"
    space_file.write_text(
        yaml.safe_dump(
            {
                "space": {"optim.lr": {"choice": [0.001, 0.002]}},
                "samples": 2,
                "scheduler": {"name": "fifo"},
                "max_concurrent": 2,
                "workers": 0,
            }
        )
    )
    recipe = tmp_path / "recipe.yaml"
    tree = recipe_dict(small_shards, tracking={"wandb": "offline"})
    tree["schedule"] = {"epochs": 200, "batch_size": 32}
    recipe.write_text(yaml.safe_dump(tree))
    out = tmp_path / "search"
    search = subprocess.Popen(
        [
            shutil.which("mmbalance"),
            "tune",
            str(space_file),
            "--recipe",
            str(recipe),
            "--output",
            str(out),
            "--address",
            ray_cluster.get_runtime_context().gcs_address,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 240
    while not list((out / "trials").glob("*/metrics.jsonl")) and time.time() < deadline:
        time.sleep(0.5)
    assert list((out / "trials").glob("*/metrics.jsonl")), "no trial reported an epoch in time"
    search.send_signal(signal.SIGINT)
    time.sleep(0.5)
    search.send_signal(signal.SIGINT)
    second = time.monotonic()
    log = search.communicate(timeout=60)[0]
    stop_s = time.monotonic() - second
    print(f"second SIGINT to exit: {stop_s:.1f} s")
    assert search.returncode == 130, log[-3000:]
    assert stop_s < 10, log[-3000:]
    assert "interrupted; stopped without the final save" in log and "Traceback" not in log, log[-3000:]


def test_interrupted_search_resumes_without_rerunning_finished_trials(ray_cluster, small_shards, tmp_path):
    """Ctrl-C once while the last trials run and none waits to start: Tune marks the trials it
    stops as terminated, so only the press itself says the search did not end (exit 130, not
    results scored from half-trained trials)."""
    space_file = tmp_path / "space.yaml"
    space_file.write_text(
        yaml.safe_dump(
            {
                "space": {"optim.lr": {"choice": [0.001, 0.002, 0.003, 0.004]}},
                "samples": 4,
                "scheduler": {"name": "fifo"},
                "max_concurrent": 2,
                "workers": 0,
            }
        )
    )
    recipe = tmp_path / "recipe.yaml"
    tree = recipe_dict(small_shards, tracking={"wandb": "offline"})
    tree["schedule"] = {"epochs": 8, "batch_size": 32}
    recipe.write_text(yaml.safe_dump(tree))
    out = tmp_path / "search"
    command = [
        shutil.which("mmbalance"),
        "tune",
        str(space_file),
        "--recipe",
        str(recipe),
        "--output",
        str(out),
        "--address",
        ray_cluster.get_runtime_context().gcs_address,
    ]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240

    def last_two_running():  # two trials ended, the other two have reported an epoch
        ended = len(list((out / "trials").glob("*/result.json")))
        return ended >= 2 and len(list((out / "trials").glob("*/metrics.jsonl"))) == 4

    while not last_two_running() and time.time() < deadline:
        time.sleep(0.2)
    done_before = {p.parent.name: p.read_text() for p in (out / "trials").glob("*/result.json")}
    assert last_two_running(), "the trials did not get to the point to interrupt in time"
    first.send_signal(signal.SIGINT)
    interrupted = time.monotonic()
    log = first.communicate(timeout=120)[0]
    stop_s = time.monotonic() - interrupted
    print(f"SIGINT to exit: {stop_s:.1f} s")
    assert first.returncode == 130, log[-3000:]
    assert stop_s < 30, log[-3000:]  # the W&B logging actors' finish is bounded (search_wandb.FINISH_WAIT_S)
    assert "--resume" in log
    assert not (out / "results.parquet").exists()

    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    frame = pd.read_parquet(out / "results.parquet")
    assert len(done_before) < 4, "every trial ended before the interrupt: the case was not exercised"
    assert len(frame) == 4 and frame["test_acc"].notna().all()
    assert (frame["epochs_run"] == 8).all()  # the interrupted trials ran to the end on --resume
    for trial_id, text in done_before.items():
        # Finished trials were not trained again: their records are untouched.
        assert (out / "trials" / trial_id / "result.json").read_text() == text
        assert len((out / "trials" / trial_id / "metrics.jsonl").read_text().splitlines()) == 8
    # One offline W&B run per trial, grouped by the experiment: every reported epoch, logged by the
    # driver, and the final scores in its summary.
    # The id is the search's own id + the trial id (tracking/records.py): unique across experiments.
    experiment = experiment_id(out)
    for trial_id in frame["trial_id"]:
        run_id = trial_run_id(experiment, trial_id)
        fragments = [read_offline_run(d) for d in sorted((out / "wandb").glob(f"offline-run-*-{run_id}"))]
        assert fragments, trial_id
        assert {f["run"]["run_id"] for f in fragments} == {run_id}
        # Grouped by the experiment: its directory name and its own id (never the name alone).
        assert {f["run"]["run_group"] for f in fragments} == {f"search-{experiment[:8]}"}
        epochs = sorted(row["epoch"] for f in fragments for row in f["history"].values() if "epoch" in row)
        assert epochs == list(range(8)), (trial_id, epochs)  # nothing lost, nothing twice
        assert any("val/acc_fused" in row for f in fragments for row in f["history"].values())
        summary = {k: v for f in fragments for k, v in f["summary"].items()}
        assert summary["test/acc"] == pytest.approx(frame.set_index("trial_id").loc[trial_id, "test_acc"])
