"""Input corruptions for robustness training and evaluation (docs/methods/mnl.md §1.5).

Pure numpy, so the same code runs in-process and inside Ray Data ``map_batches`` tasks.
Batches look like ``decode_batch``'s output: ``{modality: [B, *shape]}`` plus other keys.

Randomness is per sample, never per batch: a sample's stream is seeded from
``(plan.seed, name, modality, level, sample_id)`` through a stable hash (blake2b, not the salted
``hash()``). A sample therefore gets the same corruption whatever its batch, batch order,
worker count or worker, and different ids get i.i.d. draws (streams are fixed for a given
numpy version). The MNL code reseeds with
``np.random.seed(0)`` per image, so every image gets the *same* noise; we do not copy that.
For fresh training noise each epoch, use a per-epoch seed (``engine.batches.epoch_seed``).
The modality is part of the key so that two image modalities never share a noise pattern.

Level -> parameter (level 0 is the exact identity for every corruption):

- ``gaussian`` (uint8 or float images): with probability ``p`` per sample add N(0, σ²) with
  σ = 10·ε pixel units of 0-255, i.e. ``σ = 10·ε·pixel_range/255`` in array units; clip to
  ``[0, pixel_range]`` (uint8 results are rounded). ``pixel_range`` defaults to 255 for uint8
  and 1.0 for floats. Apply before any mean/std normalisation.
- ``salt_pepper`` (uint8 or float images, ε ≤ 100): with probability ``p`` per sample, exactly
  ``round(ε/100 · n_pixels)`` pixels, drawn without replacement, are set to 0 or ``pixel_range``
  (fair coin each). A pixel is one array element, or one position across ``channel_axis``
  (an axis of the per-sample shape, e.g. 0 for ``[C, H, W]``) when that is set.
- ``word_replace`` (integer token ids, ε ≤ 10): with probability ``p`` per sample, each token
  that is neither ``pad_id`` nor in ``keep_ids`` becomes ``replacement_id`` with probability ε/10.
  MNL replaces words before tokenisation; on word pieces this is the token-level analogue.
- ``audio_snr`` (float waveforms or spectrograms): level = SNR in dB relative to the sample's
  own power ``mean(x²)``. Gaussian noise is rescaled so the sample's SNR is exactly the level.
  On log-mel spectrograms this acts in the feature domain, not on the waveform.
  Level 0 means clean (the shared "level 0 = identity" rule), so 0 dB SNR is not expressible;
  silent samples (power 0) are left unchanged.
- ``feature_noise`` (float features: tabular data, embeddings, spectrograms, any standardised
  input): with probability ``p`` per sample add ``level · std · N(0, 1)`` per element, where ``std``
  is the TRAIN split's population standard deviation of that element (one per element of the
  per-sample shape, computed from the shards by ``for_data`` / ``shards.feature_std``; never from
  val or test), so level 1 is one train-std of noise per feature. No clipping. A feature with train
  std 0 gets no noise. The manifest's ``normalize`` statistics are not used: they may be
  constants from elsewhere (ImageNet) and are per channel. A spec whose ``std`` was never filled
  in is refused with a ``CorruptionError`` (``params.std``, with ``std_axis`` for one value per
  channel, gives it explicitly).
- ``missing`` (any modality, level 0 or 1): level 1 replaces the whole input of the sample
  with probability ``p`` (default 1.0) by ``fill``: zeros (pad ids for text), or, for a modality
  the model normalises, the normalisation mean (``for_modality``), so the encoder sees zeros.
"""

from __future__ import annotations

import hashlib
import math
from typing import Annotated, Any, Callable, ClassVar, Literal, Sequence, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator


class CorruptionError(ValueError):
    """An invalid corruption string, or arrays that a corruption cannot handle."""


