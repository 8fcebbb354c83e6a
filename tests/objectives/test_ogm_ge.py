"""OGM-GE objective (docs/methods/ogm_ge.md): hand-checked scores, ratio and coefficient (§2-§3),
which gradients are scaled and the GE noise (§4), the epoch window (§5), rank-summed and
accumulated scores (§6), a reference written from the official ``train_epoch`` (§7), variants,
state and config validation."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from mmbalance.engine.distributed import ProcessGroup
from mmbalance.engine.metrics import SumCounter
from mmbalance.engine.steps import StepClock, gradient_seed, parameter_groups, train_batch
from mmbalance.models.fusion import LateFusion
from mmbalance.objectives import OBJECTIVES, build_objective
from mmbalance.objectives.base import DistInfo, GradientContext, HeadOutputs, StepInputs, cross_entropy_per_sample
from mmbalance.objectives.ogm_ge import (
    OGMGE,
    OGMGEParams,
    gradient_noise_std,
    half_bias_logits,
    modulation,
    true_class_scores,
)

LN3 = math.log(3.0)
# labels [0, 1]: audio's true-class probabilities 3/4 and 1/2 (score 1.25), visual's 1/2 and 1/2 (1.0).
Z_A = torch.tensor([[LN3, 0.0], [0.0, 0.0]])
Z_V = torch.zeros(2, 2)
LABELS = torch.tensor([0, 1])
INPUT_DIMS = {"audio": 5, "visual": 4}
CLASSES = 3


def make_objective(fusion: str = "sum", modalities=("audio", "visual"), **kwargs) -> OGMGE:
    obj = OGMGE(OGMGEParams(**kwargs))
    obj.bind(list(modalities), 2, {"fusion": fusion})
    return obj


def logits_inputs(z: dict[str, torch.Tensor], labels: torch.Tensor, fused=None, step=0, epoch=0, world=None):
    fused = sum(z.values()) if fused is None else fused
    outputs = HeadOutputs(unimodal_logits=z, fused_logits=fused, head_logits={m: [v] for m, v in z.items()})
    features = {m: torch.zeros(v.shape[0], 4) for m, v in z.items()}
    return StepInputs(features, outputs, labels, step, epoch, 1, "train", world=world or DistInfo())


# -- §2-§3 hand-checked numbers ----------------------------------------------------------------


def test_scores_are_summed_true_class_probabilities():
    scores = true_class_scores(torch.stack([Z_A, Z_V]), LABELS)
    torch.testing.assert_close(scores, torch.tensor([1.25, 1.0]))


def test_half_bias_scores_match_the_official_w_h_plus_b_over_two():
    # W_m h_m = 0 for both, b = [2 ln 3, 0]: zero-out logits carry b (p = 9/10), the official b/2 (p = 3/4).
    b = torch.tensor([2 * LN3, 0.0])
    z = {"audio": b.expand(1, 2).clone(), "visual": b.expand(1, 2).clone()}
    fused = z["audio"] + z["visual"] - b
    half = half_bias_logits(torch.stack(list(z.values())), fused)
    torch.testing.assert_close(half, torch.stack([b / 2, b / 2]).unsqueeze(1))
    label = torch.tensor([0])
    torch.testing.assert_close(true_class_scores(torch.stack(list(z.values())), label), torch.tensor([0.9, 0.9]))
    torch.testing.assert_close(true_class_scores(half, label), torch.tensor([0.75, 0.75]))
    obj = make_objective("concat")
    result = obj.step(logits_inputs(z, label, fused=fused))
    torch.testing.assert_close(result.stats["ogm_score_audio"][0], torch.tensor(0.75))
    full = make_objective("concat", unimodal_bias="full").step(logits_inputs(z, label, fused=fused))
    torch.testing.assert_close(full.stats["ogm_score_audio"][0], torch.tensor(0.9))


def test_ratio_and_coefficient_by_hand():
    scores = torch.tensor([1.25, 1.0])
    mod = modulation(scores, alpha=1.0, coeff_form="ratio")
    assert int(mod["dominant"]) == 0
    torch.testing.assert_close(mod["ratio"], torch.tensor(1.25))
    # 1 - tanh(1.25) = 1 - 0.848284 on the dominant audio; visual keeps 1.
    torch.testing.assert_close(mod["coeff"], torch.tensor([0.151716, 1.0]), atol=1e-6, rtol=0)
    cont = modulation(scores, alpha=1.0, coeff_form="ratio_minus_one")
    torch.testing.assert_close(cont["coeff"], torch.tensor([1 - 0.244919, 1.0]), atol=1e-6, rtol=0)
    # visual dominant: ratio 2, k = 1 - tanh(0.5 * 2) = 0.238406 on visual only.
    flipped = modulation(torch.tensor([0.5, 1.0]), alpha=0.5, coeff_form="ratio")
    assert int(flipped["dominant"]) == 1 and mod["is_dominant"].tolist() == [1.0, 0.0]
    torch.testing.assert_close(flipped["coeff"], torch.tensor([1.0, 0.238406]), atol=1e-6, rtol=0)


def test_a_tie_modulates_the_first_modality_as_the_official_else_branch():
    mod = modulation(torch.tensor([1.0, 1.0]), alpha=0.1, coeff_form="ratio")
    torch.testing.assert_close(mod["coeff"], torch.tensor([1 - math.tanh(0.1), 1.0]))
    assert modulation(torch.tensor([1.0, 1.0]), 0.1, "ratio_minus_one")["coeff"].tolist() == [1.0, 1.0]


def test_three_modalities_compare_the_leader_with_the_mean_of_the_others():
    mod = modulation(torch.tensor([1.0, 3.0, 2.0]), alpha=1.0, coeff_form="ratio_minus_one")
    torch.testing.assert_close(mod["ratio"], torch.tensor(2.0))  # 3 / mean(1, 2)
    torch.testing.assert_close(mod["coeff"], torch.tensor([1.0, 1 - math.tanh(1.0), 1.0]))


def test_step_returns_the_fused_ce_only_and_the_scores():
    obj = make_objective()
    result = obj.step(logits_inputs({"audio": Z_A, "visual": Z_V}, LABELS))
    assert len(result.losses) == 1 and result.grad_multipliers == {}
    fused = Z_A + Z_V
    torch.testing.assert_close(result.losses[0].value(), cross_entropy_per_sample(fused, LABELS).mean())
    torch.testing.assert_close(result.stats["ogm_score_audio"], (torch.tensor(1.25), torch.tensor(2.0)))
    torch.testing.assert_close(result.stats["ogm_ratio"][0], torch.tensor(1.25))
    assert result.stats["ogm_dominant_audio"][0] == 1 and result.stats["ogm_dominant_visual"][0] == 0


# -- §4 which gradients change, and the noise ------------------------------------------------


class ConvEncoder(nn.Module):
    """Conv (4-D weight) -> ReLU -> spatial mean -> linear: a 4-D gradient among 1-D and 2-D ones."""

    def __init__(self, out_dim: int = 4):
        super().__init__()
        self.conv, self.fc, self.out_dim = nn.Conv2d(1, 3, 2), nn.Linear(3, out_dim), out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def make_model(fusion: str = "concat", seed: int = 0) -> LateFusion:
    torch.manual_seed(seed)
    return LateFusion({m: ConvEncoder() for m in INPUT_DIMS}, CLASSES, fusion=fusion)


def make_batch(n: int = 12, seed: int = 3, audio_boost: float = 3.0):
    """Audio images carry the label strongly, visual weakly, so audio dominates."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (n,), generator=gen)
    batch = {m: torch.randn(n, 1, 3, 3, generator=gen) for m in INPUT_DIMS}
    batch["audio"] = batch["audio"] + audio_boost * labels.view(-1, 1, 1, 1).float()
    return batch, labels


