"""Kinetics-Sounds (the Kinetics-400 classes whose action is audible; Arandjelovic & Zisserman
2017) in the cvdfoundation/kinetics-dataset download layout:

    ROOT/
      annotations/train.csv             Kinetics CSV: header "label,youtube_id,time_start,time_end,split"
      annotations/val.csv               (or validate.csv) the Kinetics validation set, same columns
      train/<youtube_id>_<time_start:06d>_<time_end:06d>.mp4
      val/<youtube_id>_<time_start:06d>_<time_end:06d>.mp4
      classes.txt                       optional: one Kinetics label per line = the KS class list

Class list: ``classes.txt`` when present, in its line order (the 31/32/34-class variants differ
between papers, so the list is the user's; its sha256 is recorded). Without it, the sorted set of
labels in annotations/train.csv: use this when the annotation files already hold only the KS
subset, as ARM's lists do. Rows whose label is outside the class list are dropped and counted in
the manifest's ``dropped_by_listing``; exact duplicate rows likewise.

Splits: Kinetics' validation set becomes **test** (KS papers report on it); ``val_fraction`` of
each class's train clips becomes val (``seed``), so test is never used for model selection.
Clips missing on disk (YouTube takedowns) are listed, and fail the conversion or are skipped with
``--skip-bad``.

Features: ``audio`` = log |STFT| of the mp4's audio track, mono, 16 kHz, 10 s (shorter clips are
tiled), n_fft 512, hop 512 -> float32 [257, 313], normalised with train statistics; ``visual`` =
``frames`` frames (default 3) sampled uniformly over the clip, Resize 256 -> CenterCrop 224 ->
uint8 [frames, 3, 224, 224], ImageNet normalisation. Sample id = ``<youtube_id>_<start>_<end>``
as in the file name.
"""

from __future__ import annotations

import csv
import difflib
from pathlib import Path
from typing import Any, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

from mmbalance.data.convert.base import Listing, RawSample, carve_split, check_nonempty_splits, require_dir, sha256_file
from mmbalance.data.convert.clips import TenSecondClipAudio, VideoClipConverter
from mmbalance.data.convert.media import ImageParams

COLUMNS = ("label", "youtube_id", "time_start", "time_end")
VAL_NAMES = ("val.csv", "validate.csv")


class KineticsSoundsParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    frames: int = Field(3, ge=1, description="video frames per clip, uniform over the clip (ARM uses 1)")
    image: ImageParams = ImageParams()
    audio: TenSecondClipAudio = TenSecondClipAudio()
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="of each class's train clips")
    seed: int = 0


class KineticsSoundsConverter(VideoClipConverter):
    name = "kinetics_sounds"
    Params = KineticsSoundsParams

    def list_samples(self, root: Path) -> Listing:
        require_dir(root, "the Kinetics folder holding annotations/, train/ and val/")
        require_dir(root / "annotations", "Kinetics' annotations/ folder with train.csv and val.csv")
        train_csv, val_csv = root / "annotations" / "train.csv", _val_csv(root / "annotations")
        if not train_csv.is_file():
            raise FileNotFoundError(f"{train_csv}: missing; the Kinetics train annotations")
        for sub in ("train", "val"):
            require_dir(root / sub, f"Kinetics' {sub}/ folder of <youtube_id>_<start>_<end>.mp4 clips")
        rows = {"train": _read_csv(train_csv), "test": _read_csv(val_csv)}
        train_labels = sorted({row.label for row in rows["train"]})
        classes_txt = root / "classes.txt"
        if classes_txt.is_file():
            classes = _read_classes(classes_txt, train_labels)
            rule = "classes.txt"
            class_list = {
                "source": "classes.txt (its line order)",
                "sha256": sha256_file(classes_txt),
                "count": len(classes),
            }
        else:
            classes = train_labels
            rule = "annotations/train.csv's labels"
            class_list = {"source": "sorted labels of annotations/train.csv (no classes.txt)", "count": len(classes)}
        if len(classes) < 2:
            raise ValueError(f"the class list ({rule}) holds {len(classes)} label(s); need at least 2")
        index = {label: k for k, label in enumerate(classes)}
        listing = Listing(classes=classes, samples=[], provenance={"class_list": class_list})
        seen: dict[str, tuple[str, _Row]] = {}  # sample id -> (split, row)
        samples: list[RawSample] = []
        for split, split_rows in rows.items():
            folder = "train" if split == "train" else "val"
            csv_name = f"annotations/{train_csv.name if split == 'train' else val_csv.name}"
            for row in split_rows:
                if row.label not in index:
                    _count(listing, f"{csv_name} rows whose label is not in {rule}")
                    continue
                if row.sample_id in seen:
                    other_split, other = seen[row.sample_id]
                    if other_split == split and other.label == row.label:
                        _count(listing, f"{csv_name} duplicate rows")
                        continue
                    raise ValueError(
                        f"{row.where}: clip {row.sample_id} is also listed at {other.where} "
                        f"(label {other.label!r}); a clip has one label and one split"
                    )
                seen[row.sample_id] = (split, row)
                samples.append(
                    RawSample(
                        sample_id=row.sample_id,
                        label=index[row.label],
                        split=split,
                        files={"video": str(root / folder / f"{row.sample_id}.mp4")},
                    )
                )
        samples = carve_split(samples, "train", "val", self.params.val_fraction, self.params.seed)
        check_nonempty_splits(samples)
        listing.samples = samples
        listing.split_source = {
            "train": f"annotations/{train_csv.name} minus val",
            "val": f"{self.params.val_fraction} of annotations/{train_csv.name} per class, seed {self.params.seed}",
            "test": f"annotations/{val_csv.name} (the Kinetics validation set)",
            "sha256": {f"annotations/{p.name}": sha256_file(p) for p in (train_csv, val_csv)},
        }
        return listing

    def preprocessing(self) -> dict[str, Any]:
        return {
            "audio": "mp4 audio track (PyAV) -> mono, resample (libswresample) -> fit -> log(|STFT| + eps), "
            "Hann, center",
            "visual": "PyAV decode all frames of the clip -> pick floor((i + 0.5) n / frames) -> "
            "resize shorter side, centre crop",
            "splits": "Kinetics val -> test; val carved from train per class",
        }


