"""The objective protocol shared by LF, MNL, ARM, ARL and AUG (docs/methods/protocol.md §6).

An objective turns one forward pass into loss groups and statistics. It never calls
``backward()``, steps an optimizer, moves tensors between devices or talks to
torch.distributed: the engine does all of that, so the same objective runs in-process,
under DDP and inside a Tune trial. Quantities that feed a decision or a scale are
reduced through ``DistInfo.all_reduce_sum`` (supplied by the engine) as (sum, count)
pairs, never as local means, so every rank takes the same decision.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Protocol, Union

import torch
from torch import Tensor


def _identity(tensor: Tensor) -> Tensor:
    return tensor


def _keep(obj: Any) -> Any:
    return obj


FUSIONS = ("mean", "sum", "concat", "boost")  # the LateFusion heads (models/fusion.py)


@dataclass(frozen=True)
class Requirements:
    """What an objective needs from the recipe, declared once on its class.

    The recipe validator, the engine, the search-space validator, tests and benchmarks all read
    this instead of keeping their own tables, so a new objective states its needs in one place.
    ``fusions`` lists the ``model.fusion`` values whose outputs the objective's math is written
    for; the first is what ``model.fusion: auto`` picks. ``warmup_key`` names the parameter that
    counts baseline-only epochs (ASHA's grace period must cover it). ``min_modalities`` is the
    fewest modalities the objective is defined for (LF trains a single modality alone).
    """

    fusions: tuple[str, ...]
    warmup_key: str | None = None
    min_modalities: int = 2

    def __post_init__(self) -> None:
        unknown = [f for f in self.fusions if f not in FUSIONS]
        if not self.fusions or unknown:
            raise ValueError(f"fusions must be a non-empty subset of {FUSIONS}, got {self.fusions}")

    @property
    def default_fusion(self) -> str:
        return self.fusions[0]

    def fusion_problem(self, objective: str, fusion: str) -> str | None:
        """None when ``fusion`` fits, else a message naming both recipe keys and the allowed values."""
        if fusion in self.fusions:
            return None
        allowed = ", ".join(self.fusions)
        return (f"objective.name={objective} needs model.fusion in [{allowed}] (or auto, which picks "
                f"{self.default_fusion}), got model.fusion={fusion}")


@dataclass(frozen=True)
class DistInfo:
    """What an objective may know about the process group.

    ``all_reduce_sum`` returns the element-wise SUM of a tensor over ranks (identity when
    ``world_size == 1``); ``broadcast`` returns rank 0's value of a picklable object.
    """

    rank: int = 0
    world_size: int = 1
    all_reduce_sum: Callable[[Tensor], Tensor] = _identity
    broadcast: Callable[[Any], Any] = _keep


@dataclass
class HeadOutputs:
    """Everything the model computes after its encoders.

    ``unimodal_logits[m]`` is modality m's own prediction (for boosted heads: the
    ensemble sum), ``head_logits[m]`` the individual heads (length 1 unless a head was
    added), ``fused_logits`` the late-fusion prediction.
    """

    unimodal_logits: dict[str, Tensor]  # m -> [B, C]
    fused_logits: Tensor  # [B, C]
    head_logits: dict[str, list[Tensor]]  # m -> K_m+1 tensors [B, C]


@dataclass
class ForwardContext:
    """Per-forward knobs an objective sets before the model runs.

    ``feature_scales[m]`` multiplies modality m's features before fusion (ARM);
    ``fusion_weights[m]`` weights the unimodal logits in the fused prediction (AUG's
    merge alpha). ``None`` means the model's default.
    """

    feature_scales: dict[str, Tensor | float] | None = None
    fusion_weights: dict[str, float] | None = None


@dataclass
class StepInputs:
    features: dict[str, Tensor]  # m -> [B, D_m], part of the autograd graph
    outputs: HeadOutputs
    labels: Tensor  # [B] int64
    step: int  # global optimisation step (identical on every rank)
    epoch: int
    steps_per_epoch: int
    phase: str  # "train" | "eval"
    world: DistInfo = field(default_factory=DistInfo)
    # Re-runs the heads on ``features`` with the current parameters. AUG needs it: the
    # second modality's classifiers are evaluated after the first modality's step.
    recompute_heads: Callable[[], HeadOutputs] | None = None

    @property
    def modalities(self) -> list[str]:
        return list(self.features)


LossValue = Union[Tensor, Callable[[], Tensor]]


@dataclass
class LossGroup:
    """One backward + one optimizer step.

    ``loss`` is a scalar tensor, or a callable producing one when its turn comes (so it can
    read parameters updated by the previous group). ``modalities`` names the modalities the
    group is for (``None``: all).
    """

    loss: LossValue
    # Informational: the engine zeroes grads (set to None) before each group, so a step moves
    # only parameters this loss reaches — the named modality's and any shared head.
    modalities: tuple[str, ...] | None = None

    def value(self) -> Tensor:
        return self.loss() if callable(self.loss) else self.loss


@dataclass
class StepResult:
    losses: list[LossGroup]
    # m -> multiplier on d(loss)/d(features[m]) (ARL's 1 + k_m); applied in this backward.
    grad_multipliers: dict[str, Tensor | float] = field(default_factory=dict)
    # name -> (sum, count), detached; the engine accumulates them over the epoch. The engine reads
    # stats and metrics after every loss group ran, so a lazy loss may still add entries (AUG
    # scores a later modality on the logits its own, lazily computed, loss used).
    stats: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    # name -> detached scalar tensor, for logging (averaged over the epoch's steps). The engine
    # logs ``loss_total`` itself (the sum of the loss groups as they were stepped).
    metrics: dict[str, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class AddHead:
    """Structural change: give modality ``modality`` one more classifier head."""

    modality: str


StructuralChange = AddHead


class Objective(Protocol):
    """What the engine calls. See docs/methods/protocol.md §6 for the lifecycle."""

    name: str
    requirements: ClassVar[Requirements]

    @property
    def trains_new_heads(self) -> bool:
        """Whether the parameters of a head added by an ``AddHead`` join the optimizer. When
        False the engine freezes them (``requires_grad=False``): they still pass gradient to
        the encoder and the shared head, but never hold a ``.grad`` of their own."""

    def bind(self, modalities: list[str], num_classes: int, model_info: dict[str, Any]) -> None:
        """Learn the modality names and check the model has the capabilities needed."""

    def forward_context(self, phase: str, epoch: int) -> ForwardContext:
        """Knobs for the next forward (feature scales, fusion weights)."""

    def step(self, inputs: StepInputs) -> StepResult:
        """Losses, gradient multipliers and statistics for one batch."""

    def on_epoch_end(self, epoch: int, epoch_stats: dict[str, tuple[Tensor, Tensor]], world: DistInfo) -> list[StructuralChange]:
        """Epoch-level decisions from reduced statistics; rank 0 decides, all apply."""

    def epoch_metrics(self) -> dict[str, float]:
        """Diagnostics for the epoch record (scales, coefficients, head counts)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class StatelessObjective:
    """Defaults for objectives without epoch logic or state (composition helper, not a base
    class to override behaviour: objectives only inherit these no-op defaults)."""

    name = "stateless"
    trains_new_heads = True  # no structural changes, so nothing to freeze

    def bind(self, modalities: list[str], num_classes: int, model_info: dict[str, Any]) -> None:
        self.modalities = list(modalities)
        self.num_classes = num_classes

    def forward_context(self, phase: str, epoch: int) -> ForwardContext:
        return ForwardContext()

    def on_epoch_end(self, epoch: int, epoch_stats: dict[str, tuple[Tensor, Tensor]], world: DistInfo) -> list[StructuralChange]:
        return []

    def epoch_metrics(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


def cross_entropy_per_sample(logits: Tensor, labels: Tensor) -> Tensor:
    """[B, C], [B] -> [B]; plain CE kept in one place so every objective uses the same one."""
    return torch.nn.functional.cross_entropy(logits, labels, reduction="none")
