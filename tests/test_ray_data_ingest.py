"""The streamed train input of Ray workers (engine/ray_data.py): windows permuted per (seed,
epoch), every row once, the same number of steps on every rank. Pure functions first, without
Ray; one small Ray test runs the driver's datasets and split as a 2-worker run gets them."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from mmbalance.engine.batches import epoch_seed
from mmbalance.engine.ray_data import (
    WINDOW_BYTES,
    iter_train_batches,
    prefetched,
    shuffle_window,
    shuffled_batches,
    train_steps,
)


def _blocks(sizes, width=3):
    """Blocks whose rows carry their global index: ``label`` = index, ``x[i] = index``."""
    out, start = [], 0
    for n in sizes:
        ids = np.arange(start, start + n)
        out.append({"label": ids.astype(np.int64), "x": np.repeat(ids[:, None], width, axis=1).astype(np.float32)})
        start += n
    return out


def _order(batches):
    return np.concatenate([b["label"] for b in batches]) if batches else np.array([], dtype=np.int64)


SIZES = [37, 0, 64, 5, 120, 64, 1, 90]  # 381 rows, one empty block


def test_order_is_a_function_of_seed_and_epoch():
    first = _order(list(shuffled_batches(_blocks(SIZES), 16, window=50, seed=epoch_seed(7, 3))))
    again = _order(list(shuffled_batches(_blocks(SIZES), 16, window=50, seed=epoch_seed(7, 3))))
    np.testing.assert_array_equal(first, again)
    other_epoch = _order(list(shuffled_batches(_blocks(SIZES), 16, window=50, seed=epoch_seed(7, 4))))
    other_seed = _order(list(shuffled_batches(_blocks(SIZES), 16, window=50, seed=epoch_seed(8, 3))))
    assert not np.array_equal(first, other_epoch) and not np.array_equal(first, other_seed)


@pytest.mark.parametrize("batch_size", [1, 7, 16, 64, 381, 400])
@pytest.mark.parametrize("window", [1, 50, 256, 10_000])
def test_every_row_once_and_only_the_last_partial_batch_dropped(batch_size, window):
    batches = list(shuffled_batches(_blocks(SIZES), batch_size, window=window, seed=0))
    rows = sum(SIZES)
    assert len(batches) == rows // batch_size
    assert all(len(b["label"]) == batch_size and len(b["x"]) == batch_size for b in batches)
    seen = _order(batches)
    assert len(set(seen.tolist())) == len(seen) == rows // batch_size * batch_size
    assert set(seen.tolist()) <= set(range(rows))
    for b in batches:  # rows stay whole: every column of a row moves together
        np.testing.assert_array_equal(b["x"], np.repeat(b["label"][:, None], 3, axis=1))


def test_windows_are_the_fewest_whole_blocks_holding_the_window():
    # Blocks of 10 rows, window 25: windows are rows [0, 30), [30, 60), [60, 90), [90, 100).
    order = _order(list(shuffled_batches(_blocks([10] * 10), 5, window=25, seed=1)))
    for lo, hi in [(0, 30), (30, 60), (60, 90), (90, 100)]:
        assert sorted(order[lo:hi].tolist()) == list(range(lo, hi))
    assert not np.array_equal(order[:30], np.arange(30))  # permuted inside a window


def test_a_cached_shard_is_one_permutation_of_the_whole_shard():
    rows = sum(SIZES)
    window = shuffle_window(16, row_nbytes=1 << 30, rank_rows=rows, cached=True)
    order = _order(list(shuffled_batches(_blocks(SIZES), 1, window=window, seed=5)))
    expected = np.random.default_rng(5).permutation(rows)
    np.testing.assert_array_equal(order, expected)


def test_window_size_follows_the_row_size():
    assert shuffle_window(64, row_nbytes=13_224, rank_rows=2430) == 2430  # small rows: the whole shard
    big = 8 + 3 * 224 * 224 + 257 * 188 * 4
    assert shuffle_window(64, row_nbytes=big, rank_rows=10_000) == 256  # at least four batches
    assert shuffle_window(16, row_nbytes=big, rank_rows=10_000) == WINDOW_BYTES // big
    assert shuffle_window(64, row_nbytes=big, rank_rows=10_000, cached=True) == 10_000


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_every_rank_runs_the_same_number_of_steps(world):
    rows, batch = 1001, 32
    # The equal split: each rank gets rows // world rows, in blocks however they fall.
    rng = np.random.default_rng(world)
    share = rows // world
    steps = set()
    for rank in range(world):
        cuts = np.sort(rng.choice(np.arange(1, share), size=5, replace=False))
        sizes = np.diff(np.concatenate([[0], cuts, [share]])).tolist()
        window = shuffle_window(batch, row_nbytes=100, rank_rows=share)
        steps.add(sum(1 for _ in shuffled_batches(_blocks(sizes), batch, window=window, seed=rank)))
    assert steps == {train_steps(rows, world, batch)} == {(rows // world) // batch}


def test_batches_are_fresh_writable_arrays_and_blocks_are_left_alone():
    blocks = _blocks([40, 40])
    for b in blocks:
        for v in b.values():
            v.flags.writeable = False  # object-store views are read-only
    kept = [{k: v.copy() for k, v in b.items()} for b in blocks]
    for batch in shuffled_batches(blocks, 16, window=10, seed=0):
        assert all(v.flags.writeable and v.flags.c_contiguous for v in batch.values())
    for b, k in zip(blocks, kept):
        assert all(np.array_equal(b[key], k[key]) for key in b)


def test_prefetched_keeps_order_raises_errors_and_stops_when_closed():
    assert list(prefetched(iter(range(100)), 2)) == list(range(100))

    def failing():
        yield 1
        raise RuntimeError("decode failed")

    got = []
    with pytest.raises(RuntimeError, match="decode failed"):
        for item in prefetched(failing(), 2):
            got.append(item)
    assert got == [1]

    closed = threading.Event()

    def endless():
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed.set()

    stream = prefetched(endless(), 2)
    assert next(stream) == 0
    stream.close()
    assert closed.wait(5), "the producer thread must stop and close its source"


class _FakeShard:
    """What ``iter_train_batches`` asks of a Ray DataIterator: whole blocks, as numpy dicts
    (blocks decoded beforehand) or as Arrow tables (``build_datasets``' train split)."""

    def __init__(self, blocks, batch_format="numpy"):
        self.blocks, self.batch_format = blocks, batch_format

    def iter_batches(self, *, batch_size, batch_format, prefetch_batches):
        assert batch_size is None and batch_format == self.batch_format
        return iter(self.blocks)


def test_iter_train_batches_gives_tensors_of_the_shuffled_batches():
    blocks = _blocks([50, 70, 30])
    for b in blocks:
        b["x"] = b["x"].reshape(len(b["x"]), 3, 1)
    seed = epoch_seed(0, 2)
    got = list(
        iter_train_batches(
            _FakeShard(blocks), 32, buffer=64, seed=seed, corruptor=None, epoch=2, modalities=["x"], prefetch=3
        )
    )
    expected = list(shuffled_batches(_blocks([50, 70, 30]), 32, window=64, seed=seed))
    assert len(got) == len(expected) == 150 // 32
    for batch, ref in zip(got, expected):
        assert set(batch) == {"x", "label"}
        assert batch["label"].dtype == torch.int64 and batch["x"].shape == (32, 3, 1)
        np.testing.assert_array_equal(batch["label"].numpy(), ref["label"])


def test_arrow_blocks_decoded_in_the_batch_thread_give_the_decoded_blocks_batches():
    """``decode``: the worker turns raw Arrow blocks (lists or raw bytes) into the same batches
    as blocks decoded beforehand."""
    import pyarrow as pa

    from mmbalance.engine.ray_data import BlockDecoder

    blocks = _blocks([50, 70, 30])
    tables = []
    for i, block in enumerate(blocks):
        flat = block["x"].reshape(-1)
        as_list = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), 3)
        as_bytes = pa.FixedSizeBinaryArray.from_buffers(pa.binary(12), len(block["x"]), [None, pa.py_buffer(flat)])
        tables.append(pa.table({"label": block["label"], "x": as_list if i % 2 else as_bytes}))
    decode = BlockDecoder(shapes={"x": [3, 1]}, dtypes={"x": "float32"}, stored={"x": "float32"})
    kw = dict(buffer=64, seed=epoch_seed(0, 1), corruptor=None, epoch=1, modalities=["x"])
    reshaped = [{"label": b["label"], "x": b["x"].reshape(len(b["x"]), 3, 1)} for b in blocks]
    expected = list(iter_train_batches(_FakeShard(reshaped), 32, **kw))
    got = list(iter_train_batches(_FakeShard(tables, "pyarrow"), 32, decode=decode, **kw))
    assert len(got) == len(expected) == 150 // 32
    for batch, ref in zip(got, expected):
        assert batch["x"].shape == (32, 3, 1) and batch["x"].dtype == torch.float32
        np.testing.assert_array_equal(batch["x"].numpy(), ref["x"].numpy())
        np.testing.assert_array_equal(batch["label"].numpy(), ref["label"].numpy())


