"""CREMA-D converter on a tiny fixture tree in the distributed layout (real WAV + FLV files)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from helpers.convert import read_back, shard_digest, train_one_epoch
from helpers.cremad_tree import SMALL, make_tree
from helpers.media import corrupt, write_video
from mmbalance.data.convert import build_converter
from mmbalance.data.convert.cremad import EMOTIONS
from mmbalance.data.convert.pipeline import ConversionError, convert


def converter(**settings):
    return build_converter("cremad", {**SMALL, **settings})


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("cremad") / "CREMA-D"
    return root, make_tree(root)


def test_round_trip_counts_labels_splits_and_rerun_checksums(tree, tmp_path):
    root, clips = tree
    manifest = convert(
        converter(val_fraction=0.2, test_fraction=0.2),
        root,
        tmp_path / "a",
        engine="local",
        chunk_size=7,
        progress=lambda _: None,
    )
    manifest, labels = read_back(tmp_path / "a")
    assert manifest.classes == EMOTIONS
    seen = {sid: label for split in labels.values() for sid, label in split.items()}
    assert seen == {name: EMOTIONS.index(e) for name, e in clips.items()}  # every clip once, right label
    # Stratified: 36 clips = 6 per emotion; test takes round(0.2 * 6) = 1 per emotion, val round(0.2 * 5) = 1.
    assert {s: len(v) for s, v in labels.items()} == {"train": 24, "val": 6, "test": 6}
    for split in ("val", "test"):
        assert sorted(labels[split].values()) == list(range(6))
    assert manifest.modalities["audio"].shape == [257, 1 + int(0.5 * 22050) // 353]
    assert manifest.modalities["visual"].shape == [2, 3, 32, 32]
    assert manifest.modalities["audio"].normalize.source == "train split"
    assert manifest.preprocessing["params"]["frames"] == 2
    assert manifest.preprocessing["skipped_bad"]["count"] == 0
    # Rerun with another chunking: identical bytes, manifest included.
    convert(
        converter(val_fraction=0.2, test_fraction=0.2),
        root,
        tmp_path / "b",
        engine="local",
        chunk_size=36,
        progress=lambda _: None,
    )
    assert shard_digest(tmp_path / "a") == shard_digest(tmp_path / "b")


def test_frames_are_sampled_uniformly_and_audio_differs_per_clip(tree, tmp_path):
    root, _ = tree
    convert(converter(frames=2), root, tmp_path / "s", engine="local", progress=lambda _: None)
    from mmbalance.data.manifest import read_manifest
    from mmbalance.data.shards import load_split

    manifest = read_manifest(tmp_path / "s")
    arrays = load_split(tmp_path / "s", manifest, "train")
    visual = arrays.modalities["visual"]  # [N, 2, 3, 32, 32]
    # Fixture frame i is a flat grey (value + 20 i); 4 frames, 2 picked -> frames 1 and 3: 40 apart.
    centre = visual[:, :, 0, 16, 16].astype(int)
    assert np.all(np.abs((centre[:, 1] - centre[:, 0]) % 256 - 40) <= 4)  # fixture values wrap at 256
    audio = arrays.modalities["audio"]
    assert not np.allclose(audio[0], audio[1])


def test_split_csv_files_are_followed(tmp_path):
    root = tmp_path / "raw"
    clips = make_tree(root, actors=(1001, 1002), split_csv=True)
    test_names = {line.split(",")[0] for line in (root / "test.csv").read_text().splitlines()}
    convert(converter(val_fraction=0.25), root, tmp_path / "out", engine="local", progress=lambda _: None)
    manifest, labels = read_back(tmp_path / "out")
    assert set(labels["test"]) == test_names
    assert set(labels["train"]) | set(labels["val"]) == set(clips) - test_names
    assert manifest.preprocessing["split_source"]["test"] == "test.csv"


def test_missing_and_corrupt_files_are_listed_then_skipped_on_request(tmp_path):
    root = tmp_path / "raw"
    make_tree(root)
    (root / "VideoFlash" / "1002_DFA_SAD_HI.flv").unlink()
    corrupt(root / "AudioWAV" / "1003_DFA_FEA_XX.wav", keep=10)
    with pytest.raises(ConversionError, match=r"1 raw file\(s\) are missing:\n.*1002_DFA_SAD_HI.flv"):
        convert(converter(), root, tmp_path / "out", engine="local", progress=lambda _: None)
    write_video(root / "VideoFlash" / "1002_DFA_SAD_HI.flv", frames=4)
    with pytest.raises(ConversionError, match=r"1 raw file\(s\) could not be decoded:\n.*1003_DFA_FEA_XX.wav"):
        convert(converter(), root, tmp_path / "out", engine="local", progress=lambda _: None)
    assert not (tmp_path / "out").exists()
    (root / "VideoFlash" / "1002_DFA_SAD_HI.flv").unlink()
    manifest = convert(converter(), root, tmp_path / "out", engine="local", skip_bad=True, progress=lambda _: None)
    assert manifest.preprocessing["skipped_bad"] | {"files": None} == {
        "count": 2,
        "missing": 1,
        "corrupt": 1,
        "files": None,
    }
    assert sum(info.rows for info in manifest.splits.values()) == 36 - 2


def test_bad_settings_and_layout_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="cremad settings: frame: unknown setting"):
        build_converter("cremad", {"frame": 2})
    with pytest.raises(ValueError, match=r"crop \(300\) must not exceed resize"):
        build_converter("cremad", {"image": {"crop": 300}})
    with pytest.raises(FileNotFoundError, match="AudioWAV"):
        convert(converter(), tmp_path, tmp_path / "out", engine="local", progress=lambda _: None)


def test_converted_fixture_trains_one_epoch(tree, tmp_path):
    root, _ = tree
    convert(converter(), root, tmp_path / "shards", engine="local", progress=lambda _: None)
    cnn = {"encoder": "cnn", "params": {"channels": [4], "out_dim": 8}}
    res = {"encoder": "resnet18", "params": {}}
    result = train_one_epoch(tmp_path / "shards", {"audio": cnn, "visual": res}, tmp_path)
    assert 0.0 <= result["test"]["acc"] <= 1.0
    assert set(result["test"]["acc_per_modality"]) == {"audio", "visual"}


def test_prepare_command_lists_missing_files_and_counts_skips(tmp_path, capsys):
    from mmbalance.cli import main

    root = tmp_path / "raw"
    make_tree(root, actors=(1001, 1002))
    (root / "AudioWAV" / "1002_DFA_HAP_XX.wav").unlink()
    common = [
        "prepare",
        "cremad",
        "--root",
        str(root),
        "--out",
        str(tmp_path / "out"),
        "--engine",
        "local",
        "--set",
        "image.resize=36",
        "--set",
        "image.crop=32",
        "--set",
        "audio.clip_seconds=0.5",
        "--set",
        "val_fraction=0.25",
        "--set",
        "test_fraction=0.25",
    ]
    assert main(common) == 2
    err = capsys.readouterr().err
    assert "1 raw file(s) are missing" in err and "1002_DFA_HAP_XX.wav" in err and "--skip-bad" in err
    assert main(common + ["--skip-bad"]) == 0
    out = capsys.readouterr().out
    assert "chunk 1/1 done" in out and "skipped 1 sample(s)" in out
    assert main(common) == 2 and "already exists; pass --overwrite" in capsys.readouterr().err
