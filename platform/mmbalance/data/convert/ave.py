"""AVE (Audio-Visual Event dataset, Tian et al. ECCV 2018: 28 event categories, 4143 ten-second
YouTube clips) as distributed in AVE_Dataset.zip:

    ROOT/
      AVE/<VideoID>.mp4                      the clips, video + audio track
      Annotations.txt                        "Category&VideoID&Quality&StartTime&EndTime" header, then
                                             one row per clip, e.g. "Church bell&RUhOCu3LNXM&good&0&10"
      trainSet.txt, valSet.txt, testSet.txt  the official split: rows in the same '&'-separated format
                                             (a header line is optional)

Classes are the sorted unique ``Category`` values of Annotations.txt (Python string order).
The three set files are followed exactly (train/val/test); a clip of Annotations.txt that no set
file names is left out and counted in the manifest's ``dropped_by_listing``. A set-file row
naming a VideoID that Annotations.txt lacks, a category outside it, or a category that disagrees
with Annotations.txt is an error naming the line, and so is a VideoID listed in two set files
(a VideoID repeated with the same category within one set file is counted, not an error).

Features: ``audio`` = log |STFT| of the mp4's audio track, mono, resampled to 16 kHz, the whole
10 s clip (tiled if shorter), n_fft 512, hop 512 -> float32 [257, 313], normalised with train
statistics; ``visual`` = ``frames`` frames (default 3) sampled uniformly over the whole clip (not
only the annotated event segment StartTime-EndTime, as most imbalance papers' AVE loaders do),
Resize 256 -> CenterCrop 224 -> uint8 [frames, 3, 224, 224], ImageNet normalisation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from mmbalance.data.convert.base import (
    Listing,
    RawSample,
    check_nonempty_splits,
    require_dir,
    require_file,
    sha256_file,
)
from mmbalance.data.convert.clips import TenSecondClipAudio, VideoClipConverter
from mmbalance.data.convert.media import ImageParams

ANNOTATIONS = "Annotations.txt"
SET_FILES = {"train": "trainSet.txt", "val": "valSet.txt", "test": "testSet.txt"}
HEADER = ("category", "videoid", "quality", "starttime", "endtime")


class AveParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    frames: int = Field(3, ge=1, description="video frames per clip, uniform over the whole 10 s clip")
    image: ImageParams = ImageParams()
    audio: TenSecondClipAudio = TenSecondClipAudio()


class AveConverter(VideoClipConverter):
    name = "ave"
    Params = AveParams

    def list_samples(self, root: Path) -> Listing:
        require_dir(root, "the unzipped AVE_Dataset folder holding AVE/ and Annotations.txt")
        require_dir(root / "AVE", "AVE's AVE/ folder of <VideoID>.mp4 clips")
        for name in (ANNOTATIONS, *SET_FILES.values()):
            require_file(root / name, "AVE_Dataset.zip ships it next to the AVE/ folder")
        categories = _read_annotations(root / ANNOTATIONS)
        classes = sorted(set(categories.values()))
        samples: list[RawSample] = []
        listed_at: dict[str, tuple[str, str, str]] = {}  # VideoID -> (split, category, "file line N") of its first row
        repeats: dict[str, int] = {}
        for split, name in SET_FILES.items():
            for where, (category, video_id) in _read_rows(root / name):
                if video_id in listed_at:
                    first_split, first_category, first_where = listed_at[video_id]
                    if (first_split, first_category) == (split, category):
                        repeats[name] = repeats.get(name, 0) + 1  # the same row again: harmless, counted
                        continue
                    raise ValueError(
                        f"{where}: VideoID {video_id!r} is already listed at {first_where}; "
                        f"a clip has one category and belongs to exactly one split"
                    )
                if video_id not in categories:
                    raise ValueError(f"{where}: VideoID {video_id!r} is not in {ANNOTATIONS}")
                if category not in classes:
                    raise ValueError(
                        f"{where}: category {category!r} is not one of the {len(classes)} categories of {ANNOTATIONS}"
                    )
                if category != categories[video_id]:
                    raise ValueError(
                        f"{where}: category {category!r} disagrees with {ANNOTATIONS}, "
                        f"which gives {categories[video_id]!r} for {video_id!r}"
                    )
                listed_at[video_id] = (split, category, where)
                samples.append(
                    RawSample(
                        sample_id=video_id,
                        label=classes.index(category),
                        split=split,
                        files={"video": str(root / "AVE" / f"{video_id}.mp4")},
                    )
                )
        check_nonempty_splits(samples)
        unlisted = len(set(categories) - set(listed_at))
        listing = Listing(
            classes=classes,
            samples=samples,
            split_source={
                **SET_FILES,
                "sha256": {name: sha256_file(root / name) for name in (ANNOTATIONS, *SET_FILES.values())},
            },
        )
        if unlisted:
            listing.dropped[f"clips of {ANNOTATIONS} in no set file"] = unlisted
        for name, count in repeats.items():
            listing.dropped[f"repeated rows of {name}"] = count
        return listing

    def preprocessing(self) -> dict[str, Any]:
        return {
            "audio": "mp4 audio track (PyAV) -> mono, resample (libswresample) -> fit -> log(|STFT| + eps), "
            "Hann, center",
            "visual": "PyAV decode all frames of the whole clip (not only the event segment) -> "
            "pick floor((i + 0.5) n / frames) -> resize shorter side, centre crop",
            "class_order": f"sorted unique Category of {ANNOTATIONS} (Python string order)",
            "splits": "trainSet.txt / valSet.txt / testSet.txt followed exactly",
        }


def _read_rows(path: Path) -> list[tuple[str, tuple[str, str]]]:
    """Rows of an AVE index file -> [("file line N", (category, video_id))]; a header is skipped.

    ``Category&VideoID&Quality&StartTime&EndTime``: split from the right, so a category holding
    '&' would still parse (the official ones hold commas, e.g. "Race car, auto racing")."""
    rows = []
    text = path.read_text(encoding="utf-8-sig")
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = [f.strip() for f in line.rsplit("&", 4)]
        where = f"{path.name} line {number}"
        if tuple(f.lower() for f in fields) == HEADER:
            continue
        if len(fields) != 5 or not fields[0] or not fields[1]:
            raise ValueError(f"{where}: {line!r} is not 'Category&VideoID&Quality&StartTime&EndTime'")
        try:
            float(fields[3]), float(fields[4])  # unused (frames span the whole clip), but a misparse shows here
        except ValueError:
            raise ValueError(f"{where}: StartTime/EndTime {fields[3]!r}/{fields[4]!r} are not numbers") from None
        rows.append((where, (fields[0], fields[1])))
    return rows


def _read_annotations(path: Path) -> dict[str, str]:
    """VideoID -> Category. A repeated VideoID must repeat its category."""
    categories: dict[str, str] = {}
    first: dict[str, str] = {}
    for where, (category, video_id) in _read_rows(path):
        if video_id in categories and categories[video_id] != category:
            raise ValueError(
                f"{where}: VideoID {video_id!r} has category {category!r} but "
                f"{categories[video_id]!r} at {first[video_id]}"
            )
        categories.setdefault(video_id, category)
        first.setdefault(video_id, where)
    if len(set(categories.values())) < 2:
        raise ValueError(f"{path}: holds {len(set(categories.values()))} categories; AVE needs at least 2")
    return categories