class CorruptionSpec(BaseModel):
    """One corruption of one modality at one level; subclasses add their own fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    max_level: ClassVar[float | None] = None
    accepts: ClassVar[tuple[str, ...]] = ("b", "i", "u", "f", "c")  # dtype names or numpy kinds

    name: str
    modality: str = Field(min_length=1)
    level: float = Field(ge=0.0, allow_inf_nan=False)
    p: float = Field(0.5, ge=0.0, le=1.0, description="probability that a sample is corrupted")

    @model_validator(mode="after")
    def _level_in_range(self) -> "CorruptionSpec":
        if self.max_level is not None and self.level > self.max_level:
            raise ValueError(f"{self.name} level must be in [0, {self.max_level:g}], got {self.level:g}")
        return self

    def bind(self, sample_shape: tuple[int, ...]) -> Any:
        """The third argument of this corruption's per-sample function, built once per batch: the
        spec itself, or (``feature_noise``) its data-derived parameters as arrays checked against
        ``sample_shape``. Raises ``CorruptionError`` when they are missing or do not fit."""
        return self


class GaussianSpec(CorruptionSpec):
    name: Literal["gaussian"] = "gaussian"
    accepts: ClassVar[tuple[str, ...]] = ("uint8", "f")
    pixel_range: float | None = Field(None, gt=0.0, description="max pixel value; null: 255 for uint8, 1.0 for floats")


class SaltPepperSpec(CorruptionSpec):
    name: Literal["salt_pepper"] = "salt_pepper"
    max_level: ClassVar[float | None] = 100.0
    accepts: ClassVar[tuple[str, ...]] = ("uint8", "f")
    pixel_range: float | None = Field(None, gt=0.0, description="max pixel value; null: 255 for uint8, 1.0 for floats")
    channel_axis: int | None = Field(
        None, description="axis of the per-sample shape sharing one mask (0 for [C, H, W])"
    )


class WordReplaceSpec(CorruptionSpec):
    name: Literal["word_replace"] = "word_replace"
    max_level: ClassVar[float | None] = 10.0
    accepts: ClassVar[tuple[str, ...]] = ("i", "u")
    replacement_id: int = Field(100, ge=0, description="token written in place of a word (BERT [UNK] = 100)")
    pad_id: int = Field(0, ge=0)
    keep_ids: tuple[int, ...] = Field((), description="ids never replaced, e.g. (101, 102) for BERT [CLS]/[SEP]")


class AudioSNRSpec(CorruptionSpec):
    name: Literal["audio_snr"] = "audio_snr"
    accepts: ClassVar[tuple[str, ...]] = ("f",)


class FeatureNoiseSpec(CorruptionSpec):
    name: Literal["feature_noise"] = "feature_noise"
    accepts: ClassVar[tuple[str, ...]] = ("f",)
    std: list[float] | None = Field(
        None,
        min_length=1,
        description="the train split's std per feature: one per "
        "element of the per-sample shape (row-major), one per channel along std_axis, or "
        "one for all; null until for_data fills it in from the train split",
    )
    std_axis: int | None = Field(None, description="axis of the per-sample shape that std runs along (needs std)")

    @model_validator(mode="after")
    def _valid_std(self) -> "FeatureNoiseSpec":
        if self.std is None:
            if self.std_axis is not None:
                raise ValueError("feature_noise std_axis needs std")
        elif not all(math.isfinite(s) and s >= 0 for s in self.std):
            raise ValueError("feature_noise std must be finite and >= 0")
        return self

    def bind(self, sample_shape: tuple[int, ...]) -> np.ndarray:
        """``level · std``, shaped to broadcast over one sample."""
        if self.std is None:
            raise CorruptionError(
                f"feature_noise on {self.modality!r} has no std: it is the train split's, filled in from the shards "
                "by corruptions.for_data (eval.corruptions, data.train_corruptions and `mmbalance eval` do this); "
                "give it explicitly as params.std"
            )
        std = np.asarray(self.std, dtype=np.float64)
        shape = tuple(sample_shape)
        if self.std_axis is not None:
            if not -len(shape) <= self.std_axis < len(shape) or shape[self.std_axis] != std.size:
                raise CorruptionError(
                    f"feature_noise on {self.modality!r}: {std.size} std values along axis "
                    f"{self.std_axis} do not fit samples of shape {shape}"
                )
            view = [1] * len(shape)
            view[self.std_axis] = std.size
            std = std.reshape(view)
        elif std.size == 1:
            std = std.reshape(())
        elif std.size == math.prod(shape):
            std = std.reshape(shape)
        else:
            raise CorruptionError(
                f"feature_noise on {self.modality!r}: {std.size} std values do not fit samples of "
                f"shape {shape} (one per element, {math.prod(shape)}, or set std_axis)"
            )
        return self.level * std


class MissingSpec(CorruptionSpec):
    name: Literal["missing"] = "missing"
    max_level: ClassVar[float | None] = 1.0
    level: float = Field(1.0, ge=0.0, allow_inf_nan=False)
    p: float = Field(1.0, ge=0.0, le=1.0, description="probability that a sample's modality is dropped")
    fill: list[float] | None = Field(
        None,
        description="raw value(s) meaning 'no signal': the manifest's "
        "normalisation mean (per channel along fill_axis); null fills zeros",
    )
    fill_axis: int | None = None

    @model_validator(mode="after")
    def _binary(self) -> "MissingSpec":
        if self.level not in (0.0, 1.0):
            raise ValueError(f"missing level must be 0 (keep) or 1 (drop), got {self.level:g}")
        return self


SampleFn = Callable[[np.ndarray, np.random.Generator, Any], np.ndarray]


def _pixel_range(x: np.ndarray, spec: GaussianSpec | SaltPepperSpec) -> float:
    if spec.pixel_range is None:
        return 255.0 if x.dtype == np.uint8 else 1.0
    if x.dtype == np.uint8 and spec.pixel_range > 255:
        raise CorruptionError(f"{spec.name}: pixel_range {spec.pixel_range:g} does not fit uint8 {spec.modality!r}")
    return spec.pixel_range


def _as_dtype(y: np.ndarray, like: np.ndarray) -> np.ndarray:
    # Integer pixels are rounded, not truncated, so zero-mean noise stays zero-mean.
    return (np.rint(y) if like.dtype.kind in "iu" else y).astype(like.dtype, copy=False)


def _gaussian(x: np.ndarray, rng: np.random.Generator, spec: GaussianSpec) -> np.ndarray:
    top = _pixel_range(x, spec)
    sigma = 10.0 * spec.level * top / 255.0  # 10·ε in 0-255 pixel units, rescaled to the array's range
    noisy = rng.standard_normal(x.shape, dtype=np.float32).astype(np.result_type(x.dtype, np.float32), copy=False)
    noisy *= sigma
    noisy += x  # [*shape]
    return _as_dtype(np.clip(noisy, 0.0, top, out=noisy), x)


def _salt_pepper(x: np.ndarray, rng: np.random.Generator, spec: SaltPepperSpec) -> np.ndarray:
    top = _pixel_range(x, spec)
    out = x.copy()
    view = out[..., None]  # [*shape, 1]: channel_axis None makes every element a pixel
    if spec.channel_axis is not None:
        if not -x.ndim <= spec.channel_axis < x.ndim:
            raise CorruptionError(
                f"salt_pepper channel_axis {spec.channel_axis} is out of range for samples of shape {x.shape}"
            )
        view = np.moveaxis(out, spec.channel_axis, -1)  # [*pixels, C], a writable view of out
    n = math.prod(view.shape[:-1])
    k = int(math.floor(spec.level / 100.0 * n + 0.5))
    chosen = rng.choice(n, size=k, replace=False)
    salt = rng.random(k) < 0.5  # fair coin: max (salt) or 0 (pepper)
    value = np.where(salt, top, 0.0).astype(x.dtype)  # [k]
    view[np.unravel_index(chosen, view.shape[:-1])] = value[:, None]  # every channel of a pixel alike
    return out


def _word_replace(x: np.ndarray, rng: np.random.Generator, spec: WordReplaceSpec) -> np.ndarray:
    hit = rng.random(x.shape) < spec.level / 10.0  # [L]
    hit &= x != spec.pad_id
    if spec.keep_ids:
        hit &= ~np.isin(x, spec.keep_ids)
    return np.where(hit, np.asarray(spec.replacement_id, dtype=x.dtype), x)


def _audio_snr(x: np.ndarray, rng: np.random.Generator, spec: AudioSNRSpec) -> np.ndarray:
    signal = x.astype(np.float64)
    power = float(np.mean(signal**2))
    if power == 0.0:
        return x.copy()  # silence has no SNR to match
    noise = rng.standard_normal(x.shape)
    # Rescale the draw to the exact target power, so every corrupted sample sits at the level.
    noise *= math.sqrt(power / (10.0 ** (spec.level / 10.0) * float(np.mean(noise**2))))
    return (signal + noise).astype(x.dtype)


def _feature_noise(x: np.ndarray, rng: np.random.Generator, scale: np.ndarray) -> np.ndarray:
    # scale = level · train std (FeatureNoiseSpec.bind); exactly 0 noise where the std is 0. No clip.
    noise = rng.standard_normal(x.shape)  # float64 [*shape]
    noise *= scale
    return (x.astype(np.float64) + noise).astype(x.dtype)


def _missing(x: np.ndarray, rng: np.random.Generator, spec: MissingSpec) -> np.ndarray:
    if spec.fill is None:
        return np.zeros_like(x)
    view = [1] * x.ndim
    if spec.fill_axis is not None:
        view[spec.fill_axis] = len(spec.fill)
    fill = np.asarray(spec.fill, dtype=np.float64).reshape(view)
    if np.issubdtype(x.dtype, np.integer):
        fill = np.rint(fill)
    return np.broadcast_to(fill, x.shape).astype(x.dtype)


def neutral_fill(modality: Any) -> dict[str, Any]:
    """``missing``'s fill for a manifest ``ModalitySpec``: its normalisation mean, so the encoder
    sees zeros after the model's normalisation (the input standing for "no signal"). Raw zeros
    would be a loud signal there: a log-spectrogram of 0 is far above silence, a black frame is
    -2 sigma. Without a normalisation the fill is zero (pad ids for text)."""
    norm = getattr(modality, "normalize", None)
    return {} if norm is None else {"fill": list(norm.mean), "fill_axis": norm.axis}


def for_modality(
    spec: "CorruptionSpec", modality: Any, train_std: "Callable[[], np.ndarray] | np.ndarray | None" = None
) -> "CorruptionSpec":
    """``spec`` adapted to the data it corrupts: a ``missing`` without an explicit fill gets
    ``neutral_fill(modality)``; a ``feature_noise`` without an explicit std gets ``train_std``
    (the train split's std per element of the per-sample shape, or a function returning it, called
    only then), and stays unresolved without one; every other corruption is returned unchanged."""
    if isinstance(spec, MissingSpec) and spec.fill is None:
        return spec.model_copy(update=neutral_fill(modality))
    if isinstance(spec, FeatureNoiseSpec) and spec.std is None and train_std is not None:
        std = np.asarray(train_std() if callable(train_std) else train_std, dtype=np.float64)
        shape = tuple(getattr(modality, "shape", std.shape))
        if std.shape != shape:
            raise CorruptionError(
                f"feature_noise on {spec.modality!r}: train std of shape {std.shape} for samples of shape {shape}"
            )
        return spec.model_copy(update={"std": std.ravel().tolist()})
    return spec


def for_data(
    specs: Sequence["CorruptionSpec"],
    shard_dir: Any,
    manifest: Any,
    train_split: str,
    cache: dict[str, np.ndarray] | None = None,
) -> list["CorruptionSpec"]:
    """``for_modality`` of each spec on the shards at ``shard_dir``: ``feature_noise``'s std is the
    ``train_split``'s (``shards.feature_std``, read only when a spec needs it, and at most once per
    modality; ``cache``, modality -> std, shares that across calls). Pass the recipe's
    ``data.train_split``, never val or test."""
    from mmbalance.data.shards import feature_std

    memo = {} if cache is None else cache

    def std_of(modality: str) -> np.ndarray:
        if modality not in memo:
            memo[modality] = feature_std(shard_dir, manifest, train_split, modality)
        return memo[modality]

    out = []
    for spec in specs:
        if spec.modality not in manifest.modalities:
            raise CorruptionError(
                f"{spec.name}: modality {spec.modality!r} is not in the data at {shard_dir}; "
                f"allowed: {sorted(manifest.modalities)}"
            )
        out.append(for_modality(spec, manifest.modalities[spec.modality], lambda m=spec.modality: std_of(m)))
    return out


CORRUPTIONS: dict[str, tuple[type[CorruptionSpec], SampleFn]] = {
    "gaussian": (GaussianSpec, _gaussian),
    "salt_pepper": (SaltPepperSpec, _salt_pepper),
    "word_replace": (WordReplaceSpec, _word_replace),
    "audio_snr": (AudioSNRSpec, _audio_snr),
    "missing": (MissingSpec, _missing),
    "feature_noise": (FeatureNoiseSpec, _feature_noise),
}

AnyCorruption = Annotated[Union[tuple(spec for spec, _ in CORRUPTIONS.values())], Field(discriminator="name")]


class CorruptionPlan(BaseModel):
    """Corruptions applied in order, all drawn from one ``seed`` (e.g. an eval seed)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    corruptions: list[AnyCorruption] = Field(default_factory=list)  # type: ignore[valid-type]
    seed: int = Field(0, ge=0)


