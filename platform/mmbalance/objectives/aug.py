"""AUG: sustained boosting with adaptive classifier assignment (docs/methods/aug.md §4).

Each modality ``m`` has an ensemble of classifiers ``g_m^k = F(ReLU(A_m^k h_m))`` sharing one
head ``F`` (``LateFusion(fusion="boost")``). Per batch, modality ``m`` is optimised on its own
(one loss group, one optimizer step each, in modality order) with

    L_m = CE(S_m)                                              if K_m = 0
    L_m = CE(S_m) + CE(S_m^-) + mean_i(w_i * CE_i(n_m))        otherwise,

where ``S_m`` is the ensemble sum of logits, ``S_m^-`` the ensemble without the newest head
``n_m`` and ``w`` the detached residual-label weight (the residual label is ``w * onehot(y)``).
Every ``check_every_epochs`` epochs the adaptive classifier assignment (ACA) compares the
modalities' mean true-class confidences and gives the weaker one(s) another head.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from mmbalance.objectives.base import (
    AddHead,
    DistInfo,
    ForwardContext,
    LossGroup,
    Requirements,
    StatelessObjective,
    StepInputs,
    StepResult,
    StructuralChange,
    cross_entropy_per_sample,
    register_objective,
)

ResidualForm = Literal["official", "paper"]
ScoreOrder = Literal["official", "first_forward"]
ACARule = Literal["ratio", "share"]
ScorePair = tuple[Tensor, Tensor]  # (sum, count), summed over steps and ranks by the engine


class AUGParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    residual_lambda: float = Field(0.5, ge=0.0, le=1.0, description="residual factor λ (official: 0.5 hard-coded)")
    residual_form: ResidualForm = Field(
        "official", description="official: 1 - λ softmax(S^-)_y; paper: 1 - λ Σ_{j<t} softmax(g_j)_y (clamped at 0)"
    )
    sigma: float = Field(1.0, gt=0.0, description="aca_rule ratio: threshold σ (CREMA-D code --lam)")
    tau: float = Field(0.01, ge=0.0, description="aca_rule ratio: dead zone τ")
    check_every_epochs: int = Field(10, ge=1, description="t_N: check after epoch e if e == 0 or (e+1) % t_N == 0")
    max_heads: int = Field(10, ge=0, description="cap on heads added per modality (official: none)")
    train_new_heads: bool = Field(True, description="True: paper (added heads are optimised); False: official (frozen)")
    merge_alpha: float | None = Field(
        None, ge=0.0, le=1.0, description="2 modalities only: fused = α S_first + (1-α) S_second; null: model sum"
    )
    score_order: ScoreOrder = Field(
        "official",
        description="official: s_m from the logits L_m was computed on; first_forward: all from the first forward",
    )
    aca_rule: ACARule = Field(
        "ratio",
        description="ratio: s_1/s_2 vs σ±τ (M>2: argmin s); share: every m with s_m/Σ_{k≠m} s_k < share_threshold",
    )
    share_threshold: float = Field(
        0.4, gt=0.0, description="aca_rule share: threshold on s_m/Σ_{k≠m} s_k (NVGesture code --lam)"
    )


def residual_weight(prev_heads: list[Tensor], labels: Tensor, lam: float, form: ResidualForm) -> Tensor:
    """Per-sample weight ``w`` of the newest head's CE, detached: residual label = ``w * onehot(y)``.

    ``prev_heads``: the K logits [B, C] of all heads but the newest (K >= 1).
    """
    idx = labels.unsqueeze(1)  # [B, 1]
    if form == "official":
        # softmax of the summed logits S^- (train_CREMAD.py); w in [1 - λ, 1] since λ <= 1.
        prev = torch.stack([z.detach() for z in prev_heads]).sum(0)  # [B, C]
        return 1.0 - lam * prev.softmax(-1).gather(1, idx).squeeze(1)  # [B]
    # Paper: sum of per-head probabilities, which exceeds 1 with several heads; a negative label
    # would make the CE term unbounded below, so it is clamped at 0.
    probs = torch.stack([z.detach().softmax(-1) for z in prev_heads]).sum(0)  # [B, C]
    return (1.0 - lam * probs.gather(1, idx).squeeze(1)).clamp_min(0.0)  # [B]


def boosting_loss(heads: list[Tensor], labels: Tensor, lam: float, form: ResidualForm) -> Tensor:
    """``L_m`` of docs/methods/aug.md §4.2 step 3 from modality m's per-head logits (each [B, C])."""
    ensemble = torch.stack(heads).sum(0) if len(heads) > 1 else heads[0]  # [B, C]
    loss = cross_entropy_per_sample(ensemble, labels).mean()
    if len(heads) == 1:
        return loss
    prev = torch.stack(heads[:-1]).sum(0)  # [B, C]
    weight = residual_weight(heads[:-1], labels, lam, form)  # [B]
    newest = (weight * cross_entropy_per_sample(heads[-1], labels)).mean()
    return loss + cross_entropy_per_sample(prev, labels).mean() + newest


