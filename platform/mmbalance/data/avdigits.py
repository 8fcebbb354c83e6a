"""Real-data converter: spoken digits (FSDD audio) paired with handwritten digits (MNIST t10k).

Reads the ``fsdd_mnist`` tree (``pairs.csv``, ``audio/recordings/*.wav``, ``image/t10k-*-idx*.gz``;
see its README) and writes shards with two modalities:

- ``audio``: float32 ``[n_mels, frames]`` log-mel spectrogram. Each clip (8 kHz, 16-bit mono PCM,
  scaled to [-1, 1)) is brought to ``clip_seconds`` *centred*: a shorter clip is zero-padded evenly
  on both sides (the odd sample goes right), a longer one keeps its centre, so the word sits in
  the middle of the window. Then ``log(mel + log_offset)``, standardised by one mean/std pair
  computed on the train split only and recorded in the manifest.
- ``image``: float32 ``[28, 28]`` in [0, 1] (MNIST uint8 / 255) of the pair's ``mnist_t10k_index``.

Splits: ``test`` is the pairs' test split; ``val`` is carved from the pairs' train split, stratified
per label with ``numpy.default_rng(seed)``; ``train`` is the rest. Same inputs -> byte-identical shards.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import struct
import wave
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from mmbalance import outputs
from mmbalance.data.convert.base import MAX_LISTED, listing_text
from mmbalance.data.convert.media import fit_length
from mmbalance.data.manifest import Encoding, Manifest, ModalitySpec
from mmbalance.data.shards import SplitArrays, write_shards

GENERATOR = {"name": "mmbalance.data.avdigits", "version": 1}
CLASSES = [str(d) for d in range(10)]
IMAGES_FILE = "image/t10k-images-idx3-ubyte.gz"
LABELS_FILE = "image/t10k-labels-idx1-ubyte.gz"
PAIR_COLUMNS = ("pair_id", "split", "label", "audio_file", "mnist_t10k_index")
# MelSpectrogram settings this converter does not expose; recorded so the manifest is complete.
FIXED_MEL = {"window": "hann", "power": 2.0, "center": True, "pad_mode": "reflect", "mel_scale": "htk", "norm": None}


class SpectrogramParams(BaseModel):
    """Audio -> log-mel settings. The defaults give a compact [40, 63] spectrogram per 1 s clip."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    sample_rate: int = Field(8000, gt=0, description="expected rate of every WAV; a mismatch is an error")
    clip_seconds: float = Field(1.0, gt=0.0, description="fixed clip length: centre zero-pad or centre crop")
    n_fft: int = Field(256, ge=16)
    hop_length: int = Field(128, ge=1)
    n_mels: int = Field(40, ge=1)
    f_min: float = Field(0.0, ge=0.0)
    f_max: float | None = Field(None, gt=0.0, description="null means sample_rate / 2")
    log_offset: float = Field(1e-6, gt=0.0, description="log(mel + log_offset)")

    @property
    def clip_samples(self) -> int:
        return int(round(self.clip_seconds * self.sample_rate))

    @property
    def frames(self) -> int:
        return 1 + self.clip_samples // self.hop_length  # center=True framing


