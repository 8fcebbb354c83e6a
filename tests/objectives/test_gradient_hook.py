"""The objective's gradient hook (``perturb_gradients``): where the engine's step calls it, what
it receives, and that gradient modulation with noise keeps a data-parallel step equal to the
single-process step. The objective is a test-only, OGM-GE-like toy that is never registered."""

from __future__ import annotations

import math
from typing import Literal

import pytest
import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from helpers.distributed import FixedOrderSource, assert_same_tensors, run_ranks
from mmbalance.engine.distributed import ProcessGroup
from mmbalance.engine.metrics import SumCounter
from mmbalance.engine.steps import StepClock, gradient_seed, parameter_groups, train_batch
from mmbalance.models.fusion import LateFusion
from mmbalance.objectives import (
    DistInfo,
    GradientContext,
    LossGroup,
    Requirements,
    StatelessObjective,
    StepInputs,
    StepResult,
)
from mmbalance.objectives.base import FUSIONS, cross_entropy_per_sample

DIMS = {"a": 6, "v": 5}
CLASSES = 4


class ToyParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    per_modality_groups: bool = False  # one loss group per modality (as AUG) instead of one LF group
    modality: str | None = None  # whose encoder gradients `coeff` scales; None: the dominant one (OGM-GE)
    coeff: float = 1.0  # the fixed coefficient when `modality` is set
    alpha: float = 0.0  # modality None: coefficient 1 - tanh(alpha * (ratio - 1)) on the dominant modality
    noise: float = 0.0  # Gaussian noise on the scaled gradients, std = noise * the gradient's std (OGM-GE's GE)
    noise_source: Literal["generator", "process"] = "generator"  # process: the rank's own RNG (wrong on purpose)


class Toy(StatelessObjective):
    """LF loss (or one unimodal CE group per modality); the hook scales one modality's encoder
    gradients and adds noise. Records what the engine called and what the hook saw."""

    name = "toy_gradient"
    Params = ToyParams
    params: ToyParams
    requirements = Requirements(fusions=("mean", "sum"))

    def __init__(self, params: ToyParams | None = None, events: list | None = None):
        super().__init__(params)
        self.events = [] if events is None else events
        self.contexts: list[GradientContext] = []
        self.seen: list[dict[int, torch.Tensor]] = []  # per hook call: id(param) -> grad as the hook found it
        self.results: list[StepResult] = []

    def step(self, inputs: StepInputs) -> StepResult:
        out, y = inputs.outputs, inputs.labels
        unimodal = {m: cross_entropy_per_sample(out.unimodal_logits[m], y).mean() for m in self.modalities}
        # OGM-GE's scores (summed true-class probabilities), summed over ranks: the same on every rank.
        scores = torch.stack(
            [out.unimodal_logits[m].detach().softmax(-1).gather(1, y[:, None]).sum() for m in self.modalities]
        )
        scores = inputs.world.all_reduce_sum(scores)
        if self.params.per_modality_groups:
            losses = [LossGroup(unimodal[m], modalities=(m,)) for m in self.modalities]
        else:
            losses = [LossGroup(cross_entropy_per_sample(out.fused_logits, y).mean() + sum(unimodal.values()))]
        for i, group in enumerate(losses):  # fires when the engine starts this group's backward
            group.loss.register_hook(lambda grad, i=i: self.events.append(("backward", i)))
        result = StepResult(losses=losses, metrics={f"toy_score_{m}": scores[i] for i, m in enumerate(self.modalities)})
        self.results.append(result)
        return result

    def perturb_gradients(self, ctx: GradientContext) -> None:
        self.events.append(("hook", ctx.group_index))
        self.contexts.append(ctx)
        groups = ctx.params
        self.seen.append({id(p): p.grad.clone() for p in groups.all() if p.grad is not None})
        p = self.params
        if p.modality is not None:
            target, coeff = p.modality, p.coeff
        else:
            scores = {m: float(ctx.result.metrics[f"toy_score_{m}"]) for m in self.modalities}
            target = max(scores, key=scores.get)
            coeff = 1.0 - math.tanh(p.alpha * (scores[target] / max(min(scores.values()), 1e-12) - 1.0))
        for param in groups.encoders[target]:
            if param.grad is None:
                continue
            param.grad.mul_(coeff)
            if p.noise > 0:
                gen = ctx.generator if p.noise_source == "generator" else None
                draw = torch.randn(param.shape, generator=gen, device=param.device, dtype=param.dtype)
                param.grad.add_(draw * p.noise * param.grad.std(correction=0))