def aca_decision(scores: dict[str, float], sigma: float, tau: float) -> str | None:
    """The modality that should get one more head, from mean confidences (modality order kept).

    Two modalities: the official ratio rule ``ρ = s_1 / s_2`` vs ``σ ± τ``. Means instead of the
    official epoch sums leave ρ unchanged (both modalities see the same samples). More than two:
    ``argmin s`` when ``max s - σ min s > τ`` (docs/methods/aug.md §4.8; the first modality wins ties).
    """
    names = list(scores)
    if len(names) == 2:
        first, second = names
        rho = scores[first] / scores[second] if scores[second] > 0 else float("inf")
        if rho > sigma + tau:
            return second
        if rho < sigma - tau:
            return first
        return None
    weakest = min(names, key=lambda m: scores[m])
    return weakest if max(scores.values()) - sigma * scores[weakest] > tau else None


def share_decision(scores: dict[str, float], threshold: float) -> list[str]:
    """Every modality whose score share ``s_m / Σ_{k≠m} s_k`` is below ``threshold`` (modality order).

    The official three-modality rule (``train_NVGesture.py``: ``ratio_m < --lam``, no dead zone), so
    one check can add several heads. Means instead of the official sums leave each share unchanged.
    A zero denominator counts as an infinite share (no head).
    """
    total = sum(scores.values())
    chosen = []
    for m, s in scores.items():
        rest = total - s
        share = s / rest if rest > 0 else float("inf")
        if share < threshold:
            chosen.append(m)
    return chosen


def true_class_score(heads: list[Tensor], labels: Tensor) -> ScorePair:
    """ACA score of one modality on one batch: (Σ_i softmax(S_m)_{i,y_i}, B), detached.

    ``heads``: the modality's per-head logits [B, C]; a (sum, count) pair so ranks can be summed.
    """
    # One head (no head added yet): its logits are the ensemble; stacking one tensor and
    # summing it would only copy the same values.
    ensemble = (heads[0] if len(heads) == 1 else torch.stack(heads).sum(0)).detach().float()  # [B, C]
    true_prob = ensemble.softmax(-1).gather(1, labels.unsqueeze(1)).squeeze(1)  # [B]
    count = torch.full((), labels.shape[0], dtype=true_prob.dtype, device=labels.device)  # []
    return true_prob.sum(), count


