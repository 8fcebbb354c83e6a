"""``mmbalance train``: one recipe, in this process or data-parallel on Ray Train (``--workers``)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from mmbalance import outputs, shipped
from mmbalance.config import ConfigError, check_against_data, load_recipe
from mmbalance.data import storage
from mmbalance.data.shards import validate_shards
from mmbalance.layout import RunDir


@dataclass(frozen=True)
class RayOptions:
    """Where a data-parallel run goes: a cluster address, Ray's storage and restarts."""

    address: str | None = None
    storage: str | None = None
    max_failures: int = 1


def train(
    recipe: str,
    *,
    overrides: list[str],
    output: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    ray: RayOptions = RayOptions(),
    force_ray: bool = False,
) -> dict:
    """Validate the recipe against its data (a bad shard stops here, before any worker starts),
    claim the run directory, train, print the result line. ``force_ray``: ``--workers`` was
    given, so even one worker runs as a TorchTrainer."""
    from mmbalance.engine.run_spec import RunSpec

    launched = time.time()
    recipe_file = shipped.resolve("recipe", recipe)
    checked = absolute_data(load_recipe(recipe_file, overrides))
    manifest = validate_shards(checked.data.path)
    check_against_data(checked, manifest)
    run = RunDir(output or Path("runs") / recipe_file.stem)
    prepare_run_dir(run, resume=resume, overwrite=overwrite, reads=storage.local_paths(checked.data.path))
    spec = RunSpec(checked, run.path, resume=resume, shards_checked=True, launched_at=launched)  # validated above
    started = time.perf_counter()
    if force_ray or checked.scaling.workers > 1:
        result = _train_on_ray(spec, manifest, ray)
    else:
        from mmbalance.engine.loop import run_training

        result = run_training(spec)
    _print_result(result, run, time.perf_counter() - started)
    return result


def absolute_data(recipe):
    """The recipe with a local ``data.path`` made absolute: ``config.yaml`` records it, and
    `mmbalance eval` (or a resume) from another directory must find the same data."""
    return recipe.model_copy(
        update={"data": recipe.data.model_copy(update={"path": storage.absolute(recipe.data.path)})}
    )


def prepare_run_dir(run: RunDir, *, resume: bool, overwrite: bool, reads: list[str]) -> None:
    """Resume needs a checkpoint; a finished run needs --resume or --overwrite; --overwrite removes
    only what a run writes (Ray's run state included, which would otherwise be restored)."""
    if resume:
        if not run.checkpoint("latest").is_dir():
            raise ConfigError(f"--resume: {run.path} has no checkpoints/latest to resume from")
    elif run.holds_run() and not overwrite:
        raise ConfigError(f"{run.path} already holds a run; pass --resume to continue it or --overwrite to replace it")
    elif overwrite and run.path.exists():
        outputs.clear(run.path, outputs.RUN, reads)
    outputs.claim(run.path, outputs.RUN)


def _train_on_ray(spec, manifest, ray: RayOptions) -> dict:
    from mmbalance.launch.cluster import Request, check_fits, connect
    from mmbalance.launch.train_driver import fit

    scaling = spec.recipe.scaling
    request = Request(workers=scaling.workers, gpus_per_worker=scaling.gpus_per_worker)
    started_here = connect(request, ray.address)
    check_fits(request, autoscaling=not started_here)
    spec = spec.but(ray_ready_at=time.time())
    fit(
        spec,
        manifest,
        workers=request.workers,
        gpus_per_worker=request.gpus_per_worker,
        max_failures=ray.max_failures,
        storage_path=ray.storage,
    )
    result_file = RunDir(spec.output).result
    if not result_file.is_file():
        raise RuntimeError(
            f"training finished but {result_file} is missing (on a multi-node cluster --output must be "
            "on storage every node shares)"
        )
    return json.loads(result_file.read_text())


def _print_result(result: dict, run: RunDir, seconds: float) -> None:
    test = result["test"]
    per_mod = ", ".join(f"{m} {acc:.4f}" for m, acc in test["acc_per_modality"].items())
    print(
        f"best val acc {result['val']['best_acc']:.4f} (epoch {result['val']['best_epoch']}); "
        f"test acc {test['acc']:.4f} (per modality: {per_mod}); {seconds:.1f}s"
    )
    print(f"run written to {run.path} (result.json, metrics.jsonl, config.yaml, checkpoints/)")
