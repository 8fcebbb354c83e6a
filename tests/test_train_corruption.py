"""Train-time corruption (``data.train_corruptions``): validation, train-only application,
per-sample and per-epoch seeding, the Ray Data collate step, and end-to-end runs."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from helpers import recipe_dict
from mmbalance.config import ConfigError, check_against_data, validate_recipe
from mmbalance.data.manifest import read_manifest
from mmbalance.data.shards import decode_batch, load_split
from mmbalance.engine.augment import TrainCorruptor
from mmbalance.engine.batches import epoch_seed
from mmbalance.engine.loop import run_training
from mmbalance.engine.ray_data import collate_train_batch
from mmbalance.engine.run_spec import RunSpec
from mmbalance.engine.sources import InMemorySource
from mmbalance.tracking.records import RunRecord

CPU = torch.device("cpu")
SNR = {"modality": "audio", "name": "audio_snr", "level": 5, "p": 0.5}
NOISE = {"modality": "visual", "name": "feature_noise", "level": 1.0, "p": 0.5}  # in train-std units


def _recipe(shards, *corruptions, **sections):
    tree = recipe_dict(shards, **sections)
    tree["data"]["train_corruptions"] = [dict(c) for c in corruptions]
    return validate_recipe(tree)


def _source(shards, *corruptions) -> InMemorySource:
    return InMemorySource(_recipe(shards, *corruptions), read_manifest(shards), CPU)


def _train(source, epoch, batch_size=32) -> list[tuple[dict[str, np.ndarray], np.ndarray]]:
    batches, steps = source.train_batches(epoch, batch_size)
    out = [({m: t.numpy() for m, t in batch.items()}, labels.numpy()) for batch, labels in batches]
    assert len(out) == steps
    return out


def _audio_by_id(source, epoch, batch_size) -> dict[str, np.ndarray]:
    """The corrupted audio row each sample id got in one training epoch."""
    ids, real = [], source.corruptor.apply

    def spy(batch, sample_ids, epoch):
        ids.extend(sample_ids)
        return real(batch, sample_ids, epoch)

    source.corruptor.apply = spy
    rows = np.concatenate([batch["audio"] for batch, _ in _train(source, epoch, batch_size)])
    return dict(zip(ids, rows))


@pytest.mark.parametrize(
    "item, message",
    [
        ({"modality": "audio", "name": "blur", "level": 1}, "unknown corruption 'blur'; allowed: ['audio_snr'"),
        ({"modality": "audio", "name": "salt_pepper", "level": 150}, "salt_pepper level must be in [0, 100], got 150"),
        ({"modality": "audio", "name": "gaussian", "level": -1}, "level: Input should be greater than or equal to 0"),
        ({"modality": "audio", "name": "missing", "level": 0.5}, "missing level must be 0 (keep) or 1 (drop)"),
        (
            {"modality": "audio", "name": "feature_noise", "level": -0.5},
            "level: Input should be greater than or equal to 0",
        ),
        (
            {"modality": "audio", "name": "feature_noise", "level": 1, "params": {"std": [-1]}},
            "std must be finite and >= 0",
        ),
    ],
)
def test_bad_name_or_level_fails_recipe_validation_naming_the_key(small_shards, item, message):
    with pytest.raises(ConfigError) as info:
        _recipe(small_shards, item)
    assert "data.train_corruptions.0" in str(info.value) and message in str(info.value)


def test_modality_and_dtype_are_checked_against_the_recipe_and_data(small_shards):
    recipe = _recipe(
        small_shards,
        SNR,
        {"modality": "depth", "name": "gaussian", "level": 1},
        {"modality": "visual", "name": "word_replace", "level": 1},
    )
    with pytest.raises(ConfigError) as info:
        check_against_data(recipe, read_manifest(small_shards))
    message = str(info.value)
    assert (
        "data.train_corruptions.1.modality: 'depth' is not a recipe modality; allowed: ['audio', 'visual']" in message
    )
    assert "data.train_corruptions.2.name: word_replace cannot corrupt 'visual' of dtype float32" in message
    assert "train_corruptions.0" not in message


def test_default_corrupts_nothing(small_shards):
    recipe = validate_recipe(recipe_dict(small_shards))
    assert recipe.data.train_corruptions == [] and TrainCorruptor.from_recipe(recipe) is None


def test_train_batches_differ_from_clean_only_on_the_corrupted_modality(small_shards):
    clean, noisy = _train(_source(small_shards), 0), _train(_source(small_shards, SNR), 0)
    changed = []
    for (c, c_labels), (n, n_labels) in zip(clean, noisy):
        np.testing.assert_array_equal(n_labels, c_labels)
        np.testing.assert_array_equal(n["visual"], c["visual"])
        assert n["audio"].dtype == c["audio"].dtype and n["audio"].shape == c["audio"].shape
        changed.append((n["audio"] != c["audio"]).any(axis=1))
    share = np.concatenate(changed).mean()
    assert 0.35 < share < 0.65  # p = 0.5 of the samples, the rest untouched


def test_noise_is_the_same_for_a_sample_whatever_its_batch_and_equals_the_whole_split_at_once(small_shards):
    recipe = _recipe(small_shards, SNR)
    by_4, by_8 = _audio_by_id(_source(small_shards, SNR), 1, 4), _audio_by_id(_source(small_shards, SNR), 1, 8)
    assert len(by_4) == len(by_8) == 512
    split = load_split(small_shards, read_manifest(small_shards), "train", ["audio", "visual"])
    whole = TrainCorruptor.from_recipe(recipe).apply(split.modalities, split.sample_ids, 1)["audio"]
    for i, sample_id in enumerate(split.sample_ids):
        np.testing.assert_array_equal(by_4[sample_id], whole[i])
        np.testing.assert_array_equal(by_8[sample_id], whole[i])


def test_same_epoch_same_noise_on_a_fresh_source_and_fresh_noise_each_epoch(small_shards):
    first = _source(small_shards, SNR)
    epoch0, epoch1 = _audio_by_id(first, 0, 32), _audio_by_id(first, 1, 32)
    resumed = _audio_by_id(_source(small_shards, SNR), 1, 32)  # a resumed run starts at epoch 1
    assert all(np.array_equal(resumed[k], epoch1[k]) for k in epoch1)
    split = load_split(small_shards, read_manifest(small_shards), "train", ["audio"])
    clean = dict(zip(split.sample_ids, split.modalities["audio"]))
    hit0 = {k for k in epoch0 if not np.array_equal(epoch0[k], clean[k])}
    hit1 = {k for k in epoch1 if not np.array_equal(epoch1[k], clean[k])}
    assert hit0 != hit1  # a fresh draw of which samples are corrupted...
    both = hit0 & hit1
    assert both and all(not np.array_equal(epoch0[k], epoch1[k]) for k in both)  # ...and of their noise


def test_missing_at_p1_zeroes_train_batches_and_never_touches_val_or_test(small_shards):
    clean = _source(small_shards)
    dropped = _source(small_shards, {"modality": "visual", "name": "missing", "level": 1, "p": 1.0})
    for (batch, _), (ref, _) in zip(_train(dropped, 2), _train(clean, 2)):
        assert not batch["visual"].any()
        np.testing.assert_array_equal(batch["audio"], ref["audio"])
    for key in ("val", "test"):
        for (batch, labels), (ref, ref_labels) in zip(dropped.eval_batches(key, 64), clean.eval_batches(key, 64)):
            for m in ("audio", "visual"):
                assert torch.equal(batch[m], ref[m]), (key, m)
            assert torch.equal(labels, ref_labels)


def test_ray_collate_of_a_decoded_shard_matches_the_in_process_noise(small_shards):
    """The numpy step a Ray worker runs (decode_batch on Arrow rows with ``sample_id``, then
    collate_train_batch), without starting Ray, on rows in another order than the split's."""
    recipe = _recipe(small_shards, SNR, {"modality": "visual", "name": "missing", "level": 1, "p": 0.3})
    manifest = read_manifest(small_shards)
    modalities = ["audio", "visual"]
    table = pq.read_table(
        small_shards / manifest.splits["train"].files[0].path, columns=["label", "sample_id", *modalities]
    )
    table = table.take(np.random.default_rng(0).permutation(table.num_rows)[:40])
    decoded = decode_batch(
        table,
        {m: manifest.modalities[m].shape for m in modalities},
        {m: manifest.modalities[m].dtype for m in modalities},
    )
    assert decoded["sample_id"].dtype == object and decoded["sample_id"][0] == table.column("sample_id")[0].as_py()
    corruptor = TrainCorruptor.from_recipe(recipe)
    tensors = collate_train_batch(decoded, corruptor, 3, modalities)
    assert set(tensors) == {"audio", "visual", "label"}

    split = load_split(small_shards, manifest, "train", modalities)
    expected = corruptor.apply(split.modalities, split.sample_ids, 3)
    rows = [split.sample_ids.index(s) for s in decoded["sample_id"]]
    for m in modalities:
        np.testing.assert_array_equal(tensors[m].numpy(), expected[m][rows])
    np.testing.assert_array_equal(tensors["label"].numpy(), split.labels[rows])


