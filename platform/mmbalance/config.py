"""Typed recipes: YAML + ``--set a.b=c`` overrides -> a validated ``Recipe``.

Everything that can be checked without training is checked here, before any Ray call or
data loading: unknown keys (``extra="forbid"`` everywhere, including each encoder's and
objective's own parameters), wrong types, impossible values, names that are not in the
registries, and modalities missing from the shard manifest. Errors name the dotted key
path and the allowed values, so a typo in a 100-trial search fails in a second.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, model_validator

from mmbalance.registry import FUSIONS

# Where a training run executes: in this process, as a Tune trial in its own process, or on
# Ray Train workers (``engine/run_spec.RunSpec.where``).
Where = Literal["local", "tune", "train"]
WandbMode = Literal["online", "offline", "disabled"]


class TrackingConfig(BaseModel):
    """The recipe's ``tracking`` section. ``offline`` by default: it needs no account, and
    a sweep never waits on the network; ``wandb sync`` uploads afterwards."""

    model_config = ConfigDict(extra="forbid")
    wandb: WandbMode = "offline"
    project: str = "mmbalance"
    entity: str | None = None


class ConfigError(ValueError):
    """A recipe or override is invalid; the message lists every offending key path."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


RESERVED_CORRUPTION_KEYS = {"name", "modality", "level", "p"}


def _check_params(params: dict[str, Any]) -> dict[str, Any]:
    clash = RESERVED_CORRUPTION_KEYS & set(params)
    if clash:
        raise ValueError(f"params: {sorted(clash)} are set by the item itself, not in params")
    return params


class _CorruptionItem(_Strict):
    """What a recipe's corruption items share: a ``name`` on a ``modality``, each sample hit
    with probability ``p``, the corruption's own ``params``. Every level's spec is built at
    validation, so a bad name, level or setting fails with the recipe, not in a worker."""

    modality: str
    name: str
    p: float = Field(0.5, ge=0.0, le=1.0, description="probability a sample is corrupted (MNL protocol: 0.5)")
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="the corruption's own settings, e.g. word_replace keep_ids / replacement_id, gaussian pixel_range",
    )

    def _levels(self) -> list[float]:
        raise NotImplementedError

    @model_validator(mode="after")
    def _valid_specs(self):
        _check_params(self.params)
        for level in self._levels():
            self.spec(level)
        return self

    def spec(self, level: float):
        """The validated ``CorruptionSpec`` (``data/corruptions.py``) at ``level``; raises ValueError
        with a short message."""
        return _corruption_spec(self.name, self.params, modality=self.modality, level=level, p=self.p)


class TrainCorruption(_CorruptionItem):
    """One corruption of training batches at one ``level``. Fresh noise every epoch, identical on
    a rerun or resume (``engine/augment.py``); val and test are never corrupted, so selection
    stays clean."""

    level: float

    def _levels(self) -> list[float]:
        return [self.level]

    def spec(self, level: float | None = None):
        return super().spec(self.level if level is None else level)


def _corruption_spec(name: str, params: dict[str, Any], **fields: Any):
    from mmbalance.data.corruptions import CORRUPTIONS, make_spec

    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; allowed: {sorted(CORRUPTIONS)}")
    try:
        return make_spec(name, **params, **fields)
    except ValidationError as err:
        raise ValueError("; ".join(_describe(e, None).replace("Value error, ", "") for e in err.errors())) from None


class DataConfig(_Strict):
    path: str = Field(
        description="shard directory (manifest.json + Parquet files); relative paths are from the working directory"
    )
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    train_corruptions: list[TrainCorruption] = Field(
        default_factory=list, description="corruptions applied, in order, to training batches only (augmentation)"
    )
    modalities: list[str] | None = Field(
        None,
        min_length=1,
        description="train on only these of the recipe's "
        "modalities (e.g. [audio] for a unimodal run); null: all of them",
    )

    @model_validator(mode="after")
    def _val_is_not_test(self) -> "DataConfig":
        # Model selection on the test split is the most common leak in this field.
        if self.val_split == self.test_split:
            raise ValueError(
                f"val_split and test_split are both {self.val_split!r}: model selection must never see the test split"
            )
        if self.train_split in (self.val_split, self.test_split):
            raise ValueError(f"train_split {self.train_split!r} must differ from val_split and test_split")
        return self


