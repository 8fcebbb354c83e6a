"""MVSA-Single (image+text sentiment, 3 classes) in either of its two distributed layouts.

jsonl (the split MNL/QMF ship; 1555 / 518 / 519 lines)::

    ROOT/
      train.jsonl, dev.jsonl, test.jsonl   one JSON object per line: "text", "img" (image path
                                           relative to ROOT, e.g. "data/1234.jpg"), "label"
                                           (positive / neutral / negative), optional "id"
      data/1234.jpg ...

dev.jsonl becomes the val split. The sample id is the ``id`` field, or else the image file stem.

original (the MVSA release)::

    ROOT/
      labelResultAll.txt     header "ID<TAB>text,image", rows "1<TAB>positive,negative"
      data/1.jpg, data/1.txt ...

The text and image annotations are merged by the standard MVSA-Single cleaning: equal -> that
label; exactly one neutral -> the other one; positive vs negative -> the sample is dropped
(counted in the manifest's ``dropped_by_listing``). This layout has no official split:
``test_fraction`` then ``val_fraction`` of each class (fractions of all its samples, default
8:1:1) are drawn with ``seed``. Text files are decoded as UTF-8 (a BOM is dropped); a file that
is not valid UTF-8 (the release mixes in Windows-1252 bytes) is decoded as Windows-1252 with
undefined bytes replaced by U+FFFD. Whitespace runs become single spaces. The rule is per file
and deterministic.

``layout: auto`` picks jsonl when any of the jsonl files exists, else the original layout; the
one used is recorded in ``split_source.layout``. Classes are in the fixed order
negative, neutral, positive.

Features: ``image`` uint8 ``[3, crop, crop]`` (Resize 256 -> CenterCrop 224 by default, as MNL;
ImageNet mean/std applied by the model), ``text`` int64 token ids ``[max_length]`` (``text.py``).
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import Field, model_validator

from mmbalance.data.convert.base import (
    BadInput,
    Listing,
    RawSample,
    carve_split,
    check_nonempty_splits,
    require_dir,
    require_file,
)
from mmbalance.data.convert.text import ImageTextConverter, ImageTextParams, image_text_preprocessing

CLASSES = ["negative", "neutral", "positive"]
SPLIT_FILES = {"train": "train.jsonl", "val": "dev.jsonl", "test": "test.jsonl"}
LABEL_FILE = "labelResultAll.txt"
CONFLICT = "text/image positive-negative conflict"


class MvsaParams(ImageTextParams):
    layout: Literal["auto", "jsonl", "original"] = "auto"
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="original layout only: of each class's samples")
    test_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="original layout only: of each class's samples")
    seed: int = 0

    @model_validator(mode="after")
    def _fractions_fit(self) -> "MvsaParams":
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(
                f"val_fraction + test_fraction must be < 1, got {self.val_fraction} + {self.test_fraction}"
            )
        return self


def merge_labels(text_label: str, image_label: str) -> str | None:
    """The MVSA-Single cleaning rule; ``None``: a positive/negative conflict (drop the sample)."""
    if text_label == image_label:
        return text_label
    if "neutral" in (text_label, image_label):
        return image_label if text_label == "neutral" else text_label
    return None


def read_mvsa_text(path: str | Path) -> str:
    """UTF-8 (BOM dropped), else Windows-1252 with undefined bytes replaced; whitespace collapsed."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise BadInput(f"{path}: unreadable text file ({err})") from err
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = data.decode("cp1252", errors="replace")
    return " ".join(text.split())


