"""MMPareto: Pareto integration of the multimodal and unimodal gradients (docs/methods/mmpareto.md §1-§6).

The loss is ``CE(z_f, y) + sum_m CE(z_m, y)`` as one loss group with one part per term (§2), so
the engine keeps each term's gradient. On modality m's encoder the hook combines the multimodal
gradient ``g_f`` and m's unimodal gradient ``g_m``: equal weights when their cosine is positive,
the min-norm weights of the two when they conflict (§3, §4), times 2; then it rescales the result
to the norm of the plain sum ``g_f + g_m`` and by ``gamma`` (§5). Heads keep the summed gradient.
The part gradients arrive averaged over ranks, so every rank takes the same weights (§6).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from mmbalance.objectives.base import (
    DistInfo,
    GradientContext,
    LastEpochMetrics,
    LossGroup,
    Requirements,
    StatelessObjective,
    StepInputs,
    StepResult,
    StructuralChange,
    cross_entropy_per_sample,
    register_objective,
)

RescaleScope = Literal["encoder", "parameter"]
SolverEdges = Literal["exact", "official"]

MULTIMODAL = "multimodal"  # the fused CE's part name
# The official solver's weights when one gradient's projection on the other reaches its own norm.
OFFICIAL_EDGE_HIGH, OFFICIAL_EDGE_LOW = 0.999, 0.001
_COSINE_EPS = 1e-8  # torch.nn.functional.cosine_similarity's default, as the official code uses it


def unimodal_part(m: str) -> str:
    return f"unimodal_{m}"


class MMParetoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    gamma: float = Field(1.5, gt=0.0, description="magnitude enhancement after the rescale (official 1.5)")
    rescale_scope: RescaleScope = Field(
        "encoder",
        description="encoder: one norm ratio over the whole encoder gradient; parameter: one per parameter "
        "tensor (official)",
    )
    only_enlarge: bool = Field(
        True, description="rescale only when the sum's norm exceeds the combination's (official: max(1, ratio))"
    )
    solver_edges: SolverEdges = Field(
        "exact",
        description="min-norm weight where one gradient's projection reaches the other's norm: exact: 1 or 0; "
        "official: 0.999 or 0.001",
    )


def min_norm_weight(g1: Tensor, g2: Tensor, edges: SolverEdges = "exact") -> Tensor:
    """Weight ``w`` on ``g1`` of the min-norm point ``w g1 + (1 - w) g2`` of the segment (§4).

    ``w = clip(((g2 - g1) . g2) / ||g1 - g2||^2, 0, 1)``; ``official`` puts 0.999 / 0.001 at the
    clipped ends, as the released solver does. A 0-d tensor: no host synchronisation.
    """
    v11, v12, v22 = g1 @ g1, g1 @ g2, g2 @ g2
    denom = (v11 + v22 - 2.0 * v12).clamp_min(torch.finfo(g1.dtype).tiny)
    inner = (v22 - v12) / denom
    high, low = (1.0, 0.0) if edges == "exact" else (OFFICIAL_EDGE_HIGH, OFFICIAL_EDGE_LOW)
    return torch.where(v12 >= v11, inner.new_tensor(high), torch.where(v12 >= v22, inner.new_tensor(low), inner))


def pareto_weights(g_fused: Tensor, g_uni: Tensor, edges: SolverEdges = "exact") -> tuple[Tensor, Tensor, Tensor]:
    """(weight on ``g_fused``, cosine, conflict flag) for one encoder (§3): 1/2 when the cosine is
    positive, else the min-norm weight. The conflict flag is 1.0 when the cosine is <= 0."""
    cosine = torch.nn.functional.cosine_similarity(g_fused, g_uni, dim=0, eps=_COSINE_EPS)
    conflict = cosine <= 0
    weight = torch.where(conflict, min_norm_weight(g_fused, g_uni, edges), cosine.new_tensor(0.5))
    return weight, cosine, conflict.to(cosine.dtype)


def rescale_factor(sum_norm: Tensor, combined_norm: Tensor, gamma: float, only_enlarge: bool) -> Tensor:
    """§5: ``gamma * ||g_f + g_m|| / ||combined||`` (at least ``gamma`` with ``only_enlarge``); a zero
    combination keeps factor ``gamma`` (it stays zero) instead of the official code's division by 0."""
    ratio = sum_norm / combined_norm.clamp_min(torch.finfo(combined_norm.dtype).tiny)
    ratio = torch.where(combined_norm > 0, ratio, torch.ones_like(ratio))
    if only_enlarge:
        ratio = ratio.clamp_min(1.0)
    return gamma * ratio


