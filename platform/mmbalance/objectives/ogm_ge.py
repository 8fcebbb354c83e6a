"""OGM-GE: on-the-fly gradient modulation with Gaussian-noise enhancement (docs/methods/ogm_ge.md §1).

The loss is the plain fused cross-entropy ``CE(z_f, y)``. Each training step scores every modality
by the true-class softmax probability of its unimodal logits, summed over the global batch (§2);
after backward and the cross-rank average, ``perturb_gradients`` multiplies the dominant
modality's encoder gradients by ``k = 1 - tanh(alpha * rho)`` (§3) and adds zero-mean Gaussian
noise whose std is each gradient tensor's own std (§4), inside the epoch window
``start_epoch <= epoch <= end_epoch`` (§5). Every rank reduces the same (sum, count) scores and
draws the noise from the engine's rank-independent generator, so a data-parallel step is the
single-process step (§6).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor

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

CoeffForm = Literal["ratio", "ratio_minus_one"]
UnimodalBias = Literal["half", "full"]
ModulatedParams = Literal["all", "conv"]
NoiseOn = Literal["all", "dominant"]

# Added to the noise std, as the official code does, so a zero gradient still gets a defined draw.
NOISE_STD_EPS = 1e-8
# Floor on the weaker modalities' score, so the ratio stays finite if every probability underflows.
_SCORE_FLOOR = 1e-12


class OGMGEParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    alpha: float = Field(0.1, ge=0.0, description="modulation strength (official README default 0.1; 0.8 for CREMA-D)")
    start_epoch: int = Field(0, ge=0, description="first 0-based epoch that modulates (official modulation_starts)")
    end_epoch: int | None = Field(
        50,
        ge=0,
        description="last 0-based epoch that modulates, inclusive (official modulation_ends); None: never stops",
    )
    coeff_form: CoeffForm = Field(
        "ratio",
        description="ratio: k = 1 - tanh(alpha * rho) (paper Eq. 10, official); ratio_minus_one: continuous at 1",
    )
    unimodal_bias: UnimodalBias = Field(
        "half", description="concat scores: half: W_m h_m + b/M (official b/2); full: the zero-out logits W_m h_m + b"
    )
    modulated_params: ModulatedParams = Field(
        "all", description="all: every encoder parameter; conv: only 4-D (conv weight) gradients, as the official code"
    )
    noise_scale: float = Field(
        1.0, ge=0.0, description="GE noise std as a multiple of each gradient's std; 0: OGM without GE"
    )
    noise_on: NoiseOn = Field(
        "all", description="all: noise on every modality's modulated parameters (official, Alg. 1); dominant: only it"
    )

    @model_validator(mode="after")
    def _window(self) -> OGMGEParams:
        if self.end_epoch is not None and self.end_epoch < self.start_epoch:
            raise ValueError(f"end_epoch={self.end_epoch} is before start_epoch={self.start_epoch}")
        return self


def true_class_scores(logits: Tensor, labels: Tensor) -> Tensor:
    """[M, B, C] unimodal logits, [B] labels -> [M]: sum over the batch of softmax p(y_i) (§2)."""
    probs = logits.softmax(dim=-1)  # [M, B, C]
    index = labels.view(1, -1, 1).expand(logits.shape[0], -1, 1)  # [M, B, 1]
    return probs.gather(2, index).squeeze(2).sum(dim=1)  # [M]


def half_bias_logits(unimodal: Tensor, fused: Tensor) -> Tensor:
    """Concat fusion: [M, B, C] zero-out logits ``W_m h_m + b``, [B, C] fused logits -> ``W_m h_m + b/M`` (§2).

    The fused logits are ``sum_m z_m - (M - 1) b``, so ``b (M - 1) / M = (sum_m z_m - z_f) / M``; for two
    modalities this is the official ``W_m h_m + b/2``.
    """
    M = unimodal.shape[0]
    return unimodal - (unimodal.sum(dim=0) - fused) / M  # [M, B, C]


def modulation(scores: Tensor, alpha: float, coeff_form: CoeffForm) -> dict[str, Tensor]:
    """[M] global scores -> the §3 quantities, all tensors (no host sync).

    ``dominant`` is the argmax (the first modality on a tie, which matches the official ``else`` branch
    modulating audio); ``ratio`` is its score over the mean score of the others (for two modalities the
    official ``score_v / score_a`` or its inverse); ``coeff[m]`` is ``k`` for the dominant modality and 1
    for the others.
    """
    M = scores.shape[0]
    dominant = scores.argmax()  # [] long
    best = scores[dominant]
    others = ((scores.sum() - best) / (M - 1)).clamp_min(_SCORE_FLOOR)
    ratio = best / others  # [] >= 1
    rho = ratio if coeff_form == "ratio" else torch.relu(ratio - 1.0)
    k = 1.0 - torch.tanh(alpha * rho)  # [] in (0, 1]
    is_dominant = torch.arange(M, device=scores.device) == dominant  # [M] bool
    coeff = torch.where(is_dominant, k, torch.ones_like(k))  # [M]
    return {"dominant": dominant, "is_dominant": is_dominant.to(scores.dtype), "ratio": ratio, "coeff": coeff}


def gradient_noise_std(grad: Tensor) -> Tensor:
    """The GE noise std of one gradient tensor: its (unbiased, as torch's default) std plus 1e-8 (§4)."""
    correction = 1 if grad.numel() > 1 else 0
    return grad.std(correction=correction) + NOISE_STD_EPS


@register_objective
class OGMGE(LastEpochMetrics, StatelessObjective):
    """OGM-GE, "Balanced Multimodal Learning via On-the-fly Gradient Modulation" (Peng et al., CVPR 2022).

    Official code: GeWu-Lab/OGM-GE_CVPR2022 at commit ``343dc1d95c`` (``main.py``, ``train_epoch``).
    Paper/code differences and other choices, each a switch (docs/methods/ogm_ge.md §7):

    - ``coeff_form``: the code (and Eq. 10) use ``1 - tanh(alpha * relu(rho))`` with ``rho > 1``, so
      the coefficient jumps from 1 to ``1 - tanh(alpha)`` as soon as a modality leads (``ratio``);
      ``ratio_minus_one`` uses ``rho - 1``, which is 1 at balance.
    - ``unimodal_bias``: the code scores concat fusion with ``W_m h_m + b/2`` (``half``), not the
      zero-out logits ``W_m h_m + b`` the model exposes (``full``).
    - ``modulated_params``: the code touches only parameters of ``audio``/``visual`` modules whose
      gradient is 4-D (conv weights): biases, batch norms and linear layers are neither scaled nor
      noised (``conv``); ``all`` modulates every encoder parameter, as Algorithm 1 writes ``theta^u``.
    - ``noise_on``: the code adds the noise to both modalities, the non-dominant one too (``all``).
    - ``noise_scale`` 0 is the code's ``--modulation OGM``.

    Scores are summed over ranks, and over the micro-batches of one step under ``optim.accumulate``,
    before the coefficient is taken, so it is the global-batch coefficient (§6).
    """

    name = "ogm_ge"
    Params = OGMGEParams
    params: OGMGEParams
    # concat: the official default (split concat head); sum/mean: each modality's own head.
    requirements = Requirements(fusions=("concat", "sum", "mean"), warmup_key="start_epoch")
    variants = {
        "official": ("objective.modulated_params=conv",),
        "ogm": ("objective.noise_scale=0",),
        "continuous": ("objective.coeff_form=ratio_minus_one",),
    }

    def __init__(self, params: OGMGEParams | None = None):
        super().__init__(params)
        self.modalities: list[str] = []
        self.fusion = "concat"
        # [M] scores of the current step, summed over ranks and over its micro-batches (§6).
        self._scores: Tensor | None = None
        self._scores_step: int | None = None
        self._epoch_metrics: dict[str, float] = {}

    def bind(self, modalities: list[str], num_classes: int, model_info: dict[str, Any]) -> None:
        if len(modalities) < 2:
            raise ValueError(f"ogm_ge needs at least two modalities, got {modalities}")
        self.modalities = list(modalities)
        self.num_classes = num_classes
        self.fusion = model_info.get("fusion", "concat")

    def modulates(self, epoch: int) -> bool:
        """§5: the 0-based epoch lies in ``[start_epoch, end_epoch]`` (both inclusive)."""
        p = self.params
        return p.start_epoch <= epoch and (p.end_epoch is None or epoch <= p.end_epoch)

    def scoring_logits(self, inputs: StepInputs) -> Tensor:
        """[M, B, C] detached logits the §2 scores are taken from."""
        out = inputs.outputs
        logits = torch.stack([out.unimodal_logits[m].detach().float() for m in self.modalities])  # [M, B, C]
        if self.fusion == "concat" and self.params.unimodal_bias == "half":
            logits = half_bias_logits(logits, out.fused_logits.detach().float())
        return logits

    def step(self, inputs: StepInputs) -> StepResult:
        out, y = inputs.outputs, inputs.labels
        fused = cross_entropy_per_sample(out.fused_logits, y).mean()
        metrics = {"loss_fused": fused.detach()}
        if inputs.phase != "train":
            return StepResult(losses=[LossGroup(fused)], metrics=metrics)

        logits = self.scoring_logits(inputs)
        local = torch.cat([true_class_scores(logits, y), logits.new_full((1,), y.numel())])  # [M+1]
        reduced = inputs.world.all_reduce_sum(local)  # [M+1], the same on every rank
        if self._scores_step != inputs.step or self._scores is None:
            self._scores, self._scores_step = torch.zeros_like(reduced), inputs.step
        self._scores = self._scores + reduced  # micro-batches of one step add up (§6)

        scores, count = reduced[:-1], reduced[-1]
        mod = modulation(scores, self.params.alpha, self.params.coeff_form)
        stats = {f"ogm_score_{m}": (scores[i], count) for i, m in enumerate(self.modalities)}
        one = count.new_ones(())
        stats["ogm_ratio"] = (mod["ratio"], one)
        stats.update({f"ogm_dominant_{m}": (mod["is_dominant"][i], one) for i, m in enumerate(self.modalities)})
        return StepResult(losses=[LossGroup(fused)], stats=stats, metrics=metrics)

    def step_modulation(self, step: int) -> dict[str, Tensor]:
        """The §3 quantities of global step ``step`` from its summed scores."""
        if self._scores is None or self._scores_step != step:
            raise RuntimeError(f"ogm_ge: perturb_gradients for step {step} without a training step() before it")
        return modulation(self._scores[:-1], self.params.alpha, self.params.coeff_form)

    def perturb_gradients(self, ctx: GradientContext) -> None:
        """§3-§4: ``g <- coeff_m * g + noise_scale * (std(g) + 1e-8) * N(0, 1)`` on modulated encoder
        parameters, inside the §5 window; every modality's draws come from ``ctx.generator`` in
        modality and parameter order, so the ranks add the same noise."""
        mod = self.step_modulation(ctx.step)
        applied = mod["coeff"] if self.modulates(ctx.epoch) else torch.ones_like(mod["coeff"])
        one = applied.new_ones(())
        ctx.result.stats.update({f"ogm_coeff_{m}": (applied[i], one) for i, m in enumerate(self.modalities)})
        if not self.modulates(ctx.epoch):
            return
        p = self.params
        for i, m in enumerate(self.modalities):
            noise_gate = mod["is_dominant"][i] if p.noise_on == "dominant" else None
            for param in ctx.params.encoders[m]:
                grad = param.grad
                if grad is None or (p.modulated_params == "conv" and grad.dim() != 4):
                    continue
                new = grad * applied[i].to(grad.dtype)
                if p.noise_scale > 0:
                    std = gradient_noise_std(grad) * p.noise_scale  # of the gradient before scaling, as the code
                    draw = torch.randn(grad.shape, generator=ctx.generator, device=grad.device, dtype=grad.dtype)
                    noise = draw * std if noise_gate is None else draw * std * noise_gate.to(grad.dtype)
                    new = new + noise
                grad.copy_(new)

    def on_epoch_end(
        self, epoch: int, epoch_stats: dict[str, tuple[Tensor, Tensor]], world: DistInfo
    ) -> list[StructuralChange]:
        # Ratio, coefficients and dominance are the same on every rank, so the rank sum over
        # (value, 1) still gives the step mean; scores are per-sample means over the epoch.
        metrics: dict[str, float] = {"ogm_modulating": float(self.modulates(epoch))}
        keys = ["ogm_ratio"] + [f"ogm_{what}_{m}" for m in self.modalities for what in ("coeff", "dominant", "score")]
        for key in keys:
            if key in epoch_stats:
                total, count = epoch_stats[key]
                metrics[key] = float(total / count)
        self._epoch_metrics = metrics
        return []