class LinearEncoder(nn.Module):
    def __init__(self, in_dim: int, out_dim: int = 8):
        super().__init__()
        self.net, self.out_dim = nn.Linear(in_dim, out_dim), out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.net(x))


def make_model(fusion: str = "mean") -> LateFusion:
    torch.manual_seed(0)
    return LateFusion({m: LinearEncoder(d) for m, d in DIMS.items()}, CLASSES, fusion=fusion, boost_hidden=4)


def make_batch(n: int = 16, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return {m: torch.randn(n, d, generator=gen) for m, d in DIMS.items()}, torch.randint(
        0, CLASSES, (n,), generator=gen
    )


def bound(params: ToyParams, model: LateFusion, events: list | None = None) -> Toy:
    toy = Toy(params, events)
    toy.bind(model.modalities, CLASSES, model.info)
    return toy


def snapshot(params) -> dict[int, torch.Tensor]:
    return {id(p): p.grad.clone() for p in params if p.grad is not None}


class HalvingGroup(ProcessGroup):
    """Stands in for the rank average: records the call and halves every gradient, so a hook
    that runs after it must find halved gradients."""

    def __init__(self, events: list):
        super().__init__()
        self.events, self.before = events, []

    def average_gradients(self, params) -> None:
        params = list(params)
        self.events.append("average")
        self.before.append(snapshot(params))
        for p in params:
            if p.grad is not None:
                p.grad.mul_(0.5)


class RecordingSGD(torch.optim.SGD):
    def __init__(self, params, events: list, **kwargs):
        super().__init__(params, **kwargs)
        self.events = events

    def step(self, closure=None):
        self.events.append("step")
        return super().step(closure)


# -- (a) where the engine calls the hook ------------------------------------------------------


def test_hook_runs_once_per_loss_group_after_the_average_and_before_clip_and_step(monkeypatch):
    events: list = []
    clipped: list[dict[int, torch.Tensor]] = []
    real_clip = torch.nn.utils.clip_grad_norm_

    def recording_clip(params, max_norm, *args, **kwargs):
        params = list(params)
        events.append("clip")
        clipped.append(snapshot(params))
        return real_clip(params, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    model = make_model()
    toy = bound(ToyParams(per_modality_groups=True, modality="a", coeff=3.0), model, events)
    ranks = HalvingGroup(events)
    optimizer = RecordingSGD(model.parameters(), events, lr=0.1)
    world = DistInfo()
    batch, labels = make_batch()
    for step in range(2):
        clock = StepClock(step, 0, 2, seed=5)
        train_batch(model, toy, optimizer, batch, labels, clock, world, ranks, 1e6, SumCounter())
    per_group = [
        ("backward", 0),
        "average",
        ("hook", 0),
        "clip",
        "step",
        ("backward", 1),
        "average",
        ("hook", 1),
        "clip",
        "step",
    ]
    assert events == per_group * 2

    encoder_a = {id(p) for p in model.encoders["a"].parameters()}
    for call, ctx in enumerate(toy.contexts):
        step, index = divmod(call, 2)
        # The hook saw the averaged gradients, and the clip saw what the hook left.
        assert toy.seen[call].keys() == ranks.before[call].keys() == clipped[call].keys()
        for key, grad in toy.seen[call].items():
            torch.testing.assert_close(grad, 0.5 * ranks.before[call][key], rtol=0, atol=0)
            factor = 3.0 if key in encoder_a else 1.0
            torch.testing.assert_close(clipped[call][key], factor * grad, rtol=1e-6, atol=0)
        # What it received: this group, its step, the step's DistInfo, a rank-independent seed.
        assert ctx.group_index == index and ctx.group is ctx.result.losses[index] and ctx.result is toy.results[step]
        assert (ctx.step, ctx.epoch, ctx.world) == (step, 0, world)
        assert ctx.seed == gradient_seed(5, step, index) and ctx.device == torch.device("cpu")
        assert ctx.group.modalities == (model.modalities[index],)
    assert any(key in encoder_a for key in toy.seen[0]) and not any(key in encoder_a for key in toy.seen[1])


def test_hook_gets_the_parameters_grouped_by_modality():
    model = make_model()
    toy = bound(ToyParams(), model)
    batch, labels = make_batch()
    train_batch(
        model,
        toy,
        torch.optim.SGD(model.parameters(), lr=0.1),
        batch,
        labels,
        StepClock(0, 0, 1),
        DistInfo(),
        ProcessGroup(),
        None,
        SumCounter(),
    )
    groups = toy.contexts[0].params
    for m in model.modalities:
        assert groups.encoders[m] == list(model.encoders[m].parameters())
        assert groups.heads[m] == list(model.heads[m].parameters())
    assert groups.shared == [] and len(groups.all()) == len(list(model.parameters()))


@pytest.mark.parametrize("fusion", FUSIONS)
def test_parameter_groups_partition_the_model_for_every_fusion(fusion):
    model = make_model(fusion)
    if fusion == "boost":
        model.add_head("v")
    groups = parameter_groups(model)
    ids = [id(p) for p in groups.all()]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in model.parameters()}
    assert all(groups.encoders[m] == list(model.encoders[m].parameters()) for m in model.modalities)
    if fusion in ("concat", "boost"):
        assert {id(p) for p in model.shared_head.parameters()} <= {id(p) for p in groups.shared}
    if fusion == "boost":
        assert len(groups.heads["v"]) == 4 and len(groups.heads["a"]) == 2  # two layers vs one, weight + bias
    if fusion == "concat":
        assert groups.heads == {m: [] for m in model.modalities}


def test_gradient_seed_depends_on_seed_step_and_group_only():
    seeds = {gradient_seed(s, t, g) for s in (0, 1) for t in (0, 1, 2) for g in (0, 1)}
    assert len(seeds) == 12 and all(0 <= s < 2**63 for s in seeds)
    assert gradient_seed(3, 7, 1) == gradient_seed(3, 7, 1)

    def draw(seed: int) -> torch.Tensor:
        ctx = GradientContext(
            LossGroup(torch.zeros(())), 0, StepResult([]), 0, 0, DistInfo(), seed, torch.device("cpu"), lambda: None
        )
        return torch.randn(5, generator=ctx.generator)

    torch.manual_seed(0)
    first = draw(gradient_seed(3, 7, 1))
    torch.manual_seed(1)  # the process RNG plays no part
    assert torch.equal(first, draw(gradient_seed(3, 7, 1))) and not torch.equal(first, draw(gradient_seed(3, 8, 1)))


def test_the_default_hook_leaves_the_step_a_plain_backward_and_step():
    class Plain(Toy):
        perturb_gradients = StatelessObjective.perturb_gradients  # the protocol default: a no-op

    model, reference = make_model(), make_model()
    batch, labels = make_batch()
    plain = Plain()
    plain.bind(model.modalities, CLASSES, model.info)
    train_batch(
        model,
        plain,
        torch.optim.SGD(model.parameters(), lr=0.1),
        batch,
        labels,
        StepClock(0, 0, 1),
        DistInfo(),
        ProcessGroup(),
        None,
        SumCounter(),
    )
    by_hand = bound(ToyParams(), reference)
    features, outputs = reference(batch, by_hand.forward_context("train", 0))
    loss = by_hand.step(StepInputs(features, outputs, labels, 0, 0, 1, "train")).losses[0].value()
    reference.zero_grad(set_to_none=True)
    loss.backward()
    torch.optim.SGD(reference.parameters(), lr=0.1).step()
    assert plain.contexts == [] and plain.events == [("backward", 0)]
    assert_same_tensors(model.state_dict(), reference.state_dict(), atol=1e-7, label="default hook")


# -- (b) scaling one modality's gradients by c scales its SGD update by c ---------------------------


def sgd_step(coeff: float, lr: float = 0.1):
    model = make_model()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    toy = bound(ToyParams(modality="a", coeff=coeff), model)
    batch, labels = make_batch()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)  # plain SGD: update = -lr * grad
    train_batch(
        model, toy, optimizer, batch, labels, StepClock(0, 0, 1), DistInfo(), ProcessGroup(), None, SumCounter()
    )
    grads = {k: toy.seen[0][id(p)] for k, p in model.named_parameters()}  # before the hook scaled them
    return before, {k: v.detach().clone() for k, v in model.named_parameters()}, grads


