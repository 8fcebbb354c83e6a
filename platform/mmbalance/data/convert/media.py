"""Decoding shared by the converters: images, audio and video clips -> fixed-shape arrays.

Every function is deterministic (same file -> same bytes) and raises ``BadInput`` naming the
file when it cannot decode it, so the pipeline can list corrupt files instead of dying on the
first. Audio maths runs in float64 so the float32 result does not hinge on reduction order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from mmbalance.data.convert.base import BadInput

IMAGENET_MEAN = [0.485 * 255, 0.456 * 255, 0.406 * 255]  # in 0-255 pixel units
IMAGENET_STD = [0.229 * 255, 0.224 * 255, 0.225 * 255]


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ImageParams(_Params):
    """Resize the shorter side to ``resize`` (bilinear), then centre-crop ``crop`` x ``crop``:
    the evaluation transform of the papers (Resize 256 -> CenterCrop 224). Random train crops
    are left out on purpose: stored shards are fixed, and MNL's protocol trains without them."""

    resize: int = Field(256, ge=1)
    crop: int = Field(224, ge=1)

    @model_validator(mode="after")
    def _crop_fits(self) -> "ImageParams":
        if self.crop > self.resize:
            raise ValueError(f"crop ({self.crop}) must not exceed resize ({self.resize})")
        return self


class AudioParams(_Params):
    """Waveform -> log-magnitude STFT, as ARL/AUG/OGM-GE feed their audio ResNet-18:
    ``log(|STFT| + eps)``, Hann window, ``n_fft // 2 + 1`` frequency bins."""

    sample_rate: int = Field(16000, gt=0, description="every clip is resampled to this rate")
    clip_seconds: float = Field(3.0, gt=0.0)
    fit: Literal["tile", "centre"] = Field(
        "tile", description="tile: repeat a short clip then cut (OGM-GE); centre: zero-pad evenly / crop the centre"
    )
    n_fft: int = Field(512, ge=16)
    hop_length: int = Field(353, ge=1)
    log_eps: float = Field(1e-7, gt=0.0)
    storage: Literal["float32", "float16"] = Field(
        "float32",
        description="element type of the spectrogram in the shards: float16 halves its bytes (values are "
        "rounded to float16 at conversion; training reads them back as float32)",
    )

    @property
    def clip_samples(self) -> int:
        return int(round(self.clip_seconds * self.sample_rate))

    @property
    def shape(self) -> list[int]:
        return [self.n_fft // 2 + 1, 1 + self.clip_samples // self.hop_length]  # center=True framing


def image_from_pil(image, params: ImageParams) -> np.ndarray:
    """PIL image -> uint8 ``[3, crop, crop]``."""
    from PIL import Image

    image = image.convert("RGB")
    width, height = image.size
    scale = params.resize / min(width, height)
    size = (max(params.crop, round(width * scale)), max(params.crop, round(height * scale)))
    image = image.resize(size, Image.BILINEAR)
    left, top = (size[0] - params.crop) // 2, (size[1] - params.crop) // 2
    image = image.crop((left, top, left + params.crop, top + params.crop))
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))


def load_image(path: str | Path, params: ImageParams) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()  # decode now: a truncated file fails here, not later
            return image_from_pil(image, params)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise BadInput(f"{path}: unreadable image ({err})") from err


def load_audio_file(path: str | Path, params: AudioParams) -> np.ndarray:
    """WAV/FLAC/OGG via soundfile -> mono float64 at ``params.sample_rate``."""
    import soundfile

    try:
        samples, rate = soundfile.read(str(path), dtype="float64", always_2d=True)
    except (RuntimeError, soundfile.LibsndfileError, ValueError) as err:
        raise BadInput(f"{path}: unreadable audio ({err})") from err
    if samples.size == 0:
        raise BadInput(f"{path}: audio has no samples")
    return resample(samples.mean(axis=1), rate, params.sample_rate)


