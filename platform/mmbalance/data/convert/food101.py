"""UPMC Food-101 (image+text recipes, 101 classes) as distributed::

    ROOT/
      images/train/<class_name>/<file>.jpg
      images/test/<class_name>/<file>.jpg
      texts/train_titles.csv, texts/test_titles.csv    rows "<file>.jpg,<text>,<class_name>", no header

Classes are the sorted folder names under ``images/train`` (101 in the full set). The csv files
are read with the ``csv`` module (quoted texts may hold commas; an unquoted comma inside the text
is kept: the first field is the file, the last the class, the rest the text), as UTF-8 with
invalid bytes replaced. A row's image is ``images/<split>/<class_name>/<file>``; a row naming an
unknown class, or a file that lies in another class's folder, is an error (the csv and the tree
disagree). An exact duplicate row is counted in ``dropped_by_listing`` and kept once; two rows for
one file with different text or class are an error.

Splits: test = test_titles.csv; val = ``val_fraction`` (default 0.1) of each class's
train_titles.csv rows, drawn with ``seed`` (MMBT/QMF hold out 5000 of ~65k train rows, about
0.077); train = the rest. The sample id is ``<csv split>/<file stem>`` (``train/apple_pie_12``,
``test/apple_pie_7``): unique across splits, and unchanged by ``val_fraction``.

Features: ``image`` uint8 ``[3, crop, crop]`` (Resize 256 -> CenterCrop 224 by default; ImageNet
mean/std applied by the model), ``text`` int64 token ids ``[max_length]`` (``text.py``).
"""

from __future__ import annotations

import csv
import os
from collections import defaultdict
from pathlib import Path, PurePosixPath
from typing import Any

from pydantic import Field

from mmbalance.data.convert.base import (
    Listing,
    RawSample,
    carve_split,
    check_nonempty_splits,
    require_dir,
    require_file,
)
from mmbalance.data.convert.text import ImageTextConverter, ImageTextParams, image_text_preprocessing

CSV_FILES = {"train": "train_titles.csv", "test": "test_titles.csv"}
DUPLICATE = "duplicate csv row"


class Food101Params(ImageTextParams):
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="of each class's train_titles.csv rows")
    seed: int = 0


class Food101Converter(ImageTextConverter):
    name = "food101"
    Params = Food101Params

    def list_samples(self, root: Path) -> Listing:
        self.text.prepare()  # a bad tokenizer fails here, before any decoding
        require_dir(root, "the UPMC Food-101 folder holding images/ and texts/")
        for split in CSV_FILES:
            require_dir(root / "images" / split, f"UPMC Food-101's images/{split}/<class_name>/ folders")
        for name in CSV_FILES.values():
            require_file(root / "texts" / name, "UPMC Food-101's texts/ holds train_titles.csv and test_titles.csv")
        classes = sorted(entry.name for entry in os.scandir(root / "images" / "train") if entry.is_dir())
        if len(classes) < 2:
            raise ValueError(f"{root / 'images' / 'train'}: expected one folder per class, found {classes}")
        samples, duplicates = [], 0
        for split, name in CSV_FILES.items():
            rows, dupes = _split_samples(root, split, root / "texts" / name, classes)
            samples += rows
            duplicates += dupes
        p = self.params
        samples = carve_split(samples, "train", "val", p.val_fraction, p.seed)
        check_nonempty_splits(samples)
        listing = Listing(
            classes=classes,
            samples=samples,
            dropped={DUPLICATE: duplicates},
            split_source={
                "train": "texts/train_titles.csv minus val",
                "val": f"{p.val_fraction} of each class's train_titles.csv rows, seed {p.seed}",
                "test": "texts/test_titles.csv",
            },
        )
        return listing

    def preprocessing(self) -> dict[str, Any]:
        return {
            **image_text_preprocessing(self.text),
            "text_source": "texts/<split>_titles.csv, UTF-8 with errors='replace', stripped",
            "class_order": "sorted folder names of images/train",
        }


def _image_index(images: Path) -> dict[str, list[str]]:
    """File name -> the class folders of ``images`` that hold it."""
    index: dict[str, list[str]] = defaultdict(list)
    for folder in sorted(entry.name for entry in os.scandir(images) if entry.is_dir()):
        for entry in os.scandir(images / folder):
            index[entry.name].append(folder)
    return index


def _split_samples(root: Path, split: str, path: Path, classes: list[str]) -> tuple[list[RawSample], int]:
    images = root / "images" / split
    index = _image_index(images)
    known = set(classes)
    samples: dict[str, RawSample] = {}
    first_line: dict[str, int] = {}
    duplicates = 0
    with open(path, newline="", encoding="utf-8", errors="replace") as handle:
        for line_no, row in enumerate(csv.reader(handle), start=1):
            if not row or not any(field.strip() for field in row):
                continue
            where = f"{path} line {line_no}"
            if len(row) < 3:
                raise ValueError(f"{where}: expected '<file>.jpg,<text>,<class_name>', got {row!r}")
            file_field, class_name = row[0].strip(), row[-1].strip()
            text = ",".join(row[1:-1]).strip()
            if class_name not in known:
                raise ValueError(f"{where}: unknown class {class_name!r} (not a folder of {root / 'images' / 'train'})")
            parts = PurePosixPath(file_field).parts
            if not parts:
                raise ValueError(f"{where}: empty file name")
            file_name = parts[-1]
            if len(parts) > 1 and parts[-2] != class_name:
                raise ValueError(f"{where}: class {class_name!r} but the file is given as {file_field!r}")
            folders = index.get(file_name, [])
            if folders and class_name not in folders:
                raise ValueError(
                    f"{where}: class {class_name!r} but {file_name} lies in "
                    f"{images / folders[0]}; the csv and the image folders disagree"
                )
            sample = RawSample(
                sample_id=f"{split}/{PurePosixPath(file_name).stem}",
                label=classes.index(class_name),
                split=split,
                files={"image": str(images / class_name / file_name)},
                text=text,
            )
            previous = samples.get(sample.sample_id)
            if previous is not None:
                if previous == sample:
                    duplicates += 1
                    continue
                raise ValueError(
                    f"{where}: {file_field} already listed on line {first_line[sample.sample_id]} "
                    f"with another text, class or extension"
                )
            samples[sample.sample_id] = sample
            first_line[sample.sample_id] = line_no
    return list(samples.values()), duplicates