def test_scaling_one_modalitys_gradients_by_c_scales_its_sgd_update_by_exactly_c():
    c, lr = 0.25, 0.1
    before, unscaled, grads = sgd_step(1.0, lr)
    before_c, scaled, grads_c = sgd_step(c, lr)
    assert {k: torch.equal(v, before_c[k]) for k, v in before.items()} == {k: True for k in before}
    for name, start in before.items():
        assert torch.equal(grads[name], grads_c[name])  # the hook acts after backward: same raw gradient
        if name.startswith("encoders.a."):
            # By hand: p' = p - lr * (c * g), i.e. c times the unscaled update -lr * g.
            torch.testing.assert_close(scaled[name], start - lr * c * grads[name], rtol=0, atol=1e-7)
            torch.testing.assert_close(scaled[name] - start, c * (unscaled[name] - start), rtol=0, atol=1e-7)
            assert (unscaled[name] - start).abs().max() > 1e-4, name  # a real update, not a zero one
        else:
            assert torch.equal(scaled[name], unscaled[name]), name  # other modality and heads: untouched


# -- (c) modulation and noise keep the data-parallel step the single-process step ----------------------

GLOBAL_BATCH, EPOCH_STEPS = 16, (2, 2, 1)
TOY_VARIANTS = {  # label -> (ToyParams fields, grad_clip)
    "plain": ({}, 1.0),
    "ogm": ({"alpha": 2.0}, 1.0),
    "ogm-ge": ({"alpha": 2.0, "noise": 0.5}, 1.0),
    "ogm-ge-per-modality-groups": ({"alpha": 2.0, "noise": 0.5, "per_modality_groups": True}, None),
    "process-rng-noise": ({"alpha": 2.0, "noise": 0.5, "noise_source": "process"}, 1.0),
}
EQUIVALENT = ["plain", "ogm", "ogm-ge", "ogm-ge-per-modality-groups"]


