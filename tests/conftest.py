"""Shared fixtures: a small synthetic shard directory and a recipe pointing at it."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import yaml

from mmbalance.data.synthetic import SyntheticModality, SyntheticSpec, prepare_synthetic

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def small_spec(modalities: int = 2, seed: int = 0) -> SyntheticSpec:
    names = ["audio", "visual", "text"][:modalities]
    signals = [0.55, 0.22, 0.3]
    return SyntheticSpec(samples={"train": 512, "val": 128, "test": 128}, classes=4,
                         modalities={m: SyntheticModality(dim=8, signal=s * 2) for m, s in zip(names, signals)}, seed=seed)


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


def recipe_dict(shards: Path, modalities=("audio", "visual"), **sections) -> dict:
    recipe = yaml.safe_load((REPO / "trainables" / "synthetic.yaml").read_text())
    recipe["data"]["path"] = str(shards)
    recipe["modalities"] = {m: {"encoder": "mlp", "params": {"hidden": [16], "out_dim": 8}} for m in modalities}
    recipe["schedule"] = {"epochs": 3, "batch_size": 32}
    recipe["eval"] = {"batch_size": 64}
    recipe["tracking"] = {"wandb": "disabled"}  # tests that check W&B turn it on themselves
    for key, value in sections.items():
        recipe[key] = value
    return recipe


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray per test module, shut down before the next module starts: one Ray instance
    per host at any time (ecosystem.md §2.8), and test_jobs.py can start its own head."""
    import os

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # local tests only
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "60")
    import ray

    # The dashboard hosts the state API that Ray Train's PlacementGroupCleaner needs to free the
    # placement groups of trials Tune stops; without it they leak (ecosystem.md §2.8).
    ray.init(num_cpus=4, object_store_memory=200 * 1024**2, include_dashboard=True, log_to_driver=False)
    yield ray
    ray.shutdown()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
