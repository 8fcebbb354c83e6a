"""The fault matrix (docs/faults.md): during a search, kill a Ray Train worker, a trial process or
the driver, then resume; nothing finished runs again, no epoch is recorded twice, every trial ends
with a result, and every placement group and CPU is given back (slow)."""

import json
import shutil
import signal
import subprocess
import time

import pandas as pd
import pytest
import yaml

from helpers import recipe_dict
from helpers.ray_resources import settled_resources
from mmbalance.tune.search import SearchRun, run_search
from mmbalance.tune.space import SearchSpace

pytestmark = pytest.mark.integration


def _recipe(shards, epochs):
    tree = recipe_dict(shards)
    tree["schedule"] = {"epochs": epochs, "batch_size": 32}
    return tree


def _space(trials, workers, max_concurrent, scheduler=None):
    return {
        "space": {"optim.lr": {"grid": [0.001 * (i + 1) for i in range(trials)]}},
        "scheduler": scheduler or {"name": "fifo"},
        "max_concurrent": max_concurrent,
        "workers": workers,
    }


def _finished(out):
    """Every trial that has ended — trained every epoch (``result.json``) or was stopped by the
    scheduler (``ended.json``, written by the driver) — : trial id -> its record's text."""
    if not (out / "trials").is_dir():
        return {}
    return {
        d.name: tuple(
            (d / f).read_text() if (d / f).is_file() else None for f in ("result.json", "ended.json", "metrics.jsonl")
        )
        for d in (out / "trials").iterdir()
        if (d / "result.json").is_file() or (d / "ended.json").is_file()
    }


def _epochs(run_dir):
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.is_file() else []
    return [json.loads(line)["epoch"] for line in lines if line.strip()]


def _check_search(out, trials, epochs, stopped_early=False):
    """Every trial ends with a scored result, each epoch recorded once and in order."""
    frame = pd.read_parquet(out / "results.parquet")
    assert len(frame) == trials and frame["trial_id"].is_unique
    reasons = {"completed", "stopped_early"} if stopped_early else {"completed"}
    assert set(frame["stop_reason"]) <= reasons, frame[["trial_id", "stop_reason"]]
    assert frame["test_acc"].notna().all() and frame["best_val"].notna().all()
    for row in frame.itertuples():
        recorded = _epochs(out / "trials" / row.trial_id)
        assert recorded == list(range(len(recorded))), (row.trial_id, recorded)  # no epoch twice, none left out
        assert len(recorded) >= row.epochs_run
        if row.stop_reason == "completed":
            assert row.epochs_run == epochs and len(recorded) == epochs, (row.trial_id, recorded)
    return frame


def _check_released(ray, baseline):
    from ray.util import placement_group_table

    now = settled_resources(ray, baseline)
    assert now.get("CPU") == baseline.get("CPU") and now.get("GPU", 0) == baseline.get("GPU", 0), (now, baseline)
    deadline = time.time() + 60
    while time.time() < deadline and any(pg["state"] != "REMOVED" for pg in placement_group_table().values()):
        time.sleep(1.0)
    assert all(pg["state"] == "REMOVED" for pg in placement_group_table().values()), placement_group_table()


def _resumed_from(out):
    return {
        p.parent.name: json.loads(p.read_text())["resumed_from_epoch"] for p in (out / "trials").glob("*/result.json")
    }


def _resume_changes_nothing(space, tree, out, trials, epochs):
    """A resume after a search that recovered by itself trains nothing and rewrites no trial record."""
    before = _finished(out)
    assert len(before) == trials
    run_search(space, tree, out, SearchRun(resume=True))
    assert _finished(out) == before
    _check_search(out, trials, epochs)


def test_killed_train_worker_is_restarted_from_its_checkpoint(ray_cluster, small_shards, tmp_path):
    """Fault 1: a trial's Ray Train worker dies mid-epoch; Train restarts its worker group from the
    trial's latest reported checkpoint; the other trial is untouched."""
    baseline = ray_cluster.available_resources()
    marker = tmp_path / "worker-killed"
    space = SearchSpace.model_validate(_space(trials=2, workers=1, max_concurrent=2))
    tree, out = _recipe(small_shards, epochs=3), tmp_path / "search"
    run_search(space, tree, out, SearchRun(fault={"rank": 0, "epoch": 1, "step": 2, "once_file": str(marker)}))
    assert marker.exists(), "the fault hook must have killed a Train worker"
    _check_search(out, trials=2, epochs=3)
    # Exactly one trial was restarted, from epoch 0's checkpoint, not from scratch.
    assert sorted(_resumed_from(out).values(), key=str) == [1, None]
    _check_released(ray_cluster, baseline)

    _resume_changes_nothing(space, tree, out, trials=2, epochs=3)
    _check_released(ray_cluster, baseline)


