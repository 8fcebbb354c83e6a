"""The Train driver: one recipe -> one ``TorchTrainer`` run over N data-parallel workers.

Called by ``mmbalance train --workers N`` and by every Tune trial with workers, so the two never
drift. Workers run ``engine.loop.train_loop_per_worker`` unchanged; this module only wires
datasets, scaling, failure handling (``launch/failure_policy.py``: only recoverable failures are
retried) and checkpoint retention.
"""

from __future__ import annotations

import os
from pathlib import Path

from mmbalance.data.manifest import Manifest
from mmbalance.engine.loop import train_loop_per_worker
from mmbalance.engine.ray_data import build_datasets, split_config, train_fits_in_cache
from mmbalance.engine.run_spec import RunSpec

# Fail a resource-starved start in minutes, not forever (docs/architecture.md §R4).
CONTROLLER_FAILURE_LIMIT = 3


def fit(
    spec: RunSpec,
    manifest: Manifest,
    *,
    workers: int,
    gpus_per_worker: float = 0.0,
    max_failures: int = 1,
    storage_path: str | None = None,
    name: str | None = None,
    callbacks: list | None = None,
):
    """Train ``spec`` on ``workers`` ranks. The caller has validated the shards against their
    checksums (``spec.shards_checked``): every rank then checks only their schema."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from mmbalance.launch import failure_policy

    failure_policy.install()  # max_failures counts worker deaths; a deterministic error is raised at once
    recipe = spec.recipe
    output_dir = spec.output.resolve()
    data_root = recipe.data.path if "://" in recipe.data.path else str(Path(recipe.data.path).resolve())
    recipe = recipe.model_copy(update={"data": recipe.data.model_copy(update={"path": data_root})})
    use_gpu = gpus_per_worker > 0
    resources = {"CPU": 1, "GPU": gpus_per_worker} if use_gpu else {"CPU": 1}
    cache_train = train_fits_in_cache(recipe, manifest)
    spec = spec.but(recipe=recipe, output=output_dir, where="train", train_cached=cache_train)
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "120")
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources),
        datasets=build_datasets(recipe, manifest, data_root, workers, cache_train=cache_train),
        dataset_config=split_config(),
        run_config=ray.train.RunConfig(
            name=name or output_dir.name,  # stable: a rerun with the same name resumes
            storage_path=storage_path or str(output_dir / "ray"),
            failure_config=ray.train.FailureConfig(
                max_failures=max_failures, controller_failure_limit=CONTROLLER_FAILURE_LIMIT
            ),
            # Keep the best-by-val checkpoint; Ray always keeps the latest as well.
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute="val/acc_fused", checkpoint_score_order="max"
            ),
            callbacks=callbacks or [],  # Tune trials pass TuneReportCallback: every epoch reaches the scheduler
        ),
    )
    return trainer.fit()
