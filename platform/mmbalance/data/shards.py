"""Write, validate and load Parquet shards.

Writing is atomic: everything goes to a hidden temporary directory beside the target,
which is renamed into place only when every file and the manifest are written, so a failed
or interrupted prepare leaves nothing half-written. Validation names the exact file and
column on any disagreement, so a bad shard fails before training starts.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mmbalance import outputs
from mmbalance.data import storage
from mmbalance.data.manifest import (
    MANIFEST_NAME,
    Encoding,
    Manifest,
    ModalitySpec,
    ShardFile,
    SplitInfo,
    read_manifest,
)

ARROW_DTYPES = {"float32": pa.float32(), "float16": pa.float16(), "uint8": pa.uint8(), "int64": pa.int64()}


class ShardError(ValueError):
    """A shard disagrees with its manifest; the message names the file and column."""


@dataclass
class SplitArrays:
    """One split in memory: ``modalities[m]`` has shape ``[N, *spec.shape]``."""

    sample_ids: list[str]
    labels: np.ndarray  # [N] int64
    modalities: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.labels)


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with storage.open_input(path) as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tensor_type(spec: ModalitySpec) -> pa.DataType:
    """The Arrow type of a modality column in the file (``ModalitySpec.encoding``)."""
    if spec.encoding == "bytes":
        return pa.binary(spec.stored_nbytes)
    return pa.list_(ARROW_DTYPES[spec.storage_dtype], spec.size)


def arrow_schema(modalities: dict[str, ModalitySpec]) -> pa.Schema:
    fields = [pa.field("sample_id", pa.string()), pa.field("label", pa.int64()), pa.field("split", pa.string())]
    fields += [pa.field(m, tensor_type(spec)) for m, spec in modalities.items()]
    return pa.schema(fields)


def column_compression(schema: pa.Schema) -> str | dict[str, str]:
    """Parquet codec per column: ``bytes`` tensors are written uncompressed (their read is then a
    buffer copy; decompressing would be most of its cost), everything else with zstd. Without a
    ``bytes`` column, plain ``"zstd"``: the files stay byte for byte what they were before."""
    if not any(pa.types.is_fixed_size_binary(f.type) for f in schema):
        return "zstd"
    # Keys are Parquet leaf paths: a list column's values live at "<name>.list.element".
    return {
        f"{f.name}.list.element" if pa.types.is_fixed_size_list(f.type) else f.name: (
            "none" if pa.types.is_fixed_size_binary(f.type) else "zstd"
        )
        for f in schema
    }


def with_encoding(modalities: dict[str, ModalitySpec], encoding: Encoding | None) -> dict[str, ModalitySpec]:
    """``modalities`` with every spec in ``encoding`` (``None``: as given)."""
    if encoding is None:
        return dict(modalities)
    return {m: spec.model_copy(update={"encoding": encoding}) for m, spec in modalities.items()}


def _little_endian(dtype: str) -> np.dtype:
    return np.dtype(dtype).newbyteorder("<")


def encode_tensor(values: np.ndarray, spec: ModalitySpec) -> pa.Array:
    """``[N, *shape]`` values -> one modality column of ``spec``'s type (flattened row-major)."""
    n = values.shape[0]
    flat = np.ascontiguousarray(values, dtype=_little_endian(spec.storage_dtype)).reshape(n * spec.size)
    if spec.encoding == "bytes":
        return pa.FixedSizeBinaryArray.from_buffers(tensor_type(spec), n, [None, pa.py_buffer(flat)])
    return pa.FixedSizeListArray.from_arrays(pa.array(flat, ARROW_DTYPES[spec.storage_dtype]), spec.size)


def conform_table(table: pa.Table, schema: pa.Schema, modalities: dict[str, ModalitySpec]) -> pa.Table:
    """``table`` with each modality column re-encoded to ``schema``'s layout where it is in the
    other one (a converter builds its chunks as ``tensor``; the shards may be ``bytes``). A table
    with other columns is returned as it is, for the writer's schema check to name them."""
    if table.schema == schema or set(table.column_names) != set(schema.names):
        return table
    columns = {}
    for field in schema:
        column, spec = table.column(field.name), modalities.get(field.name)
        if spec is not None and column.type != field.type:
            # Same spec, other layout: a list column's values carry their own type, raw bytes are ``stored``.
            column = encode_tensor(tensor_column(column, spec.dtype, spec.shape, spec.storage_dtype), spec)
        columns[field.name] = column
    return pa.table(columns)


