"""MNL objective: the hand-checked numbers of docs/methods/mnl.md §1.9 plus variants, M > 2, DDP and state."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from mmbalance.models.fusion import LateFusion
from mmbalance.objectives import build_objective
from mmbalance.objectives.base import DistInfo, HeadOutputs, StepInputs
from mmbalance.objectives.lf import LF, LFParams
from mmbalance.objectives.mnl import MNL, MNLParams, competitor_classes, criteria, guidance_masks, pair_losses

TOL = dict(atol=1e-4, rtol=0)

# §1.9: C = 3, lambda = 0.7, modalities in official order (text first, image second).
Z_T = torch.tensor([[2.0, 0.5, 1.0], [0.2, 1.2, 1.0], [2.0, 0.5, 1.95]])
Z_V = torch.tensor([[1.0, 0.8, 0.9], [0.0, 0.1, 1.5], [1.0, 0.9, -3.0]])
Y = torch.tensor([0, 2, 0])
# §1.9 2x3 variant.
Z_T2 = torch.tensor([[2.0, 0.5, 1.0], [0.2, 0.1, 1.5]])
Z_V2 = torch.tensor([[1.0, 0.8, 0.9], [0.0, 1.2, 1.0]])
Y2 = torch.tensor([0, 2])


def bound(modalities=("t", "v"), fusion="mean", **params) -> MNL:
    objective = MNL(MNLParams(**params))
    objective.bind(list(modalities), 3, {"fusion": fusion})
    return objective


def step_inputs(logits: dict[str, torch.Tensor], labels: torch.Tensor, epoch: int = 0, world: DistInfo | None = None):
    fused = torch.stack(list(logits.values())).mean(0)  # [B, C], MNL's mean fusion
    outputs = HeadOutputs(unimodal_logits=logits, fused_logits=fused, head_logits={m: [z] for m, z in logits.items()})
    return StepInputs(
        {}, outputs, labels, step=0, epoch=epoch, steps_per_epoch=1, phase="train", world=world or DistInfo()
    )


def run_step(objective: MNL, z_t=Z_T, z_v=Z_V, labels=Y, **kwargs):
    return objective.step(step_inputs({"t": z_t, "v": z_v}, labels, **kwargs))


def official_masks(z_t=Z_T, z_v=Z_V, labels=Y, guidance="confidence_ucom", competitor="fused"):
    pi, xi = criteria(torch.stack([z_t, z_v]), (z_t + z_v) / 2, labels, competitor)
    return guidance_masks(pi, xi, guidance)


def test_mnl_criteria_match_hand_computed_values():
    assert competitor_classes((Z_T + Z_V) / 2, Y).tolist() == [2, 1, 1]
    pi, xi = criteria(torch.stack([Z_T, Z_V]), (Z_T + Z_V) / 2, Y, "fused")
    torch.testing.assert_close(xi, torch.tensor([[1.0, -0.2, 1.5], [0.1, 1.4, 0.1]]), **TOL)
    torch.testing.assert_close(pi, torch.tensor([[0.6285, 0.3744, 0.4599], [0.3672, 0.6804, 0.5200]]), **TOL)


def test_mnl_masks_follow_confidence_and_margin():
    masks = official_masks()
    assert masks[0, 1].tolist() == [True, False, False]  # t -> v
    assert masks[1, 0].tolist() == [False, True, False]  # v -> t


def test_mnl_sample_with_disagreeing_criteria_gets_no_guidance():
    # Sample 2: text has the larger margin but the lower confidence.
    masks = official_masks()
    assert not masks[:, :, 2].any()
    result = run_step(bound())
    assert result.stats["mnl_unguided"][0].item() == 1.0


def test_mnl_official_losses_match_spec():
    result = run_step(bound())
    metrics = result.metrics
    base = metrics["loss_fused"] + metrics["loss_t"] + metrics["loss_v"]
    torch.testing.assert_close(base, torch.tensor(2.0138), **TOL)
    torch.testing.assert_close(metrics["loss_mnl_t_to_v"], torch.tensor(0.1443), **TOL)
    torch.testing.assert_close(metrics["loss_mnl_v_to_t"], torch.tensor(0.1404), **TOL)
    torch.testing.assert_close(result.losses[0].value(), torch.tensor(2.2985), **TOL)
    assert len(result.losses) == 1 and result.losses[0].modalities is None


def test_mnl_two_by_three_variant_matches_official_total():
    masks = official_masks(Z_T2, Z_V2, Y2)
    assert masks[0, 1].tolist() == [True, True] and not masks[1, 0].any()
    result = run_step(bound(), Z_T2, Z_V2, Y2)
    base = result.metrics["loss_fused"] + result.metrics["loss_t"] + result.metrics["loss_v"]
    torch.testing.assert_close(base, torch.tensor(2.0773), **TOL)
    torch.testing.assert_close(result.metrics["loss_mnl_t_to_v"], torch.tensor(0.4300), **TOL)
    torch.testing.assert_close(result.losses[0].value(), torch.tensor(2.5073), **TOL)


def test_mnl_paper_nontarget_terms_via_selected_normalisation():
    # Paper form without lambda: lam=1, no target CE, mean over the (single) guided sample per pair.
    result = run_step(bound(lam=1.0, include_target_ce=False, normalize="selected"))
    torch.testing.assert_close(result.metrics["loss_mnl_t_to_v"], torch.tensor(0.4234), **TOL)
    torch.testing.assert_close(result.metrics["loss_mnl_v_to_t"], torch.tensor(0.4019), **TOL)
    per_sample = run_step(bound(lam=1.0, include_target_ce=False, normalize="B")).metrics
    torch.testing.assert_close(per_sample["loss_mnl_t_to_v"], torch.tensor(0.4234 / 3), **TOL)


def test_mnl_weak_gradient_matches_closed_form():
    z = torch.stack([Z_T, Z_V]).requires_grad_()  # [2, 3, 3]
    loss = pair_losses(z, Y, official_masks(), 0.7, "nontarget", True, "BC")[0, 1]  # L_{t->v}
    (grad,) = torch.autograd.grad(loss, z)
    torch.testing.assert_close(grad[1, 0], torch.tensor([-0.0597, 0.0312, 0.0285]), **TOL)
    assert grad[1, 1:].abs().max() == 0  # unguided rows get nothing
    # S (q - t) / 9 with S = 1 + lam (1 - p_t,y) and t = [1, lam p_t,1, lam p_t,2] / S.
    p_t, q_v = Z_T[0].softmax(-1), Z_V[0].softmax(-1)
    s = 1 + 0.7 * (1 - p_t[0])
    target = torch.cat([torch.ones(1), 0.7 * p_t[1:]]) / s
    torch.testing.assert_close(s, torch.tensor(1.26), **TOL)
    torch.testing.assert_close(target, torch.tensor([0.7936, 0.0779, 0.1284]), **TOL)
    torch.testing.assert_close(grad[1, 0], s * (q_v - target) / 9, **TOL)


def test_mnl_dominant_distribution_receives_no_guidance_gradient():
    z = torch.stack([Z_T, Z_V]).requires_grad_()
    for scope in ("nontarget", "all"):
        pairs = pair_losses(z, Y, official_masks(), 0.7, scope, True, "BC")
        (grad_tv,) = torch.autograd.grad(pairs[0, 1], z, retain_graph=True)
        (grad_vt,) = torch.autograd.grad(pairs[1, 0], z)
        assert grad_tv[0].abs().max() == 0 and grad_tv[1].abs().max() > 0  # t is dominant
        assert grad_vt[1].abs().max() == 0 and grad_vt[0].abs().max() > 0  # v is dominant


def test_mnl_guidance_gradient_through_step_reaches_only_weak_logits():
    z_t, z_v = Z_T.clone().requires_grad_(), Z_V.clone().requires_grad_()
    with_guidance = run_step(bound(), z_t, z_v).losses[0].value()
    lf_only = run_step(bound(warmup_epochs=1), z_t, z_v).losses[0].value()
    grad_t, grad_v = torch.autograd.grad(with_guidance - lf_only, (z_t, z_v))
    # The LF parts cancel up to float rounding (~1e-9); the guidance gradient is ~1e-2.
    assert grad_v[0].abs().max() > 1e-3 and grad_t[0].abs().max() < 1e-7  # sample 0: t guides v
    assert grad_t[1].abs().max() > 1e-3 and grad_v[1].abs().max() < 1e-7  # sample 1: v guides t
    assert grad_t[2].abs().max() < 1e-7 and grad_v[2].abs().max() < 1e-7  # sample 2: no guidance


def lf_loss(z_t=Z_T, z_v=Z_V, labels=Y) -> torch.Tensor:
    lf = LF(LFParams(omega=1.0))
    lf.bind(["t", "v"], 3, {"fusion": "mean"})
    return lf.step(step_inputs({"t": z_t, "v": z_v}, labels)).losses[0].value()


def test_mnl_loss_equals_lf_during_warmup():
    objective = bound(warmup_epochs=2)
    for epoch in (0, 1):
        assert torch.equal(run_step(objective, epoch=epoch).losses[0].value(), lf_loss())
    assert not torch.equal(run_step(objective, epoch=2).losses[0].value(), lf_loss())


def test_mnl_loss_equals_lf_when_lam_is_zero_without_target_ce():
    assert torch.equal(run_step(bound(lam=0.0, include_target_ce=False)).losses[0].value(), lf_loss())


def test_mnl_lam_zero_keeps_official_target_ce_on_guided_samples():
    # Official code with weight1 = 0 still adds -log q_w,y on guided samples, divided by B*C.
    extra = run_step(bound(lam=0.0)).losses[0].value() - lf_loss()
    ce_v0 = -Z_V[0].log_softmax(-1)[0]
    ce_t1 = -Z_T[1].log_softmax(-1)[2]
    torch.testing.assert_close(extra, (ce_v0 + ce_t1) / 9, **TOL)


def test_mnl_two_modality_ties_go_to_second_modality():
    masks = official_masks(Z_T, Z_T, Y)  # identical logits: every criterion ties
    assert masks[1, 0].all() and not masks[0, 1].any()


def test_mnl_three_modality_ties_get_no_guidance():
    z = torch.stack([Z_T, Z_T, Z_V])  # modalities 0 and 1 tie everywhere
    pi, xi = criteria(z, z.mean(0), Y, "fused")
    masks = guidance_masks(pi, xi, "confidence_ucom")
    assert not masks[0, 1].any() and not masks[1, 0].any()
    assert torch.equal(masks[0, 2], masks[1, 2]) and masks[0, 2].tolist() == [True, False, False]


def test_mnl_three_modalities_guide_every_strictly_dominated_pair():
    torch.manual_seed(0)
    z = torch.randn(3, 64, 4)  # [M, B, C]
    labels = torch.randint(0, 4, (64,))
    pi, xi = criteria(z, z.mean(0), labels, "fused")
    masks = guidance_masks(pi, xi, "confidence_ucom")
    for d in range(3):
        for w in range(3):
            expected = (pi[d] > pi[w]) & (xi[d] > xi[w])
            assert torch.equal(masks[d, w], expected)
    assert masks.any()


def test_mnl_confidence_only_guides_on_confidence_alone():
    masks = official_masks(guidance="confidence")
    assert masks[0, 1].tolist() == [True, False, False]
    assert masks[1, 0].tolist() == [False, True, True]  # sample 2: v is more confident


def test_mnl_prior_modality_guides_every_other_modality_on_all_samples():
    objective = bound(("a", "b", "c"), guidance="prior:b")
    logits = {"a": Z_T, "b": Z_V, "c": Z_T.flip(0)}
    result = objective.step(step_inputs(logits, Y))
    assert result.stats["mnl_guided_b_to_a"][0].item() == 3 and result.stats["mnl_guided_b_to_c"][0].item() == 3
    others = [k for k in result.stats if k.startswith("mnl_guided") and not k.startswith("mnl_guided_b_")]
    assert others and all(result.stats[k][0].item() == 0 for k in others)


def test_mnl_prior_naming_unknown_modality_is_refused_with_allowed_list():
    with pytest.raises(ValueError, match="prior:t.*prior:v"):
        bound(guidance="prior:audio")


def test_mnl_own_competitor_changes_margin_and_guidance():
    pi, xi = criteria(torch.stack([Z_T, Z_V]), (Z_T + Z_V) / 2, Y, "own")
    torch.testing.assert_close(xi, torch.tensor([[1.0, -0.2, 0.05], [0.1, 1.4, 0.1]]), **TOL)
    masks = official_masks(competitor="own")
    assert masks[1, 0].tolist() == [False, True, True]  # sample 2 now guided by v


def test_mnl_all_class_scope_adds_dominant_target_mass():
    nontarget = run_step(bound(scope="nontarget")).metrics["loss_mnl_t_to_v"]
    all_class = run_step(bound(scope="all")).metrics["loss_mnl_t_to_v"]
    p_t, log_q_v = Z_T[0].softmax(-1), Z_V[0].log_softmax(-1)
    torch.testing.assert_close(all_class - nontarget, -0.7 * p_t[0] * log_q_v[0] / 9, **TOL)


def test_mnl_selected_normalisation_uses_global_guided_count():
    # Another rank contributes 3 more guided samples per pair: denominator = (1 + 3) / 2 ranks.
    world = DistInfo(rank=0, world_size=2, all_reduce_sum=lambda t: t + 3)
    local = run_step(bound(lam=1.0, include_target_ce=False, normalize="selected"), world=world).metrics
    torch.testing.assert_close(local["loss_mnl_t_to_v"], torch.tensor(0.4234 * 2 / 4), **TOL)


def test_mnl_guided_fractions_are_exact_over_accumulated_stats():
    objective = bound()
    first, second = run_step(objective).stats, run_step(objective, Z_T2, Z_V2, Y2).stats
    summed = {k: (first[k][0] + second[k][0], first[k][1] + second[k][1]) for k in first}
    assert objective.on_epoch_end(0, summed, DistInfo()) == []
    metrics = objective.epoch_metrics()
    assert metrics["mnl_guided_t_to_v"] == pytest.approx(3 / 5)
    assert metrics["mnl_guided_v_to_t"] == pytest.approx(1 / 5)
    assert metrics["mnl_unguided"] == pytest.approx(1 / 5)
    assert metrics["mnl_active"] == 1.0


def test_mnl_warmup_reports_no_guided_samples():
    stats = run_step(bound(warmup_epochs=1)).stats
    assert stats["mnl_guided_t_to_v"][0].item() == 0 and stats["mnl_unguided"][0].item() == 3


def test_mnl_state_dict_round_trips():
    objective = bound()
    objective.on_epoch_end(0, run_step(objective).stats, DistInfo())
    restored = bound()
    restored.load_state_dict(objective.state_dict())
    assert restored.epoch_metrics() == objective.epoch_metrics() and restored.state_dict() == objective.state_dict()


@pytest.mark.parametrize(
    "bad",
    [
        {"lam": -0.1},
        {"warmup_epochs": -1},
        {"guidance": "ucom"},
        {"guidance": "prior:"},
        {"guidance": "prior:a b"},
        {"scope": "target"},
        {"normalize": "C"},
        {"competitor": "max"},
        {"include_target_ce": "maybe"},
        {"weight1": 0.7},
    ],
)
def test_mnl_invalid_params_are_refused(bad):
    with pytest.raises(ValidationError):
        MNLParams(**bad)
    if "weight1" not in bad:
        with pytest.raises(ValidationError):
            build_objective("mnl", bad)  # a dict is validated like a recipe section


def test_mnl_declares_fusions_with_per_modality_heads():
    assert MNL.requirements.fusions == ("mean", "sum", "pdf") and MNL.requirements.warmup_key == "warmup_epochs"
    assert MNL.requirements.fusion_problem("mnl", "concat") is not None
    assert bound(fusion="sum").modalities == ["t", "v"]


class LinearEncoder(nn.Module):
    def __init__(self, in_dim: int, out_dim: int = 8):
        super().__init__()
        self.net, self.out_dim = nn.Linear(in_dim, out_dim), out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.net(x))  # [B, out_dim]


def test_mnl_trains_three_modality_model_and_loss_decreases():
    torch.manual_seed(0)
    dims = {"a": 6, "b": 5, "c": 4}
    model = LateFusion({m: LinearEncoder(d) for m, d in dims.items()}, num_classes=3, fusion="sum")
    objective = MNL(MNLParams(lam=1.0, normalize="B"))
    objective.bind(model.modalities, 3, model.info)
    labels = torch.randint(0, 3, (32,))
    batch = {m: torch.randn(32, d) + labels[:, None].float() for m, d in dims.items()}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses, guided = [], 0.0
    for step in range(30):
        features, outputs = model(batch, objective.forward_context("train", 0))
        result = objective.step(StepInputs(features, outputs, labels, step, 0, 30, "train"))
        optimizer.zero_grad(set_to_none=True)
        loss = result.losses[0].value()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        guided += sum(s.item() for k, (s, _) in result.stats.items() if k.startswith("mnl_guided"))
    assert len([k for k in result.metrics if k.startswith("loss_mnl_")]) == 6
    assert guided > 0
    assert losses[-1] < 0.7 * losses[0]
