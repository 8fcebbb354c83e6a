"""A corrupted copy of a shard directory: noise only in the splits named, fixed per sample."""

import numpy as np
import pytest

from mmbalance.data.corruptions import make_spec
from mmbalance.data.derive import write_corrupted_copy
from mmbalance.data.manifest import read_manifest
from mmbalance.data.shards import load_split, validate_shards


def _arrays(root, split):
    return load_split(root, read_manifest(root), split)


def test_copy_corrupts_only_the_named_splits_and_records_it(small_shards, tmp_path):
    noise = make_spec("gaussian", modality="visual", level=5, p=1.0, pixel_range=1.0)
    out = write_corrupted_copy(small_shards, tmp_path / "noisy", [noise], splits=["test"])
    validate_shards(tmp_path / "noisy")
    for split in ("train", "val"):
        np.testing.assert_array_equal(
            _arrays(tmp_path / "noisy", split).modalities["visual"], _arrays(small_shards, split).modalities["visual"]
        )
    clean, noisy = _arrays(small_shards, "test"), _arrays(tmp_path / "noisy", "test")
    assert noisy.sample_ids == clean.sample_ids and (noisy.labels == clean.labels).all()
    np.testing.assert_array_equal(noisy.modalities["audio"], clean.modalities["audio"])
    assert not np.allclose(noisy.modalities["visual"], clean.modalities["visual"])
    assert out.preprocessing["derived_from"]["corrupted_splits"] == ["test"]
    assert out.preprocessing["derived_from"]["plan"]["corruptions"][0]["level"] == 5


def test_copy_is_identical_for_the_same_seed_and_differs_for_another(small_shards, tmp_path):
    noise = make_spec("gaussian", modality="visual", level=5, p=1.0, pixel_range=1.0)
    first = write_corrupted_copy(small_shards, tmp_path / "a", [noise])
    again = write_corrupted_copy(small_shards, tmp_path / "b", [noise])
    other = write_corrupted_copy(small_shards, tmp_path / "c", [noise], seed=1)
    digests = [[f.sha256 for f in m.splits["train"].files] for m in (first, again, other)]
    assert digests[0] == digests[1] != digests[2]


def test_copy_refuses_an_unknown_split(small_shards, tmp_path):
    noise = make_spec("gaussian", modality="visual", level=5, p=1.0, pixel_range=1.0)
    with pytest.raises(ValueError, match="'holdout'"):
        write_corrupted_copy(small_shards, tmp_path / "x", [noise], splits=["holdout"])
    assert not (tmp_path / "x").exists()
