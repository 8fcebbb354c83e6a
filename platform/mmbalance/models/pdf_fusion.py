"""PDF: Predictive Dynamic Fusion (Cao et al., ICML 2024), the per-sample weighting of late fusion.

Official code: github.com/Yinan-Xia/PDF at commit 8648674 (``src/models/latefusion_pdf.py``,
``train_pdf.py``, ``test_pdf.py``); docs/methods/pdf.md has the spec and the differences.

Each modality gets a confidence predictor that regresses its own true-class probability
(mono-confidence ``c_m``) from its encoder feature. The other modalities' confidences give the
holo-confidence ``H_m = sum_{j != m} log c_j / (sum_j log c_j + 1e-8)``; the co-belief
``c_m + H_m``, optionally scaled by the relative calibration ``DU_m / max_j DU_j`` (distribution
uniformity of each modality's softmax), is turned into weights by a softmax over modalities, and
``z_f = sum_m w_m z_m``. The weights are constants for the classification loss (detached, as
in the official code), so the predictors learn only from their own regression loss, which the
engine adds to every objective's loss through ``HeadOutputs.auxiliary_losses``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

Calibration = Literal["eval", "always", "never"]
HOLO_EPS = 1e-8  # the official denominator offset: sum_j log c_j is <= 0 and 0 when every c_j = 1


def holo_confidence(conf: Tensor) -> Tensor:
    """[M, B] mono-confidences -> [M, B] holo-confidences: the others' log-confidence over the
    total. With two modalities this is the official ``log c_other / (log(c_t c_v) + 1e-8)``."""
    # A confidence that underflowed to exactly 0 would make the official formula inf / inf (the
    # NaN its README warns about); the floor changes no value the official code computes finitely.
    logs = conf.clamp_min(torch.finfo(conf.dtype).tiny).log()  # [M, B]
    total = logs.sum(0, keepdim=True)  # [1, B]
    return (total - logs) / (total + HOLO_EPS)


def distribution_uniformity(logits: Tensor) -> Tensor:
    """[M, B, C] logits -> [M, B]: mean over classes of |softmax - 1/C| (0 for a uniform
    prediction; larger means a more decided one)."""
    probs = logits.softmax(-1)
    return (probs - 1.0 / logits.shape[-1]).abs().mean(-1)


def relative_calibration(uniformity: Tensor) -> Tensor:
    """[M, B] -> [M, B]: ``DU_m / max_j DU_j``, so the most decided modality keeps its co-belief
    and the others shrink. The official two-modality rule (1 for the larger, the ratio for the
    smaller, 1 for both on a tie) is this with M = 2. Where every DU is 0 all factors are 1."""
    top = uniformity.max(0, keepdim=True).values  # [1, B]
    return torch.where(top > 0, uniformity / top.clamp_min(torch.finfo(uniformity.dtype).tiny), 1.0)


def fusion_weights(conf: Tensor, unimodal: Tensor, calibrate: bool) -> Tensor:
    """[M, B] mono-confidences, [M, B, C] logits -> [M, B] weights (softmax over modalities),
    detached: the classification loss does not train the confidence predictors."""
    conf, unimodal = conf.detach().float(), unimodal.detach().float()
    belief = conf + holo_confidence(conf)  # [M, B], the co-belief
    if calibrate:
        belief = belief * relative_calibration(distribution_uniformity(unimodal))
    return belief.softmax(0)


def confidence_loss(conf: Tensor, unimodal: Tensor, labels: Tensor) -> Tensor:
    """Sum over modalities of the batch-mean |c_m - p_m(y)| (official: ``nn.L1Loss`` per
    modality, summed), with the true-class probability ``p_m(y)`` detached as the target."""
    target = unimodal.detach().float().softmax(-1)  # [M, B, C]
    index = labels.view(1, -1, 1).expand(target.shape[0], -1, 1)  # [M, B, 1]
    tcp = target.gather(-1, index).squeeze(-1)  # [M, B]
    return (conf.float() - tcp).abs().mean(-1).sum()


class ConfidencePredictor(nn.Module):
    """``D -> 2D -> D -> 1`` linear layers and a sigmoid (official ConfidNet; no nonlinearity
    between the layers, so the map is affine before the sigmoid). ``hidden`` replaces the widths
    by ``hidden -> hidden``; ``activation`` puts a ReLU between the layers."""

    def __init__(self, dim: int, hidden: int | None = None, activation: bool = False):
        super().__init__()
        widths = [dim, 2 * dim, dim] if hidden is None else [dim, hidden, hidden]
        layers: list[nn.Module] = []
        for width_in, width_out in zip(widths, widths[1:]):
            layers += [nn.Linear(width_in, width_out), *([nn.ReLU()] if activation else [])]
        self.net = nn.Sequential(*layers, nn.Linear(widths[-1], 1), nn.Sigmoid())

    def forward(self, features: Tensor) -> Tensor:
        return self.net(features).squeeze(-1)  # [B]


class PredictiveDynamicFusion(nn.Module):
    """The confidence predictors and the weighting. ``calibration``: when the relative
    calibration applies (``eval``: official, in eval mode only; ``always``; ``never``).
    ``detach_features``: the predictors read detached encoder features (official), so their
    loss never reaches the encoders."""

    def __init__(
        self,
        dims: dict[str, int],
        hidden: int | None = None,
        activation: bool = False,
        loss_weight: float = 1.0,
        calibration: Calibration = "eval",
        detach_features: bool = True,
    ):
        super().__init__()
        if calibration not in ("eval", "always", "never"):
            raise ValueError(f"unknown pdf calibration {calibration!r}; allowed: eval, always, never")
        self.predictors = nn.ModuleDict({m: ConfidencePredictor(d, hidden, activation) for m, d in dims.items()})
        self.loss_weight = loss_weight
        self.calibration = calibration
        self.detach_features = detach_features

    def forward(self, h: dict[str, Tensor], unimodal: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """-> (fused logits [B, C], weights [M, B], mono-confidences [M, B]), modalities in
        ``h``'s order."""
        names = list(h)
        conf = torch.stack(
            [self.predictors[m](h[m].detach() if self.detach_features else h[m]) for m in names]
        )  # [M, B]
        z = torch.stack([unimodal[m] for m in names])  # [M, B, C]
        calibrate = self.calibration == "always" or (self.calibration == "eval" and not self.training)
        weights = fusion_weights(conf, z, calibrate)  # [M, B]
        fused = (weights.to(z.dtype).unsqueeze(-1) * z).sum(0)  # [B, C], in the logits' dtype
        return fused, weights, conf

    def loss(self, conf: Tensor, unimodal: dict[str, Tensor], labels: Tensor) -> Tensor:
        z = torch.stack(list(unimodal.values()))  # [M, B, C]
        return self.loss_weight * confidence_loss(conf, z, labels)


__all__ = [
    "ConfidencePredictor",
    "PredictiveDynamicFusion",
    "confidence_loss",
    "distribution_uniformity",
    "fusion_weights",
    "holo_confidence",
    "relative_calibration",
]