def _allowed() -> str:
    return ", ".join(sorted(CORRUPTIONS))


def make_spec(name: str, **fields: Any) -> CorruptionSpec:
    """``make_spec("gaussian", modality="visual", level=5)``: validated, with a clear unknown-name error."""
    if name not in CORRUPTIONS:
        raise CorruptionError(f"unknown corruption {name!r}; allowed: {_allowed()}")
    return CORRUPTIONS[name][0](**fields)


def parse_levels(text: str) -> tuple[str, list[float]]:
    """``"gaussian:0,5,10"`` -> ``("gaussian", [0.0, 5.0, 10.0])``; a bare ``"missing"`` means level 1."""
    name, sep, rest = text.strip().partition(":")
    name = name.strip()
    if name not in CORRUPTIONS:
        raise CorruptionError(f"{text!r}: unknown corruption {name!r}; allowed: {_allowed()}")
    if not sep:
        if name == "missing":
            return name, [1.0]
        raise CorruptionError(f"{text!r}: expected NAME:LEVEL[,LEVEL...], e.g. {name}:0,5,10")
    levels = []
    for item in rest.split(","):
        try:
            level = float(item)
        except ValueError:
            raise CorruptionError(f"{text!r}: level {item.strip()!r} is not a number") from None
        try:
            CORRUPTIONS[name][0](modality="_", level=level)  # the spec's own range checks
        except ValueError as err:
            raise CorruptionError(f"{text!r}: {_first_error(err)}") from None
        levels.append(level)
    return name, levels