def rows_table(
    sample_ids: Sequence[str],
    labels: Sequence[int],
    splits: Sequence[str],
    arrays: dict[str, np.ndarray],
    modalities: dict[str, ModalitySpec],
) -> pa.Table:
    """Rows (``arrays[m]`` of shape ``[N, *spec.shape]``) as an Arrow table of the shard schema."""
    n = len(sample_ids)
    columns: dict[str, pa.Array] = {
        "sample_id": pa.array(list(sample_ids), pa.string()),
        "label": pa.array(np.asarray(labels, dtype=np.int64)),
        "split": pa.array(list(splits), pa.string()),
    }
    for m, spec in modalities.items():
        columns[m] = encode_tensor(np.asarray(arrays[m]).reshape(n, spec.size), spec)
    return pa.table(columns, schema=arrow_schema(modalities))


def column_tensor(table: pa.Table, column: str, spec: ModalitySpec) -> np.ndarray:
    """A modality column of ``table`` in either encoding -> ``[rows, *shape]`` in ``spec.dtype``."""
    return tensor_column(table.column(column), spec.dtype, list(spec.shape), spec.storage_dtype)


def tensor_column(column: pa.ChunkedArray, dtype: str, shape: list[int], stored: str | None = None) -> np.ndarray:
    """A fixed-size tensor column -> ``[rows, *shape]`` in ``dtype``.

    Each chunk is a ``fixed_size_list`` (``encoding: tensor``) or a ``fixed_size_binary`` holding a
    row's raw little-endian bytes in element type ``stored`` (``encoding: bytes``; default
    ``dtype``); either way its values are one
    contiguous buffer that numpy views without a copy (unlike ``combine_chunks``, which copies
    even a single chunk). Several chunks are concatenated once. Elements stored narrower than
    ``dtype`` (float16 spectrograms) are up-cast here, so training always sees ``dtype``."""
    size = 1
    for dim in shape:
        size *= dim
    parts = [_chunk_values(chunk, stored or dtype, size) for chunk in column.chunks]
    if not parts:
        return np.empty((0, *shape), dtype=dtype)
    flat = parts[0] if len(parts) == 1 else np.concatenate(parts)
    return flat.astype(dtype, copy=False).reshape(len(column), *shape)


def decode_batch(
    table: pa.Table, shapes: dict[str, list[int]], dtypes: dict[str, str], stored: dict[str, str] | None = None
) -> dict[str, np.ndarray]:
    """Arrow rows with flattened tensors -> numpy arrays ``[B, *shape]`` of the manifest's
    dtypes (Ray Data's eval decode and the train workers' ``BlockDecoder``). It lives here, with
    no torch in its imports, because Ray unpickles it by module in every fresh task worker:
    from ``engine/ray_data`` each such worker first imported torch (seconds of CPU on 2 cores,
    taken from training). A selected ``sample_id`` column passes through as a ``[B]``
    object array of str. ``stored`` names a modality's element type in the file where it differs
    (``ModalitySpec.stored``); those elements are up-cast to ``dtypes``."""
    out = {"label": table.column("label").to_numpy().astype(np.int64, copy=False)}
    if "sample_id" in table.column_names:
        out["sample_id"] = table.column("sample_id").to_numpy(zero_copy_only=False)
    for m, shape in shapes.items():
        out[m] = tensor_column(table.column(m), dtypes[m], shape, (stored or {}).get(m))
    return out


def _chunk_values(chunk: pa.Array, stored: str, size: int) -> np.ndarray:
    if pa.types.is_fixed_size_binary(chunk.type):
        start = chunk.offset * chunk.type.byte_width
        return np.frombuffer(chunk.buffers()[1], dtype=_little_endian(stored), count=len(chunk) * size, offset=start)
    return chunk.flatten().to_numpy(zero_copy_only=False)