def backward_once(model: LateFusion, obj: OGMGE, batch, labels, step: int = 0, epoch: int = 0):
    features, outputs = model(batch)
    result = obj.step(StepInputs(features, outputs, labels, step, epoch, 1, "train"))
    model.zero_grad(set_to_none=True)
    result.losses[0].value().backward()
    return result


def gradient_context(model: LateFusion, result, step: int = 0, epoch: int = 0, seed: int = 7) -> GradientContext:
    return GradientContext(
        result.losses[0], 0, result, step, epoch, DistInfo(), seed, torch.device("cpu"), lambda: parameter_groups(model)
    )


def grads(model: LateFusion) -> dict[str, torch.Tensor]:
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def hooked_once(**params):
    """One step on the concat model and the hook after it: (objective, result, gradients
    before the hook, gradients after it)."""
    model = make_model()
    obj = make_objective("concat", **params)
    obj.bind(model.modalities, CLASSES, model.info)
    batch, labels = make_batch()
    result = backward_once(model, obj, batch, labels)
    before = grads(model)
    obj.perturb_gradients(gradient_context(model, result))
    return obj, result, before, grads(model)


def test_only_the_dominant_encoder_is_scaled_without_noise():
    obj, result, before, after = hooked_once(alpha=0.7, noise_scale=0.0)
    mod = obj.step_modulation(0)
    assert int(mod["dominant"]) == 0  # audio leads by construction
    k = float(mod["coeff"][0])
    assert 0.0 < k < 1.0
    for name, g in before.items():
        factor = k if name.startswith("encoders.audio.") else 1.0
        torch.testing.assert_close(after[name], factor * g, rtol=1e-6, atol=0)
    torch.testing.assert_close(result.stats["ogm_coeff_audio"][0], mod["coeff"][0])
    assert float(result.stats["ogm_coeff_visual"][0]) == 1.0


