"""What many test modules share: the repository paths, a small synthetic spec, a recipe over
given shards and a free TCP port. Fixtures stay in ``conftest.py``; plain helpers live here so
test modules import them by name (``from helpers import recipe_dict``) instead of from conftest.

Submodules: ``convert`` (read converted shards back, train one epoch on them), ``media`` and
``text`` (generated WAV/JPEG/video files and a local tokenizer), ``cremad_tree`` (a tiny CREMA-D
fixture tree), ``wandb_offline`` (read an offline W&B run back), ``distributed`` (run gloo ranks
and compare them with one process), ``ray_resources`` (wait for
Ray's resources to return) and ``study_rows`` (hand-made study results).
"""

from __future__ import annotations

import socket
from pathlib import Path

import yaml

from mmbalance.data.synthetic import SyntheticModality, SyntheticSpec

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO.parent / "shared" / "data"


def small_spec(modalities: int = 2, seed: int = 0) -> SyntheticSpec:
    names = ["audio", "visual", "text"][:modalities]
    signals = [0.55, 0.22, 0.3]
    return SyntheticSpec(
        samples={"train": 512, "val": 128, "test": 128},
        classes=4,
        modalities={m: SyntheticModality(dim=8, signal=s * 2) for m, s in zip(names, signals)},
        seed=seed,
    )


def recipe_dict(shards: Path, modalities=("audio", "visual"), **sections) -> dict:
    recipe = yaml.safe_load((REPO / "trainables" / "synthetic.yaml").read_text())
    recipe["data"]["path"] = str(shards)
    recipe["modalities"] = {m: {"encoder": "mlp", "params": {"hidden": [16], "out_dim": 8}} for m in modalities}
    recipe["schedule"] = {"epochs": 3, "batch_size": 32}
    recipe["eval"] = {"batch_size": 64}
    recipe["tracking"] = {"wandb": "disabled"}  # tests that check W&B turn it on themselves
    for key, value in sections.items():
        recipe[key] = value
    return recipe


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
