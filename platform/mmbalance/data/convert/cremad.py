"""CREMA-D (audio-visual emotion, 6 classes) as distributed, e.g. by its GitHub release:

    ROOT/
      AudioWAV/1001_DFA_ANG_XX.wav     16 kHz mono speech, one per clip
      VideoFlash/1001_DFA_ANG_XX.flv   the same clip's video
      train.csv, test.csv              optional split lists (OGM-GE's 6698/744 split): lines
                                       "1001_DFA_ANG_XX,ANG", no header

A clip name is ``actor_sentence_emotion_level``; the label is the emotion code. Classes keep
OGM-GE's order (NEU, HAP, SAD, FEA, DIS, ANG), which the papers' code and checkpoints use.
Without the csv files, ``test_fraction`` of each emotion is drawn as test with ``seed``. In both
cases ``val_fraction`` of each emotion's train clips becomes val, so test is never used for
model selection (the official code selects on test).

Features: ``audio`` = log |STFT| of the WAV resampled to 22.05 kHz, tiled to 3 s, n_fft 512,
hop 353 -> float32 [257, 188] (OGM-GE/ARL/AUG's input); ``visual`` = ``frames`` frames sampled
uniformly over the FLV, Resize 256 -> CenterCrop 224 -> uint8 [frames, 3, 224, 224].
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from mmbalance.data.convert.base import (
    Listing,
    ModalityOutput,
    RawSample,
    carve_split,
    check_nonempty_splits,
    require_dir,
)
from mmbalance.data.convert.clips import audio_visual_outputs
from mmbalance.data.convert.media import AudioParams, ImageParams, load_audio_file, log_spectrogram, video_frames

EMOTIONS = ["NEU", "HAP", "SAD", "FEA", "DIS", "ANG"]


class CremadAudio(AudioParams):
    """22.05 kHz as OGM-GE/ARL load it; a subclass (not a changed default instance) so that
    setting one field, e.g. ``audio.clip_seconds``, keeps the others' dataset defaults."""

    sample_rate: int = Field(22050, gt=0)


class CremadParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    frames: int = Field(1, ge=1, description="video frames per clip (ARL/AUG use 1)")
    image: ImageParams = ImageParams()
    audio: CremadAudio = CremadAudio()
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="of each emotion's train clips")
    test_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="used only without train.csv/test.csv")
    seed: int = 0


class CremadConverter:
    name = "cremad"
    Params = CremadParams

    def __init__(self, params: CremadParams):
        self.params = params

    def list_samples(self, root: Path) -> Listing:
        require_dir(root, "the CREMA-D folder holding AudioWAV/ and VideoFlash/")
        for sub in ("AudioWAV", "VideoFlash"):
            require_dir(root / sub, f"CREMA-D's {sub}/ folder")
        split_files = [root / "train.csv", root / "test.csv"]
        listing = Listing(classes=list(EMOTIONS), samples=[])
        if all(p.is_file() for p in split_files):
            names = {split: _read_split_csv(path) for split, path in zip(("train", "test"), split_files)}
            listing.split_source = {"test": "test.csv", "val": f"{self.params.val_fraction} of train.csv per emotion"}
        else:
            stems = {p.stem for p in (root / "AudioWAV").glob("*.wav")} | {
                p.stem for p in (root / "VideoFlash").glob("*.flv")
            }
            names = {"train": sorted(stems)}
            listing.split_source = {
                "test": f"{self.params.test_fraction} per emotion, seed {self.params.seed}",
                "val": f"{self.params.val_fraction} of the rest per emotion",
            }
        samples = [
            RawSample(
                sample_id=name,
                label=EMOTIONS.index(_emotion(name)),
                split=split,
                files={
                    "audio": str(root / "AudioWAV" / f"{name}.wav"),
                    "video": str(root / "VideoFlash" / f"{name}.flv"),
                },
            )
            for split, split_names in names.items()
            for name in split_names
        ]
        if "test" not in names:
            samples = carve_split(samples, "train", "test", self.params.test_fraction, self.params.seed)
        samples = carve_split(samples, "train", "val", self.params.val_fraction, self.params.seed)
        check_nonempty_splits(samples)
        listing.samples = samples
        return listing

    def outputs(self) -> dict[str, ModalityOutput]:
        return audio_visual_outputs(self.params.audio, self.params.image, self.params.frames)

    def extract(self, sample: RawSample) -> dict[str, np.ndarray]:
        wave = load_audio_file(sample.files["audio"], self.params.audio)
        return {
            "audio": log_spectrogram(wave, self.params.audio),
            "visual": video_frames(sample.files["video"], self.params.frames, self.params.image),
        }

    def preprocessing(self) -> dict[str, Any]:
        return {
            "audio": "soundfile -> mono mean -> resample (torchaudio) -> fit -> log(|STFT| + eps), Hann, center",
            "visual": "PyAV decode all frames -> pick floor((i + 0.5) n / frames) -> resize shorter side, centre crop",
            "class_order": "OGM-GE: NEU, HAP, SAD, FEA, DIS, ANG",
        }


def _emotion(name: str) -> str:
    parts = name.split("_")
    if len(parts) != 4 or parts[2] not in EMOTIONS:
        raise ValueError(f"{name!r}: not a CREMA-D clip name (actor_sentence_emotion_level with emotion in {EMOTIONS})")
    return parts[2]


def _read_split_csv(path: Path) -> list[str]:
    names = []
    with open(path, newline="") as handle:
        for line, row in enumerate(csv.reader(handle), start=1):
            if not row or (line == 1 and row[-1].strip() not in EMOTIONS):
                continue  # blank line, or a header
            name = row[0].strip()
            if len(row) > 1 and row[1].strip() != _emotion(name):
                raise ValueError(f"{path} line {line}: label {row[1].strip()!r} disagrees with the clip name {name!r}")
            names.append(name)
    return names