class ModalityConfig(_Strict):
    encoder: str
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _known_encoder(self, info: ValidationInfo) -> "ModalityConfig":
        if _shape_only(info):
            return self
        from mmbalance.models.encoders import ENCODERS  # torch: only in the full pass

        if self.encoder not in ENCODERS:
            raise ValueError(f"unknown encoder {self.encoder!r}; allowed: {sorted(ENCODERS)}")
        _validate_nested(ENCODERS[self.encoder].params, self.params, "params")
        return self


class ModelConfig(_Strict):
    fusion: Literal[("auto", *FUSIONS)] = Field(  # type: ignore[valid-type]
        "auto", description="auto: the objective's own fusion (its declared requirements); or one it allows"
    )
    boost_hidden: int = Field(256, ge=1, description="width of AUG's configurable classifiers (fusion=boost only)")
    concat_hidden: int | None = Field(
        None,
        ge=1,
        description="fusion=concat only: width of a linear layer G before "
        "the classifier, F(G[h]) (ARM's official head); null: one linear layer",
    )
    # PDF (docs/methods/pdf.md): defaults are the official code's.
    pdf_hidden: int | None = Field(
        None, ge=1, description="fusion=pdf only: width of the confidence predictors' two hidden layers; null: 2D, D"
    )
    pdf_relu: bool = Field(
        False, description="fusion=pdf only: ReLU between the predictors' layers (official: none, affine then sigmoid)"
    )
    pdf_loss_weight: float = Field(
        1.0, ge=0.0, description="fusion=pdf only: weight of the confidence loss added to every objective's loss"
    )
    pdf_calibration: Literal["eval", "always", "never"] = Field(
        "eval", description="fusion=pdf only: when relative calibration scales the co-beliefs (official: eval only)"
    )
    pdf_detach_features: bool = Field(
        True, description="fusion=pdf only: predictors read detached features, their loss skips the encoders"
    )


class ObjectiveConfig(BaseModel):
    """``name`` picks the objective; every other key is one field of the objective's ``Params`` model."""

    model_config = ConfigDict(extra="allow")
    name: str = "lf"

    @model_validator(mode="after")
    def _known_objective(self, info: ValidationInfo) -> "ObjectiveConfig":
        if _shape_only(info):
            return self
        from mmbalance.objectives import OBJECTIVES  # torch: only in the full pass

        if self.name not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.name!r}; allowed: {sorted(OBJECTIVES)}")
        _validate_nested(OBJECTIVES[self.name].params, self.params, None)
        return self

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class OptimConfig(_Strict):
    name: Literal["sgd", "adam", "adamw"] = "adam"
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="sgd only")
    grad_clip: float | None = Field(None, gt=0.0, description="max global grad norm; null disables clipping")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32",
        description="the model's forward: fp32, or autocast to bf16 / fp16 (fp16 with loss scaling); "
        "objectives always compute in float32 (engine/precision.py)",
    )
    accumulate: int = Field(
        1,
        ge=1,
        description="micro-batches per optimizer step: each rank's batch is split into this many "
        "equal parts, their gradients summed before the step (engine/steps.train_batch)",
    )
    scheduler: Literal["constant", "step", "cosine"] = "constant"
    step_size: int = Field(30, ge=1, description="epochs between decays (scheduler=step)")
    step_gamma: float = Field(0.1, gt=0.0, le=1.0, description="decay factor (scheduler=step)")


class ScheduleConfig(_Strict):
    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1, description="global batch size; each worker gets batch_size // workers")


class EvalCorruption(_CorruptionItem):
    """One robustness sweep of the final evaluation: ``name`` at each of ``levels``."""

    levels: list[float] = Field(min_length=1)

    def _levels(self) -> list[float]:
        return self.levels


class EvalConfig(_Strict):
    batch_size: int = Field(512, ge=1)
    corruptions: list[EvalCorruption] = Field(default_factory=list, description="robustness sweeps on the test split")
    corruption_seed: int = 0


class ScalingConfig(_Strict):
    workers: int = Field(1, ge=1, description="data-parallel workers; 1 runs in-process")
    gpus_per_worker: float = Field(0.0, ge=0.0)
    device: Literal["auto", "cpu", "cuda"] = "auto"