class MvsaSingleConverter(ImageTextConverter):
    name = "mvsa_single"
    Params = MvsaParams

    def list_samples(self, root: Path) -> Listing:
        self.text.prepare()  # a bad tokenizer fails here, before any decoding
        require_dir(root, "the MVSA-Single folder holding train/dev/test.jsonl or labelResultAll.txt and data/")
        listing = Listing(classes=list(CLASSES), samples=[])
        if self._layout(root) == "jsonl":
            samples = _jsonl_samples(root)
            listing.split_source = {"layout": "jsonl", **{split: name for split, name in SPLIT_FILES.items()}}
        else:
            samples, conflicts = _original_samples(root)
            listing.dropped = {CONFLICT: conflicts}
            p = self.params
            samples = carve_split(samples, "train", "test", p.test_fraction, p.seed)
            samples = carve_split(samples, "train", "val", p.val_fraction / (1.0 - p.test_fraction), p.seed)
            listing.split_source = {
                "layout": "original",
                "labels": f"{LABEL_FILE}: text == image -> it; one neutral -> the other; "
                "positive vs negative -> dropped",
                "test": f"{p.test_fraction} of each class, seed {p.seed}",
                "val": f"{p.val_fraction} of each class (of all its samples), seed {p.seed}",
            }
        check_nonempty_splits(samples)
        listing.samples = samples
        return listing

    def _layout(self, root: Path) -> str:
        layout = self.params.layout
        if layout == "auto":
            if any((root / name).is_file() for name in SPLIT_FILES.values()):
                layout = "jsonl"
            elif (root / LABEL_FILE).is_file():
                layout = "original"
            else:
                raise FileNotFoundError(
                    f"{root}: neither {', '.join(SPLIT_FILES.values())} (jsonl layout) nor "
                    f"{LABEL_FILE} (original layout) found"
                )
        if layout == "jsonl":
            for name in SPLIT_FILES.values():
                require_file(root / name, "the jsonl layout needs train.jsonl, dev.jsonl and test.jsonl")
        else:
            require_file(root / LABEL_FILE, "the original layout needs it next to data/")
            require_dir(root / "data", "MVSA-Single's data/ folder of <id>.jpg and <id>.txt")
        return layout

    def sample_text(self, sample: RawSample) -> str:
        return sample.text if sample.text is not None else read_mvsa_text(sample.files["text"])

    def preprocessing(self) -> dict[str, Any]:
        return {
            **image_text_preprocessing(self.text),
            "text_file_decoding": "original layout: UTF-8 (BOM dropped), else cp1252 with errors='replace'; "
            "whitespace collapsed",
            "class_order": "negative, neutral, positive",
        }


def _jsonl_samples(root: Path) -> list[RawSample]:
    samples, seen = [], {}
    for split, name in SPLIT_FILES.items():
        path = root / name
        with open(path, "rb") as handle:
            for line_no, raw in enumerate(handle, start=1):
                if not raw.strip():
                    continue
                where = f"{path} line {line_no}"
                try:
                    row = json.loads(raw.decode("utf-8-sig" if line_no == 1 else "utf-8"))
                except UnicodeDecodeError as err:
                    raise ValueError(f"{where}: not UTF-8 ({err.reason} at byte {err.start})") from None
                except json.JSONDecodeError as err:
                    raise ValueError(f"{where}: not valid JSON ({err.msg})") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{where}: expected a JSON object")
                absent = [key for key in ("text", "img", "label") if key not in row]
                if absent:
                    raise ValueError(f"{where}: missing field(s) {absent}")
                label = str(row["label"]).strip().lower()
                if label not in CLASSES:
                    raise ValueError(f"{where}: unknown label {row['label']!r} (expected one of {CLASSES})")
                if not isinstance(row["text"], str) or not isinstance(row["img"], str):
                    raise ValueError(f"{where}: 'text' and 'img' must be strings")
                sample_id = str(row["id"]) if row.get("id") is not None else PurePosixPath(row["img"]).stem
                if sample_id in seen:
                    raise ValueError(f"{where}: sample id {sample_id!r} already used at {seen[sample_id]}")
                seen[sample_id] = where
                samples.append(
                    RawSample(
                        sample_id=sample_id,
                        label=CLASSES.index(label),
                        split=split,
                        files={"image": str(root / row["img"])},
                        text=row["text"],
                    )
                )
    return samples


def _original_samples(root: Path) -> tuple[list[RawSample], int]:
    path = root / LABEL_FILE
    samples, seen, conflicts = [], {}, 0
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line_no, line in enumerate(handle, start=1):
            fields = line.split()
            if not fields or (line_no == 1 and fields[0].lower() == "id"):
                continue  # blank line, or the header "ID<TAB>text,image"
            where = f"{path} line {line_no}"
            if len(fields) != 2:
                multi = " (several annotations per row: MVSA-Multiple is not supported)" if len(fields) > 2 else ""
                raise ValueError(f"{where}: expected 'ID<TAB>text_label,image_label', got {line.strip()!r}{multi}")
            sample_id, pair = fields
            labels = [part.strip().lower() for part in pair.split(",")]
            if len(labels) != 2 or any(label not in CLASSES for label in labels):
                raise ValueError(f"{where}: expected two labels among {CLASSES} as 'text,image', got {pair!r}")
            if sample_id in seen:
                raise ValueError(f"{where}: ID {sample_id!r} already listed on line {seen[sample_id]}")
            seen[sample_id] = line_no
            label = merge_labels(*labels)
            if label is None:
                conflicts += 1
                continue
            samples.append(
                RawSample(
                    sample_id=sample_id,
                    label=CLASSES.index(label),
                    split="train",
                    files={
                        "image": str(root / "data" / f"{sample_id}.jpg"),
                        "text": str(root / "data" / f"{sample_id}.txt"),
                    },
                )
            )
    return samples, conflicts
