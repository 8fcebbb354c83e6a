"""AUG objective (docs/methods/aug.md §4): hand-checked numbers of §4.9, ACA, optimizer and step order."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from mmbalance.models.fusion import LateFusion
from mmbalance.objectives import build_objective
from mmbalance.objectives.aug import AUG, AUGParams, aca_decision, boosting_loss, residual_weight, share_decision
from mmbalance.objectives.base import AddHead, DistInfo, HeadOutputs, StepInputs, cross_entropy_per_sample

Y = torch.tensor([0, 2])  # one-hot [[1,0,0],[0,0,1]]
S_PREV = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.2]])
NEWEST = torch.tensor([[0.5, 0.2, -0.1], [0.1, 0.3, 0.4]])
BOOST_INFO = {"fusion": "boost", "supports_add_head": True}


class Encoder(nn.Module):
    def __init__(self, in_dim: int, out_dim: int = 8):
        super().__init__()
        self.net = nn.Linear(in_dim, out_dim)
        self.out_dim = out_dim

    def forward(self, x):
        return torch.relu(self.net(x))


def make_model(modalities=("a", "v"), num_classes=3, in_dim=5):
    torch.manual_seed(0)
    encoders = {m: Encoder(in_dim) for m in modalities}
    return LateFusion(encoders, num_classes, fusion="boost", boost_hidden=16)


def make_batch(modalities=("a", "v"), batch=12, in_dim=5, num_classes=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (batch,), generator=gen)
    # Each modality carries the label in a different feature so all can learn.
    data = {}
    for i, m in enumerate(modalities):
        x = torch.randn(batch, in_dim, generator=gen)
        x[:, i % in_dim] += 2.0 * labels.float()
        data[m] = x
    return data, labels


def bound(model, **kwargs) -> AUG:
    objective = AUG(AUGParams(**kwargs))
    objective.bind(model.modalities, model.num_classes, model.info)
    return objective


def train_step(model, objective, optimizer, batch, labels, epoch=0, on_recompute=None):
    """What the engine does per batch: one forward, then zero_grad/loss/backward/step per group."""
    ctx = objective.forward_context("train", epoch)
    features, outputs = model(batch, ctx)

    def recompute() -> HeadOutputs:
        if on_recompute is not None:
            on_recompute()
        return model.heads_forward(features, ctx)

    result = objective.step(StepInputs(features, outputs, labels, 0, epoch, 1, "train", DistInfo(), recompute))
    for group in result.losses:
        optimizer.zero_grad(set_to_none=True)
        group.value().backward()
        optimizer.step()
    return result


def stats(**scores: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {f"aug_score_{m}": (torch.tensor(s), torch.tensor(100.0)) for m, s in scores.items()}


# -- §4.9 loss numbers ------------------------------------------------------------------------


def test_aug_hand_checked_terms_match_spec():
    p_prev_y = S_PREV.softmax(-1).gather(1, Y[:, None]).squeeze(1)
    torch.testing.assert_close(p_prev_y, torch.tensor([0.5761, 0.3156]), atol=1e-4, rtol=0)
    torch.testing.assert_close(
        cross_entropy_per_sample(S_PREV + NEWEST, Y), torch.tensor([0.3883, 1.0395]), atol=1e-4, rtol=0
    )
    torch.testing.assert_close(cross_entropy_per_sample(S_PREV, Y), torch.tensor([0.5514, 1.1533]), atol=1e-4, rtol=0)
    torch.testing.assert_close(cross_entropy_per_sample(NEWEST, Y), torch.tensor([0.8284, 0.9729]), atol=1e-4, rtol=0)


def soft_ce(logits, target):
    """CE with a soft target, as the official code computes it: -(1/B) Σ_i Σ_c T_ic log softmax(z)_ic."""
    return -(target * logits.log_softmax(-1)).sum(-1).mean()


def test_aug_official_loss_is_2_2709_and_matches_literal_code_formula():
    loss = boosting_loss([S_PREV, NEWEST], Y, 0.5, "official")
    assert loss.item() == pytest.approx(2.2709, abs=1e-4)
    # train_CREMAD.py: CE(S,Y) + CE(S^-,Y) + CE(n,Y) - 0.5 * CE(n, Y * sg(softmax(S^-))).
    onehot = nn.functional.one_hot(Y, 3).float()
    literal = (
        soft_ce(S_PREV + NEWEST, onehot)
        + soft_ce(S_PREV, onehot)
        + soft_ce(NEWEST, onehot)
        - 0.5 * soft_ce(NEWEST, onehot * S_PREV.softmax(-1))
    )
    torch.testing.assert_close(loss, literal)


def test_aug_objective_step_gives_official_loss_from_head_logits():
    objective = AUG()
    objective.bind(["a", "v"], 3, BOOST_INFO)
    heads = {"a": [S_PREV, NEWEST], "v": [S_PREV]}
    outputs = HeadOutputs({m: torch.stack(h).sum(0) for m, h in heads.items()}, S_PREV, heads)
    result = objective.step(StepInputs({}, outputs, Y, 0, 0, 1, "train", DistInfo(), lambda: outputs))
    assert result.losses[0].value().item() == pytest.approx(2.2709, abs=1e-4)
    # K_v = 0: plain CE of the single head.
    assert result.losses[1].value().item() == pytest.approx(cross_entropy_per_sample(S_PREV, Y).mean().item(), abs=1e-6)


def test_aug_paper_residual_label_with_lambda_half():
    label = nn.functional.one_hot(Y, 3).float() * residual_weight([S_PREV], Y, 0.5, "paper")[:, None]
    torch.testing.assert_close(label, torch.tensor([[0.7119, 0, 0], [0, 0, 0.8422]]), atol=1e-4, rtol=0)


def test_aug_paper_residual_sums_per_head_probabilities_and_clamps_at_zero():
    heads = [torch.tensor([[3.0, 0.0, 0.0]]), torch.tensor([[0.0, 1.0, 0.0]])]
    p = [h.softmax(-1)[0, 0] for h in heads]
    weight = residual_weight(heads, torch.tensor([0]), 0.5, "paper")
    torch.testing.assert_close(weight, torch.tensor([1 - 0.5 * (p[0] + p[1])]))
    official = residual_weight(heads, torch.tensor([0]), 0.5, "official")
    torch.testing.assert_close(official, 1 - 0.5 * (heads[0] + heads[1]).softmax(-1)[:, 0])
    confident = [torch.tensor([[9.0, 0.0, 0.0]])] * 3  # Σ p ≈ 3 -> 1 - 1.5 < 0
    assert residual_weight(confident, torch.tensor([0]), 1.0, "paper").item() == 0.0


def test_aug_residual_target_is_detached():
    prev = S_PREV.clone().requires_grad_(True)
    newest = NEWEST.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(boosting_loss([prev, newest], Y, 0.5, "official"), prev)
    ensemble_terms = cross_entropy_per_sample(prev + NEWEST, Y).mean() + cross_entropy_per_sample(prev, Y).mean()
    (expected,) = torch.autograd.grad(ensemble_terms, prev)
    torch.testing.assert_close(grad, expected)
    (grad_new,) = torch.autograd.grad(boosting_loss([S_PREV, newest], Y, 0.5, "official"), newest)
    weight = 1 - 0.5 * S_PREV.softmax(-1).gather(1, Y[:, None])  # [B, 1]
    onehot = nn.functional.one_hot(Y, 3).float()
    new_only = ((S_PREV + newest).softmax(-1) - onehot) / 2 + weight * (newest.softmax(-1) - onehot) / 2
    torch.testing.assert_close(grad_new, new_only.detach())


# -- ACA ---------------------------------------------------------------------------------------


def test_aug_aca_ratio_above_band_adds_video_head():
    assert aca_decision({"a": 40.2, "v": 35.0}, 1.0, 0.01) == "v"
    objective = bound(make_model())
    changes = objective.on_epoch_end(0, stats(a=40.2, v=35.0), DistInfo())
    assert changes == [AddHead("v")]
    expected = {"aug_heads_a": 1.0, "aug_heads_v": 2.0, "aug_score_a": 0.402, "aug_score_v": 0.35}
    assert objective.epoch_metrics() == pytest.approx(expected)


def test_aug_aca_ratio_inside_dead_zone_adds_nothing():
    assert aca_decision({"a": 0.995 * 35.0, "v": 35.0}, 1.0, 0.01) is None
    objective = bound(make_model())
    assert objective.on_epoch_end(0, stats(a=0.995 * 35.0, v=35.0), DistInfo()) == []


def test_aug_aca_mirrored_scores_add_audio_head():
    objective = bound(make_model())
    assert objective.on_epoch_end(0, stats(a=35.0, v=40.2), DistInfo()) == [AddHead("a")]


def test_aug_aca_uses_means_so_batch_counts_do_not_matter():
    objective = bound(make_model())
    uneven = {
        "aug_score_a": (torch.tensor(40.2 * 3), torch.tensor(300.0)),
        "aug_score_v": (torch.tensor(35.0), torch.tensor(100.0)),
    }
    assert objective.on_epoch_end(0, uneven, DistInfo()) == [AddHead("v")]


def test_aug_aca_checks_only_on_schedule():
    objective = bound(make_model(), check_every_epochs=10)
    decisions = [objective.on_epoch_end(e, stats(a=40.2, v=35.0), DistInfo()) for e in range(20)]
    assert [e for e, d in enumerate(decisions) if d] == [0, 9, 19]


def test_aug_aca_respects_max_heads():
    objective = bound(make_model(), max_heads=2, check_every_epochs=1)
    decisions = [objective.on_epoch_end(e, stats(a=40.2, v=35.0), DistInfo()) for e in range(5)]
    assert decisions == [[AddHead("v")], [AddHead("v")], [], [], []]
    assert objective.heads == {"a": 1, "v": 3}
    assert bound(make_model(), max_heads=0).on_epoch_end(0, stats(a=40.2, v=35.0), DistInfo()) == []


def test_aug_aca_more_than_two_modalities_adds_to_weakest_outside_dead_zone():
    assert aca_decision({"a": 0.5, "v": 0.3, "t": 0.45}, 1.0, 0.01) == "v"
    assert aca_decision({"a": 0.5, "v": 0.495, "t": 0.5}, 1.0, 0.01) is None
    assert aca_decision({"a": 0.5, "v": 0.3, "t": 0.45}, 2.0, 0.01) is None  # 0.5 - 2*0.3 < τ


def test_aug_aca_decision_comes_from_rank_zero_broadcast():
    calls = []

    def broadcast(obj):
        calls.append(obj)
        return ["a"]  # rank 0's decision, whatever this rank would have computed

    objective = bound(make_model())
    changes = objective.on_epoch_end(0, stats(a=40.2, v=35.0), DistInfo(rank=1, world_size=2, broadcast=broadcast))
    assert calls == [None] and changes == [AddHead("a")] and objective.heads == {"a": 2, "v": 1}
    sent = []
    bound(make_model()).on_epoch_end(
        0, stats(a=40.2, v=35.0), DistInfo(world_size=2, broadcast=lambda o: sent.append(o) or o)
    )
    assert sent == [["v"]]


# -- ACA share rule (official three-modality code) ---------------------------------------------


def official_share_reference(score_r: float, score_o: float, score_d: float, lam: float) -> list[str]:
    """train_NVGesture.py's arithmetic on epoch sums, literally: one independent test per modality."""
    ratio_r = score_r / (score_o + score_d)
    ratio_o = score_o / (score_r + score_d)
    ratio_d = score_d / (score_r + score_o)
    added = []
    if ratio_r < lam:
        added.append("r")
    if ratio_o < lam:
        added.append("o")
    if ratio_d < lam:
        added.append("d")
    return added


