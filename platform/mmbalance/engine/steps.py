"""One training batch and one evaluation pass, for every objective.

The objective decides losses, multipliers and statistics; this module owns backward,
gradient hooks, clipping and optimizer steps, in the order docs/methods/protocol.md §6.3 fixes:
for each loss group, zero grads (set to None, so untouched parameters are skipped by the
step), backward, average gradients over ranks, the objective's ``perturb_gradients``, clip,
step. Grads are cleared on the whole model, not only on what the optimizer holds, so clipping,
the rank average and the objective's hook only ever see this group's gradients.

A loss group with named ``parts`` takes the same single step, with its backward split: each
part is backpropagated on its own (the graph kept for all but the last part) and its gradients
moved aside, summed over the micro-batches; then each part's gradient is averaged over ranks,
``p.grad`` is set to the parts' sum (None where no part reached), fp16 unscales both, and the
hook receives the parts as ``GradientContext.part_grads`` to combine them into ``p.grad``;
then clip and step as for any group.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass

import torch
from torch import Tensor

from mmbalance.engine.distributed import ProcessGroup
from mmbalance.engine.metrics import SumCounter, add_prediction_stats, prediction_stat_names
from mmbalance.engine.precision import MixedPrecision, float32_outputs
from mmbalance.models import LateFusion
from mmbalance.objectives import DistInfo, GradientContext, Objective, ParameterGroups, StepInputs, StepResult
from mmbalance.objectives.base import PartGradients


@dataclass
class StepClock:
    step: int  # global optimisation step, identical on every rank
    epoch: int
    steps_per_epoch: int
    seed: int = 0  # the recipe's seed: with the step and the loss group it seeds the gradient hook's noise


def gradient_seed(seed: int, step: int, group_index: int) -> int:
    """A 63-bit seed from (recipe seed, global step, loss-group index): the same on every rank,
    different for every step and group, and independent of the process's RNG state (which ranks
    need not share), so a resumed run draws what the uninterrupted one drew."""
    digest = hashlib.blake2b(f"{seed}:{step}:{group_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def parameter_groups(model: LateFusion) -> ParameterGroups:
    """The model's parameters as encoder per modality, per-modality heads and shared layers."""
    encoders = {m: list(model.encoders[m].parameters()) for m in model.modalities}
    own = getattr(model, "heads", None)  # mean/sum/boost: per-modality layers; concat: none
    heads = {m: list(own[m].parameters()) if own is not None else [] for m in model.modalities}
    seen = {id(p) for group in (*encoders.values(), *heads.values()) for p in group}
    return ParameterGroups(encoders, heads, [p for p in model.parameters() if id(p) not in seen])


def train_batch(
    model: LateFusion,
    objective: Objective,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, Tensor],
    labels: Tensor,
    clock: StepClock,
    world: DistInfo,
    group: ProcessGroup,
    grad_clip: float | None,
    counter: SumCounter,
    precision: MixedPrecision | None = None,
    accumulate: int = 1,
) -> None:
    """One optimisation step on this rank's ``batch``, taken as ``accumulate`` equal micro-batches.

    Each micro-batch is one forward and one ``objective.step``; each loss group's gradient is
    summed over the micro-batches (every loss divided by ``accumulate``) before that group's
    average, hook, clip and step. An objective whose losses are means over the batch therefore
    takes the step of the whole batch; one that normalises by batch statistics (MNL's
    ``normalize: selected``, ARL's variances, ARM's histograms, AUG's scores) computes them per
    micro-batch (docs/objectives.md, "Mixed precision and gradient accumulation"). A single-group
    objective backpropagates each micro-batch at once, so only one micro-batch's activations are
    alive; a multi-group one (AUG) keeps them all, because its later groups are evaluated after
    the earlier groups' steps. A group with ``parts`` keeps one gradient per part, summed over
    the micro-batches in a ``_PartStash`` (see ``_backward`` and ``_apply``)."""
    precision = precision or MixedPrecision("fp32", labels.device)
    micro = _micro_batches(batch, labels, accumulate)
    model.zero_grad(set_to_none=True)
    total = torch.zeros((), device=labels.device)
    seen, kept = [], []  # every micro-batch's outputs for the counters; those whose groups wait
    stash = _PartStash()
    for micro_batch, micro_labels in micro:
        features, outputs, result = _forward(model, objective, micro_batch, micro_labels, clock, world, precision)
        if len(result.losses) == 1:
            total = total + _backward(model, features, result, 0, len(micro), precision, stash)  # frees this graph
        else:
            kept.append((features, result))
        seen.append((outputs, result, micro_labels))
    if kept and len(kept) != len(micro):
        raise ValueError("an objective returned a different number of loss groups for micro-batches of one step")
    first = seen[0][1]
    if not kept:
        _apply(model, objective, optimizer, first, 0, clock, world, group, grad_clip, precision, stash)
    for index in range(len(first.losses) if kept else 0):
        model.zero_grad(set_to_none=True)
        stash = _PartStash()
        for features, result in kept:
            total = total + _backward(model, features, result, index, len(micro), precision, stash)
        _apply(model, objective, optimizer, first, index, clock, world, group, grad_clip, precision, stash)
    model.zero_grad(set_to_none=True)
    for outputs, result, micro_labels in seen:
        n = micro_labels.numel()
        counter.add_means({"loss_total": total, **result.metrics}, n)  # one stack, one add
        counter.add_pairs(result.stats, prefix="stat:")
        with torch.no_grad():
            add_prediction_stats(counter, outputs, micro_labels)


