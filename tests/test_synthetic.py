"""The embedded synthetic generator: version-1 reproduction, the XOR-coded weak modality, and
the gap it is built for (docs/datasets.md, "The embedded synthetic default")."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from helpers import REPO
from mmbalance.cli import main
from mmbalance.config import validate_recipe
from mmbalance.data.manifest import read_manifest
from mmbalance.data.shards import load_split
from mmbalance.data.synthetic import GENERATOR_VERSION, SyntheticModality, SyntheticSpec, generate, prepare_synthetic
from mmbalance.engine.loop import run_training
from mmbalance.engine.run_spec import RunSpec

V1_ARGS = ["--samples", "200", "--val-samples", "50", "--test-samples", "50", "--classes", "4", "--dim", "8"]
# Written by the version-1 code (before the XOR code existed) with `prepare synthetic` + V1_ARGS.
# The file hashes hold for the pinned pyarrow (constraints.txt); the content hash for any.
V1_CONTENT_SHA256 = "7ec31b333216eff1809bd09ac4f4ad9a1b89a7e7a66bd592344a5c3d960f59c4"
V1_FILE_SHA256 = {
    "manifest.json": "d484b6f4da159c1bb2cd88fe42a1baaf55b28ab2308705cb15066203544df84b",
    "test/part-00000.parquet": "ed003fca5e5c095246ea98b7e59725c4ea16acbc86a4c3a5de2a6d5fa858aa71",
    "train/part-00000.parquet": "ea90e3a56e679631c971f207aa130a2418211a25898905dd4bdaa5766af04a38",
    "val/part-00000.parquet": "b64e07c9f6e24d62d1300c29d4faada1099a1d97ec0ed74f6d651b89b1e40164",
}


def _content_sha256(shards: Path) -> str:
    """Manifest provenance plus every decoded id, label and feature (independent of the Parquet writer)."""
    manifest = read_manifest(shards)
    digest = hashlib.sha256(json.dumps([manifest.generator, manifest.preprocessing], sort_keys=True).encode())
    for split in ("train", "val", "test"):
        arrays = load_split(shards, manifest, split)
        digest.update("\n".join(arrays.sample_ids).encode())
        digest.update(arrays.labels.astype("<i8").tobytes())
        for m in sorted(arrays.modalities):
            digest.update(arrays.modalities[m].astype("<f4").tobytes())
    return digest.hexdigest()


def test_generator_v1_flag_reproduces_the_version_1_bytes(tmp_path):
    out = tmp_path / "v1"
    assert main(["prepare", "synthetic", "--generator", "v1", "--out", str(out), *V1_ARGS]) == 0
    assert _content_sha256(out) == V1_CONTENT_SHA256
    files = {
        p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in out.rglob("*") if p.is_file()
    }
    assert files == V1_FILE_SHA256
    assert read_manifest(out).generator == {"name": "mmbalance.data.synthetic", "version": 1}


def test_default_is_version_2_and_the_manifest_says_so(tmp_path):
    out = tmp_path / "v2"
    assert main(["prepare", "synthetic", "--out", str(out), *V1_ARGS]) == 0
    manifest = read_manifest(out)
    assert GENERATOR_VERSION == 2 and manifest.generator == {"name": "mmbalance.data.synthetic", "version": 2}
    assert manifest.preprocessing["modalities"]["visual"]["xor_pairs"] == 4  # --dim 8 keeps 8 // 2 of the 10 pairs
    assert "xor_pairs" not in manifest.preprocessing["modalities"]["audio"]  # a prototype, as in version 1
    assert _content_sha256(out) != V1_CONTENT_SHA256


def _xor_spec(seed: int) -> SyntheticSpec:
    return SyntheticSpec(
        samples={"train": 64, "val": 16, "test": 16},
        classes=4,
        seed=seed,
        modalities={
            "audio": SyntheticModality(dim=4, signal=1.0),
            "visual": SyntheticModality(dim=6, signal=1.0, xor_pairs=2, blank=0.1),
        },
    )


def test_same_seed_gives_byte_identical_xor_shards_and_other_seeds_differ(tmp_path):
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        prepare_synthetic(tmp_path / name, _xor_spec(seed))
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert files
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    assert (tmp_path / "a" / "manifest.json").read_bytes() != (tmp_path / "c" / "manifest.json").read_bytes()


def test_xor_code_lives_in_pair_products_and_distinct_codes_per_class():
    spec = _xor_spec(0).model_copy(update={"samples": {"train": 2000, "val": 16, "test": 16}})
    train = generate(spec)["train"]
    x, y = train.modalities["visual"].astype(np.float64), train.labels
    products = np.sign(x[:, 0:4:2] * x[:, 1:4:2])  # [N, K]: noisy code bits
    codes = np.stack([np.sign(products[y == c].mean(0)) for c in range(spec.classes)])  # [C, K]
    assert len({tuple(c) for c in codes}) == spec.classes  # 2 pairs, 4 classes: every code used once
    class_means = np.stack([x[y == c].mean(0) for c in range(spec.classes)])  # [C, D]
    assert np.abs(class_means).max() < 0.25  # no coordinate alone tells the class (a linear readout is blind)


def _ridge_test_acc(features, splits, classes: int) -> float:
    """One-vs-all least squares on ``features(modalities)``: a linear readout, fit on train."""
    xtr, xte = (np.c_[features(splits[s].modalities), np.ones(len(splits[s]))] for s in ("train", "test"))
    weights = np.linalg.solve(
        xtr.T @ xtr + 1e-3 * np.eye(xtr.shape[1]), xtr.T @ np.eye(classes)[splits["train"].labels]
    )
    return float(((xte @ weights).argmax(1) == splits["test"].labels).mean())


def test_default_weak_modality_needs_a_nonlinear_readout_and_the_dominant_one_does_not():
    spec = SyntheticSpec()
    splits = generate(spec)
    k = spec.modalities["visual"].xor_pairs
    linear = _ridge_test_acc(lambda m: m["visual"], splits, spec.classes)
    pair_products = _ridge_test_acc(
        lambda m: m["visual"][:, 0 : 2 * k : 2] * m["visual"][:, 1 : 2 * k : 2], splits, spec.classes
    )
    audio = _ridge_test_acc(lambda m: m["audio"], splits, spec.classes)
    assert linear < 0.15  # chance is 0.10
    assert pair_products > 0.5
    assert audio > 0.65


def test_spec_refuses_xor_codes_it_cannot_make():
    with pytest.raises(ValueError, match="needs dim >= 20"):
        SyntheticModality(dim=16, signal=1.0, xor_pairs=10)
    with pytest.raises(ValueError, match="4 distinct codes for 10 classes"):
        SyntheticSpec(modalities={"audio": {"signal": 1.0}, "visual": {"dim": 4, "signal": 1.0, "xor_pairs": 2}})
    with pytest.raises(ValueError, match="needs generator version 2"):
        SyntheticSpec(version=1, modalities={"audio": {"signal": 1.0}, "visual": {"signal": 1.0, "xor_pairs": 4}})
    with pytest.raises(ValueError, match="needs dim >= 2"):
        SyntheticSpec().modalities["visual"].resized(1)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny MLP: more threads only contend on a shared machine
    yield
    torch.set_num_threads(threads)


def test_joint_training_leaves_the_default_weak_modality_15_points_below_its_unimodal_ceiling(tmp_path, one_thread):
    """The shipped recipe (12 epochs) on the default data, seed 0: visual alone vs visual inside
    joint training (fused CE only, concat head). Measured 0.490 vs 0.303 (audio in fusion 0.735)."""
    shards = tmp_path / "default"
    prepare_synthetic(shards)
    tree = yaml.safe_load((REPO / "trainables" / "synthetic.yaml").read_text())
    tree["data"]["path"] = str(shards)
    tree["eval"] = {"batch_size": 512}  # accuracies only; corruption sweeps play no part here
    tree["tracking"] = {"wandb": "disabled"}
    joint = {**tree, "model": {"fusion": "concat"}, "objective": {"name": "lf", "omega": 0.0}}
    alone = {**tree, "modalities": {"visual": tree["modalities"]["visual"]}}
    accs = {}
    for name, recipe in (("joint", joint), ("alone", alone)):
        accs[name] = run_training(RunSpec.of(validate_recipe(recipe), tmp_path / name, verbose=False))["test"][
            "acc_per_modality"
        ]
    assert accs["alone"]["visual"] - accs["joint"]["visual"] >= 0.15
    assert accs["joint"]["audio"] - accs["joint"]["visual"] >= 0.3  # audio stays dominant