def _run(tmp_path, name, tree, **extra):
    out = tmp_path / name
    return run_training(RunSpec.of(validate_recipe(tree), out, verbose=False, **extra)), RunRecord(out).read_metrics()


def _strip(rows):
    return [{k: v for k, v in r.items() if k != "train/samples_per_s"} for r in rows]


def test_run_with_train_corruption_is_reproducible_and_differs_from_clean(tmp_path, small_shards):
    noisy = recipe_dict(small_shards)
    noisy["data"]["train_corruptions"] = [SNR]
    clean_result, clean = _run(tmp_path, "clean", recipe_dict(small_shards))
    first_result, first = _run(tmp_path, "a", noisy)
    second_result, second = _run(tmp_path, "b", noisy)
    assert _strip(first) == _strip(second) and first_result["test"] == second_result["test"]
    assert [m["train/loss_total"] for m in first] != [m["train/loss_total"] for m in clean]
    assert _strip(first) != _strip(clean)
    assert first[-1]["train/loss_total"] < first[0]["train/loss_total"]  # it still trains


def test_resumed_run_with_train_corruption_equals_uninterrupted_run(tmp_path, small_shards):
    tree = recipe_dict(small_shards)
    tree["data"]["train_corruptions"] = [SNR, {"modality": "visual", "name": "missing", "level": 1, "p": 0.2}, NOISE]
    full_result, full = _run(tmp_path, "full", tree)
    _run(tmp_path, "part", dict(tree, schedule={"epochs": 2, "batch_size": 32}))
    resumed_result, resumed = _run(tmp_path, "part", tree, resume=True)
    assert _strip(resumed) == _strip(full) and resumed_result["test"] == full_result["test"]


