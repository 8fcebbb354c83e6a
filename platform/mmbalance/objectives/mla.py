"""MLA: multimodal learning with alternating unimodal adaptation (docs/methods/mla.md §1-§5).

Every batch is learnt one modality at a time through ONE classifier shared by all modalities
(``LateFusion(fusion="shared")``, ``z_m = W h_m + b``): modality ``m``'s loss ``CE(z_m, y)`` is one
loss group (its own backward and optimizer step), in recipe order, and a later modality's logits
are recomputed on the batch's features after the earlier steps moved ``W`` (§2). So that learning
modality ``m`` does not overwrite what ``W`` learnt from the others, ``perturb_gradients``
right-multiplies the head weight's gradient by a projector ``P`` that shrinks the directions of the
batch-mean features already learnt, ``P <- P - (P r)(P r)^T / (alpha + r^T P r)`` (orthogonal weight
modification, §3). At test time the unimodal logits are fused with per-sample weights from their
entropies (§4). The batch-mean feature ``r`` is reduced over ranks as (sum, count), so every rank
holds the same ``P`` and the data-parallel step is the single-process step (§5).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from mmbalance.objectives.base import (
    ForwardContext,
    GradientContext,
    LossGroup,
    Requirements,
    StatelessObjective,
    StepInputs,
    StepResult,
    cross_entropy_per_sample,
    register_objective,
)

Projection = Literal["owm", "none"]
ProjectorUpdate = Literal["after_step", "before_step"]
Denominator = Literal["scalar", "elementwise"]
FusionRule = Literal["entropy", "entropy_batch", "fixed"]

# The official code's fixed-fusion weights (main.py: av_alpha 0.55; a/v/t alphas 0.35/0.25/0.4).
OFFICIAL_FIXED_WEIGHTS = {2: (0.55, 0.45), 3: (0.35, 0.25, 0.4)}


class MLAParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    projection: Projection = Field(
        "owm",
        description="owm: project the shared head's weight gradient (paper); none: no projection, which is what the "
        "released code runs (its parameter-name check never matches)",
    )
    projector_update: ProjectorUpdate = Field(
        "after_step",
        description="after_step: P holds the earlier steps' features when it projects (OWM); before_step: the "
        "current modality's batch mean is absorbed first (official)",
    )
    denominator: Denominator = Field(
        "scalar",
        description="scalar: alpha + r^T P r (OWM); elementwise: the official torch.mm(k, r), a [D, D] alpha + k r^T "
        "dividing k k^T entry by entry",
    )
    alpha: float = Field(0.1, gt=0.0, description="regulariser of the projector update (official initial value 0.1)")
    alpha_decay: bool = Field(
        False, description="official: alpha * 0.1 ** (b / N) for batch b of an N-batch epoch (0.1 -> 0.01 each epoch)"
    )
    normalize_projector: bool = Field(False, description="official: divide P by its Frobenius norm after every update")
    skip_first_step: bool = Field(
        False, description="official: the run's first modality step neither projects nor updates P (exp_count == 0)"
    )
    fusion_rule: FusionRule = Field(
        "entropy",
        description="fused logits: entropy: per-sample entropy weights (paper); entropy_batch: one weight per "
        "modality per batch, softmax over the batch axis (official --dynamic); fixed: fixed_weights (official default)",
    )
    fixed_weights: list[float] | None = Field(
        None,
        description="fusion_rule fixed: one weight per modality in recipe order; null: the official 0.55/0.45 "
        "(two modalities) or 0.35/0.25/0.4 (three)",
    )


def projector_update(P: Tensor, r: Tensor, alpha: float, denominator: Denominator, normalize: bool) -> Tensor:
    """[D, D] projector, [D] batch-mean feature -> the updated projector (§3).

    ``k = P r``; ``scalar``: ``P - k k^T / (alpha + r^T k)`` (OWM: afterwards ``P r = alpha / (alpha +
    r^T r) r`` for ``P = I``, so ``r``'s direction is all but removed); ``elementwise``: the official
    code's ``(alpha + k r^T)`` matrix divides ``k k^T`` entry by entry. ``normalize`` divides by
    the Frobenius norm (official). Example: ``P = I``, ``r = (3, 4)``, ``alpha = 1`` ->
    ``[[17, -12], [-12, 10]] / 26``.
    """
    k = P @ r  # [D]
    if denominator == "scalar":
        P = P - torch.outer(k, k) / (alpha + r @ k)
    else:
        P = P - torch.outer(k, k) / (alpha + torch.outer(k, r))
    return P / torch.linalg.matrix_norm(P) if normalize else P


def project(grad: Tensor, P: Tensor) -> Tensor:
    """[C, D] weight gradient -> ``grad @ P^T``: each class row loses the stored feature directions."""
    return grad @ P.T.to(grad.dtype)


@register_objective
class MLA(StatelessObjective):
    """MLA, "Multimodal Representation Learning by Alternating Unimodal Adaptation" (Zhang, Yoon,
    Bansal, Yao, CVPR 2024, arXiv 2311.10707). Official code:
    Cecile-hi/Multimodal-Learning-with-Alternating-Unimodal-Adaptation at commit ``ab6c184579``
    (``main.py`` ``train_epoch``/``valid`` with ``--gs_flag``, ``utils/utils.py`` ``GSPlugin``).

    Paper/code differences, each a switch (docs/methods/mla.md §6):

    - ``projection``: since commit ``11ae1ee`` ("Fix bugs") the code projects only a parameter
      named ``module.weight``, and the head it is given (a bare ``nn.Linear``) names its weight
      ``weight``, so the released code never projects (``none``, the ``official`` variant); before
      that commit the check matched but ``main.py`` passed the class instead of an instance and
      failed first, so no commit runs the projector; ``official_projection`` is ``GSPlugin`` as written.
    - ``projector_update``, ``denominator``, ``alpha_decay``, ``normalize_projector``,
      ``skip_first_step``: how that earlier code updates ``P`` (current features first, an
      element-wise denominator, alpha decaying within each epoch, Frobenius normalisation, no
      update on the run's very first step).
    - ``fusion_rule``: the paper weights each sample by its entropies (``entropy``); the code's
      ``--dynamic`` rule takes the softmax over the batch axis and gives one weight per batch
      (``entropy_batch``); without ``--dynamic`` it uses fixed weights (``fixed``).
    - Not switchable: the engine clears gradients to ``None`` before each modality's step (the
      code's torch 1.8 ``zero_grad`` leaves zero gradients, so its first modality's encoder takes
      a second, momentum-only step each batch); the bias and the encoders are never projected
      (as in the code); one projector is shared by every modality (as in the code).
    """

    name = "mla"
    Params = MLAParams
    params: MLAParams
    # One head for every modality (equal feature widths, checked in bind) and a label-free fusion rule.
    requirements = Requirements(fusions=("shared",))
    variants = {
        "official": ("objective.projection=none", "objective.fusion_rule=entropy_batch"),
        "official_projection": (
            "objective.projector_update=before_step",
            "objective.denominator=elementwise",
            "objective.alpha_decay=true",
            "objective.normalize_projector=true",
            "objective.skip_first_step=true",
            "objective.fusion_rule=entropy_batch",
        ),
        "fixed_fusion": ("objective.projection=none", "objective.fusion_rule=fixed"),
    }

    def __init__(self, params: MLAParams | None = None):
        super().__init__(params)
        self.modalities: list[str] = []
        self.width = 0
        self.weights: dict[str, float] = {}
        # State: the projector (None until the first projected step: its device is the head's)
        # and where the current epoch began, for the official alpha decay. Per step: the
        # rank-summed feature sums [M*D + 1] of its micro-batches and its batch index.
        self.projector: Tensor | None = None
        self._epoch, self._epoch_start = -1, 0
        self._sums: Tensor | None = None
        self._sums_step: int | None = None
        self._batch: tuple[int, int] = (0, 1)  # (batch index in the epoch, batches per epoch)

    def bind(self, modalities: list[str], num_classes: int, model_info: dict[str, Any]) -> None:
        dims = dict(model_info.get("feature_dims", {}))
        if len(set(dims.values())) > 1:
            widths = ", ".join(f"modalities.{m}.params.out_dim={d}" for m, d in dims.items())
            raise ValueError(
                f"objective.name=mla projects the shared head's gradient in its input space, so every encoder "
                f"must output one width; got {widths}"
            )
        self.modalities = list(modalities)
        self.num_classes = num_classes
        self.width = next(iter(dims.values()), 0)
        if self.params.fusion_rule == "fixed":
            self.weights = self._fixed_weights()

    def _fixed_weights(self) -> dict[str, float]:
        weights = self.params.fixed_weights or OFFICIAL_FIXED_WEIGHTS.get(len(self.modalities))
        if weights is None or len(weights) != len(self.modalities):
            raise ValueError(
                f"objective.fusion_rule=fixed needs objective.fixed_weights with one weight per modality "
                f"{self.modalities}, got {self.params.fixed_weights}"
            )
        return dict(zip(self.modalities, (float(w) for w in weights)))

    def forward_context(self, phase: str, epoch: int) -> ForwardContext:
        """The same label-free fusion in training (train accuracy) and evaluation (§4)."""
        if self.params.fusion_rule == "fixed":
            return ForwardContext(fusion_weights=dict(self.weights))
        return ForwardContext(fusion_rule=self.params.fusion_rule)

    def step(self, inputs: StepInputs) -> StepResult:
        """One loss group per modality in recipe order; the first is a tensor, later ones are lazy,
        so they see the shared head after the earlier steps (§2)."""
        out, y = inputs.outputs, inputs.labels
        first, *later = self.modalities
        if later and inputs.recompute_heads is None:
            raise ValueError("MLA needs StepInputs.recompute_heads: later modalities see the head after earlier steps")
        losses = [LossGroup(cross_entropy_per_sample(out.unimodal_logits[first], y).mean(), modalities=(first,))]
        losses += [LossGroup(partial(_recomputed_loss, inputs, m), modalities=(m,)) for m in later]
        detached = {m: out.unimodal_logits[m].detach() for m in self.modalities}
        metrics = {f"loss_{m}": cross_entropy_per_sample(z, y).mean() for m, z in detached.items()}
        if inputs.phase == "train" and self.params.projection == "owm":
            self._add_feature_sums(inputs)
        return StepResult(losses=losses, metrics=metrics)

    def _add_feature_sums(self, inputs: StepInputs) -> None:
        """Rank-summed per-modality feature sums and the sample count of this micro-batch, added to
        the step's total (micro-batches of one step add up), and the step's batch index (§5)."""
        if inputs.epoch != self._epoch:
            self._epoch, self._epoch_start = inputs.epoch, inputs.step
        self._batch = (inputs.step - self._epoch_start, max(inputs.steps_per_epoch, 1))
        feats = [inputs.features[m].detach().float().sum(0) for m in self.modalities]  # M x [D]
        count = feats[0].new_full((1,), inputs.labels.numel())
        reduced = inputs.world.all_reduce_sum(torch.cat([*feats, count]))  # [M*D + 1], the same on every rank
        if self._sums_step != inputs.step or self._sums is None:
            self._sums, self._sums_step = torch.zeros_like(reduced), inputs.step
        self._sums = self._sums + reduced

    def alpha(self) -> float:
        """The projector's regulariser for the current step (§3)."""
        if not self.params.alpha_decay:
            return self.params.alpha
        index, per_epoch = self._batch
        return self.params.alpha * 0.1 ** (index / per_epoch)

    def perturb_gradients(self, ctx: GradientContext) -> None:
        """§3: project modality ``m``'s shared-weight gradient with ``P`` and absorb ``m``'s batch-mean
        feature into ``P`` (in the order ``projector_update`` says)."""
        p = self.params
        if p.projection == "none" or (p.skip_first_step and ctx.step == 0 and ctx.group_index == 0):
            return
        if self._sums is None or self._sums_step != ctx.step:
            raise RuntimeError(f"mla: perturb_gradients for step {ctx.step} without a training step() before it")
        weight = _head_weight(ctx)
        i, D = ctx.group_index, self.width
        mean = self._sums[i * D : (i + 1) * D] / self._sums[-1]  # [D], the global batch mean
        P = self.projector if self.projector is not None else torch.eye(D, device=weight.device)
        P, mean = P.to(weight.device), mean.to(weight.device)
        if p.projector_update == "before_step":
            P = projector_update(P, mean, self.alpha(), p.denominator, p.normalize_projector)
        if weight.grad is not None:
            weight.grad.copy_(project(weight.grad, P))
        if p.projector_update == "after_step":
            P = projector_update(P, mean, self.alpha(), p.denominator, p.normalize_projector)
        self.projector = P

    def epoch_metrics(self) -> dict[str, float]:
        """``mla_projector_trace``: trace(P) / D, the share of the feature space still open to the
        head (1 before any update; falls as feature directions are stored)."""
        if self.projector is None:
            return {}
        return {"mla_projector_trace": float(torch.trace(self.projector)) / self.width}

    def state_dict(self) -> dict[str, Any]:
        projector = None if self.projector is None else self.projector.detach().cpu().clone()
        return {"projector": projector, "epoch": self._epoch, "epoch_start": self._epoch_start}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.projector = state["projector"]
        self._epoch, self._epoch_start = int(state["epoch"]), int(state["epoch_start"])


def _recomputed_loss(inputs: StepInputs, modality: str) -> Tensor:
    """Evaluated by the engine after the earlier groups' steps: the batch's features (encoders as
    the batch began, as the code's single forward) through the head as it is now."""
    logits = inputs.recompute_heads().unimodal_logits[modality]  # [B, C]
    return cross_entropy_per_sample(logits, inputs.labels).mean()


def _head_weight(ctx: GradientContext) -> torch.nn.Parameter:
    """The shared head's weight: the one 2-D parameter every modality's logits pass through."""
    weights = [param for param in ctx.params.shared if param.dim() == 2]
    if len(weights) != 1:
        raise RuntimeError(f"mla expects one shared 2-D head weight, found {len(weights)} (model.fusion=shared)")
    return weights[0]
