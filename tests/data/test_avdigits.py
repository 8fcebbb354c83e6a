"""prepare_avdigits on the real fsdd_mnist tree (converted once per module) and on tiny trees
written here, for the failure paths."""

from __future__ import annotations

import csv
import gzip
import struct
import wave
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from mmbalance.data.avdigits import SpectrogramParams, _read_clips, prepare_avdigits
from mmbalance.data.manifest import read_manifest
from mmbalance.data.shards import load_split, validate_shards

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "fsdd_mnist"


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    assert (DATA / "pairs.csv").is_file(), f"the shared real dataset is expected at {DATA}"
    out = tmp_path_factory.mktemp("avdigits") / "shards"
    manifest = prepare_avdigits(DATA, out)
    splits = {s: load_split(out, manifest, s) for s in ("train", "val", "test")}
    with open(DATA / "pairs.csv", newline="") as handle:
        pairs = {row["pair_id"]: row for row in csv.DictReader(handle)}
    return out, manifest, splits, pairs


def test_split_sizes_and_per_label_counts(real):
    _, manifest, splits, _ = real
    assert {s: info.rows for s, info in manifest.splits.items()} == {"train": 2430, "val": 270, "test": 300}
    assert Counter(splits["val"].labels.tolist()) == {d: 27 for d in range(10)}
    assert Counter(splits["test"].labels.tolist()) == {d: 30 for d in range(10)}
    assert Counter(splits["train"].labels.tolist()) == {d: 243 for d in range(10)}


def test_labels_and_test_split_follow_pairs_csv(real):
    _, _, splits, pairs = real
    for name, arrays in splits.items():
        assert arrays.labels.tolist() == [int(pairs[i]["label"]) for i in arrays.sample_ids]
        expected_source = "test" if name == "test" else "train"
        assert {pairs[i]["split"] for i in arrays.sample_ids} == {expected_source}
    assert len(splits["train"].sample_ids) + len(splits["val"].sample_ids) + len(splits["test"].sample_ids) == len(
        pairs
    )


def test_val_and_test_ids_are_disjoint_from_train(real):
    _, _, splits, _ = real
    ids = {s: set(a.sample_ids) for s, a in splits.items()}
    assert not ids["train"] & ids["val"]
    assert not ids["train"] & ids["test"]
    assert not ids["val"] & ids["test"]


def test_shards_validate_and_manifest_records_every_parameter(real):
    out, manifest, _, _ = real
    assert validate_shards(out) == read_manifest(out)
    assert manifest.classes == [str(d) for d in range(10)]
    assert manifest.modalities["audio"].shape == [40, 63] and manifest.modalities["image"].shape == [28, 28]
    assert manifest.generator == {"name": "mmbalance.data.avdigits", "version": 1}
    pre = manifest.preprocessing
    spec = pre["spectrogram"]
    assert {k: spec[k] for k in ("sample_rate", "clip_seconds", "n_fft", "hop_length", "n_mels", "log_offset")} == {
        "sample_rate": 8000,
        "clip_seconds": 1.0,
        "n_fft": 256,
        "hop_length": 128,
        "n_mels": 40,
        "log_offset": 1e-6,
    }
    assert pre["clip"]["samples"] == 8000
    assert pre["normalisation"]["audio"]["computed_on"] == "train"
    assert (pre["val_fraction"], pre["seed"], pre["split_source"]) == (0.1, 0, "pairs.csv split column")


def test_audio_normalisation_uses_train_only(real):
    _, manifest, splits, _ = real
    train = splits["train"].modalities["audio"].astype(np.float64)
    assert abs(train.mean()) < 1e-5 and abs(train.std() - 1.0) < 1e-5
    # Stats over all splits would leave train visibly off zero, so the check above can tell them apart.
    everything = np.concatenate([a.modalities["audio"].reshape(-1).astype(np.float64) for a in splits.values()])
    assert abs(everything.mean()) > 1e-4
    assert manifest.preprocessing["normalisation"]["audio"]["std"] > 0


def test_image_equals_mnist_pixels_over_255(real):
    _, _, splits, pairs = real
    pixels = np.frombuffer(gzip.open(DATA / "image" / "t10k-images-idx3-ubyte.gz").read()[16:], np.uint8).reshape(
        -1, 28, 28
    )
    for name in ("train", "test"):
        arrays = splits[name]
        row = 0
        expected = pixels[int(pairs[arrays.sample_ids[row]]["mnist_t10k_index"])].astype(np.float32) / 255
        np.testing.assert_array_equal(arrays.modalities["image"][row], expected)
        assert 0.0 <= arrays.modalities["image"].min() and arrays.modalities["image"].max() <= 1.0


