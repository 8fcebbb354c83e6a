"""Recipe + manifest -> model, objective, optimizer, scheduler.

Values derived at run time come from code, never from the recipe: the number of classes and
the input shapes from the shard manifest, the optimizer's parameters from the model.
"""

from __future__ import annotations

import torch
from torch import nn

from mmbalance.config import OptimConfig, Recipe
from mmbalance.data.manifest import Manifest
from mmbalance.models import LateFusion, build_encoder
from mmbalance.models.normalize import NormalizedEncoder
from mmbalance.objectives import Objective, build_objective


def build_model(recipe: Recipe, manifest: Manifest) -> LateFusion:
    encoders = {m: _encoder(m, cfg, manifest) for m, cfg in recipe.modalities.items()}
    return LateFusion(
        encoders,
        manifest.num_classes,
        fusion=recipe.model.fusion,
        boost_hidden=recipe.model.boost_hidden,
        concat_hidden=recipe.model.concat_hidden,
        pdf_options=_pdf_options(recipe),
    )


def _pdf_options(recipe: Recipe) -> dict:
    """The ``model.pdf_*`` keys as PredictiveDynamicFusion's keyword arguments."""
    m = recipe.model
    return {
        "hidden": m.pdf_hidden,
        "activation": m.pdf_relu,
        "loss_weight": m.pdf_loss_weight,
        "calibration": m.pdf_calibration,
        "detach_features": m.pdf_detach_features,
    }


def _encoder(modality: str, cfg, manifest: Manifest) -> nn.Module:
    spec = manifest.modalities[modality]
    encoder = build_encoder(cfg.encoder, cfg.params, tuple(spec.shape))
    if spec.normalize is None:
        return encoder
    norm = spec.normalize
    return NormalizedEncoder(encoder, tuple(spec.shape), norm.mean, norm.std, norm.axis)


def build_bound_objective(recipe: Recipe, model: LateFusion) -> Objective:
    objective = build_objective(recipe.objective.name, recipe.objective.params)
    # A validated recipe never gets here with a misfit; this guards direct (programmatic) use,
    # from the same declaration the recipe validator reads.
    needs = objective.requirements
    problem = needs.fusion_problem(recipe.objective.name, model.fusion)
    if problem is not None:
        raise ValueError(problem)
    if len(model.modalities) < needs.min_modalities:
        raise ValueError(
            f"objective.name={recipe.objective.name} needs at least {needs.min_modalities} modalities, "
            f"the model has {list(model.modalities)}"
        )
    objective.bind(list(model.modalities), model.num_classes, model.info)
    return objective


def load_model_state(model: LateFusion, objective: Objective, state: dict, on_new_head=None) -> None:
    """Grow the model to the saved head counts (AUG adds heads mid-run), then load weights and
    objective state. ``on_new_head(params)`` sees each added head's parameters."""
    for m, count in state["head_counts"].items():
        while model.head_counts()[m] < count:
            params = model.add_head(m)
            if on_new_head is not None:
                on_new_head(params)
    model.load_state_dict(state["model"])
    objective.load_state_dict(state["objective"])


def build_optimizer(cfg: OptimConfig, params) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_scheduler(cfg: OptimConfig, optimizer: torch.optim.Optimizer, epochs: int):
    """Stepped once per epoch, after validation."""
    if cfg.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.step_gamma)
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def add_param_group(optimizer: torch.optim.Optimizer, scheduler, params: list[nn.Parameter]) -> None:
    """Give new parameters (AUG heads) to the optimizer at the current lr with fresh state,
    and tell the scheduler, whose per-group base lrs were fixed at construction."""
    template = optimizer.param_groups[0]
    group = {k: v for k, v in template.items() if k != "params"}
    optimizer.add_param_group({"params": params, **group})
    base = template.get("initial_lr", template["lr"])
    optimizer.param_groups[-1]["initial_lr"] = base
    scheduler.base_lrs.append(base)


def resolve_device(preference: str) -> torch.device:
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("scaling.device=cuda but no CUDA device is visible")
        return torch.device("cuda")
    return torch.device("cpu")