def test_killed_trial_process_is_retried_from_its_checkpoint(ray_cluster, small_shards, tmp_path):
    """Fault 2: an in-trial training process (``workers: 0``) dies mid-epoch; Tune retries the
    trial from its latest checkpoint (FailureConfig(max_failures=1))."""
    baseline = ray_cluster.available_resources()
    marker = tmp_path / "trial-killed"
    space = SearchSpace.model_validate(_space(trials=3, workers=0, max_concurrent=2))
    tree, out = _recipe(small_shards, epochs=4), tmp_path / "search"
    run_search(
        space, tree, out, SearchRun(fault={"rank": 0, "epoch": 2, "step": 1, "once_file": str(marker), "delay_s": 2.0})
    )
    assert marker.exists(), "the fault hook must have killed a trial process"
    _check_search(out, trials=3, epochs=4)
    assert sorted(_resumed_from(out).values(), key=str) == [2, None, None]
    _check_released(ray_cluster, baseline)

    _resume_changes_nothing(space, tree, out, trials=3, epochs=4)
    _check_released(ray_cluster, baseline)


@pytest.fixture(scope="module")
def slow_shards(tmp_path_factory):
    """Like ``small_shards`` with 16x the train rows: an epoch takes about a second, not 50 ms, so
    the driver can be killed while a trial is between epochs."""
    from helpers import small_spec
    from mmbalance.data.synthetic import prepare_synthetic

    spec = small_spec()
    out = tmp_path_factory.mktemp("faults") / "slow"
    prepare_synthetic(out, spec.model_copy(update={"samples": {**spec.samples, "train": 16 * spec.samples["train"]}}))
    return out


def test_killed_driver_resumes_without_rerunning_ended_trials(ray_cluster, slow_shards, tmp_path):
    """Fault 3: ``mmbalance tune`` itself is SIGKILLed (no chance to save Tune's state); ``--resume``
    finishes the search from what is on disk: no ended trial (finished, or stopped by ASHA) trains
    again, and the trial that was running continues from its run directory's latest checkpoint."""
    baseline = ray_cluster.available_resources()
    trials, epochs = 4, 6
    space_file, recipe = tmp_path / "space.yaml", tmp_path / "recipe.yaml"
    # grace_period 2: every trial trains at least two epochs, so each one is running (recorded an
    # epoch, not ended) for at least an epoch's time, and the poll below cannot miss them all.
    asha = {"name": "asha", "grace_period": 2, "reduction_factor": 2, "max_t": epochs}
    space_file.write_text(yaml.safe_dump(_space(trials=trials, workers=0, max_concurrent=1, scheduler=asha)))
    recipe.write_text(yaml.safe_dump(_recipe(slow_shards, epochs)))
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
    driver = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # Kill once two trials have ended and a third has recorded an epoch: ended, running and pending
    # trials all exist, and Tune's periodic state snapshot (every 10 s) lags behind them.
    deadline, running = time.time() + 240, []
    while time.time() < deadline and driver.poll() is None and not running:
        ended = _finished(out)
        running = (
            [d for d in (out / "trials").iterdir() if d.name not in ended and _epochs(d)] if len(ended) >= 2 else []
        )
        time.sleep(0.05)
    driver.send_signal(signal.SIGKILL)
    log = driver.communicate(timeout=60)[0]
    assert driver.returncode == -signal.SIGKILL and running, log[-3000:]
    _check_released(ray_cluster, baseline)  # the dead driver's trials, actors and placement groups are gone
    ended_before = _finished(out)
    assert 2 <= len(ended_before) < trials, log[-3000:]
    assert not (out / "results.parquet").exists()

    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    frame = _check_search(out, trials, epochs, stopped_early=True)
    ended_after = _finished(out)
    for trial_id, record in ended_before.items():
        # Ended trials were not trained again: their records are byte for byte the same.
        assert ended_after[trial_id] == record, trial_id
    killed = running[0].name
    if killed not in ended_before and (running[0] / "result.json").is_file():
        # It went on from its own latest checkpoint, not from Tune's older state or from scratch.
        assert json.loads((running[0] / "result.json").read_text())["resumed_from_epoch"] >= 1
    assert set(frame["trial_id"]) == set(ended_after)
    _check_released(ray_cluster, baseline)