def test_ge_noise_is_the_gradient_std_times_draws_from_the_context_generator():
    model = make_model()
    obj = make_objective("concat", alpha=0.7)
    obj.bind(model.modalities, CLASSES, model.info)
    batch, labels = make_batch()
    result = backward_once(model, obj, batch, labels)
    coeff = obj.step_modulation(0)["coeff"]
    before = grads(model)
    obj.perturb_gradients(gradient_context(model, result, seed=11))
    after = grads(model)
    gen = torch.Generator().manual_seed(11)
    for i, m in enumerate(model.modalities):  # every modality gets noise (official), in parameter order
        for name, p in model.encoders[m].named_parameters():
            key = f"encoders.{m}.{name}"
            g = before[key]
            draw = torch.randn(g.shape, generator=gen)
            std = g.std() if g.numel() > 1 else torch.tensor(0.0)
            torch.testing.assert_close(after[key], coeff[i] * g + draw * (std + 1e-8), rtol=1e-5, atol=1e-7)
    for key in before:
        if key.startswith("shared_head"):
            assert torch.equal(after[key], before[key])


def test_noise_std_matches_the_gradient_std_on_a_large_tensor():
    grad = torch.randn(400, 50) * 0.3
    torch.testing.assert_close(gradient_noise_std(grad), grad.std() + 1e-8)
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(grad.shape, generator=gen) * gradient_noise_std(grad)
    assert abs(float(noise.std()) / float(grad.std()) - 1.0) < 0.02
    assert float(gradient_noise_std(torch.zeros(1))) == pytest.approx(1e-8)  # one element: defined, not NaN


def test_noise_on_dominant_leaves_the_other_modality_exact():
    obj, _, before, after = hooked_once(alpha=0.7, noise_on="dominant")
    k = float(obj.step_modulation(0)["coeff"][0])
    for key, g in before.items():
        if key.startswith("encoders.visual."):
            assert torch.equal(after[key], g), key
        elif key.startswith("encoders.audio."):
            assert not torch.allclose(after[key], k * g, rtol=1e-6, atol=0), key  # noise added


def test_conv_filter_touches_only_4d_gradients():
    _, _, before, after = hooked_once(alpha=0.7, modulated_params="conv")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"encoders.audio.conv.weight", "encoders.visual.conv.weight"}


# -- §5 the epoch window ------------------------------------------------------------------------


@pytest.mark.parametrize(("epoch", "modulated"), [(1, False), (2, True), (4, True), (5, False)])
def test_modulation_window_is_inclusive_at_both_ends(epoch, modulated):
    model = make_model()
    obj = make_objective("concat", alpha=0.7, start_epoch=2, end_epoch=4)
    obj.bind(model.modalities, CLASSES, model.info)
    batch, labels = make_batch()
    result = backward_once(model, obj, batch, labels, step=3, epoch=epoch)
    before = grads(model)
    obj.perturb_gradients(gradient_context(model, result, step=3, epoch=epoch))
    after = grads(model)
    same = all(torch.equal(before[k], after[k]) for k in before)
    assert same is (not modulated)
    assert (float(result.stats["ogm_coeff_audio"][0]) < 1.0) is modulated
    assert obj.modulates(epoch) is modulated