def test_aug_aca_example_gives_one_head_under_ratio_and_two_under_share():
    scores = {"a": 0.9, "v": 0.2, "t": 0.2}
    assert aca_decision(scores, 1.0, 0.01) == "v"  # argmin, first of the tie
    assert share_decision(scores, 0.4) == ["v", "t"]  # 0.2 / 1.1 < 0.4 twice; 0.9 / 0.4 is not
    ratio = bound(make_model(("a", "v", "t")))
    assert ratio.on_epoch_end(0, stats(a=90.0, v=20.0, t=20.0), DistInfo()) == [AddHead("v")]
    share = bound(make_model(("a", "v", "t")), aca_rule="share")
    assert share.on_epoch_end(0, stats(a=90.0, v=20.0, t=20.0), DistInfo()) == [AddHead("v"), AddHead("t")]
    assert share.heads == {"a": 1, "v": 2, "t": 2}


@pytest.mark.parametrize("threshold", [0.4, 0.25, 0.6])
def test_aug_share_rule_matches_the_official_arithmetic_on_random_scores(threshold):
    gen = torch.Generator().manual_seed(7)
    names = ["r", "o", "d"]
    seen = set()
    for _ in range(300):
        count = 50.0
        sums = (torch.rand(3, generator=gen) ** 2 * count).tolist()  # epoch sums of true-class probabilities
        expected = official_share_reference(*sums, threshold)
        objective = AUG(AUGParams(aca_rule="share", share_threshold=threshold, max_heads=1000))
        objective.bind(names, 3, BOOST_INFO)
        epoch_stats = {
            f"aug_score_{m}": (torch.tensor(s, dtype=torch.float64), torch.tensor(count)) for m, s in zip(names, sums)
        }
        changes = objective.on_epoch_end(0, epoch_stats, DistInfo())
        assert [c.modality for c in changes] == expected, sums
        seen.add(len(expected))
    assert 1 in seen and max(seen) >= 2  # the vectors cover one head and several heads per check


