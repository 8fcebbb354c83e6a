"""MNL: Multimodal Negative Learning on top of LF (docs/methods/mnl.md §1).

Per sample, the modality that is both more confident (true-class probability ``pi``) and more
robust (UCoM ``xi``: true-class logit minus the competitor's logit) guides the weaker one on
the non-target classes, with the dominant distribution detached. The pure functions below
(``criteria``, ``guidance_masks``, ``pair_losses``) hold the math so tests can reach it alone.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from mmbalance.objectives.base import (
    DistInfo,
    LastEpochMetrics,
    LossGroup,
    Requirements,
    StatelessObjective,
    StepInputs,
    StepResult,
    cross_entropy_per_sample,
    register_objective,
)

Scope = Literal["nontarget", "all"]
Normalize = Literal["BC", "B", "selected"]
Competitor = Literal["fused", "own"]
GUIDANCE_PATTERN = r"^(confidence_ucom|confidence|prior:[^\s:]+)$"


class MNLParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lam: float = Field(0.7, ge=0.0, description="lambda (official weight1) of the non-target guidance term")
    warmup_epochs: int = Field(0, ge=0, description="LF-only epochs before guidance starts (0 = official code)")
    guidance: str = Field(
        "confidence_ucom", pattern=GUIDANCE_PATTERN, description="confidence_ucom | confidence | prior:<modality>"
    )
    scope: Scope = Field("nontarget", description="nontarget: (1-Y) p_d (paper); all: every class of p_d")
    include_target_ce: bool = Field(
        True, description="official code adds -log q_w,y on guided samples; the paper does not"
    )
    normalize: Normalize = Field(
        "BC", description="BC: official mean over B*C; B: per sample; selected: per guided sample"
    )
    competitor: Competitor = Field(
        "fused", description="fused: shared argmax of softmax(z_f) (official); own: per modality"
    )


def competitor_classes(logits: Tensor, labels: Tensor, probs: Tensor | None = None) -> Tensor:
    """[..., B, C], [B] -> [..., B]: the strongest non-target class. The official code masks the
    target probability to -1 before the argmax, done the same way here so ties break alike.
    ``probs``: ``softmax(logits)`` when the caller already has it (the same values, computed once)."""
    probs = logits.detach().softmax(-1) if probs is None else probs  # [..., B, C]
    target = labels.expand(probs.shape[:-1]).unsqueeze(-1)  # [..., B, 1]
    return probs.scatter(-1, target, -1.0).argmax(-1)  # scatter, not one_hot: no host sync on CPU


def criteria(
    unimodal: Tensor, fused: Tensor, labels: Tensor, competitor: Competitor, probs: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """[M, B, C] unimodal logits -> (pi, xi), each [M, B] and free of gradient (they only build masks).

    ``probs``: ``softmax(unimodal)`` when the caller already has it (MNL's step shares it with
    ``pair_losses``, so the softmax of the same logits runs once)."""
    z = unimodal.detach()  # [M, B, C]
    probs = z.softmax(-1) if probs is None else probs  # [M, B, C]
    target = labels.expand(z.shape[0], -1).unsqueeze(-1)  # [M, B, 1]
    pi = probs.gather(-1, target).squeeze(-1)  # [M, B]
    j = (
        competitor_classes(fused, labels).expand(z.shape[0], -1)
        if competitor == "fused"
        else competitor_classes(z, labels, probs)
    )  # [M, B]
    picked = z.gather(-1, torch.cat([target, j.unsqueeze(-1)], dim=-1))  # [M, B, 2]: (z_y, z_j)
    xi = picked[..., 0] - picked[..., 1]  # [M, B], UCoM in logit space
    return pi, xi


def guidance_masks(pi: Tensor, xi: Tensor, guidance: str, prior_index: int | None = None) -> Tensor:
    """-> bool [M, M, B]; entry [d, w, i] means modality d guides modality w on sample i.

    M > 2: d guides w where d is strictly better on every criterion (ties: no guidance). M = 2
    reproduces the official asymmetric rule: modality 0 guides 1 on strict dominance, and
    modality 1 guides 0 wherever 0 is not strictly better on any criterion (ties go to 1).
    """
    num_mod, batch = pi.shape
    if guidance.startswith("prior:"):
        masks = torch.zeros(num_mod, num_mod, batch, dtype=torch.bool, device=pi.device)
        masks[prior_index] = True
        masks[prior_index, prior_index] = False
        return masks
    crits = torch.stack([pi, xi]) if guidance == "confidence_ucom" else pi.unsqueeze(0)  # [K, M, B]
    better = crits[:, :, None] > crits[:, None]  # [K, M, M, B]: d better than w on criterion k
    masks = better.all(0)  # [M, M, B]; diagonal False (strict)
    if num_mod == 2:
        masks[1, 0] = ~better[:, 0, 1].any(0)  # official b_i uses <= on every criterion
    return masks


def pair_losses(
    unimodal: Tensor,
    labels: Tensor,
    masks: Tensor,
    lam: float,
    scope: Scope,
    include_target_ce: bool,
    normalize: Normalize,
    world: DistInfo | None = None,
    probs: Tensor | None = None,
    log_q: Tensor | None = None,
) -> Tensor:
    """[M, B, C] logits, bool [M, M, B] masks -> [M, M] with L_{d->w} at [d, w] (§1.2 step 7).

    Only ``log q_w`` carries gradient: the dominant distribution ``p_d`` is detached. Every
    detached factor (``lam p_d``, the target CE's one-hot, the mask, the normaliser) is folded
    into one weight first, so the graph holds a single product with ``log q`` (one backward
    node per step instead of one per term). ``probs`` / ``log_q``: ``softmax`` / ``log_softmax``
    of ``unimodal`` when the caller already has them.
    """
    num_mod, batch, num_classes = unimodal.shape
    log_q = unimodal.log_softmax(-1) if log_q is None else log_q  # [M, B, C], indexed by the weak w
    p_dom = unimodal.detach().softmax(-1) if probs is None else probs  # [M, B, C], indexed by d
    target = labels.expand(num_mod, -1).unsqueeze(-1)  # [M, B, 1]
    weight = lam * p_dom  # [M, B, C]: -lam * sum_c p_d log q_w
    # (1 - Y) p_d zeroes the target entry; the official target CE -log q_w,y adds one unit there.
    if scope == "nontarget":
        weight = weight.scatter(-1, target, 1.0 if include_target_ce else 0.0)
    elif include_target_ce:
        weight = weight.scatter_add(-1, target, torch.ones_like(target, dtype=weight.dtype))
    if normalize == "selected":
        # Per guided sample over the whole global batch: the engine averages rank gradients, so
        # dividing by (global count / world_size) makes that average the exact global mean.
        world = world or DistInfo()
        count = world.all_reduce_sum(masks.sum(-1).to(unimodal.dtype))  # [M, M]
        scale = (-float(world.world_size) / count.clamp(min=1.0)).unsqueeze(-1)  # [M, M, 1]
    else:  # BC: the official mean over all B*C entries (unguided samples count); B: per sample
        scale = -1.0 / (batch * num_classes if normalize == "BC" else batch)
    coef = masks.to(unimodal.dtype) * scale  # [M, M, B]: 0 where d does not guide w
    weighted = coef.unsqueeze(-1) * weight.unsqueeze(1)  # [M, M, B, C], detached
    return (weighted * log_q.unsqueeze(0)).sum((2, 3))  # [M, M]


@register_objective
class MNL(LastEpochMetrics, StatelessObjective):
    """Multimodal Negative Learning (Gong et al., NeurIPS'25, arXiv:2510.20877).

    Official code: github.com/BaoquanGong/Multimodal-Negative-Learning at commit 64cea5624d
    (``train_latefusion.py``). Loss: ``CE(z_f) + sum_m CE(z_m) + sum_{d != w} L_{d->w}``.
    Defaults reproduce the official code; the paper/code differences are variants:

    - ``warmup_epochs``: the paper's CE-only first stage (code: none, 0). Epochs are 0-based, so
      epochs ``0 .. warmup_epochs - 1`` train plain LF.
    - ``include_target_ce``: the code adds ``-log q_w,y`` on guided samples (True); the paper does not.
      With True, ``lam = 0`` is still not LF (as in the code): guided samples keep that extra term.
    - ``normalize``: the code averages over all B*C entries (``BC``, unguided samples count), so the
      strength scales like lam / C; ``B`` is per sample, ``selected`` per guided sample (global count).
    - ``guidance``: ``confidence_ucom`` (paper default), ``confidence`` (pi only), ``prior:<m>``
      (m guides every other modality on every sample). ``scope``: ``nontarget`` or ``all`` classes.
    - ``competitor``: ``fused`` shared argmax of softmax(z_f) (code) or each modality's ``own``.

    More than two modalities (§1.8): every ordered pair (d, w) with d strictly better on each
    criterion gets L_{d->w}; ties get no guidance. With two modalities the official asymmetric rule
    holds: ties go to the second modality in model order (text first, image second in the code).
    """

    name = "mnl"
    Params = MNLParams
    params: MNLParams
    # One linear head per modality with z_f their mean / sum / PDF-weighted sum: the guidance terms act on z_m.
    requirements = Requirements(fusions=("mean", "sum", "pdf"), warmup_key="warmup_epochs")
    variants = {"paper": ("objective.warmup_epochs=2", "objective.include_target_ce=false")}

    def __init__(self, params: MNLParams | None = None):
        super().__init__(params)
        self.prior_index: int | None = None
        self.modalities: list[str] = []
        self._pairs: list[tuple[int, str]] = []  # set by bind
        self._epoch_metrics: dict[str, float] = {}

    def bind(self, modalities: list[str], num_classes: int, model_info: dict[str, Any]) -> None:
        self.modalities, self.num_classes = list(modalities), num_classes
        if self.params.guidance.startswith("prior:"):
            prior = self.params.guidance.split(":", 1)[1]
            if prior not in self.modalities:
                allowed = ["prior:" + m for m in self.modalities]
                raise ValueError(f"guidance {self.params.guidance!r} names no modality; allowed: {allowed}")
            self.prior_index = self.modalities.index(prior)
        # (flat index into a [M, M] tensor, "d_to_w") of every ordered pair, built once: the
        # step reads all pairs off one unbind instead of indexing each.
        num_mod = len(self.modalities)
        self._pairs = [
            (d * num_mod + w, f"{self.modalities[d]}_to_{self.modalities[w]}")
            for d in range(num_mod)
            for w in range(num_mod)
            if d != w
        ]

    def step(self, inputs: StepInputs) -> StepResult:
        out, y = inputs.outputs, inputs.labels
        num_mod = len(self.modalities)
        z = torch.stack([out.unimodal_logits[m] for m in self.modalities])  # [M, B, C]
        # One log-softmax serves the LF terms and the guidance: CE(z_m, y) = nll(log_softmax z_m),
        # row by row the same values as cross_entropy_per_sample, so the LF part stays exact.
        log_q = z.log_softmax(-1)  # [M, B, C]
        fused = cross_entropy_per_sample(out.fused_logits, y).mean()
        unimodal = {m: F.nll_loss(log_q[i], y, reduction="none").mean() for i, m in enumerate(self.modalities)}
        base = fused + sum(unimodal.values())  # LF with omega = 1, summed as LF does (exact equality)
        metrics = {"loss_fused": fused.detach(), **{f"loss_{m}": v.detach() for m, v in unimodal.items()}}
        if inputs.epoch < self.params.warmup_epochs:
            masks = torch.zeros(num_mod, num_mod, y.shape[0], dtype=torch.bool, device=y.device)
            return StepResult(losses=[LossGroup(base)], stats=self._stats(masks), metrics=metrics)
        probs = z.detach().softmax(-1)  # [M, B, C], shared by the criteria and the guidance
        pi, xi = criteria(z, out.fused_logits, y, self.params.competitor, probs)  # [M, B] each
        masks = guidance_masks(pi, xi, self.params.guidance, self.prior_index)  # [M, M, B]
        p = self.params
        pairs = pair_losses(
            z, y, masks, p.lam, p.scope, p.include_target_ce, p.normalize, inputs.world, probs, log_q
        )  # [M, M]
        guidance = pairs.sum()
        metrics["loss_mnl"] = guidance.detach()
        flat = pairs.detach().flatten().unbind()  # M*M views from one op
        metrics.update({f"loss_mnl_{name}": flat[index] for index, name in self._pairs})
        return StepResult(losses=[LossGroup(base + guidance)], stats=self._stats(masks), metrics=metrics)

    def _stats(self, masks: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
        """Guided-sample counts as (sum, count) so the engine's epoch/rank sums give exact fractions."""
        total = torch.full((), float(masks.shape[-1]), device=masks.device)
        guided = masks.sum(-1).float().flatten().unbind()  # M*M counts from one reduction
        stats = {f"mnl_guided_{name}": (guided[index], total) for index, name in self._pairs}
        stats["mnl_unguided"] = ((~masks.flatten(0, 1).any(0)).sum().float(), total)
        return stats

    def on_epoch_end(self, epoch: int, epoch_stats: dict[str, tuple[Tensor, Tensor]], world: DistInfo) -> list:
        metrics = {
            name: float(s) / max(float(c), 1.0) for name, (s, c) in epoch_stats.items() if name.startswith("mnl_")
        }
        metrics["mnl_active"] = float(epoch >= self.params.warmup_epochs)
        self._epoch_metrics = metrics
        return []
