"""PMR objective (docs/methods/pmr.md): hand-checked prototypes, PCE, coefficients and entropy term,
a loop-by-loop reference written from the official script, rank-summed scores, variants and state."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from mmbalance.objectives import OBJECTIVES, build_objective
from mmbalance.objectives.base import DistInfo, HeadOutputs, StepInputs
from mmbalance.objectives.pmr import PMR, PMRParams, entropy_weights, pce_coefficients, prototype_logits

# Two classes, two samples, features sitting exactly on their class prototypes.
H_A = torch.tensor([[0.0, 0.0], [3.0, 4.0]])  # distance 5 between the audio prototypes
H_V = torch.tensor([[0.0, 0.0], [0.0, 1.0]])  # distance 1 between the visual prototypes
LABELS = torch.tensor([0, 1])


def make_objective(modalities=("a", "v"), num_classes=2, **kwargs) -> PMR:
    obj = PMR(PMRParams(**kwargs))
    obj.bind(list(modalities), num_classes, {"fusion": "concat"})
    return obj


def inputs_for(features, labels, epoch=1, fused=None, world=None, phase="train") -> StepInputs:
    b, c = labels.shape[0], int(labels.max()) + 1
    fused = torch.zeros(b, c) if fused is None else fused
    outputs = HeadOutputs(
        unimodal_logits={m: fused for m in features}, fused_logits=fused, head_logits={m: [fused] for m in features}
    )
    return StepInputs(
        features, outputs, labels, step=0, epoch=epoch, steps_per_epoch=1, phase=phase, world=world or DistInfo()
    )


def fit_prototypes(obj: PMR, batches, epoch=0) -> None:
    """Run the steps of one epoch and hand the summed stats to on_epoch_end, as the engine does."""
    summed: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for features, labels in batches:
        for name, (s, c) in obj.step(inputs_for(features, labels, epoch=epoch)).stats.items():
            prev = summed.get(name)
            summed[name] = (s.double(), c.double()) if prev is None else (prev[0] + s, prev[1] + c)
    obj.on_epoch_end(epoch, summed, DistInfo())


def coeffs_of(result, modalities=("a", "v")) -> list[float]:
    return [float(result.stats[f"pmr_coeff_{m}"][0]) for m in modalities]


# -- hand-checked numbers ---------------------------------------------------------------------


def test_prototypes_are_class_means_over_the_epoch():
    obj = make_objective()
    fit_prototypes(obj, [({"a": H_A, "v": H_V}, LABELS), ({"a": H_A + 2.0, "v": H_V}, LABELS)])
    assert obj.prototypes["a"].tolist() == [[1.0, 1.0], [4.0, 5.0]]
    assert obj.prototypes["v"].tolist() == H_V.tolist()


def test_prototype_momentum_and_absent_class():
    obj = make_objective(momentum=0.25)
    fit_prototypes(obj, [({"a": H_A, "v": H_V}, LABELS)])
    # Epoch 1 sees class 0 only, at (4, 4): class 0 moves by 0.75 of the way, class 1 stays put.
    fit_prototypes(obj, [({"a": torch.tensor([[4.0, 4.0]]), "v": torch.tensor([[2.0, 2.0]])}, torch.tensor([0]))], 1)
    assert obj.prototypes["a"].tolist() == [[3.0, 3.0], [3.0, 4.0]]
    assert obj.prototypes["v"].tolist() == [[1.5, 1.5], [0.0, 1.0]]


def test_prototype_logits_are_negative_euclidean_distances():
    logits = prototype_logits(H_A, H_A, temperature=1.0)
    assert logits.tolist() == [[0.0, -5.0], [-5.0, 0.0]]
    assert prototype_logits(H_A, H_A, temperature=0.5).tolist() == [[0.0, -10.0], [-10.0, 0.0]]


def test_step_hand_checked_loss_coefficients_and_entropy():
    # s_a = 2 sigmoid(5) = 1.986614, s_v = 2 sigmoid(1) = 1.462117, rho_v = 1.358724,
    # c_v = 2 tanh(0.358724) = 0.688180; PCE_v = log(1 + e^-1) = 0.313262; H_a = 0.040180.
    obj = make_objective(alpha=2.0, mu=0.1)
    obj.prototypes = {"a": H_A.clone(), "v": H_V.clone()}
    result = obj.step(inputs_for({"a": H_A, "v": H_V}, LABELS))
    assert coeffs_of(result) == pytest.approx([0.0, 2 * 0.3440900], abs=1e-6)
    assert float(result.metrics["loss_pce_v"]) == pytest.approx(0.3132617, abs=1e-6)
    assert float(result.metrics["loss_pce_a"]) == pytest.approx(0.0067153, abs=1e-6)
    assert float(result.metrics["pmr_entropy_a"]) == pytest.approx(0.0401796, abs=1e-6)
    expected = math.log(2) + 2 * 0.3440900 * 0.3132617 - 0.1 * 0.0401796
    assert float(result.losses[0].value()) == pytest.approx(expected, abs=1e-6)


def test_official_step_gives_alpha_to_the_lagging_modality_and_no_entropy():
    obj = make_objective(alpha=2.0, coeff_form="official_step", mu=0.0)
    obj.prototypes = {"a": H_A.clone(), "v": H_V.clone()}
    result = obj.step(inputs_for({"a": H_A, "v": H_V}, LABELS))
    assert coeffs_of(result) == [0.0, 2.0]
    assert float(result.losses[0].value()) == pytest.approx(math.log(2) + 2 * 0.3132617, abs=1e-6)


def test_coefficient_forms_on_scores():
    scores = torch.tensor([3.0, 1.5, 3.0])
    assert pce_coefficients(scores, 1.0, "paper_tanh").tolist() == pytest.approx([0.0, math.tanh(1.0), 0.0])
    assert pce_coefficients(scores, 0.5, "official_step").tolist() == [0.0, 0.5, 0.0]
    # Equal scores: no modality lags, nothing is boosted and the entropy term is off (as the code's ratio == 1).
    equal = torch.tensor([1.0, 1.0])
    assert pce_coefficients(equal, 1.0, "official_step").tolist() == [0.0, 0.0]
    assert entropy_weights(equal, 0.1).tolist() == [0.0, 0.0]
    assert entropy_weights(torch.tensor([1.0, 2.0]), 0.1).tolist() == pytest.approx([0.0, 0.1])


def test_entropy_term_only_in_early_epochs():
    obj = make_objective(mu=0.1, entropy_epochs=2)
    obj.prototypes = {"a": H_A.clone(), "v": H_V.clone()}
    early = float(obj.step(inputs_for({"a": H_A, "v": H_V}, LABELS, epoch=1)).losses[0].value())
    late = float(obj.step(inputs_for({"a": H_A, "v": H_V}, LABELS, epoch=2)).losses[0].value())
    assert late - early == pytest.approx(0.1 * 0.0401796, abs=1e-6)


def test_running_prototypes_before_the_first_epoch_end():
    obj = make_objective(alpha=2.0, mu=0.1)
    first = obj.step(inputs_for({"a": H_A, "v": H_V}, LABELS, epoch=0))
    # The first batch's class means are exactly the prototypes of the hand-checked step.
    assert coeffs_of(first) == pytest.approx([0.0, 2 * 0.3440900], abs=1e-6)
    expected = math.log(2) + 2 * 0.3440900 * 0.3132617 - 0.1 * 0.0401796
    assert float(first.losses[0].value()) == pytest.approx(expected, abs=1e-6)
    # The second step uses the means over both batches: audio class 0 at (1, 1), class 1 at (4, 5).
    shifted = {"a": H_A + 2.0, "v": H_V}
    second = obj.step(inputs_for(shifted, LABELS, epoch=0))
    logits = prototype_logits(shifted["a"], torch.tensor([[1.0, 1.0], [4.0, 5.0]]), 1.0)
    pce_a = torch.nn.functional.cross_entropy(logits, LABELS)
    assert float(second.metrics["loss_pce_a"]) == pytest.approx(float(pce_a), abs=1e-6)
    assert obj.prototypes is None


def test_running_prototypes_leave_unseen_classes_out():
    obj = make_objective(num_classes=3, mu=0.0)
    result = obj.step(inputs_for({"a": H_A, "v": H_V}, LABELS, epoch=0, fused=torch.zeros(2, 3)))
    # Class 2 has no prototype yet: the PCE is the two-class one of the hand-checked step.
    assert float(result.metrics["loss_pce_v"]) == pytest.approx(0.3132617, abs=1e-6)
    assert torch.isfinite(result.losses[0].value())


def test_epoch_zero_and_after_modulation_ends_train_on_fused_ce_only():
    obj = make_objective(modulation_ends=3, initial_prototypes="none")
    fused = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    ce = torch.nn.functional.cross_entropy(fused, LABELS)
    first = obj.step(inputs_for({"a": H_A, "v": H_V}, LABELS, epoch=0, fused=fused))
    assert float(first.losses[0].value()) == pytest.approx(float(ce))
    obj.prototypes = {"a": H_A.clone(), "v": H_V.clone()}
    during = obj.step(inputs_for({"a": H_A, "v": H_V}, LABELS, epoch=3, fused=fused))
    after = obj.step(inputs_for({"a": H_A, "v": H_V}, LABELS, epoch=4, fused=fused))
    assert float(during.losses[0].value()) != pytest.approx(float(ce))
    assert float(after.losses[0].value()) == pytest.approx(float(ce))


def test_pce_gradient_reaches_only_the_lagging_features():
    obj = make_objective(mu=0.0)
    obj.prototypes = {"a": torch.tensor([[0.0, 0.0], [3.0, 4.0]]), "v": torch.tensor([[0.0, 0.0], [0.0, 1.0]])}
    feats = {"a": (H_A + 0.1).requires_grad_(), "v": (H_V + 0.1).requires_grad_()}
    obj.step(inputs_for(feats, LABELS)).losses[0].value().backward()
    assert feats["a"].grad is None or torch.all(feats["a"].grad == 0)
    assert feats["v"].grad.abs().sum() > 0


# -- reference written from the official script ---------------------------------------------


def reference_official(a, v, labels, proto_a, proto_v, alpha):
    """main_Prototype_grad.py's Proto branch, one sample and one prototype at a time (no fused CE)."""

    def dist(x, p):
        return torch.tensor(
            [[float(torch.sqrt(torch.dot(x[i] - p[j], x[i] - p[j]))) for j in range(len(p))] for i in range(len(x))]
        )

    sim_a, sim_v = -dist(a, proto_a), -dist(v, proto_v)
    score_a = sum(float(torch.softmax(sim_a[i], 0)[labels[i]]) for i in range(len(labels)))
    score_v = sum(float(torch.softmax(sim_v[i], 0)[labels[i]]) for i in range(len(labels)))
    ratio = score_a / score_v
    beta, lam = (0.0, alpha) if ratio > 1 else ((alpha, 0.0) if ratio < 1 else (0.0, 0.0))
    pce_a = float(torch.nn.functional.cross_entropy(sim_a, labels))
    pce_v = float(torch.nn.functional.cross_entropy(sim_v, labels))
    return beta * pce_a + lam * pce_v, (beta, lam)