def _multi_file_shards(tmp_path):
    from helpers import small_spec
    from mmbalance.data.manifest import ModalitySpec
    from mmbalance.data.shards import write_shards
    from mmbalance.data.synthetic import generate

    spec = small_spec()
    out = tmp_path / "shards"
    write_shards(
        out,
        dataset="synthetic",
        classes=[f"class_{c}" for c in range(spec.classes)],
        modalities={m: ModalitySpec(dtype="float32", shape=[mod.dim]) for m, mod in spec.modalities.items()},
        splits=generate(spec),
        generator={"name": "tests"},
        preprocessing={},
        rows_per_file=48,  # 11 train files: the file order and the split have something to do
    )
    return out


def _epoch_on_two_ranks(recipe, manifest, shards, epoch, batch):
    """One epoch of both ranks' train shards, as ``split_config`` hands them to a 2-worker run."""
    from mmbalance.engine.ray_data import BlockDecoder, build_datasets, split_config

    datasets = build_datasets(recipe, manifest, str(shards), workers=2)
    shards_of = split_config().configure(datasets, world_size=2, worker_handles=None, worker_node_ids=None)
    rows = manifest.splits["train"].rows
    window = shuffle_window(batch, 8 + 2 * 8 * 4, rows // 2)
    out: list = [None, None]

    def consume(rank):
        batches = iter_train_batches(
            shards_of[rank]["train"],
            batch,
            buffer=window,
            seed=epoch_seed(recipe.seed, epoch),
            corruptor=None,
            epoch=epoch,
            modalities=list(recipe.modalities),
            decode=BlockDecoder.of(recipe, manifest),
        )
        out[rank] = [b["audio"].numpy().copy() for b in batches]

    threads = [threading.Thread(target=consume, args=(r,)) for r in range(2)]  # the split needs both consumers
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return out


@pytest.mark.integration
def test_two_ranks_get_equal_steps_disjoint_rows_and_a_reproducible_epoch(ray_cluster, tmp_path):
    from helpers import recipe_dict
    from mmbalance.config import validate_recipe
    from mmbalance.data.manifest import read_manifest

    shards = _multi_file_shards(tmp_path)
    manifest = read_manifest(shards)
    recipe = validate_recipe(recipe_dict(shards))
    rows, batch = manifest.splits["train"].rows, 16
    first = _epoch_on_two_ranks(recipe, manifest, shards, epoch=1, batch=batch)
    assert [len(r) for r in first] == [train_steps(rows, 2, batch)] * 2
    keys = [{row.tobytes() for b in rank for row in b} for rank in first]
    assert len(keys[0]) == len(keys[1]) == train_steps(rows, 2, batch) * batch and not keys[0] & keys[1]
    # A fresh driver-side dataset (as a rerun builds) gives epoch 1 the same batches on each rank.
    again = _epoch_on_two_ranks(recipe, manifest, shards, epoch=1, batch=batch)
    for rank in range(2):
        assert all(np.array_equal(a, b) for a, b in zip(first[rank], again[rank]))


@pytest.mark.integration
def test_train_reads_through_the_first_parquet_datasource_and_reshuffles_files_each_execution(
    ray_cluster, tmp_path, capsys
):
    """No per-epoch ListFiles stage (engine/ray_data.py), the caller's DataContext untouched, and
    still a new seeded file order on every execution of train (the epoch's block order)."""
    import ray.data

    from helpers import recipe_dict
    from mmbalance.config import validate_recipe
    from mmbalance.data.manifest import read_manifest
    from mmbalance.engine.ray_data import BlockDecoder, build_datasets

    shards = _multi_file_shards(tmp_path)
    manifest = read_manifest(shards)
    recipe = validate_recipe(recipe_dict(shards))
    context = ray.data.DataContext.get_current()
    before = context.use_datasource_v2
    train = build_datasets(recipe, manifest, str(shards), workers=1)["train"]
    assert context.use_datasource_v2 == before
    capsys.readouterr()
    train.explain()  # prints the logical and physical plans
    plan = capsys.readouterr().out
    assert "ListFiles" not in plan and "ReadParquet" in plan, plan
    decode = BlockDecoder.of(recipe, manifest)
    iterator = train.iterator()
    firsts = []
    for _ in range(3):  # three executions, as three epochs
        blocks = [decode(b) for b in iterator.iter_batches(batch_size=None, batch_format="pyarrow")]
        assert sum(len(b["label"]) for b in blocks) == manifest.splits["train"].rows
        firsts.append(blocks[0]["audio"][0].tobytes())
    # 11 files: three seeded orders all starting with the same file would have odds of 1 in 121.
    assert len(set(firsts)) > 1, "every execution began with the same file: the file order was not reseeded"


class _CountingShard:
    """A shard whose ``k``-th execution yields ``epochs[k]``'s blocks, recording each pull."""

    def __init__(self, epochs, fail_on=None):
        self.epochs, self.fail_on = epochs, fail_on
        self.pulled: list[tuple[int, int]] = []  # (execution, block index) in pull order
        self.executions = 0

    def iter_batches(self, *, batch_size, batch_format, prefetch_batches):
        assert batch_size is None and batch_format == "numpy"
        k = self.executions
        self.executions += 1
        return self._run(k)

    def _run(self, k):
        for i, block in enumerate(self.epochs[k]):
            if self.fail_on == (k, i):
                raise RuntimeError(f"read of execution {k} failed")
            self.pulled.append((k, i))
            yield block


def test_train_blocks_give_each_execution_in_turn_and_read_one_lead_ahead():
    from mmbalance.engine.ray_data import TrainBlocks

    epochs = [_blocks([10, 20, 30]), _blocks([5, 5, 5, 5]), _blocks([40])]
    shard = _CountingShard(epochs)
    blocks = TrainBlocks(shard, lead_rows=12)
    first = list(blocks.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2))
    assert [len(b["label"]) for b in first] == [10, 20, 30]
    # Exhausting epoch 0 started execution 1, which reads blocks until it holds >= 12 rows (3 of 5).
    blocks._lead.join(5)
    assert shard.executions == 2 and shard.pulled[3:] == [(1, 0), (1, 1), (1, 2)]
    second = list(blocks.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2))
    assert [len(b["label"]) for b in second] == [5, 5, 5, 5]
    for got, ref in zip(second, epochs[1]):
        np.testing.assert_array_equal(got["label"], ref["label"])
    third = list(blocks.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2))
    assert [len(b["label"]) for b in third] == [40] and shard.executions == 4  # the 4th: read ahead of an epoch 3


