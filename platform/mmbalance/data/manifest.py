"""The shard manifest: what a directory of Parquet shards holds (docs/data-format.md).

The manifest is the contract between ``mmbalance prepare`` (or a user's own pyarrow
script) and training: classes, modalities with dtype and per-sample shape, splits with
per-file row counts and checksums, and every preprocessing parameter. Training reads the
number of classes and the input shapes from here, never from a recipe.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mmbalance.data import storage

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
Dtype = Literal["float32", "uint8", "int64"]
SPLITS = ("train", "val", "test")
ITEMSIZE = {"float32": 4, "uint8": 1, "int64": 8}
STORED_ITEMSIZE = {**ITEMSIZE, "float16": 2}


def split_order(split: str) -> tuple[int, str]:
    """Sort key: train, val, test first, then any other split by name."""
    return (SPLITS.index(split) if split in SPLITS else len(SPLITS), split)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Normalization(_Strict):
    """``(x - mean) / std`` that the model applies to this input, per channel along ``axis`` of the
    per-sample shape (``None``: one scalar pair). Stored values stay raw (uint8 pixels, log
    magnitudes) so corruptions act in the data's own units, as the robustness protocol defines them;
    the statistics travel with the data instead of being copied into every recipe."""

    mean: list[float] = Field(min_length=1)
    std: list[float] = Field(min_length=1)
    axis: int | None = None
    source: str = Field("", description="where the numbers come from, e.g. 'train split' or 'ImageNet'")

    @model_validator(mode="after")
    def _check(self) -> "Normalization":
        if len(self.mean) != len(self.std):
            raise ValueError(f"normalize: {len(self.mean)} means for {len(self.std)} stds")
        if any(not s > 0 for s in self.std):
            raise ValueError("normalize: every std must be > 0")
        if self.axis is None and len(self.mean) != 1:
            raise ValueError("normalize: axis is null but there is more than one mean")
        return self


Encoding = Literal["tensor", "bytes"]
ENCODINGS: tuple[str, ...] = get_args(Encoding)


class ModalitySpec(_Strict):
    """One modality column: a fixed-shape tensor per row, flattened row-major, in one of two
    layouts (``encoding``):

    - ``tensor``: a Parquet ``fixed_size_list<dtype>[prod(shape)]``, zstd-compressed. Readable by
      any Arrow tool element by element, but Parquet decodes a nested list element by element
      (repetition and definition levels for every value), which makes it the slowest column to read.
    - ``bytes``: a ``fixed_size_binary[prod(shape) * itemsize]`` holding each row's raw
      little-endian bytes, written uncompressed: a file read is one buffer copy, about twenty
      times faster than ``tensor`` (docs/data-format.md), for the same bytes in memory. The
      layout for shards that are streamed every epoch."""

    dtype: Dtype
    shape: list[int] = Field(min_length=1)
    encoding: Encoding = "tensor"
    normalize: Normalization | None = None
    stored: Literal["float16"] | None = Field(
        None,
        description="element type of the Parquet column where it is narrower than dtype (float16 halves a "
        "float32 spectrogram's bytes); readers up-cast to dtype, so training sees dtype. None: dtype itself",
    )

    @model_validator(mode="after")
    def _check_normalize(self) -> "ModalitySpec":
        norm = self.normalize
        if norm is not None and norm.axis is not None:
            if not 0 <= norm.axis < len(self.shape) or self.shape[norm.axis] != len(norm.mean):
                raise ValueError(
                    f"normalize: axis {norm.axis} of shape {self.shape} must have {len(norm.mean)} entries"
                )
        return self

    @model_validator(mode="after")
    def _check_stored(self) -> "ModalitySpec":
        if self.stored is not None and self.dtype != "float32":
            raise ValueError(f"stored: {self.stored} storage is for float32 modalities, not {self.dtype}")
        return self

    @property
    def storage_dtype(self) -> str:
        """The element type in the file: ``stored`` where set, else ``dtype``."""
        return self.stored or self.dtype

    @property
    def size(self) -> int:
        size = 1
        for dim in self.shape:
            size *= dim
        return size

    @property
    def nbytes(self) -> int:
        """Bytes of one decoded sample."""
        return self.size * ITEMSIZE[self.dtype]

    @property
    def stored_nbytes(self) -> int:
        """Bytes of one sample in the file's element type (``stored``), before compression."""
        return self.size * STORED_ITEMSIZE[self.storage_dtype]


class ShardFile(_Strict):
    path: str  # relative to the shard directory
    rows: int = Field(ge=0)
    sha256: str


class SplitInfo(_Strict):
    rows: int = Field(ge=0)
    files: list[ShardFile]


class Manifest(_Strict):
    format_version: int = FORMAT_VERSION
    dataset: str
    classes: list[str] = Field(min_length=2)
    modalities: dict[str, ModalitySpec] = Field(min_length=1)
    splits: dict[str, SplitInfo]
    generator: dict[str, Any] = Field(default_factory=dict)
    preprocessing: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> "Manifest":
        if self.format_version != FORMAT_VERSION:
            raise ValueError(
                f"format_version {self.format_version} is not supported (this mmbalance reads {FORMAT_VERSION})"
            )
        reserved = {"sample_id", "label", "split"} & set(self.modalities)
        if reserved:
            raise ValueError(f"modality names {sorted(reserved)} clash with reserved columns sample_id/label/split")
        for split, info in self.splits.items():
            total = sum(f.rows for f in info.files)
            if total != info.rows:
                raise ValueError(f"split {split!r}: rows={info.rows} but its files hold {total}")
        return self

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def dump(self, path: Path) -> None:
        # sort_keys + fixed indent: same content -> same bytes (prepare is byte-reproducible).
        # A modality stored as its dtype gets no ``stored`` key: manifests read before the field
        # existed are written back byte for byte.
        data = self.model_dump(mode="json")
        for spec in data["modalities"].values():
            if spec.get("stored") is None:
                spec.pop("stored", None)
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


class ManifestError(ValueError):
    """``manifest.json`` is not valid JSON or not a valid manifest; the message names the file and
    the line and column, or every bad key."""


def read_manifest(shard_dir: str | Path) -> Manifest:
    """Read ``manifest.json`` from a local directory or a URI (``s3://bucket/shards``)."""
    path = storage.join(shard_dir, MANIFEST_NAME)
    if not storage.exists(path):
        raise FileNotFoundError(f"{path}: no manifest.json; is {shard_dir} a directory written by `mmbalance prepare`?")
    with storage.open_input(path) as handle:
        text = handle.read().decode()
    try:
        tree = json.loads(text)
    except json.JSONDecodeError as err:
        raise ManifestError(f"{path}: not valid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
    try:
        return Manifest.model_validate(tree)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'manifest'}: {e['msg'].removeprefix('Value error, ')}"
            for e in err.errors()
        )
        raise ManifestError(
            f"{path}: invalid manifest ({problems}); rewrite it with `mmbalance prepare` or fix "
            "those keys (docs/data-format.md)"
        ) from None
