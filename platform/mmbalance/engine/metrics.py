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
    ranks) is applied to everything at once, so an epoch costs one collective.

    ``add`` never waits for the device: a sum is added in place into a float64 accumulator on
    its own device (the float64 sum ``acc + total.double()``, one kernel), and a count given as
    a Python number (a batch size the host already knows) is summed on the host, so no tiny
    tensor is built and copied to the device per step. Counts are integers in practice, which
    float64 sums exactly in any order. ``pairs`` / ``means`` / ``counts`` put the host counts
    on the device once, when they are read.
    """

    def __init__(self) -> None:
        self._sums: dict[str, Tensor] = {}
        self._counts: dict[str, Tensor] = {}  # counts given as tensors, float64 on their device
        self._host_counts: dict[str, float] = {}  # counts given as Python numbers

    def add(self, name: str, total: Tensor, count: Tensor | int | float) -> None:
        if total.requires_grad:
            total = total.detach()
        acc = self._sums.get(name)
        if acc is None:
            self._sums[name] = total.to(torch.float64, copy=True)
        elif acc.shape == total.shape:
            acc.add_(total)  # computed in float64: bit-identical to acc + total.double()
        else:  # a sum that broadcasts to a new shape
            self._sums[name] = acc + total.double()
        if isinstance(count, Tensor):
            if count.requires_grad:
                count = count.detach()
            held = self._counts.get(name)
            if held is None:
                self._counts[name] = count.to(device=total.device, dtype=torch.float64, copy=True)
            elif held.shape == count.shape and held.device == count.device:
                held.add_(count)
            else:
                self._counts[name] = held + count.to(device=held.device, dtype=torch.float64)
        else:
            self._host_counts[name] = self._host_counts.get(name, 0.0) + float(count)

    def declare(self, names: list[str], device: torch.device) -> None:
        """Start named accumulators at zero, so a rank that sees no rows still takes part in
        the reduction with the same keys as the others."""
        for name in names:
            if name not in self._sums:
                self._sums[name] = torch.zeros((), dtype=torch.float64, device=device)
                self._counts[name] = torch.zeros((), dtype=torch.float64, device=device)

    @property
    def sums(self) -> dict[str, Tensor]:
        """Every sum (copies: the accumulators themselves keep being added to in place)."""
        return {name: acc.clone() for name, acc in self._sums.items()}

    @property
    def counts(self) -> dict[str, Tensor]:
        """Every count as a float64 tensor on its sum's device (host counts copied once)."""
        counts = dict(self._counts)
        by_device: dict[torch.device, list[str]] = {}
        for name in self._host_counts:
            by_device.setdefault(self._sums[name].device, []).append(name)
        for device, names in by_device.items():
            values = torch.tensor([self._host_counts[n] for n in names], dtype=torch.float64, device=device)
            for name, value in zip(names, values.unbind()):
                counts[name] = counts[name] + value if name in counts else value
        return counts

    def pairs(self, reduce=lambda t: t) -> dict[str, tuple[Tensor, Tensor]]:
        if not self._sums:
            return {}
        names = sorted(self._sums)
        all_counts = self.counts
        sums = [self._sums[n] for n in names]
        counts = [all_counts[n] for n in names]
        parts = [t.reshape(-1) for pair in zip(sums, counts) for t in pair]
        packed = reduce(torch.cat(parts))  # [total elements]
        out, offset = {}, 0
        for n, s, c in zip(names, sums, counts):
            summed = packed[offset : offset + s.numel()].reshape(s.shape)
            offset += s.numel()
            counted = packed[offset : offset + c.numel()].reshape(c.shape)
            offset += c.numel()
            out[n] = (summed, counted)
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
