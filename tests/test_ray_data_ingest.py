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
    """What ``iter_train_batches`` asks of a Ray DataIterator: whole blocks as numpy dicts."""

    def __init__(self, blocks):
        self.blocks = blocks

    def iter_batches(self, *, batch_size, batch_format, prefetch_batches):
        assert batch_size is None and batch_format == "numpy"
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
    from mmbalance.engine.ray_data import build_datasets, split_config

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
