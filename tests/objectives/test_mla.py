"""MLA (docs/methods/mla.md): entropy weights, the projector by hand, the official step order, test-time fusion."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from mmbalance.engine.distributed import ProcessGroup
from mmbalance.engine.metrics import SumCounter
from mmbalance.engine.steps import StepClock, evaluate, train_batch
from mmbalance.models.fusion import LateFusion
from mmbalance.models.shared_head import batch_entropy_weights, entropy_weights, shared_fuse
from mmbalance.objectives import OBJECTIVES, build_objective
from mmbalance.objectives.base import DistInfo, ForwardContext, StepInputs
from mmbalance.objectives.mla import MLA, MLAParams, project, projector_update

LN3 = math.log(3.0)
# exp(-H) = prod_c p_c^{p_c}: 1/2 for p = (1/2, 1/2), 0.75^0.75 * 0.25^0.25 = 0.5698768 for p = (3/4, 1/4).
W_UNIFORM_VS_3_1 = 0.5 / (0.5 + 0.5698768)  # 0.467344: the uniform modality's weight


class Encoder(nn.Module):
    def __init__(self, in_dim: int, out_dim: int = 4):
        super().__init__()
        self.net = nn.Linear(in_dim, out_dim)
        self.out_dim = out_dim

    def forward(self, x):
        return torch.relu(self.net(x))


def make_model(mods=("a", "v"), classes=3, in_dim=5, width=4, seed=0) -> LateFusion:
    torch.manual_seed(seed)
    return LateFusion({m: Encoder(in_dim, width) for m in mods}, classes, fusion="shared")


def make_batches(mods=("a", "v"), n_batches=3, batch=8, in_dim=5, classes=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        y = torch.randint(0, classes, (batch,), generator=gen)
        data = {}
        for i, m in enumerate(mods):
            x = torch.randn(batch, in_dim, generator=gen)
            x[:, i] += 1.5 * y.float()  # each modality carries the label in its own feature
            data[m] = x
        out.append((data, y))
    return out


def bound(model: LateFusion, **params) -> MLA:
    objective = MLA(MLAParams(**params))
    objective.bind(model.modalities, model.num_classes, model.info)
    return objective


# -- §4 test-time fusion ---------------------------------------------------------------------------


def test_entropy_weights_hand_checked():
    # sample 0: a uniform, v (3/4, 1/4); sample 1: the other way round.
    z_a = torch.tensor([[0.0, 0.0], [LN3, 0.0]])
    z_v = torch.tensor([[LN3, 0.0], [0.0, 0.0]])
    w = entropy_weights(torch.stack([z_a, z_v]))  # [M, B]
    expected = torch.tensor([[W_UNIFORM_VS_3_1, 1 - W_UNIFORM_VS_3_1], [1 - W_UNIFORM_VS_3_1, W_UNIFORM_VS_3_1]])
    torch.testing.assert_close(w, expected, atol=1e-6, rtol=0)
    fused = shared_fuse({"a": z_a, "v": z_v}, "entropy")
    torch.testing.assert_close(fused[0], torch.tensor([(1 - W_UNIFORM_VS_3_1) * LN3, 0.0]), atol=1e-6, rtol=0)


def official_gating_weights(out_1, out_2):
    """main.py's calculate_entropy / calculate_gating_weights, written out: softmax over dim 0."""

    def entropy(output):
        p = torch.softmax(output, dim=0)
        return -torch.sum(p * torch.log(p))

    e1, e2 = entropy(out_1), entropy(out_2)
    top = max(e1, e2)
    g1, g2 = torch.exp(top - e1), torch.exp(top - e2)
    return g1 / (g1 + g2), g2 / (g1 + g2)


def test_batch_entropy_weights_are_the_official_batch_axis_rule():
    z_a = torch.zeros(2, 2)  # H = 4 * (1/2 ln 2) = 1.386294 over the [B, C] tensor
    z_v = torch.tensor([[LN3, 0.0], [0.0, 0.0]])  # column 0 over the batch: (3/4, 1/4); column 1 uniform
    w = batch_entropy_weights(torch.stack([z_a, z_v]))  # [M]
    # H_a - H_v = 2 ln 2 - (0.562335 + ln 2) = 0.130812 -> w_a = 1 / (1 + e^0.130812) = 0.467344
    torch.testing.assert_close(w, torch.tensor([0.467344, 0.532656]), atol=1e-6, rtol=0)
    ref = official_gating_weights(z_a, z_v)
    torch.testing.assert_close(w, torch.stack(ref), atol=1e-6, rtol=0)
    # One weight for the whole batch; the per-sample rule weighs the all-uniform sample 1 equally.
    torch.testing.assert_close(entropy_weights(torch.stack([z_a, z_v]))[:, 1], torch.tensor([0.5, 0.5]))