def prepare_avdigits(
    root: str | Path,
    out: str | Path,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    overwrite: bool = False,
    spectrogram: SpectrogramParams | None = None,
    encoding: Encoding | None = None,
) -> Manifest:
    """Convert the fsdd_mnist tree at ``root`` into shards at ``out``; return the manifest."""
    params = spectrogram or SpectrogramParams()
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    root, out = Path(root), Path(out)
    if out.exists() and not overwrite:  # fail before the decoding work; write_shards checks again
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    if out.exists():
        outputs.check_replaceable(out, outputs.shards_layout(out), reads=[root])
    rows = _read_pairs(root)
    _check_files_exist(root, [root / r["audio_file"] for r in rows] + [root / IMAGES_FILE, root / LABELS_FILE])

    labels = np.array([r["label"] for r in rows], dtype=np.int64)  # [N]
    images = _read_images(root, np.array([r["mnist_t10k_index"] for r in rows]), labels, rows)  # [N, 28, 28]
    audio = _log_mel(_read_clips(root, rows, params), params)  # [N, n_mels, frames]
    split_of = _assign_splits(rows, labels, val_fraction, seed)  # [N] "train" | "val" | "test"

    train = audio[split_of == "train"].astype(np.float64)
    mean, std = float(train.mean()), float(train.std())
    audio = ((audio - mean) / std).astype(np.float32)

    splits = {}
    for split in ("train", "val", "test"):
        idx = np.flatnonzero(split_of == split)  # pairs.csv order, i.e. by pair_id
        splits[split] = SplitArrays(
            sample_ids=[str(rows[i]["pair_id"]) for i in idx],
            labels=labels[idx],
            modalities={"audio": audio[idx], "image": images[idx]},
        )
    preprocessing = {
        "spectrogram": {**params.model_dump(mode="json"), **FIXED_MEL},
        "clip": {
            "samples": params.clip_samples,
            "policy": "centre: zero-pad evenly both sides, crop centre",
            "pcm_scale": "int16 / 32768",
        },
        "normalisation": {"audio": {"mean": mean, "std": std, "computed_on": "train"}, "image": "uint8 / 255"},
        "val_fraction": val_fraction,
        "seed": seed,
        "split_source": "pairs.csv split column",
        "val_source": "stratified per label from the pairs.csv train split, numpy default_rng(seed)",
        "pairs_csv_sha256": hashlib.sha256((root / "pairs.csv").read_bytes()).hexdigest(),
    }
    modalities = {
        "audio": ModalitySpec(dtype="float32", shape=[params.n_mels, params.frames]),
        "image": ModalitySpec(dtype="float32", shape=[28, 28]),
    }
    return write_shards(
        out,
        dataset="avdigits",
        classes=CLASSES,
        modalities=modalities,
        splits=splits,
        generator=dict(GENERATOR),
        preprocessing=preprocessing,
        overwrite=overwrite,
        encoding=encoding,
    )


def _check_files_exist(root: Path, paths: list[Path]) -> None:
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{root}: {len(missing)} input file(s) missing:{listing_text(missing)}")


def _read_pairs(root: Path) -> list[dict]:
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: dataset root does not exist (expected the fsdd_mnist folder)")
    path = root / "pairs.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; the dataset root must hold pairs.csv")
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        absent = [c for c in PAIR_COLUMNS if c not in (reader.fieldnames or [])]
        if absent:
            raise ValueError(f"{path}: missing column(s) {absent}")
        rows, bad = [], []
        for line, raw in enumerate(reader, start=2):
            try:
                row = {
                    "pair_id": int(raw["pair_id"]),
                    "split": raw["split"],
                    "label": int(raw["label"]),
                    "audio_file": raw["audio_file"],
                    "mnist_t10k_index": int(raw["mnist_t10k_index"]),
                }
            except (TypeError, ValueError):
                bad.append(f"line {line}: unparseable {raw}")
                continue
            if row["split"] not in ("train", "test") or not 0 <= row["label"] < len(CLASSES):
                bad.append(
                    f"line {line}: split must be train/test and label 0..9, got {row['split']!r}, {row['label']}"
                )
            rows.append(row)
    ids = [r["pair_id"] for r in rows]
    if len(set(ids)) != len(ids):
        bad.append("pair_id values are not unique")
    if bad or not rows:
        raise ValueError(f"{path}: invalid pairs table:{listing_text(bad or ['no rows'])}")
    return sorted(rows, key=lambda r: r["pair_id"])


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    data = gzip.decompress(path.read_bytes())
    header = 4 * (1 + ndim)
    got, *dims = struct.unpack(f">{1 + ndim}I", data[:header])
    if got != magic or len(data) != header + int(np.prod(dims)):
        raise ValueError(
            f"{path}: not an idx file with magic {magic} (got magic {got}, dims {dims}, {len(data)} bytes)"
        )
    return np.frombuffer(data, np.uint8, offset=header).reshape(dims)


def _read_images(root: Path, index: np.ndarray, labels: np.ndarray, rows: list[dict]) -> np.ndarray:
    pixels = _read_idx(root / IMAGES_FILE, 2051, 3)  # [10000, 28, 28] uint8
    mnist_labels = _read_idx(root / LABELS_FILE, 2049, 1)  # [10000] uint8
    if pixels.shape[1:] != (28, 28) or len(mnist_labels) != len(pixels):
        raise ValueError(
            f"{root / IMAGES_FILE}: expected N x 28 x 28 images matching {LABELS_FILE}, got {pixels.shape}"
        )
    out_of_range = np.flatnonzero((index < 0) | (index >= len(pixels)))
    if out_of_range.size:
        raise ValueError(
            f"{root / 'pairs.csv'}: mnist_t10k_index outside [0, {len(pixels)}) for pair_id(s) "
            f"{[rows[i]['pair_id'] for i in out_of_range[:MAX_LISTED]]}"
        )
    wrong = np.flatnonzero(mnist_labels[index] != labels)
    if wrong.size:  # the pairing is by label; a mismatch means pairs.csv and the idx files disagree
        raise ValueError(
            f"{root / 'pairs.csv'}: label differs from the MNIST label for pair_id(s) "
            f"{[rows[i]['pair_id'] for i in wrong[:MAX_LISTED]]}"
        )
    return pixels[index].astype(np.float32) / np.float32(255.0)