def write_shards(
    out_dir: str | Path,
    *,
    dataset: str,
    classes: list[str],
    modalities: dict[str, ModalitySpec],
    splits: dict[str, SplitArrays],
    generator: dict[str, Any],
    preprocessing: dict[str, Any],
    rows_per_file: int = 2048,
    overwrite: bool = False,
    encoding: Encoding | None = None,
) -> Manifest:
    """Write in-memory ``splits`` as ``out_dir/<split>/part-NNNNN.parquet`` + ``manifest.json``, atomically.
    ``encoding`` sets every modality's column layout (``ModalitySpec.encoding``); ``None`` keeps
    each spec's own."""
    modalities = with_encoding(modalities, encoding)
    for split, arrays in splits.items():
        _check_arrays(split, arrays, modalities, len(classes))

    def tables(split: str, arrays: SplitArrays):
        for lo in range(0, len(arrays), rows_per_file):
            hi = min(lo + rows_per_file, len(arrays))
            yield rows_table(
                arrays.sample_ids[lo:hi],
                arrays.labels[lo:hi],
                [split] * (hi - lo),
                {m: arrays.modalities[m][lo:hi] for m in modalities},
                modalities,
            )

    return write_split_tables(
        out_dir,
        dataset=dataset,
        classes=classes,
        modalities=modalities,
        split_tables={split: tables(split, arrays) for split, arrays in splits.items()},
        generator=generator,
        preprocessing=preprocessing,
        rows_per_file=rows_per_file,
        overwrite=overwrite,
    )


class _SplitFileWriter:
    """Regroups a stream of Arrow tables into files of exactly ``rows_per_file`` rows (the last
    may be shorter), so the file layout depends on the rows alone, not on how they arrived."""

    def __init__(
        self, root: Path, split: str, schema: pa.Schema, rows_per_file: int, modalities: dict[str, ModalitySpec]
    ):
        self.root, self.split, self.schema, self.rows_per_file = root, split, schema, rows_per_file
        self.modalities = modalities
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.files: list[ShardFile] = []

    def add(self, table: pa.Table) -> None:
        table = conform_table(table, self.schema, self.modalities)
        if table.schema != self.schema:
            raise ValueError(f"split {self.split!r}: table schema {table.schema} differs from {self.schema}")
        self.pending.append(table)
        self.pending_rows += table.num_rows
        while self.pending_rows >= self.rows_per_file:
            self._flush(self.rows_per_file)

    def close(self) -> SplitInfo:
        if self.pending_rows or not self.files:  # an empty split still gets one (empty) file
            self._flush(self.pending_rows)
        return SplitInfo(rows=sum(f.rows for f in self.files), files=self.files)

    def _flush(self, rows: int) -> None:
        table = pa.concat_tables(self.pending) if self.pending else self.schema.empty_table()
        head, rest = table.slice(0, rows), table.slice(rows)
        rel = f"{self.split}/part-{len(self.files):05d}.parquet"
        pq.write_table(head.combine_chunks(), self.root / rel, compression=column_compression(self.schema))
        self.files.append(ShardFile(path=rel, rows=rows, sha256=sha256_of(self.root / rel)))
        self.pending, self.pending_rows = ([rest] if rest.num_rows else []), rest.num_rows