def reference_prototypes(feats, labels, num_classes):
    sums = torch.zeros(num_classes, feats.shape[1])
    counts = [0] * num_classes
    for i, y in enumerate(labels.tolist()):
        sums[y] += feats[i]
        counts[y] += 1
    return torch.stack([sums[c] / counts[c] for c in range(num_classes)])


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_official_variant_matches_loop_reference_on_random_tensors(seed):
    gen = torch.Generator().manual_seed(seed)
    C, B = 4, 12
    labels = torch.arange(B) % C
    proto_batch = {"a": torch.randn(B, 5, generator=gen), "v": 3 * torch.randn(B, 3, generator=gen)}
    obj = make_objective(num_classes=C, alpha=1.5, coeff_form="official_step", mu=0.0)
    fit_prototypes(obj, [(proto_batch, labels)])
    for m in ("a", "v"):
        assert torch.allclose(obj.prototypes[m], reference_prototypes(proto_batch[m], labels, C), atol=1e-6)

    a, v = torch.randn(B, 5, generator=gen), torch.randn(B, 3, generator=gen)
    y = torch.randint(0, C, (B,), generator=gen)
    fused = torch.randn(B, C, generator=gen)
    result = obj.step(inputs_for({"a": a, "v": v}, y, fused=fused))
    extra, coeffs = reference_official(a, v, y, obj.prototypes["a"], obj.prototypes["v"], 1.5)
    assert coeffs_of(result) == pytest.approx(list(coeffs))
    expected = float(torch.nn.functional.cross_entropy(fused, y)) + extra
    assert float(result.losses[0].value()) == pytest.approx(expected, abs=1e-5)


