"""The ``shared`` fusion: one classifier applied to every modality's features (MLA, docs/methods/mla.md).

MLA trains each modality in turn through the same linear head, so cross-modal knowledge can only
live in that head; ``z_m = W h_m + b`` for every modality ``m``. The fused prediction is a
weighted sum of the unimodal logits whose weights come from how unsure each modality is, so no
fusion parameter is ever trained:

- ``entropy`` (the paper's rule, the default): per sample ``i``, ``H_i^m`` is the entropy of
  ``softmax(z_m[i])`` and ``w_i^m = exp(max_k H_i^k - H_i^m) / sum_j exp(max_k H_i^k - H_i^j)``,
  i.e. a softmax over modalities of ``-H_i^m``: the more certain modality counts more;
- ``entropy_batch`` (the official code's ``calculate_entropy``): the softmax is taken over the
  batch axis and the entropy summed over the whole ``[B, C]`` tensor, so each modality gets one
  weight per batch and a sample's fused prediction depends on the batch it was scored in.

Fixed weights (the official "fixed fusion") need no rule here: ``ForwardContext.fusion_weights``.
The weights are detached: they are a test-time rule, and a loss on the fused logits (LF on this
fusion) trains the logits, not the rule.

Widths: the head takes one input width. Where the encoders' ``out_dim`` differ, each narrower
modality gets its own linear adapter onto the widest width (a modality-specific layer, grouped
with that modality's head parameters); where they match, no adapter exists. MLA itself needs
equal widths (its projector lives in the head's input space) and says so when it binds.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mmbalance.objectives.base import entropy_per_sample

SHARED_RULES = ("entropy", "entropy_batch")


def adapters(dims: dict[str, int]) -> nn.ModuleDict:
    """Per-modality maps onto the widest feature width: identity where the width already matches."""
    width = max(dims.values())
    return nn.ModuleDict({m: nn.Identity() if d == width else nn.Linear(d, width) for m, d in dims.items()})


def sample_entropy(logits: Tensor) -> Tensor:
    """[..., B, C] -> [..., B]: entropy of the softmax over classes, from log-softmax (finite even
    where a probability underflows to 0, where ``p * log p`` would give NaN)."""
    return entropy_per_sample(logits.float())


def entropy_weights(logits: Tensor) -> Tensor:
    """[M, B, C] unimodal logits -> [M, B] per-sample weights ``softmax_m(-H_i^m)`` (the paper's rule).

    ``exp(max H - H_m) / sum_j exp(max H - H_j)`` is the same softmax with the maximum subtracted
    for stability; with ``exp(-H) = prod_c p_c^{p_c}``, two modalities with ``p_a = (1/2, 1/2)`` and
    ``p_v = (3/4, 1/4)`` get ``w_a = 0.5 / (0.5 + 0.75^0.75 * 0.25^0.25) = 0.467344``.
    """
    return (-sample_entropy(logits.detach())).softmax(dim=0)


def batch_entropy_weights(logits: Tensor) -> Tensor:
    """[M, B, C] -> [M] one weight per modality per batch: the official code's rule, which takes the
    softmax over the batch axis (``dim=0`` of each ``[B, C]``) and sums ``-p log p`` over the whole
    tensor before the same softmax over modalities."""
    log_p = logits.detach().float().log_softmax(dim=1)  # over the batch axis of each [B, C]
    entropy = -(log_p.exp() * log_p).sum(dim=(1, 2))  # [M]
    return (-entropy).softmax(dim=0)


def shared_fuse(unimodal: dict[str, Tensor], rule: str) -> Tensor:
    """{m: [B, C]} -> [B, C] fused logits ``sum_m w^m z_m`` under ``rule`` (one of ``SHARED_RULES``)."""
    stacked = torch.stack(list(unimodal.values()))  # [M, B, C]
    if rule == "entropy":
        weights = entropy_weights(stacked).unsqueeze(-1)  # [M, B, 1]
    elif rule == "entropy_batch":
        weights = batch_entropy_weights(stacked).view(-1, 1, 1)  # [M, 1, 1]
    else:
        raise ValueError(f"unknown shared-fusion rule {rule!r}; allowed: {', '.join(SHARED_RULES)}")
    return (weights.to(stacked.dtype) * stacked).sum(0)
