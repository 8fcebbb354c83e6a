"""MMPareto (docs/methods/mmpareto.md): the two-vector min-norm solver, the cosine rule and the
rescale on vectors small enough to check by hand (§3-§5), the hook on hand-made part gradients,
and the whole step against a plain loop written from the official training loop (§8)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmbalance.engine.distributed import ProcessGroup
from mmbalance.engine.metrics import SumCounter
from mmbalance.engine.steps import StepClock, parameter_groups, train_batch
from mmbalance.models.fusion import LateFusion
from mmbalance.objectives import OBJECTIVES, DistInfo, ForwardContext, GradientContext, LossGroup, StepResult
from mmbalance.objectives.base import PartGradients
from mmbalance.objectives.mmpareto import (
    MMPareto,
    MMParetoParams,
    min_norm_weight,
    pareto_weights,
    rescale_factor,
)

DIMS = {"a": 5, "v": 4}
CLASSES = 3


def vec(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# -- §4 the two-vector min-norm solver ----------------------------------------------------------


def test_min_norm_weight_is_the_closed_form_and_its_point_is_orthogonal_to_the_segment():
    g1, g2 = vec(1, 0), vec(-1, 1)  # g1.g1 = 1, g1.g2 = -1, g2.g2 = 2
    w = min_norm_weight(g1, g2)
    assert float(w) == pytest.approx(3 / 5)  # ((g2 - g1).g2) / ||g1 - g2||^2 = (2 + 1) / 5
    point = w * g1 + (1 - w) * g2
    torch.testing.assert_close(point, vec(0.2, 0.4))
    assert float(point @ (g1 - g2)) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize(
    ("g1", "g2", "exact", "official"),
    [
        ((1, 0), (2, 0), 1.0, 0.999),  # g1.g2 = 2 >= g1.g1 = 1: the point is g1 itself
        ((2, 0), (1, 0), 0.0, 0.001),  # g1.g2 = 2 >= g2.g2 = 1: the point is g2
        ((0, 0), (1, 1), 1.0, 0.999),  # a zero multimodal gradient: g1.g2 = 0 >= g1.g1 = 0
    ],
)
def test_min_norm_weight_at_the_ends_of_the_segment(g1, g2, exact, official):
    assert float(min_norm_weight(vec(*g1), vec(*g2), "exact")) == pytest.approx(exact)
    assert float(min_norm_weight(vec(*g1), vec(*g2), "official")) == pytest.approx(official)


# -- §3 the cosine rule -------------------------------------------------------------------------


def test_positive_cosine_takes_equal_weights():
    weight, cosine, conflict = pareto_weights(vec(1, 1), vec(1, 0))
    assert (float(weight), float(conflict)) == (0.5, 0.0)
    assert float(cosine) == pytest.approx(1 / math.sqrt(2))


def test_negative_cosine_takes_the_min_norm_weight():
    weight, cosine, conflict = pareto_weights(vec(1, 0), vec(-1, 1))
    assert float(weight) == pytest.approx(3 / 5) and float(conflict) == 1.0
    assert float(cosine) == pytest.approx(-1 / math.sqrt(2))


def test_orthogonal_gradients_count_as_a_conflict_as_in_the_official_rule():
    # cos = 0 is not > 0: min-norm weight ((g2 - g1).g2) / ||g1 - g2||^2 = 4 / 5.
    weight, cosine, conflict = pareto_weights(vec(1, 0), vec(0, 2))
    assert float(cosine) == 0.0 and float(conflict) == 1.0
    assert float(weight) == pytest.approx(4 / 5)


# -- §5 the rescale -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sum_norm", "combined_norm", "only_enlarge", "factor"),
    [
        (5.0, 2.0, True, 1.5 * 2.5),
        (1.0, 2.0, True, 1.5),  # the sum is shorter: never shrunk
        (1.0, 2.0, False, 1.5 * 0.5),
        (1.0, 0.0, True, 1.5),  # a zero combination stays zero
        (1.0, 0.0, False, 1.5),
    ],
)
def test_rescale_factor(sum_norm, combined_norm, only_enlarge, factor):
    got = rescale_factor(torch.tensor(sum_norm), torch.tensor(combined_norm), 1.5, only_enlarge)
    assert float(got) == pytest.approx(factor)


# -- the hook on hand-made part gradients -------------------------------------------------------


def hand_made_context(scope: str):
    """One encoder of two parameters, P1 (2 values) and P2 (1 value), and an empty second one.

    g_f = [1, 0 | 2], g_u = [-1, 1 | -1]: g_f.g_f = 5, g_f.g_u = -3, g_u.g_u = 3, so cos < 0 and
    w = (3 + 3) / (5 + 3 + 6) = 3/7; the combination 2 (w g_f + (1 - w) g_u) = [-2/7, 8/7 | 4/7]
    and the sum g_f + g_u = [0, 1 | 1]."""
    p1, p2 = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(1))
    head = nn.Parameter(torch.zeros(1))
    grads = {
        "multimodal": {id(p1): torch.tensor([1.0, 0.0]), id(p2): torch.tensor([2.0]), id(head): torch.tensor([0.5])},
        "unimodal_a": {id(p1): torch.tensor([-1.0, 1.0]), id(p2): torch.tensor([-1.0])},
        "unimodal_v": {},
    }
    p1.grad, p2.grad, head.grad = torch.tensor([0.0, 1.0]), torch.tensor([1.0]), torch.tensor([0.5])
    from mmbalance.objectives import ParameterGroups

    groups = ParameterGroups(encoders={"a": [p1, p2], "v": []}, heads={"a": [], "v": []}, shared=[head])
    result = StepResult(losses=[LossGroup(parts={"multimodal": torch.zeros(())})])
    ctx = GradientContext(
        group=result.losses[0],
        group_index=0,
        result=result,
        step=0,
        epoch=0,
        world=DistInfo(),
        seed=0,
        device=torch.device("cpu"),
        collect_params=lambda: groups,
        part_grads=PartGradients(tuple(grads), grads),
    )
    objective = MMPareto(MMParetoParams(rescale_scope=scope))
    objective.bind(["a", "v"], CLASSES, {})
    return objective, ctx, (p1, p2, head)


def test_hook_per_parameter_rescale_on_hand_numbers():
    objective, ctx, (p1, p2, head) = hand_made_context("parameter")
    objective.perturb_gradients(ctx)
    # P1: ||[0, 1]|| = 1 < ||[-2/7, 8/7]||, so only gamma: 1.5 * [-2/7, 8/7] = [-3/7, 12/7].
    torch.testing.assert_close(p1.grad, torch.tensor([-3 / 7, 12 / 7]))
    # P2: ||[1]|| / ||[4/7]|| = 7/4, so 1.5 * 7/4 * 4/7 = 1.5.
    torch.testing.assert_close(p2.grad, torch.tensor([1.5]))
    torch.testing.assert_close(head.grad, torch.tensor([0.5]))  # heads keep the sum
    stats = ctx.result.stats
    assert float(stats["mmpareto_weight_a"][0]) == pytest.approx(3 / 7)
    assert float(stats["mmpareto_conflict_a"][0]) == 1.0
    assert float(stats["mmpareto_cosine_a"][0]) == pytest.approx(-3 / math.sqrt(15))
    assert "mmpareto_weight_v" not in stats  # no gradient reached v's encoder


def test_hook_encoder_rescale_on_hand_numbers():
    objective, ctx, (p1, p2, _) = hand_made_context("encoder")
    objective.perturb_gradients(ctx)
    # ||sum|| = sqrt(2), ||combination|| = sqrt(84)/7: one factor 1.5 * 7 sqrt(2) / sqrt(84) = 1.5 * 7 / sqrt(42).
    factor = 1.5 * 7 / math.sqrt(42)
    torch.testing.assert_close(p1.grad, factor * torch.tensor([-2 / 7, 8 / 7]))
    torch.testing.assert_close(p2.grad, factor * torch.tensor([4 / 7]))
    assert float(ctx.result.stats["mmpareto_scale_a"][0]) == pytest.approx(factor)


# -- §8 the whole step against the official training loop ---------------------------------------


class TwoLayer(nn.Module):
    def __init__(self, in_dim: int, out_dim: int = 6):
        super().__init__()
        self.first, self.second, self.out_dim = nn.Linear(in_dim, 7), nn.Linear(7, out_dim), out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.second(torch.relu(self.first(x))))


def make_model() -> LateFusion:
    torch.manual_seed(3)
    return LateFusion({m: TwoLayer(d) for m, d in DIMS.items()}, CLASSES, fusion="concat")


def make_batches(steps: int, n: int = 8):
    """Visual carries the label (one-hot times 4 plus noise), audio is noise: the fused prediction
    soon leans on visual, and the audio encoder's multimodal and unimodal gradients start to
    conflict after a few steps (steps 5 and 7 of 8 with the official variant)."""
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(steps):
        labels = torch.randint(0, CLASSES, (n,), generator=gen)
        visual = torch.randn(n, DIMS["v"], generator=gen)
        visual[:, :CLASSES] += 4 * F.one_hot(labels, CLASSES)
        batches.append(({"a": torch.randn(n, DIMS["a"], generator=gen), "v": visual}, labels))
    return batches


def official_step(model: LateFusion, optimizer, batch, labels, per_parameter: bool, gamma: float = 1.5):
    """One step in the order of code/MMPareto.py's train_epoch (read at a339db39cc), on our model:
    three separate backwards with the encoder gradients kept, the whole-encoder cosine, equal
    weights or the released two-vector solver, then the backward of the summed loss, the encoder
    gradients replaced by the rescaled combination and the heads left with the summed gradient."""
    optimizer.zero_grad()
    _, out = model(batch, ForwardContext())
    losses = {
        "both": F.cross_entropy(out.fused_logits, labels),
        "a": F.cross_entropy(out.unimodal_logits["a"], labels),
        "v": F.cross_entropy(out.unimodal_logits["v"], labels),
    }
    encoder = {m: list(model.encoders[m].parameters()) for m in DIMS}
    kept: dict[str, dict[str, list[torch.Tensor]]] = {"both": {}, "a": {}, "v": {}}
    for loss_type, loss in losses.items():
        loss.backward(retain_graph=True)
        for m in DIMS if loss_type == "both" else [loss_type]:
            kept[loss_type][m] = [p.grad.clone() for p in encoder[m]]
        optimizer.zero_grad()
    weights = {}
    for m in DIMS:
        both, uni = kept["both"][m], kept[m][m]
        cos = F.cosine_similarity(torch.cat([g.flatten() for g in both]), torch.cat([g.flatten() for g in uni]), dim=0)
        if cos > 0:
            weights[m] = (0.5, 0.5)
            continue
        v11 = sum(float((g * g).sum()) for g in both)
        v12 = sum(float((g * h).sum()) for g, h in zip(both, uni))
        v22 = sum(float((h * h).sum()) for h in uni)
        if v12 >= v11:
            c = 0.999
        elif v12 >= v22:
            c = 0.001
        else:
            c = -1.0 * ((v12 - v22) / (v11 + v22 - 2 * v12))
        weights[m] = (c, 1 - c)
    (losses["both"] + losses["a"] + losses["v"]).backward()
    for m in DIMS:
        k = weights[m]
        new = [2 * k[0] * g + 2 * k[1] * h for g, h in zip(kept["both"][m], kept[m][m])]
        if per_parameter:
            for p, n in zip(encoder[m], new):
                diff = torch.norm(p.grad) / torch.norm(n)
                p.grad = diff * n * gamma if diff > 1 else n * gamma
        else:  # the same rule on the whole encoder's vector (rescale_scope: encoder)
            sum_norm = torch.cat([p.grad.flatten() for p in encoder[m]]).norm()
            diff = sum_norm / torch.cat([n.flatten() for n in new]).norm()
            for p, n in zip(encoder[m], new):
                p.grad = diff * n * gamma if diff > 1 else n * gamma
    optimizer.step()
    return weights


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-4)


def engine_run(params: MMParetoParams, batches, accumulate: int = 1):
    model = make_model()
    objective = MMPareto(params)
    objective.bind(model.modalities, CLASSES, model.info)
    optimizer = sgd(model)
    counter = SumCounter()
    for step, (batch, labels) in enumerate(batches):
        clock = StepClock(step, 0, len(batches))
        train_batch(
            model, objective, optimizer, batch, labels, clock, DistInfo(), ProcessGroup(), None, counter,
            accumulate=accumulate,
        )  # fmt: skip
    return model, counter


@pytest.mark.parametrize(("variant", "per_parameter"), [("official", True), ("default", False)])
def test_engine_step_matches_the_official_loop(variant, per_parameter):
    """Every step starts both sides from the reference's parameters and SGD momentum, so each step
    is compared on its own (lr 0.5 with momentum amplifies float32 rounding over several steps)."""
    overrides = dict(o.split("=", 1) for o in MMPareto.variants.get(variant, ()))
    params = MMParetoParams(**{k.split(".", 1)[1]: v for k, v in overrides.items()})
    assert (params.rescale_scope == "parameter") is per_parameter
    reference, model = make_model(), make_model()
    ref_optimizer, optimizer = sgd(reference), sgd(model)
    objective = MMPareto(params)
    objective.bind(model.modalities, CLASSES, model.info)
    conflicts = 0
    for step, (batch, labels) in enumerate(make_batches(8)):
        model.load_state_dict(reference.state_dict())
        optimizer.load_state_dict(copy.deepcopy(ref_optimizer.state_dict()))  # not the reference's buffers
        weights = official_step(reference, ref_optimizer, batch, labels, per_parameter)
        conflicts += sum(w != (0.5, 0.5) for w in weights.values())
        clock = StepClock(step, 0, 8)
        train_batch(model, objective, optimizer, batch, labels, clock, DistInfo(), ProcessGroup(), None, SumCounter())
        for (name, got), want in zip(model.state_dict().items(), reference.state_dict().values()):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6, msg=f"step {step}: {name}")
    assert conflicts >= 2, "the reference run must exercise the min-norm branch"


def test_accumulating_two_micro_batches_takes_the_full_batch_step():
    batches = make_batches(3)
    whole, _ = engine_run(MMParetoParams(), batches)
    halves, _ = engine_run(MMParetoParams(), batches, accumulate=2)
    for (name, got), want in zip(halves.state_dict().items(), whole.state_dict().values()):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6, msg=name)


def test_heads_take_the_plain_summed_gradient():
    model = make_model()
    objective = MMPareto()
    objective.bind(model.modalities, CLASSES, model.info)
    ((batch, labels),) = make_batches(1)
    _, out = model(batch, ForwardContext())
    total = sum(
        F.cross_entropy(z, labels) for z in [out.fused_logits, out.unimodal_logits["a"], out.unimodal_logits["v"]]
    )
    head = parameter_groups(model).shared
    expected = torch.autograd.grad(total, head)
    seen = {}
    original = objective.perturb_gradients

    def recording(ctx):
        original(ctx)
        seen.update({id(p): p.grad.clone() for p in ctx.params.shared})

    objective.perturb_gradients = recording
    train_batch(model, objective, sgd(model), batch, labels, StepClock(0, 0, 1), DistInfo(), ProcessGroup(), None,
                SumCounter())  # fmt: skip
    for p, want in zip(head, expected):
        torch.testing.assert_close(seen[id(p)], want, rtol=1e-6, atol=1e-7)


def test_epoch_metrics_are_the_step_means_and_survive_the_state_round_trip():
    model = make_model()
    objective = MMPareto()
    objective.bind(model.modalities, CLASSES, model.info)
    optimizer, counter, per_step = sgd(model), SumCounter(), []
    for step, (batch, labels) in enumerate(make_batches(8)):
        train_batch(model, objective, optimizer, batch, labels, StepClock(step, 0, 8), DistInfo(), ProcessGroup(), None,
                    counter)  # fmt: skip
        per_step.append(counter.pairs()["stat:mmpareto_conflict_a"][0].item() - sum(per_step))
    stats = {k.removeprefix("stat:"): v for k, v in counter.pairs().items() if k.startswith("stat:")}
    objective.on_epoch_end(0, stats, DistInfo())
    metrics = objective.epoch_metrics()
    assert sorted(set(per_step)) == [0.0, 1.0]  # some steps conflicted, some did not
    assert metrics["mmpareto_conflict_a"] == pytest.approx(sum(per_step) / 8)
    assert set(metrics) == {f"mmpareto_{w}_{m}" for w in ("cosine", "conflict", "weight", "scale") for m in DIMS}
    restored = MMPareto()
    restored.load_state_dict(objective.state_dict())
    assert restored.epoch_metrics() == metrics


def test_registered_with_its_official_variant_and_two_modalities_required():
    assert OBJECTIVES["mmpareto"].cls is MMPareto
    assert MMPareto.requirements.default_fusion == "concat"
    with pytest.raises(ValueError, match="two modalities"):
        MMPareto().bind(["a"], CLASSES, {})
    with pytest.raises(ValueError):
        MMParetoParams(gamma=0.0)
    with pytest.raises(ValueError):
        MMParetoParams(unknown=1)
