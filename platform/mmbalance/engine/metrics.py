"""Per-split evaluation metrics, accumulated as (sum, count) so ranks can add them up.

Accuracies are never averaged across batches or ranks: correct predictions and sample
counts are summed, then divided once. Names follow ``{split}/{metric}_{head}``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmbalance.objectives.base import HeadOutputs

EPS = 1e-12


def true_class_prob(logits: Tensor, labels: Tensor) -> Tensor:
    """[B, C], [B] -> [B] softmax probability of the true class."""
    return logits.softmax(dim=-1).gather(1, labels[:, None]).squeeze(1)


def confidence_margin(logits: Tensor, labels: Tensor) -> Tensor:
    """UCoM: true-class logit minus the strongest competing logit, [B]."""
    true = logits.gather(1, labels[:, None]).squeeze(1)  # [B]
    others = logits.scatter(1, labels[:, None], float("-inf"))  # [B, C]
    return true - others.max(dim=1).values


class SumCounter:
    """Named (sum, count) accumulators; sums may be tensors of any shape. ``reduce`` (SUM over
    ranks) is applied to everything at once, so an epoch costs one collective."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, Tensor] = {}

    def add(self, name: str, total: Tensor, count: Tensor | int) -> None:
        total = total.detach().double()
        count = torch.as_tensor(count, device=total.device).detach().double()
        if name in self.sums:
            self.sums[name] = self.sums[name] + total
            self.counts[name] = self.counts[name] + count
        else:
            self.sums[name], self.counts[name] = total, count

    def declare(self, names: list[str], device: torch.device) -> None:
        """Start named accumulators at zero, so a rank that sees no rows still takes part in
        the reduction with the same keys as the others."""
        for name in names:
            if name not in self.sums:
                self.sums[name] = torch.zeros((), dtype=torch.float64, device=device)
                self.counts[name] = torch.zeros((), dtype=torch.float64, device=device)

    def pairs(self, reduce=lambda t: t) -> dict[str, tuple[Tensor, Tensor]]:
        if not self.sums:
            return {}
        names = sorted(self.sums)
        parts = [t.reshape(-1) for n in names for t in (self.sums[n], self.counts[n])]
        packed = reduce(torch.cat(parts))  # [total elements]
        out, offset = {}, 0
        for n in names:
            sum_shape, count_shape = self.sums[n].shape, self.counts[n].shape
            s = packed[offset : offset + self.sums[n].numel()].reshape(sum_shape)
            offset += self.sums[n].numel()
            c = packed[offset : offset + self.counts[n].numel()].reshape(count_shape)
            offset += self.counts[n].numel()
            out[n] = (s, c)
        return out

    def means(self, reduce=lambda t: t) -> dict[str, float]:
        """Scalar accumulators only, as floats (one device->host copy)."""
        pairs = {n: v for n, v in self.pairs(reduce).items() if v[0].dim() == 0}
        if not pairs:
            return {}
        values = torch.stack([torch.stack(v) for v in pairs.values()]).cpu().tolist()  # [K, 2]
        return {n: s / c if c > 0 else float("nan") for n, (s, c) in zip(pairs, values)}


def prediction_stat_names(modalities: list[str]) -> list[str]:
    return ["acc_fused"] + [f"{stat}_{m}" for m in modalities for stat in ("acc", "tcp", "ucom")]


def add_prediction_stats(counter: SumCounter, outputs: HeadOutputs, labels: Tensor) -> None:
    """Fused and per-modality accuracy, mean true-class probability and UCoM for one batch."""
    n = labels.numel()
    counter.add("acc_fused", (outputs.fused_logits.argmax(1) == labels).sum(), n)
    for m, logits in outputs.unimodal_logits.items():
        counter.add(f"acc_{m}", (logits.argmax(1) == labels).sum(), n)
        counter.add(f"tcp_{m}", true_class_prob(logits, labels).sum(), n)
        counter.add(f"ucom_{m}", confidence_margin(logits, labels).sum(), n)


def imbalance_ratio(metrics: dict[str, float], modalities: list[str], prefix: str) -> float:
    """Strong / weak modality accuracy (>= 1; 1 = balanced)."""
    accs = [metrics[f"{prefix}acc_{m}"] for m in modalities]
    return max(accs) / max(min(accs), EPS)
