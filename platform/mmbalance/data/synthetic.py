"""The embedded default dataset: per modality, a class signal of one of two kinds plus Gaussian noise.

- **prototype** (linear): ``x = signal * P[y] + noise * eps`` in ``dim`` dimensions, with fixed
  random unit-variance class prototypes ``P``; a linear readout of ``x`` separates the classes.
- **XOR code** (``xor_pairs = K``): each class gets a distinct random code ``s[y]`` in ``{-1, +1}^K``;
  a sample draws fresh random signs ``a`` in ``{-1, +1}^K`` and sets ``x[2j] = signal * a_j`` and
  ``x[2j+1] = signal * a_j * s[y]_j`` for ``j < K`` (the other coordinates carry noise only), plus
  ``noise * eps``. Each coordinate alone is independent of the class: the class lives in the signs
  of the products ``x[2j] * x[2j+1]``, so a linear readout is at chance and a network must first
  learn the pairwise products, which it does slowly (a saddle at initialisation).

With probability ``blank`` a sample's modality carries no class signal at all (noise only), so
neither modality alone is enough and fusion matters per sample.

Generator versions (``SyntheticSpec.version``, recorded as ``generator.version`` in the manifest):

- **2** (default): ``audio`` a prototype signal (0.55, blank 0.15), ``visual`` a 10-pair XOR code
  (signal 1.0). Trained alone, visual reaches about 0.5 test accuracy; trained jointly with audio
  (late fusion, fused loss only) it stays near 0.28, because audio lowers the fused loss before
  visual escapes its saddle: the weak modality is informative but under-learned, which is the
  phenomenon MNL/ARM/ARL/AUG address (measured in docs/datasets.md).
- **1**: both prototype signals, ``visual`` at 0.22; visual is at its information ceiling under
  late fusion already. Its shards are byte-identical to those the version-1 code wrote.

Same parameters and seed -> byte-identical shards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from mmbalance.data.manifest import Encoding, Manifest, ModalitySpec
from mmbalance.data.shards import SplitArrays, write_shards

GENERATOR_VERSION = 2
GENERATOR_VERSIONS = (1, 2)


class SyntheticModality(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dim: int = Field(32, ge=1)
    signal: float = Field(ge=0.0, description="scale of the class signal (prototype or XOR-code coordinates)")
    noise: float = Field(1.0, gt=0.0, description="std of the isotropic Gaussian noise")
    blank: float = Field(0.0, ge=0.0, lt=1.0, description="probability a sample carries no class signal")
    xor_pairs: int | None = Field(
        None, ge=1, le=30, description="coordinate pairs carrying an XOR class code; null: a linear prototype"
    )

    @model_validator(mode="after")
    def _check(self) -> "SyntheticModality":
        if self.xor_pairs is not None and 2 * self.xor_pairs > self.dim:
            raise ValueError(f"xor_pairs={self.xor_pairs} needs dim >= {2 * self.xor_pairs}, got dim={self.dim}")
        return self

    def resized(self, dim: int) -> "SyntheticModality":
        """The same modality in ``dim`` dimensions; an XOR code keeps at most ``dim // 2`` pairs."""
        update: dict = {"dim": dim}
        if self.xor_pairs is not None:
            if dim < 2:
                raise ValueError(
                    f"an XOR-coded modality needs dim >= 2, got {dim}; generator version 1 has prototype signals only"
                )
            update["xor_pairs"] = min(self.xor_pairs, dim // 2)
        return self.model_validate(self.model_dump() | update)


def default_modalities(version: int = GENERATOR_VERSION) -> dict[str, SyntheticModality]:
    if version == 1:
        return {"audio": SyntheticModality(signal=0.55, blank=0.15), "visual": SyntheticModality(signal=0.22)}
    return {"audio": SyntheticModality(signal=0.55, blank=0.15), "visual": SyntheticModality(signal=1.0, xor_pairs=10)}


class SyntheticSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: Literal[1, 2] = Field(GENERATOR_VERSION, description="generator version; picks the default modalities")
    samples: dict[str, int] = Field(default_factory=lambda: {"train": 4000, "val": 1000, "test": 1000})
    classes: int = Field(10, ge=2)
    modalities: dict[str, SyntheticModality] = Field(
        default_factory=lambda data: default_modalities(data.get("version", GENERATOR_VERSION))
    )
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> "SyntheticSpec":
        if set(self.samples) != {"train", "val", "test"}:
            raise ValueError(f"samples must name exactly train, val and test, got {sorted(self.samples)}")
        if any(n < 1 for n in self.samples.values()):
            raise ValueError(f"every split needs at least one sample, got {self.samples}")
        if len(self.modalities) < 2:
            raise ValueError("a multimodal dataset needs at least 2 modalities")
        for m, mod in self.modalities.items():
            if mod.xor_pairs is not None and self.version == 1:
                raise ValueError(
                    f"modality {m!r}: xor_pairs needs generator version 2 (version 1 has prototype signals only)"
                )
            if mod.xor_pairs is not None and 2**mod.xor_pairs < self.classes:
                raise ValueError(
                    f"modality {m!r}: xor_pairs={mod.xor_pairs} (dim {mod.dim}) gives {2**mod.xor_pairs} "
                    f"distinct codes for {self.classes} classes; raise dim and xor_pairs, lower classes, "
                    "or use generator version 1 (prototype signals)"
                )
        return self


def _draw_class_codes(proto_rng: np.random.Generator, mod: SyntheticModality, classes: int) -> np.ndarray:
    """A prototype ``[C, D]`` (unit-variance Gaussian) or distinct XOR codes ``[C, K]`` in ``{-1, +1}``."""
    if mod.xor_pairs is None:
        return proto_rng.standard_normal((classes, mod.dim))
    ints = proto_rng.choice(2**mod.xor_pairs, size=classes, replace=False)  # distinct codes
    return np.where((ints[:, None] >> np.arange(mod.xor_pairs)) & 1, 1.0, -1.0)  # [C, K]


def _signal(rng: np.random.Generator, mod: SyntheticModality, codes: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Unit-scale class signal ``[N, D]``; an XOR code draws the per-sample signs ``a`` from ``rng``."""
    if mod.xor_pairs is None:
        return codes[labels]  # [N, D]
    k = mod.xor_pairs
    signs = rng.integers(0, 2, size=(len(labels), k)) * 2.0 - 1.0  # [N, K] a_j
    signal = np.zeros((len(labels), mod.dim))
    signal[:, 0 : 2 * k : 2] = signs
    signal[:, 1 : 2 * k : 2] = signs * codes[labels]  # product of the pair = the class's code bit
    return signal


def generate(spec: SyntheticSpec) -> dict[str, SplitArrays]:
    """All splits in memory. Prototypes and codes are drawn once (shared by the splits), then each
    split's labels and noise from its own child stream, so changing one split's size leaves the others."""
    root = np.random.SeedSequence(spec.seed)
    proto_seq, *split_seqs = root.spawn(1 + len(spec.samples))
    proto_rng = np.random.default_rng(proto_seq)
    codes = {m: _draw_class_codes(proto_rng, mod, spec.classes) for m, mod in spec.modalities.items()}
    splits = {}
    for (split, n), seq in zip(sorted(spec.samples.items()), split_seqs):
        rng = np.random.default_rng(seq)
        labels = np.arange(n, dtype=np.int64) % spec.classes  # balanced classes
        rng.shuffle(labels)
        arrays = {}
        for m, mod in spec.modalities.items():
            keep = rng.random(n) >= mod.blank  # [N] bool: sample carries class signal
            signal = _signal(rng, mod, codes[m], labels) * keep[:, None]  # [N, D]
            arrays[m] = (mod.signal * signal + mod.noise * rng.standard_normal((n, mod.dim))).astype(np.float32)
        ids = [f"{split}-{i:06d}" for i in range(n)]
        splits[split] = SplitArrays(sample_ids=ids, labels=labels, modalities=arrays)
    return splits


def prepare_synthetic(
    out: str | Path, spec: SyntheticSpec | None = None, *, overwrite: bool = False, encoding: Encoding | None = None
) -> Manifest:
    spec = spec or SyntheticSpec()
    return write_shards(
        out,
        dataset="synthetic",
        classes=[f"class_{c}" for c in range(spec.classes)],
        modalities={m: ModalitySpec(dtype="float32", shape=[mod.dim]) for m, mod in spec.modalities.items()},
        splits=generate(spec),
        generator={"name": "mmbalance.data.synthetic", "version": spec.version},
        # The version is the generator's; a prototype modality has no xor_pairs (so version-1
        # manifests keep their exact bytes).
        preprocessing=spec.model_dump(mode="json", exclude={"version"}, exclude_none=True),
        overwrite=overwrite,
        encoding=encoding,
    )


class SyntheticSettings(BaseModel):
    """What ``mmbalance prepare synthetic`` takes, flat so each setting is one flag: split sizes,
    the modality names, a signal and a noise per modality, and one feature dimension for all.
    ``spec()`` turns them into the nested ``SyntheticSpec`` the generator reads."""

    model_config = ConfigDict(extra="forbid")
    samples: int = Field(4000, description="train samples (default 4000)")
    val_samples: int = Field(1000, description="val samples (default 1000)")
    test_samples: int = Field(1000, description="test samples (default 1000)")
    classes: int = Field(10, description="number of classes (default 10)")
    modalities: str | None = Field(None, description="comma-separated names (default audio,visual; audio dominant)")
    signal: str | None = Field(None, description="comma-separated class-signal strength per modality")
    noise: str | None = Field(None, description="comma-separated noise std per modality")
    dim: int | None = Field(
        None, description="feature dimension of every modality (default 32; an XOR code keeps at most dim/2 pairs)"
    )
    generator: Literal["v1", "v2"] = Field(
        "v2",
        description="v2: visual class signal an XOR code (learned slowly); v1: the version-1 dataset, byte for byte",
    )
    seed: int = Field(0, description="generator seed (default 0)")

    def spec(self) -> SyntheticSpec:
        """The nested spec; a modality without a given signal/noise/dim keeps the version's default
        (names past the defaults repeat the last default modality). Raises ValueError."""
        version = int(self.generator.removeprefix("v"))
        names = self.modalities.split(",") if self.modalities else list(default_modalities(version))
        signals = _per_modality(self.signal, len(names), "signal")
        noises = _per_modality(self.noise, len(names), "noise")
        defaults = list(default_modalities(version).values())
        modalities = {}
        for i, name in enumerate(names):
            default = defaults[min(i, len(defaults) - 1)]
            base = (default.resized(self.dim) if self.dim else default).model_dump()
            base.update({"signal": signals[i]} if signals else {})
            base.update({"noise": noises[i]} if noises else {})
            modalities[name] = base
        samples = {"train": self.samples, "val": self.val_samples, "test": self.test_samples}
        return SyntheticSpec.model_validate(
            {
                "version": version,
                "samples": samples,
                "classes": self.classes,
                "modalities": modalities,
                "seed": self.seed,
            }
        )


def _per_modality(text: str | None, count: int, name: str) -> list[float] | None:
    if not text:
        return None
    values = [float(v) for v in text.split(",")]
    if len(values) != count:
        raise ValueError(f"--{name} needs {count} comma-separated values (one per modality), got {len(values)}")
    return values


class SyntheticWriter:
    """The synthetic dataset as an entry of the dataset table (``data/convert``): it reads no raw
    tree and builds every split in memory."""

    Params = SyntheticSettings

    def __init__(self, params: SyntheticSettings) -> None:
        self.params = params
        self.spec = params.spec()  # a spec the generator refuses fails here, before anything is written

    def write(
        self, root: Path | None, out: str | Path, *, overwrite: bool = False, encoding: Encoding | None = None
    ) -> Manifest:
        return prepare_synthetic(out, self.spec, overwrite=overwrite, encoding=encoding)
