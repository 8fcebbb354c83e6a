"""What the audio-visual clip datasets (CREMA-D, AVE, Kinetics-Sounds) share: the two output
modalities and the extraction of one container clip.

``audio`` is a log-|STFT| spectrogram normalised by train-split statistics; ``visual`` is
``frames`` uint8 RGB frames ``[frames, 3, crop, crop]`` normalised with ImageNet statistics along
the channel axis, as the papers' ResNet-18 encoders expect.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydantic import Field

from mmbalance.data.convert.base import ModalityOutput
from mmbalance.data.convert.media import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AudioParams,
    ImageParams,
    container_audio,
    log_spectrogram,
    video_frames,
)
from mmbalance.data.manifest import ModalitySpec


class TenSecondClipAudio(AudioParams):
    """The whole 10 s clip of AVE and Kinetics at 16 kHz; hop 512 (32 ms) keeps the spectrogram at
    [257, 313]. A subclass (not a changed default instance) so that setting one field, e.g.
    ``audio.clip_seconds``, keeps the others' dataset defaults."""

    clip_seconds: float = Field(10.0, gt=0.0)
    hop_length: int = Field(512, ge=1)


def audio_visual_outputs(audio: AudioParams, image: ImageParams, frames: int) -> dict[str, ModalityOutput]:
    stored = None if audio.storage == "float32" else audio.storage  # float32: no ``stored`` key, as before
    return {
        "audio": ModalityOutput(ModalitySpec(dtype="float32", shape=audio.shape, stored=stored), "train_stats"),
        "visual": ModalityOutput(
            ModalitySpec(dtype="uint8", shape=[frames, 3, image.crop, image.crop]),
            (IMAGENET_MEAN, IMAGENET_STD),
            axis=1,
            source="ImageNet",
        ),
    }


def clip_features(path: str | Path, audio: AudioParams, image: ImageParams, frames: int) -> dict[str, np.ndarray]:
    """Audio track and sampled frames of one video file with sound (.mp4, .flv, ...)."""
    return {"audio": log_spectrogram(container_audio(path, audio), audio), "visual": video_frames(path, frames, image)}


class VideoClipConverter:
    """What the converters of video clips with a sound track share (AVE, Kinetics-Sounds): params
    with ``audio``, ``image`` and ``frames``; each sample's ``files["video"]`` is one clip, and
    its two outputs come from that one file. Subclasses list their own samples."""

    def __init__(self, params) -> None:
        self.params = params

    def outputs(self) -> dict[str, ModalityOutput]:
        return audio_visual_outputs(self.params.audio, self.params.image, self.params.frames)

    def extract(self, sample) -> dict[str, np.ndarray]:
        return clip_features(sample.files["video"], self.params.audio, self.params.image, self.params.frames)
