"""AVE converter on a tiny fixture tree in the AVE_Dataset.zip layout (real MPEG-4 + AAC clips)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from helpers.convert import read_back, shard_digest, train_one_epoch
from helpers.media import corrupt, write_video
from mmbalance.data.convert import build_converter
from mmbalance.data.convert.base import missing_files
from mmbalance.data.convert.pipeline import ConversionError, convert
from mmbalance.data.manifest import read_manifest
from mmbalance.data.shards import load_split

SMALL = {"image": {"resize": 36, "crop": 32}, "audio": {"clip_seconds": 0.5}, "frames": 2}
# Official categories hold commas; sorted order differs from the order the fixture writes them in.
CATEGORIES = ("Race car, auto racing", "Church bell", "Dog")
PER_SPLIT = {"train": 3, "val": 1, "test": 1}
SET_FILES = {"train": "trainSet.txt", "val": "valSet.txt", "test": "testSet.txt"}
HEADER = "Category&VideoID&Quality&StartTime&EndTime\n"
QUIET = {"engine": "local", "progress": lambda _: None}


def row(category: str, video_id: str) -> str:
    return f"{category}&{video_id}&good&2&7\n"


def make_tree(root: Path, videos: bool = True) -> dict[str, dict[str, str]]:
    """Returns split -> {VideoID: category}. Also writes one annotated clip that no set file names."""
    splits: dict[str, dict[str, str]] = {split: {} for split in PER_SPLIT}
    k = 0
    for category in CATEGORIES:
        for split, count in PER_SPLIT.items():
            for _ in range(count):
                video_id = f"-x{k:02d}_Yt{k * 7 % 10}Q"  # YouTube-like: '-' and '_' included
                if videos:
                    write_video(
                        root / "AVE" / f"{video_id}.mp4", frames=4, value=11 * k, audio_seconds=0.5, freq=200 + 60 * k
                    )
                splits[split][video_id] = category
                k += 1
    (root / "AVE").mkdir(parents=True, exist_ok=True)
    everything = [(c, v) for split in splits.values() for v, c in split.items()] + [("Dog", "unlistedClip")]
    (root / "Annotations.txt").write_text(
        HEADER + "".join(row(c, v) for c, v in sorted(everything, key=lambda r: r[1]))
    )
    for split, name in SET_FILES.items():
        header = "" if split == "train" else HEADER  # the header line is optional
        (root / name).write_text(header + "".join(row(c, v) for v, c in splits[split].items()))
    return splits


def converter(**settings):
    return build_converter("ave", {**SMALL, **settings})


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> tuple[Path, dict[str, dict[str, str]]]:
    root = tmp_path_factory.mktemp("ave") / "AVE_Dataset"
    return root, make_tree(root)


def test_defaults_are_the_whole_ten_second_clip_and_three_frames():
    outputs = build_converter("ave").outputs()
    assert outputs["audio"].spec.shape == [257, 1 + 160000 // 512] == [257, 313]
    assert outputs["visual"].spec.shape == [3, 3, 224, 224]
    # One changed audio field keeps AVE's other defaults.
    assert build_converter("ave", {"audio": {"clip_seconds": 5}}).params.audio.hop_length == 512


def test_round_trip_follows_the_set_files_and_rerun_is_byte_identical(tree, tmp_path):
    root, splits = tree
    convert(converter(), root, tmp_path / "a", chunk_size=4, **QUIET)
    manifest, labels = read_back(tmp_path / "a")
    assert manifest.classes == sorted(CATEGORIES)
    for split, clips in splits.items():  # every clip once, in its set file's split, with its label
        assert labels[split] == {v: manifest.classes.index(c) for v, c in clips.items()}
    assert manifest.modalities["audio"].shape == [257, 1 + 8000 // 512]
    assert manifest.modalities["visual"].shape == [2, 3, 32, 32]
    assert manifest.modalities["audio"].normalize.source == "train split"
    assert manifest.modalities["visual"].normalize.axis == 1
    pre = manifest.preprocessing
    assert pre["split_source"]["test"] == "testSet.txt" and set(pre["split_source"]["sha256"]) == {
        "Annotations.txt",
        "trainSet.txt",
        "valSet.txt",
        "testSet.txt",
    }
    assert pre["dropped_by_listing"] == {"clips of Annotations.txt in no set file": 1}
    assert "whole clip" in pre["visual"] and pre["skipped_bad"]["count"] == 0
    # Frame i of a fixture clip is a flat grey value + 20 i: 2 of 4 frames -> frames 1 and 3, 40 apart.
    visual = load_split(tmp_path / "a", manifest, "train").modalities["visual"]
    centre = visual[:, :, 0, 16, 16].astype(int)
    assert np.all(np.abs((centre[:, 1] - centre[:, 0]) % 256 - 40) <= 4)
    convert(converter(), root, tmp_path / "b", chunk_size=100, **QUIET)
    assert shard_digest(tmp_path / "a") == shard_digest(tmp_path / "b")


def test_missing_and_corrupt_clips_are_listed_then_skipped_on_request(tmp_path):
    root = tmp_path / "raw"
    splits = make_tree(root)
    gone, broken = sorted(splits["train"])[0], sorted(splits["test"])[0]
    (root / "AVE" / f"{gone}.mp4").unlink()
    corrupt(root / "AVE" / f"{broken}.mp4", keep=200)
    with pytest.raises(ConversionError, match=rf"1 raw file\(s\) are missing:\n.*{gone}\.mp4"):
        convert(converter(), root, tmp_path / "out", **QUIET)
    write_video(root / "AVE" / f"{gone}.mp4", frames=4, audio_seconds=0.5)
    with pytest.raises(ConversionError, match=rf"1 raw file\(s\) could not be decoded:\n.*{broken}\.mp4"):
        convert(converter(), root, tmp_path / "out", **QUIET)
    assert not (tmp_path / "out").exists()
    (root / "AVE" / f"{gone}.mp4").unlink()
    manifest = convert(converter(), root, tmp_path / "out", skip_bad=True, **QUIET)
    assert manifest.preprocessing["skipped_bad"] | {"files": None} == {
        "count": 2,
        "missing": 1,
        "corrupt": 1,
        "files": None,
    }
    _, labels = read_back(tmp_path / "out")
    assert gone not in labels["train"] and broken not in labels["test"]
    assert sum(len(v) for v in labels.values()) == 15 - 2


@pytest.mark.parametrize(
    "name, text, error",
    [
        (
            "valSet.txt",
            HEADER + row("Dog", "notAnnotated"),
            r"valSet.txt line 2: VideoID 'notAnnotated' is not in Annotations.txt",
        ),
        ("testSet.txt", row("Cat", "-x04_Yt8Q"), r"testSet.txt line 1: category 'Cat' is not one of the 3 categories"),
        ("testSet.txt", row("Dog", "-x04_Yt8Q"), r"testSet.txt line 1: category 'Dog' disagrees with Annotations.txt"),
        (
            "valSet.txt",
            row("Race car, auto racing", "-x00_Yt0Q"),
            r"valSet.txt line 1: VideoID '-x00_Yt0Q' is already listed at trainSet.txt line 1",
        ),
        (
            "trainSet.txt",
            row("Race car, auto racing", "-x00_Yt0Q") + row("Dog", "-x00_Yt0Q"),
            r"trainSet.txt line 2: VideoID '-x00_Yt0Q' is already listed at trainSet.txt line 1",
        ),
        (
            "trainSet.txt",
            "Dog&-x00_Yt0Q&good&0\n",
            r"trainSet.txt line 1: .* is not 'Category&VideoID&Quality&StartTime&EndTime'",
        ),
        (
            "trainSet.txt",
            "Dog&-x00_Yt0Q&good&zero&10\n",
            r"trainSet.txt line 1: StartTime/EndTime 'zero'/'10' are not numbers",
        ),
    ],
)
def test_malformed_index_files_fail_naming_the_line(tmp_path, name, text, error):
    root = tmp_path / "raw"
    make_tree(root, videos=False)
    (root / name).write_text(text)
    with pytest.raises(ValueError, match=error):
        converter().list_samples(root)


def test_missing_layout_parts_and_bad_settings_fail_clearly(tmp_path):
    root = tmp_path / "raw"
    make_tree(root, videos=False)
    with open(root / "trainSet.txt", "a") as handle:
        handle.write("\n" + row("Dog", "-x10_Yt0Q"))  # a blank line, and a Dog train clip listed again
    listing = converter().list_samples(root)  # videos absent: recorded, not raised, at listing time
    assert sum(map(len, missing_files(listing.samples).values())) == 15 and len(listing.samples) == 15
    assert listing.dropped == {"clips of Annotations.txt in no set file": 1, "repeated rows of trainSet.txt": 1}
    (root / "valSet.txt").unlink()
    with pytest.raises(FileNotFoundError, match="valSet.txt: missing"):
        converter().list_samples(root)
    with pytest.raises(FileNotFoundError, match="AVE/"):
        converter().list_samples(tmp_path)
    with pytest.raises(ValueError, match="ave settings: frame: unknown setting"):
        build_converter("ave", {"frame": 2})


def test_converted_fixture_trains_one_epoch(tree, tmp_path):
    root, _ = tree
    convert(converter(), root, tmp_path / "shards", **QUIET)
    cnn = {"encoder": "cnn", "params": {"channels": [4], "out_dim": 8}}
    res = {"encoder": "resnet18", "params": {}}
    result = train_one_epoch(tmp_path / "shards", {"audio": cnn, "visual": res}, tmp_path)
    assert 0.0 <= result["test"]["acc"] <= 1.0
    assert set(result["test"]["acc_per_modality"]) == {"audio", "visual"}
    assert read_manifest(tmp_path / "shards").num_classes == 3