def test_end_epoch_none_never_stops_and_start_is_the_warmup_key():
    assert make_objective(end_epoch=None).modulates(10_000)
    assert OGMGE.requirements.warmup_key == "start_epoch"
    with pytest.raises(ValidationError):
        OGMGEParams(start_epoch=5, end_epoch=4)
    with pytest.raises(ValidationError):
        OGMGEParams(modulation_starts=0)


def test_perturb_without_its_step_refuses():
    model = make_model()
    obj = make_objective("concat")
    obj.bind(model.modalities, CLASSES, model.info)
    result = backward_once(model, obj, *make_batch(), step=0)
    with pytest.raises(RuntimeError, match="step 1"):
        obj.perturb_gradients(gradient_context(model, result, step=1))


# -- §6 ranks and micro-batches --------------------------------------------------------------------


def test_scores_are_summed_over_ranks_before_the_leader_is_chosen():
    # Locally audio leads (1.25 vs 1.0); the other rank's [0.5, 3.0] sums make visual lead: 1.75 vs 4.0.
    other = torch.tensor([0.5, 3.0, 2.0])
    world = DistInfo(rank=0, world_size=2, all_reduce_sum=lambda t: t + other)
    obj = make_objective(alpha=1.0)
    result = obj.step(logits_inputs({"audio": Z_A, "visual": Z_V}, LABELS, world=world))
    mod = obj.step_modulation(0)
    assert int(mod["dominant"]) == 1
    torch.testing.assert_close(mod["ratio"], torch.tensor(4.0 / 1.75))
    torch.testing.assert_close(result.stats["ogm_score_visual"], (torch.tensor(4.0), torch.tensor(4.0)))


def test_micro_batches_of_one_step_add_up_and_a_new_step_starts_afresh():
    obj = make_objective(alpha=1.0)
    obj.step(logits_inputs({"audio": Z_A, "visual": Z_V}, LABELS, step=4))
    both_right = torch.tensor([[LN3, 0.0], [0.0, LN3]])  # true-class 3/4 twice: score 1.5
    obj.step(logits_inputs({"audio": Z_V, "visual": both_right}, LABELS, step=4))
    torch.testing.assert_close(obj.step_modulation(4)["ratio"], torch.tensor(2.5 / 2.25))
    obj.step(logits_inputs({"audio": Z_A, "visual": Z_V}, LABELS, step=5))
    torch.testing.assert_close(obj.step_modulation(5)["ratio"], torch.tensor(1.25))


# -- §7 reference: the official per-step update, written out from main.py's train_epoch ---------


def official_step(model: LateFusion, batch, labels, lr: float, alpha: float, conv_only: bool, noise_seed: int):
    """Straight from the official loop: CE(out) backward; concat split scores with b/2, summed per
    sample; ratio_v = score_v / score_a; 1 - tanh(alpha * relu(ratio)) on the leader (audio on a tie);
    grad * coeff + N(0, std(grad) + 1e-8) on the audio/visual parameters (4-D only when conv_only)."""
    a, v = (model.encoders[m](batch[m]) for m in ("audio", "visual"))
    head = model.shared_head
    out = head(torch.cat([a, v], dim=1))
    width = a.shape[1]
    out_a = a @ head.weight[:, :width].T + head.bias / 2
    out_v = v @ head.weight[:, width:].T + head.bias / 2
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(out, labels).backward()
    score_a = sum(torch.softmax(out_a, dim=1)[i][labels[i]] for i in range(len(labels)))
    score_v = sum(torch.softmax(out_v, dim=1)[i][labels[i]] for i in range(len(labels)))
    ratio_v = (score_v / score_a).detach()
    if ratio_v > 1:
        coeff = {"audio": 1.0, "visual": 1 - math.tanh(alpha * max(float(ratio_v), 0.0))}
    else:
        coeff = {"audio": 1 - math.tanh(alpha * max(float(1 / ratio_v), 0.0)), "visual": 1.0}
    gen = torch.Generator().manual_seed(noise_seed)
    for name, param in model.named_parameters():
        layer = name.split(".")[1] if name.startswith("encoders.") else ""
        if layer in coeff and (param.grad.dim() == 4 or not conv_only):
            std = float(param.grad.std()) if param.grad.numel() > 1 else 0.0
            noise = torch.zeros_like(param.grad).normal_(0, std + 1e-8, generator=gen)
            param.grad = param.grad * coeff[layer] + noise
    with torch.no_grad():
        for param in model.parameters():
            param -= lr * param.grad


