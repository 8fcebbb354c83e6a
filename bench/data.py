"""Training throughput fed by Ray Data vs by the in-process reader, same model and batches.

Both paths run the engine's training step on one worker: the in-process path from arrays in
memory, the Ray Data path from ``read_parquet`` iterated exactly as a Ray Train worker consumes
its shard (``engine/ray_data.iter_train_batches``: whole Arrow blocks decoded to numpy views,
seeded shuffle windows, tensors built in a background thread, the next epoch's read started
while the last window trains: ``TrainBlocks``). Samples/s is measured over
epochs after the first (steady state: Ray Data's first epoch also pays for task start-up).
Two cases, each printed with its in-process number and the ratio in one run:

- ``avdigits``: the AV-digits shards and ``trainables/avdigits.yaml`` (small CNNs); prepared
  from ``../shared/data/fsdd_mnist`` into ``--out`` unless ``--avdigits-shards`` names them.
  Its train split (32 MB) fits the cache, so the trainer would use the cached path; both the
  streamed and the cached path are measured. Target: streamed / in-process >= 0.9.
- ``cremad``: CREMA-D-sized synthetic rows (uint8 frames [3, 224, 224] with ImageNet
  normalisation, a float32 log-spectrogram [257, 188]; 344 KB a row, 6 classes) with a train
  split 4x the cache threshold of the Ray this bench starts (a quarter of its 512 MiB object
  store: 1562 rows in 195-row files, as the converters cut them), so the trainer would stream
  it. The model is ``trainables/cremad.yaml`` with a light MLP per modality instead of two
  ResNet-18s, which train at a few samples/s on CPU and would hide the input path entirely;
  at a few hundred samples/s the input path is what the ratio measures. Target: >= 0.8.

Both cases are written with the tensor columns in ``--encoding`` (default ``bytes``, the layout
``mmbalance prepare`` gives the streamed benchmarks; ``tensor`` for Parquet fixed-size lists,
whose read costs about twenty times more CPU: docs/data-format.md). The in-process reader loads
the shards into memory before timing, so the layout changes only the Ray Data numbers.

``--paths ray-buffer`` adds the previous worker loop (Ray's ``iter_torch_batches`` with
``local_shuffle_buffer_size``) for comparison, ``--paths no-read-ahead`` the windows without
``TrainBlocks`` (every epoch's read starts when the epoch does). Defaults take about 2 minutes on 2 cores (shards
are generated once and kept under ``--out``; 4 epochs per path, 3 timed).

    python bench/data.py [--cases avdigits cremad] [--epochs 4] [--paths window no-read-ahead ray-buffer]
        [--encoding bytes|tensor]
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
FSDD_MNIST = REPO.parent / "shared" / "data" / "fsdd_mnist"
OBJECT_STORE = 512 * 1024**2
CACHE_SHARE = 0.25  # engine/ray_data.train_fits_in_cache's default
CREMAD_CLASSES = 6
CREMAD_EVAL_ROWS = 64
CREMAD_MODEL = {"encoder": "mlp", "params": {"hidden": [32], "out_dim": 32}}


class InProcess:
    name = "in-process reader"

    def __init__(self, recipe, manifest):
        from mmbalance.engine.sources import InMemorySource

        self.source = InMemorySource(recipe, manifest, torch.device("cpu"))

    def train_batches(self, epoch, batch_size):
        return self.source.train_batches(epoch, batch_size)


class RayDataWorker:
    """The train shard as a Ray Train worker iterates it, without the TorchTrainer around it."""

    def __init__(self, name, dataset, recipe, manifest, cached, path="window", epochs=None):
        from mmbalance.engine.ray_data import TrainBlocks

        self.name, self.dataset, self.recipe, self.manifest = name, dataset, recipe, manifest
        self.modalities = list(recipe.modalities)
        self.rows = manifest.splits[recipe.data.train_split].rows
        self.cached, self.path, self.epochs = cached, path, epochs
        # One iterator for all epochs, as a worker's shard; the next epoch's read starts early.
        self.blocks = TrainBlocks(dataset.iterator(), lead_rows=0)

    def train_batches(self, epoch, batch_size):
        from mmbalance.engine.batches import epoch_seed

        seed = epoch_seed(self.recipe.seed, epoch)
        if self.path == "ray-buffer":  # the loop before engine/ray_data's windows: Ray's local shuffle buffer
            from mmbalance.data.shards import decode_batch
            from mmbalance.engine.ray_data import BlockDecoder

            buffer = self.rows if self.cached else max(4 * batch_size, 256)
            # Decoded in the read tasks, as that loop did.
            fn_kwargs = BlockDecoder.of(self.recipe, self.manifest).fn_kwargs()
            decoded = self.dataset.map_batches(decode_batch, batch_format="pyarrow", fn_kwargs=fn_kwargs)
            batches = decoded.iter_torch_batches(
                batch_size=batch_size, drop_last=True, local_shuffle_buffer_size=buffer, local_shuffle_seed=seed
            )
        else:
            from mmbalance.engine.ray_data import BlockDecoder, iter_train_batches, row_bytes, shuffle_window

            window = shuffle_window(batch_size, row_bytes(self.recipe, self.manifest), self.rows, cached=self.cached)
            # As the worker does: no read ahead of an epoch that will not run.
            last = self.epochs is not None and epoch + 1 >= self.epochs
            self.blocks.lead_rows = 0 if last else window
            # "no-read-ahead": each epoch's read starts when the epoch does (before TrainBlocks).
            shard = self.blocks if self.path == "window" else self.dataset.iterator()
            batches = iter_train_batches(
                shard,
                batch_size,
                buffer=window,
                seed=seed,
                corruptor=None,
                epoch=epoch,
                modalities=self.modalities,
                decode=BlockDecoder.of(self.recipe, self.manifest),
            )
        pairs = (({m: b[m] for m in self.modalities}, b["label"]) for b in batches)
        return pairs, self.rows // batch_size


def measure(recipe, manifest, source, epochs: int) -> float:
    from mmbalance.engine.distributed import ProcessGroup
    from mmbalance.engine.loop import Trainer

    trainer = Trainer(recipe, manifest, ProcessGroup(), source, torch.device("cpu"))
    batch = recipe.schedule.batch_size
    rows = manifest.splits[recipe.data.train_split].rows
    timed_samples, timed_seconds = 0, 0.0
    for epoch in range(epochs):
        started = time.perf_counter()
        trainer.train_epoch(epoch)
        if epoch > 0:  # steady state
            timed_seconds += time.perf_counter() - started
            timed_samples += (rows // batch) * batch
    return timed_samples / timed_seconds


def cremad_row_bytes() -> int:
    return 8 + 3 * 224 * 224 + 257 * 188 * 4


def cremad_train_rows() -> int:
    """Rows whose decoded size is 4x the cache threshold of OBJECT_STORE."""
    return math.ceil(4 * CACHE_SHARE * OBJECT_STORE / cremad_row_bytes())


def write_cremad_sized(out: Path, train_rows: int, seed: int = 0, encoding: str = "bytes"):
    """Synthetic shards shaped like CREMA-D's (random pixels and spectrograms, random labels)."""
    from mmbalance.data.convert.media import IMAGENET_MEAN, IMAGENET_STD
    from mmbalance.data.manifest import ModalitySpec, Normalization
    from mmbalance.data.shards import SplitArrays, rows_per_file_for, write_shards

    modalities = {
        "audio": ModalitySpec(
            dtype="float32", shape=[257, 188], normalize=Normalization(mean=[0.0], std=[1.0], source="synthetic")
        ),
        "visual": ModalitySpec(
            dtype="uint8",
            shape=[3, 224, 224],
            normalize=Normalization(mean=IMAGENET_MEAN, std=IMAGENET_STD, axis=0, source="ImageNet"),
        ),
    }
    rng = np.random.default_rng(seed)
    splits = {}
    for split, n in {"train": train_rows, "val": CREMAD_EVAL_ROWS, "test": CREMAD_EVAL_ROWS}.items():
        splits[split] = SplitArrays(
            sample_ids=[f"{split}-{i:06d}" for i in range(n)],
            labels=rng.integers(0, CREMAD_CLASSES, n).astype(np.int64),
            modalities={
                "audio": rng.standard_normal((n, 257, 188), dtype=np.float32),
                "visual": rng.integers(0, 256, (n, 3, 224, 224), dtype=np.uint8),
            },
        )
    return write_shards(
        out,
        dataset="cremad-sized",
        classes=[f"emotion_{c}" for c in range(CREMAD_CLASSES)],
        modalities=modalities,
        splits=splits,
        generator={"name": "bench/data.py", "train_rows": train_rows, "seed": seed},
        preprocessing={},
        rows_per_file=rows_per_file_for(modalities),
        overwrite=True,
        encoding=encoding,
    )


