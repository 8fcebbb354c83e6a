"""Tokenisation shared by the image+text converters (MVSA-Single, UPMC Food-101).

Text is stored as int64 token ids ``[max_length]``: ``[CLS] tokens [SEP] [PAD]...``, truncated on
the right and padded on the right to exactly ``max_length`` (the ``text`` encoder reads the
``[CLS]`` position and masks ``pad`` ids). The tokenizer is a *local* transformers tokenizer
directory, e.g. ``bert-base-uncased`` as saved by ``AutoTokenizer.save_pretrained``; nothing is
ever downloaded. It is loaded with ``AutoTokenizer.from_pretrained(path, local_files_only=True)``;
a directory holding only ``vocab.txt`` (the pytorch_pretrained_bert layout MNL's code loads) is
read as a lower-casing WordPiece ``BertTokenizer``.

``max_length`` defaults to 128: MVSA tweets and Food-101 page titles are far shorter, and the
BERT cost grows with it. MNL's code truncates at 512 (BERT's limit): set ``max_length: 512`` to
match it exactly.

The manifest records the tokenizer (``preprocessing.tokenizer``): its path, a sha256 over its
files (so shards made with another tokenizer show it), its class, vocabulary size and the
special ids that recipes need: ``text_encoder`` (``vocab_size``, ``pad_token_id``) and
``word_replace`` (``pad_id``, ``replacement_id`` = [UNK], ``keep_ids`` = [CLS], [SEP]).

The two converters compose ``TextEncoding`` with ``image_text_outputs`` / ``image_text_features``.
Converters must pickle (Ray tasks): ``TextEncoding`` holds only the resolved path and the
expected digest; the tokenizer itself lives in a per-process cache. A worker whose copy of the
tokenizer directory differs from the driver's (another node, other files) fails loudly instead of
writing different ids.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from mmbalance.data.convert.base import ModalityOutput
from mmbalance.data.convert.media import IMAGENET_MEAN, IMAGENET_STD, ImageParams, load_image
from mmbalance.data.manifest import ModalitySpec

# Hashed into the tokenizer digest when present (the BERT files plus the other common
# tokenizer files, so a BPE or SentencePiece tokenizer's vocabulary is covered too).
TOKENIZER_FILES = (
    "added_tokens.json",
    "merges.txt",
    "sentencepiece.bpe.model",
    "special_tokens_map.json",
    "spiece.model",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "vocab.json",
    "vocab.txt",
)
LOADABLE = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")  # at least one must exist

_CACHE: dict[str, tuple[str, Any]] = {}  # resolved path -> (digest, tokenizer); one per process


class TextParams(BaseModel):
    """Settings of every text dataset (flat in the converter's settings: ``tokenizer``, ``max_length``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    tokenizer: str = Field(
        min_length=1,
        description="local transformers tokenizer directory "
        "(e.g. a saved bert-base-uncased); required, nothing is downloaded",
    )
    max_length: int = Field(
        128,
        ge=2,
        description="token ids per text incl. [CLS]/[SEP]; truncated or "
        "padded to exactly this (MNL's code uses up to 512)",
    )


class ImageTextParams(TextParams):
    image: ImageParams = ImageParams()


def tokenizer_dir(path: str | Path) -> Path:
    """The resolved tokenizer directory; FileNotFoundError when it is absent or holds no tokenizer."""
    given = Path(path).expanduser()
    hint = (
        "set `tokenizer` (or --tokenizer) to a local directory saved by "
        "AutoTokenizer.from_pretrained(...).save_pretrained(DIR); nothing is downloaded"
    )
    if not given.is_dir():
        raise FileNotFoundError(f"{path}: tokenizer directory does not exist; {hint}")
    if not any((given / name).is_file() for name in LOADABLE):
        raise FileNotFoundError(f"{path}: not a tokenizer directory (none of {', '.join(LOADABLE)} in it); {hint}")
    return given.resolve()


def tokenizer_files(directory: Path) -> list[str]:
    return [name for name in TOKENIZER_FILES if (directory / name).is_file()]


def tokenizer_digest(directory: Path) -> str:
    """sha256 over ``name  sha256(bytes)`` lines of the tokenizer files present, in name order."""
    lines = [
        f"{name}  {hashlib.sha256((directory / name).read_bytes()).hexdigest()}\n"
        for name in tokenizer_files(directory)
    ]
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def _load(directory: Path, digest: str | None = None):
    """The tokenizer at ``directory`` (cached per process); checks it still has ``digest``."""
    key = str(directory)
    if key in _CACHE:
        cached_digest, tokenizer = _CACHE[key]
        if digest is None or digest == cached_digest:
            return cached_digest, tokenizer
    found = tokenizer_digest(directory)
    if digest is not None and found != digest:
        raise RuntimeError(
            f"{directory}: tokenizer files differ from the ones this conversion started with "
            f"(sha256 {found[:12]} here, {digest[:12]} on the driver); every node must hold "
            f"the same tokenizer at this path"
        )
    tokenizer = _from_pretrained(directory)
    tokenizer.padding_side = "right"  # the text encoder reads position 0 ([CLS]) and masks pads
    tokenizer.truncation_side = "right"
    _CACHE[key] = (found, tokenizer)
    return found, tokenizer