def test_aug_share_rule_caps_each_modality_at_max_heads():
    objective = bound(make_model(("a", "v", "t")), aca_rule="share", max_heads=2, check_every_epochs=1)
    weak_v_t, weak_v = stats(a=90.0, v=20.0, t=20.0), stats(a=90.0, v=20.0, t=90.0)
    assert objective.on_epoch_end(0, weak_v_t, DistInfo()) == [AddHead("v"), AddHead("t")]
    assert objective.on_epoch_end(1, weak_v, DistInfo()) == [AddHead("v")]  # v reaches its cap of 2
    assert objective.on_epoch_end(2, weak_v_t, DistInfo()) == [AddHead("t")]  # capped v skipped, t still gets one
    assert objective.on_epoch_end(3, weak_v_t, DistInfo()) == []
    assert objective.heads == {"a": 1, "v": 3, "t": 3}
    assert bound(make_model(("a", "v", "t")), aca_rule="share", max_heads=0).on_epoch_end(0, weak_v_t, DistInfo()) == []


def test_aug_share_rule_multi_head_decision_is_broadcast_from_rank_zero():
    mods = ("a", "v", "t")
    sent = []
    rank0 = bound(make_model(mods), aca_rule="share")
    changes0 = rank0.on_epoch_end(
        0, stats(a=90.0, v=20.0, t=20.0), DistInfo(world_size=2, broadcast=lambda o: sent.append(o) or o)
    )
    assert sent == [["v", "t"]]
    # Rank 1 sees different local numbers but applies rank 0's whole list.
    received = []
    rank1 = bound(make_model(mods), aca_rule="share")
    world1 = DistInfo(rank=1, world_size=2, broadcast=lambda o: received.append(o) or sent[0])
    changes1 = rank1.on_epoch_end(0, stats(a=20.0, v=90.0, t=90.0), world1)
    assert received == [None]
    assert changes1 == changes0 == [AddHead("v"), AddHead("t")] and rank1.heads == rank0.heads