def write_split_tables(
    out_dir: str | Path,
    *,
    dataset: str,
    classes: list[str],
    modalities: dict[str, ModalitySpec],
    split_tables: dict[str, Iterable[pa.Table]],
    generator: dict[str, Any],
    preprocessing: dict[str, Any],
    rows_per_file: int = 2048,
    overwrite: bool = False,
    encoding: Encoding | None = None,
) -> Manifest:
    """Stream each split's Arrow tables (schema ``arrow_schema(modalities)``, each modality in
    either encoding) into shards, so a dataset larger than memory is written one file at a time.
    Atomic like ``write_shards``; ``encoding`` as there."""
    modalities = with_encoding(modalities, encoding)
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    if out.exists():  # replacing removes the old directory: it may hold nothing but shards
        outputs.check_replaceable(out, outputs.shards_layout(out))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as err:  # name the directory the user asked for, not the temporary one
        raise OSError(err.errno, err.strerror, str(out)) from err
    tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary directory
    schema = arrow_schema(modalities)
    try:
        split_infos = {}
        for split, tables in split_tables.items():
            (tmp / split).mkdir()
            writer = _SplitFileWriter(tmp, split, schema, rows_per_file, modalities)
            for table in tables:
                _check_table(split, table, len(classes))
                writer.add(table)
            split_infos[split] = writer.close()
        manifest = Manifest(
            dataset=dataset,
            classes=classes,
            modalities=modalities,
            splits=split_infos,
            generator=generator,
            preprocessing=preprocessing,
        )
        manifest.dump(tmp / MANIFEST_NAME)
        _replace(tmp, out)
        return manifest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _check_table(split: str, table: pa.Table, num_classes: int) -> None:
    labels = table.column("label").to_numpy()
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"split {split!r}: labels must lie in [0, {num_classes})")
    if table.num_rows and set(table.column("split").to_pylist()) != {split}:
        raise ValueError(f"split {split!r}: rows carry split values {sorted(set(table.column('split').to_pylist()))}")


