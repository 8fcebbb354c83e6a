"""LF objective (docs/methods/lf.md): the loss by hand, omega = 0 as joint training, one modality,
declared requirements and parameter validation."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from mmbalance.objectives import build_objective
from mmbalance.objectives.base import FUSIONS, HeadOutputs, StepInputs
from mmbalance.objectives.lf import LF, LFParams

Z_A = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
Z_V = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
Y = torch.tensor([0, 1])


def step(objective: LF, logits: dict[str, torch.Tensor], labels=Y):
    fused = torch.stack(list(logits.values())).mean(0)
    outputs = HeadOutputs(unimodal_logits=logits, fused_logits=fused, head_logits={m: [z] for m, z in logits.items()})
    objective.bind(list(logits), 2, {"fusion": "mean"})
    return objective.step(StepInputs({}, outputs, labels, step=0, epoch=0, steps_per_epoch=1, phase="train"))


def ce(logits: list[list[float]], labels: list[int]) -> float:
    """Mean cross-entropy, written out."""
    return sum(math.log(sum(math.exp(v) for v in row)) - row[y] for row, y in zip(logits, labels)) / len(labels)


def test_lf_loss_is_fused_ce_plus_omega_times_the_unimodal_ces():
    fused = ((Z_A + Z_V) / 2).tolist()
    ce_f, ce_a, ce_v = ce(fused, [0, 1]), ce(Z_A.tolist(), [0, 1]), ce(Z_V.tolist(), [0, 1])
    for omega in (1.0, 0.5):
        result = step(LF(LFParams(omega=omega)), {"a": Z_A, "v": Z_V})
        assert len(result.losses) == 1
        assert result.losses[0].value().item() == pytest.approx(ce_f + omega * (ce_a + ce_v), abs=1e-6)
        assert result.metrics["loss_fused"].item() == pytest.approx(ce_f, abs=1e-6)
        assert result.metrics["loss_a"].item() == pytest.approx(ce_a, abs=1e-6)


def test_lf_with_omega_zero_is_the_fused_loss_alone():
    result = step(LF(LFParams(omega=0.0)), {"a": Z_A, "v": Z_V})
    assert result.losses[0].value().item() == pytest.approx(ce(((Z_A + Z_V) / 2).tolist(), [0, 1]), abs=1e-6)


def test_lf_trains_a_single_modality():
    result = step(LF(), {"a": Z_A})
    assert result.losses[0].value().item() == pytest.approx(2 * ce(Z_A.tolist(), [0, 1]), abs=1e-6)


def test_lf_defaults_come_from_its_params_and_it_fits_every_fusion():
    assert LF().params == LFParams() and LF().params.omega == 1.0
    assert build_objective("lf", {"omega": 0.0}).params.omega == 0.0
    assert LF.requirements.fusions == FUSIONS and LF.requirements.min_modalities == 1
    assert LF.requirements.warmup_key is None and LF().trains_new_heads


@pytest.mark.parametrize("bad", [{"omega": -0.1}, {"omega": "much"}, {"lam": 0.7}])
def test_lf_invalid_params_are_refused(bad):
    with pytest.raises(ValidationError):
        build_objective("lf", bad)


def test_lf_takes_its_params_model_not_a_dict():
    with pytest.raises(TypeError, match="LFParams"):
        LF({"omega": 0.5})