def _first_error(err: ValueError) -> str:
    errors = getattr(err, "errors", None)
    if not callable(errors):
        return str(err)
    first = errors()[0]
    where, message = ".".join(str(p) for p in first["loc"]), first["msg"].removeprefix("Value error, ")
    return f"{where}: {message}" if where else message


def sweep_plans(modality: str, text: str, seed: int = 0, **fields: Any) -> list[CorruptionPlan]:
    """One plan per level of ``text`` (``"gaussian:0,5,10"``) on ``modality``; ``fields`` go to the spec."""
    name, levels = parse_levels(text)
    return [
        CorruptionPlan(seed=seed, corruptions=[make_spec(name, modality=modality, level=lv, **fields)]) for lv in levels
    ]


def _id_text(sample_id: Any) -> str:
    if isinstance(sample_id, str):
        return sample_id
    if isinstance(sample_id, bytes):
        return sample_id.decode()
    if isinstance(sample_id, (int, np.integer)) and not isinstance(sample_id, (bool, np.bool_)):
        return str(int(sample_id))
    raise TypeError(f"sample ids must be str, bytes or int, got {type(sample_id).__name__}")


def sample_rng(seed: int, spec: CorruptionSpec, sample_id: Any) -> np.random.Generator:
    """The stream of one sample: a function of (seed, name, modality, level, sample_id) only."""
    key = "\x1f".join((spec.name, spec.modality, repr(float(spec.level)), _id_text(sample_id)))
    digest = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=16).digest(), "little")
    return np.random.default_rng(np.random.SeedSequence([seed, digest]))


