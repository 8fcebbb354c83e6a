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


def competitor_classes(logits: Tensor, labels: Tensor) -> Tensor:
    """[..., B, C], [B] -> [..., B]: the strongest non-target class. The official code masks the
    target probability to -1 before the argmax, done the same way here so ties break alike."""
    target = F.one_hot(labels, logits.shape[-1]).bool()  # [B, C]
    return logits.detach().softmax(-1).masked_fill(target, -1.0).argmax(-1)


def criteria(unimodal: Tensor, fused: Tensor, labels: Tensor, competitor: Competitor) -> tuple[Tensor, Tensor]:
    """[M, B, C] unimodal logits -> (pi, xi), each [M, B] and free of gradient (they only build masks)."""
    z = unimodal.detach()  # [M, B, C]
    target = labels.expand(z.shape[0], -1).unsqueeze(-1)  # [M, B, 1]
    pi = z.softmax(-1).gather(-1, target).squeeze(-1)  # [M, B]
    j = (
        competitor_classes(fused, labels).expand(z.shape[0], -1)
        if competitor == "fused"
        else competitor_classes(z, labels)
    )
    xi = (z.gather(-1, target) - z.gather(-1, j.unsqueeze(-1))).squeeze(-1)  # [M, B], UCoM in logit space
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
    crits = [pi, xi] if guidance == "confidence_ucom" else [pi]
    better = torch.stack([c[:, None] > c[None, :] for c in crits])  # [K, M, M, B]
    masks = better.all(0)  # [M, M, B]; diagonal False (strict)
    if num_mod == 2:
        masks[1, 0] = (~better[:, 0, 1]).all(0)  # official b_i uses <= on every criterion
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
) -> Tensor:
    """[M, B, C] logits, bool [M, M, B] masks -> [M, M] with L_{d->w} at [d, w] (§1.2 step 7).

    Only ``log q_w`` carries gradient: the dominant distribution ``p_d`` is detached.
    """
    num_mod, batch, num_classes = unimodal.shape
    log_q = unimodal.log_softmax(-1)  # [M, B, C], indexed by the weak modality w
    p_dom = unimodal.detach().softmax(-1)  # [M, B, C], indexed by the dominant modality d
    onehot = F.one_hot(labels, num_classes).to(unimodal.dtype)  # [B, C]
    if scope == "nontarget":
        p_dom = p_dom * (1.0 - onehot)  # [M, B, C]
    per_sample = lam * -torch.einsum("dbc,wbc->dwb", p_dom, log_q)  # [M, M, B]
    if include_target_ce:
        per_sample = per_sample - (log_q * onehot).sum(-1)[None]  # [M, M, B]; + CE(z_w, y)
    summed = torch.where(masks, per_sample, torch.zeros_like(per_sample)).sum(-1)  # [M, M]
    if normalize == "BC":
        return summed / (batch * num_classes)
    if normalize == "B":
        return summed / batch
    # Per guided sample over the whole global batch: the engine averages rank gradients, so
    # dividing by (global count / world_size) makes that average the exact global mean.
    world = world or DistInfo()
    count = world.all_reduce_sum(masks.sum(-1).to(unimodal.dtype))  # [M, M]
    return summed * world.world_size / count.clamp(min=1.0)


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
    # One linear head per modality with z_f their mean / sum: the guidance terms act on z_m.
    requirements = Requirements(fusions=("mean", "sum"), warmup_key="warmup_epochs")
    variants = {"paper": ("objective.warmup_epochs=2", "objective.include_target_ce=false")}

    def __init__(self, params: MNLParams | None = None):
        super().__init__(params)
        self.prior_index: int | None = None
        self.modalities: list[str] = []
        self._epoch_metrics: dict[str, float] = {}

    def bind(self, modalities: list[str], num_classes: int, model_info: dict[str, Any]) -> None:
        self.modalities, self.num_classes = list(modalities), num_classes
        if self.params.guidance.startswith("prior:"):
            prior = self.params.guidance.split(":", 1)[1]
            if prior not in self.modalities:
                allowed = ["prior:" + m for m in self.modalities]
                raise ValueError(f"guidance {self.params.guidance!r} names no modality; allowed: {allowed}")
            self.prior_index = self.modalities.index(prior)

    def step(self, inputs: StepInputs) -> StepResult:
        out, y = inputs.outputs, inputs.labels
        fused = cross_entropy_per_sample(out.fused_logits, y).mean()
        unimodal = {m: cross_entropy_per_sample(out.unimodal_logits[m], y).mean() for m in self.modalities}
        base = fused + sum(unimodal.values())  # LF with omega = 1, summed as LF does (exact equality)
        metrics = {"loss_fused": fused.detach(), **{f"loss_{m}": v.detach() for m, v in unimodal.items()}}
        if inputs.epoch < self.params.warmup_epochs:
            masks = torch.zeros(
                len(self.modalities), len(self.modalities), y.shape[0], dtype=torch.bool, device=y.device
            )
            return StepResult(losses=[LossGroup(base)], stats=self._stats(masks), metrics=metrics)
        z = torch.stack([out.unimodal_logits[m] for m in self.modalities])  # [M, B, C]
        pi, xi = criteria(z, out.fused_logits, y, self.params.competitor)  # [M, B] each
        masks = guidance_masks(pi, xi, self.params.guidance, self.prior_index)  # [M, M, B]
        p = self.params
        pairs = pair_losses(z, y, masks, p.lam, p.scope, p.include_target_ce, p.normalize, inputs.world)  # [M, M]
        guidance = pairs.sum()
        metrics["loss_mnl"] = guidance.detach()
        metrics.update({f"loss_mnl_{d}_to_{w}": pairs[i, k].detach() for (i, d), (k, w) in self._pairs()})
        return StepResult(losses=[LossGroup(base + guidance)], stats=self._stats(masks), metrics=metrics)

    def _pairs(self) -> list[tuple[tuple[int, str], tuple[int, str]]]:
        named = list(enumerate(self.modalities))
        return [(d, w) for d in named for w in named if d[0] != w[0]]

    def _stats(self, masks: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
        """Guided-sample counts as (sum, count) so the engine's epoch/rank sums give exact fractions."""
        total = torch.full((), float(masks.shape[-1]), device=masks.device)
        stats = {f"mnl_guided_{d}_to_{w}": (masks[i, k].sum().float(), total) for (i, d), (k, w) in self._pairs()}
        stats["mnl_unguided"] = ((~masks.flatten(0, 1).any(0)).sum().float(), total)
        return stats

    def on_epoch_end(self, epoch: int, epoch_stats: dict[str, tuple[Tensor, Tensor]], world: DistInfo) -> list:
        metrics = {
            name: float(s) / max(float(c), 1.0) for name, (s, c) in epoch_stats.items() if name.startswith("mnl_")
        }
        metrics["mnl_active"] = float(epoch >= self.params.warmup_epochs)
        self._epoch_metrics = metrics
        return []
