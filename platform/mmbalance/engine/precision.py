"""Mixed precision for the training step: autocast for the model's forward, a GradScaler for fp16.

``optim.precision``:

- ``fp32``: no autocast (the default, bit-for-bit the previous behaviour).
- ``bf16``: the model's forward under ``torch.autocast(dtype=bfloat16)``; bf16 keeps fp32's
  exponent range, so no loss scaling is needed. Works on CPU and on GPUs with bf16 support.
- ``fp16``: autocast to float16 plus a ``GradScaler``: the loss is scaled before backward, the
  gradients are unscaled after the cross-rank average and before the objective's gradient hook
  and clipping (both see true gradients), and a step whose gradients hold inf/NaN is skipped
  and the scale lowered. The rank average comes first, so every rank sees the same gradients
  and makes the same skip decision.

Only the model runs in reduced precision. Its logits are cast back to float32 before the
objective sees them, so every objective's arithmetic (ARM's histograms, MNL's masks and
criteria, AUG's scores, ARL's variances) stays float32 whatever the setting.
"""

from __future__ import annotations

import contextlib
from typing import Any, Literal

import torch
from torch import Tensor

from mmbalance.objectives import HeadOutputs

Precision = Literal["fp32", "bf16", "fp16"]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class MixedPrecision:
    """Autocast and loss scaling for one run; ``MixedPrecision("fp32", device)`` does nothing."""

    def __init__(self, precision: Precision, device: torch.device) -> None:
        self.precision = precision
        self.device_type = torch.device(device).type
        self.dtype = DTYPES.get(precision)
        self.scaler = torch.amp.GradScaler(self.device_type) if precision == "fp16" else None

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def scale(self, loss: Tensor) -> Tensor:
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """One optimizer step; with fp16 the scaler skips it on inf/NaN gradients and updates its
        scale (once per step, so each loss group of a multi-step objective is its own step)."""
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)
        self.scaler.update()

    def state_dict(self) -> dict[str, Any]:
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


def float32_outputs(outputs: HeadOutputs) -> HeadOutputs:
    """The model's logits in float32 (a no-op for fp32 runs): objectives compute in float32."""
    if outputs.fused_logits.dtype == torch.float32:
        return outputs
    return HeadOutputs(
        unimodal_logits={m: z.float() for m, z in outputs.unimodal_logits.items()},
        fused_logits=outputs.fused_logits.float(),
        head_logits={m: [z.float() for z in heads] for m, heads in outputs.head_logits.items()},
        auxiliary_losses=outputs.auxiliary_losses,  # computed in float32 by the fusion itself
    )