def identity_model(rule_classes=3) -> LateFusion:
    """Encoders and head are identities, so the unimodal logits are the inputs themselves."""

    class Identity(nn.Module):
        out_dim = rule_classes

        def forward(self, x):
            return x

    model = LateFusion({"a": Identity(), "v": Identity()}, rule_classes, fusion="shared")
    with torch.no_grad():
        model.shared_head.weight.copy_(torch.eye(rule_classes))
        model.shared_head.bias.zero_()
    return model


# Sample 0: audio is split between classes 1 and 2 (high entropy), visual fairly sure of class 0.
# Mean or the official fixed 0.55/0.45 fusion: argmax [2.5, 3, 2.9] -> class 1 (wrong). Entropy
# weights: H_a = 0.7929, H_v = 0.5046 -> w = (0.4284, 0.5716) -> [1.429, 1.285, 1.242] -> class 0 (right).
EVAL_BATCH = (
    {"a": torch.tensor([[0.0, 3.0, 2.9], [0.0, 0.0, 4.0]]), "v": torch.tensor([[2.5, 0.0, 0.0], [0.0, 1.0, 0.0]])},
    torch.tensor([0, 2]),
)


@pytest.mark.parametrize(("params", "accuracy"), [({}, 1.0), ({"fusion_rule": "fixed"}, 0.5)])
def test_evaluation_scores_the_objectives_test_time_fusion(params, accuracy):
    model = identity_model()
    objective = bound(model, **params)
    counter = evaluate(model, objective, [EVAL_BATCH], epoch=0)
    means = counter.means(lambda t: t)
    assert means["acc_fused"] == pytest.approx(accuracy)
    assert means["acc_a"] == pytest.approx(0.5) and means["acc_v"] == pytest.approx(0.5)
    weights = entropy_weights(torch.stack([EVAL_BATCH[0]["a"], EVAL_BATCH[0]["v"]]))
    torch.testing.assert_close(weights[:, 0], torch.tensor([0.4284, 0.5716]), atol=1e-4, rtol=0)
    # The mean fusion of the same logits gets sample 0 wrong: the weights decide it.
    _, plain = model(EVAL_BATCH[0], ForwardContext(fusion_weights={"a": 0.5, "v": 0.5}))
    assert plain.fused_logits.argmax(1).tolist() == [1, 2]


def test_fixed_fusion_uses_the_official_weights_and_refuses_a_wrong_count():
    model = identity_model()
    assert bound(model, fusion_rule="fixed").forward_context("eval", 0).fusion_weights == {"a": 0.55, "v": 0.45}
    assert bound(model, fusion_rule="fixed", fixed_weights=[0.2, 0.8]).weights == {"a": 0.2, "v": 0.8}
    with pytest.raises(ValueError, match="objective.fixed_weights"):
        bound(model, fusion_rule="fixed", fixed_weights=[1.0])
    assert bound(model).forward_context("eval", 0) == ForwardContext(fusion_rule="entropy")


# -- §3 projector ------------------------------------------------------------------------------------


def test_projector_update_by_hand_in_2d():
    P = projector_update(torch.eye(2), torch.tensor([3.0, 4.0]), 1.0, "scalar", False)
    torch.testing.assert_close(P, torch.tensor([[17.0, -12.0], [-12.0, 10.0]]) / 26)
    torch.testing.assert_close(P @ torch.tensor([3.0, 4.0]), torch.tensor([3.0, 4.0]) / 26)  # alpha/(alpha+|r|^2)
    normed = projector_update(torch.eye(2), torch.tensor([3.0, 4.0]), 1.0, "scalar", True)
    torch.testing.assert_close(normed, torch.tensor([[17.0, -12.0], [-12.0, 10.0]]) / math.sqrt(677))
    # Official torch.mm(k, r): (alpha + k r^T) = [[2, 3], [3, 5]] divides k k^T = [[1, 2], [2, 4]] entrywise.
    odd = projector_update(torch.eye(2), torch.tensor([1.0, 2.0]), 1.0, "elementwise", False)
    torch.testing.assert_close(odd, torch.tensor([[0.5, -2 / 3], [-2 / 3, 0.2]]))