def test_second_conversion_is_byte_identical(real, tmp_path):
    out, manifest, _, _ = real
    again = prepare_avdigits(DATA, tmp_path / "again")
    assert again.splits == manifest.splits  # per-file paths, rows and sha256
    assert (tmp_path / "again" / "manifest.json").read_bytes() == (out / "manifest.json").read_bytes()


# --- tiny trees written by the tests ---------------------------------------------------------


def _write_wav(path: Path, samples: np.ndarray, rate: int = 8000) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(rate)
        handle.writeframes(samples.astype("<i2").tobytes())


def _write_idx(path: Path, magic: int, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(f">{1 + array.ndim}I", magic, *array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes(), mtime=0))


@pytest.fixture
def tiny(tmp_path):
    """Digits 0 and 1, each 2 train + 1 test pairs; one clip longer than 1 s to exercise the crop."""
    root = tmp_path / "fsdd_mnist"
    rng = np.random.default_rng(0)
    rows = []
    for pair_id, (label, split, take) in enumerate(
        [(0, "train", 5), (0, "train", 6), (1, "train", 5), (1, "train", 6), (0, "test", 0), (1, "test", 0)]
    ):
        audio_file = f"audio/recordings/{label}_tester_{take}.wav"
        length = 12000 if pair_id == 0 else 3000 + 500 * pair_id
        t = np.arange(length) / 8000
        _write_wav(root / audio_file, 8000 * np.sin(2 * np.pi * (300 + 200 * label) * t))
        rows.append([pair_id, split, label, audio_file, "tester", take, pair_id])
    with open(root / "pairs.csv", "w", newline="") as handle:
        csv.writer(handle).writerows(
            [["pair_id", "split", "label", "audio_file", "speaker", "take", "mnist_t10k_index"], *rows]
        )
    _write_idx(root / "image/t10k-images-idx3-ubyte.gz", 2051, rng.integers(0, 256, (6, 28, 28)))
    _write_idx(root / "image/t10k-labels-idx1-ubyte.gz", 2049, np.array([r[2] for r in rows]))
    return root


def _assert_no_output(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]  # no temp leftovers


def test_tiny_tree_converts(tiny, tmp_path):
    manifest = prepare_avdigits(tiny, tmp_path / "out", val_fraction=0.5)
    assert {s: info.rows for s, info in manifest.splits.items()} == {"train": 2, "val": 2, "test": 2}
    validate_shards(tmp_path / "out")


def test_clips_are_centre_padded_and_centre_cropped(tiny):
    rows = [{"audio_file": "audio/recordings/0_tester_5.wav"}, {"audio_file": "audio/recordings/1_tester_5.wav"}]
    clips = _read_clips(tiny, rows, SpectrogramParams())  # 12000 samples (cropped), 4000 (padded)
    long_wav = 8000 * np.sin(2 * np.pi * 300 * np.arange(12000) / 8000)
    np.testing.assert_allclose(clips[0], long_wav.astype("<i2")[2000:10000] / 32768)
    nonzero = np.flatnonzero(clips[1])
    assert nonzero.min() >= 2000 and nonzero.max() < 6000


def test_missing_wav_is_named_and_leaves_no_output(tiny, tmp_path):
    (tiny / "audio/recordings/1_tester_6.wav").unlink()
    (tiny / "audio/recordings/0_tester_0.wav").unlink()
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError) as err:
        prepare_avdigits(tiny, out, val_fraction=0.5)
    assert "1_tester_6.wav" in str(err.value) and "0_tester_0.wav" in str(err.value)
    assert "2 input file(s) missing" in str(err.value)
    _assert_no_output(out)


def test_missing_image_file_is_named(tiny, tmp_path):
    (tiny / "image/t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte.gz"):
        prepare_avdigits(tiny, tmp_path / "out", val_fraction=0.5)
    _assert_no_output(tmp_path / "out")


def test_missing_root_and_missing_pairs_csv_fail_clearly(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare_avdigits(tmp_path / "nowhere", tmp_path / "out")
    (tiny / "pairs.csv").unlink()
    with pytest.raises(FileNotFoundError, match="pairs.csv"):
        prepare_avdigits(tiny, tmp_path / "out")
    _assert_no_output(tmp_path / "out")


def test_wrong_sample_rate_is_named(tiny, tmp_path):
    _write_wav(tiny / "audio/recordings/0_tester_6.wav", np.zeros(4000), rate=16000)
    with pytest.raises(ValueError, match=r"0_tester_6\.wav.*16000"):
        prepare_avdigits(tiny, tmp_path / "out", val_fraction=0.5)
    _assert_no_output(tmp_path / "out")


def test_spectrogram_params_reject_unknown_keys():
    with pytest.raises(ValueError, match="n_mel"):
        SpectrogramParams(n_mel=40)
