"""Ray Data input: Parquet shards -> decoded tensors -> each worker's share.

Driver side, ``build_datasets`` reads each split's files from the manifest with
``read_parquet`` (local paths or any pyarrow/fsspec URI), shuffles the file order of the
training split afresh each epoch with a seed, and decodes in ``map_batches`` (flattened
fixed-size lists -> ``[B, *shape]`` arrays). ``split_config`` splits train equally across
workers (same number of steps on every rank) and val/test unequally (no row dropped, so
all-reduced counts equal the split size). Worker side, ``RayShardSource`` iterates the shard
with a local shuffle buffer seeded per epoch. With ``data.train_corruptions`` the train split
also carries ``sample_id``, and the worker corrupts each batch in Ray's collate step (its
prefetch threads) with the same ``TrainCorruptor`` as the in-process path, so a sample gets the
same noise on either path, on any worker.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from mmbalance.config import Recipe
from mmbalance.data.manifest import Manifest
from mmbalance.data.shards import column_tensor
from mmbalance.engine.augment import TrainCorruptor
from mmbalance.engine.batches import Batch, epoch_seed

SPLIT_KEYS = ("train", "val", "test")


def decode_batch(table: pa.Table, shapes: dict[str, list[int]], dtypes: dict[str, str]) -> dict[str, np.ndarray]:
    """Arrow rows with flattened tensors -> numpy arrays ``[B, *shape]`` (runs in Ray Data tasks).
    A selected ``sample_id`` column passes through as a ``[B]`` object array of str."""
    out = {"label": table.column("label").to_numpy().astype(np.int64)}
    if "sample_id" in table.column_names:
        out["sample_id"] = table.column("sample_id").to_numpy(zero_copy_only=False)
    for m, shape in shapes.items():
        out[m] = column_tensor(table, m, dtypes[m], shape)
    return out


def train_fits_in_cache(recipe: Recipe, manifest: Manifest, share: float = 0.25) -> bool:
    """Whether the decoded train split takes at most ``share`` of the cluster's object store."""
    import ray

    row_bytes = 8 + sum(manifest.modalities[m].nbytes for m in recipe.modalities)
    capacity = ray.cluster_resources().get("object_store_memory", 0.0)
    return manifest.splits[recipe.data.train_split].rows * row_bytes <= share * capacity


def build_datasets(
    recipe: Recipe, manifest: Manifest, root: str, workers: int, cache_train: bool = False
) -> dict[str, Any]:
    import ray.data

    # Per-operator progress bars from every worker drown the epoch table; the engine shows its own.
    ray.data.DataContext.get_current().enable_progress_bars = False
    modalities = list(recipe.modalities)
    shapes = {m: manifest.modalities[m].shape for m in modalities}
    dtypes = {m: manifest.modalities[m].dtype for m in modalities}
    datasets = {}
    for key in SPLIT_KEYS:
        split = getattr(recipe.data, f"{key}_split")
        files = [f"{root.rstrip('/')}/{f.path}" for f in manifest.splits[split].files]
        shuffle = ray.data.FileShuffleConfig(seed=recipe.seed, reseed_after_execution=True) if key == "train" else None
        # Train corruption is seeded per sample id, so only then does train carry the ids.
        ids = ["sample_id"] if key == "train" and recipe.data.train_corruptions else []
        ds = ray.data.read_parquet(files, shuffle=shuffle).select_columns(["label", *ids, *modalities])
        if key != "train":
            # Several blocks per worker: an unequal split hands out whole blocks, and a
            # one-file split would otherwise be evaluated by one worker alone.
            ds = ds.repartition(num_blocks=4 * workers)
        ds = ds.map_batches(decode_batch, batch_format="pyarrow", fn_kwargs={"shapes": shapes, "dtypes": dtypes})
        # Eval splits never change between epochs: decode them once instead of re-reading and
        # re-partitioning every epoch. Train streams (file order reshuffled per epoch) unless
        # it is small enough to cache decoded; then each epoch shuffles the whole shard instead.
        datasets[key] = ds if key == "train" and not cache_train else ds.materialize()
    return datasets