def test_train_blocks_start_no_read_after_an_epoch_with_no_lead_rows():
    """The source sets ``lead_rows = 0`` for the run's last epoch: nothing may read past it (an
    unconsumed execution would compete with the final evaluation and outlive the Ray session)."""
    from mmbalance.engine.ray_data import TrainBlocks

    shard = _CountingShard([_blocks([10, 20]), _blocks([5, 5])])
    blocks = TrainBlocks(shard, lead_rows=8)
    assert len(list(blocks.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2))) == 2
    blocks._lead.join(5)
    assert shard.executions == 2  # epoch 1 read ahead
    blocks.lead_rows = 0  # epoch 1 is the last
    assert len(list(blocks.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2))) == 2
    assert blocks._lead is None and shard.executions == 2


def test_train_blocks_raise_a_read_ahead_error_in_the_epoch_that_needs_it():
    from mmbalance.engine.ray_data import TrainBlocks

    shard = _CountingShard([_blocks([10, 10]), _blocks([10, 10, 10])], fail_on=(1, 1))
    blocks = TrainBlocks(shard, lead_rows=100)
    assert len(list(blocks.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2))) == 2
    got = []
    with pytest.raises(RuntimeError, match="read of execution 1 failed"):
        for block in blocks.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
            got.append(block)
    assert len(got) == 1  # the block read before the failure still comes first


