"""ARM: Asymmetric Reinforcing against Multimodal representation bias (docs/methods/arm.md §2).

The loss is the fused CE alone; what ARM adds is a per-modality feature scale ``s_m`` applied
before the fusion head (``ctx.feature_scales``), set from each modality's estimated
contribution so the weaker modality is amplified (forward *and* backward: its gradient is
multiplied by ``s_m`` too).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor

from mmbalance.objectives.arm_estimators import (
    joint_counts,
    ncmi_from_counts,
    ncmi_official_from_counts,
    nmi_from_counts,
)
from mmbalance.objectives.base import (
    DistInfo,
    ForwardContext,
    HeadOutputs,
    LossGroup,
    Requirements,
    StatelessObjective,
    StepInputs,
    StepResult,
    StructuralChange,
    cross_entropy_per_sample,
    register_objective,
)

Estimator = Literal["fixed_hist", "official_hist", "zero_out_surrogate"]
ScaleRule = Literal["pairwise", "mean_ratio"]
Anchor = Literal["geometric_mean", "strongest"]
# Floor on a contribution before it divides (fixed_hist, zero_out_surrogate): c_m <= 0 means
# "contributes nothing", which must amplify m as far as r_clamp allows, never give inf/NaN.
_MIN_CONTRIBUTION = 1e-6


class ARMParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    estimator: Estimator = Field("zero_out_surrogate", description="how c_m is estimated (see ARM docstring)")
    bins_mi: int = Field(30, ge=2, le=256, description="bins per axis of the NMI histogram (official 30)")
    bins_cmi: int = Field(2, ge=2, le=32, description="bins per axis of the NCMI histogram (official 2)")
    r_clamp: tuple[float, float] = Field((0.5, 2.0), description="[min, max] of every feature scale")
    ema: float = Field(0.9, ge=0.0, lt=1.0, description="EMA factor of the log-scales across training steps")
    # The official "batch_with_labels" eval scales cannot exist here: step() is not called at
    # eval, and they would leak the test labels into the predictions (§2.7.2).
    eval_scales: Literal["ema"] = Field("ema", description="eval uses the training EMA scales (label-free)")
    scale_rule: ScaleRule = Field("pairwise", description="M-way rule turning contributions into scales")
    anchor: Anchor = Field(
        "geometric_mean",
        description="geometric_mean: scales multiply to 1 (official r, 1/r); "
        "strongest: the largest contributor keeps 1, the others are amplified",
    )
    warmup_epochs: int = Field(
        0, ge=0, description="0-based epochs 0..warmup_epochs-1 keep every scale at 1 (joint training)"
    )

    @field_validator("r_clamp")
    @classmethod
    def _ordered_positive(cls, value: tuple[float, float]) -> tuple[float, float]:
        lo, hi = value
        if not (0.0 < lo < hi < math.inf):
            raise ValueError(f"r_clamp must be [min, max] with 0 < min < max < inf, got {list(value)}")
        return value


def safe_ratio(num: Tensor, den: Tensor, r_clamp: tuple[float, float], signed: bool) -> Tensor:
    """``num / den`` clamped to r_clamp, never inf/NaN.

    ``signed=False`` floors both at a small positive value first (a smaller contribution always
    gives a larger ratio). ``signed=True`` keeps the official arithmetic: two negative
    contributions give a positive ratio (what the broken official CMI produces, §2.7.3); a
    sign mismatch or a zero, where the official ratio flips sign or blows up, goes to the bound
    on the side of the larger value; NaN gives 1.
    """
    lo, hi = r_clamp
    if not signed:
        return (num.clamp_min(_MIN_CONTRIBUTION) / den.clamp_min(_MIN_CONTRIBUTION)).clamp(lo, hi)
    ratio = num / torch.where(den == 0, torch.ones_like(den), den)
    towards_lo = torch.where(num < den, torch.full_like(ratio, lo), torch.ones_like(ratio))
    bound = torch.where(num > den, torch.full_like(ratio, hi), towards_lo)
    return torch.where(num * den > 0, ratio, bound).clamp(lo, hi)


def scales_from_contributions(
    contrib: Tensor, r_clamp: tuple[float, float], rule: ScaleRule = "pairwise", signed: bool = False
) -> Tensor:
    """[M] contributions -> [M] feature scales in r_clamp; the smaller c_m, the larger s_m.

    ``pairwise``: ``s_m = prod_{k != m} (c_k / c_m) ** (1 / (M - 1))``, exactly the official
    ``r = c_a / c_v`` on h_v and ``1 / r`` on h_a for M = 2. ``mean_ratio``: §2.8's
    ``s_m = mean_k c_k / c_m`` (for M = 2 that is ``(1 + r) / 2`` and ``(1 + 1/r) / 2``: the
    same direction, but a ratio s_v / s_a of r where the official has r**2).
    """
    contrib = contrib.nan_to_num(0.0)
    m = contrib.numel()
    if rule == "mean_ratio":
        return safe_ratio(contrib.mean().expand(m), contrib, r_clamp, signed)
    ratios = safe_ratio(contrib.view(1, m), contrib.view(m, 1), r_clamp, signed)  # [M, M]: c_k / c_m
    log_mean = ratios.log().sum(1) / (m - 1)  # [M]; the diagonal is log 1 = 0
    return log_mean.exp().clamp(*r_clamp)


def raw_logits(outputs: HeadOutputs, scales: Tensor, modalities: list[str]) -> tuple[Tensor, Tensor, Tensor]:
    """Undo the ARM scales [M] of a concat-fusion forward: -> (u [M,B,C] unimodal logits,
    g [B,C] fused logits, w [M,B,C] fused logits with modality m zeroed), all at scale 1.

    Concat fusion gives ``z_m = W_m s_m h_m + b`` and ``z_f = sum_m z_m - (M-1) b``, so b and
    the raw parts ``W_m h_m`` follow from the outputs alone (no extra forward). float32:
    under autocast the bias recovery would otherwise cancel in half precision."""
    z = torch.stack([outputs.unimodal_logits[m] for m in modalities]).float()  # [M, B, C]
    bias = (z.sum(0) - outputs.fused_logits.float()) / (z.shape[0] - 1)  # [B, C], every row = b
    parts = (z - bias) / scales.view(-1, 1, 1)  # [M, B, C] W_m h_m
    g = parts.sum(0) + bias  # [B, C]
    return parts + bias, g, g - parts


def true_class_prob_sum(logits: Tensor, labels: Tensor) -> Tensor:
    """[..., B, C], [B] -> [...] sum over the batch of softmax(logits)[i, y_i]."""
    index = labels.view(*([1] * (logits.dim() - 2)), -1, 1).expand(*logits.shape[:-1], 1)
    return logits.softmax(-1).gather(-1, index).squeeze(-1).sum(-1)


def gathered_ranges(columns: Tensor, world: DistInfo) -> Tensor:
    """[K, N] -> [K, 2] (min, max) over every rank's samples.

    Only SUM is available, so each rank writes its own row of a zero [world, K, 2] buffer: the
    sum is an exact all-gather (adding zeros is exact), then min/max are taken locally."""
    local = torch.stack([columns.amin(1), columns.amax(1)], dim=1)  # [K, 2]
    buf = torch.zeros(world.world_size, *local.shape, dtype=local.dtype, device=local.device)
    buf[world.rank] = local
    buf = world.all_reduce_sum(buf)  # [W, K, 2]
    return torch.stack([buf[..., 0].amin(0), buf[..., 1].amax(0)], dim=1)


@register_objective
class ARM(StatelessObjective):
    """ARM (Gao et al., AAAI'25, arXiv:2501.01240); official code Gao-xiyuan/ARM @ a96d0ad67a
    (``heads/linear_head.py``, ``necks/MI_tool.py``). Requires ``model.fusion: concat``.

    Per training step, from the forward's concat-fusion outputs with the scales undone
    (``raw_logits``): probe confidences ``P_f``, ``P_m`` (true-class prob. of the fused and the
    zero-out unimodal logits), then ``c_m`` by ``estimator``:

    - ``zero_out_surrogate`` (default): ``c_m = P_f - P(fused logits with m zeroed)`` (§2.8), the
      drop in fused confidence without m. It ranks modalities of known strength correctly.
    - ``fixed_hist``: ``c_m = P_f NMI(u_m, g) + P_{-m} (NMI(u_m, g) - NCMI(u_m, g | w_m))``
      with a correct CMI; ``P_{-m}`` = mean confidence of the other modalities (the official
      cross pairing, P_v on the audio term). Not the default: ``g = u_m + w_m - b`` exactly,
      so given ``w_m`` the fused logits are a function of ``u_m`` and the NCMI term is the
      binned entropy of ``u_m``, not its share. With the official 2 bins it grows with the
      spread of ``u_m``, the interaction term turns negative for the stronger modality and the
      ranking flips; with many bins it tends to 1 for all (docs/objectives.md).
    - ``official_hist``: the same with the official broken CMI (§2.7.3) and sign arithmetic.

    The scales are undone first because the official measures contributions on unscaled
    features, so a scale never feeds back into its own estimate. Scales:
    ``scales_from_contributions`` (``scale_rule``; the default ``pairwise`` is the official
    ``r``/``1/r`` at M = 2, §2.8's ``mean_ratio`` is not), then ``anchor`` (``strongest``
    divides by the smallest scale, so the largest contributor keeps 1), clamped, then an EMA of
    the log-scales (so ``r`` and ``1/r`` stay reciprocal). ``warmup_epochs`` keeps the scales at
    1 for the first epochs. Histogram edges, counts and confidences are reduced over ranks, so
    every rank gets the same scales. The official ``eval_scales=batch_with_labels`` is not
    offered (it needs eval labels, and step() is not called at eval).

    The default clamp [0.5, 2] bounds what ARM costs the dominant modality: a feature scale
    ``s < 1`` makes the dominant branch learn ``s`` times slower in logit space (its weights
    must grow by ``1/s`` to give the same logits), and with the fused loss alone the weaker
    modality gains only what the dominant one gives up (measured in docs/objectives.md).

    Deviations from the official code (§2.7): only the feature-level fusion exists there and
    here (no min-max loss, no re-sampling). The fused representation ``g`` is the fused
    logits, not the untrained random ``N([h_v; h_a])`` (4), so MI pairs entries class by class
    instead of unrelated feature dims (5), and the probes are the model's own zero-out logits,
    not ``F`` applied to raw features (6). The features are the per-modality logits ``u_m``
    (B*C values) rather than the B*512 features, and ``w_m`` (the fused logits without m;
    ``u_other`` for M = 2) is the conditioning variable, which also covers M > 2. Scales are
    clamped (7) and label-free at eval (2). The forward of step t uses the EMA after step
    t-1 (the scales must be known before the forward; the official uses the batch's own r).
    The official head's extra linear layer G is ``model.concat_hidden``.
    """

    name = "arm"
    Params = ARMParams
    params: ARMParams
    # The scales are read back out of a shared concat head's zero-out logits (raw_logits). Adds
    # no heads, so the default trains_new_heads=True has nothing to decide.
    requirements = Requirements(fusions=("concat",), warmup_key="warmup_epochs")
    variants = {"official": ("objective.estimator=official_hist", "objective.r_clamp=[0.1,10.0]")}

    def bind(self, modalities: list[str], num_classes: int, model_info: dict[str, Any]) -> None:
        self.modalities, self.num_classes = list(modalities), num_classes
        self._log_scales = torch.zeros(len(self.modalities))  # [M]; scale 1 until the first step
        self._contrib_mean = {m: 0.0 for m in self.modalities}

    def forward_context(self, phase: str, epoch: int) -> ForwardContext:
        # Train and eval read the same EMA: no labels, no dependence on the eval batch.
        scales = self._log_scales.exp()  # [M]
        return ForwardContext(feature_scales={m: scales[i] for i, m in enumerate(self.modalities)})

    def step(self, inputs: StepInputs) -> StepResult:
        loss = cross_entropy_per_sample(inputs.outputs.fused_logits, inputs.labels).mean()
        result = StepResult(losses=[LossGroup(loss)], metrics={"loss_fused": loss.detach()})
        if inputs.phase != "train":
            return result
        p = self.params
        with torch.no_grad():
            contrib, metrics = self._contributions(inputs.outputs, inputs.labels, inputs.world)  # [M]
            batch_scales = scales_from_contributions(contrib, p.r_clamp, p.scale_rule, p.estimator == "official_hist")
            if p.anchor == "strongest":  # the largest contributor (smallest scale) back to 1
                batch_scales = (batch_scales / batch_scales.min()).clamp(*p.r_clamp)  # [M]
            if inputs.epoch >= p.warmup_epochs:  # warm-up: contributions are logged, scales stay 1
                old = self._log_scales.to(batch_scales.device)
                self._log_scales = p.ema * old + (1.0 - p.ema) * batch_scales.log()  # [M]
        one = torch.ones((), device=contrib.device)
        # Per-modality entries are views from one unbind per tensor (one op, not one per modality).
        result.stats.update((f"arm_contrib_{m}", (c, one)) for m, c in zip(self.modalities, contrib.unbind()))
        metrics.update((f"arm_batch_scale_{m}", s) for m, s in zip(self.modalities, batch_scales.unbind()))
        result.metrics.update(metrics)
        return result

    def _contributions(self, outputs: HeadOutputs, labels: Tensor, world: DistInfo) -> tuple[Tensor, dict[str, Tensor]]:
        """-> c [M] from globally reduced confidences (and histograms), plus diagnostics."""
        n_mod = len(self.modalities)
        scales = self._log_scales.to(outputs.fused_logits.device).exp()  # [M], as in this forward
        u, g, w = raw_logits(outputs, scales, self.modalities)
        probes = torch.cat([g.unsqueeze(0), u, w])  # [2M+1, B, C]: one softmax for every probe
        count = torch.full((1,), float(labels.numel()), device=g.device)
        conf = torch.cat([true_class_prob_sum(probes, labels), count])  # [2M+2]
        if self.params.estimator == "zero_out_surrogate":
            conf = world.all_reduce_sum(conf.float())  # [2M + 2]
            p = conf[:-1] / conf[-1]
            return p[0] - p[1 + n_mod :], {}
        counts = self._histograms(u, g, w, world)
        reduced = world.all_reduce_sum(torch.cat([conf.float(), counts]))
        p = reduced[: 2 * n_mod + 1] / reduced[2 * n_mod + 1]
        nmi, ncmi = self._information(reduced[2 * n_mod + 2 :])  # [M], [M]
        p_other = (p[1 : 1 + n_mod].sum() - p[1 : 1 + n_mod]) / (n_mod - 1)  # [M] cross pairing
        contrib = p[0] * nmi + p_other * (nmi - ncmi)
        metrics = {
            f"arm_{k}_{m}": v[i] for k, v in (("nmi", nmi), ("ncmi", ncmi)) for i, m in enumerate(self.modalities)
        }
        return contrib, metrics

    def _histograms(self, u: Tensor, g: Tensor, w: Tensor, world: DistInfo) -> Tensor:
        """Local joint counts of (u_m, g) and (u_m, g, w_m) on rank-shared edges, flattened."""
        n_mod, bins_mi, bins_cmi = u.shape[0], self.params.bins_mi, self.params.bins_cmi
        columns = torch.cat([g.reshape(1, -1), u.flatten(1), w.flatten(1)]).float()  # [2M+1, B*C]
        ranges = gathered_ranges(columns, world)  # [2M+1, 2]
        counts = []
        for i in range(n_mod):
            x, x_range, z_range = columns[1 + i], ranges[1 + i], ranges[1 + n_mod + i]
            counts.append(joint_counts([x, columns[0]], torch.stack([x_range, ranges[0]]), bins_mi).flatten())
            cmi_ranges = torch.stack([x_range, ranges[0], z_range])
            counts.append(joint_counts([x, columns[0], columns[1 + n_mod + i]], cmi_ranges, bins_cmi).flatten())
        return torch.cat(counts)

    def _information(self, counts: Tensor) -> tuple[Tensor, Tensor]:
        """Reduced flat counts -> NMI(u_m, g) [M] and NCMI(u_m, g | w_m) [M]."""
        bins_mi, bins_cmi = self.params.bins_mi, self.params.bins_cmi
        size_mi, size_cmi = bins_mi**2, bins_cmi**3
        ncmi_fn = ncmi_official_from_counts if self.params.estimator == "official_hist" else ncmi_from_counts
        nmi, ncmi = [], []
        for block in counts.view(len(self.modalities), size_mi + size_cmi):
            nmi.append(nmi_from_counts(block[:size_mi].view(bins_mi, bins_mi)))
            ncmi.append(ncmi_fn(block[size_mi:].view(bins_cmi, bins_cmi, bins_cmi)))
        return torch.stack(nmi), torch.stack(ncmi)

    def on_epoch_end(
        self, epoch: int, epoch_stats: dict[str, tuple[Tensor, Tensor]], world: DistInfo
    ) -> list[StructuralChange]:
        for m in self.modalities:
            if f"arm_contrib_{m}" in epoch_stats:
                total, count = epoch_stats[f"arm_contrib_{m}"]
                self._contrib_mean[m] = float(total) / max(float(count), 1.0)
        return []

    def epoch_metrics(self) -> dict[str, float]:
        scales = self._log_scales.exp().tolist()
        return {
            **{f"arm_scale_{m}": scales[i] for i, m in enumerate(self.modalities)},
            **{f"arm_contrib_{m}": c for m, c in self._contrib_mean.items()},
        }

    def state_dict(self) -> dict[str, Any]:
        return {"log_scales": self._log_scales.detach().cpu().clone(), "contrib_mean": dict(self._contrib_mean)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        log_scales = torch.as_tensor(state["log_scales"]).clone()
        if log_scales.shape != (len(self.modalities),):
            raise ValueError(f"arm state has {tuple(log_scales.shape)} scales for modalities {self.modalities}")
        self._log_scales, self._contrib_mean = log_scales, dict(state["contrib_mean"])
