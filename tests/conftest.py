"""Shared fixtures: a small synthetic shard directory and a recipe pointing at it."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import small_spec
from mmbalance.data.synthetic import prepare_synthetic


@pytest.fixture(scope="session")
def small_shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "small"
    prepare_synthetic(out, small_spec())
    return out


@pytest.fixture(scope="session")
def tri_shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "tri"
    prepare_synthetic(out, small_spec(modalities=3))
    return out


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray per test module, shut down before the next module starts: one Ray instance
    per host at any time (docs/architecture.md §R3), and test_jobs.py can start its own head."""
    import os

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # local tests only
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "60")
    import ray

    # The dashboard hosts the state API that Ray Train's PlacementGroupCleaner needs to free the
    # placement groups of trials Tune stops; without it they leak (docs/architecture.md §R3).
    ray.init(num_cpus=4, object_store_memory=200 * 1024**2, include_dashboard=True, log_to_driver=False)
    yield ray
    _no_read_ahead_outlives(ray)
    ray.shutdown()


def _no_read_ahead_outlives(ray) -> None:
    """A ``TrainBlocks`` read left running in this process when Ray shuts down kills the process
    (exit 1, no report) once the next module starts its Ray: fail the module here instead."""
    import threading

    alive = [t for t in threading.enumerate() if t.name == "mmbalance-train-read-ahead" and t.is_alive()]
    for thread in alive:  # let them end before the shutdown, so only this module fails
        thread.join(120)
    assert not alive, f"{len(alive)} TrainBlocks read-ahead thread(s) still running at the end of the module"
