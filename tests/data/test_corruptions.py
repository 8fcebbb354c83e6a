"""Corruptions: identity at level 0, statistics per level, per-sample seeding, validation."""

from __future__ import annotations

import numpy as np
import pytest

from mmbalance.data.corruptions import (
    CORRUPTIONS,
    CorruptionError,
    CorruptionPlan,
    apply_corruption,
    corrupt_batch,
    make_spec,
    parse_levels,
    sweep_plans,
)

N = 1000
IDS = [f"s{i:05d}" for i in range(N)]


def _batch(n: int = N, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1000, 2000, size=(n, 48))
    lengths = rng.integers(8, 48, size=n)
    tokens[np.arange(48)[None, :] >= lengths[:, None]] = 0  # right padding with pad id 0
    return {
        "visual": rng.uniform(0.2, 0.8, size=(n, 3, 6, 6)).astype(np.float32),
        "photo": rng.integers(1, 255, size=(n, 3, 6, 6), dtype=np.uint8),
        "text": tokens.astype(np.int64),
        "audio": rng.standard_normal((n, 400)).astype(np.float32),
        "label": rng.integers(0, 4, size=n),
    }


def _plan(name: str, modality: str, level: float, seed: int = 0, **fields) -> CorruptionPlan:
    return CorruptionPlan(seed=seed, corruptions=[make_spec(name, modality=modality, level=level, **fields)])


MODALITY = {
    "gaussian": "visual",
    "salt_pepper": "visual",
    "word_replace": "text",
    "audio_snr": "audio",
    "missing": "audio",
    "feature_noise": "audio",
}
SOME_LEVEL = {"gaussian": 5, "salt_pepper": 5, "word_replace": 5, "audio_snr": 10, "missing": 1, "feature_noise": 1}
FIELDS = {"feature_noise": {"std": [0.5]}}  # a resolved spec: one std for every feature