def _read_clips(root: Path, rows: list[dict], params: SpectrogramParams) -> np.ndarray:
    """All clips as one [N, clip_samples] float32 array, centred (see module docstring)."""
    length = params.clip_samples
    clips = np.zeros((len(rows), length), dtype=np.float32)
    bad = []
    for i, row in enumerate(rows):
        path = root / row["audio_file"]
        try:
            with wave.open(str(path), "rb") as handle:
                fmt = (handle.getnchannels(), handle.getsampwidth(), handle.getframerate())
                pcm = handle.readframes(handle.getnframes())
        except (wave.Error, EOFError) as err:
            bad.append(f"{path}: unreadable WAV ({err})")
            continue
        if fmt != (1, 2, params.sample_rate):
            bad.append(f"{path}: channels/sample width/rate {fmt}, expected (1, 2, {params.sample_rate})")
            continue
        samples = np.frombuffer(pcm, dtype="<i2") / np.float32(32768.0)
        clips[i] = fit_length(samples, length, "centre")  # centre crop or centre pad
    if bad:
        raise ValueError(f"{len(bad)} WAV file(s) do not match the expected format:{listing_text(bad)}")
    return clips


def _log_mel(clips: np.ndarray, params: SpectrogramParams) -> np.ndarray:
    """[N, T] waveforms -> [N, n_mels, frames] log-mel, batched; float64 inside so the float32
    result does not hinge on reduction order."""
    import torch
    import torchaudio

    mel = torchaudio.transforms.MelSpectrogram(
        sample_rate=params.sample_rate,
        n_fft=params.n_fft,
        hop_length=params.hop_length,
        n_mels=params.n_mels,
        f_min=params.f_min,
        f_max=params.f_max,
        window_fn=torch.hann_window,
        power=FIXED_MEL["power"],
        center=FIXED_MEL["center"],
        pad_mode=FIXED_MEL["pad_mode"],
        mel_scale=FIXED_MEL["mel_scale"],
        norm=FIXED_MEL["norm"],
    ).double()
    with torch.no_grad():
        spec = mel(torch.from_numpy(clips).double())  # [N, n_mels, frames]
        return torch.log(spec + params.log_offset).float().numpy()


def _assign_splits(rows: list[dict], labels: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """``test`` from pairs.csv; ``val`` = round(val_fraction * n) train rows per label, drawn by one
    default_rng(seed) stream visiting labels in order 0..9; ``train`` = the remaining train rows."""
    split_of = np.array([r["split"] for r in rows], dtype="<U5")
    rng = np.random.default_rng(seed)
    for label in range(len(CLASSES)):
        pool = np.flatnonzero((split_of == "train") & (labels == label))
        n_val = int(round(val_fraction * len(pool)))
        split_of[rng.permutation(pool)[:n_val]] = "val"
    for split in ("train", "val", "test"):
        if not (split_of == split).any():
            raise ValueError(f"split {split!r} would be empty (val_fraction={val_fraction}, {len(rows)} pairs)")
    return split_of


class AvdigitsSettings(BaseModel):
    """What ``mmbalance prepare avdigits`` takes besides the tree: one flag per field."""

    model_config = ConfigDict(extra="forbid")
    val_fraction: float = Field(0.1, description="share of train carved out as val, per digit")
    seed: int = Field(0, description="seed of the val carve-out (default 0)")


class AvdigitsWriter:
    """AV-digits as an entry of the dataset table (``data/convert``): reads the fsdd_mnist tree and
    builds every split in memory."""

    Params = AvdigitsSettings

    def __init__(self, params: AvdigitsSettings) -> None:
        self.params = params

    def write(
        self, root: Path | None, out: str | Path, *, overwrite: bool = False, encoding: Encoding | None = None
    ) -> Manifest:
        return prepare_avdigits(
            root,
            out,
            val_fraction=self.params.val_fraction,
            seed=self.params.seed,
            overwrite=overwrite,
            encoding=encoding,
        )
