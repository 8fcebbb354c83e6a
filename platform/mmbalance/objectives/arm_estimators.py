"""Histogram estimators of (conditional) mutual information for ARM (docs/methods/arm.md §2.2 step 4).

Everything runs in torch on the tensors' own device, with no ``.item()`` and no NumPy, so
ARM can call it every step without a device->host sync. Each estimate is split in two halves
so DDP ranks can share it: ``joint_counts`` turns samples into bin counts for edges given as
explicit ``(lo, hi)`` ranges (every rank passes the same reduced range), the caller
all-reduces the counts, and ``*_from_counts`` reads the estimate off the summed counts.
``nmi`` / ``ncmi`` are the one-process conveniences used by the tests.

Two CMI readings:

- ``ncmi_from_counts``: the plug-in ``I(X;Y|Z) = H(XZ) + H(YZ) - H(XYZ) - H(Z)``, normalised
  as ``2 I / (H(X|Z) + H(Y|Z))`` so that, like ``NMI``, ``NCMI(x, x | z) = 1`` (the official
  normalisation lacks the 2, which only made sense together with its bug);
- ``ncmi_official_from_counts``: the official ``MI_tool.py`` arithmetic, kept for comparison:
  its "conditional entropy" divides the joint by ``p(z)`` broadcast along the *first* axis
  (``[n,n] / [n,1,1] -> [n,n,n]``) and never weights by ``p(z)``; independent inputs give
  0.50 instead of 0 (docs/methods/arm.md §2.7.3).
"""

from __future__ import annotations

import torch
from torch import Tensor

# Entropy sums below this (nats) mean "a variable is constant": the normalised score is 0
# rather than a ratio of two rounding errors.
_MIN_ENTROPY = 1e-6
# The official code replaces empty p(z) bins by this before dividing.
_OFFICIAL_ZERO_PROB = 1e-10


def data_range(x: Tensor) -> Tensor:
    """[N] -> [2] (min, max): NumPy's default histogram range."""
    return torch.stack([x.min(), x.max()])


def bin_index(x: Tensor, lo: Tensor, hi: Tensor, bins: int) -> Tensor:
    """[N] -> [N] int64 bin of each value for ``bins`` equal bins on [lo, hi]; the last bin is
    closed like NumPy's. A constant variable (hi == lo) falls in bin 0."""
    width = torch.where(hi > lo, hi - lo, torch.ones_like(hi))
    return ((x - lo) / width * bins).floor().clamp(0, bins - 1).long()  # [N]


def joint_counts(columns: list[Tensor], ranges: Tensor, bins: int) -> Tensor:
    """K columns [N] with ranges [K, 2] -> float32 counts [bins] * K.

    ``scatter_add_`` instead of ``bincount``: bincount sizes its output from the data, which
    costs a host sync on CUDA. Counts stay exact in float32 up to 2**24 per bin.
    """
    flat = torch.zeros_like(columns[0], dtype=torch.long)  # [N]
    for col, (lo, hi) in zip(columns, ranges):
        flat = flat * bins + bin_index(col, lo, hi, bins)
    ones = torch.ones_like(flat, dtype=torch.float32)
    counts = torch.zeros(bins ** len(columns), dtype=torch.float32, device=flat.device)
    return counts.scatter_add_(0, flat, ones).view([bins] * len(columns))


def _entropy(p: Tensor) -> Tensor:
    return -torch.xlogy(p, p).sum()  # xlogy(0, 0) = 0: empty bins add nothing


def _normalise(counts: Tensor) -> Tensor:
    return counts / counts.sum().clamp_min(1.0)


def nmi_from_counts(counts: Tensor) -> Tensor:
    """[b, b] joint counts -> ``2 I(X;Y) / (H(X) + H(Y))`` in [0, 1] (0-dim)."""
    p = _normalise(counts)
    hx, hy, hxy = _entropy(p.sum(1)), _entropy(p.sum(0)), _entropy(p)
    denom = hx + hy
    nmi = 2.0 * (hx + hy - hxy) / denom.clamp_min(_MIN_ENTROPY)
    return torch.where(denom > _MIN_ENTROPY, nmi, torch.zeros_like(nmi)).clamp(0.0, 1.0)


def ncmi_from_counts(counts: Tensor) -> Tensor:
    """[b, b, b] joint counts of (X, Y, Z) -> ``2 I(X;Y|Z) / (H(X|Z) + H(Y|Z))`` in [0, 1]."""
    p = _normalise(counts)
    hz = _entropy(p.sum((0, 1)))
    hxz, hyz, hxyz = _entropy(p.sum(1)), _entropy(p.sum(0)), _entropy(p)
    cmi = hxz + hyz - hxyz - hz
    denom = (hxz - hz) + (hyz - hz)
    ncmi = 2.0 * cmi / denom.clamp_min(_MIN_ENTROPY)
    return torch.where(denom > _MIN_ENTROPY, ncmi, torch.zeros_like(ncmi)).clamp(0.0, 1.0)


def _official_conditional_entropy(joint: Tensor, pz: Tensor) -> Tensor:
    # Reproduces the bug: p(z) is broadcast as [n, 1, 1], i.e. along the first axis of a
    # [n, n, n] result, whatever the joint's rank; the result is not weighted by p(z).
    pz = torch.where(pz > 0, pz, torch.full_like(pz, _OFFICIAL_ZERO_PROB))
    return _entropy(joint / pz.view(-1, 1, 1))  # [n, n, n]


def ncmi_official_from_counts(counts: Tensor) -> Tensor:
    """[b, b, b] joint counts -> the official ``CMI / (H(X|Z) + H(Y|Z))`` with its broken
    conditional entropies (not bounded, not 0 for independent inputs)."""
    p = _normalise(counts)
    pz = p.sum((0, 1))
    hx_z = _official_conditional_entropy(p.sum(1), pz)
    hy_z = _official_conditional_entropy(p.sum(0), pz)
    hxy_z = _official_conditional_entropy(p, pz)
    denom = hx_z + hy_z
    ncmi = (hx_z + hy_z - hxy_z) / torch.where(denom != 0, denom, torch.ones_like(denom))
    return torch.where(denom != 0, ncmi, torch.zeros_like(ncmi))


def nmi(x: Tensor, y: Tensor, bins: int = 30) -> Tensor:
    """NMI of two flat samples [N], each binned on its own min/max range (one process)."""
    ranges = torch.stack([data_range(x), data_range(y)])  # [2, 2]
    return nmi_from_counts(joint_counts([x, y], ranges, bins))


def ncmi(x: Tensor, y: Tensor, z: Tensor, bins: int = 2, official: bool = False) -> Tensor:
    """NCMI(x, y | z) of flat samples [N] (one process); ``official`` picks the broken one."""
    ranges = torch.stack([data_range(x), data_range(y), data_range(z)])  # [3, 2]
    counts = joint_counts([x, y, z], ranges, bins)
    return ncmi_official_from_counts(counts) if official else ncmi_from_counts(counts)