def _changed(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    return (before != after).reshape(len(before), -1).any(axis=1)  # [B]


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_level_zero_is_the_exact_identity(name):
    batch = _batch(64)
    out = apply_corruption(batch, IDS[:64], _plan(name, MODALITY[name], 0, p=1.0, **FIELDS.get(name, {})))
    np.testing.assert_array_equal(out[MODALITY[name]], batch[MODALITY[name]])
    assert out[MODALITY[name]] is not batch[MODALITY[name]]


def test_gaussian_noise_std_is_ten_epsilon_pixels_on_about_p_of_the_samples():
    batch = _batch()
    for level in (1, 2):
        out = apply_corruption(batch, IDS, _plan("gaussian", "visual", level, p=0.5))
        hit = _changed(batch["visual"], out["visual"])
        assert abs(hit.mean() - 0.5) < 0.05
        noise = (out["visual"] - batch["visual"])[hit]  # images in [0.2, 0.8]: clipping is negligible
        assert abs(noise.std() / (10 * level / 255) - 1) < 0.03
        assert abs(noise.mean()) < 0.002


def test_gaussian_on_uint8_uses_pixel_units_and_pixel_range_rescales_floats():
    batch = _batch()
    out = apply_corruption(batch, IDS, _plan("gaussian", "photo", 1, p=1.0))
    assert out["photo"].dtype == np.uint8
    noise = out["photo"].astype(np.float64) - batch["photo"]
    inner = (batch["photo"] > 40) & (batch["photo"] < 215)
    assert abs(noise[inner].std() / 10 - 1) < 0.03
    scaled = {"visual": batch["visual"] * 255}
    wide = apply_corruption(scaled, IDS, _plan("gaussian", "visual", 1, p=1.0, pixel_range=255))
    assert abs((wide["visual"] - scaled["visual"]).std() / 10 - 1) < 0.03


def test_gaussian_result_is_clipped_to_the_pixel_range():
    batch = _batch(200)
    out = apply_corruption(
        batch,
        IDS[:200],
        CorruptionPlan(
            corruptions=[
                make_spec("gaussian", modality="visual", level=30, p=1.0),
                make_spec("gaussian", modality="photo", level=30, p=1.0),
            ]
        ),
    )
    assert out["visual"].min() == 0.0 and out["visual"].max() == 1.0
    assert out["photo"].min() == 0 and out["photo"].max() == 255


def test_salt_pepper_sets_exactly_round_epsilon_percent_of_pixels_to_min_or_max():
    batch = _batch(400)
    out = apply_corruption(batch, IDS[:400], _plan("salt_pepper", "visual", 10, p=0.5))
    hit = _changed(batch["visual"], out["visual"])
    assert abs(hit.mean() - 0.5) < 0.08
    changed = out["visual"] != batch["visual"]  # [B, 3, 6, 6]; inputs lie in (0, 1)
    assert (changed[hit].reshape(hit.sum(), -1).sum(axis=1) == round(0.1 * 108)).all()
    values = out["visual"][changed]
    assert set(np.unique(values)) == {0.0, 1.0}
    assert abs((values == 1.0).mean() - 0.5) < 0.05


def test_salt_pepper_with_channel_axis_masks_whole_pixels():
    batch = _batch(50)
    out = apply_corruption(batch, IDS[:50], _plan("salt_pepper", "photo", 25, p=1.0, channel_axis=0))
    changed = out["photo"] != batch["photo"]  # [B, 3, 6, 6]
    pixels = changed.any(axis=1)  # [B, 6, 6]
    assert (pixels.reshape(50, -1).sum(axis=1) == 9).all()
    both = out["photo"].transpose(0, 2, 3, 1)[pixels]  # [K, 3]: one value across channels
    assert ((both == 0).all(axis=1) | (both == 255).all(axis=1)).all()


def test_word_replacement_rate_is_epsilon_over_ten_and_pads_stay():
    batch = _batch()
    out = apply_corruption(batch, IDS, _plan("word_replace", "text", 5, p=0.5))
    hit = _changed(batch["text"], out["text"])
    assert abs(hit.mean() - 0.5) < 0.05
    real = batch["text"][hit] != 0
    replaced = out["text"][hit] == 100
    assert abs(replaced[real].mean() - 0.5) < 0.02
    assert not replaced[~real].any()
    np.testing.assert_array_equal(out["text"] == 0, batch["text"] == 0)
    changed = out["text"] != batch["text"]
    assert (out["text"][changed] == 100).all()


def test_word_replace_honours_replacement_and_kept_ids():
    tokens = np.tile(np.array([[101, 7, 8, 9, 102, 0]]), (200, 1))
    out = apply_corruption(
        {"t": tokens}, IDS[:200], _plan("word_replace", "t", 10, p=1.0, replacement_id=1, keep_ids=(101, 102))
    )
    np.testing.assert_array_equal(out["t"], np.tile(np.array([[101, 1, 1, 1, 102, 0]]), (200, 1)))


def test_audio_snr_matches_the_requested_level():
    batch = _batch()
    for snr in (5.0, 20.0):
        out = apply_corruption(batch, IDS, _plan("audio_snr", "audio", snr, p=0.5))
        hit = _changed(batch["audio"], out["audio"])
        assert abs(hit.mean() - 0.5) < 0.05
        x = batch["audio"][hit].astype(np.float64)
        noise = out["audio"][hit] - x
        measured = 10 * np.log10((x**2).mean(axis=1) / (noise**2).mean(axis=1))  # [hit]
        assert abs(measured.mean() - snr) < 0.5
        assert np.abs(measured - snr).max() < 0.05


def test_missing_zeroes_the_modality_exactly():
    batch = _batch(64)
    out = apply_corruption(
        batch,
        IDS[:64],
        CorruptionPlan(corruptions=[make_spec("missing", modality="audio"), make_spec("missing", modality="text")]),
    )
    assert not out["audio"].any() and not out["text"].any()
    assert out["audio"].dtype == np.float32 and out["text"].dtype == np.int64
    assert out["visual"] is batch["visual"]


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_two_workers_apply_the_same_noise_to_the_same_sample_id(name):
    batch, modality = _batch(40), MODALITY[name]
    plan = _plan(name, modality, SOME_LEVEL[name], seed=3, p=0.5, **FIELDS.get(name, {}))
    whole = apply_corruption(batch, IDS[:40], plan)[modality]
    halves = [
        apply_corruption({modality: batch[modality][part]}, [IDS[i] for i in part], plan)[modality]
        for part in (np.arange(0, 40, 2), np.arange(1, 40, 2))
    ]
    np.testing.assert_array_equal(halves[0], whole[0::2])
    np.testing.assert_array_equal(halves[1], whole[1::2])
    order = np.random.default_rng(1).permutation(40)
    shuffled = apply_corruption({modality: batch[modality][order]}, [IDS[i] for i in order], plan)[modality]
    np.testing.assert_array_equal(shuffled, whole[order])
    alone = apply_corruption({modality: batch[modality][7:8]}, IDS[7:8], plan)[modality]
    np.testing.assert_array_equal(alone, whole[7:8])


def test_different_ids_and_seeds_get_different_noise():
    image = np.full((2, 3, 6, 6), 0.5, np.float32)  # two identical images
    plan = _plan("gaussian", "visual", 5, seed=0, p=1.0)
    out = apply_corruption({"visual": image}, ["a", "b"], plan)["visual"]
    assert not np.array_equal(out[0], out[1])
    other = apply_corruption({"visual": image}, ["a", "b"], _plan("gaussian", "visual", 5, seed=1, p=1.0))["visual"]
    assert not np.array_equal(out, other)
    again = apply_corruption({"visual": image}, ["a", "b"], plan)["visual"]
    np.testing.assert_array_equal(out, again)


def test_inputs_are_never_mutated():
    batch = _batch(64)
    before = {k: v.copy() for k, v in batch.items()}
    plan = CorruptionPlan(
        seed=2,
        corruptions=[
            make_spec(name, modality=MODALITY[name], level=SOME_LEVEL[name], p=1.0, **FIELDS.get(name, {}))
            for name in sorted(CORRUPTIONS)
        ],
    )
    apply_corruption(batch, IDS[:64], plan)
    for key, value in before.items():
        np.testing.assert_array_equal(batch[key], value)


def test_corrupt_batch_reads_ids_from_the_batch_column():
    batch = _batch(16)
    batch["sample_id"] = np.array(IDS[:16], dtype=object)
    plan = _plan("gaussian", "visual", 5, p=1.0)
    np.testing.assert_array_equal(
        corrupt_batch(batch, plan)["visual"], apply_corruption(batch, IDS[:16], plan)["visual"]
    )
    del batch["sample_id"]
    with pytest.raises(CorruptionError, match="no 'sample_id' column"):
        corrupt_batch(batch, plan)


def test_parse_levels_reads_the_cli_form():
    assert parse_levels("gaussian:0,5,10") == ("gaussian", [0.0, 5.0, 10.0])
    assert parse_levels(" audio_snr:20, 10 ") == ("audio_snr", [20.0, 10.0])
    assert parse_levels("missing") == ("missing", [1.0])
    plans = sweep_plans("visual", "salt_pepper:0,5", seed=4, channel_axis=0)
    assert [p.corruptions[0].level for p in plans] == [0.0, 5.0] and plans[1].seed == 4


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "blur:1",
            "unknown corruption 'blur'; allowed: audio_snr, feature_noise, gaussian, missing, salt_pepper, "
            "word_replace",
        ),
        ("gaussian", "expected NAME:LEVEL"),
        ("gaussian:1,x", "level 'x' is not a number"),
        ("gaussian:-1", "greater than or equal to 0"),
        ("salt_pepper:150", r"salt_pepper level must be in \[0, 100\]"),
        ("word_replace:11", r"word_replace level must be in \[0, 10\]"),
        ("missing:0.5", "missing level must be 0"),
        ("feature_noise:0,-1", "greater than or equal to 0"),
    ],
)
def test_bad_level_strings_are_refused_with_a_clear_message(text, message):
    with pytest.raises(CorruptionError, match=message):
        parse_levels(text)


