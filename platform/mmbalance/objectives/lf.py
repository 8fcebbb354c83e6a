"""LF: the late-fusion baseline, ``CE(z_f, y) + omega * sum_m CE(z_m, y)`` (docs/methods/lf.md §0).

``omega = 1`` is the MNL paper's LF baseline; ``omega = 0`` is the ARL/OGM "joint training"
baseline (fused CE only). One loss group, no state.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from mmbalance.objectives.base import (
    FUSIONS,
    LossGroup,
    Requirements,
    StatelessObjective,
    StepInputs,
    StepResult,
    cross_entropy_per_sample,
    register_objective,
)


class LFParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    omega: float = Field(1.0, ge=0.0, description="weight of the per-modality CE terms")


@register_objective
class LF(StatelessObjective):
    """``LF(LFParams(omega=0.0))``; ``LF()`` is ``LF(LFParams())``."""

    name = "lf"
    Params = LFParams
    params: LFParams
    # Needs only z_m and z_f, which every fusion gives; defined for a single modality too (its
    # unimodal ceiling). Mean fusion first: the MNL paper's LF.
    requirements = Requirements(fusions=FUSIONS, min_modalities=1)

    def step(self, inputs: StepInputs) -> StepResult:
        out, y = inputs.outputs, inputs.labels
        fused = cross_entropy_per_sample(out.fused_logits, y).mean()
        unimodal = {m: cross_entropy_per_sample(z, y).mean() for m, z in out.unimodal_logits.items()}
        total = fused + self.params.omega * sum(unimodal.values())
        metrics = {"loss_fused": fused.detach(), **{f"loss_{m}": v.detach() for m, v in unimodal.items()}}
        return StepResult(losses=[LossGroup(total)], metrics=metrics)
