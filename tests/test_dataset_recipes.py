"""Each dataset recipe in trainables/ fits what its converter produces (modality names, input
shapes, splits), builds its model at the converter's default shapes, and the CREMA-D recipe trains
on a converted fixture as shipped (only the data path, epochs and batch size changed)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from helpers import REPO
from mmbalance.config import check_against_data, load_recipe
from mmbalance.data.convert import CONVERTERS, build_converter, pipeline_converters
from mmbalance.data.manifest import Manifest, ShardFile, SplitInfo
from mmbalance.engine.build import build_model

TEXT_SETTINGS = {"tokenizer": str(REPO)}  # any existing directory: listing is never run here


def _default_manifest(name: str) -> Manifest:
    converter = build_converter(name, TEXT_SETTINGS if CONVERTERS[name].text else {})
    modalities = {m: out.spec for m, out in converter.outputs().items()}
    rows = 1000  # a dataset of a usable size: the check also compares split sizes with the batch
    files = lambda s: [ShardFile(path=f"{s}/part-00000.parquet", rows=rows, sha256="0" * 64)]  # noqa: E731
    return Manifest(
        dataset=name,
        classes=["a", "b", "c"],
        modalities=modalities,
        splits={s: SplitInfo(rows=rows, files=files(s)) for s in ("train", "val", "test")},
    )


@pytest.mark.parametrize("name", sorted(pipeline_converters()))
def test_recipe_matches_its_converter_and_builds(name):
    recipe = load_recipe(
        REPO / "trainables" / f"{name}.yaml",
        [f"modalities.{m}.params.model_path=null" for m in ("text",) if CONVERTERS[name].text],
    )
    manifest = _default_manifest(name)
    check_against_data(recipe, manifest)
    model = build_model(recipe, manifest).eval()
    batch = {
        m: torch.zeros(2, *spec.shape, dtype=getattr(torch, spec.dtype)) for m, spec in manifest.modalities.items()
    }
    with torch.no_grad():
        _, heads = model(batch)
    assert heads.fused_logits.shape == (2, 3)


@pytest.mark.integration
def test_shipped_cremad_recipe_trains_on_a_converted_fixture(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent / "data"))
    from helpers.cremad_tree import SMALL, make_tree
    from mmbalance.data.convert.pipeline import convert
    from mmbalance.engine.evaluation import evaluate_run
    from mmbalance.engine.loop import run_training
    from mmbalance.engine.run_spec import RunSpec

    make_tree(tmp_path / "raw", actors=(1001, 1002))
    convert(
        build_converter("cremad", SMALL), tmp_path / "raw", tmp_path / "shards", engine="local", progress=lambda _: None
    )
    recipe = load_recipe(
        REPO / "trainables" / "cremad.yaml",
        [f"data.path={tmp_path / 'shards'}", "schedule.epochs=1", "schedule.batch_size=4", "tracking.wandb=disabled"],
    )
    result = run_training(RunSpec(recipe, tmp_path / "run", verbose=False))
    assert set(result["test"]["acc_per_modality"]) == {"audio", "visual"}
    # The recipe's robustness sweeps run on the converted data's dtypes (uint8 frames, float spectrograms).
    scores = evaluate_run(tmp_path / "run", recipe.to_dict())
    expected = {"gaussian_visual_5", "gaussian_visual_10", "audio_snr_audio_10", "audio_snr_audio_5"}
    assert expected <= set(scores["robustness"])
    assert all(0.0 <= v <= 1.0 for v in scores["robustness"].values())


@pytest.mark.parametrize("name", sorted(pipeline_converters()))
def test_datasets_doc_has_a_section_with_the_default_shapes(name):
    text = (REPO / "docs" / "datasets.md").read_text()
    assert f"\n## {name}\n" in text, f"docs/datasets.md has no section for {name}"
    section = text.split(f"\n## {name}\n", 1)[1].split("\n## ", 1)[0]
    for modality, spec in _default_manifest(name).modalities.items():
        assert f"`{modality}`" in section and str(spec.shape) in section, (name, modality, spec.shape)
    assert f"mmbalance prepare {name} --root" in section