def test_invalid_specs_are_refused():
    with pytest.raises(ValueError, match="greater than or equal to 0"):
        make_spec("gaussian", modality="visual", level=-1)
    with pytest.raises(ValueError, match="less than or equal to 1"):
        make_spec("gaussian", modality="visual", level=1, p=1.5)
    with pytest.raises(ValueError, match="Extra inputs are not permitted"):
        make_spec("gaussian", modality="visual", level=1, std=3)
    with pytest.raises(CorruptionError, match="allowed: audio_snr, feature_noise, gaussian"):
        make_spec("blur", modality="visual", level=1)
    with pytest.raises(ValueError, match="expected tags: 'gaussian'"):
        CorruptionPlan.model_validate({"corruptions": [{"name": "blur", "modality": "visual", "level": 1}]})


def test_arrays_a_corruption_cannot_handle_are_refused():
    batch = _batch(8)
    with pytest.raises(CorruptionError, match="word_replace cannot corrupt 'visual' of dtype float32"):
        apply_corruption(batch, IDS[:8], _plan("word_replace", "visual", 1))
    with pytest.raises(CorruptionError, match="modality 'depth' is not in the batch"):
        apply_corruption(batch, IDS[:8], _plan("gaussian", "depth", 1))
    with pytest.raises(CorruptionError, match="for 7 sample ids"):
        apply_corruption(batch, IDS[:7], _plan("gaussian", "visual", 1))


