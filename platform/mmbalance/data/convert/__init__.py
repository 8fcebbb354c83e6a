"""The dataset table behind ``mmbalance prepare DATASET [--root RAW] --out SHARDS``.

Every dataset ``prepare`` knows is one entry here. Two kinds:

- a *pipeline* converter (cremad, ave, ...): a class implementing ``base.Converter`` that the
  Ray Data pipeline (``pipeline.convert``) runs over chunks of samples; its nested settings come
  from ``--set KEY=VALUE``;
- an *in-memory* writer (synthetic, avdigits): small enough to build every split in one
  process; a class with a flat ``Params`` model (one ``--flag`` per field) and
  ``write(root, out, *, overwrite) -> Manifest``.

Each module holds one dataset's raw layout (documented in its docstring and in
docs/datasets.md) and a pydantic ``Params`` model with every setting. Modules are imported on
demand, so listing the datasets costs nothing and a converter's heavy imports (PyAV,
transformers) load only when it runs.
"""

from __future__ import annotations

import importlib
from typing import Any, NamedTuple

from pydantic import ValidationError

RAW_TREE = "the dataset folder, in the layout it is distributed in"


class Entry(NamedTuple):
    target: str  # "module:Class"
    help: str  # one line for `mmbalance prepare --help`
    text: bool = False  # tokenises text: takes a local tokenizer (`--tokenizer`)
    in_memory: bool = False  # writes every split itself in one process (no Ray Data pipeline)
    root: str | None = RAW_TREE  # help of --root; None: generated, reads no raw tree
    # Tensor column layout of the shards (``ModalitySpec.encoding``) unless --encoding says otherwise:
    # the papers' benchmarks are streamed by Ray Data every epoch, so they get the fast-reading raw
    # bytes; the two small in-memory datasets keep ``tensor``, so their files stay byte-identical.
    encoding: str = "bytes"


CONVERTERS = {
    "synthetic": Entry(
        "mmbalance.data.synthetic:SyntheticWriter",
        "the embedded seeded synthetic dataset",
        in_memory=True,
        root=None,
        encoding="tensor",
    ),
    "avdigits": Entry(
        "mmbalance.data.avdigits:AvdigitsWriter",
        "spoken digits (FSDD) + MNIST digits, paired by pairs.csv",
        in_memory=True,
        root="the fsdd_mnist folder (pairs.csv, audio/, image/)",
        encoding="tensor",
    ),
    "cremad": Entry(
        "mmbalance.data.convert.cremad:CremadConverter",
        "CREMA-D audio-visual emotion (AudioWAV/*.wav + VideoFlash/*.flv), 6 classes",
    ),
    "ave": Entry(
        "mmbalance.data.convert.ave:AveConverter",
        "AVE audio-visual events (AVE/*.mp4 + Annotations.txt + train/val/testSet.txt), 28 classes",
    ),
    "kinetics_sounds": Entry(
        "mmbalance.data.convert.kinetics_sounds:KineticsSoundsConverter",
        "Kinetics-Sounds (Kinetics layout: annotations/*.csv + train/ val/ mp4 clips)",
    ),
    "mvsa_single": Entry(
        "mmbalance.data.convert.mvsa:MvsaSingleConverter",
        "MVSA-Single image+text sentiment (train/dev/test.jsonl, or data/ + labelResultAll.txt)",
        text=True,
    ),
    "food101": Entry(
        "mmbalance.data.convert.food101:Food101Converter",
        "UPMC Food-101 image+text (images/{train,test}/<class>/ + texts/*_titles.csv), 101 classes",
        text=True,
    ),
}


def pipeline_converters() -> list[str]:
    """The datasets converted by the Ray Data pipeline (each has a ``base.Converter`` class)."""
    return [name for name, entry in CONVERTERS.items() if not entry.in_memory]


def converter_class(name: str):
    if name not in CONVERTERS:
        raise KeyError(f"unknown dataset {name!r}; known: {sorted(CONVERTERS)}")
    module, _, cls = CONVERTERS[name].target.partition(":")
    return getattr(importlib.import_module(module), cls)


def build_converter(name: str, settings: dict[str, Any] | None = None):
    """A converter (or in-memory writer) with validated params; a bad setting raises ValueError
    naming the key."""
    cls = converter_class(name)
    try:
        params = cls.Params.model_validate(settings or {})
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {'unknown setting' if e['type'] == 'extra_forbidden' else e['msg']}"
            for e in err.errors()
        )
        raise ValueError(f"{name} settings: {problems}") from None
    return cls(params)