def _micro_batches(batch: dict[str, Tensor], labels: Tensor, parts: int):
    if parts == 1:
        return [(batch, labels)]
    if labels.numel() % parts:
        raise ValueError(f"a batch of {labels.numel()} samples does not split into {parts} equal micro-batches")
    chunks = {m: x.chunk(parts) for m, x in batch.items()}
    return [({m: chunks[m][k] for m in batch}, y) for k, y in enumerate(labels.chunk(parts))]


def _forward(model, objective, batch, labels, clock, world, precision):
    """One micro-batch: the model under autocast, the objective in float32."""
    ctx = objective.forward_context("train", clock.epoch)
    with precision.autocast():
        features, outputs = model(batch, ctx)

    def recompute_heads():
        with precision.autocast():
            heads = model.heads_forward(features, objective.forward_context("train", clock.epoch))
        return float32_outputs(heads)

    auxiliary = outputs.auxiliary_losses  # the fusion's own losses (PDF), read before the cast
    outputs = float32_outputs(outputs)
    inputs = StepInputs(
        features=features,
        outputs=outputs,
        labels=labels,
        step=clock.step,
        epoch=clock.epoch,
        steps_per_epoch=clock.steps_per_epoch,
        phase="train",
        world=world,
        recompute_heads=recompute_heads,
    )
    result = objective.step(inputs)
    # They join the objective's first loss group, so every objective trains the fusion the same
    # way without knowing it exists; each is logged as loss_<name>.
    extra = {name: loss(labels) for name, loss in auxiliary.items()}
    if extra:
        group, added = result.losses[0], sum(extra.values())
        if group.parts is not None:  # per-part gradients would need to know where it belongs
            raise ValueError(f"the fusion's losses {sorted(extra)} need a first loss group with one loss, not parts")
        own = group.loss
        group.loss = (lambda: own() + added) if callable(own) else own + added
        result.metrics.update({f"loss_{name}": value.detach() for name, value in extra.items()})
    return features, outputs, result


class _PartStash:
    """Per-part gradients of one parts group, summed over the step's micro-batches.

    After each part's backward its gradients move from ``p.grad`` into the stash (``p.grad`` back
    to None), so the next part's backward starts clean and ``p.grad`` never mixes parts."""

    def __init__(self) -> None:
        self.grads: dict[str, dict[int, Tensor]] = {}  # part -> id(parameter) -> summed gradient

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.grads)

    def take(self, name: str, params: list[torch.nn.Parameter]) -> None:
        bucket = self.grads.setdefault(name, {})
        for p in params:
            if p.grad is None:
                continue
            key = id(p)
            bucket[key] = p.grad if key not in bucket else bucket[key] + p.grad
            p.grad = None