def test_missing_fills_the_value_the_models_normalisation_maps_to_zero():
    import torch

    from mmbalance.data.corruptions import apply_corruption, for_modality, make_spec, neutral_fill
    from mmbalance.data.manifest import ModalitySpec
    from mmbalance.models.normalize import NormalizedEncoder

    frames = ModalitySpec(
        dtype="uint8",
        shape=[2, 3, 4, 4],
        normalize={"mean": [123.675, 116.28, 103.53], "std": [58.4, 57.1, 57.4], "axis": 1},
    )
    spec = for_modality(make_spec("missing", modality="visual", level=1), frames)
    x = np.random.default_rng(0).integers(0, 256, (5, 2, 3, 4, 4)).astype(np.uint8)
    y = apply_corruption({"visual": x}, list("abcde"), {"corruptions": [spec], "seed": 0})["visual"]
    assert y.dtype == np.uint8
    assert (y[:, :, 0] == 124).all() and (y[:, :, 1] == 116).all() and (y[:, :, 2] == 104).all()

    spectrogram = ModalitySpec(dtype="float32", shape=[5, 7], normalize={"mean": [-9.1], "std": [3.1]})
    spec = for_modality(make_spec("missing", modality="audio", level=1), spectrogram)
    y = apply_corruption({"audio": np.ones((3, 5, 7), np.float32)}, [1, 2, 3], {"corruptions": [spec], "seed": 0})[
        "audio"
    ]
    identity = torch.nn.Identity()
    identity.out_dim = 35
    probe = NormalizedEncoder(identity, (5, 7), [-9.1], [3.1], None)
    assert torch.allclose(probe(torch.from_numpy(y)), torch.zeros(3, 5, 7), atol=1e-6)

    assert neutral_fill(ModalitySpec(dtype="int64", shape=[8])) == {}  # token ids: pad zeros
    explicit = make_spec("missing", modality="audio", level=1, fill=[0.0])
    assert for_modality(explicit, spectrogram).fill == [0.0]  # an explicit fill is kept
    assert for_modality(make_spec("gaussian", modality="audio", level=5), spectrogram).name == "gaussian"


