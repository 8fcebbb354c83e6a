"""PMR: prototypical modal rebalance (docs/methods/pmr.md §2-§5).

Loss ``CE(z_f, y) + sum_m c_m * PCE_m - sum_m e_m * H_m``. ``PCE_m`` is the cross-entropy of the
prototype logits ``-||h_m - P_m[k]|| / temperature`` (§2, §3); ``c_m`` boosts the modalities whose
summed true-class prototype score lags the best one (§4); ``e_m`` maximises the prototype entropy
``H_m`` of the leading modality in the first ``entropy_epochs`` epochs (§5). Prototypes are
per-class feature means summed over the epoch and over ranks, set in ``on_epoch_end``; before the
first epoch ends they are the running class means of the epoch so far (§2).
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
    entropy_per_sample,
    register_objective,
)

CoeffForm = Literal["paper_tanh", "official_step"]
InitialPrototypes = Literal["running", "none"]
# Logit of a class that has no prototype yet: softmax weight exactly 0, entropy term finite.
_NO_CLASS = -1e9


class PMRParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    alpha: float = Field(1.0, ge=0.0, description="scale of the PCE coefficients (official scripts: 1.0-3.0)")
    coeff_form: CoeffForm = Field(
        "paper_tanh",
        description="paper_tanh: alpha*tanh(rho-1) for a lagging modality; official_step: alpha whenever rho>1",
    )
    mu: float = Field(0.01, ge=0.0, description="weight of the dominant modality's prototype entropy (0: off)")
    entropy_epochs: int = Field(10, ge=0, description="0-based epochs 0..entropy_epochs-1 carry the entropy term")
    momentum: float = Field(0.0, ge=0.0, lt=1.0, description="prototype EMA: P <- (1-momentum)*epoch mean + momentum*P")
    temperature: float = Field(1.0, gt=0.0, description="prototype logits are -distance/temperature")
    modulation_ends: int | None = Field(
        None, ge=0, description="last 0-based epoch with PCE and entropy terms (None: every epoch)"
    )
    initial_prototypes: InitialPrototypes = Field(
        "running",
        description="before the first epoch ends: running: class means of the features seen so far this epoch; "
        "none: no prototypes, fused CE only",
    )


def prototype_logits(features: Tensor, prototypes: Tensor, temperature: float, seen: Tensor | None = None) -> Tensor:
    """[B, D], [C, D] -> [B, C] negative Euclidean distances over the temperature (§3); classes
    with ``seen`` False (no prototype yet) are left out of the softmax."""
    logits = -torch.cdist(features, prototypes.to(features), p=2.0) / temperature
    if seen is not None:
        logits = logits.masked_fill(~seen.to(logits.device), _NO_CLASS)
    return logits


def pce_coefficients(scores: Tensor, alpha: float, form: CoeffForm) -> Tensor:
    """[M] summed true-class prototype scores -> [M] PCE coefficients (§4).

    ``rho_m = max_k s_k / s_m >= 1``; the leading modality has ``rho = 1`` and coefficient 0.
    """
    rho = scores.max() / scores.clamp_min(torch.finfo(scores.dtype).tiny)  # [M]
    if form == "paper_tanh":
        return alpha * torch.tanh(rho - 1.0)
    return alpha * (rho > 1.0).to(scores.dtype)


def entropy_weights(scores: Tensor, mu: float) -> Tensor:
    """[M] scores -> [M] entropy weights: ``mu`` on the leading modality when some modality lags (§5)."""
    lead = (torch.arange(scores.numel(), device=scores.device) == scores.argmax()).to(scores.dtype)  # [M]
    imbalanced = (scores < scores.max()).any().to(scores.dtype)
    return mu * lead * imbalanced


@register_objective
class PMR(StatelessObjective):
    """PMR, "Prototypical Modal Rebalance for Multimodal Learning" (Fan et al., CVPR 2023).

    Official code: fanyunfeng-bit/Modal-Imbalance-PMR at commit ``3615e48983`` (``main_Prototype_grad.py``).
    Paper/code differences, exposed as switches (docs/methods/pmr.md §6):

    - ``coeff_form``: the code gives the lagging modality the constant ``alpha`` whenever its
      score ratio exceeds 1 (``official_step``); the paper scales it smoothly with the ratio
      (``paper_tanh``).
    - ``mu``: the released script has no entropy regulariser (``mu=0``).
    - ``modulation_ends``: the scripts stop the PCE terms after epoch 70.

    Not reproducible here, by design (§6): the code recomputes the prototypes after each epoch
    in eval mode on the first tenth of the shuffled train loader (the validation set for AVE
    and CGMNIST); here they are the class means of the features each train step already
    computed, summed over the epoch and over ranks. In epoch 0 the code uses the untrained
    model's prototypes; here (``initial_prototypes: running``) each step uses the rank-summed
    class means of the features seen so far in the epoch, or (``none``) the fused CE alone.
    """

    name = "pmr"
    Params = PMRParams
    params: PMRParams
    # PMR reads only the encoder features and the fused logits, so any late fusion works.
    requirements = Requirements(fusions=("concat", "sum", "mean"))
    variants = {
        "official": ("objective.coeff_form=official_step", "objective.mu=0.0", "objective.modulation_ends=70"),
    }

    def __init__(self, params: PMRParams | None = None):
        super().__init__(params)
        self.modalities: list[str] = []
        self.prototypes: dict[str, Tensor] | None = None  # m -> [C, D_m], identical on every rank
        self.seen: Tensor | None = None  # [C] bool, classes that have a prototype
        # Rank-summed class sums and counts of the epoch so far, while no epoch has ended (§2).
        self._running: dict[str, Tensor] | None = None
        self._running_count: Tensor | None = None
        self._epoch_metrics: dict[str, float] = {}

    def modulating(self, epoch: int) -> bool:
        ends = self.params.modulation_ends
        return ends is None or epoch <= ends

    def _prototypes_for_step(self, inputs: StepInputs, sums: dict[str, Tensor], count: Tensor):
        """The prototypes this step uses, or None (§2): the last epoch's, or, before the first epoch
        ended and with ``initial_prototypes: running``, the rank-summed class means seen so far."""
        if self.prototypes is not None:
            return self.prototypes, self.seen
        if self.params.initial_prototypes == "none" or inputs.phase != "train":
            return None, None
        mods = self.modalities
        flat = torch.cat([*(sums[m].flatten() for m in mods), count])
        flat = inputs.world.all_reduce_sum(flat)  # one collective: every rank holds the same running sums
        if self._running is None:
            self._running = {m: torch.zeros_like(sums[m]) for m in mods}
            self._running_count = torch.zeros_like(count)
        offset = 0
        for m in mods:
            n = sums[m].numel()
            self._running[m] = self._running[m] + flat[offset : offset + n].view_as(sums[m])
            offset += n
        self._running_count = self._running_count + flat[offset:]
        denom = self._running_count.clamp_min(1.0).unsqueeze(1)
        return {m: self._running[m] / denom for m in mods}, self._running_count > 0

    def step(self, inputs: StepInputs) -> StepResult:
        out, y, mods, p = inputs.outputs, inputs.labels, self.modalities, self.params
        fused = cross_entropy_per_sample(out.fused_logits, y).mean()
        classes = torch.arange(self.num_classes, device=y.device)
        onehot = (y.unsqueeze(1) == classes).to(fused.dtype)  # [B, C]; no device-to-host value check
        stats: dict[str, tuple[Tensor, Tensor]] = {}
        count = onehot.sum(dim=0)  # [C]
        sums = {m: onehot.T @ inputs.features[m].detach().float() for m in mods}  # m -> [C, D_m]
        if inputs.phase == "train":
            stats.update({f"pmr_proto_{m}": (sums[m], count) for m in mods})
        metrics = {"loss_fused": fused.detach()}
        one = fused.new_ones(())
        prototypes, seen = self._prototypes_for_step(inputs, sums, count)
        if prototypes is None or not self.modulating(inputs.epoch):
            for m in mods:
                stats[f"pmr_coeff_{m}"] = (fused.new_zeros(()), one)
            return StepResult(losses=[LossGroup(fused)], stats=stats, metrics=metrics)

        logits = {m: prototype_logits(inputs.features[m].float(), prototypes[m], p.temperature, seen) for m in mods}
        pce = torch.stack([cross_entropy_per_sample(logits[m], y).mean() for m in mods])  # [M]
        entropy = torch.stack([entropy_per_sample(logits[m]).mean() for m in mods])  # [M]
        true_prob = torch.stack([(logits[m].detach().softmax(-1) * onehot).sum() for m in mods])  # [M] local sums
        scores = inputs.world.all_reduce_sum(true_prob)  # [M] global sums: same coefficients on every rank
        coeffs = pce_coefficients(scores, p.alpha, p.coeff_form)  # [M]
        mu = p.mu if inputs.epoch < p.entropy_epochs else 0.0
        ent_w = entropy_weights(scores, mu)  # [M]
        total = fused + (coeffs * pce).sum() - (ent_w * entropy).sum()

        for i, m in enumerate(mods):
            stats[f"pmr_coeff_{m}"] = (coeffs[i], one)
            metrics[f"loss_pce_{m}"] = pce[i].detach()
            metrics[f"pmr_entropy_{m}"] = entropy[i].detach()
            metrics[f"pmr_score_{m}"] = scores[i] / scores.sum()
        return StepResult(losses=[LossGroup(total)], stats=stats, metrics=metrics)

    def on_epoch_end(
        self, epoch: int, epoch_stats: dict[str, tuple[Tensor, Tensor]], world: DistInfo
    ) -> list[StructuralChange]:
        """New prototypes from the epoch's rank-summed class sums (§2), then the EMA."""
        metrics: dict[str, float] = {}
        if all(f"pmr_proto_{m}" in epoch_stats for m in self.modalities):
            new = {}
            for m in self.modalities:
                sums, counts = epoch_stats[f"pmr_proto_{m}"]
                fresh = (sums / counts.clamp_min(1.0).unsqueeze(1)).float()  # [C, D]
                old = None if self.prototypes is None else self.prototypes[m].to(fresh)
                if old is not None:
                    # A class absent from the epoch keeps its prototype.
                    fresh = torch.where(counts.unsqueeze(1) > 0, fresh, old)
                    fresh = (1.0 - self.params.momentum) * fresh + self.params.momentum * old
                new[m] = fresh
            seen = epoch_stats[f"pmr_proto_{self.modalities[0]}"][1] > 0
            self.seen = seen if self.seen is None else self.seen.to(seen.device) | seen
            self.prototypes = new
        self._running, self._running_count = None, None
        for m in self.modalities:
            key = f"pmr_coeff_{m}"
            if key in epoch_stats:
                total, count = epoch_stats[key]
                metrics[key] = float(total / count)
        self._epoch_metrics = metrics
        return []

    def epoch_metrics(self) -> dict[str, float]:
        return dict(self._epoch_metrics)

    def state_dict(self) -> dict[str, Any]:
        protos = None if self.prototypes is None else {m: t.detach().clone() for m, t in self.prototypes.items()}
        seen = None if self.seen is None else self.seen.clone()
        return {"prototypes": protos, "seen": seen, "epoch_metrics": dict(self._epoch_metrics)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        protos = state["prototypes"]
        self.prototypes = None if protos is None else {m: t.detach().clone() for m, t in protos.items()}
        self.seen = None if state["seen"] is None else state["seen"].clone()
        self._running, self._running_count = None, None
        self._epoch_metrics = dict(state["epoch_metrics"])