def test_an_epoch_of_train_blocks_waits_until_the_previous_epoch_has_ended():
    from mmbalance.engine.ray_data import TrainBlocks

    shard = _CountingShard([_blocks([5, 5]), _blocks([7])])
    blocks = TrainBlocks(shard, lead_rows=1)
    first = blocks.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2)
    next(first)
    got: list = []
    later = threading.Thread(
        target=lambda: got.extend(blocks.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2))
    )
    later.start()
    later.join(0.5)
    assert later.is_alive() and not got and shard.executions == 1  # no second execution alongside the first
    assert len(list(first)) == 1
    later.join(5)
    assert [len(b["label"]) for b in got] == [7] and shard.executions == 3


def test_batches_through_train_blocks_equal_those_of_the_shard_itself():
    from mmbalance.engine.ray_data import TrainBlocks

    def epochs():
        return [_blocks([50, 70, 30]), _blocks([64, 64, 22])]

    direct, ahead = _CountingShard(epochs()), TrainBlocks(_CountingShard(epochs()), lead_rows=64)
    for epoch in range(2):
        seed = epoch_seed(0, epoch)
        kw = dict(buffer=64, seed=seed, corruptor=None, epoch=epoch, modalities=["x"])
        ref = [b["label"].numpy() for b in iter_train_batches(direct, 32, **kw)]
        got = [b["label"].numpy() for b in iter_train_batches(ahead, 32, **kw)]
        assert len(got) == len(ref) == 150 // 32
        assert all(np.array_equal(a, b) for a, b in zip(got, ref))


