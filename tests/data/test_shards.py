import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import small_spec
from mmbalance.data import shards as shards_module
from mmbalance.data.manifest import read_manifest
from mmbalance.data.shards import ShardError, load_split, sha256_of, validate_shards
from mmbalance.data.synthetic import SyntheticSpec, generate, prepare_synthetic


@pytest.fixture
def shard_copy(small_shards, tmp_path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(small_shards, copy)
    return copy


def _first_file(root: Path) -> Path:
    return root / read_manifest(root).splits["train"].files[0].path


def _rewrite(root: Path, path: Path, table: pa.Table, fix_checksum: bool = True) -> None:
    pq.write_table(table, path)
    if fix_checksum:
        manifest = json.loads((root / "manifest.json").read_text())
        rel = str(path.relative_to(root))
        for entry in manifest["splits"]["train"]["files"]:
            if entry["path"] == rel:
                entry["sha256"] = sha256_of(path)
        (root / "manifest.json").write_text(json.dumps(manifest))


def test_valid_shards_pass_and_round_trip(small_shards):
    manifest = validate_shards(small_shards)
    arrays = load_split(small_shards, manifest, "train")
    expected = generate(small_spec())["train"]
    assert arrays.sample_ids == expected.sample_ids
    np.testing.assert_array_equal(arrays.labels, expected.labels)
    np.testing.assert_array_equal(arrays.modalities["visual"], expected.modalities["visual"])


def test_corrupt_file_fails_its_checksum_naming_the_file(shard_copy):
    path = _first_file(shard_copy)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=f"{path.name}: checksum mismatch"):
        validate_shards(shard_copy)


def test_truncated_file_is_reported_as_unreadable(shard_copy):
    path = _first_file(shard_copy)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ShardError, match=f"{path.name}: not a readable Parquet file"):
        validate_shards(shard_copy, checksums=False)


def test_wrong_column_type_names_file_and_column(shard_copy):
    path = _first_file(shard_copy)
    table = pq.read_table(path)
    table = table.set_column(table.schema.get_field_index("label"), "label", table.column("label").cast(pa.float64()))
    _rewrite(shard_copy, path, table)
    with pytest.raises(ShardError, match=f"{path.name}: column 'label' has type double, manifest expects int64"):
        validate_shards(shard_copy)


def test_missing_column_names_file_and_column(shard_copy):
    path = _first_file(shard_copy)
    _rewrite(shard_copy, path, pq.read_table(path).drop_columns(["visual"]))
    with pytest.raises(ShardError, match=f"{path.name}: column 'visual' is missing"):
        validate_shards(shard_copy)


def test_label_out_of_range_names_the_row(shard_copy):
    path = _first_file(shard_copy)
    table = pq.read_table(path)
    labels = table.column("label").to_numpy().copy()
    labels[5] = 99
    _rewrite(shard_copy, path, table.set_column(table.schema.get_field_index("label"), "label", pa.array(labels)))
    with pytest.raises(ShardError, match=f"{path.name}: column 'label' row 5 has value 99, outside \\[0, 4\\)"):
        validate_shards(shard_copy)


def test_nan_value_names_file_column_and_row(shard_copy):
    path = _first_file(shard_copy)
    table = pq.read_table(path)
    values = table.column("audio").combine_chunks().flatten().to_numpy().copy()
    values[3 * 8 + 2] = np.nan  # row 3 (8 values per row)
    column = pa.FixedSizeListArray.from_arrays(pa.array(values), 8)
    _rewrite(shard_copy, path, table.set_column(table.schema.get_field_index("audio"), "audio", column))
    with pytest.raises(ShardError, match=f"{path.name}: column 'audio' row 3 holds a non-finite value"):
        validate_shards(shard_copy)


def test_row_count_disagreeing_with_manifest_is_reported(shard_copy):
    manifest = json.loads((shard_copy / "manifest.json").read_text())
    manifest["splits"]["train"]["files"][0]["rows"] += 1
    manifest["splits"]["train"]["rows"] += 1
    (shard_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match="rows, manifest says"):
        validate_shards(shard_copy, checksums=False)


def test_failed_prepare_leaves_nothing_behind(tmp_path, monkeypatch):
    calls = {"n": 0}
    real_write = shards_module.pq.write_table

    def failing_write(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real_write(*args, **kwargs)

    monkeypatch.setattr(shards_module.pq, "write_table", failing_write)
    with pytest.raises(OSError, match="disk full"):
        prepare_synthetic(tmp_path / "out", small_spec())
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_previous_shards(tmp_path, monkeypatch):
    out = tmp_path / "out"
    prepare_synthetic(out, small_spec())
    before = (out / "manifest.json").read_bytes()
    monkeypatch.setattr(shards_module.pq, "write_table", lambda *a, **k: (_ for _ in ()).throw(OSError("boom")))
    with pytest.raises(OSError):
        prepare_synthetic(out, small_spec(seed=1), overwrite=True)
    assert (out / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_existing_output_is_not_overwritten_by_default(small_shards):
    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare_synthetic(small_shards, small_spec())


def test_same_seed_gives_byte_identical_shards_and_other_seeds_differ(tmp_path):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        prepare_synthetic(tmp_path / name, small_spec(seed=seed))
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert files
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    assert (tmp_path / "a" / "manifest.json").read_bytes() != (tmp_path / "c" / "manifest.json").read_bytes()


def test_synthetic_v1_default_makes_audio_dominant():
    spec = SyntheticSpec(version=1)  # version 2's visual signal is an XOR code: tests/test_synthetic.py
    audio, visual = spec.modalities["audio"], spec.modalities["visual"]
    assert audio.signal > 2 * visual.signal and visual.signal > 0


def test_synthetic_spec_rejects_bad_values():
    with pytest.raises(ValueError, match="at least 2 modalities"):
        SyntheticSpec(modalities={"audio": {"signal": 1.0}})
    with pytest.raises(ValueError, match="train, val and test"):
        SyntheticSpec(samples={"train": 10, "test": 10})


def test_shards_are_read_through_a_uri(small_shards):
    uri = f"file://{small_shards.resolve()}"
    manifest = validate_shards(uri)
    by_uri = load_split(uri, manifest, "val")
    by_path = load_split(small_shards, manifest, "val")
    assert by_uri.sample_ids == by_path.sample_ids
    np.testing.assert_array_equal(by_uri.modalities["audio"], by_path.modalities["audio"])


def test_missing_manifest_at_a_uri_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        validate_shards(f"file://{tmp_path}")
