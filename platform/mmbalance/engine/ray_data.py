"""Ray Data input: Parquet shards -> decoded tensors -> each worker's share.

Driver side, ``build_datasets`` reads each split's files from the manifest with
``read_parquet`` (local paths or any pyarrow/fsspec URI) and shuffles the file order of the
training split afresh each epoch with a seed. Train blocks travel as the Arrow tables the read
gives; the worker decodes them (``BlockDecoder``: flattened fixed-size lists or raw row bytes
-> ``[B, *shape]`` numpy views of the Arrow buffers, float16 storage up-cast to float32) in its
background thread, which costs a view, where a ``map_batches`` decode in the read task would
copy every block once more into Ray's tensor columns. Val and test are decoded in
``map_batches`` once and kept. ``split_config`` splits train equally across
workers (same number of steps on every rank) and val/test unequally (no row dropped, so
all-reduced counts equal the split size). Worker side, ``RayShardSource`` takes its train
shard a whole decoded block at a time and shuffles it in windows (below). With
``data.train_corruptions`` the train split also carries ``sample_id``, and the worker
corrupts each batch with the same ``TrainCorruptor`` as the in-process path, so a sample gets
the same noise on either path, on any worker.

How a train epoch is shuffled (``shuffled_batches``; numpy gathers, no per-row Python):

1. Block order. The reader visits the train files in a seeded random order, drawn afresh on
   every execution of the dataset (``FileShuffleConfig(seed, reseed_after_execution=True)``;
   each epoch iterates train once, so execution ``i`` is epoch ``i`` of an uninterrupted run).
   The stream keeps that order (``preserve_order``), and the equal split hands its blocks to
   the ranks greedily in stream order, so which rank gets which rows, in which order, follows
   from the file order alone, not from task timing.
2. Rows. A worker cuts its stream into windows, each the fewest consecutive blocks holding at
   least ``window`` rows (``shuffle_window``: about 64 MiB of decoded rows, at least four
   batches; the whole shard when it is cached), and permutes every window with one numpy
   Generator seeded by ``epoch_seed(seed, epoch)``. Batches are consecutive slices of the
   permuted windows (a batch may straddle two); the last partial batch is dropped.

So in an uninterrupted run a rank's batches are a function of (seed, epoch) for a given
world size and batch size, and every rank runs ``train_steps`` steps. A resumed run, or a
restarted worker group, starts Ray's execution count again: its file orders repeat those of
the first epochs, while the row permutations still follow (seed, epoch). Why this is enough:
every row is visited once per epoch (only the split's ``rows % world`` rows and each rank's
last partial batch are left out); a window spans at least one shard file (the converters
write about 64 MiB per file, ``data/shards.rows_per_file_for``), so a batch is a uniform draw
from one or more whole files, and which files share a window and which come first is drawn
again every epoch. What it gives up against a full permutation: two rows whose files are far
apart in that epoch's order never share a batch. A train split that fits a quarter of the
object store is cached decoded and gets the full permutation (one window is the shard).

Reads go through Ray Data's first Parquet datasource (``DataContext.use_datasource_v2 = False``
while the datasets are built): the second one, Ray 2.60's default, lists the files in a
``ListFiles`` task that starts 32 footer-reader actors on every execution, i.e. every epoch, and
on 2 cores its first block came 3-5 s after the execution started against 0.1-0.9 s here
(``bench/data.py``). The first datasource reads the footers once, on the driver, when the
dataset is created, and supports the same seeded per-execution file shuffle.

The window replaces Ray's local shuffle buffer (``iter_torch_batches(local_shuffle_buffer_size)``),
which cost the streamed path two thirds of its throughput (``bench/data.py``): blocks are taken
whole (zero-copy numpy views of the object store), each row is copied once into its window and
once into its batch, and the batches become tensors without a copy, all in a background thread
that stays ``TRAIN_PREFETCH_BATCHES`` batches ahead of the training step. ``TrainBlocks`` starts
each epoch's execution as soon as the previous epoch's last block has arrived, so the seconds
before an execution's first block overlap the training of the last window.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, TypeVar

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from mmbalance.config import Recipe
from mmbalance.data.manifest import Manifest
from mmbalance.data.shards import decode_batch
from mmbalance.engine.augment import TrainCorruptor
from mmbalance.engine.batches import Batch, epoch_seed

SPLIT_KEYS = ("train", "val", "test")
WINDOW_BYTES = 64 << 20  # decoded rows per shuffle window: about one shard file
TRAIN_PREFETCH_BATCHES = 2  # train batches the background thread keeps ready
BLOCK_PREFETCH = 2  # decoded blocks Ray fetches ahead of the window

T = TypeVar("T")


@dataclass(frozen=True)
class BlockDecoder:
    """A train block as the read gives it (an Arrow table) -> ``decode_batch``'s numpy arrays.
    Runs in the worker's batch thread; every array views the block's buffers (no copy)."""

    shapes: dict[str, list[int]]
    dtypes: dict[str, str]
    stored: dict[str, str]

    @classmethod
    def of(cls, recipe: Recipe, manifest: Manifest) -> "BlockDecoder":
        specs = {m: manifest.modalities[m] for m in recipe.modalities}
        return cls(
            shapes={m: list(s.shape) for m, s in specs.items()},
            dtypes={m: s.dtype for m, s in specs.items()},
            stored={m: s.storage_dtype for m, s in specs.items()},
        )

    def __call__(self, table: pa.Table) -> dict[str, np.ndarray]:
        return decode_batch(table, **self.fn_kwargs())

    def fn_kwargs(self) -> dict[str, dict]:
        """``decode_batch``'s keywords, for a ``map_batches`` decode in Ray Data tasks (the function
        itself travels by module, so those workers never import this torch-importing one)."""
        return {"shapes": self.shapes, "dtypes": self.dtypes, "stored": self.stored}


def row_bytes(recipe: Recipe, manifest: Manifest) -> int:
    """Bytes of one decoded train row: the label and the recipe's modalities."""
    return 8 + sum(manifest.modalities[m].nbytes for m in recipe.modalities)