def test_projected_gradient_is_orthogonal_to_the_stored_feature_subspace():
    gen = torch.Generator().manual_seed(0)
    r1, r2 = torch.randn(5, generator=gen, dtype=torch.float64), torch.randn(5, generator=gen, dtype=torch.float64)
    P = torch.eye(5, dtype=torch.float64)
    for r in (r1, r2):
        P = projector_update(P, r, 1e-8, "scalar", False)
    grad = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    projected = project(grad, P)
    for r in (r1, r2):  # the head's response to a stored feature no longer changes
        assert (projected @ r).abs().max() < 1e-6 * grad.norm() * r.norm()
    basis = torch.linalg.qr(torch.stack([r1, r2], 1), mode="complete").Q[:, 2:]  # [5, 3], orthogonal to r1, r2
    torch.testing.assert_close(projected @ basis, grad @ basis, atol=1e-6, rtol=0)  # the rest is untouched


# -- §2 + §3 against the official step order ------------------------------------------------------


def reference_run(model, batches, epochs, *, project_weight, before, elementwise, normalize, decay, skip_first):
    """``main.py`` ``train_epoch`` with ``--gs_flag`` and ``GSPlugin.before_update``, written out.

    One forward of every encoder per batch; then per modality in order: the shared head on its
    features (after the earlier modalities' steps), CE, backward, the gradient modification,
    step. ``project_weight`` False is the released code (its ``module.weight`` check never matches
    a bare ``nn.Linear``'s ``weight``); True with the official flags is the code before 11ae1ee.
    The official flags: ``before``, ``elementwise`` (``torch.mm(k, r)``), ``normalize``, ``decay``,
    ``skip_first`` (``exp_count != 0``); others give the OWM form this module defaults to.
    """
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    head = model.shared_head
    Pl = torch.eye(head.weight.shape[1])
    exp_count = 0
    for _ in range(epochs):
        for b, (batch, y) in enumerate(batches):
            optimizer.zero_grad(set_to_none=True)
            feats = [model.encoders[m](batch[m]) for m in model.modalities]
            for h in feats:
                loss = nn.functional.cross_entropy(head(h), y)
                loss.backward()
                alpha = (1.0 * 0.1 ** (b / len(batches) + 1)) if decay else 0.1
                if project_weight and not (skip_first and exp_count == 0):
                    r = torch.mean(h.detach(), 0, True)  # [1, D]

                    def update(P):
                        k = torch.mm(P, torch.t(r))  # [D, 1]
                        denom = alpha + (torch.mm(k, r) if elementwise else torch.mm(r, k))
                        P = torch.sub(P, torch.mm(k, torch.t(k)) / denom)
                        return P / torch.norm(P, p="fro") if normalize else P

                    if before:
                        Pl = update(Pl)
                    head.weight.grad.data = torch.mm(head.weight.grad.data, torch.t(Pl))
                    if not before:
                        Pl = update(Pl)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                exp_count += 1
    return model


def official_valid_accuracy(model, batches) -> float:
    """``valid`` with ``--gs_flag --dynamic``: per batch, the batch-axis entropy weights."""
    correct = total = 0
    with torch.no_grad():
        for batch, y in batches:
            out_a, out_v = (model.shared_head(model.encoders[m](batch[m])) for m in model.modalities)
            w_a, w_v = official_gating_weights(out_a, out_v)
            correct += int(((out_a * w_a + out_v * w_v).argmax(1) == y).sum())
            total += len(y)
    return correct / total


def engine_run(model, objective, batches, epochs):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    step = 0
    for epoch in range(epochs):
        for batch, y in batches:
            clock = StepClock(step, epoch, len(batches))
            train_batch(model, objective, optimizer, batch, y, clock, DistInfo(), ProcessGroup(), None, SumCounter())
            step += 1
    return model


OFFICIAL_FLAGS = dict(before=True, elementwise=True, normalize=True, decay=True, skip_first=True)
OWM_FLAGS = dict(before=False, elementwise=False, normalize=False, decay=False, skip_first=False)
CASES = {
    "official": ("official", dict(project_weight=False, **OFFICIAL_FLAGS)),
    "official_projection": ("official_projection", dict(project_weight=True, **OFFICIAL_FLAGS)),
    "default": (None, dict(project_weight=True, **OWM_FLAGS)),
}


def variant_params(label):
    """An entry of ``MLA.variants`` as Params keywords (``true``/``false`` as booleans)."""
    if label is None:
        return {}
    overrides = (o.split("=") for o in MLA.variants[label])
    return {key.split(".", 1)[1]: {"true": True, "false": False}.get(value, value) for key, value in overrides}