# -- model, optimizer and step order ------------------------------------------------------------


def test_aug_requires_boost_fusion_and_bind_refuses_merge_alpha_beyond_two_modalities():
    # The fusion check is the engine's, from the declared requirements (tests/test_objective_requirements.py).
    assert AUG.requirements.fusion_problem("aug", "boost") is None
    assert "boost" in AUG.requirements.fusion_problem("aug", "sum")
    with pytest.raises(ValueError, match="merge_alpha"):
        AUG(AUGParams(merge_alpha=0.4)).bind(["a", "v", "t"], 3, BOOST_INFO)


def test_aug_merge_alpha_weights_fused_logits():
    model = make_model()
    batch, _ = make_batch()
    ctx = bound(model, merge_alpha=0.4).forward_context("eval", 0)
    assert ctx.fusion_weights == {"a": 0.4, "v": pytest.approx(0.6)}
    _, out = model(batch, ctx)
    torch.testing.assert_close(out.fused_logits, 0.4 * out.unimodal_logits["a"] + 0.6 * out.unimodal_logits["v"])
    assert bound(model).forward_context("eval", 0).fusion_weights is None


@pytest.mark.parametrize("train_new_heads", [True, False])
def test_aug_added_head_is_optimised_only_in_paper_variant(train_new_heads):
    model = make_model()
    objective = bound(model, train_new_heads=train_new_heads)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    batch, labels = make_batch()
    train_step(model, objective, optimizer, batch, labels)
    new_params = model.add_head("v")
    if objective.trains_new_heads:  # the engine's rule
        optimizer.add_param_group({"params": new_params})
    in_optimizer = any(p is q for g in optimizer.param_groups for p in g["params"] for q in new_params)
    assert in_optimizer == train_new_heads
    before = [p.detach().clone() for p in new_params]
    shared_before = model.shared_head.weight.detach().clone()
    train_step(model, objective, optimizer, batch, labels)
    assert new_params[0].grad is not None  # the frozen head still gets gradients (official quirk)
    changed = any(not torch.equal(b, p) for b, p in zip(before, new_params))
    assert changed == train_new_heads
    assert not torch.equal(shared_before, model.shared_head.weight)