def resample(wave: np.ndarray, rate: int, target: int) -> np.ndarray:
    if rate == target:
        return wave
    import torch
    import torchaudio.functional as AF

    return AF.resample(torch.from_numpy(np.ascontiguousarray(wave)), rate, target).numpy()


def fit_length(wave: np.ndarray, length: int, policy: str) -> np.ndarray:
    if policy == "tile":
        repeats = -(-length // len(wave))
        return np.tile(wave, repeats)[:length]
    out = np.zeros(length, dtype=wave.dtype)
    start = max(0, (len(wave) - length) // 2)
    kept = wave[start : start + length]
    left = (length - len(kept)) // 2
    out[left : left + len(kept)] = kept
    return out


def log_spectrogram(wave: np.ndarray, params: AudioParams) -> np.ndarray:
    """Mono waveform at ``params.sample_rate`` -> float32 ``params.shape``."""
    import torch

    clip = torch.from_numpy(fit_length(wave, params.clip_samples, params.fit))
    spec = torch.stft(
        clip,
        n_fft=params.n_fft,
        hop_length=params.hop_length,
        window=torch.hann_window(params.n_fft, dtype=torch.float64),
        center=True,
        pad_mode="reflect",
        return_complex=True,
    )
    return torch.log(spec.abs() + params.log_eps).float().numpy()


def _open_container(path: str | Path):
    import av

    try:
        return av.open(str(path))
    except (av.error.FFmpegError, OSError) as err:
        raise BadInput(f"{path}: unreadable media file ({err})") from err


def video_frames(path: str | Path, count: int, params: ImageParams) -> np.ndarray:
    """``count`` frames sampled uniformly over the clip (frame ``floor((i + 0.5) n / count)`` of
    the ``n`` decoded frames) -> uint8 ``[count, 3, crop, crop]``.

    Two decoding passes, the first only counting: keeping every frame of a 10 s 720p clip to pick
    three would hold close to a gigabyte per task, and container frame counts (where present at
    all) need not match what actually decodes."""
    total = sum(1 for _ in _decoded_frames(path))
    if total == 0:
        raise BadInput(f"{path}: no decodable video frames")
    picks = [int((i + 0.5) * total / count) for i in range(count)]
    wanted = {index: [] for index in picks}
    for index, frame in enumerate(_decoded_frames(path)):
        if index in wanted:
            wanted[index] = image_from_pil(frame.to_image(), params)
    if any(isinstance(v, list) for v in wanted.values()):  # the second pass decoded fewer frames
        raise BadInput(f"{path}: video decodes inconsistently ({total} frames on the first pass)")
    return np.stack([wanted[i] for i in picks])


def _decoded_frames(path: str | Path) -> Iterator:
    import av

    container = _open_container(path)
    try:
        if not container.streams.video:
            raise BadInput(f"{path}: no video stream")
        yield from container.decode(video=0)
    except av.error.FFmpegError as err:
        raise BadInput(f"{path}: video decoding failed ({err})") from err
    finally:
        container.close()


def container_audio(path: str | Path, params: AudioParams) -> np.ndarray:
    """The first audio stream of a video/audio container -> mono float64 at ``params.sample_rate``."""
    import av

    container = _open_container(path)
    try:
        if not container.streams.audio:
            raise BadInput(f"{path}: no audio stream")
        resampler = av.AudioResampler(format="dbl", layout="mono", rate=params.sample_rate)
        pieces = []
        for frame in container.decode(audio=0):
            pieces.extend(out.to_ndarray().reshape(-1) for out in resampler.resample(frame))
        pieces.extend(out.to_ndarray().reshape(-1) for out in resampler.resample(None))  # flush
    except av.error.FFmpegError as err:
        raise BadInput(f"{path}: audio decoding failed ({err})") from err
    finally:
        container.close()
    wave = np.concatenate(pieces) if pieces else np.zeros(0)
    if wave.size == 0:
        raise BadInput(f"{path}: audio stream has no samples")
    return wave.astype(np.float64)
