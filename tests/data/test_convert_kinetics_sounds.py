"""Kinetics-Sounds converter on a tiny fixture tree in the cvdfoundation/kinetics-dataset layout
(real MPEG-4 + AAC clips)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from helpers.convert import read_back, shard_digest, train_one_epoch
from helpers.media import corrupt, write_video
from mmbalance.data.convert import build_converter
from mmbalance.data.convert.base import missing_files
from mmbalance.data.convert.pipeline import ConversionError, convert
from mmbalance.data.shards import load_split

SMALL = {"image": {"resize": 36, "crop": 32}, "audio": {"clip_seconds": 0.5}, "frames": 2, "val_fraction": 0.2}
# classes.txt order on purpose differs from sorted order; "reading book" is a Kinetics class outside KS.
KS = ("playing bagpipes", "chopping wood", "playing accordion")
OTHER = "reading book"
PER_CLASS = {"train": 5, "val": 2}  # Kinetics train / val CSVs
HEADER = "label,youtube_id,time_start,time_end,split\n"
QUIET = {"engine": "local", "progress": lambda _: None}
TRAIN_DROPS = "annotations/train.csv rows whose label is not in classes.txt"


def make_tree(root: Path, videos: bool = True, classes_txt: bool = True) -> dict[str, dict[str, str]]:
    """Returns Kinetics split ("train" | "val") -> {clip id: label} for the KS rows. Rows of
    ``OTHER`` have no file on disk (a user downloads only what the class list needs); train.csv
    repeats one row verbatim."""
    clips: dict[str, dict[str, str]] = {"train": {}, "val": {}}
    lines: dict[str, list[str]] = {"train": [], "val": []}
    k = 0
    for label in (*KS, OTHER):
        for split, count in PER_CLASS.items():
            for _ in range(count if label != OTHER else 1):
                youtube_id, start = f"-k{k:02d}_Yt{k % 7}Z", 3 * k
                clip = f"{youtube_id}_{start:06d}_{start + 10:06d}"
                lines[split].append(f"{label},{youtube_id},{start},{start + 10},{split}\n")
                if label != OTHER:
                    clips[split][clip] = label
                    if videos:
                        write_video(
                            root / split / f"{clip}.mp4", frames=4, value=11 * k, audio_seconds=0.5, freq=200 + 50 * k
                        )
                k += 1
    lines["train"].append(lines["train"][0])  # an exact duplicate row
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        (root / split).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"{split}.csv").write_text(HEADER + "".join(lines[split]))
    if classes_txt:
        (root / "classes.txt").write_text("\n".join(KS) + "\n\n")
    return clips


def converter(**settings):
    return build_converter("kinetics_sounds", {**SMALL, **settings})


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> tuple[Path, dict[str, dict[str, str]]]:
    root = tmp_path_factory.mktemp("ks") / "k400"
    return root, make_tree(root)


def test_defaults_are_the_whole_ten_second_clip_and_three_frames():
    outputs = build_converter("kinetics_sounds").outputs()
    assert outputs["audio"].spec.shape == [257, 1 + 160000 // 512] == [257, 313]
    assert outputs["visual"].spec.shape == [3, 3, 224, 224]
    assert build_converter("kinetics_sounds", {"audio": {"clip_seconds": 5}}).params.audio.sample_rate == 16000


def test_round_trip_classes_txt_filters_val_is_carved_and_kinetics_val_is_test(tree, tmp_path):
    root, clips = tree
    convert(converter(), root, tmp_path / "a", chunk_size=4, **QUIET)
    manifest, labels = read_back(tmp_path / "a")
    assert manifest.classes == list(KS)  # classes.txt's line order
    index = {label: k for k, label in enumerate(KS)}
    assert labels["test"] == {c: index[label] for c, label in clips["val"].items()}  # Kinetics val -> test
    carved = labels["train"] | labels["val"]
    assert len(carved) == len(labels["train"]) + len(labels["val"])  # every train clip once
    assert carved == {c: index[label] for c, label in clips["train"].items()}
    assert sorted(labels["val"].values()) == [0, 1, 2]  # round(0.2 * 5) = 1 per class
    pre = manifest.preprocessing
    assert pre["dropped_by_listing"] == {
        TRAIN_DROPS: 1,
        "annotations/val.csv rows whose label is not in classes.txt": 1,
        "annotations/train.csv duplicate rows": 1,
    }
    assert pre["provenance"]["class_list"]["sha256"] == hashlib.sha256((root / "classes.txt").read_bytes()).hexdigest()
    assert pre["split_source"]["test"] == "annotations/val.csv (the Kinetics validation set)"
    assert pre["split_source"]["val"] == "0.2 of annotations/train.csv per class, seed 0"
    assert pre["skipped_bad"]["count"] == 0
    assert manifest.modalities["audio"].shape == [257, 1 + 8000 // 512]
    assert manifest.modalities["visual"].shape == [2, 3, 32, 32]
    visual = load_split(tmp_path / "a", manifest, "test").modalities["visual"]
    centre = visual[:, :, 0, 16, 16].astype(int)  # frames 1 and 3 of 4: flat greys 40 apart
    assert np.all(np.abs((centre[:, 1] - centre[:, 0]) % 256 - 40) <= 4)
    convert(converter(), root, tmp_path / "b", chunk_size=100, **QUIET)
    assert shard_digest(tmp_path / "a") == shard_digest(tmp_path / "b")


def test_without_classes_txt_the_train_labels_are_the_classes(tmp_path):
    root = tmp_path / "raw"
    make_tree(root, videos=False, classes_txt=False)
    (root / "annotations" / "val.csv").rename(root / "annotations" / "validate.csv")  # the other val name
    with open(root / "annotations" / "validate.csv", "a") as handle:
        handle.write("ironing,zzzzzzzzzzz,0,10,validate\n")  # a label train.csv lacks
    listing = converter().list_samples(root)
    assert listing.classes == sorted((*KS, OTHER))
    assert listing.dropped == {
        "annotations/validate.csv rows whose label is not in annotations/train.csv's labels": 1,
        "annotations/train.csv duplicate rows": 1,
    }
    assert {s.split for s in listing.samples} == {"train", "val", "test"}
    assert len(missing_files(listing.samples)) == len(listing.samples) == 3 * 7 + 2  # no videos written: all missing
    (root / "annotations" / "val.csv").write_text(HEADER)
    with pytest.raises(ValueError, match="both val.csv and validate.csv exist"):
        converter().list_samples(root)


@pytest.mark.parametrize(
    "edit, error",
    [
        (
            lambda r: (r / "classes.txt").write_text("playing bagpipes\nchoping wood\n"),
            r"1 label\(s\) have no row in annotations/train.csv: 'choping wood' \(close: \['chopping wood'\]\)",
        ),
        (
            lambda r: (r / "classes.txt").write_text("chopping wood\nplaying bagpipes\nchopping wood\n"),
            r"classes.txt line 3: 'chopping wood' is already listed at line 1",
        ),
        (lambda r: (r / "classes.txt").write_text("chopping wood\n"), r"holds 1 label\(s\); need at least 2"),
        (
            lambda r: (r / "annotations" / "train.csv").write_text("label,youtube_id,start,end\n"),
            r"train.csv: header .* lacks column\(s\) \['time_start', 'time_end'\]",
        ),
        (
            lambda r: (r / "annotations" / "val.csv").write_text(HEADER + "chopping wood,abc,1.5,11.5,val\n"),
            r"val.csv line 2: time_start '1.5' is not a whole number of seconds",
        ),
        (
            lambda r: (r / "annotations" / "val.csv").write_text(HEADER + "chopping wood,,1,11,val\n"),
            r"val.csv line 2: empty label or youtube_id",
        ),
        (
            lambda r: (r / "annotations" / "val.csv").write_text(HEADER + "chopping wood,-k00_Yt0Z,0,10,val\n"),
            r"val.csv line 2: clip -k00_Yt0Z_000000_000010 is also listed at train.csv line 2 "
            r"\(label 'playing bagpipes'\)",
        ),
        (lambda r: (r / "annotations" / "val.csv").unlink(), r"val.csv: missing; the Kinetics validation annotations"),
    ],
)
def test_malformed_annotations_fail_clearly(tmp_path, edit, error):
    root = tmp_path / "raw"
    make_tree(root, videos=False)
    edit(root)
    with pytest.raises((ValueError, FileNotFoundError), match=error):
        converter().list_samples(root)


def test_taken_down_and_corrupt_clips_are_listed_then_skipped_on_request(tmp_path):
    root = tmp_path / "raw"
    clips = make_tree(root)
    gone, broken = sorted(clips["train"])[2], sorted(clips["val"])[0]
    (root / "train" / f"{gone}.mp4").unlink()
    corrupt(root / "val" / f"{broken}.mp4", keep=200)
    with pytest.raises(ConversionError, match=rf"1 raw file\(s\) are missing:\n.*train/{gone}\.mp4"):
        convert(converter(), root, tmp_path / "out", **QUIET)
    write_video(root / "train" / f"{gone}.mp4", frames=4, audio_seconds=0.5)
    with pytest.raises(ConversionError, match=rf"1 raw file\(s\) could not be decoded:\n.*val/{broken}\.mp4"):
        convert(converter(), root, tmp_path / "out", **QUIET)
    assert not (tmp_path / "out").exists()
    (root / "train" / f"{gone}.mp4").unlink()
    manifest = convert(converter(), root, tmp_path / "out", skip_bad=True, **QUIET)
    assert manifest.preprocessing["skipped_bad"] | {"files": None} == {
        "count": 2,
        "missing": 1,
        "corrupt": 1,
        "files": None,
    }
    _, labels = read_back(tmp_path / "out")
    seen = {c for split in labels.values() for c in split}
    assert seen == (set(clips["train"]) | set(clips["val"])) - {gone, broken}
    # The val carve is drawn before missing files are removed: it does not move when a clip vanishes.
    full = {s.sample_id: s.split for s in converter().list_samples(root).samples}
    assert all(full[c] == split for split, split_clips in labels.items() for c in split_clips)


def test_bad_settings_and_layout_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="kinetics_sounds settings: val_fraction: Input should be less than 1"):
        build_converter("kinetics_sounds", {"val_fraction": 1.0})
    with pytest.raises(FileNotFoundError, match="annotations"):
        converter().list_samples(tmp_path)


def test_converted_fixture_trains_one_epoch(tree, tmp_path):
    root, _ = tree
    convert(converter(), root, tmp_path / "shards", **QUIET)
    cnn = {"encoder": "cnn", "params": {"channels": [4], "out_dim": 8}}
    res = {"encoder": "resnet18", "params": {}}
    result = train_one_epoch(tmp_path / "shards", {"audio": cnn, "visual": res}, tmp_path)
    assert 0.0 <= result["test"]["acc"] <= 1.0
    assert set(result["test"]["acc_per_modality"]) == {"audio", "visual"}