class _Row(NamedTuple):
    label: str
    sample_id: str  # <youtube_id>_<start:06d>_<end:06d>, the clip's file stem
    where: str  # "file line N", for error messages


def _count(listing: Listing, reason: str) -> None:
    listing.dropped[reason] = listing.dropped.get(reason, 0) + 1


def _val_csv(annotations: Path) -> Path:
    present = [annotations / name for name in VAL_NAMES if (annotations / name).is_file()]
    if not present:
        raise FileNotFoundError(
            f"{annotations / VAL_NAMES[0]}: missing; the Kinetics validation annotations "
            f"(val.csv or validate.csv), converted as the test split"
        )
    if len(present) > 1:
        raise ValueError(f"{annotations}: both val.csv and validate.csv exist; keep the one to convert")
    return present[0]


def _second(text: str, where: str, column: str) -> int:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value.is_integer() or value < 0:
        raise ValueError(f"{where}: {column} {text!r} is not a whole number of seconds")
    return int(value)


def _read_csv(path: Path) -> list[_Row]:
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        header = [name.strip() for name in reader.fieldnames or []]
        lacking = [c for c in COLUMNS if c not in header]
        if lacking:
            raise ValueError(
                f"{path}: header {header} lacks column(s) {lacking}; expected a Kinetics CSV "
                f"'label,youtube_id,time_start,time_end,split'"
            )
        reader.fieldnames = header
        rows = []
        for record in reader:
            where = f"{path.name} line {reader.line_num}"
            if not any(isinstance(value, str) and value.strip() for value in record.values()):
                continue  # blank line
            values = {c: (record.get(c) or "").strip() for c in COLUMNS}
            if not values["label"] or not values["youtube_id"]:
                raise ValueError(f"{where}: empty label or youtube_id")
            start = _second(values["time_start"], where, "time_start")
            end = _second(values["time_end"], where, "time_end")
            rows.append(_Row(values["label"], f"{values['youtube_id']}_{start:06d}_{end:06d}", where))
    return rows


def _read_classes(path: Path, train_labels: list[str]) -> list[str]:
    classes, where = [], {}
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        label = line.strip()
        if not label:
            continue
        if label in where:
            raise ValueError(f"{path.name} line {number}: {label!r} is already listed at line {where[label]}")
        where[label] = number
        classes.append(label)
    absent = [label for label in classes if label not in train_labels]
    if absent:
        hints = "; ".join(
            f"{label!r} (close: {difflib.get_close_matches(label, train_labels, n=2)})" for label in absent[:10]
        )
        raise ValueError(
            f"{path}: {len(absent)} label(s) have no row in annotations/train.csv: {hints}. "
            f"Spell them as the Kinetics CSV does."
        )
    return classes