def test_train_and_eval_missing_use_the_manifest_fill(small_shards):
    from helpers import recipe_dict
    from mmbalance.config import validate_recipe
    from mmbalance.data.manifest import Manifest
    from mmbalance.data.shards import SplitArrays
    from mmbalance.engine.augment import TrainCorruptor
    from mmbalance.engine.evaluation import robustness_transforms

    manifest = Manifest(
        dataset="t",
        classes=["a", "b"],
        splits={},
        modalities={
            "audio": {"dtype": "float32", "shape": [8], "normalize": {"mean": [2.5], "std": [1.0]}},
            "visual": {"dtype": "float32", "shape": [8]},
        },
    )
    tree = recipe_dict(small_shards)
    tree["data"]["train_corruptions"] = [{"modality": "audio", "name": "missing", "level": 1, "p": 1.0}]
    recipe = validate_recipe(tree)
    corruptor = TrainCorruptor.from_recipe(recipe, manifest)
    batch = corruptor.apply(
        {"audio": np.zeros((2, 8), np.float32), "visual": np.ones((2, 8), np.float32)}, ["x", "y"], 0
    )
    assert (batch["audio"] == 2.5).all() and (batch["visual"] == 1).all()
    arrays = SplitArrays(
        ["x", "y"], np.array([0, 1]), {"audio": np.ones((2, 8), np.float32), "visual": np.ones((2, 8), np.float32)}
    )
    transforms = robustness_transforms(recipe, manifest)
    assert (transforms["missing_audio"](arrays).modalities["audio"] == 2.5).all()
    assert (transforms["missing_visual"](arrays).modalities["visual"] == 0).all()


# feature_noise: x + level * std_train[feature] * N(0, 1), per sample with probability p, unclipped.


def _tiny_shards(root, rows_per_file: int = 1):
    """Hand-checkable shards: feature f has train std [1, 0, 2] (rows [0, 5, 10] and [2, 5, 14]),
    a very different test spread, and an int64 and a uint8 modality."""
    from mmbalance.data.manifest import ModalitySpec
    from mmbalance.data.shards import SplitArrays, write_shards

    def split(f, prefix):
        n = len(f)
        return SplitArrays(
            [f"{prefix}{i}" for i in range(n)],
            np.arange(n) % 2,
            {
                "f": np.asarray(f, np.float32),
                "tok": np.arange(n * 2, dtype=np.int64).reshape(n, 2),
                "pix": np.full((n, 2), 7, np.uint8),
            },
        )

    modalities = {
        "f": ModalitySpec(dtype="float32", shape=[3]),
        "tok": ModalitySpec(dtype="int64", shape=[2]),
        "pix": ModalitySpec(dtype="uint8", shape=[2]),
    }
    splits = {
        "train": split([[0, 5, 10], [2, 5, 14]], "tr"),
        "val": split([[1, 5, 12], [1, 5, 12]], "va"),
        "test": split([[100, -50, 0], [-100, 50, 0]], "te"),
    }
    return write_shards(
        root,
        dataset="tiny",
        classes=["a", "b"],
        modalities=modalities,
        splits=splits,
        generator={},
        preprocessing={},
        rows_per_file=rows_per_file,
    )


def test_feature_std_is_the_train_splits_per_feature_population_std(tmp_path):
    from mmbalance.data.manifest import ModalitySpec
    from mmbalance.data.shards import SplitArrays, feature_std, write_shards

    manifest = _tiny_shards(tmp_path / "tiny")  # one row per file: the per-file combination is exercised
    np.testing.assert_array_equal(feature_std(tmp_path / "tiny", manifest, "train", "f"), [1.0, 0.0, 2.0])
    np.testing.assert_array_equal(feature_std(tmp_path / "tiny", manifest, "test", "f"), [100.0, 50.0, 0.0])
    # Many files of uneven size agree with numpy's std of the whole split; a constant feature is exactly 0.
    x = np.random.default_rng(0).normal(3.0, [0.5, 2.0, 7.0, 0.0], size=(1001, 4)).astype(np.float32)
    x[:, 3] = 0.1
    arrays = SplitArrays([str(i) for i in range(len(x))], np.zeros(len(x), np.int64), {"g": x})
    many = write_shards(
        tmp_path / "many",
        dataset="m",
        classes=["a", "b"],
        modalities={"g": ModalitySpec(dtype="float32", shape=[2, 2])},
        splits={"train": SplitArrays(arrays.sample_ids, arrays.labels, {"g": x.reshape(-1, 2, 2)})},
        generator={},
        preprocessing={},
        rows_per_file=97,
    )
    std = feature_std(tmp_path / "many", many, "train", "g")
    assert std.shape == (2, 2) and std[1, 1] == 0.0
    np.testing.assert_allclose(std, x.astype(np.float64).std(axis=0).reshape(2, 2), rtol=1e-12, atol=1e-15)