def test_running_prototypes_are_summed_over_ranks():
    """Under 'running' initial prototypes, two ranks' halves give the whole batch's class means."""
    gen = torch.Generator().manual_seed(6)
    feats = {"a": torch.randn(8, 3, generator=gen), "v": torch.randn(8, 2, generator=gen)}
    y = torch.arange(8) % 2
    whole = make_objective().step(inputs_for(feats, y, epoch=0))

    def flat_sums(lo, hi):
        onehot = torch.nn.functional.one_hot(y[lo:hi], 2).float()
        return torch.cat([*((onehot.T @ feats[m][lo:hi]).flatten() for m in "av"), onehot.sum(0)])

    def other_rank(t, o):  # the proto sums call is the first collective, the scores the second
        if t.numel() == 2 * 3 + 2 * 2 + 2:
            return t + flat_sums(*o)
        probs = {m: prototype_logits(feats[m][o[0] : o[1]], means[m], 1.0).softmax(-1) for m in "av"}
        return t + torch.stack([probs[m][torch.arange(4), y[o[0] : o[1]]].sum() for m in "av"])

    onehot = torch.nn.functional.one_hot(y, 2).float()
    means = {m: (onehot.T @ feats[m]) / onehot.sum(0).unsqueeze(1) for m in "av"}
    world = DistInfo(0, 2, all_reduce_sum=lambda t: other_rank(t, (4, 8)))
    half = make_objective().step(inputs_for({m: x[:4] for m, x in feats.items()}, y[:4], epoch=0, world=world))
    assert coeffs_of(half) == pytest.approx(coeffs_of(whole), abs=1e-6)