def _shares(array: np.ndarray, buffer) -> bool:
    base = np.frombuffer(buffer, dtype=np.uint8)
    return np.shares_memory(array, base)


def test_tensor_column_views_one_chunk_and_concatenates_several():
    import pyarrow as pa

    from mmbalance.data.shards import tensor_column

    values = np.arange(4 * 6, dtype=np.float32)
    chunk = pa.FixedSizeListArray.from_arrays(pa.array(values), 6)
    got = tensor_column(pa.chunked_array([chunk]), "float32", [2, 3])
    assert got.shape == (4, 2, 3) and np.array_equal(got.reshape(-1), values)
    assert _shares(got, chunk.values.buffers()[1])  # a view, no copy
    sliced = tensor_column(pa.chunked_array([chunk.slice(1, 2)]), "float32", [2, 3])
    np.testing.assert_array_equal(sliced.reshape(-1), values[6:18])
    two = tensor_column(pa.chunked_array([chunk.slice(0, 1), chunk.slice(2, 2)]), "float32", [6])
    np.testing.assert_array_equal(two, np.stack([values[0:6], values[12:18], values[18:24]]))
    empty = tensor_column(pa.chunked_array([], type=chunk.type), "float32", [2, 3])
    assert empty.shape == (0, 2, 3) and empty.dtype == np.float32


