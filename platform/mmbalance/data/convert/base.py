"""What a dataset converter provides, and the split helpers they share.

A converter knows one dataset's raw layout. It lists samples on the driver (cheap: file names,
index files, labels, splits) and extracts features from one sample inside a pipeline task
(expensive: decoding). ``convert.pipeline`` does everything else: chunking, Ray Data
execution, resume, bad-file accounting, train-split statistics and the final shards.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from pydantic import BaseModel

from mmbalance.data.manifest import ModalitySpec

MAX_LISTED = 20  # problem files named in one error message


class BadInput(ValueError):
    """A raw file exists but cannot be decoded into the expected features (corrupt, empty, wrong
    format). Converters raise it from ``extract``; the pipeline collects these per file."""


@dataclass(frozen=True)
class RawSample:
    """One sample as the raw layout describes it: nothing decoded yet."""

    sample_id: str  # unique and stable across runs: it seeds per-sample corruptions
    label: int
    split: str  # "train" | "val" | "test"
    files: dict[str, str]  # role -> path of a raw file ("video", "audio", "image", ...)
    text: str | None = None  # inline text, for layouts that ship text in an index file

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_json(data: dict[str, Any]) -> "RawSample":
        return RawSample(**data)


@dataclass
class Listing:
    """What the raw tree holds, before any decoding."""

    classes: list[str]
    samples: list[RawSample]
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> count, e.g. rows outside the class list
    split_source: dict[str, Any] = field(default_factory=dict)  # recorded in the manifest
    provenance: dict[str, Any] = field(
        default_factory=dict
    )  # where else the listing came from (a class list and its hash)


@dataclass(frozen=True)
class ModalityOutput:
    """One output modality: its stored spec, and how the model should normalise it:
    ``"train_stats"`` (mean/std over the train split, per channel along ``axis``), a fixed
    ``(mean, std)`` pair of lists, or ``None``."""

    spec: ModalitySpec
    normalize: str | tuple[list[float], list[float]] | None = None
    axis: int | None = None
    source: str = ""


class Converter(Protocol):
    """One dataset's raw layout -> samples -> features. Must pickle (it travels to Ray tasks):
    keep heavy state (tokenizers, decoders) out of ``__init__`` and load it lazily in ``extract``."""

    name: str
    params: BaseModel  # every setting that changes the output; recorded in the manifest

    def list_samples(self, root: Path) -> Listing: ...

    def outputs(self) -> dict[str, ModalityOutput]: ...

    def extract(self, sample: RawSample) -> dict[str, np.ndarray]: ...

    def preprocessing(self) -> dict[str, Any]: ...


def sha256_file(path: Path) -> str:
    """Hex digest of an index file, recorded so a changed split or class list shows in the manifest."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def listing_text(items: list[str]) -> str:
    shown = "\n  ".join(items[:MAX_LISTED])
    more = f"\n  ... and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return f"\n  {shown}{more}"


def require_dir(root: Path, what: str) -> None:
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: dataset root does not exist (expected {what})")


def require_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; {what}")


def missing_files(samples: list[RawSample]) -> dict[str, list[str]]:
    """Sample id -> the raw files it names that do not exist (only samples with some missing).
    The pipeline calls this after listing, so no converter has to remember to."""
    missing = {}
    for sample in samples:
        absent = [path for path in sample.files.values() if not Path(path).is_file()]
        if absent:
            missing[sample.sample_id] = absent
    return missing


def _stable_order(samples: list[RawSample]) -> list[RawSample]:
    return sorted(samples, key=lambda s: s.sample_id)


def carve_split(samples: list[RawSample], source: str, target: str, fraction: float, seed: int) -> list[RawSample]:
    """Move ``floor(fraction * n + 0.5)`` samples of each label from split ``source`` to ``target``,
    drawn by one ``default_rng(seed)`` stream visiting labels in ascending order over samples
    sorted by id: the same listing always gives the same split, whatever the file system's order."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"split fraction must lie in (0, 1), got {fraction}")
    by_label: dict[int, list[RawSample]] = defaultdict(list)
    for sample in _stable_order(samples):
        if sample.split == source:
            by_label[sample.label].append(sample)
    rng = np.random.default_rng(seed)
    moved: set[str] = set()
    for label in sorted(by_label):
        pool = by_label[label]
        count = int(np.floor(fraction * len(pool) + 0.5))  # halves round up (Python's round() would give 0.1 * 5 -> 0)
        moved.update(pool[i].sample_id for i in rng.permutation(len(pool))[:count])
    return [RawSample(s.sample_id, s.label, target, s.files, s.text) if s.sample_id in moved else s for s in samples]


def check_nonempty_splits(samples: list[RawSample], splits: tuple[str, ...] = ("train", "val", "test")) -> None:
    counts = {split: sum(s.split == split for s in samples) for split in splits}
    empty = [split for split, count in counts.items() if count == 0]
    if empty:
        raise ValueError(f"split(s) {empty} would be empty ({counts}); the raw tree holds too few samples")