@pytest.mark.parametrize("conv_only", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_engine_step_matches_the_official_update(conv_only, seed):
    lr, alpha, clock_seed = 0.5, 0.8, 9
    batch, labels = make_batch(seed=10 + seed, audio_boost=float(seed))  # seed 0: visual may lead
    reference = make_model(seed=seed)
    official_step(reference, batch, labels, lr, alpha, conv_only, gradient_seed(clock_seed, 0, 0))

    model = make_model(seed=seed)
    obj = build_objective("ogm_ge", {"alpha": alpha, "modulated_params": "conv" if conv_only else "all"})
    obj.bind(model.modalities, CLASSES, model.info)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    clock = StepClock(0, 0, 1, seed=clock_seed)
    train_batch(model, obj, optimizer, batch, labels, clock, DistInfo(), ProcessGroup(), None, SumCounter())
    untouched = make_model(seed=seed).state_dict()
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)
        assert not torch.equal(value, untouched[key]), key  # the step moved it: a real comparison


# -- variants, state ----------------------------------------------------------------------------


def test_variants_name_real_switches():
    assert OGMGE.variants["official"] == ("objective.modulated_params=conv",)
    assert set(OGMGE.variants) == {"official", "ogm", "continuous"}
    assert OBJECTIVES["ogm_ge"].cls is OGMGE
    ogm = build_objective("ogm_ge", {"noise_scale": 0.0})
    model = make_model()
    ogm.bind(model.modalities, CLASSES, model.info)
    result = backward_once(model, ogm, *make_batch())
    before = grads(model)
    ogm.perturb_gradients(gradient_context(model, result))
    k = float(ogm.step_modulation(0)["coeff"][0])
    for key, g in grads(model).items():
        factor = k if key.startswith("encoders.audio.") else 1.0
        torch.testing.assert_close(g, factor * before[key], rtol=1e-6, atol=0)  # OGM: no noise anywhere


def test_official_variant_on_linear_encoders_changes_nothing():
    # The official filter keeps 4-D gradients only: an MLP encoder is neither scaled nor noised.
    torch.manual_seed(0)
    encoders = {m: nn.Sequential(nn.Linear(d, 4)) for m, d in INPUT_DIMS.items()}
    for enc in encoders.values():
        enc.out_dim = 4
    model = LateFusion(encoders, CLASSES, fusion="concat")
    obj = build_objective("ogm_ge", {"modulated_params": "conv", "alpha": 2.0})
    obj.bind(model.modalities, CLASSES, model.info)
    gen = torch.Generator().manual_seed(0)
    batch = {m: torch.randn(6, d, generator=gen) for m, d in INPUT_DIMS.items()}
    result = backward_once(model, obj, batch, torch.tensor([0, 1, 2, 0, 1, 2]))
    before = grads(model)
    obj.perturb_gradients(gradient_context(model, result))
    assert all(torch.equal(before[k], g) for k, g in grads(model).items())


def test_epoch_metrics_and_state_round_trip():
    obj = make_objective(start_epoch=0)
    one = torch.tensor(1.0)
    stats = {
        "ogm_ratio": (torch.tensor(3.0), torch.tensor(2.0)),
        "ogm_coeff_audio": (torch.tensor(1.5), torch.tensor(2.0)),
        "ogm_score_audio": (torch.tensor(6.0), torch.tensor(8.0)),
        "ogm_dominant_audio": (one, torch.tensor(2.0)),
    }
    assert obj.on_epoch_end(0, stats, DistInfo()) == []
    metrics = obj.epoch_metrics()
    assert metrics == {
        "ogm_modulating": 1.0,
        "ogm_ratio": 1.5,
        "ogm_coeff_audio": 0.75,
        "ogm_score_audio": 0.75,
        "ogm_dominant_audio": 0.5,
    }
    fresh = make_objective()
    fresh.load_state_dict(obj.state_dict())
    assert fresh.epoch_metrics() == metrics


def test_bind_needs_two_modalities():
    with pytest.raises(ValueError, match="two modalities"):
        make_objective(modalities=("audio",))
