"""Training throughput fed by Ray Data vs by the in-process reader, same model and batches.

Both paths run the engine's training step on one worker: the in-process path from arrays in
memory, the Ray Data path from ``read_parquet -> map_batches(decode) ->
iter_torch_batches(local shuffle)`` exactly as a Ray Train worker consumes its shard.
Samples/s is measured over epochs after the first (steady state: Ray Data's first epoch
also pays for task start-up).

    python bench/data.py --recipe trainables/avdigits.yaml --shards shards/avdigits [--epochs 4]

Target (issue 4): Ray Data / in-process >= 0.8 at steady state.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from mmbalance.config import load_recipe
from mmbalance.data.shards import validate_shards
from mmbalance.engine.batches import epoch_seed
from mmbalance.engine.distributed import ProcessGroup
from mmbalance.engine.loop import Trainer
from mmbalance.engine.ray_data import build_datasets, train_fits_in_cache
from mmbalance.engine.sources import InMemorySource


class RayDataSource:
    """The Ray Data pipeline a worker sees, without the TorchTrainer around it."""

    def __init__(self, dataset, modalities, rows, seed, buffer):
        self.dataset, self.modalities, self.rows, self.seed, self.buffer = dataset, modalities, rows, seed, buffer

    def train_batches(self, epoch, batch_size):
        batches = self.dataset.iter_torch_batches(
            batch_size=batch_size,
            drop_last=True,
            local_shuffle_buffer_size=self.buffer,
            local_shuffle_seed=epoch_seed(self.seed, epoch),
        )
        return ((({m: b[m] for m in self.modalities}, b["label"]) for b in batches), self.rows // batch_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="trainables/avdigits.yaml")
    parser.add_argument("--shards", required=True)
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    recipe = load_recipe(args.recipe, [f"data.path={args.shards}"])
    manifest = validate_shards(args.shards)
    modalities = list(recipe.modalities)
    rows = manifest.splits[recipe.data.train_split].rows
    device = torch.device("cpu")
    batch = recipe.schedule.batch_size

    def measure(source) -> float:
        trainer = Trainer(recipe, manifest, ProcessGroup(), source, device)
        timed_samples, timed_seconds = 0, 0.0
        for epoch in range(args.epochs):
            started = time.perf_counter()
            trainer.train_epoch(epoch)
            if epoch > 0:  # steady state
                timed_seconds += time.perf_counter() - started
                timed_samples += (rows // batch) * batch
        return timed_samples / timed_seconds

    local = measure(InMemorySource(recipe, manifest, device))
    ray.init(num_cpus=4, object_store_memory=500 * 1024**2, include_dashboard=False, log_to_driver=False)
    try:
        streamed = measure(
            RayDataSource(
                build_datasets(recipe, manifest, str(args.shards), workers=1)["train"],
                modalities,
                rows,
                recipe.seed,
                max(4 * batch, 256),
            )
        )
        cached = measure(
            RayDataSource(
                build_datasets(recipe, manifest, str(args.shards), workers=1, cache_train=True)["train"],
                modalities,
                rows,
                recipe.seed,
                rows,
            )
        )
        fits = train_fits_in_cache(recipe, manifest)
    finally:
        ray.shutdown()
    print(
        f"recipe={args.recipe} rows={rows} batch={batch} epochs timed={args.epochs - 1} "
        f"threads={torch.get_num_threads()}"
    )
    print(f"in-process reader: {local:10.0f} samples/s")
    print(f"Ray Data, streamed train (file shuffle + buffer): {streamed:10.0f} samples/s  ratio {streamed / local:.2f}")
    print(f"Ray Data, cached train (full-shard shuffle):      {cached:10.0f} samples/s  ratio {cached / local:.2f}")
    chosen = cached if fits else streamed
    print(
        f"this dataset {'fits' if fits else 'does not fit'} the cache: the trainer uses the "
        f"{'cached' if fits else 'streamed'} path; ratio Ray Data / in-process: {chosen / local:.2f} (target >= 0.80)"
    )


if __name__ == "__main__":
    main()