def accepts_dtype(spec: CorruptionSpec, dtype: Any) -> bool:
    """Whether ``spec`` can corrupt arrays of ``dtype`` (a numpy dtype or its name, e.g. a manifest's ``"uint8"``)."""
    dtype = np.dtype(dtype)
    return dtype.name in spec.accepts or dtype.kind in spec.accepts


def _checked_input(arrays: dict[str, np.ndarray], spec: CorruptionSpec, rows: int) -> np.ndarray:
    if spec.modality not in arrays:
        raise CorruptionError(f"{spec.name}: modality {spec.modality!r} is not in the batch (keys: {sorted(arrays)})")
    x = np.asarray(arrays[spec.modality])
    if x.ndim == 0 or x.shape[0] != rows:
        raise CorruptionError(f"{spec.modality}: {x.shape[:1]} rows for {rows} sample ids")
    if not accepts_dtype(spec, x.dtype):
        raise CorruptionError(
            f"{spec.name} cannot corrupt {spec.modality!r} of dtype {x.dtype}; "
            f"it takes {'/'.join(spec.accepts)} (dtype name or numpy kind)"
        )
    return x


def apply_corruption(
    arrays: dict[str, np.ndarray], sample_ids: Sequence[Any], plan: CorruptionPlan | dict[str, Any]
) -> dict[str, np.ndarray]:
    """Corrupt the modalities named in ``plan``; the input arrays are never modified.

    Returns a new dict: each corrupted modality is a fresh array (a copy even at level 0 or
    p = 0, equal to the input); every other key is passed through by reference. Row ``i`` of
    every array belongs to ``sample_ids[i]``.
    """
    if not isinstance(plan, CorruptionPlan):
        plan = CorruptionPlan.model_validate(plan)
    ids = [_id_text(s) for s in sample_ids]
    out = dict(arrays)
    for spec in plan.corruptions:
        x = _checked_input(out, spec, len(ids))
        bound = spec.bind(x.shape[1:])  # at every level, so an unresolved spec fails even at level 0
        y = x.copy()
        if spec.level > 0 and spec.p > 0:
            corrupt = CORRUPTIONS[spec.name][1]
            for i, sample_id in enumerate(ids):
                rng = sample_rng(plan.seed, spec, sample_id)
                # The selection draw comes first and is always made: the noise of a sample does
                # not depend on p, and raising p only adds corrupted samples.
                if rng.random() < spec.p:
                    y[i] = corrupt(x[i], rng, bound)
        out[spec.modality] = y
    return out


def corrupt_batch(
    batch: dict[str, np.ndarray], plan: CorruptionPlan, id_key: str = "sample_id"
) -> dict[str, np.ndarray]:
    """``ds.map_batches(corrupt_batch, fn_kwargs={"plan": plan})``: ids come from the batch's ``id_key`` column."""
    if id_key not in batch:
        raise CorruptionError(f"batch has no {id_key!r} column; select it when reading the shards")
    return apply_corruption(batch, list(batch[id_key]), plan)
