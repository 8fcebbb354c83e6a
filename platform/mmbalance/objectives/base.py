"""The objective protocol shared by LF, MNL, ARM, ARL and AUG (docs/methods/protocol.md §6).

An objective turns one forward pass into loss groups and statistics. It never calls
``backward()``, steps an optimizer, moves tensors between devices or talks to
torch.distributed: the engine does all of that, so the same objective runs in-process,
under DDP and inside a Tune trial. Quantities that feed a decision or a scale are
reduced through ``DistInfo.all_reduce_sum`` (supplied by the engine) as (sum, count)
pairs, never as local means, so every rank takes the same decision.

Declaring an objective: a class with ``name``, ``Params`` (its pydantic parameter model, the one
source of defaults), ``requirements`` and the protocol methods (``StatelessObjective`` supplies
the no-op ones), decorated with ``@register_objective``, in a module of this package. The package
imports every module it holds, so the decorator is all the registration there is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, ClassVar, Protocol, TypeVar, Union

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from mmbalance.registry import FUSIONS, Registered, add_entry


def _identity(tensor: Tensor) -> Tensor:
    return tensor


def _keep(obj: Any) -> Any:
    return obj


@dataclass(frozen=True)
class Requirements:
    """What an objective needs from the recipe, declared once on its class.

    The recipe validator, the engine, the search-space validator, tests and benchmarks all read
    this instead of keeping their own tables, so a new objective states its needs in one place.
    ``fusions`` lists the ``model.fusion`` values whose outputs the objective's math is written
    for; the first is what ``model.fusion: auto`` picks. ``warmup_key`` names the parameter that
    counts baseline-only epochs (ASHA's grace period must cover it). ``min_modalities`` is the
    fewest modalities the objective is defined for (LF trains a single modality alone).
    ``trains_new_heads`` says whether the parameters of a head added by an ``AddHead`` join the
    optimizer: ``True`` / ``False``, or the name of the boolean parameter that decides (AUG's
    ``train_new_heads``). An objective that adds no heads leaves it at ``True``. The engine reads
    it through ``Objective.trains_new_heads``.
    """

    fusions: tuple[str, ...]
    warmup_key: str | None = None
    min_modalities: int = 2
    trains_new_heads: bool | str = True

    def __post_init__(self) -> None:
        unknown = [f for f in self.fusions if f not in FUSIONS]
        if not self.fusions or unknown:
            raise ValueError(f"fusions must be a non-empty subset of {FUSIONS}, got {self.fusions}")
        if not isinstance(self.trains_new_heads, (bool, str)) or self.trains_new_heads == "":
            raise ValueError(f"trains_new_heads must be True, False or a parameter name, got {self.trains_new_heads!r}")

    def new_heads_trained(self, params: BaseModel) -> bool:
        """``trains_new_heads`` resolved against an objective's parameters."""
        if isinstance(self.trains_new_heads, bool):
            return self.trains_new_heads
        return bool(getattr(params, self.trains_new_heads))

    def params_problems(self, params_model: type[BaseModel]) -> list[str]:
        """Parameter names this declaration uses that ``params_model`` lacks (empty: coherent)."""
        keys = {
            "warmup_key": self.warmup_key,
            "trains_new_heads": self.trains_new_heads if isinstance(self.trains_new_heads, str) else None,
        }
        return [
            f"{what}={key!r} is not a parameter of {params_model.__name__}"
            for what, key in keys.items()
            if key is not None and key not in params_model.model_fields
        ]

    @property
    def default_fusion(self) -> str:
        return self.fusions[0]

    def fusion_problem(self, objective: str, fusion: str) -> str | None:
        """None when ``fusion`` fits, else a message naming both recipe keys and the allowed values."""
        if fusion in self.fusions:
            return None
        allowed = ", ".join(self.fusions)
        return (
            f"objective.name={objective} needs model.fusion in [{allowed}] (or auto, which picks "
            f"{self.default_fusion}), got model.fusion={fusion}"
        )


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
    # name -> (labels [B] -> scalar): the fusion's own training losses, which need the labels a
    # forward never sees (PDF's confidence regression). The engine adds them to the first loss
    # group whatever the objective and logs each as ``loss_<name>``; evaluation ignores them.
    auxiliary_losses: dict[str, Callable[[Tensor], Tensor]] = field(default_factory=dict)


@dataclass
class ForwardContext:
    """Per-forward knobs an objective sets before the model runs.

    ``feature_scales[m]`` multiplies modality m's features before fusion (ARM);
    ``fusion_weights[m]`` weights the unimodal logits in the fused prediction (AUG's
    merge alpha); ``fusion_rule`` names how a fusion with several label-free rules combines
    them (``shared``: ``entropy`` per sample, ``entropy_batch`` per batch, for MLA's test-time
    fusion; other fusions have one rule and ignore it), and fixed ``fusion_weights`` take
    precedence over it. ``None`` means the model's default.
    """

    feature_scales: dict[str, Tensor | float] | None = None
    fusion_weights: dict[str, float] | None = None
    fusion_rule: str | None = None


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

    A group may instead carry named ``parts`` (name -> tensor or callable, no ``loss``): the
    engine then backpropagates each part on its own, keeps each part's gradient, sets ``p.grad``
    to their sum and hands the parts to ``perturb_gradients`` as ``ctx.part_grads``, so a method
    that integrates per-objective gradients (MMPareto's Pareto combination) can rewrite ``p.grad``
    from them (docs/methods/protocol.md §6.3). Summing is the default, so an objective that does
    nothing in the hook takes the step of the plain summed loss.
    """

    loss: LossValue | None = None
    # Informational: the engine zeroes grads (set to None) before each group, so a step moves
    # only parameters this loss reaches — the named modality's and any shared head.
    modalities: tuple[str, ...] | None = None
    parts: dict[str, LossValue] | None = None

    def __post_init__(self) -> None:
        if (self.loss is None) == (self.parts is None):
            raise ValueError("a LossGroup takes exactly one of loss or parts")
        if self.parts is not None and not self.parts:
            raise ValueError("a LossGroup's parts must name at least one loss")

    def value(self) -> Tensor:
        """The group's loss; for a parts group, the sum of its parts (evaluating callables)."""
        if self.parts is not None:
            values = [self.part_value(name) for name in self.parts]
            return torch.stack(values).sum()
        return self.loss() if callable(self.loss) else self.loss

    def part_value(self, name: str) -> Tensor:
        part = self.parts[name]
        return part() if callable(part) else part


@dataclass(frozen=True)
class PartGradients:
    """The gradient each part of a ``LossGroup`` left on each parameter, as the hook receives it.

    Each part's gradients are summed over the step's micro-batches and averaged over ranks before
    the hook runs, so every rank holds the part gradients one process computes on the global
    batch, and anything decided from them (cosines, min-norm weights, norm ratios) is the same on
    every rank. ``names`` keeps the group's part order. A parameter a part did not reach has no
    entry for that part. Read-only for the hook: it writes ``p.grad``.
    """

    names: tuple[str, ...]
    grads: dict[str, dict[int, Tensor]]  # part -> id(parameter) -> gradient

    def of(self, part: str, param: nn.Parameter) -> Tensor | None:
        """``part``'s gradient on ``param`` (None where the part did not reach it)."""
        return self.grads[part].get(id(param))

    def flat(self, part: str, params: list[nn.Parameter]) -> Tensor:
        """``params``' gradients from ``part`` as one vector, zeros where the part did not reach."""
        grads = [self.of(part, p) for p in params]
        return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads)])


