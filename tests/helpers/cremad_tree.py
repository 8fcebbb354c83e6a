"""A tiny CREMA-D tree in the distributed layout (AudioWAV/*.wav, VideoFlash/*.flv), two clips
per (actor, emotion), plus the small converter settings the tests use with it."""

from __future__ import annotations

from pathlib import Path

from helpers.media import write_video, write_wav
from mmbalance.data.convert.cremad import EMOTIONS

SMALL = {
    "image": {"resize": 36, "crop": 32},
    "audio": {"clip_seconds": 0.5},
    "frames": 2,
    "val_fraction": 0.2,
    "test_fraction": 0.2,
}
ACTORS = (1001, 1002, 1003)


def make_tree(root: Path, actors=ACTORS, split_csv: bool = False) -> dict[str, str]:
    """Two clips per (actor, emotion); returns clip name -> emotion code."""
    clips = {}
    for a in actors:
        for e in EMOTIONS:
            for level in ("XX", "HI"):
                name = f"{a}_DFA_{e}_{level}"
                k = len(clips)
                write_wav(root / "AudioWAV" / f"{name}.wav", seconds=0.4, freq=150 + 40 * k)
                write_video(root / "VideoFlash" / f"{name}.flv", frames=4, value=7 * k)
                clips[name] = e
    if split_csv:
        names = sorted(clips)
        test = set(names[::6])
        (root / "train.csv").write_text("".join(f"{n},{clips[n]}\n" for n in names if n not in test))
        (root / "test.csv").write_text("".join(f"{n},{clips[n]}\n" for n in names if n in test))
    return clips