def _backward(
    model, features, result: StepResult, index: int, micro: int, precision: MixedPrecision, stash: _PartStash
) -> Tensor:
    """Backward of loss group ``index`` of one micro-batch (divided by the micro-batch count, and
    scaled for fp16); returns its detached share of the step's loss. A group with ``parts``
    backpropagates each part on its own, in order (keeping the graph for all but the last), and
    moves each part's gradients into ``stash``."""
    handles = []
    if index == 0:
        # Multipliers act on d(loss)/d(h_m) of this very batch (ARL's same-batch coefficients).
        handles = [features[m].register_hook(lambda g, s=s: g * s) for m, s in result.grad_multipliers.items()]
    group = result.losses[index]
    if group.parts is None:
        loss = group.value()
        if micro > 1:
            loss = loss / micro
        precision.scale(loss).backward()
        share = loss.detach()
    else:
        params = [p for p in model.parameters() if p.requires_grad]
        names, share = list(group.parts), torch.zeros((), device=next(model.parameters()).device)
        for k, name in enumerate(names):
            loss = group.part_value(name)
            if micro > 1:
                loss = loss / micro
            precision.scale(loss).backward(retain_graph=k < len(names) - 1)
            stash.take(name, params)
            share = share + loss.detach()
    for handle in handles:
        handle.remove()
    return share


def _combine_parts(model, stash: _PartStash, ranks: ProcessGroup, precision: MixedPrecision, optimizer):
    """Each part's summed gradient averaged over ranks, ``p.grad`` set to the parts' sum and
    unscaled (fp16) with the optimizer's gradients; returns the parts, unscaled alike."""
    params = [p for p in model.parameters() if p.requires_grad]
    averaged: dict[str, dict[int, Tensor]] = {}
    for name in stash.names:
        for p in params:
            p.grad = stash.grads[name].get(id(p))
        ranks.average_gradients(params)
        averaged[name] = {id(p): p.grad for p in params if p.grad is not None}
    for p in params:
        reached = [averaged[name][id(p)] for name in stash.names if id(p) in averaged[name]]
        p.grad = torch.stack(reached).sum(dim=0) if reached else None  # a new tensor: the parts stay as they are
    precision.unscale(optimizer)  # fp16: the sum is unscaled in place, the parts below alike
    if precision.scaler is not None:
        inverse = 1.0 / precision.scaler.get_scale()
        averaged = {name: {k: g * inverse for k, g in grads.items()} for name, grads in averaged.items()}
    return PartGradients(stash.names, averaged)


def _apply(
    model,
    objective,
    optimizer,
    result: StepResult,
    index: int,
    clock: StepClock,
    world: DistInfo,
    ranks: ProcessGroup,
    grad_clip: float | None,
    precision: MixedPrecision,
    stash: _PartStash,
) -> None:
    """The summed gradient of loss group ``index``: rank average, unscale (fp16), the objective's
    hook, clip, step. For a group with parts, each part is averaged on its own and the hook
    receives them (``GradientContext.part_grads``) with ``p.grad`` their sum."""
    part_grads = None
    if result.losses[index].parts is not None:
        part_grads = _combine_parts(model, stash, ranks, precision, optimizer)
    else:
        ranks.average_gradients(model.parameters())  # clip after the average: the global-batch norm
        precision.unscale(optimizer)  # fp16: the hook and the clip see true gradients
    # After the average (every rank holds the global-batch gradient), before the clip; see
    # Objective.perturb_gradients for why. With accumulation ``result`` is the first micro-batch's.
    objective.perturb_gradients(
        GradientContext(
            group=result.losses[index],
            group_index=index,
            result=result,
            step=clock.step,
            epoch=clock.epoch,
            world=world,
            seed=gradient_seed(clock.seed, clock.step, index),
            device=next(model.parameters()).device,
            collect_params=lambda: parameter_groups(model),
            part_grads=part_grads,
        )
    )
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], grad_clip)
    precision.step(optimizer)


@torch.no_grad()
def evaluate(
    model: LateFusion, objective: Objective, batches, epoch: int, precision: MixedPrecision | None = None
) -> SumCounter:
    """Sums for fused/per-modality accuracy, true-class probability and UCoM over a split, the
    forward in the run's precision and the scores in float32. Labels are used only to score:
    the forward context is label-free."""
    model.eval()
    counter = SumCounter()
    counter.declare(prediction_stat_names(model.modalities), next(model.parameters()).device)
    ctx = objective.forward_context("eval", epoch)
    autocast = precision.autocast() if precision is not None else contextlib.nullcontext()
    for batch, labels in batches:
        with autocast:
            _, outputs = model(batch, ctx)
        add_prediction_stats(counter, float32_outputs(outputs), labels)
    model.train()
    return counter
