"""The embedded default dataset: seeded Gaussian class prototypes per modality.

Each modality m draws ``x = signal_m * P_m[y] + noise_m * eps`` in ``dim_m`` dimensions, where
``P_m`` are fixed random unit-variance prototypes; with probability ``blank_m`` a sample's
modality carries no class signal at all (prototype replaced by noise), so neither
modality alone is enough and fusion matters per sample. The defaults make ``audio``
clearly dominant and ``visual`` weak but informative: late fusion fits the fused loss
through audio first, and the visual branch is left under-trained, which is the phenomenon
MNL/ARM/ARL/AUG address. Same parameters and seed -> byte-identical shards.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from mmbalance.data.manifest import Manifest, ModalitySpec
from mmbalance.data.shards import SplitArrays, write_shards

GENERATOR_VERSION = 1


class SyntheticModality(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dim: int = Field(32, ge=1)
    signal: float = Field(ge=0.0, description="scale of the class prototype")
    noise: float = Field(1.0, gt=0.0, description="std of the isotropic Gaussian noise")
    blank: float = Field(0.0, ge=0.0, lt=1.0, description="probability a sample carries no class signal")


def default_modalities() -> dict[str, SyntheticModality]:
    return {
        "audio": SyntheticModality(signal=0.55, blank=0.15),
        "visual": SyntheticModality(signal=0.22),
    }


class SyntheticSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    samples: dict[str, int] = Field(default_factory=lambda: {"train": 4000, "val": 1000, "test": 1000})
    classes: int = Field(10, ge=2)
    modalities: dict[str, SyntheticModality] = Field(default_factory=default_modalities)
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> "SyntheticSpec":
        if set(self.samples) != {"train", "val", "test"}:
            raise ValueError(f"samples must name exactly train, val and test, got {sorted(self.samples)}")
        if any(n < 1 for n in self.samples.values()):
            raise ValueError(f"every split needs at least one sample, got {self.samples}")
        if len(self.modalities) < 2:
            raise ValueError("a multimodal dataset needs at least 2 modalities")
        return self


def generate(spec: SyntheticSpec) -> dict[str, SplitArrays]:
    """All splits in memory. Prototypes are drawn once (shared by the splits), then each split's
    labels and noise from its own child stream, so changing one split's size leaves the others."""
    root = np.random.SeedSequence(spec.seed)
    proto_seq, *split_seqs = root.spawn(1 + len(spec.samples))
    proto_rng = np.random.default_rng(proto_seq)
    prototypes = {m: proto_rng.standard_normal((spec.classes, mod.dim)) for m, mod in spec.modalities.items()}
    splits = {}
    for (split, n), seq in zip(sorted(spec.samples.items()), split_seqs):
        rng = np.random.default_rng(seq)
        labels = np.arange(n, dtype=np.int64) % spec.classes  # balanced classes
        rng.shuffle(labels)
        arrays = {}
        for m, mod in spec.modalities.items():
            keep = rng.random(n) >= mod.blank  # [N] bool: sample carries class signal
            signal = prototypes[m][labels] * keep[:, None]  # [N, D]
            arrays[m] = (mod.signal * signal + mod.noise * rng.standard_normal((n, mod.dim))).astype(np.float32)
        ids = [f"{split}-{i:06d}" for i in range(n)]
        splits[split] = SplitArrays(sample_ids=ids, labels=labels, modalities=arrays)
    return splits


def prepare_synthetic(out: str | Path, spec: SyntheticSpec | None = None, *, overwrite: bool = False) -> Manifest:
    spec = spec or SyntheticSpec()
    return write_shards(
        out,
        dataset="synthetic",
        classes=[f"class_{c}" for c in range(spec.classes)],
        modalities={m: ModalitySpec(dtype="float32", shape=[mod.dim]) for m, mod in spec.modalities.items()},
        splits=generate(spec),
        generator={"name": "mmbalance.data.synthetic", "version": GENERATOR_VERSION},
        preprocessing=spec.model_dump(mode="json"),
        overwrite=overwrite,
    )
