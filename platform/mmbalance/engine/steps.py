"""One training batch and one evaluation pass, for every objective.

The objective decides losses, multipliers and statistics; this module owns backward,
gradient hooks, clipping and optimizer steps, in the order docs/methods/protocol.md §6.3 fixes:
for each loss group, zero grads (set to None, so untouched parameters are skipped by the
step), backward, average gradients over ranks, the objective's ``perturb_gradients``, clip,
step. Grads are cleared on the whole model, not only on what the optimizer holds, so clipping,
the rank average and the objective's hook only ever see this group's gradients.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mmbalance.engine.distributed import ProcessGroup
from mmbalance.engine.metrics import SumCounter, add_prediction_stats, prediction_stat_names
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
) -> None:
    ctx = objective.forward_context("train", clock.epoch)
    features, outputs = model(batch, ctx)
    inputs = StepInputs(
        features=features,
        outputs=outputs,
        labels=labels,
        step=clock.step,
        epoch=clock.epoch,
        steps_per_epoch=clock.steps_per_epoch,
        phase="train",
        world=world,
        recompute_heads=lambda: model.heads_forward(features, objective.forward_context("train", clock.epoch)),
    )
    result = objective.step(inputs)
    total = _optimise(model, objective, optimizer, result, features, clock, world, group, grad_clip)
    n = labels.numel()
    counter.add("loss_total", total * n, n)
    for name, value in result.metrics.items():
        counter.add(name, value * n, n)
    for name, (s, c) in result.stats.items():
        counter.add(f"stat:{name}", s, c)
    with torch.no_grad():
        add_prediction_stats(counter, outputs, labels)


def _optimise(
    model: nn.Module,
    objective: Objective,
    optimizer: torch.optim.Optimizer,
    result: StepResult,
    features: dict[str, Tensor],
    clock: StepClock,
    world: DistInfo,
    ranks: ProcessGroup,
    grad_clip: float | None,
) -> Tensor:
    device = next(iter(features.values())).device
    total = torch.zeros((), device=device)
    for index, group in enumerate(result.losses):
        model.zero_grad(set_to_none=True)
        handles = []
        if index == 0:
            # Multipliers act on d(loss)/d(h_m) of this very batch (ARL's same-batch coefficients).
            handles = [features[m].register_hook(lambda g, s=s: g * s) for m, s in result.grad_multipliers.items()]
        loss = group.value()
        loss.backward()
        for handle in handles:
            handle.remove()
        ranks.average_gradients(model.parameters())  # clip after the average: the global-batch norm
        # After the average (every rank holds the global-batch gradient), before the clip; see
        # Objective.perturb_gradients for why.
        objective.perturb_gradients(
            GradientContext(
                group=group,
                group_index=index,
                result=result,
                step=clock.step,
                epoch=clock.epoch,
                world=world,
                seed=gradient_seed(clock.seed, clock.step, index),
                device=device,
                collect_params=lambda: parameter_groups(model),
            )
        )
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], grad_clip)
        optimizer.step()
        total = total + loss.detach()
    model.zero_grad(set_to_none=True)
    return total


@torch.no_grad()
def evaluate(model: LateFusion, objective: Objective, batches, epoch: int) -> SumCounter:
    """Sums for fused/per-modality accuracy, true-class probability and UCoM over a split.
    Labels are used only to score: the forward context is label-free."""
    model.eval()
    counter = SumCounter()
    counter.declare(prediction_stat_names(model.modalities), next(model.parameters()).device)
    ctx = objective.forward_context("eval", epoch)
    for batch, labels in batches:
        _, outputs = model(batch, ctx)
        add_prediction_stats(counter, outputs, labels)
    model.train()
    return counter