def toy_training(group: ProcessGroup, variant: str) -> dict[str, torch.Tensor]:
    fields, grad_clip = TOY_VARIANTS[variant]
    model = make_model()
    group.broadcast_module(model)
    toy = bound(ToyParams(**fields), model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    source = FixedOrderSource(
        7, group.rank, group.world_size, {m: (d,) for m, d in DIMS.items()}, GLOBAL_BATCH, EPOCH_STEPS, CLASSES
    )
    torch.manual_seed(1000 + group.rank)  # ranks' RNG streams differ; the hook's generator must not care
    world, step = group.info(), 0
    for epoch in range(len(EPOCH_STEPS)):
        batches, steps = source.train_batches(epoch, GLOBAL_BATCH // group.world_size)
        for batch, labels in batches:
            train_batch(
                model,
                toy,
                optimizer,
                batch,
                labels,
                StepClock(step, epoch, steps, seed=11),
                world,
                group,
                grad_clip,
                SumCounter(),
            )
            step += 1
    assert step == source.total_steps == 5
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def every_toy_variant(group: ProcessGroup) -> dict[str, dict[str, torch.Tensor]]:
    return {variant: toy_training(group, variant) for variant in TOY_VARIANTS}


@pytest.fixture(scope="module")
def toy_two_rank_results(tmp_path_factory):
    return run_ranks(every_toy_variant, (), tmp_path_factory.mktemp("hook-eq"))


@pytest.mark.integration
@pytest.mark.parametrize("variant", EQUIVALENT)
def test_two_workers_match_one_worker_with_gradient_modulation_and_noise(toy_two_rank_results, variant):
    single = toy_training(ProcessGroup(), variant)
    for rank_results in toy_two_rank_results:
        assert_same_tensors(rank_results[variant], single, atol=1e-5, label=variant)


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.integration
def test_the_equivalence_test_would_see_a_wrong_hook(toy_two_rank_results):
    single = {v: toy_training(ProcessGroup(), v) for v in ("plain", "ogm", "ogm-ge")}
    assert _max_diff(single["ogm"], single["plain"]) > 1e-3  # the coefficient acted
    assert _max_diff(single["ogm-ge"], single["ogm"]) > 1e-3  # the noise acted
    rank0, rank1 = (r["process-rng-noise"] for r in toy_two_rank_results)
    assert _max_diff(rank0, rank1) > 1e-4  # noise from each rank's own RNG splits the ranks


# -- (d) loss groups with named parts --------------------------------------------------------------


class PartsToy(StatelessObjective):
    """One loss group of named parts: CE of audio's logits, and, lazily, CE of the fused logits
    (or the two as one plain summed loss). The hook records what it received and changes nothing."""

    name = "toy_parts"
    Params = ToyParams
    requirements = Requirements(fusions=("mean", "sum"))

    def __init__(self, params: ToyParams | None = None, plain: bool = False, only_audio: bool = False):
        super().__init__(params)
        self.plain, self.only_audio = plain, only_audio
        self.received: list[tuple[object, dict[int, torch.Tensor]]] = []

    def step(self, inputs: StepInputs) -> StepResult:
        out, y = inputs.outputs, inputs.labels
        audio = cross_entropy_per_sample(out.unimodal_logits["a"], y).mean()
        if self.only_audio:
            return StepResult(losses=[LossGroup(parts={"audio": audio})])

        def fused():
            return cross_entropy_per_sample(out.fused_logits, y).mean()

        if self.plain:
            return StepResult(losses=[LossGroup(audio + fused())])
        return StepResult(losses=[LossGroup(parts={"audio": audio, "fused": fused})])

    def perturb_gradients(self, ctx: GradientContext) -> None:
        grads = {id(p): p.grad.clone() for p in ctx.params.all() if p.grad is not None}
        self.received.append((ctx.part_grads, grads))


def parts_step(objective, model, batch, labels, ranks=None, accumulate: int = 1, steps: int = 1):
    objective.bind(model.modalities, CLASSES, model.info)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(steps):
        clock = StepClock(step, 0, steps)
        train_batch(
            model, objective, optimizer, batch, labels, clock, DistInfo(), ranks or ProcessGroup(), None, SumCounter(),
            accumulate=accumulate,
        )  # fmt: skip
    return model


def test_loss_group_takes_loss_or_parts_and_sums_its_parts():
    with pytest.raises(ValueError, match="exactly one"):
        LossGroup()
    with pytest.raises(ValueError, match="exactly one"):
        LossGroup(torch.ones(()), parts={"x": torch.ones(())})
    with pytest.raises(ValueError, match="at least one"):
        LossGroup(parts={})
    group = LossGroup(parts={"x": torch.tensor(2.0), "y": lambda: torch.tensor(0.5)})
    assert float(group.value()) == 2.5 and float(group.part_value("y")) == 0.5


def test_each_part_gradient_is_that_part_alone_and_p_grad_is_their_sum():
    batch, labels = make_batch()
    reference = make_model()
    _, out = reference(batch, None)
    params = list(reference.parameters())
    alone = {
        "audio": torch.autograd.grad(
            cross_entropy_per_sample(out.unimodal_logits["a"], labels).mean(),
            params,
            retain_graph=True,
            allow_unused=True,
        ),  # fmt: skip
        "fused": torch.autograd.grad(cross_entropy_per_sample(out.fused_logits, labels).mean(), params),
    }
    toy = PartsToy()
    model = parts_step(toy, make_model(), batch, labels)
    ((part_grads, at_hook),) = toy.received
    assert part_grads.names == ("audio", "fused")
    for index, p in enumerate(model.parameters()):
        g_audio, g_fused = alone["audio"][index], alone["fused"][index]
        got_audio = part_grads.of("audio", p)
        assert (got_audio is None) == (g_audio is None)  # visual's encoder and head: the audio part never reaches them
        if g_audio is not None:
            torch.testing.assert_close(got_audio, g_audio, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(part_grads.of("fused", p), g_fused, rtol=1e-6, atol=1e-7)
        total = g_fused if g_audio is None else g_fused + g_audio
        torch.testing.assert_close(at_hook[id(p)], total, rtol=1e-6, atol=1e-7)
    flat = part_grads.flat("audio", list(model.encoders["v"].parameters()))
    assert flat.shape == (sum(p.numel() for p in model.encoders["v"].parameters()),) and not flat.any()


def test_a_parameter_no_part_reaches_keeps_grad_none_and_takes_no_step():
    batch, labels = make_batch()
    toy = PartsToy(only_audio=True)
    before = [p.detach().clone() for p in make_model().encoders["v"].parameters()]
    model = parts_step(toy, make_model(), batch, labels)
    _, at_hook = toy.received[0]
    visual = {id(p) for p in model.encoders["v"].parameters()} | {id(p) for p in model.heads["v"].parameters()}
    assert visual and not visual & at_hook.keys()
    for p, old in zip(model.encoders["v"].parameters(), before):
        torch.testing.assert_close(p.detach(), old, rtol=0, atol=0)


def test_parts_with_a_no_op_hook_take_the_step_of_the_summed_loss():
    batch, labels = make_batch()
    parts = parts_step(PartsToy(), make_model(), batch, labels, steps=3)
    plain = parts_step(PartsToy(plain=True), make_model(), batch, labels, steps=3)
    for (name, got), want in zip(parts.state_dict().items(), plain.state_dict().values()):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6, msg=name)


def test_part_gradients_add_up_over_micro_batches_to_the_full_batch_ones():
    batch, labels = make_batch()
    whole, halves = PartsToy(), PartsToy()
    whole_model = parts_step(whole, make_model(), batch, labels)
    halves_model = parts_step(halves, make_model(), batch, labels, accumulate=2)
    ((full, _),), ((split, _),) = whole.received, halves.received
    for name in full.names:
        for p_whole, p_halves in zip(whole_model.parameters(), halves_model.parameters()):
            want, got = full.of(name, p_whole), split.of(name, p_halves)
            assert (want is None) == (got is None)
            if want is not None:
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_each_part_is_averaged_over_ranks_before_the_hook():
    events: list = []
    batch, labels = make_batch()
    ranks = HalvingGroup(events)
    toy = PartsToy()
    model = parts_step(toy, make_model(), batch, labels, ranks=ranks)
    assert events == ["average", "average"]  # one per part, both before the hook
    ((part_grads, at_hook),) = toy.received
    for index, name in enumerate(part_grads.names):
        for key, grad in part_grads.grads[name].items():
            torch.testing.assert_close(grad, 0.5 * ranks.before[index][key], rtol=0, atol=0)
    for p in model.parameters():
        reached = [part_grads.grads[n][id(p)] for n in part_grads.names if id(p) in part_grads.grads[n]]
        torch.testing.assert_close(at_hook[id(p)], sum(reached), rtol=1e-6, atol=0)
