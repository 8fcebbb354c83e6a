"""The two tensor-column layouts of the shard format (ModalitySpec.encoding, docs/data-format.md):
the same values come back from either, the files hold the declared types and codecs, and a file
in the other layout is refused by name."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmbalance.data.convert import CONVERTERS
from mmbalance.data.manifest import ModalitySpec, read_manifest
from mmbalance.data.shards import (
    ShardError,
    SplitArrays,
    arrow_schema,
    decode_batch,
    feature_std,
    load_split,
    rows_table,
    validate_shards,
    write_shards,
    write_split_tables,
)

MODALITIES = {
    "audio": ModalitySpec(dtype="float32", shape=[3, 4]),
    "half": ModalitySpec(dtype="float32", shape=[5], stored="float16"),
    "image": ModalitySpec(dtype="uint8", shape=[2, 3, 3]),
    "text": ModalitySpec(dtype="int64", shape=[6]),
}


def _split(n: int, seed: int) -> SplitArrays:
    rng = np.random.default_rng(seed)
    return SplitArrays(
        sample_ids=[f"s{seed}-{i}" for i in range(n)],
        labels=rng.integers(0, 3, n).astype(np.int64),
        modalities={
            "audio": rng.standard_normal((n, 3, 4)).astype(np.float32),
            # float16-representable values, so the stored copy is exact
            "half": rng.standard_normal((n, 5)).astype(np.float16).astype(np.float32),
            "image": rng.integers(0, 256, (n, 2, 3, 3), dtype=np.uint8),
            "text": rng.integers(-(2**40), 2**40, (n, 6), dtype=np.int64),
        },
    )


SPLITS = {"train": _split(11, 0), "val": _split(4, 1), "test": _split(0, 2)}


def _write(tmp_path, encoding):
    out = tmp_path / encoding
    write_shards(
        out,
        dataset="enc",
        classes=["a", "b", "c"],
        modalities=MODALITIES,
        splits=SPLITS,
        generator={},
        preprocessing={},
        rows_per_file=4,
        encoding=encoding,
    )
    return out


@pytest.mark.parametrize("encoding", ["tensor", "bytes"])
def test_every_dtype_round_trips_through_either_encoding(tmp_path, encoding):
    out = _write(tmp_path, encoding)
    manifest = validate_shards(out)
    assert {spec.encoding for spec in manifest.modalities.values()} == {encoding}
    for split, arrays in SPLITS.items():
        got = load_split(out, manifest, split)
        assert got.sample_ids == arrays.sample_ids
        np.testing.assert_array_equal(got.labels, arrays.labels)
        for m, values in arrays.modalities.items():
            assert got.modalities[m].dtype == np.dtype(MODALITIES[m].dtype)
            np.testing.assert_array_equal(got.modalities[m], values)


def test_bytes_columns_are_raw_uncompressed_row_bytes_and_the_rest_stays_zstd(tmp_path):
    path = _write(tmp_path, "bytes") / "train" / "part-00000.parquet"
    parquet = pq.ParquetFile(path)
    types = {f.name: f.type for f in parquet.schema_arrow}
    assert types["audio"] == pa.binary(3 * 4 * 4)
    assert types["half"] == pa.binary(5 * 2)  # float16 elements: 2 bytes each
    assert types["image"] == pa.binary(2 * 3 * 3)
    assert types["text"] == pa.binary(6 * 8)
    group = parquet.metadata.row_group(0)
    codecs = {group.column(i).path_in_schema: group.column(i).compression for i in range(group.num_columns)}
    assert codecs == {
        "sample_id": "ZSTD",
        "label": "ZSTD",
        "split": "ZSTD",
        "audio": "UNCOMPRESSED",
        "half": "UNCOMPRESSED",
        "image": "UNCOMPRESSED",
        "text": "UNCOMPRESSED",
    }
    # A row is its values' little-endian bytes, nothing else.
    first = parquet.read().column("audio")[0].as_py()
    assert first == SPLITS["train"].modalities["audio"][0].astype("<f4").tobytes()


def test_tensor_encoding_keeps_zstd_fixed_size_lists(tmp_path):
    path = _write(tmp_path, "tensor") / "train" / "part-00000.parquet"
    parquet = pq.ParquetFile(path)
    assert parquet.schema_arrow.field("half").type == pa.list_(pa.float16(), 5)
    group = parquet.metadata.row_group(0)
    assert {group.column(i).compression for i in range(group.num_columns)} == {"ZSTD"}


def test_tensor_tables_are_re_encoded_when_the_shards_are_bytes(tmp_path):
    """A converter's chunks are built as tensor lists; write_split_tables re-encodes them."""
    arrays = SPLITS["train"]
    chunk = rows_table(arrays.sample_ids, arrays.labels, ["train"] * len(arrays), arrays.modalities, MODALITIES)
    assert pa.types.is_fixed_size_list(chunk.schema.field("audio").type)
    out = tmp_path / "streamed"
    write_split_tables(
        out,
        dataset="enc",
        classes=["a", "b", "c"],
        modalities=MODALITIES,
        split_tables={"train": [chunk.slice(0, 5), chunk.slice(5)]},
        generator={},
        preprocessing={},
        rows_per_file=4,
        encoding="bytes",
    )
    manifest = validate_shards(out)
    got = load_split(out, manifest, "train")
    for m, values in arrays.modalities.items():
        np.testing.assert_array_equal(got.modalities[m], values)