class Recipe(_Strict):
    data: DataConfig
    modalities: dict[str, ModalityConfig] = Field(min_length=1, description="one for a unimodal run (lf only)")
    model: ModelConfig = Field(default_factory=ModelConfig)
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig
    eval: EvalConfig = Field(default_factory=EvalConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    seed: int = 0

    @model_validator(mode="after")
    def _keep_data_modalities(self) -> "Recipe":
        """``data.modalities`` keeps only those modalities (in the recipe's order), and drops the
        sweeps and train corruptions of the others: a study adds the subset to a recipe written
        for all modalities. Runs before the objective's modality count is checked."""
        keep = self.data.modalities
        if keep is None:
            return self
        unknown = [m for m in keep if m not in self.modalities]
        if unknown or len(set(keep)) != len(keep):
            problem = f"{unknown} not in the recipe's modalities" if unknown else f"{keep} repeats a name"
            raise ValueError(f"data.modalities: {problem}; allowed: {sorted(self.modalities)}")
        self.modalities = {m: cfg for m, cfg in self.modalities.items() if m in keep}
        self.data.modalities = list(self.modalities)
        self.eval.corruptions = [c for c in self.eval.corruptions if c.modality in self.modalities]
        self.data.train_corruptions = [c for c in self.data.train_corruptions if c.modality in self.modalities]
        return self

    @model_validator(mode="after")
    def _objective_fits_model(self, info: ValidationInfo) -> "Recipe":
        """``model.fusion: auto`` becomes the objective's own fusion, so the saved config names
        the fusion the run used; an explicit fusion the objective cannot use, or too few
        modalities, fails here rather than when the model is built on a worker."""
        if _shape_only(info):
            return self
        from mmbalance.objectives import OBJECTIVES, objective_requirements

        name = self.objective.name
        if name not in OBJECTIVES:
            return self  # already reported by the objective section
        needs = objective_requirements(name)
        if self.model.fusion == "auto":
            self.model.fusion = needs.default_fusion
        problem = needs.fusion_problem(name, self.model.fusion)
        if problem is not None:
            raise ValueError(problem)
        if len(self.modalities) < needs.min_modalities:
            raise ValueError(
                f"objective.name={name} needs at least {needs.min_modalities} modalities, "
                f"the recipe has {sorted(self.modalities)}"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def _validate_nested(model: type[BaseModel], values: dict[str, Any], prefix: str | None) -> None:
    try:
        model.model_validate(values)
    except ValidationError as err:
        raise ValueError("; ".join(_describe(e, prefix) for e in err.errors())) from None


def _describe(error: dict[str, Any], prefix: str | None) -> str:
    path = ".".join(str(p) for p in ((prefix,) if prefix else ()) + tuple(error["loc"]))
    message = error["msg"].removeprefix("Value error, ")  # pydantic's prefix for a validator's ValueError
    if error["type"] == "extra_forbidden":
        message = "unknown key"
    return f"{path}: {message}" if path else message


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """``set_dotted(cfg, "objective.lam", 0.5)``; intermediate sections are created."""
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: {key!r} is a value, not a section")
        node = child
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``"a.b=c"`` -> ``("a.b", c)`` with ``c`` parsed as YAML (so 0.5, true, [1, 2] work)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} must look like key.path=value")
    return key.strip(), yaml.safe_load(raw) if raw.strip() else None


def read_yaml_mapping(path: str | Path, label: str, hint: str = "") -> dict[str, Any]:
    """A YAML file whose top level is a mapping (recipe, search space, runtime_env), or a
    ConfigError naming ``label`` and the file."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{label} {file} does not exist{hint}")
    tree = yaml.safe_load(file.read_text()) or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{label} {file}: top level must be a mapping, got {type(tree).__name__}")
    return tree


def load_recipe_dict(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    tree = read_yaml_mapping(path, "recipe")
    for item in overrides:
        set_dotted(tree, *parse_override(item))
    return tree


SHAPE_ONLY = {"shape_only": True}
PARAMETERS_CHECKED_NEXT = "(objective and encoder parameters are checked once the errors above are fixed)"


def _shape_only(info: ValidationInfo) -> bool:
    """The first of ``validate_recipe``'s two passes: skip what needs the objective and encoder
    registries (importing them imports torch, over a second on a small machine)."""
    return bool((info.context or {}).get("shape_only"))


def validate_recipe(tree: dict[str, Any], source: str = "recipe") -> Recipe:
    """Two passes: every section's own fields first, without torch, so a typo in any key fails
    in well under a second; then the objective's and encoders' parameters and the objective's
    fit with the model and modalities. Each pass reports all of its errors at once; a failed
    first pass says that the objective and encoders are checked once its errors are fixed, so a
    user is never left thinking those sections were accepted."""
    for context in (SHAPE_ONLY, None):
        try:
            recipe = Recipe.model_validate(tree, context=context)
        except ValidationError as err:
            lines = [_describe(e, None) for e in err.errors()]
            if context is SHAPE_ONLY:
                lines.append(PARAMETERS_CHECKED_NEXT)
            raise ConfigError(f"{source} is invalid:\n  " + "\n  ".join(lines)) from None
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    return validate_recipe(load_recipe_dict(path, overrides), source=str(path))


def check_against_data(recipe: Recipe, manifest: Any) -> None:
    """Recipe vs shard manifest: every modality and split the recipe names must exist."""
    problems = []
    for m in recipe.modalities:
        if m not in manifest.modalities:
            problems.append(
                f"modalities.{m}: not in the data at {recipe.data.path}; allowed: {sorted(manifest.modalities)}"
            )
    for i, sweep in enumerate(recipe.eval.corruptions):
        if sweep.modality not in recipe.modalities:
            problems.append(
                f"eval.corruptions.{i}.modality: {sweep.modality!r} is not a recipe modality; "
                f"allowed: {sorted(recipe.modalities)}"
            )
        elif sweep.modality in manifest.modalities:
            problems += _dtype_problems(
                f"eval.corruptions.{i}", sweep.spec(sweep.levels[0]), manifest.modalities[sweep.modality].dtype
            )
    problems += _train_corruption_problems(recipe, manifest)
    for key in ("train_split", "val_split", "test_split"):
        split = getattr(recipe.data, key)
        if split not in manifest.splits:
            problems.append(f"data.{key}: split {split!r} not in the data; allowed: {sorted(manifest.splits)}")
        elif manifest.splits[split].rows == 0:
            problems.append(f"data.{key}: split {split!r} has no rows")
    problems += _split_size_problems(recipe, manifest)
    if problems:
        raise ConfigError("recipe does not match its data:\n  " + "\n  ".join(problems))


def _split_size_problems(recipe: Recipe, manifest: Any) -> list[str]:
    """Training drops a partial last batch (every step, on every rank, is a full global batch), so a
    train split smaller than one batch would run no step at all."""
    split = manifest.splits.get(recipe.data.train_split)
    batch = recipe.schedule.batch_size
    if split is None or split.rows == 0 or split.rows >= batch:
        return []
    return [
        f"data.train_split: split {recipe.data.train_split!r} has {split.rows} rows, fewer than "
        f"schedule.batch_size={batch}, so no training step would run; set schedule.batch_size to at most {split.rows}"
    ]


def _train_corruption_problems(recipe: Recipe, manifest: Any) -> list[str]:
    """Each ``data.train_corruptions`` item names a recipe modality whose manifest dtype it can corrupt."""
    from mmbalance.data.corruptions import accepts_dtype

    problems = []
    for i, item in enumerate(recipe.data.train_corruptions):
        key = f"data.train_corruptions.{i}"
        if item.modality not in recipe.modalities:
            problems.append(
                f"{key}.modality: {item.modality!r} is not a recipe modality; allowed: {sorted(recipe.modalities)}"
            )
            continue
        dtype = manifest.modalities[item.modality].dtype if item.modality in manifest.modalities else None
        spec = item.spec()
        if dtype is not None and not accepts_dtype(spec, dtype):
            problems.append(
                f"{key}.name: {item.name} cannot corrupt {item.modality!r} of dtype {dtype}; "
                f"it takes {'/'.join(spec.accepts)} (dtype name or numpy kind)"
            )
    return problems


def _dtype_problems(key: str, spec: Any, dtype: str) -> list[str]:
    """An ``eval.corruptions`` item's corruption against its modality's manifest dtype (e.g.
    ``feature_noise`` takes floats only), so a sweep that cannot run fails before training."""
    from mmbalance.data.corruptions import accepts_dtype

    if accepts_dtype(spec, dtype):
        return []
    return [
        f"{key}.name: {spec.name} cannot corrupt {spec.modality!r} of dtype {dtype}; "
        f"it takes {'/'.join(spec.accepts)} (dtype name or numpy kind)"
    ]