@pytest.mark.parametrize("case", list(CASES))
def test_engine_matches_the_official_step_order(case):
    label, flags = CASES[case]
    batches, epochs = make_batches(n_batches=3), 2
    reference = reference_run(make_model(), batches, epochs, **flags)
    model = make_model()
    objective = bound(model, **variant_params(label))
    engine_run(model, objective, batches, epochs)
    untouched = make_model().state_dict()
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, atol=1e-6, rtol=0, msg=key)
        assert not torch.equal(value, untouched[key]), key  # the run moved it: a real comparison
    if case == "official":  # the released code's test-time rule, batch by batch
        test = make_batches(n_batches=2, seed=9)
        means = evaluate(model, objective, test, epoch=epochs).means(lambda t: t)
        assert means["acc_fused"] == pytest.approx(official_valid_accuracy(reference, test), abs=1e-9)


def test_projection_changes_the_run_so_the_reference_comparison_can_fail():
    batches = make_batches(n_batches=3)
    projected = reference_run(make_model(), batches, 2, project_weight=True, **OFFICIAL_FLAGS)
    plain = reference_run(make_model(), batches, 2, project_weight=False, **OFFICIAL_FLAGS)
    assert (projected.shared_head.weight - plain.shared_head.weight).abs().max() > 1e-3


def test_later_modality_loss_sees_the_head_after_the_earlier_step():
    model = make_model()
    objective = bound(model, projection="none")
    ((batch, y),) = make_batches(n_batches=1)
    features, outputs = model(batch, objective.forward_context("train", 0))
    calls = []

    def recompute():
        calls.append(model.shared_head.weight.detach().clone())
        return model.heads_forward(features)

    result = objective.step(StepInputs(features, outputs, y, 0, 0, 1, "train", DistInfo(), recompute))
    assert [g.modalities for g in result.losses] == [("a",), ("v",)] and callable(result.losses[1].loss)
    torch.testing.assert_close(result.losses[0].value(), nn.functional.cross_entropy(outputs.unimodal_logits["a"], y))
    with torch.no_grad():
        model.shared_head.weight[0].add_(1.0)  # a step that favours class 0 for every sample
    later = result.losses[1].value()
    assert len(calls) == 1 and torch.equal(calls[0], model.shared_head.weight.detach())
    assert not torch.allclose(later, nn.functional.cross_entropy(outputs.unimodal_logits["v"], y))


# -- §5 ranks, state, configuration -------------------------------------------------------------------


def test_feature_means_are_reduced_as_sums_and_counts():
    model = make_model()
    ((batch, y),) = make_batches(n_batches=1)
    seen = []

    def two_equal_ranks(t):
        seen.append(t.clone())
        return 2 * t  # both ranks hold this batch: the sums and the count double, the mean does not

    for world, objective in ((DistInfo(), bound(model)), (DistInfo(0, 2, two_equal_ranks), bound(model))):
        features, outputs = model(batch)
        objective.step(StepInputs(features, outputs, y, 0, 0, 1, "train", world, lambda: outputs))
        means = [objective._sums[i * 4 : (i + 1) * 4] / objective._sums[-1] for i in range(2)]
        for m, mean in zip(model.modalities, means):
            torch.testing.assert_close(mean, features[m].detach().mean(0))
    assert seen[0].shape == (2 * 4 + 1,) and seen[0][-1] == len(y)


def test_bind_refuses_unequal_widths_naming_the_recipe_keys():
    model = LateFusion({"a": Encoder(5, 4), "v": Encoder(5, 6)}, 3, fusion="shared")
    assert isinstance(model.heads["v"], nn.Identity) and model.heads["a"].out_features == 6  # adapter to 6
    assert model(make_batches()[0][0])[1].fused_logits.shape == (8, 3)
    with pytest.raises(ValueError, match=r"modalities\.a\.params\.out_dim=4, modalities\.v\.params\.out_dim=6"):
        bound(model)


def test_state_dict_round_trips_the_projector():
    model = make_model()
    objective = bound(model)
    engine_run(model, objective, make_batches(n_batches=2), 1)
    state = objective.state_dict()
    assert state["projector"].shape == (4, 4) and 0 < objective.epoch_metrics()["mla_projector_trace"] < 1
    fresh = bound(make_model())
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.projector, objective.projector)
    assert (fresh._epoch, fresh._epoch_start) == (0, 0)


def test_registered_with_the_shared_fusion_and_real_variant_switches():
    assert OBJECTIVES["mla"].cls is MLA and MLA.requirements.fusions == ("shared",)
    for label in MLA.variants:
        assert isinstance(build_objective("mla", variant_params(label)), MLA)


@pytest.mark.parametrize("bad", [{"alpha": 0.0}, {"fusion_rule": "mean"}, {"projection": "always"}, {"lam": 1.0}])
def test_params_reject_invalid_values(bad):
    with pytest.raises(ValidationError):
        MLAParams(**bad)
