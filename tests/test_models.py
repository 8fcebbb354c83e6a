import pytest
import torch

from mmbalance.models import LateFusion, build_encoder
from mmbalance.objectives import ForwardContext


def _model(fusion, dims=(3, 4, 5), classes=6):
    torch.manual_seed(0)
    encoders = {f"m{i}": build_encoder("mlp", {"hidden": [8], "out_dim": d}, (7,)) for i, d in enumerate(dims)}
    return LateFusion(encoders, classes, fusion=fusion, boost_hidden=8)


def _batch(n=5):
    return {f"m{i}": torch.randn(n, 7) for i in range(3)}


@pytest.mark.parametrize("fusion", ["mean", "sum", "concat", "boost", "pdf"])
def test_outputs_have_per_modality_and_fused_logits(fusion):
    features, out = _model(fusion)(_batch())
    assert {m: f.shape for m, f in features.items()} == {"m0": (5, 3), "m1": (5, 4), "m2": (5, 5)}
    assert all(z.shape == (5, 6) for z in out.unimodal_logits.values())
    assert out.fused_logits.shape == (5, 6)
    assert all(len(v) == 1 for v in out.head_logits.values())


def test_mean_fusion_is_the_mean_of_unimodal_logits():
    _, out = _model("mean")(_batch())
    torch.testing.assert_close(out.fused_logits, torch.stack(list(out.unimodal_logits.values())).mean(0))


def test_concat_unimodal_logits_zero_out_the_other_modalities():
    model = _model("concat")
    features, out = model(_batch())
    zeros = {m: torch.zeros_like(f) for m, f in features.items()}
    for m in features:
        only_m = dict(zeros, **{m: features[m]})
        full = model.shared_head(torch.cat([only_m[k] for k in model.modalities], dim=1))
        torch.testing.assert_close(out.unimodal_logits[m], full)
    torch.testing.assert_close(out.fused_logits, model.shared_head(torch.cat(list(features.values()), dim=1)))


def test_feature_scales_multiply_features_before_the_heads():
    model = _model("concat")
    features = model.encode(_batch())
    scaled = model.heads_forward(features, ForwardContext(feature_scales={"m0": 2.0}))
    manual = model.heads_forward(dict(features, m0=features["m0"] * 2.0))
    torch.testing.assert_close(scaled.fused_logits, manual.fused_logits)


def test_boost_add_head_grows_the_ensemble_and_returns_its_parameters():
    model = _model("boost")
    features = model.encode(_batch())
    before = model.heads_forward(features)
    params = model.add_head("m1")
    after = model.heads_forward(features)
    assert len(after.head_logits["m1"]) == 2 and model.head_counts()["m1"] == 2
    torch.testing.assert_close(after.unimodal_logits["m1"], before.unimodal_logits["m1"] + after.head_logits["m1"][1])
    assert {id(p) for p in params} == {id(p) for p in model.heads["m1"][1].parameters()}


def test_add_head_requires_boost_fusion():
    with pytest.raises(RuntimeError, match="fusion=boost"):
        _model("mean").add_head("m0")


def test_cnn_resnet_and_text_encoders_produce_features():
    cnn = build_encoder("cnn", {"channels": [4, 8], "out_dim": 6}, (12, 20))
    assert cnn(torch.randn(2, 12, 20)).shape == (2, 6)
    frames = build_encoder("resnet18", {}, (2, 3, 32, 32))
    assert frames(torch.randn(2, 2, 3, 32, 32)).shape == (2, 512)
    spectrogram = build_encoder("resnet18", {}, (32, 40))
    assert spectrogram(torch.randn(2, 32, 40)).shape == (2, 512)
    text = build_encoder("text", {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "vocab_size": 50}, (12,))
    ids = torch.randint(1, 50, (2, 12))
    assert text(ids).shape == (2, 16)


@pytest.mark.parametrize("fusion", ["mean", "sum", "concat", "boost", "pdf"])
def test_one_modality_is_a_unimodal_model_whose_fused_logits_are_its_own(fusion):
    model = LateFusion({"a": build_encoder("mlp", {}, (3,))}, 2, fusion=fusion, boost_hidden=4)
    _, out = model({"a": torch.randn(5, 3)})
    torch.testing.assert_close(out.fused_logits, out.unimodal_logits["a"])
    with pytest.raises(ValueError, match="at least one modality"):
        LateFusion({}, 2)


def test_normalized_encoder_standardises_per_channel_before_the_encoder():
    import torch
    from torch import nn

    from mmbalance.models.normalize import NormalizedEncoder

    class Probe(nn.Module):
        out_dim = 1

        def forward(self, x):
            self.seen = x
            return x.flatten(1)[:, :1]

    probe = Probe()
    enc = NormalizedEncoder(probe, (2, 3, 4, 4), mean=[10.0, 20.0, 30.0], std=[2.0, 4.0, 5.0], axis=1)
    x = torch.randint(0, 255, (5, 2, 3, 4, 4), dtype=torch.uint8)
    enc(x)
    expected = (x.float() - torch.tensor([10.0, 20.0, 30.0]).view(1, 1, 3, 1, 1)) / torch.tensor([2.0, 4.0, 5.0]).view(
        1, 1, 3, 1, 1
    )
    torch.testing.assert_close(probe.seen, expected)
    assert enc.out_dim == 1


def test_manifest_normalisation_must_fit_the_shape():
    import pytest
    from pydantic import ValidationError

    from mmbalance.data.manifest import ModalitySpec

    ModalitySpec(dtype="uint8", shape=[3, 8, 8], normalize={"mean": [1, 2, 3], "std": [1, 1, 1], "axis": 0})
    with pytest.raises(ValidationError, match="axis 1 of shape"):
        ModalitySpec(dtype="uint8", shape=[3, 8, 8], normalize={"mean": [1, 2, 3], "std": [1, 1, 1], "axis": 1})
    with pytest.raises(ValidationError, match="std must be > 0"):
        ModalitySpec(dtype="float32", shape=[4], normalize={"mean": [0], "std": [0]})


def test_model_built_from_a_normalised_manifest_applies_it(tmp_path):
    from helpers import recipe_dict
    from mmbalance.config import validate_recipe
    from mmbalance.data.manifest import Manifest
    from mmbalance.engine.build import build_model
    from mmbalance.models.normalize import NormalizedEncoder

    manifest = Manifest(
        dataset="t",
        classes=["a", "b"],
        splits={},
        modalities={
            "audio": {"dtype": "float32", "shape": [8], "normalize": {"mean": [3.0], "std": [2.0]}},
            "visual": {"dtype": "float32", "shape": [8]},
        },
    )
    model = build_model(validate_recipe(recipe_dict(tmp_path)), manifest)
    assert isinstance(model.encoders["audio"], NormalizedEncoder)
    assert not isinstance(model.encoders["visual"], NormalizedEncoder)
    assert model.encoders["audio"].mean.flatten().tolist() == [3.0]
