"""One training batch and one evaluation pass, for every objective.

The objective decides losses, multipliers and statistics; this module owns backward,
gradient hooks, clipping and optimizer steps, in the order docs/methods/protocol.md §6.3 fixes:
for each loss group, zero grads (set to None, so untouched parameters are skipped by the
step), backward, average gradients over ranks, the objective's ``perturb_gradients``, clip,
step. Grads are cleared on the whole model, not only on what the optimizer holds, so clipping,
the rank average and the objective's hook only ever see this group's gradients.
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
    the earlier groups' steps."""
    precision = precision or MixedPrecision("fp32", labels.device)
    parts = _micro_batches(batch, labels, accumulate)
    model.zero_grad(set_to_none=True)
    total = torch.zeros((), device=labels.device)
    seen, kept = [], []  # every micro-batch's outputs for the counters; those whose groups wait
    for micro_batch, micro_labels in parts:
        features, outputs, result = _forward(model, objective, micro_batch, micro_labels, clock, world, precision)
        if len(result.losses) == 1:
            total = total + _backward(features, result, 0, len(parts), precision)  # frees this graph
        else:
            kept.append((features, result))
        seen.append((outputs, result, micro_labels))
    if kept and len(kept) != len(parts):
        raise ValueError("an objective returned a different number of loss groups for micro-batches of one step")
    first = seen[0][1]
    if not kept:
        _apply(model, objective, optimizer, first, 0, clock, world, group, grad_clip, precision)
    for index in range(len(first.losses) if kept else 0):
        model.zero_grad(set_to_none=True)
        for features, result in kept:
            total = total + _backward(features, result, index, len(parts), precision)
        _apply(model, objective, optimizer, first, index, clock, world, group, grad_clip, precision)
    model.zero_grad(set_to_none=True)
    for outputs, result, micro_labels in seen:
        n = micro_labels.numel()
        counter.add("loss_total", total * n, n)
        for name, value in result.metrics.items():
            counter.add(name, value * n, n)
        for name, (s, c) in result.stats.items():
            counter.add(f"stat:{name}", s, c)
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
    return features, outputs, objective.step(inputs)


def _backward(features, result: StepResult, index: int, parts: int, precision: MixedPrecision) -> Tensor:
    """Backward of loss group ``index`` of one micro-batch (divided by the micro-batch count, and
    scaled for fp16); returns its detached share of the step's loss."""
    handles = []
    if index == 0:
        # Multipliers act on d(loss)/d(h_m) of this very batch (ARL's same-batch coefficients).
        handles = [features[m].register_hook(lambda g, s=s: g * s) for m, s in result.grad_multipliers.items()]
    loss = result.losses[index].value()
    if parts > 1:
        loss = loss / parts
    precision.scale(loss).backward()
    for handle in handles:
        handle.remove()
    return loss.detach()


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
) -> None:
    """The summed gradient of loss group ``index``: rank average, unscale (fp16), the objective's
    hook, clip, step."""
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