def test_scores_are_summed_over_ranks():
    """Two 'ranks' holding halves of a batch take the coefficients of the whole batch."""
    gen = torch.Generator().manual_seed(5)
    feats = {"a": torch.randn(8, 4, generator=gen), "v": torch.randn(8, 4, generator=gen)}
    y = torch.arange(8) % 2
    protos = {"a": torch.randn(2, 4, generator=gen), "v": torch.randn(2, 4, generator=gen)}

    def make():
        obj = make_objective()
        obj.prototypes = {m: t.clone() for m, t in protos.items()}
        return obj

    def local_scores(lo, hi):
        return torch.stack(
            [
                prototype_logits(feats[m][lo:hi], protos[m], 1.0).softmax(-1)[torch.arange(hi - lo), y[lo:hi]].sum()
                for m in "av"
            ]
        )

    whole = coeffs_of(make().step(inputs_for(feats, y)))
    halves = []
    for lo, hi, other in ((0, 4, (4, 8)), (4, 8, (0, 4))):
        world = DistInfo(0, 2, all_reduce_sum=lambda t, o=other: t + local_scores(*o))
        part = {m: x[lo:hi] for m, x in feats.items()}
        halves.append(coeffs_of(make().step(inputs_for(part, y[lo:hi], world=world))))
    assert halves[0] == pytest.approx(whole, abs=1e-6)
    assert halves[1] == pytest.approx(whole, abs=1e-6)
    assert max(whole) > 0


# -- variants, state, config ------------------------------------------------------------------


def test_official_variant_overrides():
    overrides = dict(o.split("=", 1) for o in PMR.variants["official"])
    obj = build_objective("pmr", {k.split(".", 1)[1]: v for k, v in overrides.items()})
    assert (obj.params.coeff_form, obj.params.mu, obj.params.modulation_ends) == ("official_step", 0.0, 70)
    assert "pmr" in OBJECTIVES


def test_state_round_trip_restores_prototypes():
    obj = make_objective(momentum=0.5)
    fit_prototypes(obj, [({"a": H_A, "v": H_V}, LABELS)])
    state = obj.state_dict()
    fresh = make_objective(momentum=0.5)
    assert fresh.state_dict()["prototypes"] is None
    fresh.load_state_dict(state)
    assert fresh.prototypes["a"].tolist() == obj.prototypes["a"].tolist()
    state["prototypes"]["a"].add_(1.0)  # the loaded copy is independent
    assert fresh.prototypes["a"].tolist() == obj.prototypes["a"].tolist()
    batch = {"a": H_A + 0.3, "v": H_V - 0.2}
    assert float(fresh.step(inputs_for(batch, LABELS)).losses[0].value()) == pytest.approx(
        float(obj.step(inputs_for(batch, LABELS)).losses[0].value())
    )


def test_eval_phase_adds_no_prototype_sums():
    obj = make_objective()
    stats = obj.step(inputs_for({"a": H_A, "v": H_V}, LABELS, phase="eval")).stats
    assert not any(k.startswith("pmr_proto_") for k in stats)


@pytest.mark.parametrize("bad", [{"alpha": -1.0}, {"coeff_form": "relu"}, {"momentum": 1.0}, {"unknown": 1}])
def test_invalid_params_are_rejected(bad):
    with pytest.raises(ValidationError):
        build_objective("pmr", bad)