def split_config():
    """A ``DataConfig`` that splits train equally and val/test without dropping rows."""
    import ray.train

    class ExactEvalSplit(ray.train.DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            output = [{} for _ in range(world_size)]
            for name, ds in datasets.items():
                ds = ds.copy(ds)
                ds.context.execution_options = self._resolve_execution_options(name)
                for rank, shard in enumerate(ds.streaming_split(world_size, equal=(name == "train"))):
                    output[rank][name] = shard
            return output

    return ExactEvalSplit()


class RayShardSource:
    """This worker's share of each split, as device tensors.

    A streamed train split is shuffled by file order (per epoch, in the reader) and a local
    buffer of a few batches; a cached one by a buffer as large as the shard, i.e. a full
    seeded permutation of the shard every epoch."""

    def __init__(self, recipe: Recipe, manifest: Manifest, device: torch.device, train_cached: bool = False):
        import ray.train

        self.recipe, self.device = recipe, device
        self.modalities = list(recipe.modalities)
        self.shards = {key: ray.train.get_dataset_shard(key) for key in SPLIT_KEYS}
        world = ray.train.get_context().get_world_size()
        self.train_rows = manifest.splits[recipe.data.train_split].rows // world
        self.buffer = self.train_rows if train_cached else max(4 * recipe.schedule.batch_size, 256)
        self.corruptor = TrainCorruptor.from_recipe(recipe, manifest)

    def train_batches(self, epoch: int, batch_size: int) -> tuple[Iterator[Batch], int]:
        batches = iter_train_batches(
            self.shards["train"],
            batch_size,
            buffer=self.buffer,
            seed=epoch_seed(self.recipe.seed, epoch),
            corruptor=self.corruptor,
            epoch=epoch,
            modalities=self.modalities,
        )
        # equal=True gives every rank the same rows, so the step count agrees across ranks.
        return self._to_device(batches), self.train_rows // batch_size

    def eval_batches(self, key: str, batch_size: int) -> Iterator[Batch]:
        return self._to_device(self.shards[key].iter_torch_batches(batch_size=batch_size, drop_last=False))

    def _to_device(self, batches) -> Iterator[Batch]:
        for batch in batches:
            yield {m: batch[m].to(self.device) for m in self.modalities}, batch["label"].to(self.device)


def iter_train_batches(
    shard: Any,
    batch_size: int,
    *,
    buffer: int,
    seed: int,
    corruptor: TrainCorruptor | None,
    epoch: int,
    modalities: list[str],
) -> Iterator[dict[str, Tensor]]:
    """A train shard (a Ray ``DataIterator``) as tensor batches, locally shuffled with ``seed``.

    Without corruption this is Ray's default collate, unchanged. With it, a numpy collate runs
    ``collate_train_batch`` in Ray's prefetch threads; Ray still moves the tensors to the device.
    """
    collate = None if corruptor is None else _corrupting_collate(corruptor, epoch, modalities)
    return shard.iter_torch_batches(
        batch_size=batch_size,
        drop_last=True,
        local_shuffle_buffer_size=buffer,
        local_shuffle_seed=seed,
        collate_fn=collate,
    )


def collate_train_batch(
    batch: dict[str, np.ndarray], corruptor: TrainCorruptor, epoch: int, modalities: list[str]
) -> dict[str, Tensor]:
    """A decoded numpy train batch with ``sample_id`` -> corrupted CPU tensors (ids dropped)."""
    arrays = corruptor.apply({m: batch[m] for m in modalities}, batch["sample_id"], epoch)
    return {**{m: _tensor(arrays[m]) for m in modalities}, "label": _tensor(batch["label"])}


def _tensor(x: np.ndarray) -> Tensor:
    # Arrow-backed numpy batches may be read-only; a tensor sharing them would warn and be unsafe to write.
    return torch.from_numpy(x if x.flags.writeable else x.copy())


def _corrupting_collate(corruptor: TrainCorruptor, epoch: int, modalities: list[str]):
    from ray.data.collate_fn import NumpyBatchCollateFn

    class CorruptTrainBatch(NumpyBatchCollateFn):
        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Tensor]:
            return collate_train_batch(batch, corruptor, epoch, modalities)

    return CorruptTrainBatch()
