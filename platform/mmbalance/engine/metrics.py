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

    ``add_means`` / ``add_pairs`` add a whole step's scalars with one stack and one in-place
    add into a packed [K] accumulator per set of names, instead of one small kernel (and one
    Python call) per name: on a small model the per-name adds cost as much as an objective's
    own math. Each name's sum sees the same float64 additions in the same order as with
    ``add``; the packed accumulators are unpacked into names only when read.
    """

    def __init__(self) -> None:
        self._sums: dict[str, Tensor] = {}
        self._counts: dict[str, Tensor] = {}  # counts given as tensors, float64 on their device
        self._host_counts: dict[str, float] = {}  # counts given as Python numbers
        # names -> [K] float64 sums, and their counts: a [K] float64 tensor or one host number.
        self._packed: dict[tuple[str, ...], Tensor] = {}
        self._packed_counts: dict[tuple[str, ...], Tensor] = {}
        self._packed_host_counts: dict[tuple[str, ...], float] = {}

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

    def add_means(self, means: dict[str, Tensor], count: int) -> None:
        """Per-sample means over a batch of ``count`` samples: each adds ``mean * count`` to its
        sum and ``count`` to its count (``add(name, mean * count, count)`` for every name)."""
        if not _stackable(means.values()):
            for name, value in means.items():
                self.add(name, value * count, count)
            return
        totals = torch.stack(list(means.values())) * count  # [K], the same product per element
        self._add_packed(tuple(means), totals, count)

    def add_pairs(self, pairs: dict[str, tuple[Tensor, Tensor]], prefix: str = "") -> None:
        """(sum, count) pairs, each stored under ``prefix + name`` (``add`` for every pair)."""
        if not pairs:
            return
        sums = [s for s, _ in pairs.values()]
        counts = [c for _, c in pairs.values()]
        if not (_stackable(sums) and _stackable(counts) and counts[0].device == sums[0].device):
            for name, (s, c) in pairs.items():
                self.add(prefix + name, s, c)
            return
        self._add_packed(tuple(prefix + name for name in pairs), torch.stack(sums), torch.stack(counts))

    def _add_packed(self, names: tuple[str, ...], totals: Tensor, count: Tensor | int | float) -> None:
        if totals.requires_grad:
            totals = totals.detach()
        acc = self._packed.get(names)
        if acc is None:
            self._packed[names] = totals.to(torch.float64, copy=True)
        else:
            acc.add_(totals)
        if isinstance(count, Tensor):
            count = count.detach()
            held = self._packed_counts.get(names)
            if held is None:
                self._packed_counts[names] = count.to(torch.float64, copy=True)
            else:
                held.add_(count)
        else:
            self._packed_host_counts[names] = self._packed_host_counts.get(names, 0.0) + float(count)

    def _unpacked(self) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, float]]:
        """(sums, tensor counts, host counts) by name, the packed accumulators split into names
        (a name also added elsewhere gets the sum of both)."""
        sums, counts, host = dict(self._sums), dict(self._counts), dict(self._host_counts)
        for names, acc in self._packed.items():
            for name, value in zip(names, acc.unbind()):
                sums[name] = sums[name] + value if name in sums else value
            if names in self._packed_counts:
                for name, value in zip(names, self._packed_counts[names].unbind()):
                    counts[name] = counts[name] + value if name in counts else value
            else:
                for name in names:
                    host[name] = host.get(name, 0.0) + self._packed_host_counts[names]
        return sums, counts, host

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
        return {name: acc.clone() for name, acc in self._unpacked()[0].items()}

    @property
    def counts(self) -> dict[str, Tensor]:
        """Every count as a float64 tensor on its sum's device (host counts copied once)."""
        return self._counts_on_device(*self._unpacked())

    @staticmethod
    def _counts_on_device(
        sums: dict[str, Tensor], counts: dict[str, Tensor], host: dict[str, float]
    ) -> dict[str, Tensor]:
        counts = dict(counts)
        by_device: dict[torch.device, list[str]] = {}
        for name in host:
            by_device.setdefault(sums[name].device, []).append(name)
        for device, names in by_device.items():
            values = torch.tensor([host[n] for n in names], dtype=torch.float64, device=device)
            for name, value in zip(names, values.unbind()):
                counts[name] = counts[name] + value if name in counts else value
        return counts

    def pairs(self, reduce=lambda t: t) -> dict[str, tuple[Tensor, Tensor]]:
        all_sums, tensor_counts, host = self._unpacked()
        if not all_sums:
            return {}
        names = sorted(all_sums)
        all_counts = self._counts_on_device(all_sums, tensor_counts, host)
        sums = [all_sums[n] for n in names]
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


def _stackable(values) -> bool:
    """True when every value is a 0-dim tensor of one dtype on one device: then stacking them
    changes no value, and each element gets exactly the arithmetic it would get alone."""
    first = None
    for value in values:
        if not isinstance(value, Tensor) or value.dim() != 0:
            return False
        if first is None:
            first = value
        elif value.dtype != first.dtype or value.device != first.device:
            return False
    return first is not None


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