def rows_per_file_for(modalities: dict[str, ModalitySpec], target_bytes: int = 64 << 20, cap: int = 2048) -> int:
    """Rows per shard file so a file holds about ``target_bytes`` of tensors: Ray Data reads a
    file per task, and 2048 rows of 224x224 frames would make single files of gigabytes."""
    row_bytes = sum(spec.nbytes for spec in modalities.values())
    return max(1, min(cap, target_bytes // max(row_bytes, 1)))


def _replace(tmp: Path, out: Path) -> None:
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _check_arrays(split: str, arrays: SplitArrays, modalities: dict[str, ModalitySpec], num_classes: int) -> None:
    n = len(arrays.labels)
    if len(arrays.sample_ids) != n:
        raise ValueError(f"split {split!r}: {len(arrays.sample_ids)} sample ids for {n} labels")
    if n and (arrays.labels.min() < 0 or arrays.labels.max() >= num_classes):
        raise ValueError(f"split {split!r}: labels must lie in [0, {num_classes})")
    for m, spec in modalities.items():
        data = arrays.modalities.get(m)
        if data is None or tuple(data.shape) != (n, *spec.shape):
            got = None if data is None else tuple(data.shape)
            raise ValueError(f"split {split!r}, modality {m!r}: expected shape {(n, *spec.shape)}, got {got}")


def validate_shards(shard_dir: str | Path, *, checksums: bool = True, values: bool = True) -> Manifest:
    """Check every file against the manifest; raise ShardError naming the file and column.
    Works on local directories and URIs (every byte is read when ``checksums``/``values``)."""
    manifest = read_manifest(shard_dir)
    expected = arrow_schema(manifest.modalities)
    for split, info in manifest.splits.items():
        for entry in info.files:
            path = storage.join(shard_dir, entry.path)
            _validate_file(path, entry, expected, manifest, checksums=checksums, values=values)
    return manifest


def _validate_file(
    path: str, entry: ShardFile, expected: pa.Schema, manifest: Manifest, *, checksums: bool, values: bool
) -> None:
    if not storage.exists(path):
        raise ShardError(f"{path}: listed in manifest.json but missing")
    if checksums and sha256_of(path) != entry.sha256:
        raise ShardError(f"{path}: checksum mismatch (file changed or corrupt since prepare)")
    try:
        parquet = pq.ParquetFile(storage.open_input(path))
    except Exception as err:  # pyarrow raises several types for truncated/corrupt files
        raise ShardError(f"{path}: not a readable Parquet file ({err})") from err
    schema = parquet.schema_arrow
    for field in expected:
        if field.name not in schema.names:
            raise ShardError(f"{path}: column {field.name!r} is missing (manifest expects {field.type})")
        if schema.field(field.name).type != field.type:
            raise ShardError(
                f"{path}: column {field.name!r} has type {schema.field(field.name).type}, manifest expects {field.type}"
            )
    extra = set(schema.names) - set(expected.names)
    if extra:
        raise ShardError(f"{path}: columns {sorted(extra)} are not in the manifest")
    if parquet.metadata.num_rows != entry.rows:
        raise ShardError(f"{path}: {parquet.metadata.num_rows} rows, manifest says {entry.rows}")
    if values:
        _validate_values(path, parquet.read(), manifest)


def _validate_values(path: str, table: pa.Table, manifest: Manifest) -> None:
    labels = table.column("label").to_numpy()
    bad = np.flatnonzero((labels < 0) | (labels >= manifest.num_classes))
    if bad.size:
        raise ShardError(
            f"{path}: column 'label' row {bad[0]} has value {labels[bad[0]]}, outside [0, {manifest.num_classes})"
        )
    for m, spec in manifest.modalities.items():
        if spec.dtype != "float32":
            continue
        flat = column_tensor(table, m, spec).reshape(-1)
        nonfinite = np.flatnonzero(~np.isfinite(flat))
        if nonfinite.size:
            raise ShardError(f"{path}: column {m!r} row {nonfinite[0] // spec.size} holds a non-finite value")


def load_split(shard_dir: str | Path, manifest: Manifest, split: str, columns: list[str] | None = None) -> SplitArrays:
    """Read one split fully into memory (the in-process reader; Ray Data streams instead)."""
    if split not in manifest.splits:
        raise KeyError(f"split {split!r} not in {shard_dir} (has {sorted(manifest.splits)})")
    mods = columns or list(manifest.modalities)
    fs, root = storage.resolve(shard_dir)
    tables = [
        pq.read_table(storage.join(root, f.path), columns=["sample_id", "label", *mods], filesystem=fs)
        for f in manifest.splits[split].files
    ]
    table = pa.concat_tables(tables)
    arrays = {m: column_tensor(table, m, manifest.modalities[m]) for m in mods}
    return SplitArrays(
        sample_ids=table.column("sample_id").to_pylist(),
        labels=table.column("label").to_numpy().astype(np.int64),
        modalities=arrays,
    )


def feature_std(shard_dir: str | Path, manifest: Manifest, split: str, modality: str) -> np.ndarray:
    """Population standard deviation (ddof 0) of every element of ``modality``'s per-sample shape
    over ``split``: float64 ``[*shape]``, exactly 0 where the element is constant over the split.

    ``feature_noise``'s scale (``corruptions.for_data``, which passes the recipe's train split).
    Reads one file and one column at a time, combined in the manifest's file order (Chan et al.'s
    pairwise update of mean and squared deviations), so every process computes the same bits."""
    if split not in manifest.splits:
        raise KeyError(f"split {split!r} not in {shard_dir} (has {sorted(manifest.splits)})")
    spec = manifest.modalities[modality]
    fs, root = storage.resolve(shard_dir)
    count, mean, m2, lo, hi = 0, None, None, None, None
    for entry in manifest.splits[split].files:
        table = pq.read_table(storage.join(root, entry.path), columns=[modality], filesystem=fs)
        if table.num_rows == 0:
            continue
        x = column_tensor(table, modality, spec).astype(np.float64)  # [n, *shape]
        n = x.shape[0]
        part_mean = x.mean(axis=0)
        part_m2 = np.square(x - part_mean).sum(axis=0)
        part_lo, part_hi = x.min(axis=0), x.max(axis=0)
        if count == 0:
            count, mean, m2, lo, hi = n, part_mean, part_m2, part_lo, part_hi
            continue
        total = count + n
        delta = part_mean - mean
        mean = mean + delta * (n / total)
        m2 = m2 + part_m2 + np.square(delta) * (count * n / total)
        lo, hi = np.minimum(lo, part_lo), np.maximum(hi, part_hi)
        count = total
    if count == 0:
        raise ShardError(f"{shard_dir}: split {split!r} has no rows to compute the std of {modality!r} from")
    std = np.sqrt(m2 / count)
    # float32 values sum exactly in float64 (below 2**29 rows), so a constant feature already gets
    # exactly 0; this keeps it so should a wider dtype ever leave a rounding residue.
    std[lo == hi] = 0.0
    return std
