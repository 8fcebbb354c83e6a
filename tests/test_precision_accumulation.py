"""optim.precision and optim.accumulate in one process: autocast reaches the model and not the
objective, fp16's loss scaler skips a step with inf gradients, accumulation splits a batch into
equal micro-batches and (for a per-sample-mean loss) takes the full batch's step, and a short
bf16 run on CPU agrees with fp32 within the stated tolerance."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import recipe_dict
from mmbalance.config import validate_recipe
from mmbalance.engine.loop import run_training
from mmbalance.engine.precision import MixedPrecision, float32_outputs
from mmbalance.engine.run_spec import RunSpec
from mmbalance.engine.steps import _micro_batches
from mmbalance.objectives import HeadOutputs


def test_bf16_autocast_reaches_the_model_and_logits_come_back_float32():
    layer = torch.nn.Linear(4, 3)
    with MixedPrecision("bf16", torch.device("cpu")).autocast():
        z = layer(torch.randn(2, 4))
    assert z.dtype == torch.bfloat16
    out = float32_outputs(HeadOutputs(unimodal_logits={"a": z}, fused_logits=z, head_logits={"a": [z]}))
    assert out.fused_logits.dtype == out.unimodal_logits["a"].dtype == out.head_logits["a"][0].dtype == torch.float32
    with MixedPrecision("fp32", torch.device("cpu")).autocast():
        assert layer(torch.randn(2, 4)).dtype == torch.float32


def test_fp16_scaler_skips_a_step_with_inf_gradients_and_lowers_its_scale():
    precision = MixedPrecision("fp16", torch.device("cpu"))
    param = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scale = precision.scaler.get_scale()
    precision.scale((param * torch.tensor([float("inf"), 1.0])).sum()).backward()
    precision.unscale(optimizer)
    precision.step(optimizer)
    assert torch.equal(param.detach(), torch.ones(2))  # skipped
    assert precision.scaler.get_scale() < scale
    optimizer.zero_grad()
    precision.scale(param.sum()).backward()
    precision.unscale(optimizer)
    assert torch.allclose(param.grad, torch.ones(2))  # the hook and the clip see true gradients
    precision.step(optimizer)
    assert torch.allclose(param.detach(), torch.zeros(2))
    restored = MixedPrecision("fp16", torch.device("cpu"))
    restored.load_state_dict(precision.state_dict())
    assert restored.scaler.get_scale() == precision.scaler.get_scale()


def test_micro_batches_are_equal_contiguous_parts_and_an_uneven_split_is_refused():
    batch, labels = {"a": torch.arange(12.0).reshape(6, 2)}, torch.arange(6)
    parts = _micro_batches(batch, labels, 3)
    assert [p[1].tolist() for p in parts] == [[0, 1], [2, 3], [4, 5]]
    assert torch.equal(torch.cat([p[0]["a"] for p in parts]), batch["a"])
    with pytest.raises(ValueError, match="equal micro-batches"):
        _micro_batches(batch, labels, 4)


def _train(shards, tmp_path, name, **optim):
    tree = recipe_dict(shards, objective={"name": "lf"})
    tree["schedule"] = {"epochs": 2, "batch_size": 32}
    tree["optim"] = {"name": "sgd", "lr": 0.1, "momentum": 0.9, **optim}
    return run_training(RunSpec.of(validate_recipe(tree), tmp_path / name, verbose=False))


def test_accumulating_two_micro_batches_is_the_full_batch_step(small_shards, tmp_path):
    whole = _train(small_shards, tmp_path, "whole")
    halves = _train(small_shards, tmp_path, "halves", accumulate=2)
    assert halves["val"] == whole["val"]
    assert abs(halves["test"]["acc"] - whole["test"]["acc"]) < 1e-9
    state = {
        k: torch.load(tmp_path / k / "checkpoints" / "latest" / "state.pt", weights_only=False)["model"]
        for k in ("whole", "halves")
    }
    for name, value in state["whole"].items():
        torch.testing.assert_close(state["halves"][name], value, rtol=0, atol=1e-5)


def test_accumulate_must_divide_the_per_worker_batch(small_shards, tmp_path):
    with pytest.raises(ValueError, match="optim.accumulate=3 does not divide the per-worker batch of 32"):
        _train(small_shards, tmp_path, "uneven", accumulate=3)


def test_bf16_on_cpu_agrees_with_fp32_on_a_short_run(small_shards, tmp_path):
    """Tolerance: best val accuracy within 0.05 and the last epoch's train loss within 10%."""
    fp32 = _train(small_shards, tmp_path, "fp32")
    bf16 = _train(small_shards, tmp_path, "bf16", precision="bf16")
    assert abs(bf16["val"]["best_acc"] - fp32["val"]["best_acc"]) <= 0.05
    last = {k: json.loads((tmp_path / k / "metrics.jsonl").read_text().splitlines()[-1]) for k in ("fp32", "bf16")}
    loss32, loss16 = last["fp32"]["train/loss_total"], last["bf16"]["train/loss_total"]
    assert abs(loss16 - loss32) <= 0.10 * loss32
    assert loss16 != loss32  # the bf16 run did run in reduced precision