def train_fits_in_cache(recipe: Recipe, manifest: Manifest, share: float = 0.25) -> bool:
    """Whether the decoded train split takes at most ``share`` of the cluster's object store."""
    import ray

    capacity = ray.cluster_resources().get("object_store_memory", 0.0)
    return manifest.splits[recipe.data.train_split].rows * row_bytes(recipe, manifest) <= share * capacity


def train_steps(rows: int, world: int, batch_size: int) -> int:
    """Steps per epoch, the same on every rank: the equal split gives each ``rows // world`` rows."""
    return (rows // world) // batch_size


def shuffle_window(batch_size: int, row_nbytes: int, rank_rows: int, cached: bool = False) -> int:
    """Rows a window must hold at least: the whole shard when cached, else about
    ``WINDOW_BYTES`` of rows (at least four batches, at most the shard)."""
    if cached:
        return max(rank_rows, 1)
    return max(4 * batch_size, min(rank_rows, WINDOW_BYTES // max(row_nbytes, 1)), 1)


def shuffled_batches(
    blocks: Iterable[dict[str, np.ndarray]], batch_size: int, *, window: int, seed: int
) -> Iterator[dict[str, np.ndarray]]:
    """Full batches of ``batch_size`` rows from a stream of column blocks (``{key: [n, ...]}``,
    equal ``n`` per key), shuffled in windows (see the module docstring).

    The stream is cut into windows of whole blocks, each the fewest holding at least ``window``
    rows (the last may hold fewer); window ``k`` is permuted by the ``k``-th draw of
    ``np.random.default_rng(seed)``; batches are consecutive ``batch_size``-row slices of the
    permuted windows one after another, and a last partial batch is dropped. The output is a
    function of the blocks' rows in order, ``window``, ``batch_size`` and ``seed``. Every
    array is freshly gathered (writable, C-contiguous); the input blocks are only read."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rng = np.random.default_rng(seed)
    pending: list[dict[str, np.ndarray]] = []
    pending_rows = 0
    carry: dict[str, np.ndarray] | None = None  # permuted rows short of a batch, from the previous window
    for block in blocks:
        n = _rows(block)
        if n == 0:
            continue
        pending.append(block)
        pending_rows += n
        if pending_rows >= window:
            carry = yield from _emit_window(pending, pending_rows, carry, batch_size, rng)
            pending, pending_rows = [], 0
    if pending:
        yield from _emit_window(pending, pending_rows, carry, batch_size, rng)


def _rows(block: dict[str, np.ndarray] | pa.Table) -> int:
    if isinstance(block, pa.Table):
        return block.num_rows
    return len(next(iter(block.values()))) if block else 0


def _emit_window(
    blocks: list[dict[str, np.ndarray]],
    rows: int,
    carry: dict[str, np.ndarray] | None,
    batch_size: int,
    rng: np.random.Generator,
):
    """Yield the batches of one permuted window (the first completes ``carry``); return the new carry."""
    keys = list(blocks[0])
    window = blocks[0] if len(blocks) == 1 else {k: np.concatenate([b[k] for b in blocks]) for k in keys}
    order = rng.permutation(rows)
    start = 0
    if carry is not None:
        start = min(batch_size - _rows(carry), rows)
        head = order[:start]
        merged = {k: np.concatenate([carry[k], window[k][head]]) for k in keys}
        if _rows(merged) < batch_size:
            return merged
        yield merged
    full = start + (rows - start) // batch_size * batch_size
    for lo in range(start, full, batch_size):
        idx = order[lo : lo + batch_size]
        yield {k: window[k][idx] for k in keys}
    if full == rows:
        return None
    tail = order[full:]
    return {k: window[k][tail] for k in keys}


def train_tensors(batch: dict[str, np.ndarray], modalities: list[str]) -> dict[str, Tensor]:
    """A numpy train batch -> CPU tensors of the modalities and the label, sharing memory."""
    return {**{m: _tensor(batch[m]) for m in modalities}, "label": _tensor(batch["label"])}


def prefetched(items: Iterator[T], depth: int) -> Iterator[T]:
    """``items`` produced in a daemon thread, at most ``depth`` ahead of the consumer. An error
    there is raised here; closing this generator stops the thread (and closes ``items``)."""
    slots: queue.Queue = queue.Queue(maxsize=max(depth, 1))
    stop = threading.Event()
    done = object()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                slots.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((None, item)):
                    return
            put((None, done))
        except BaseException as err:  # handed to the consumer, which raises it
            put((err, None))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name="mmbalance-train-batches", daemon=True)
    thread.start()
    try:
        while True:
            err, item = slots.get()
            if err is not None:
                raise err
            if item is done:
                return
            yield item
    finally:
        stop.set()


def build_datasets(
    recipe: Recipe, manifest: Manifest, root: str, workers: int, cache_train: bool = False
) -> dict[str, Any]:
    import ray.data

    # Per-operator progress bars from every worker drown the epoch table; the engine shows its own.
    ray.data.DataContext.get_current().enable_progress_bars = False
    modalities = list(recipe.modalities)
    decode = BlockDecoder.of(recipe, manifest)
    datasets = {}
    for key in SPLIT_KEYS:
        split = getattr(recipe.data, f"{key}_split")
        files = [f"{root.rstrip('/')}/{f.path}" for f in manifest.splits[split].files]
        shuffle = ray.data.FileShuffleConfig(seed=recipe.seed, reseed_after_execution=True) if key == "train" else None
        # Train corruption is seeded per sample id, so only then does train carry the ids.
        ids = ["sample_id"] if key == "train" and recipe.data.train_corruptions else []
        with _first_parquet_datasource(ray.data.DataContext.get_current()):
            ds = ray.data.read_parquet(files, shuffle=shuffle).select_columns(["label", *ids, *modalities])
        if key == "train":
            # Blocks in file order (the seeded one), not in task completion order; left as Arrow
            # tables for the worker's BlockDecoder.
            ds.context.execution_options.preserve_order = True
        else:
            # Several blocks per worker: an unequal split hands out whole blocks, and a
            # one-file split would otherwise be evaluated by one worker alone.
            ds = ds.repartition(num_blocks=4 * workers).map_batches(
                decode_batch, batch_format="pyarrow", fn_kwargs=decode.fn_kwargs()
            )
        # Eval splits never change between epochs: decode them once instead of re-reading and
        # re-partitioning every epoch. Train streams (file order reshuffled per epoch) unless
        # it is small enough to cache; then each epoch shuffles the whole shard instead.
        datasets[key] = ds if key == "train" and not cache_train else ds.materialize()
    return datasets


@contextlib.contextmanager
def _first_parquet_datasource(context: Any) -> Iterator[None]:
    """``read_parquet`` through Ray Data's first Parquet datasource (module docstring), leaving
    the caller's ``DataContext`` as it was afterwards."""
    before = getattr(context, "use_datasource_v2", False)
    context.use_datasource_v2 = False
    try:
        yield
    finally:
        context.use_datasource_v2 = before


def split_config():
    """A ``DataConfig`` that splits train equally and val/test without dropping rows."""
    import ray.train

    class ExactEvalSplit(ray.train.DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            output = [{} for _ in range(world_size)]
            for name, ds in datasets.items():
                ds = ds.copy(ds)
                options = self._resolve_execution_options(name)  # a deep copy
                if name == "train":
                    # Train's blocks reach the equal split in the seeded file order, so the
                    # rows of each rank follow from it (module docstring).
                    options.preserve_order = True
                ds.context.execution_options = options
                for rank, shard in enumerate(ds.streaming_split(world_size, equal=(name == "train"))):
                    output[rank][name] = shard
            return output

    return ExactEvalSplit()


class TrainBlocks:
    """A train shard's decoded blocks, epoch after epoch, with each epoch's read started early.

    Ray Data executes the train dataset afresh for every epoch, and the first block of an
    execution comes seconds after it starts (file listing, task start-up, one whole file read
    and decoded), while a window cannot be shuffled before all its blocks are there. So as soon
    as an epoch's last block has arrived (the trainer is still on that epoch's last window),
    the next execution starts in a thread and reads up to ``lead_rows`` rows ahead; the next
    epoch begins with them. Executions still run one after another, one per epoch, so the
    file order of epoch ``i`` is still that of execution ``i`` (module docstring); only their
    start moves earlier. At most about one window of the next epoch is held in memory."""

    def __init__(self, shard: Any, lead_rows: int):
        self.shard, self.lead_rows = shard, lead_rows
        self._lead: threading.Thread | None = None
        self._turn = threading.Lock()  # one epoch at a time: the next waits until this one ended
        self._read: tuple[list[Any], Iterator | None, BaseException | None] | None = None
        self._format = "pyarrow"

    def iter_batches(self, *, batch_size: None, batch_format: str, prefetch_batches: int):
        """The next epoch's blocks, as ``DataIterator.iter_batches(batch_size=None)`` gives them
        (``batch_format`` "pyarrow" or "numpy"; the same for every epoch)."""
        if batch_size is not None or batch_format not in ("pyarrow", "numpy"):
            raise ValueError("TrainBlocks hands out whole blocks (batch_size=None, batch_format='pyarrow' or 'numpy')")
        self._format = batch_format
        return self._epoch(prefetch_batches)

    def _epoch(self, prefetch_batches: int) -> Iterator[Any]:
        with self._turn:
            if self._lead is None:
                head, rest, err = [], self._blocks(prefetch_batches), None
            else:
                self._lead.join()
                assert self._read is not None
                (head, rest, err), self._lead, self._read = self._read, None, None
            yield from head
            if err is not None:
                raise err
            if rest is not None:
                yield from rest
            # Only an epoch read to its end starts the next: a closed one leaves the next to start
            # afresh. No lead rows (the last epoch) means no read ahead at all.
            if self.lead_rows > 0:
                self._start_lead(prefetch_batches)

    def _blocks(self, prefetch_batches: int) -> Iterator[Any]:
        return iter(
            self.shard.iter_batches(batch_size=None, batch_format=self._format, prefetch_batches=prefetch_batches)
        )

    def _start_lead(self, prefetch_batches: int) -> None:
        def read_ahead() -> None:
            head: list[Any] = []
            blocks: Iterator | None = self._blocks(prefetch_batches)
            try:
                rows = 0
                while rows < self.lead_rows:
                    block = next(blocks, None)
                    if block is None:
                        blocks = None
                        break
                    head.append(block)
                    rows += _rows(block)
                self._read = (head, blocks, None)
            except BaseException as err:  # raised in the epoch that needs these blocks
                self._read = (head, None, err)

        self._lead = threading.Thread(target=read_ahead, name="mmbalance-train-read-ahead", daemon=True)
        self._lead.start()


class RayShardSource:
    """This worker's share of each split, as device tensors.

    Train is shuffled by the seeded file order and by windows of about ``WINDOW_BYTES``
    (``shuffled_batches``); a cached train split by one window as large as the shard, i.e. a
    full seeded permutation of the shard every epoch."""

    def __init__(self, recipe: Recipe, manifest: Manifest, device: torch.device, train_cached: bool = False):
        import ray.train

        self.recipe, self.device = recipe, device
        self.modalities = list(recipe.modalities)
        self.shards = {key: ray.train.get_dataset_shard(key) for key in SPLIT_KEYS}
        self.world = ray.train.get_context().get_world_size()
        self.rows = manifest.splits[recipe.data.train_split].rows
        self.row_nbytes = row_bytes(recipe, manifest)
        self.train_blocks = TrainBlocks(self.shards["train"], lead_rows=0)
        self.decode = BlockDecoder.of(recipe, manifest)
        self.train_cached = train_cached
        self.corruptor = TrainCorruptor.from_recipe(recipe, manifest)

    def train_batches(self, epoch: int, batch_size: int) -> tuple[Iterator[Batch], int]:
        window = shuffle_window(batch_size, self.row_nbytes, self.rows // self.world, cached=self.train_cached)
        # Read one window of the next epoch ahead, unless this is the last epoch: a read nobody
        # consumes would compete with the final evaluation and outlive the run's Ray session.
        last = epoch + 1 >= self.recipe.schedule.epochs
        self.train_blocks.lead_rows = 0 if last else window
        batches = iter_train_batches(
            self.train_blocks,
            batch_size,
            buffer=window,
            seed=epoch_seed(self.recipe.seed, epoch),
            corruptor=self.corruptor,
            epoch=epoch,
            modalities=self.modalities,
            decode=self.decode,
        )
        # equal=True gives every rank the same rows, so the step count agrees across ranks.
        return self._to_device(batches), train_steps(self.rows, self.world, batch_size)

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
    prefetch: int = TRAIN_PREFETCH_BATCHES,
    decode: BlockDecoder | None = None,
) -> Iterator[dict[str, Tensor]]:
    """A train shard (a Ray ``DataIterator``, a ``TrainBlocks``, or anything with their
    ``iter_batches``) as CPU tensor batches of exactly ``batch_size`` rows, shuffled in windows
    of at least ``buffer`` rows with ``seed`` (``shuffled_batches``).

    Ray hands over whole blocks: Arrow tables that ``decode`` turns into numpy views (the
    ``build_datasets`` train split), or, without ``decode``, blocks already decoded to numpy.
    The decode, the windows, the batches and, with a corruptor, ``collate_train_batch`` run in
    one background thread, ``prefetch`` batches ahead.
    """
    fmt = "numpy" if decode is None else "pyarrow"
    blocks = shard.iter_batches(batch_size=None, batch_format=fmt, prefetch_batches=BLOCK_PREFETCH)
    if decode is not None:
        blocks = (decode(block) for block in blocks)
    batches = shuffled_batches(blocks, batch_size, window=buffer, seed=seed)
    if corruptor is None:
        tensors = (train_tensors(b, modalities) for b in batches)
    else:
        tensors = (collate_train_batch(b, corruptor, epoch, modalities) for b in batches)
    return prefetched(tensors, prefetch)


def collate_train_batch(
    batch: dict[str, np.ndarray], corruptor: TrainCorruptor, epoch: int, modalities: list[str]
) -> dict[str, Tensor]:
    """A decoded numpy train batch with ``sample_id`` -> corrupted CPU tensors (ids dropped)."""
    arrays = corruptor.apply({m: batch[m] for m in modalities}, batch["sample_id"], epoch)
    return {**{m: _tensor(arrays[m]) for m in modalities}, "label": _tensor(batch["label"])}


def _tensor(x: np.ndarray) -> Tensor:
    # Arrow-backed numpy batches may be read-only; a tensor sharing them would warn and be unsafe to write.
    return torch.from_numpy(x if x.flags.writeable else x.copy())