@pytest.mark.integration
def test_ray_data_train_shard_gets_the_in_process_noise_per_sample(ray_cluster, small_shards):
    """Ray Data end to end (read_parquet with sample_id -> decode -> local shuffle -> collate in
    the prefetch threads), iterated through the same DataIterator API a Train worker's shard has."""
    from mmbalance.engine.ray_data import BlockDecoder, build_datasets, iter_train_batches

    recipe = _recipe(small_shards, SNR)
    manifest = read_manifest(small_shards)
    modalities = list(recipe.modalities)
    corruptor = TrainCorruptor.from_recipe(recipe)
    shard = build_datasets(recipe, manifest, str(small_shards), workers=1)["train"].iterator()
    batches = list(
        iter_train_batches(
            shard,
            32,
            buffer=256,
            seed=epoch_seed(recipe.seed, 1),
            corruptor=corruptor,
            epoch=1,
            modalities=modalities,
            decode=BlockDecoder.of(recipe, manifest),
        )
    )
    assert len(batches) == 512 // 32 and set(batches[0]) == {"audio", "visual", "label"}

    split = load_split(small_shards, manifest, "train", modalities)
    expected = corruptor.apply(split.modalities, split.sample_ids, 1)
    row_of = {split.modalities["visual"][i].tobytes(): i for i in range(len(split))}  # clean visual names the sample
    seen, hit = [], 0
    for batch in batches:
        for audio, visual, label in zip(batch["audio"].numpy(), batch["visual"].numpy(), batch["label"].numpy()):
            i = row_of[visual.tobytes()]
            np.testing.assert_array_equal(audio, expected["audio"][i])
            assert label == split.labels[i]
            hit += not np.array_equal(audio, split.modalities["audio"][i])
            seen.append(i)
    assert sorted(seen) == list(range(len(split)))
    assert 0.35 * len(split) < hit < 0.65 * len(split)