def _from_pretrained(directory: Path):
    from transformers import AutoTokenizer, BertTokenizer

    vocab_only = not any((directory / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))
    try:
        if vocab_only:  # pytorch_pretrained_bert layout: vocab.txt next to the weights
            return BertTokenizer.from_pretrained(str(directory), local_files_only=True)
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{directory}: cannot load the tokenizer ({err})") from err


class TextEncoding:
    """Text -> int64 ids ``[max_length]`` with one tokenizer. Picklable: ``prepare`` (on the
    driver) resolves the path, hashes and loads the tokenizer once, so a bad path fails before
    any decoding; workers reload it lazily from the per-process cache."""

    def __init__(self, params: TextParams):
        self.params = params
        self._dir: Path | None = None
        self._digest: str | None = None

    def prepare(self) -> None:
        directory = tokenizer_dir(self.params.tokenizer)
        digest, tokenizer = _load(directory)
        if tokenizer.pad_token_id is None:
            raise ValueError(
                f"{self.params.tokenizer}: the tokenizer has no pad token; texts cannot be padded to max_length"
            )
        limit = getattr(tokenizer, "model_max_length", None)
        if isinstance(limit, int) and 0 < limit < self.params.max_length:
            raise ValueError(f"max_length {self.params.max_length} exceeds the tokenizer's model_max_length {limit}")
        self._dir, self._digest = directory, digest

    def tokenizer(self):
        if self._dir is None:
            self.prepare()
        return _load(self._dir, self._digest)[1]

    def encode(self, text: str) -> np.ndarray:
        ids = self.tokenizer()(
            text,
            truncation=True,
            max_length=self.params.max_length,
            padding="max_length",
            return_attention_mask=False,
            return_token_type_ids=False,
        )["input_ids"]
        return np.asarray(ids, dtype=np.int64)

    def info(self) -> dict[str, Any]:
        """What the manifest records about the tokenizer."""
        tok = self.tokenizer()
        pad, unk, cls, sep = tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id
        return {
            "path": self.params.tokenizer,
            "sha256": self._digest,
            "files": tokenizer_files(self._dir),
            "class": type(tok).__name__,
            "vocab_size": len(tok),
            "pad_id": pad,
            "unk_id": unk,
            "cls_id": cls,
            "sep_id": sep,
            "max_length": self.params.max_length,
            "text_encoder": {"vocab_size": len(tok), "pad_token_id": pad},
            "word_replace": {
                "pad_id": pad,
                "replacement_id": unk,
                "keep_ids": sorted({i for i in (cls, sep) if i is not None}),
            },
        }


def image_text_outputs(params: ImageTextParams) -> dict[str, ModalityOutput]:
    """What both image+text datasets store: ``image`` uint8 ``[3, crop, crop]`` (ImageNet
    normalisation, applied by the model) and ``text`` int64 ids ``[max_length]``."""
    crop = params.image.crop
    return {
        "image": ModalityOutput(
            ModalitySpec(dtype="uint8", shape=[3, crop, crop]), (IMAGENET_MEAN, IMAGENET_STD), axis=0, source="ImageNet"
        ),
        "text": ModalityOutput(ModalitySpec(dtype="int64", shape=[params.max_length]), None),
    }


def image_text_features(
    image_path: str, text: str, params: ImageTextParams, encoding: TextEncoding
) -> dict[str, np.ndarray]:
    return {"image": load_image(image_path, params.image), "text": encoding.encode(text)}


def image_text_preprocessing(encoding: TextEncoding) -> dict[str, Any]:
    return {
        "image": "PIL decode -> RGB -> resize shorter side (bilinear) -> centre crop; no augmentation",
        "text": "tokenizer(text, truncation=True, padding='max_length') -> [CLS] ids [SEP] [PAD]...; "
        "right-truncated, right-padded",
        "tokenizer": encoding.info(),
    }


class ImageTextConverter:
    """What the image+text converters share (MVSA-Single, Food-101): a tokenizer prepared before
    any listing (a bad one fails first), and the ``image``/``text`` outputs. Subclasses list their
    samples and say where a sample's text comes from (``sample_text``)."""

    def __init__(self, params: ImageTextParams) -> None:
        self.params = params
        self.text = TextEncoding(params)

    def outputs(self) -> dict[str, ModalityOutput]:
        return image_text_outputs(self.params)

    def sample_text(self, sample) -> str:
        return sample.text

    def extract(self, sample) -> dict[str, np.ndarray]:
        return image_text_features(sample.files["image"], self.sample_text(sample), self.params, self.text)