@register_objective
class AUG(StatelessObjective):
    """AUG (Rethinking Multimodal Learning from the Perspective of Mitigating Classification
    Ability Disproportion), NeurIPS'25, arXiv 2502.20120; official code njustkmg/NeurIPS25-AUG
    at commit ``841d079eff`` (``train_CREMAD.py``, ``model/AudioVideo.py``).

    Paper/code differences exposed as switches (docs/methods/aug.md §4.7):

    - ``train_new_heads``: the official optimizer never sees added heads, so they stay at their
      Xavier init (``False``); the paper trains them (``True``, default). ``requirements``
      names this parameter, and the engine reads the resulting ``trains_new_heads`` to decide
      whether an added head's parameters join the optimizer.
    - ``residual_form``: official ``1 - λ softmax(S^-)_y`` (default) or the paper's
      ``1 - λ Σ_{j<t} p_j,y`` (clamped at 0 here: the paper's label can go negative).
    - ``aca_rule``: ``ratio`` (default) is the two-modality code's rule (the paper compares
      ``s_a - σ s_v``; the head goes to the weaker modality, as in the prose and code), with the
      ``argmin s`` extension for M > 2; ``share`` is the three-modality code's rule (every
      modality with ``s_m / Σ_{k≠m} s_k < share_threshold``). ``max_heads`` caps the heads added
      per modality (none in the code); a capped modality simply gets no head.
    - The confidence score is the code's ``softmax(S_m)_y`` (paper: sum of per-head
      probabilities), detached, accumulated as (sum, count) and compared as a mean.
    - ``score_order``: the code scores each modality on the logits its own loss used, so a later
      modality is scored after the earlier steps updated ``F`` (``official``, default);
      ``first_forward`` scores every modality on the batch's first forward.
    - ``zero_grad`` is the engine's: always ``set_to_none=True`` (torch >= 2 semantics), so a
      modality's step leaves the other modalities' parameters alone; no switch for it.
    """

    name = "aug"
    Params = AUGParams
    params: AUGParams
    # Needs add_head and the head F shared by every modality's classifiers; whether added heads
    # are optimised is the train_new_heads parameter.
    requirements = Requirements(fusions=("boost",), trains_new_heads="train_new_heads")
    variants = {
        "official": (
            "objective.train_new_heads=false",
            "objective.merge_alpha=0.4",
            "objective.check_every_epochs=1",
        )
    }

    def __init__(self, params: AUGParams | None = None):
        super().__init__(params)
        self.modalities: list[str] = []
        # State: heads per modality including the base head, counted from the AddHead changes
        # this objective requested (the model is never read), and the last epoch's mean scores.
        self.heads: dict[str, int] = {}
        self.scores: dict[str, float] = {}

    def bind(self, modalities: list[str], num_classes: int, model_info: dict[str, Any]) -> None:
        if self.params.merge_alpha is not None and len(modalities) != 2:
            raise ValueError(f"merge_alpha needs exactly 2 modalities, got {list(modalities)}; use null (uniform)")
        self.modalities = list(modalities)
        self.num_classes = num_classes
        # Keep counts restored by load_state_dict, whichever of the two the engine calls first.
        self.heads = {m: self.heads.get(m, 1) for m in self.modalities}

    def forward_context(self, phase: str, epoch: int) -> ForwardContext:
        alpha = self.params.merge_alpha
        if alpha is None:
            return ForwardContext()  # boost fusion sums the S_m: same argmax as a uniform mean
        first, second = self.modalities
        return ForwardContext(fusion_weights={first: alpha, second: 1.0 - alpha})

    def step(self, inputs: StepInputs) -> StepResult:
        """One loss group per modality; the first is a tensor, later ones are lazy (see
        ``_recomputed_loss``). With ``score_order: official`` the later modalities' entries of
        ``stats`` are filled only when the engine evaluates their loss: the engine reads
        ``StepResult.stats`` after all groups ran, so a caller must do the same."""
        out, y = inputs.outputs, inputs.labels
        first, *later = self.modalities
        if later and inputs.recompute_heads is None:
            raise ValueError(
                "AUG needs StepInputs.recompute_heads: later modalities see the shared head after earlier steps"
            )
        stats: dict[str, ScorePair] = {}
        first_loss = self._loss(out.head_logits[first], y)
        losses = [LossGroup(first_loss, modalities=(first,))]
        losses += [LossGroup(partial(self._recomputed_loss, inputs, m, stats), modalities=(m,)) for m in later]
        # Logged from this forward for every modality (later groups' losses are lazy); the first
        # modality's is the value of its loss group, not computed twice.
        metrics = {f"loss_{first}": first_loss.detach()}
        for m in self.modalities:
            if m == first or self.params.score_order == "first_forward":
                stats[f"aug_score_{m}"] = true_class_score(out.head_logits[m], y)
            if m != first:
                metrics[f"loss_{m}"] = self._loss([z.detach() for z in out.head_logits[m]], y)
        return StepResult(losses=losses, stats=stats, metrics=metrics)

    def _loss(self, heads: list[Tensor], labels: Tensor) -> Tensor:
        return boosting_loss(heads, labels, self.params.residual_lambda, self.params.residual_form)

    def _recomputed_loss(self, inputs: StepInputs, modality: str, stats: dict[str, ScorePair]) -> Tensor:
        """Evaluated by the engine after the previous groups' optimizer steps (official order).
        With ``score_order: official`` the score comes from these same logits, as in the code."""
        heads = inputs.recompute_heads().head_logits[modality]  # K_m+1 tensors [B, C]
        if self.params.score_order == "official":
            stats[f"aug_score_{modality}"] = true_class_score(heads, inputs.labels)
        return self._loss(heads, inputs.labels)

    def on_epoch_end(
        self, epoch: int, epoch_stats: dict[str, tuple[Tensor, Tensor]], world: DistInfo
    ) -> list[StructuralChange]:
        # epoch_stats are already summed over steps and ranks, so every rank sees the same means.
        self.scores = {m: _mean(epoch_stats[f"aug_score_{m}"]) for m in self.modalities}
        if not (epoch == 0 or (epoch + 1) % self.params.check_every_epochs == 0):
            return []
        decision = self._decide() if world.rank == 0 else None
        decision = world.broadcast(decision)  # every rank applies rank 0's list
        for m in decision:
            self.heads[m] += 1
        return [AddHead(m) for m in decision]

    def _decide(self) -> list[str]:
        """Modalities that get one more head at this check, ``max_heads`` applied to each."""
        p = self.params
        if p.aca_rule == "share":
            targets = share_decision(self.scores, p.share_threshold)
        else:
            target = aca_decision(self.scores, p.sigma, p.tau)
            targets = [] if target is None else [target]
        return [m for m in targets if self.heads[m] - 1 < p.max_heads]

    def epoch_metrics(self) -> dict[str, float]:
        metrics = {f"aug_heads_{m}": float(n) for m, n in self.heads.items()}
        metrics.update({f"aug_score_{m}": s for m, s in self.scores.items()})
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {"heads": dict(self.heads), "scores": dict(self.scores)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.heads = {m: int(n) for m, n in state["heads"].items()}
        self.scores = {m: float(s) for m, s in state["scores"].items()}


def _mean(pair: tuple[Tensor, Tensor]) -> float:
    total, count = (float(t) for t in pair)
    if count <= 0:
        raise ValueError("AUG got an empty confidence score (count 0) at epoch end")
    return total / count
