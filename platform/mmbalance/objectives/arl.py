"""ARL: asymmetric representation learning (docs/methods/arl.md §3).

Loss ``CE(z_f, y) + gamma_e * sum_m CE(z_m, y)`` where ``z_m`` are the zero-out unimodal
logits of a shared concat head, plus a gradient multiplier ``1 + k_m`` on each encoder's
output features after warm-up. ``k_m = softmax_m(T * q_m * (1 - d_m))`` compares each
modality's dependence share ``d_m`` (mean absolute logit) with its inverse-variance share
``q_m`` (inverse of the clamped normalised prediction entropy); for two modalities this is
exactly §3.2's ``(k_a, k_v) = softmax(T * [d_v q_a, d_a q_v])``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from mmbalance.objectives.base import (
    DistInfo,
    LossGroup,
    Requirements,
    StatelessObjective,
    StepInputs,
    StepResult,
    StructuralChange,
    cross_entropy_per_sample,
    register_objective,
)

ApplyCoeffs = Literal["intended", "official_uniform_1.5"]
ScaleForm = Literal["1+k", "1+gamma*k"]
KTotal = Literal["one", "half_per_modality"]

# The official code freezes both coefficients at the warm-up value 0.5 (docs/methods/arl.md §3.7.2).
OFFICIAL_K = 0.5
# Floor for normalised quantities, so entropy_clamp=0 with a one-hot prediction stays finite.
_FLOOR = 1e-6


class ARLParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    gamma: float = Field(4.0, ge=0.0, description="unimodal CE weight after warm-up (paper: 4)")
    T: float = Field(4.0, gt=0.0, description="softmax temperature of the coefficients (paper: 8 CREMA-D, 4 others)")
    start: int = Field(
        5, ge=0, description="warm-up epochs: 0-based epochs 0..start-1 use gamma_e=1 and no multipliers"
    )
    entropy_clamp: float = Field(0.3, ge=0.0, lt=1.0, description="lower clamp on the normalised entropy share")
    apply_coeffs: ApplyCoeffs = Field(
        "intended", description="intended: k from the batch; official_uniform_1.5: k frozen at 0.5"
    )
    coeff_lag: Literal[0, 1] = Field(
        0, description="0: k of this batch (grad hooks); 1: k of the previous batch (official timing)"
    )
    scale_form: ScaleForm = Field("1+k", description="multiplier form: 1+k (ResNet code) or 1+gamma*k (Swin code)")
    k_total: KTotal = Field(
        "one", description="one: applied Σk = 1 (mean k 1/M); half_per_modality: k·M/2 (mean k 0.5 for any M)"
    )


def batch_statistics(logits: Tensor) -> Tensor:
    """[M, B, C] detached unimodal logits -> [2M+1] sums to all-reduce:
    (sum_i sum_c |z_m|)_m, (sum_i entropy(softmax z_m[i]))_m, local batch size."""
    abs_sum = logits.abs().sum(dim=(1, 2))  # [M]
    log_p = logits.log_softmax(dim=-1)  # [M, B, C]
    entropy_sum = -(log_p.exp() * log_p).sum(dim=(1, 2))  # [M]
    count = logits.new_full((1,), logits.shape[1])  # [1]
    return torch.cat([abs_sum, entropy_sum, count])  # [2M+1]


def arl_coefficients(reduced: Tensor, num_modalities: int, T: float, entropy_clamp: float) -> dict[str, Tensor]:
    """Modality analysis of §3.2 step 4 from globally summed statistics (each value [M])."""
    M = num_modalities
    abs_sum, entropy_sum, count = reduced[:M], reduced[M : 2 * M], reduced[2 * M]
    dependence = abs_sum / count  # [M], d~_m = sum_c mean_i |z_m|
    d = dependence / dependence.sum().clamp_min(_FLOOR)  # [M]
    H = entropy_sum / count  # [M], mean prediction entropy (variance proxy)
    H_hat = (H / H.sum().clamp_min(_FLOOR)).clamp_min(max(entropy_clamp, _FLOOR))  # [M]
    q = 1.0 / H_hat
    q = q / q.sum()  # [M], target (inverse-variance) dependence share
    # A modality whose dependence d_m lags its share q_m gets the larger k (§3.8 M-way form).
    k = torch.softmax(T * q * (1.0 - d), dim=0)  # [M]
    return {"d": d, "H": H, "H_hat": H_hat, "q": q, "k": k}


@register_objective
class ARL(StatelessObjective):
    """ARL, "Improving Multimodal Learning via Imbalanced Learning" (ICCV'25, arXiv 2507.10203).

    Official code: shicaiwei123/ICCV2025-ARL at commit ``358af4f678`` (``main_arl_variance.py``,
    ``models/fusion_modules.py``). Paper/code differences, exposed as switches:

    - ``apply_coeffs``: the code computes ``k`` but never uses it; the encoder multiplier is a
      uniform ``1 + 0.5`` (``official_uniform_1.5``: k frozen at 0.5 for every modality;
      ``intended``: the batch k, as the paper describes).
    - ``coeff_lag``: the code captures the scale at forward time, before the analysis, so k
      of batch t would act on batch t+1 (``1``). ``0`` applies this batch's k through the
      engine's gradient hooks. The lag buffer is written only by post-warm-up steps: during
      warm-up the code's weights are fixed (0.5) and only an analysis after warm-up would
      assign them, so the first post-warm-up step applies the uniform k = 1/M.
    - ``scale_form``: ``1 + k`` (ResNet code) or ``1 + gamma * k`` (Swin code).
    - ``k_total``: k is a softmax (Σk = 1), so the mean multiplier ``1 + 1/M`` shrinks with M;
      ``half_per_modality`` rescales k by M/2 so the mean applied k is the two-modality 0.5 for
      any M (identical for M = 2). It leaves ``official_uniform_1.5`` (already 0.5 each) alone.

    Other choices: epochs are 0-based and warm-up is epochs ``0..start-1`` (the code's
    ``epoch <= start`` gives start+1 warm-up epochs: use ``start + 1`` to match it); the
    code's extra gate on previous test accuracies (epoch 0 only) is dropped; the multiplier
    acts on pooled features, which equals scaling the layer-4 map because pooling is linear;
    ``d_m`` includes the shared bias, as in the code. ``k`` is computed from statistics
    summed over ranks, so every DDP rank applies the same multipliers (§3.8).
    """

    name = "arl"
    Params = ARLParams
    params: ARLParams
    # z_m = the shared concat head with the other modalities' slots zeroed.
    requirements = Requirements(fusions=("concat",), warmup_key="start")
    variants = {"official": ("objective.apply_coeffs=official_uniform_1.5", "objective.start=6", "optim.grad_clip=40")}

    def __init__(self, params: ARLParams | None = None):
        super().__init__(params)
        self.modalities: list[str] = []
        # [M], computed (softmax) k of the previous post-warm-up batch, uniform 1/M until the first
        # one (coeff_lag=1); warm-up batches never write it.
        self._last_k: Tensor | None = None
        self._epoch_metrics: dict[str, float] = {}

    def bind(self, modalities: list[str], num_classes: int, model_info: dict[str, Any]) -> None:
        self.modalities = list(modalities)
        self.num_classes = num_classes
        self._names = {key: [f"arl_{key}_{m}" for m in self.modalities] for key in ("k", "mult", "d", "q")}
        self._last_k = torch.full((len(modalities),), 1.0 / len(modalities))

    def gamma_e(self, epoch: int) -> float:
        return 1.0 if self.in_warmup(epoch) else self.params.gamma

    def in_warmup(self, epoch: int) -> bool:
        return epoch < self.params.start

    def step(self, inputs: StepInputs) -> StepResult:
        out, y, mods = inputs.outputs, inputs.labels, self.modalities
        logits = torch.stack([out.unimodal_logits[m] for m in mods]).detach().float()  # [M, B, C]
        reduced = inputs.world.all_reduce_sum(batch_statistics(logits))  # [2M+1], same on every rank
        analysis = arl_coefficients(reduced, len(mods), self.params.T, self.params.entropy_clamp)
        k = analysis["k"]  # [M]

        fused = cross_entropy_per_sample(out.fused_logits, y).mean()
        unimodal = {m: cross_entropy_per_sample(out.unimodal_logits[m], y).mean() for m in mods}
        total = fused + self.gamma_e(inputs.epoch) * sum(unimodal.values())

        if self.in_warmup(inputs.epoch):
            multipliers, grad_multipliers = torch.ones_like(k), {}  # lag buffer untouched
        else:
            multipliers = self._multipliers(k)  # [M]
            self._last_k = k
            grad_multipliers = dict(zip(mods, multipliers.unbind()))

        # Per-modality entries are views from one unbind per tensor (one op, not one per modality).
        one = k.new_ones(())
        stats = dict(zip(self._names["k"], ((v, one) for v in k.unbind())))
        stats.update(zip(self._names["mult"], ((v, one) for v in multipliers.unbind())))
        metrics = {"loss_fused": fused.detach()}
        metrics.update({f"loss_{m}": v.detach() for m, v in unimodal.items()})
        metrics.update(zip(self._names["d"], analysis["d"].unbind()))
        metrics.update(zip(self._names["q"], analysis["q"].unbind()))
        return StepResult(losses=[LossGroup(total)], grad_multipliers=grad_multipliers, stats=stats, metrics=metrics)

    def _multipliers(self, k: Tensor) -> Tensor:
        """[M] post-warm-up gradient multipliers ``1 + k`` or ``1 + gamma * k`` from the applied k."""
        scale = 1.0 if self.params.scale_form == "1+k" else self.params.gamma
        return 1.0 + scale * self._applied_k(k)  # [M]

    def _applied_k(self, k: Tensor) -> Tensor:
        """The k that scales this step's gradients: batch k, previous batch k (both times M/2
        under ``k_total: half_per_modality``), or the frozen official 0.5 per modality."""
        if self.params.apply_coeffs == "official_uniform_1.5":
            return torch.full_like(k, OFFICIAL_K)
        if self.params.coeff_lag == 1:
            k = self._last_k.to(device=k.device, dtype=k.dtype)  # [M]; no-op after the first step
        if self.params.k_total == "half_per_modality":
            k = k * (k.numel() / 2.0)  # [M], Σ = M/2
        return k

    def on_epoch_end(
        self, epoch: int, epoch_stats: dict[str, tuple[Tensor, Tensor]], world: DistInfo
    ) -> list[StructuralChange]:
        # k is identical on every rank, so the rank-summed (sum, count) still gives the step mean.
        metrics = {"arl_gamma_e": self.gamma_e(epoch)}
        for m in self.modalities:
            for key in (f"arl_k_{m}", f"arl_mult_{m}"):
                if key in epoch_stats:
                    total, count = epoch_stats[key]
                    metrics[key] = float(total / count)
        self._epoch_metrics = metrics
        return []

    def epoch_metrics(self) -> dict[str, float]:
        return dict(self._epoch_metrics)

    def state_dict(self) -> dict[str, Any]:
        last_k = None if self._last_k is None else self._last_k.detach().clone()
        return {"last_k": last_k, "epoch_metrics": dict(self._epoch_metrics)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._last_k = None if state["last_k"] is None else state["last_k"].detach().clone()
        self._epoch_metrics = dict(state["epoch_metrics"])