def test_feature_noise_changes_only_the_training_batches_by_level_times_train_std(small_shards):
    from mmbalance.data.corruptions import sample_rng
    from mmbalance.data.shards import feature_std

    manifest = read_manifest(small_shards)
    clean, noisy = _source(small_shards), _source(small_shards, NOISE)
    train_std = feature_std(small_shards, manifest, "train", "visual")
    assert noisy.corruptor.specs[0].std == train_std.ravel().tolist()  # resolved from the train split
    assert not np.allclose(train_std, feature_std(small_shards, manifest, "val", "visual"))
    ids = []
    real = noisy.corruptor.apply
    noisy.corruptor.apply = lambda batch, sample_ids, epoch: ids.extend(sample_ids) or real(batch, sample_ids, epoch)
    hit, rows = [], 0
    for (c, c_labels), (n, n_labels) in zip(_train(clean, 2), _train(noisy, 2)):
        np.testing.assert_array_equal(n_labels, c_labels)
        np.testing.assert_array_equal(n["audio"], c["audio"])
        for clean_row, noisy_row in zip(c["visual"], n["visual"]):
            sample_id = ids[rows]
            rows += 1
            if np.array_equal(clean_row, noisy_row):
                continue
            hit.append(sample_id)
            rng = sample_rng(epoch_seed(noisy.corruptor.seed, 2), noisy.corruptor.specs[0], sample_id)
            rng.random()
            expected = clean_row.astype(np.float64) + 1.0 * train_std * rng.standard_normal(clean_row.shape)
            np.testing.assert_array_equal(noisy_row, expected.astype(np.float32))
    assert rows == 512 and 0.35 < len(hit) / rows < 0.65
    for key in ("val", "test"):  # evaluation batches stay clean
        for (batch, _), (ref, _) in zip(noisy.eval_batches(key, 64), clean.eval_batches(key, 64)):
            assert all(torch.equal(batch[m], ref[m]) for m in ("audio", "visual"))


def test_run_with_train_feature_noise_trains_and_differs_from_clean(tmp_path, small_shards):
    noisy = recipe_dict(small_shards)
    noisy["data"]["train_corruptions"] = [NOISE]
    _, clean = _run(tmp_path, "clean", recipe_dict(small_shards))
    _, first = _run(tmp_path, "noisy", noisy)
    assert [m["train/loss_total"] for m in first] != [m["train/loss_total"] for m in clean]
    assert first[-1]["train/loss_total"] < first[0]["train/loss_total"]  # it still trains


def test_ray_collate_with_feature_noise_matches_the_in_process_noise(small_shards):
    recipe = _recipe(small_shards, NOISE)
    manifest = read_manifest(small_shards)
    modalities = ["audio", "visual"]
    table = pq.read_table(
        small_shards / manifest.splits["train"].files[0].path, columns=["label", "sample_id", *modalities]
    )
    table = table.take(np.random.default_rng(1).permutation(table.num_rows)[:40])
    decoded = decode_batch(
        table,
        {m: manifest.modalities[m].shape for m in modalities},
        {m: manifest.modalities[m].dtype for m in modalities},
    )
    worker = TrainCorruptor.from_recipe(recipe, manifest)  # what RayShardSource builds on each worker
    tensors = collate_train_batch(decoded, worker, 3, modalities)
    split = load_split(small_shards, manifest, "train", modalities)
    expected = InMemorySource(recipe, manifest, CPU).corruptor.apply(split.modalities, split.sample_ids, 3)
    rows = [split.sample_ids.index(s) for s in decoded["sample_id"]]
    np.testing.assert_array_equal(tensors["visual"].numpy(), expected["visual"][rows])
    assert not np.array_equal(tensors["visual"].numpy(), split.modalities["visual"][rows])