def test_a_file_in_the_other_layout_is_refused_naming_file_and_column(tmp_path):
    out = _write(tmp_path, "bytes")
    manifest = read_manifest(out)
    manifest.modalities["audio"] = manifest.modalities["audio"].model_copy(update={"encoding": "tensor"})
    manifest.dump(out / "manifest.json")
    with pytest.raises(ShardError, match=r"part-00000.parquet: column 'audio' has type fixed_size_binary\[48\]"):
        validate_shards(out, checksums=False)


def test_feature_std_and_ray_decode_agree_across_encodings(tmp_path):
    tensor, raw = _write(tmp_path, "tensor"), _write(tmp_path, "bytes")
    manifests = read_manifest(tensor), read_manifest(raw)
    for m in MODALITIES:
        np.testing.assert_array_equal(
            feature_std(tensor, manifests[0], "train", m), feature_std(raw, manifests[1], "train", m)
        )
    # Ray Data's decode sees the Arrow table read_parquet gives: both layouts decode alike.
    shapes = {m: s.shape for m, s in MODALITIES.items()}
    dtypes = {m: s.dtype for m, s in MODALITIES.items()}
    stored = {m: s.storage_dtype for m, s in MODALITIES.items()}
    decoded = [
        decode_batch(pq.read_table(root / "train" / "part-00001.parquet"), shapes, dtypes, stored)
        for root in (tensor, raw)
    ]
    for key in ["label", *MODALITIES]:
        np.testing.assert_array_equal(decoded[0][key], decoded[1][key])
        assert decoded[1][key].dtype == decoded[0][key].dtype
    np.testing.assert_array_equal(decoded[1]["audio"], SPLITS["train"].modalities["audio"][4:8])


def test_arrow_schema_follows_each_spec():
    mixed = {"a": MODALITIES["audio"], "b": MODALITIES["image"].model_copy(update={"encoding": "bytes"})}
    schema = arrow_schema(mixed)
    assert schema.field("a").type == pa.list_(pa.float32(), 12)
    assert schema.field("b").type == pa.binary(18)


def test_streamed_benchmarks_default_to_bytes_and_the_small_in_memory_datasets_to_tensor():
    defaults = {name: entry.encoding for name, entry in CONVERTERS.items()}
    assert defaults.pop("synthetic") == "tensor" and defaults.pop("avdigits") == "tensor"
    assert set(defaults.values()) == {"bytes"}


def test_prepare_encoding_flag_reaches_the_manifest(tmp_path):
    from mmbalance.cli import main

    main(["prepare", "synthetic", "--out", str(tmp_path / "b"), "--samples", "60", "--encoding", "bytes"])
    main(["prepare", "synthetic", "--out", str(tmp_path / "t"), "--samples", "60"])
    assert {s.encoding for s in read_manifest(tmp_path / "b").modalities.values()} == {"bytes"}
    assert {s.encoding for s in read_manifest(tmp_path / "t").modalities.values()} == {"tensor"}
    with pytest.raises(SystemExit) as err:
        main(["prepare", "synthetic", "--out", str(tmp_path / "x"), "--encoding", "zip"])
    assert err.value.code == 2
    assert not (tmp_path / "x").exists()


def test_the_decode_ray_unpickles_in_every_task_worker_imports_no_torch():
    """Ray imports ``decode_batch``'s module in each fresh worker; torch there costs seconds each."""
    import subprocess
    import sys

    code = "import sys, mmbalance.data.shards as s; assert s.decode_batch.__module__ == 'mmbalance.data.shards'; "
    code += "print(sorted(m for m in ('torch', 'ray') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