@register_objective
class MMPareto(LastEpochMetrics, StatelessObjective):
    """MMPareto, "Boosting Multimodal Learning with Innocent Unimodal Assistance" (Wei & Hu, ICML 2024).

    Official code: GeWu-Lab/MMPareto_ICML2024 at commit ``a339db39cc`` (``code/MMPareto.py``,
    ``code/min_norm_solvers.py``). Differences, each a switch (docs/methods/mmpareto.md §7):

    - ``rescale_scope``: the code takes the norm ratio per parameter tensor (``parameter``); the
      cosine and the weights are whole-encoder quantities, and ``encoder`` rescales on that same
      vector.
    - ``solver_edges``: the released two-vector solver returns 0.999 / 0.001 instead of 1 / 0 at
      the ends of the segment (``official``); reachable only with a zero gradient under conflict.
    - The official model has separate unimodal heads; here ``z_m`` is the fusion's own unimodal
      logits (concat: the zero-out logits of the shared head), not switchable (§7).
    """

    name = "mmpareto"
    Params = MMParetoParams
    params: MMParetoParams
    # concat: the official fused head is one linear layer on the concatenated features.
    requirements = Requirements(fusions=("concat", "sum", "mean"))
    variants = {
        "official": ("objective.rescale_scope=parameter", "objective.solver_edges=official"),
    }

    def bind(self, modalities: list[str], num_classes: int, model_info: dict) -> None:
        if len(modalities) < 2:
            raise ValueError(f"mmpareto needs at least two modalities, got {modalities}")
        super().bind(modalities, num_classes, model_info)
        self._epoch_metrics = {}

    def step(self, inputs: StepInputs) -> StepResult:
        out, y = inputs.outputs, inputs.labels
        parts = {MULTIMODAL: cross_entropy_per_sample(out.fused_logits, y).mean()}
        parts.update(
            {unimodal_part(m): cross_entropy_per_sample(out.unimodal_logits[m], y).mean() for m in self.modalities}
        )
        metrics = {"loss_fused": parts[MULTIMODAL].detach()}
        metrics.update({f"loss_unimodal_{m}": parts[unimodal_part(m)].detach() for m in self.modalities})
        return StepResult(losses=[LossGroup(parts=parts)], metrics=metrics)

    def perturb_gradients(self, ctx: GradientContext) -> None:
        """§3-§5 on every modality's encoder, from the rank-averaged part gradients; ``p.grad``
        arrives as the sum of all parts and the heads keep it."""
        grads = ctx.part_grads
        if grads is None:
            raise RuntimeError("mmpareto: the loss group reached the hook without its part gradients")
        p = self.params
        for m in self.modalities:
            params = [q for q in ctx.params.encoders[m] if q.grad is not None]
            if not params:
                continue
            g_fused, g_uni = grads.flat(MULTIMODAL, params), grads.flat(unimodal_part(m), params)
            weight, cosine, conflict = pareto_weights(g_fused, g_uni, p.solver_edges)
            combined = [self._combine(grads, q, m, weight) for q in params]
            factors = self._factors(params, combined)
            for q, new, factor in zip(params, combined, factors):
                q.grad = new * factor.to(new.dtype)
            one = cosine.new_ones(())
            ctx.result.stats.update(
                {
                    f"mmpareto_cosine_{m}": (cosine, one),
                    f"mmpareto_conflict_{m}": (conflict, one),
                    f"mmpareto_weight_{m}": (weight, one),
                    f"mmpareto_scale_{m}": (torch.stack(factors).mean(), one),
                }
            )

    @staticmethod
    def _combine(grads, param: nn.Parameter, m: str, weight: Tensor) -> Tensor:
        """``2 (w g_f + (1 - w) g_m)`` on one parameter (§4)."""
        zero = torch.zeros_like(param)
        g_f = grads.of(MULTIMODAL, param)
        g_m = grads.of(unimodal_part(m), param)
        g_f = zero if g_f is None else g_f
        g_m = zero if g_m is None else g_m
        return 2.0 * weight * g_f + 2.0 * (1.0 - weight) * g_m

    def _factors(self, params: list[nn.Parameter], combined: list[Tensor]) -> list[Tensor]:
        """§5 factor per parameter: the sum's norm is ``p.grad``'s (the engine's sum of all parts)."""
        p = self.params
        if p.rescale_scope == "parameter":
            return [
                rescale_factor(q.grad.norm(), new.norm(), p.gamma, p.only_enlarge) for q, new in zip(params, combined)
            ]
        sum_norm = torch.cat([q.grad.reshape(-1) for q in params]).norm()
        combined_norm = torch.cat([new.reshape(-1) for new in combined]).norm()
        return [rescale_factor(sum_norm, combined_norm, p.gamma, p.only_enlarge)] * len(params)

    def on_epoch_end(
        self, epoch: int, epoch_stats: dict[str, tuple[Tensor, Tensor]], world: DistInfo
    ) -> list[StructuralChange]:
        # Every rank adds the same (value, 1) per step, so the rank sum still gives the step mean.
        keys = [f"mmpareto_{what}_{m}" for m in self.modalities for what in ("cosine", "conflict", "weight", "scale")]
        metrics = {}
        for key in keys:
            if key in epoch_stats:
                total, count = epoch_stats[key]
                metrics[key] = float(total / count)
        self._epoch_metrics = metrics
        return []