def test_feature_noise_is_level_times_train_std_times_a_per_sample_normal(tmp_path):
    from mmbalance.data.corruptions import for_data, sample_rng
    from mmbalance.data.shards import load_split

    manifest = _tiny_shards(tmp_path / "tiny")
    spec = for_data([make_spec("feature_noise", modality="f", level=0.5, p=1.0)], tmp_path / "tiny", manifest, "train")[
        0
    ]
    assert spec.std == [1.0, 0.0, 2.0]  # the train split's, not the test split's [100, 50, 0]
    test = load_split(tmp_path / "tiny", manifest, "test")
    out = apply_corruption(test.modalities, test.sample_ids, CorruptionPlan(corruptions=[spec], seed=9))["f"]
    for i, sample_id in enumerate(test.sample_ids):
        rng = sample_rng(9, spec, sample_id)
        rng.random()  # the selection draw (p = 1)
        z = rng.standard_normal(3)
        expected = test.modalities["f"][i].astype(np.float64) + 0.5 * np.array([1.0, 0.0, 2.0]) * z
        np.testing.assert_array_equal(out[i], expected.astype(np.float32))
    assert (out[:, 1] == test.modalities["f"][:, 1]).all()  # train std 0: no noise
    assert out.dtype == np.float32 and not np.array_equal(out, test.modalities["f"])


def test_feature_noise_is_not_clipped_and_scales_with_the_level():
    x = np.array([[-3.0, 0.5, 300.0]] * 400, np.float32)  # standardised values and beyond any pixel range
    ids = IDS[:400]
    one = apply_corruption({"x": x}, ids, _plan("feature_noise", "x", 1, p=1.0, std=[1.0, 2.0, 50.0]))["x"]
    two = apply_corruption({"x": x}, ids, _plan("feature_noise", "x", 2, p=1.0, std=[1.0, 2.0, 50.0]))["x"]
    assert one.min() < -5 and one.max() > 400 and (one < 0).any() and (one > 1).any()
    noise = (one - x).astype(np.float64)
    np.testing.assert_allclose(noise.std(axis=0), [1.0, 2.0, 50.0], rtol=0.1)
    assert abs((two - x).std(axis=0)[2] / 100.0 - 1) < 0.1


def test_feature_noise_hits_about_p_of_the_samples_and_per_channel_std_broadcasts():
    batch = _batch()
    out = apply_corruption(batch, IDS, _plan("feature_noise", "visual", 1, p=0.5, std=[0.0, 1.0, 0.01], std_axis=0))
    hit = _changed(batch["visual"], out["visual"])
    assert abs(hit.mean() - 0.5) < 0.05
    noise = (out["visual"] - batch["visual"])[hit]  # [K, 3, 6, 6]
    assert not noise[:, 0].any()
    assert abs(noise[:, 1].std() - 1.0) < 0.03 and abs(noise[:, 2].std() / 0.01 - 1) < 0.03


