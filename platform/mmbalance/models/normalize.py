"""Input normalisation inside the model, from statistics the shard manifest carries.

Shards keep raw values (uint8 pixels, log magnitudes) so that corruptions and missing-modality
zeroing act in the data's own units; the model then standardises what it receives. Doing it
here rather than in the data path means every reader (in-process, Ray Data, evaluation sweeps)
gets it for free and a checkpoint carries the numbers it was trained with.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class NormalizedEncoder(nn.Module):
    """``encoder((x - mean) / std)``, with mean/std broadcast along ``axis`` of the per-sample
    shape (``axis=None``: one scalar pair)."""

    def __init__(
        self, encoder: nn.Module, input_shape: tuple[int, ...], mean: list[float], std: list[float], axis: int | None
    ):
        super().__init__()
        view = [1] * (1 + len(input_shape))  # leading 1 for the batch
        if axis is not None:
            view[1 + axis] = len(mean)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(view))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(view))
        self.encoder = encoder
        self.out_dim = encoder.out_dim

    def forward(self, x: Tensor) -> Tensor:
        return self.encoder((x.float() - self.mean) / self.std)
