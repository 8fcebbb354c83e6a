"""ARL objective (docs/methods/arl.md §3): §3.9 numbers, same-batch gradient scaling, warm-up,
rank-summed coefficients, variants, state and config validation."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from mmbalance.models.fusion import LateFusion
from mmbalance.objectives import build_objective
from mmbalance.objectives.arl import ARL, ARLParams, arl_coefficients, batch_statistics
from mmbalance.objectives.base import DistInfo, HeadOutputs, StepInputs, cross_entropy_per_sample

Z_A = torch.tensor([[3.0, 0.0, 0.0], [2.0, 1.0, 0.0]])  # confident audio
Z_V = torch.tensor([[0.5, 0.4, 0.3], [0.2, 0.1, 0.0]])
CONCAT_INFO = {"fusion": "concat", "supports_zero_out_unimodal": True}


class LinearEncoder(nn.Linear):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__(in_dim, out_dim)
        self.out_dim = out_dim


def make_objective(modalities=("a", "v"), **kwargs) -> ARL:
    obj = ARL(ARLParams(**kwargs))
    obj.bind(list(modalities), 3, CONCAT_INFO)
    return obj


def logits_inputs(
    z: dict[str, torch.Tensor], labels: torch.Tensor, epoch: int, world: DistInfo | None = None
) -> StepInputs:
    outputs = HeadOutputs(unimodal_logits=z, fused_logits=sum(z.values()), head_logits={m: [v] for m, v in z.items()})
    features = {m: torch.zeros(v.shape[0], 4) for m, v in z.items()}
    return StepInputs(
        features, outputs, labels, step=0, epoch=epoch, steps_per_epoch=1, phase="train", world=world or DistInfo()
    )


def paper_example_inputs(epoch: int = 10) -> StepInputs:
    return logits_inputs({"a": Z_A, "v": Z_V}, torch.tensor([0, 1]), epoch)


def multipliers(result, modalities=("a", "v")) -> list[float]:
    return [float(result.grad_multipliers[m]) for m in modalities]


# -- §3.9 numbers --------------------------------------------------------------------------


def test_arl_analysis_reproduces_spec_example_at_T8():
    out = arl_coefficients(batch_statistics(torch.stack([Z_A, Z_V])), 2, T=8.0, entropy_clamp=0.3)
    expected = {
        "d": [0.8, 0.2],
        "H": [0.5995, 1.0953],
        "H_hat": [0.3537, 0.6463],
        "q": [0.6463, 0.3537],
        "k": [0.2262, 0.7738],
    }
    for name, values in expected.items():
        assert out[name].tolist() == pytest.approx(values, abs=1e-4), name


def test_arl_coefficients_at_T1_are_closer_to_uniform():
    out = arl_coefficients(batch_statistics(torch.stack([Z_A, Z_V])), 2, T=1.0, entropy_clamp=0.3)
    assert out["k"].tolist() == pytest.approx([0.4616, 0.5384], abs=1e-4)


def test_arl_mway_form_equals_two_modality_rule():
    d, q, T = torch.tensor([0.8, 0.2]), torch.tensor([0.6463, 0.3537]), 8.0
    two_way = torch.softmax(T * torch.stack([d[1] * q[0], d[0] * q[1]]), 0)
    assert torch.softmax(T * q * (1 - d), 0).tolist() == pytest.approx(two_way.tolist(), abs=1e-6)


def test_arl_intended_multipliers_boost_the_under_dependent_visual_encoder():
    result = make_objective(T=8.0).step(paper_example_inputs())
    assert multipliers(result) == pytest.approx([1.2262, 1.7738], abs=1e-4)


def test_arl_official_variant_gives_uniform_one_point_five():
    result = make_objective(T=8.0, apply_coeffs="official_uniform_1.5").step(paper_example_inputs())
    assert multipliers(result) == pytest.approx([1.5, 1.5], abs=1e-6)


def test_arl_gamma_scale_form_multiplies_k_by_gamma():
    result = make_objective(T=8.0, gamma=2.0, scale_form="1+gamma*k").step(paper_example_inputs())
    assert multipliers(result) == pytest.approx([1 + 2 * 0.2262, 1 + 2 * 0.7738], abs=2e-4)


def test_arl_entropy_share_is_clamped_for_a_near_one_hot_modality():
    z_a = torch.tensor([[30.0, 0.0, 0.0]])  # entropy ~ 0, share far below 0.3
    z_v = torch.zeros(1, 3)  # uniform prediction
    out = arl_coefficients(batch_statistics(torch.stack([z_a, z_v])), 2, T=4.0, entropy_clamp=0.3)
    assert out["H_hat"].tolist() == pytest.approx([0.3, 1.0], abs=1e-6)
    assert out["q"].tolist() == pytest.approx([(1 / 0.3) / (1 / 0.3 + 1), 1 / (1 / 0.3 + 1)], abs=1e-6)


# -- gradient scaling through the model ----------------------------------------------------


def concat_model(dims: dict[str, int], num_classes: int = 3) -> LateFusion:
    return LateFusion({m: LinearEncoder(d, 4) for m, d in dims.items()}, num_classes, fusion="concat")


def engine_backward(model, obj, batch, labels, epoch, hooks: bool = True):
    """One engine step without the optimizer: forward, objective, hooks, backward."""
    model.zero_grad(set_to_none=True)
    features, outputs = model(batch, obj.forward_context("train", epoch))
    result = obj.step(StepInputs(features, outputs, labels, 0, epoch, 1, "train"))
    if hooks:
        for m, mult in result.grad_multipliers.items():
            features[m].register_hook(lambda g, s=mult: g * s)
    result.losses[0].value().backward()
    return result, outputs, {n: p.grad.clone() for n, p in model.named_parameters()}


def test_arl_multipliers_scale_the_encoder_gradient_on_the_same_batch():
    torch.manual_seed(0)
    model = concat_model({"a": 5, "v": 6})
    batch, labels = {"a": torch.randn(8, 5), "v": torch.randn(8, 6)}, torch.randint(0, 3, (8,))
    obj = make_objective(T=8.0, start=0)
    result, outputs, scaled = engine_backward(model, obj, batch, labels, epoch=0)
    _, _, plain = engine_backward(model, obj, batch, labels, epoch=0, hooks=False)

    z = torch.stack([outputs.unimodal_logits[m].detach() for m in ("a", "v")])
    k = arl_coefficients(batch_statistics(z), 2, T=8.0, entropy_clamp=0.3)["k"]
    mult = multipliers(result)
    assert mult == pytest.approx((1 + k).tolist(), abs=1e-6)  # this batch's k, no lag
    assert abs(mult[0] - mult[1]) > 1e-3
    for i, m in enumerate(("a", "v")):
        for name in (f"encoders.{m}.weight", f"encoders.{m}.bias"):
            torch.testing.assert_close(scaled[name], mult[i] * plain[name])
    torch.testing.assert_close(scaled["shared_head.weight"], plain["shared_head.weight"])


def test_arl_lagged_coefficients_use_the_previous_batch():
    obj = make_objective(T=8.0, coeff_lag=1)
    first = obj.step(paper_example_inputs())
    assert multipliers(first) == pytest.approx([1.5, 1.5])  # before any batch: k = 1/M
    swapped = logits_inputs({"a": Z_V, "v": Z_A}, torch.tensor([0, 1]), epoch=10)
    assert multipliers(obj.step(swapped)) == pytest.approx([1.2262, 1.7738], abs=1e-4)


def test_arl_lag_buffer_is_written_only_after_warmup():
    """coeff_lag=1: the first post-warm-up step applies the uniform k = 1/M, not the last warm-up
    batch's k; every later step applies the previous (post-warm-up) batch's k."""
    obj = make_objective(T=8.0, coeff_lag=1, start=2)
    swapped = lambda epoch: logits_inputs({"a": Z_V, "v": Z_A}, torch.tensor([0, 1]), epoch)  # noqa: E731
    for epoch in (0, 1):  # warm-up batches with k = (0.2262, 0.7738)
        assert obj.step(paper_example_inputs(epoch)).grad_multipliers == {}
    assert obj.state_dict()["last_k"].tolist() == pytest.approx([0.5, 0.5])
    restored = make_objective(T=8.0, coeff_lag=1, start=2)
    restored.load_state_dict(obj.state_dict())  # resuming at the warm-up boundary keeps the uniform k
    for o in (obj, restored):
        assert multipliers(o.step(swapped(2))) == pytest.approx([1.5, 1.5])  # first post-warm-up step
        assert multipliers(o.step(paper_example_inputs(2))) == pytest.approx([1.7738, 1.2262], abs=1e-4)  # swapped's k
        assert multipliers(o.step(paper_example_inputs(2))) == pytest.approx([1.2262, 1.7738], abs=1e-4)


# -- k_total: the mean multiplier for M modalities ------------------------------------------

Z_T = torch.tensor([[0.1, 0.9, 0.2], [0.0, 0.3, 0.6]])


def three_modality_inputs(epoch: int = 10) -> StepInputs:
    return logits_inputs({"a": Z_A, "v": Z_V, "t": Z_T}, torch.tensor([0, 1]), epoch)


@pytest.mark.parametrize(
    "variant",
    [{}, {"coeff_lag": 1}, {"scale_form": "1+gamma*k", "gamma": 2.0}, {"apply_coeffs": "official_uniform_1.5"}],
)
def test_arl_k_total_is_the_identity_for_two_modalities(variant):
    one, half = make_objective(T=8.0, **variant), make_objective(T=8.0, k_total="half_per_modality", **variant)
    for inputs in (paper_example_inputs(), logits_inputs({"a": Z_V, "v": Z_A}, torch.tensor([0, 1]), epoch=10)):
        r1, r2 = one.step(inputs), half.step(inputs)
        assert multipliers(r2) == pytest.approx(multipliers(r1), abs=1e-7)
        assert {k: float(v[0]) for k, v in r2.stats.items()} == pytest.approx(
            {k: float(v[0]) for k, v in r1.stats.items()}
        )


@pytest.mark.parametrize(("k_total", "mean_k"), [("one", 1 / 3), ("half_per_modality", 0.5)])
def test_arl_three_modality_mean_multiplier_depends_on_k_total(k_total, mean_k):
    mods = ("a", "v", "t")
    result = make_objective(mods, T=8.0, k_total=k_total).step(three_modality_inputs())
    mult = multipliers(result, mods)
    assert sum(mult) / 3 == pytest.approx(1 + mean_k, abs=1e-6)
    assert sum(float(result.stats[f"arl_k_{m}"][0]) for m in mods) == pytest.approx(1.0, abs=1e-6)  # logged k: softmax
    lagged = make_objective(mods, T=8.0, k_total=k_total, coeff_lag=1).step(three_modality_inputs())
    assert multipliers(lagged, mods) == pytest.approx([1 + mean_k] * 3, abs=1e-6)  # the uniform initial lag value
    gamma = make_objective(mods, T=8.0, k_total=k_total, scale_form="1+gamma*k", gamma=4.0).step(
        three_modality_inputs()
    )
    assert sum(multipliers(gamma, mods)) / 3 == pytest.approx(1 + 4.0 * mean_k, abs=1e-5)
    official = make_objective(mods, T=8.0, k_total=k_total, apply_coeffs="official_uniform_1.5").step(
        three_modality_inputs()
    )
    assert multipliers(official, mods) == pytest.approx([1.5, 1.5, 1.5])  # the frozen 0.5 is per modality either way


# -- warm-up --------------------------------------------------------------------------------


def test_arl_warmup_has_no_multipliers_and_unit_unimodal_weight():
    obj = make_objective(gamma=4.0, start=2)
    labels = torch.tensor([0, 1])
    fused = cross_entropy_per_sample(Z_A + Z_V, labels).mean()
    unimodal = cross_entropy_per_sample(Z_A, labels).mean() + cross_entropy_per_sample(Z_V, labels).mean()

    warm = obj.step(paper_example_inputs(epoch=1))  # last warm-up epoch (0-based)
    assert warm.grad_multipliers == {}
    assert float(warm.losses[0].value()) == pytest.approx(float(fused + unimodal), abs=1e-6)
    obj.on_epoch_end(1, warm.stats, DistInfo())
    assert obj.epoch_metrics()["arl_gamma_e"] == 1.0
    assert obj.epoch_metrics()["arl_mult_a"] == 1.0

    after = obj.step(paper_example_inputs(epoch=2))
    assert set(after.grad_multipliers) == {"a", "v"}
    assert float(after.losses[0].value()) == pytest.approx(float(fused + 4.0 * unimodal), abs=1e-6)
    obj.on_epoch_end(2, after.stats, DistInfo())
    assert obj.epoch_metrics()["arl_gamma_e"] == 4.0


# -- DDP: coefficients from rank-summed statistics ----------------------------------------


@pytest.mark.parametrize("split", [4, 3])
def test_arl_two_ranks_get_the_same_k_as_one_step_on_the_full_batch(split):
    torch.manual_seed(1)
    z = {"a": 3 * torch.randn(8, 3), "v": torch.randn(8, 3)}
    labels = torch.randint(0, 3, (8,))
    shards = [slice(0, split), slice(split, 8)]

    def shard_inputs(sl, world=None):
        return logits_inputs({m: v[sl] for m, v in z.items()}, labels[sl], epoch=10, world=world)

    def local_tensor(sl):
        seen = []
        make_objective(T=8.0).step(shard_inputs(sl, DistInfo(all_reduce_sum=lambda t: seen.append(t) or t)))
        return seen[0]

    full = multipliers(make_objective(T=8.0).step(logits_inputs(z, labels, epoch=10)))
    for rank, (mine, other) in enumerate([(shards[0], shards[1]), (shards[1], shards[0])]):
        other_t = local_tensor(other)
        world = DistInfo(rank=rank, world_size=2, all_reduce_sum=lambda t: t + other_t)
        assert multipliers(make_objective(T=8.0).step(shard_inputs(mine, world))) == pytest.approx(full, abs=1e-6)
        alone = multipliers(make_objective(T=8.0).step(shard_inputs(mine)))
        assert alone != pytest.approx(full, abs=1e-4)  # the reduction is what makes them agree


# -- epoch metrics, three modalities, state ---------------------------------------------------


def test_arl_epoch_metric_k_is_the_mean_over_steps():
    obj = make_objective(T=8.0)
    r1 = obj.step(paper_example_inputs())
    r2 = obj.step(logits_inputs({"a": Z_V, "v": Z_A}, torch.tensor([0, 1]), epoch=10))
    summed = {key: (r1.stats[key][0] + r2.stats[key][0], r1.stats[key][1] + r2.stats[key][1]) for key in r1.stats}
    obj.on_epoch_end(10, summed, DistInfo())
    assert obj.epoch_metrics()["arl_k_a"] == pytest.approx((0.2262 + 0.7738) / 2, abs=1e-4)
    assert obj.epoch_metrics()["arl_mult_v"] == pytest.approx(1.5, abs=1e-4)


def test_arl_trains_a_three_modality_concat_model():
    torch.manual_seed(2)
    dims = {"a": 6, "v": 5, "t": 7}
    model = concat_model(dims)
    batch = {m: torch.randn(32, d) for m, d in dims.items()}
    labels = (batch["a"][:, 0] + batch["v"][:, 0] > 0).long() + (batch["t"][:, 0] > 1).long()  # [32] in {0,1,2}
    obj = ARL(ARLParams(start=2, T=4.0))
    obj.bind(list(dims), 3, model.info)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for epoch in range(5):
        epoch_stats = {}
        for _ in range(4):
            result, _, _ = engine_backward(model, obj, batch, labels, epoch)
            nn.utils.clip_grad_norm_(model.parameters(), 40.0)
            opt.step()
            # fused + sum of unimodal CE: comparable across the gamma_e switch
            losses.append(float(result.metrics["loss_fused"]) + sum(float(result.metrics[f"loss_{m}"]) for m in dims))
            for key, (s, c) in result.stats.items():
                prev = epoch_stats.get(key, (0.0, 0.0))
                epoch_stats[key] = (prev[0] + s, prev[1] + c)
        obj.on_epoch_end(epoch, epoch_stats, DistInfo())
    assert set(result.grad_multipliers) == set(dims)
    assert sum(obj.epoch_metrics()[f"arl_k_{m}"] for m in dims) == pytest.approx(1.0, abs=1e-5)
    assert losses[-1] < 0.8 * losses[0]


def test_arl_state_dict_round_trip_restores_the_lagged_k():
    obj = make_objective(T=8.0, coeff_lag=1)
    result = obj.step(paper_example_inputs())
    obj.on_epoch_end(10, result.stats, DistInfo())
    restored = make_objective(T=8.0, coeff_lag=1)
    restored.load_state_dict(obj.state_dict())
    assert torch.equal(restored.state_dict()["last_k"], obj.state_dict()["last_k"])
    assert restored.epoch_metrics() == obj.epoch_metrics()
    nxt = logits_inputs({"a": Z_V, "v": Z_A}, torch.tensor([0, 1]), epoch=10)
    assert multipliers(restored.step(nxt)) == multipliers(obj.step(nxt))


# -- configuration ----------------------------------------------------------------------------


def test_arl_requires_the_concat_fusion_for_zero_out_unimodal_logits():
    # The fusion check is the engine's, from the declared requirements (tests/test_objective_requirements.py).
    assert ARL.requirements.fusion_problem("arl", "concat") is None
    assert "concat" in ARL.requirements.fusion_problem("arl", "mean")


def test_arl_defaults_are_the_paper_values():
    p = ARLParams()
    assert (p.gamma, p.T, p.start, p.entropy_clamp) == (4.0, 4.0, 5, 0.3)
    assert (p.apply_coeffs, p.coeff_lag, p.scale_form, p.k_total) == ("intended", 0, "1+k", "one")


@pytest.mark.parametrize(
    "bad",
    [
        {"gamma": -1.0},
        {"T": 0.0},
        {"start": -1},
        {"entropy_clamp": 1.0},
        {"entropy_clamp": -0.1},
        {"apply_coeffs": "uniform"},
        {"coeff_lag": 2},
        {"scale_form": "k"},
        {"k_total": "two"},
        {"temperature": 4.0},
    ],
)
def test_arl_invalid_params_are_rejected(bad):
    with pytest.raises(ValidationError):
        ARLParams(**bad)
    if "temperature" not in bad:
        with pytest.raises(ValidationError):
            build_objective("arl", bad)  # a dict is validated like a recipe section