def test_feature_noise_refuses_non_float_data_and_a_missing_or_misfit_std(tmp_path):
    from mmbalance.data.corruptions import accepts_dtype, for_data

    batch = _batch(8)
    for modality in ("photo", "text"):  # uint8 pixels, int64 token ids
        with pytest.raises(CorruptionError, match=f"feature_noise cannot corrupt '{modality}' of dtype"):
            apply_corruption(batch, IDS[:8], _plan("feature_noise", modality, 1, std=[1.0]))
    spec = make_spec("feature_noise", modality="audio", level=1)
    assert accepts_dtype(spec, "float32") and not accepts_dtype(spec, "uint8") and not accepts_dtype(spec, "int64")
    for level in (0, 1):  # never silently unit noise, not even at level 0
        with pytest.raises(CorruptionError, match="feature_noise on 'audio' has no std"):
            apply_corruption(batch, IDS[:8], _plan("feature_noise", "audio", level))
    with pytest.raises(CorruptionError, match="3 std values do not fit samples of shape"):
        apply_corruption(batch, IDS[:8], _plan("feature_noise", "audio", 1, std=[1.0, 2.0, 3.0]))
    with pytest.raises(CorruptionError, match="2 std values along axis 0"):
        apply_corruption(batch, IDS[:8], _plan("feature_noise", "visual", 1, std=[1.0, 2.0], std_axis=0))
    with pytest.raises(ValueError, match="std must be finite and >= 0"):
        make_spec("feature_noise", modality="audio", level=1, std=[-1.0])
    with pytest.raises(ValueError, match="std_axis needs std"):
        make_spec("feature_noise", modality="audio", level=1, std_axis=0)
    manifest = _tiny_shards(tmp_path / "tiny")
    explicit = make_spec("feature_noise", modality="f", level=1, std=[3.0])
    assert for_data([explicit], tmp_path / "tiny", manifest, "train")[0].std == [3.0]  # an explicit std is kept
    with pytest.raises(CorruptionError, match="modality 'depth' is not in the data"):
        for_data([make_spec("feature_noise", modality="depth", level=1)], tmp_path / "tiny", manifest, "train")


def test_feature_noise_on_a_non_float_modality_fails_before_any_work_with_the_key_named(tmp_path):
    from helpers import recipe_dict
    from mmbalance.config import ConfigError, check_against_data, validate_recipe
    from mmbalance.engine.evaluation import corrupted, for_run

    manifest = _tiny_shards(tmp_path / "tiny")
    tree = recipe_dict(tmp_path / "tiny", modalities=("f", "tok", "pix"))
    tree["schedule"]["batch_size"] = 1
    tree["eval"]["corruptions"] = [
        {"modality": "tok", "name": "feature_noise", "levels": [0, 1]},
        {"modality": "f", "name": "feature_noise", "levels": [0, 1]},
    ]
    tree["data"]["train_corruptions"] = [{"modality": "pix", "name": "feature_noise", "level": 1}]
    recipe = validate_recipe(tree)
    with pytest.raises(ConfigError) as info:
        check_against_data(recipe, manifest)
    message = str(info.value)
    assert "eval.corruptions.0.name: feature_noise cannot corrupt 'tok' of dtype int64; it takes f" in message
    assert "data.train_corruptions.0.name: feature_noise cannot corrupt 'pix' of dtype uint8" in message
    assert "eval.corruptions.1" not in message
    # `mmbalance eval --corrupt tok=feature_noise:1`: refused by sweep's check, before the model is loaded
    with pytest.raises(
        CorruptionError, match="feature_noise:1 on tok: feature_noise cannot corrupt 'tok' of dtype int64"
    ):
        for_run({"feature_noise:1 on tok": corrupted("tok", "feature_noise", 1, 0.5, 0)}, recipe, manifest)
    with pytest.raises(CorruptionError, match="'depth' is not a modality of this run"):
        for_run({"x": corrupted("depth", "feature_noise", 1, 0.5, 0)}, recipe, manifest)
    resolved = for_run({"x": corrupted("f", "feature_noise", 1, 0.5, 0)}, recipe, manifest)["x"]
    assert resolved.plan.corruptions[0].std == [1.0, 0.0, 2.0]  # the run's train split