@dataclass
class StepResult:
    losses: list[LossGroup]
    # m -> multiplier on d(loss)/d(features[m]) (ARL's 1 + k_m); applied in the first group's
    # backward (in each of its parts' backwards when it has parts).
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


@dataclass(frozen=True)
class ParameterGroups:
    """The model's parameters by role, for ``perturb_gradients``; each parameter is in one list.

    ``encoders[m]``: modality m's encoder. ``heads[m]``: the classifier layers only modality m's
    logits use (mean/sum: its linear head; boost: its ``A_m^k``, added heads included; concat:
    none; shared: its width adapter, none when the widths match). ``shared``: what every
    modality's logits pass through (the concat head and its ``G``, boost's ``F``, the shared
    fusion's one head). A parameter's ``grad`` is None when this loss group did not reach it.
    """

    encoders: dict[str, list[nn.Parameter]]
    heads: dict[str, list[nn.Parameter]]
    shared: list[nn.Parameter]

    def modality(self, m: str) -> list[nn.Parameter]:
        """Encoder and own heads of modality ``m``."""
        return [*self.encoders[m], *self.heads[m]]

    def all(self) -> list[nn.Parameter]:
        return [*(p for m in self.encoders for p in self.modality(m)), *self.shared]


@dataclass
class GradientContext:
    """What ``perturb_gradients`` receives for one loss group, after the cross-rank average.

    ``seed`` is the same on every rank for a given (recipe seed, global step, group index), and so
    is every draw from ``generator`` (a ``torch.Generator`` on the model's device, built on first
    use from ``seed``): noise drawn from it is identical across ranks. ``params`` groups the
    parameters by modality (built on first use). ``result`` is this batch's ``StepResult`` (its
    ``stats`` / ``metrics`` carry what ``step`` measured, e.g. per-modality scores).
    ``part_grads`` is set for a group with ``parts``: each part's rank-averaged gradient, while
    ``p.grad`` holds their sum (None for a plain group).
    """

    group: LossGroup
    group_index: int
    result: StepResult
    step: int
    epoch: int
    world: DistInfo
    seed: int
    device: torch.device
    collect_params: Callable[[], ParameterGroups]
    part_grads: PartGradients | None = None

    @cached_property
    def params(self) -> ParameterGroups:
        return self.collect_params()

    @cached_property
    def generator(self) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(self.seed)