def prepare_cases(
    names: list[str], out: Path, avdigits_shards: str | None, encoding: str = "bytes"
) -> dict[str, tuple]:
    """name -> (recipe, manifest, shard dir), generating shards (tensor columns in ``encoding``)
    that are not there yet."""
    from mmbalance.config import load_recipe_dict, validate_recipe
    from mmbalance.data.manifest import read_manifest
    from mmbalance.data.shards import validate_shards

    cases = {}
    if "avdigits" in names:
        shards = Path(avdigits_shards) if avdigits_shards else out / f"avdigits-{encoding}"
        if not (shards / "manifest.json").is_file():
            from mmbalance.data.avdigits import prepare_avdigits

            prepare_avdigits(FSDD_MNIST, shards, overwrite=True, encoding=encoding)
        tree = load_recipe_dict(REPO / "trainables" / "avdigits.yaml", [f"data.path={shards}"])
        cases["avdigits"] = (validate_recipe(tree), validate_shards(shards), shards)
    if "cremad" in names:
        rows = cremad_train_rows()
        shards = out / f"cremad-sized-{rows}-{encoding}"
        manifest_path = shards / "manifest.json"
        if not manifest_path.is_file() or read_manifest(shards).splits["train"].rows != rows:
            write_cremad_sized(shards, rows, encoding=encoding)
        tree = load_recipe_dict(REPO / "trainables" / "cremad.yaml", [f"data.path={shards}"])
        tree["modalities"] = {m: dict(CREMAD_MODEL) for m in ("audio", "visual")}
        tree["optim"] = {"name": "adam", "lr": 0.001}
        tree["eval"] = {"batch_size": 128}
        cases["cremad"] = (validate_recipe(tree), validate_shards(shards), shards)
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=["avdigits", "cremad"], default=["avdigits", "cremad"])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--paths", nargs="+", choices=["window", "no-read-ahead", "ray-buffer"], default=["window"])
    parser.add_argument(
        "--avdigits-shards", default=None, help="existing AV-digits shards (default: --out/avdigits-<encoding>)"
    )
    parser.add_argument("--encoding", choices=["bytes", "tensor"], default="bytes", help="tensor column layout")
    parser.add_argument("--out", type=Path, default=Path("/tmp/mmbalance-bench-data"))
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from mmbalance.engine.ray_data import build_datasets, train_fits_in_cache

    cases = prepare_cases(args.cases, args.out, args.avdigits_shards, args.encoding)
    results: dict[str, list[tuple[str, float]]] = {name: [] for name in cases}
    for name, (recipe, manifest, _) in cases.items():
        source = InProcess(recipe, manifest)
        results[name].append((source.name, measure(recipe, manifest, source, args.epochs)))
        del source
        gc.collect()
    from mmbalance.launch.cluster import DATA_HEADROOM_CPUS

    # The logical CPUs a one-worker Train run leaves Ray Data beside its worker's own: more read
    # tasks than that only compete with the training step for the same two cores.
    ray.init(
        num_cpus=DATA_HEADROOM_CPUS, object_store_memory=OBJECT_STORE, include_dashboard=False, log_to_driver=False
    )
    fits = {}
    try:
        for name, (recipe, manifest, shards) in cases.items():
            fits[name] = train_fits_in_cache(recipe, manifest)
            if name == "cremad":
                assert not fits[name], "the CREMA-D-sized train split must exceed the cache threshold"
            variants = [("streamed", False)] + ([("cached", True)] if fits[name] else [])
            for label, cached in variants:
                for path in args.paths:
                    train = build_datasets(recipe, manifest, str(shards), workers=1, cache_train=cached)["train"]
                    how = {"window": "windows", "no-read-ahead": "windows, no read-ahead"}.get(
                        path, "Ray local shuffle buffer"
                    )
                    title = f"Ray Data, {label} ({how})"
                    source = RayDataWorker(title, train, recipe, manifest, cached, path, epochs=args.epochs)
                    results[name].append((source.name, measure(recipe, manifest, source, args.epochs)))
                    del train, source
                    gc.collect()
    finally:
        ray.shutdown()
    targets = {"avdigits": 0.9, "cremad": 0.8}
    for name, (recipe, manifest, _) in cases.items():
        rows = manifest.splits[recipe.data.train_split].rows
        print(
            f"\n{name}: train rows={rows} row={sum(manifest.modalities[m].nbytes for m in recipe.modalities)} B "
            f"batch={recipe.schedule.batch_size} epochs timed={args.epochs - 1} threads={torch.get_num_threads()} "
            f"object store={OBJECT_STORE >> 20} MiB encoding={args.encoding}; "
            f"the trainer uses the {'cached' if fits[name] else 'streamed'} path"
        )
        local = results[name][0][1]
        for label, rate in results[name]:
            print(f"  {label:52s} {rate:8.0f} samples/s  ratio {rate / local:.2f}")
        print(f"  target: streamed / in-process >= {targets[name]:.2f}")


if __name__ == "__main__":
    main()
