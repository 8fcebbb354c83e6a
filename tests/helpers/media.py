"""Real media files for converter fixture trees: WAV, JPEG and small video clips with sound.

Everything is generated (nothing downloaded) and deterministic. Content depends on ``value`` so
tests can tell samples apart after conversion.
"""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np


def write_wav(path: Path, *, seconds: float = 0.5, rate: int = 16000, freq: float = 440.0) -> Path:
    """16-bit mono PCM sine."""
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * rate)) / rate
    pcm = (0.3 * np.sin(2 * np.pi * freq * t) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(rate)
        handle.writeframes(pcm.tobytes())
    return path


def write_jpg(path: Path, *, value: int = 128, size: tuple[int, int] = (40, 30)) -> Path:
    """A JPEG of ``size`` (width, height) with a gradient offset by ``value``."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    width, height = size
    grid = (np.add.outer(np.arange(height), np.arange(width)) * 3 + value) % 256
    pixels = np.stack([grid, np.full_like(grid, value), 255 - grid], axis=-1).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=95)
    return path


def write_video(
    path: Path,
    *,
    frames: int = 8,
    fps: int = 8,
    size: tuple[int, int] = (48, 40),
    value: int = 0,
    audio_rate: int | None = 16000,
    audio_seconds: float = 1.0,
    freq: float = 440.0,
) -> Path:
    """A clip whose container follows the suffix: ``.mp4`` (MPEG-4 + AAC) or ``.flv`` (FLV1 + MP3).
    Frame ``i`` is a flat colour ``(value + 20 i) % 256`` so frame sampling is checkable."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    vcodec, acodec, rate = {".mp4": ("mpeg4", "aac", audio_rate), ".flv": ("flv", "mp3", 22050)}[path.suffix]
    container = av.open(str(path), "w")
    video = container.add_stream(vcodec, rate=fps)
    video.width, video.height, video.pix_fmt = size[0], size[1], "yuv420p"
    audio = container.add_stream(acodec, rate=rate, layout="mono") if audio_rate else None
    for i in range(frames):
        pixels = np.full((size[1], size[0], 3), (value + 20 * i) % 256, np.uint8)
        for packet in video.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
            container.mux(packet)
    for packet in video.encode():
        container.mux(packet)
    if audio is not None:
        t = np.arange(int(audio_seconds * rate)) / rate
        wave_ = (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
        fmt = audio.codec_context.format.name
        step = audio.codec_context.frame_size or 1024
        for start in range(0, len(wave_), step):
            piece = wave_[start : start + step].reshape(1, -1)
            if fmt.startswith("flt"):
                frame = av.AudioFrame.from_ndarray(piece, format=fmt, layout="mono")
            else:
                frame = av.AudioFrame.from_ndarray((piece * 32767).astype(np.int16), format="s16p", layout="mono")
            frame.sample_rate, frame.pts = rate, start
            for packet in audio.encode(frame):
                container.mux(packet)
        for packet in audio.encode():
            container.mux(packet)
    container.close()
    return path


def corrupt(path: Path, keep: int = 64) -> Path:
    """Truncate a file to its first ``keep`` bytes: it exists but no longer decodes."""
    data = path.read_bytes()[:keep]
    path.write_bytes(data)
    return path
