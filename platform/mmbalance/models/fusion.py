"""Late-fusion classifier: per-modality encoders, per-modality logits and fused logits.

The model returns its outputs and stores none of them, so objectives and tests can use it
alone. Fusion variants (``model.fusion`` in a recipe):

- ``mean`` / ``sum``: one linear head per modality, ``z_f`` = mean / sum of the ``z_m``
  (MNL's LF; weights overridable per forward, e.g. AUG's merge alpha);
- ``concat``: one shared linear head on ``[h_1; ...; h_M]``; ``z_m`` zeroes the other
  modalities' slots, so ``z_f = sum_m z_m - (M-1) b`` (ARL's auxiliary heads). With
  ``concat_hidden`` the head is two linear layers ``F(G [h_1; ...; h_M])`` (ARM's official
  head: G 2D->D, then F), still affine, so the same identity holds with ``b = F b_G + b_F``;
- ``boost``: AUG's configurable classifiers ``F(ReLU(A_m^k h_m))`` with a head ``F`` shared by
  every modality and classifier; ``z_m`` is the ensemble sum and heads can be added;
- ``pdf``: the ``mean`` heads with PDF's per-sample weights ``z_f = sum_m w_m z_m`` from predicted
  confidences (``pdf_fusion.py``); its confidence loss rides on ``HeadOutputs.auxiliary_losses``;
- ``shared``: MLA's one head ``z_m = W h_m + b`` for every modality, ``z_f`` the uncertainty-weighted
  sum of the ``z_m`` under ``ctx.fusion_rule`` (``shared_head.py``; fixed ``fusion_weights`` win).

Every variant multiplies ``h_m`` by ``ctx.feature_scales[m]`` before the heads (ARM).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from mmbalance.models.pdf_fusion import PredictiveDynamicFusion
from mmbalance.models.shared_head import adapters, shared_fuse
from mmbalance.objectives.base import ForwardContext, HeadOutputs

Fusion = Literal["mean", "sum", "concat", "boost", "pdf", "shared"]


class LateFusion(nn.Module):
    def __init__(
        self,
        encoders: dict[str, nn.Module],
        num_classes: int,
        fusion: Fusion = "mean",
        boost_hidden: int = 256,
        concat_hidden: int | None = None,
        pdf_options: dict | None = None,
    ):
        super().__init__()
        if not encoders:
            raise ValueError("late fusion needs at least one modality")  # one: a unimodal run
        self.modalities = list(encoders)
        self.encoders = nn.ModuleDict(encoders)
        self.num_classes = num_classes
        self.fusion = fusion
        dims = {m: enc.out_dim for m, enc in encoders.items()}
        self.dims = dims
        if fusion in ("mean", "sum", "pdf"):
            self.heads = nn.ModuleDict({m: nn.ModuleList([nn.Linear(d, num_classes)]) for m, d in dims.items()})
            if fusion == "pdf":  # keyword arguments of PredictiveDynamicFusion (model.pdf_* keys)
                self.pdf = PredictiveDynamicFusion(dims, **(pdf_options or {}))
        elif fusion == "concat":
            width = concat_hidden or sum(dims.values())
            # G: the optional linear layer before the classifier (no nonlinearity between them).
            self.fusion_layer = nn.Linear(sum(dims.values()), concat_hidden) if concat_hidden else None
            self.shared_head = nn.Linear(width, num_classes)
        elif fusion == "boost":
            self.boost_hidden = boost_hidden
            self.shared_head = nn.Linear(boost_hidden, num_classes)
            self.heads = nn.ModuleDict({m: nn.ModuleList([nn.Linear(d, boost_hidden)]) for m, d in dims.items()})
        elif fusion == "shared":
            # heads[m]: modality m's own adapter onto the common width (identity when it matches).
            self.heads = adapters(dims)
            self.shared_head = nn.Linear(max(dims.values()), num_classes)
        else:
            raise ValueError(f"unknown fusion {fusion!r}; allowed: mean, sum, concat, boost, pdf, shared")

    # -- capabilities (docs/methods/protocol.md §6.1), read by objectives in ``bind`` -----------------
    @property
    def info(self) -> dict:
        return {
            "fusion": self.fusion,
            "supports_feature_scales": True,
            "supports_zero_out_unimodal": self.fusion == "concat",
            "supports_add_head": self.fusion == "boost",
            "shared_head": self.fusion in ("concat", "boost", "shared"),
            "feature_dims": dict(self.dims),
        }

    def encode(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return {m: self.encoders[m](batch[m]) for m in self.modalities}  # m -> [B, D_m]

    def heads_forward(self, features: dict[str, Tensor], ctx: ForwardContext | None = None) -> HeadOutputs:
        ctx = ctx or ForwardContext()
        scales = ctx.feature_scales or {}
        h = {m: features[m] * scales[m] if m in scales else features[m] for m in self.modalities}
        if self.fusion == "concat":
            head_logits = self._concat_unimodal(h)
        elif self.fusion == "boost":
            head_logits = {
                m: [self.shared_head(torch.relu(layer(h[m]))) for layer in self.heads[m]] for m in self.modalities
            }
        elif self.fusion == "shared":
            head_logits = {m: [self.shared_head(self.heads[m](h[m]))] for m in self.modalities}
        else:
            head_logits = {m: [self.heads[m][0](h[m])] for m in self.modalities}
        unimodal = {m: torch.stack(zs).sum(0) if len(zs) > 1 else zs[0] for m, zs in head_logits.items()}
        if self.fusion == "pdf" and ctx.fusion_weights is None:
            fused, _, conf = self.pdf(h, unimodal)  # [B, C], [M, B] weights, [M, B] confidences
            losses = {"pdf_confidence": lambda labels: self.pdf.loss(conf, unimodal, labels)}
            return HeadOutputs(unimodal, fused, head_logits, auxiliary_losses=losses)
        if self.fusion == "shared" and ctx.fusion_weights is None:
            fused = shared_fuse(unimodal, ctx.fusion_rule or "entropy")
            return HeadOutputs(unimodal_logits=unimodal, fused_logits=fused, head_logits=head_logits)
        fused = self._fuse(unimodal, ctx.fusion_weights)
        return HeadOutputs(unimodal_logits=unimodal, fused_logits=fused, head_logits=head_logits)

    def forward(
        self, batch: dict[str, Tensor], ctx: ForwardContext | None = None
    ) -> tuple[dict[str, Tensor], HeadOutputs]:
        features = self.encode(batch)
        return features, self.heads_forward(features, ctx)

    def _concat_unimodal(self, h: dict[str, Tensor]) -> dict[str, list[Tensor]]:
        # W[h_1; ...; h_M] + b with the other slots zeroed == W_m h_m + b (no extra parameters);
        # with G, W = F G and b = F b_G + b_F (the head stays affine).
        first = self.fusion_layer or self.shared_head
        out, start = {}, 0
        for m in self.modalities:
            stop = start + self.dims[m]
            part = h[m] @ first.weight[:, start:stop].T + first.bias  # [B, C] or [B, hidden]
            out[m] = [self.shared_head(part) if self.fusion_layer is not None else part]  # [B, C]
            start = stop
        return out

    def concat_bias(self) -> Tensor:
        """The constant every concat zero-out logit carries: ``b`` (or ``F b_G + b_F``), [C]."""
        if self.fusion_layer is None:
            return self.shared_head.bias
        return self.shared_head(self.fusion_layer.bias)

    def _fuse(self, unimodal: dict[str, Tensor], weights: dict[str, float] | None) -> Tensor:
        if weights is not None:
            return sum(weights[m] * unimodal[m] for m in self.modalities)
        total = torch.stack([unimodal[m] for m in self.modalities]).sum(0)  # [B, C]
        if self.fusion == "mean":
            return total / len(self.modalities)
        if self.fusion == "concat":
            return total - (len(self.modalities) - 1) * self.concat_bias()
        return total

    def add_head(self, modality: str) -> list[nn.Parameter]:
        """AUG: append one configurable classifier ``A_m^k`` (Xavier-normal, bias 0) and return
        its parameters so the engine can give them to the optimizer."""
        if self.fusion != "boost":
            raise RuntimeError(f"add_head needs model.fusion=boost, the model has {self.fusion!r}")
        ref = self.heads[modality][0].weight
        layer = nn.Linear(self.dims[modality], self.boost_hidden).to(device=ref.device, dtype=ref.dtype)
        nn.init.xavier_normal_(layer.weight)
        nn.init.zeros_(layer.bias)
        self.heads[modality].append(layer)
        return list(layer.parameters())

    def head_counts(self) -> dict[str, int]:
        if self.fusion in ("mean", "sum", "boost", "pdf"):
            return {m: len(self.heads[m]) for m in self.modalities}
        return {m: 1 for m in self.modalities}