def test_aug_later_group_sees_shared_head_updated_by_earlier_step():
    model = make_model()
    objective = bound(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    batch, labels = make_batch()
    initial = model.shared_head.weight.detach().clone()
    seen = []
    record = lambda: seen.append(model.shared_head.weight.detach().clone())  # noqa: E731
    result = train_step(model, objective, optimizer, batch, labels, on_recompute=record)
    assert [g.modalities for g in result.losses] == [("a",), ("v",)]
    assert isinstance(result.losses[0].loss, torch.Tensor) and callable(result.losses[1].loss)
    assert len(seen) == 1 and not torch.equal(seen[0], initial)


def test_aug_video_step_leaves_audio_parameters_alone():
    model = make_model()
    objective = bound(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    batch, labels = make_batch()
    features, outputs = model(batch)
    recompute = lambda: model.heads_forward(features)  # noqa: E731
    result = objective.step(StepInputs(features, outputs, labels, 0, 0, 1, "train", DistInfo(), recompute))
    optimizer.zero_grad(set_to_none=True)
    result.losses[0].value().backward()
    optimizer.step()
    audio_after_first = model.encoders["a"].net.weight.detach().clone()
    optimizer.zero_grad(set_to_none=True)
    result.losses[1].value().backward()
    assert model.encoders["a"].net.weight.grad is None
    optimizer.step()
    assert torch.equal(audio_after_first, model.encoders["a"].net.weight)


def test_aug_step_refuses_missing_recompute_heads():
    model = make_model()
    features, outputs = model(make_batch()[0])
    with pytest.raises(ValueError, match="recompute_heads"):
        bound(model).step(StepInputs(features, outputs, make_batch()[1], 0, 0, 1, "train"))


def true_class_sum(outputs: HeadOutputs, m: str, labels: torch.Tensor) -> torch.Tensor:
    return outputs.unimodal_logits[m].softmax(-1).gather(1, labels[:, None]).sum().detach()


@pytest.mark.parametrize("score_order", ["official", "first_forward"])
def test_aug_score_stats_are_true_class_probability_sums_of_the_scored_logits(score_order):
    model = make_model()
    objective = bound(model, score_order=score_order)
    batch, labels = make_batch()
    features, outputs = model(batch)
    later = model.heads_forward({m: 2.0 * h for m, h in features.items()})  # what "after the first step" returns
    result = objective.step(StepInputs(features, outputs, labels, 0, 0, 1, "train", DistInfo(), lambda: later))
    # Official: the second modality's score exists only once the engine has evaluated its loss.
    assert ("aug_score_v" in result.stats) == (score_order == "first_forward")
    for group in result.losses:
        group.value()
    scored = {"a": outputs, "v": later if score_order == "official" else outputs}
    for m in ("a", "v"):
        total, count = result.stats[f"aug_score_{m}"]
        torch.testing.assert_close(total, true_class_sum(scored[m], m, labels))
        assert count.item() == len(labels) and not total.requires_grad
    assert not torch.allclose(true_class_sum(later, "v", labels), true_class_sum(outputs, "v", labels))


def official_reference_scores(model, optimizer, batches, mods) -> dict[str, float]:
    """The official per-batch order (train_CREMAD.py; train_NVGesture.py for three), written out.

    Every encoder runs before any step; then, per modality in order, its classifiers are built from
    the current parameters (so with the F the earlier steps updated), loss, backward, step, and its
    score is taken from the very logits its loss used. Returns the epoch-mean score per modality.
    """
    score, count = {m: 0.0 for m in mods}, 0
    for batch, y in batches:
        onehot = nn.functional.one_hot(y, model.num_classes).float()  # [B, C]
        optimizer.zero_grad(set_to_none=True)
        h = {m: model.encoders[m](batch[m]) for m in mods}  # m -> [B, D]
        for m in mods:
            outs = [model.shared_head(torch.relu(layer(h[m]))) for layer in model.heads[m]]  # K+1 x [B, C]
            out = torch.stack(outs).sum(0)  # [B, C]
            if len(outs) == 1:
                loss = soft_ce(out, onehot)
            else:
                o_fea, add_fea = torch.stack(outs[:-1]).sum(0), outs[-1]  # [B, C] each
                kl = onehot * o_fea.detach().softmax(1)  # [B, C]
                loss = (
                    soft_ce(out, onehot)
                    + soft_ce(o_fea, onehot)
                    + soft_ce(add_fea, onehot)
                    - 0.5 * soft_ce(add_fea, kl)
                )
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            score[m] += out.detach().softmax(1)[torch.arange(len(y)), y].sum().item()
        count += len(y)
    return {m: s / count for m, s in score.items()}


def objective_epoch_scores(model, optimizer, batches, score_order) -> dict[str, float]:
    """The objective through ``train_step`` (the engine's order), stats read after all groups."""
    objective = bound(model, score_order=score_order, check_every_epochs=10)
    epoch_stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for batch, labels in batches:
        result = train_step(model, objective, optimizer, batch, labels, epoch=1)
        for k, (s, c) in result.stats.items():
            prev = epoch_stats.get(k, (0.0, 0.0))
            epoch_stats[k] = (prev[0] + s.double(), prev[1] + c.double())
    assert objective.on_epoch_end(1, epoch_stats, DistInfo()) == []  # not a check epoch: scores only
    return objective.scores


def scoring_run(mods, which: str, lr: float = 0.5) -> dict[str, float]:
    model = make_model(mods)
    model.add_head(mods[-1])  # exercise the residual term too
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    batches = [make_batch(mods, seed=s) for s in range(1, 6)]
    if which == "reference":
        return official_reference_scores(model, optimizer, batches, mods)
    return objective_epoch_scores(model, optimizer, batches, which)


@pytest.mark.parametrize("mods", [("a", "v"), ("a", "v", "t")])
def test_aug_official_score_order_equals_a_literal_official_loop(mods):
    reference = scoring_run(mods, "reference")
    official = scoring_run(mods, "official")
    first_forward = scoring_run(mods, "first_forward")
    assert official == pytest.approx(reference, abs=1e-6, rel=0)
    rho = lambda s: s["a"] / s["v"]  # noqa: E731
    assert rho(official) == pytest.approx(rho(reference), abs=1e-6, rel=0)
    assert first_forward["a"] == pytest.approx(reference["a"], abs=1e-6)  # the first modality is the same
    assert abs(rho(first_forward) - rho(reference)) > 1e-3  # the later ones are not
    assert all(abs(first_forward[m] - reference[m]) > 1e-3 for m in mods[1:])


def test_aug_three_modalities_train_and_loss_decreases():
    mods = ("a", "v", "t")
    model = make_model(mods)
    objective = bound(model, check_every_epochs=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    batch, labels = make_batch(mods)

    def ensemble_ce() -> float:
        _, out = model(batch)
        return sum(cross_entropy_per_sample(out.unimodal_logits[m], labels).mean().item() for m in mods)

    start = ensemble_ce()
    for epoch in range(4):
        epoch_stats, losses = {}, []
        for _ in range(5):
            result = train_step(model, objective, optimizer, batch, labels, epoch)
            losses.append(sum(result.metrics[f"loss_{m}"].item() for m in mods))
            for k, (s, c) in result.stats.items():
                prev = epoch_stats.get(k, (0.0, 0.0))
                epoch_stats[k] = (prev[0] + s, prev[1] + c)
        # Within an epoch the head structure is fixed, so the boosting loss is comparable.
        assert losses[-1] < losses[0]
        for change in objective.on_epoch_end(epoch, epoch_stats, DistInfo()):
            optimizer.add_param_group({"params": model.add_head(change.modality)})
    assert ensemble_ce() < start
    assert sum(model.head_counts().values()) > 3
    assert {m: objective.heads[m] for m in mods} == model.head_counts()
    assert set(objective.epoch_metrics()) == {f"aug_{k}_{m}" for k in ("heads", "score") for m in mods}


def test_aug_state_dict_round_trips():
    objective = bound(make_model(), check_every_epochs=1, max_heads=2)
    objective.on_epoch_end(0, stats(a=40.2, v=35.0), DistInfo())
    state = objective.state_dict()
    restored = AUG(AUGParams(check_every_epochs=1, max_heads=2))
    restored.load_state_dict(state)
    restored.bind(["a", "v"], 3, BOOST_INFO)  # bind after load keeps the restored counts
    assert restored.state_dict() == state and restored.epoch_metrics() == objective.epoch_metrics()
    assert restored.on_epoch_end(1, stats(a=40.2, v=35.0), DistInfo()) == [AddHead("v")]
    assert restored.on_epoch_end(2, stats(a=40.2, v=35.0), DistInfo()) == []  # cap of 2 reached


@pytest.mark.parametrize(
    "bad",
    [
        {"residual_lambda": 1.5},
        {"residual_form": "literal"},
        {"sigma": 0.0},
        {"tau": -0.1},
        {"check_every_epochs": 0},
        {"max_heads": -1},
        {"merge_alpha": 1.2},
        {"zero_grad_to_none": True},
        {"score_order": "second_forward"},
        {"aca_rule": "argmin"},
        {"share_threshold": 0.0},
    ],
)
def test_aug_params_reject_invalid_values(bad):
    with pytest.raises(ValidationError):
        AUGParams(**bad)


def test_aug_params_defaults_build_the_objective():
    objective = build_objective("aug", AUGParams().model_dump())
    p = objective.params
    assert p.residual_lambda == 0.5 and objective.trains_new_heads and p.merge_alpha is None
    assert (p.score_order, p.aca_rule, p.share_threshold) == ("official", "ratio", 0.4)