class Objective(Protocol):
    """What the engine calls. See docs/methods/protocol.md §6 for the lifecycle."""

    name: str
    Params: ClassVar[type[BaseModel]]  # the parameter model: validation and the only defaults
    requirements: ClassVar[Requirements]
    params: BaseModel  # the validated parameters this instance was built with

    @property
    def trains_new_heads(self) -> bool:
        """Whether the parameters of a head added by an ``AddHead`` join the optimizer. When
        False the engine freezes them (``requires_grad=False``): they still pass gradient to
        the encoder and the shared head, but never hold a ``.grad`` of their own. Declared by
        ``requirements.trains_new_heads`` (``StatelessObjective`` resolves it)."""

    def bind(self, modalities: list[str], num_classes: int, model_info: dict[str, Any]) -> None:
        """Learn the modality names and check the model has the capabilities needed."""

    def forward_context(self, phase: str, epoch: int) -> ForwardContext:
        """Knobs for the next forward (feature scales, fusion weights)."""

    def step(self, inputs: StepInputs) -> StepResult:
        """Losses, gradient multipliers and statistics for one batch."""

    def perturb_gradients(self, ctx: GradientContext) -> None:
        """Change this loss group's parameter gradients in place (``p.grad``) before they are
        clipped and stepped: the slot for gradient-modulation methods (OGM-GE scales the
        dominant modality's encoder gradients by a coefficient and adds Gaussian noise; any
        per-parameter-group scaling). ``StatelessObjective``'s default does nothing.

        The engine calls it once per loss group, after that group's backward and after the
        gradients were averaged over ranks, then clips and steps. It sits after the average
        because only there does every rank hold the same gradient, the one a single process
        computes on the global batch: a coefficient read off gradients (norms, ratios) is the
        same on every rank, and noise drawn from ``ctx.generator`` (seeded alike on every rank)
        is added once and identically, so the ranks' parameters stay equal and the data-parallel
        step is still the single-process step. Before the average a rank sees only its local
        gradient, and independent per-rank noise would be averaged down (its variance divided by
        the number of workers), so the result would depend on the worker count. It sits before
        clipping so the clip bounds what is actually stepped. A parameter whose ``grad`` is None
        takes no step: leave it None.

        For a group with ``parts`` the hook is also where the parts are combined: ``p.grad`` arrives
        as the sum of the parts' gradients and ``ctx.part_grads`` holds each part's own (both
        rank-averaged); the hook may overwrite ``p.grad`` with any combination of them.
        """

    def on_epoch_end(
        self, epoch: int, epoch_stats: dict[str, tuple[Tensor, Tensor]], world: DistInfo
    ) -> list[StructuralChange]:
        """Epoch-level decisions from reduced statistics; rank 0 decides, all apply."""

    def epoch_metrics(self) -> dict[str, float]:
        """Diagnostics for the epoch record (scales, coefficients, head counts)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class NoParams(BaseModel):
    """The parameter model of an objective without parameters."""

    model_config = ConfigDict(extra="forbid")


P = TypeVar("P", bound=BaseModel)


def params_or_defaults(cls: type, params: P | None) -> P:
    """``params`` if it is an instance of ``cls.Params``, ``cls.Params()`` (the defaults) for None."""
    model = cls.Params
    if params is None:
        return model()
    if not isinstance(params, model):
        raise TypeError(
            f"{cls.__name__} takes a {model.__name__} (or None for its defaults), got "
            f"{type(params).__name__}; build_objective(name, {{...}}) validates a dict"
        )
    return params


class StatelessObjective:
    """Defaults for objectives: the constructor (``cls(params)``, None -> ``cls.Params()``) and
    no-op epoch logic, state and gradient hook (composition helper, not a base class to override
    behaviour: objectives only inherit these defaults)."""

    name = "stateless"
    Params: ClassVar[type[BaseModel]] = NoParams
    # Named variants (label -> recipe overrides, e.g. the official code's behaviour where it
    # differs from the default); bench/effects.py runs each next to the default.
    variants: ClassVar[dict[str, tuple[str, ...]]] = {}

    def __init__(self, params: BaseModel | None = None):
        self.params = params_or_defaults(type(self), params)

    @property
    def trains_new_heads(self) -> bool:
        """Whether an added head's parameters join the optimizer, from ``requirements``."""
        return self.requirements.new_heads_trained(self.params)

    def bind(self, modalities: list[str], num_classes: int, model_info: dict[str, Any]) -> None:
        self.modalities = list(modalities)
        self.num_classes = num_classes

    def forward_context(self, phase: str, epoch: int) -> ForwardContext:
        return ForwardContext()

    def on_epoch_end(
        self, epoch: int, epoch_stats: dict[str, tuple[Tensor, Tensor]], world: DistInfo
    ) -> list[StructuralChange]:
        return []

    def epoch_metrics(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None

    def perturb_gradients(self, ctx: GradientContext) -> None:
        """No gradient modulation (see ``Objective.perturb_gradients`` for where it runs)."""
        return None


class LastEpochMetrics:
    """Mixin for an objective whose only state is its last epoch's diagnostics
    (``self._epoch_metrics``, set in ``on_epoch_end``): kept in the checkpoint, so a resumed run
    logs the same epoch record as an uninterrupted one. Put it before ``StatelessObjective``."""

    _epoch_metrics: dict[str, float]

    def epoch_metrics(self) -> dict[str, float]:
        return dict(getattr(self, "_epoch_metrics", {}))

    def state_dict(self) -> dict[str, Any]:
        return {"epoch_metrics": self.epoch_metrics()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._epoch_metrics = dict(state.get("epoch_metrics", {}))


# name -> Registered(class, Params), filled by ``register_objective`` as each module of the
# package is imported (``mmbalance.objectives`` imports them all); read it from there.
OBJECTIVES: dict[str, Registered] = {}

_PROTOCOL_METHODS = (
    "bind",
    "forward_context",
    "step",
    "on_epoch_end",
    "epoch_metrics",
    "state_dict",
    "load_state_dict",
    "perturb_gradients",
)
ObjectiveClass = TypeVar("ObjectiveClass", bound=type)


def register_objective(cls: ObjectiveClass) -> ObjectiveClass:
    """Class decorator: list ``cls`` in ``OBJECTIVES`` under ``cls.name`` with ``cls.Params``.

    Checks the declaration at import time, so a misdeclared objective fails at once with its
    name: ``name`` an identifier not already taken, ``Params`` a pydantic model that forbids
    unknown keys and whose defaults validate, ``requirements`` a ``Requirements`` naming only
    parameters ``Params`` has, and every protocol method present.
    """
    name, params, needs = getattr(cls, "name", None), getattr(cls, "Params", None), getattr(cls, "requirements", None)
    problems = []
    if not (isinstance(params, type) and issubclass(params, BaseModel)):
        problems.append(f"Params must be a pydantic model class, got {params!r}")
    elif params.model_config.get("extra") != "forbid":
        problems.append(
            f"{params.__name__} must set model_config = ConfigDict(extra='forbid') (unknown recipe keys are errors)"
        )
    else:
        try:
            params()
        except ValueError as err:  # pydantic's ValidationError
            problems.append(f"{params.__name__}() must validate (every field needs a default): {err}")
    if not isinstance(needs, Requirements):
        problems.append("requirements must be a Requirements(...) class attribute")
    elif not problems:
        problems += needs.params_problems(params)
    problems += [f"missing protocol method {m}()" for m in _PROTOCOL_METHODS if not callable(getattr(cls, m, None))]
    if not problems:
        problems += _variant_problems(getattr(cls, "variants", {}), params)
    if problems:
        raise TypeError(f"objective {cls.__module__}.{cls.__qualname__} (name={name!r}): " + "; ".join(problems))
    add_entry(OBJECTIVES, name, Registered(cls, params), "objective")
    return cls


def _variant_problems(variants: Any, params: type[BaseModel]) -> list[str]:
    """Each variant must be label -> "section.key=value" overrides whose ``objective.*`` keys
    are fields of ``Params`` (other sections are checked when a recipe is built from them)."""
    if not isinstance(variants, dict):
        return [f"variants must be a dict of label -> overrides, got {type(variants).__name__}"]
    problems = []
    for label, overrides in variants.items():
        if isinstance(overrides, str) or not all(isinstance(o, str) and "=" in o for o in overrides):
            problems.append(f"variant {label!r} must be a tuple of 'section.key=value' strings")
            continue
        for key in (o.split("=", 1)[0].strip() for o in overrides):
            section, _, field_name = key.partition(".")
            if section == "objective" and field_name not in params.model_fields and field_name != "name":
                problems.append(f"variant {label!r}: {key} is not a parameter of {params.__name__}")
    return problems


def cross_entropy_per_sample(logits: Tensor, labels: Tensor) -> Tensor:
    """[B, C], [B] -> [B]; plain CE kept in one place so every objective uses the same one."""
    return torch.nn.functional.cross_entropy(logits, labels, reduction="none")


def entropy_per_sample(logits: Tensor) -> Tensor:
    """[..., C] -> [...]: entropy of ``softmax(logits)`` over the last axis, from the log-softmax
    (finite where a probability underflows to 0, where ``p * log p`` would give NaN); one place,
    as for the cross-entropy."""
    log_p = logits.log_softmax(dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1)