def test_tensor_column_reads_raw_bytes_and_up_casts_float16():
    import pyarrow as pa

    from mmbalance.data.shards import tensor_column

    exact = np.array([0.1, -2.5, 1000.3, 3.14159, 1e-3, 65504.0], dtype=np.float32)
    half = exact.astype(np.float16)
    # float16 elements in a fixed_size_list: up-cast to float32 equal to the rounded values.
    as_list = pa.FixedSizeListArray.from_arrays(pa.array(half), 3)
    got = tensor_column(pa.chunked_array([as_list]), "float32", [3], stored="float16")
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got.reshape(-1), half.astype(np.float32))
    assert not np.array_equal(got.reshape(-1), exact)  # 0.1, 1000.3, 3.14159, 1e-3 do not survive float16
    # The same bytes as fixed_size_binary rows, second row only (the offset is honoured).
    raw = pa.FixedSizeBinaryArray.from_buffers(pa.binary(6), 2, [None, pa.py_buffer(half.tobytes())])
    got = tensor_column(pa.chunked_array([raw.slice(1, 1)]), "float32", [3], stored="float16")
    np.testing.assert_array_equal(got, half[3:].astype(np.float32)[None])


def test_decode_batch_up_casts_a_stored_float16_modality_only():
    import pyarrow as pa

    from mmbalance.data.shards import decode_batch

    audio = np.array([[0.1, 0.2], [0.3, 0.4]], dtype=np.float32)
    pixels = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.uint8)
    table = pa.table(
        {
            "label": pa.array([1, 0], pa.int64()),
            "audio": pa.FixedSizeListArray.from_arrays(pa.array(audio.astype(np.float16).reshape(-1)), 2),
            "image": pa.FixedSizeListArray.from_arrays(pa.array(pixels.reshape(-1)), 3),
        }
    )
    out = decode_batch(
        table,
        {"audio": [2], "image": [3]},
        {"audio": "float32", "image": "uint8"},
        {"audio": "float16", "image": "uint8"},
    )
    assert out["audio"].dtype == np.float32 and out["image"].dtype == np.uint8
    np.testing.assert_array_equal(out["audio"], audio.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(out["image"], pixels)
    np.testing.assert_array_equal(out["label"], [1, 0])


def test_manifest_records_float16_storage_and_old_manifests_read_and_write_as_before(tmp_path):
    import json

    from pydantic import ValidationError

    from mmbalance.data.manifest import Manifest, ModalitySpec

    old = {
        "format_version": 1,
        "dataset": "d",
        "classes": ["a", "b"],
        "modalities": {"audio": {"dtype": "float32", "shape": [2], "encoding": "tensor", "normalize": None}},
        "splits": {s: {"rows": 0, "files": []} for s in ("train", "val", "test")},
        "generator": {},
        "preprocessing": {},
    }
    manifest = Manifest.model_validate(old)
    assert manifest.modalities["audio"].stored is None and manifest.modalities["audio"].storage_dtype == "float32"
    manifest.dump(tmp_path / "old.json")
    assert "stored" not in json.loads((tmp_path / "old.json").read_text())["modalities"]["audio"]
    old["modalities"]["audio"]["stored"] = "float16"
    half = Manifest.model_validate(old)
    half.dump(tmp_path / "half.json")
    again = Manifest.model_validate(json.loads((tmp_path / "half.json").read_text()))
    assert again.modalities["audio"].storage_dtype == "float16" and again.modalities["audio"].nbytes == 8
    with pytest.raises(ValidationError, match="float32 modalities"):
        ModalitySpec(dtype="uint8", shape=[3], stored="float16")


def test_float16_spectrogram_shards_round_trip_to_float32(tmp_path):
    """Writer stores float16, the manifest records it, both readers return the rounded values as float32."""
    import pyarrow.parquet as pq

    from mmbalance.data.manifest import ModalitySpec, read_manifest
    from mmbalance.data.shards import SplitArrays, decode_batch, load_split, validate_shards, write_shards

    out = tmp_path / "shards"
    rng = np.random.default_rng(0)
    audio = (rng.standard_normal((6, 4, 5)) * 7).astype(np.float32)
    labels = np.arange(6) % 2
    splits = {s: SplitArrays([f"{s}-{i}" for i in range(6)], labels, {"audio": audio}) for s in ("train", "val")}
    splits["test"] = splits["val"]
    spec = ModalitySpec(dtype="float32", shape=[4, 5], stored="float16")
    info = {"generator": {}, "preprocessing": {}}
    write_shards(out, dataset="d", classes=["a", "b"], modalities={"audio": spec}, splits=splits, **info)
    manifest = validate_shards(out)
    assert read_manifest(out).modalities["audio"].stored == "float16"
    table = pq.read_table(out / manifest.splits["train"].files[0].path, columns=["label", "audio"])
    assert str(table.schema.field("audio").type.value_type) == "halffloat"
    rounded = audio.astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(load_split(out, manifest, "train").modalities["audio"], rounded)
    decoded = decode_batch(table, {"audio": [4, 5]}, {"audio": "float32"}, {"audio": "float16"})
    assert decoded["audio"].dtype == np.float32
    np.testing.assert_array_equal(decoded["audio"], rounded)


def test_the_converter_option_records_float16_spectrograms_and_rounds_them_before_the_statistics():
    from mmbalance.data.convert.base import BadInput, RawSample
    from mmbalance.data.convert.clips import audio_visual_outputs
    from mmbalance.data.convert.media import AudioParams, ImageParams
    from mmbalance.data.convert.pipeline import _stored_values

    default = audio_visual_outputs(AudioParams(), ImageParams(), 1)
    assert default["audio"].spec.stored is None and default["visual"].spec.stored is None  # manifests as before
    outputs = audio_visual_outputs(AudioParams(storage="float16"), ImageParams(), 1)
    specs = {m: o.spec for m, o in outputs.items()}
    assert specs["audio"].stored == "float16" and specs["audio"].dtype == "float32"
    sample = RawSample(sample_id="s", label=0, split="train", files={})
    x = np.array([[0.1, -3.3337, 12.5]], dtype=np.float32)
    pixels = np.zeros(specs["visual"].shape, np.uint8)
    got = _stored_values(sample, {"audio": x, "visual": pixels}, specs)
    assert got["audio"].dtype == np.float32 and got["visual"] is pixels
    np.testing.assert_array_equal(got["audio"], [[np.float16(0.1), np.float16(-3.3337), 12.5]])
    with pytest.raises(BadInput, match="range of float16"):
        _stored_values(sample, {"audio": np.array([7e4], np.float32)}, specs)


@pytest.mark.integration
def test_train_blocks_on_two_ranks_keep_equal_steps_and_each_epochs_batches(ray_cluster, tmp_path):
    """Reading each epoch ahead (``TrainBlocks``, as ``RayShardSource`` does) over the real split
    gives every epoch the batches the plain shard gives it: same execution order, same seeds."""
    from helpers import recipe_dict
    from mmbalance.config import validate_recipe
    from mmbalance.data.manifest import read_manifest
    from mmbalance.engine.ray_data import BlockDecoder, TrainBlocks, build_datasets, split_config

    shards = _multi_file_shards(tmp_path)
    manifest = read_manifest(shards)
    recipe = validate_recipe(recipe_dict(shards))
    rows, batch = manifest.splits["train"].rows, 16
    window = shuffle_window(batch, 8 + 2 * 8 * 4, rows // 2)

    def two_epochs(ahead: bool):
        datasets = build_datasets(recipe, manifest, str(shards), workers=2)
        split = split_config().configure(datasets, world_size=2, worker_handles=None, worker_node_ids=None)
        out: list = [[], []]

        def consume(rank):
            shard = TrainBlocks(split[rank]["train"], lead_rows=window) if ahead else split[rank]["train"]
            for epoch in range(2):
                if ahead:  # as RayShardSource: no read ahead after the last epoch
                    shard.lead_rows = 0 if epoch == 1 else window
                kw = dict(buffer=window, seed=epoch_seed(recipe.seed, epoch), corruptor=None, epoch=epoch)
                batches = iter_train_batches(
                    shard, batch, modalities=list(recipe.modalities), decode=BlockDecoder.of(recipe, manifest), **kw
                )
                out[rank].append([b["audio"].numpy().copy() for b in batches])

        threads = [threading.Thread(target=consume, args=(r,)) for r in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        return out

    plain, ahead = two_epochs(False), two_epochs(True)
    for rank in range(2):
        for epoch in range(2):
            assert len(ahead[rank][epoch]) == train_steps(rows, 2, batch)
            assert all(np.array_equal(a, b) for a, b in zip(ahead[rank][epoch], plain[rank][epoch]))
