"""PDF fusion (models/pdf_fusion.py, docs/methods/pdf.md): hand-checked weights and loss, the
official detach points, a reference written from the official code, and the engine wiring
(the confidence loss joins every objective's loss; evaluation uses the calibrated weights)."""

import math
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from helpers import REPO, recipe_dict
from mmbalance.config import ConfigError, validate_recipe
from mmbalance.data.manifest import read_manifest
from mmbalance.engine.build import build_bound_objective, build_model
from mmbalance.engine.distributed import ProcessGroup
from mmbalance.engine.metrics import SumCounter
from mmbalance.engine.precision import MixedPrecision
from mmbalance.engine.steps import StepClock, _forward, evaluate, train_batch
from mmbalance.models import LateFusion, build_encoder
from mmbalance.models.pdf_fusion import (
    confidence_loss,
    distribution_uniformity,
    fusion_weights,
    holo_confidence,
    relative_calibration,
)
from mmbalance.objectives import DistInfo, build_objective
from mmbalance.objectives.base import LossGroup, StatelessObjective, StepResult

# The 2-sample, 2-modality case of docs/methods/pdf.md §5: confidences, logits (C = 2), labels.
CONF = torch.tensor([[0.8, 0.5], [0.4, 0.5]])  # [M, B]: modality a, modality v
LOGITS = torch.tensor([[[2.0, 0.0], [0.0, 0.0]], [[0.0, 1.0], [1.0, 0.0]]])  # [M, B, C]
LABELS = torch.tensor([0, 1])


def test_holo_confidence_and_weights_match_the_hand_computation():
    # Sample 0: log 0.8 = -0.2231, log 0.4 = -0.9163, so H_a = 0.9163 / 1.1394 = 0.8042 and
    # H_v = 0.1958; co-beliefs 1.6042 and 0.5958, softmax -> 0.7327 / 0.2673. Sample 1: a tie.
    holo = holo_confidence(CONF)
    torch.testing.assert_close(holo, torch.tensor([[0.804163, 0.5], [0.195837, 0.5]]), atol=1e-6, rtol=0)
    weights = fusion_weights(CONF, LOGITS, calibrate=False)
    torch.testing.assert_close(weights, torch.tensor([[0.732692, 0.5], [0.267308, 0.5]]), atol=1e-6, rtol=0)


def test_a_confidence_of_exactly_zero_gives_finite_weights():
    # log 0 would make the official formula inf / inf; the floor (float32 tiny, log = -87.34)
    # leaves the other modality with all the holo-confidence: H_a = log 0.5 / (-87.34 - 0.69).
    conf = torch.tensor([[0.0], [0.5]])
    holo = holo_confidence(conf)
    assert holo[0].item() == pytest.approx(math.log(0.5) / (math.log(torch.finfo().tiny) + math.log(0.5)), rel=1e-5)
    assert torch.isfinite(fusion_weights(conf, torch.zeros(2, 1, 3), calibrate=True)).all()


def test_relative_calibration_shrinks_the_less_decided_modality():
    # C = 2: DU = |p - 1/2|. Sample 0: DU_a = sigmoid(2) - 0.5 = 0.380797, DU_v = 0.231059, so
    # v's co-belief 0.595837 becomes 0.361540 and w_a = sigmoid(1.604163 - 0.361540) = 0.776020.
    # Sample 1: a is uniform (DU 0), its co-belief becomes 0 and w_a = sigmoid(-1) = 0.268941.
    uniformity = distribution_uniformity(LOGITS)
    torch.testing.assert_close(uniformity, torch.tensor([[0.380797, 0.0], [0.231059, 0.231059]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(relative_calibration(uniformity), torch.tensor([[1.0, 0.0], [0.606776, 1.0]]))
    weights = fusion_weights(CONF, LOGITS, calibrate=True)
    torch.testing.assert_close(weights[0], torch.tensor([0.776020, 0.268941]), atol=1e-6, rtol=0)
    assert relative_calibration(torch.zeros(2, 1)).tolist() == [[1.0], [1.0]]  # all uniform: unchanged


def test_confidence_loss_is_the_summed_l1_to_the_true_class_probability():
    # Targets: a -> [sigmoid(2), 0.5] = [0.880797, 0.5]; v -> [sigmoid(-1), sigmoid(-1)] = 0.268941.
    # (|0.8 - 0.880797| + 0) / 2 + (|0.4 - 0.268941| + |0.5 - 0.268941|) / 2 = 0.221457.
    assert confidence_loss(CONF, LOGITS, LABELS).item() == pytest.approx(0.221457, abs=1e-6)


def _model(fusion="pdf", dims=(3, 4), classes=3, **pdf):
    torch.manual_seed(0)
    encoders = {m: build_encoder("mlp", {"hidden": [8], "out_dim": d}, (5,)) for m, d in zip("av", dims)}
    return LateFusion(encoders, classes, fusion=fusion, pdf_options=pdf)


def _batch(n=6, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return {m: torch.randn(n, 5, generator=generator) for m in "av"}, torch.randint(0, 3, (n,), generator=generator)


def _constant(model, logits, conf):
    """Heads that output ``logits[m]`` and predictors that output ``conf[m]`` for every sample."""
    with torch.no_grad():
        for m in model.modalities:
            model.heads[m][0].weight.zero_()
            model.heads[m][0].bias.copy_(torch.tensor(logits[m]))
            last = model.pdf.predictors[m].net[-2]
            last.weight.zero_()
            last.bias.fill_(math.log(conf[m] / (1 - conf[m])))


def official_reference(model, batch, labels, phase):
    """The two-modality forward and confidence loss as the official code computes them
    (src/models/latefusion_pdf.py branches 'pdf_train' / 'pdf_test', train_pdf.py's loss)."""
    f_a, f_v = (model.encoders[m](batch[m]) for m in "av")
    z_a, z_v = (model.heads[m][0](f) for m, f in zip("av", (f_a, f_v)))
    net_a, net_v = (model.pdf.predictors[m].net for m in "av")
    c_a, c_v = (
        (net_a(f_a.clone().detach()), net_v(f_v.clone().detach())) if phase == "train" else (net_a(f_a), net_v(f_v))
    )
    h_a = torch.log(c_v) / (torch.log(c_a * c_v) + 1e-8)  # [B, 1]
    h_v = torch.log(c_a) / (torch.log(c_a * c_v) + 1e-8)
    b_a, b_v = c_a + h_a, c_v + h_v
    if phase == "test":
        p_a, p_v = F.softmax(z_a, dim=1), F.softmax(z_v, dim=1)
        du_a = torch.mean(torch.abs(p_a - 1 / p_a.shape[1]), dim=1, keepdim=True)
        du_v = torch.mean(torch.abs(p_v - 1 / p_v.shape[1]), dim=1, keepdim=True)
        a_wins = du_a > du_v
        b_a = b_a * torch.where(a_wins, torch.ones_like(du_a), du_a / du_v)
        b_v = b_v * torch.where(a_wins, du_v / du_a, torch.ones_like(du_v))
    w = torch.softmax(torch.stack((b_a.detach(), b_v.detach()), 1), 1)  # [B, 2, 1]
    fused = w[:, 0].detach() * z_a + w[:, 1].detach() * z_v
    onehot = F.one_hot(labels, num_classes=z_a.shape[1])
    tcp_a, _ = torch.max(F.softmax(z_a, dim=1) * onehot, dim=1, keepdim=True)
    tcp_v, _ = torch.max(F.softmax(z_v, dim=1) * onehot, dim=1, keepdim=True)
    loss = F.l1_loss(c_a, tcp_a.detach()) + F.l1_loss(c_v, tcp_v.detach())
    return fused, loss


@pytest.mark.parametrize(("mode", "phase"), [("train", "train"), ("eval", "test")])
def test_fused_logits_and_loss_match_the_official_formulas(mode, phase):
    model = _model()
    model.train(mode == "train")
    batch, labels = _batch()
    _, out = model(batch)
    fused, loss = official_reference(model, batch, labels, phase)
    torch.testing.assert_close(out.fused_logits, fused, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.auxiliary_losses["pdf_confidence"](labels), loss, atol=1e-6, rtol=0)


def test_calibration_switch_always_and_never():
    batch, labels = _batch()
    always, never = _model(calibration="always"), _model(calibration="never")
    _, out_always = always.train()(batch)
    _, out_never = never.eval()(batch)
    torch.testing.assert_close(out_always.fused_logits, official_reference(always, batch, labels, "test")[0])
    torch.testing.assert_close(out_never.fused_logits, official_reference(never, batch, labels, "train")[0])


def _grads(module):
    return [p.grad for p in module.parameters()]


@pytest.mark.parametrize("detach", [True, False])
def test_confidence_loss_trains_the_predictors_and_reaches_the_encoders_only_when_not_detached(detach):
    model = _model(detach_features=detach)
    batch, labels = _batch()
    _, out = model(batch)
    out.auxiliary_losses["pdf_confidence"](labels).backward()
    assert all(g is not None and g.abs().sum() > 0 for g in _grads(model.pdf))
    assert all(g is None for g in _grads(model.heads))  # the true-class target is detached
    reached = [g is not None and g.abs().sum() > 0 for g in _grads(model.encoders)]
    assert all(reached) if not detach else not any(reached)


def test_classification_loss_does_not_reach_the_predictors():
    model = _model()
    batch, labels = _batch()
    _, out = model(batch)
    F.cross_entropy(out.fused_logits, labels).backward()
    assert all(g is None for g in _grads(model.pdf))  # the weights are constants for z_f
    assert all(g is not None for g in _grads(model.heads))


def test_loss_weight_scales_the_auxiliary_loss():
    batch, labels = _batch()
    one = _model()(batch)[1].auxiliary_losses["pdf_confidence"](labels)
    half = _model(loss_weight=0.5)(batch)[1].auxiliary_losses["pdf_confidence"](labels)
    torch.testing.assert_close(half, 0.5 * one)


def test_hidden_width_and_relu_change_the_predictor_layers():
    official = _model().pdf.predictors["v"].net
    assert [layer.out_features for layer in official if isinstance(layer, torch.nn.Linear)] == [8, 4, 1]
    assert not any(isinstance(layer, torch.nn.ReLU) for layer in official)
    custom = _model(hidden=5, activation=True).pdf.predictors["v"].net
    assert [layer.out_features for layer in custom if isinstance(layer, torch.nn.Linear)] == [5, 5, 1]
    assert sum(isinstance(layer, torch.nn.ReLU) for layer in custom) == 2


def _engine_parts(small_shards, objective="lf", **model):
    recipe = validate_recipe(recipe_dict(small_shards, objective={"name": objective}, model={"fusion": "pdf", **model}))
    torch.manual_seed(0)
    net = build_model(recipe, read_manifest(small_shards))
    return net, build_bound_objective(recipe, net)


def _shard_batch(net, n=8):
    torch.manual_seed(3)
    return {m: torch.randn(n, 8) for m in net.modalities}, torch.randint(0, 4, (n,))


@pytest.mark.parametrize("name", ["lf", "mnl"])
def test_the_engine_adds_the_confidence_loss_to_the_objectives_loss(small_shards, name):
    net, objective = _engine_parts(small_shards, name)
    batch, labels = _shard_batch(net)
    clock, precision = StepClock(step=0, epoch=0, steps_per_epoch=1), MixedPrecision("fp32", torch.device("cpu"))
    _, outputs, result = _forward(net, objective, batch, labels, clock, DistInfo(), precision)
    aux = net(batch)[1].auxiliary_losses["pdf_confidence"](labels)
    plain = build_objective(name, {})
    plain.bind(list(net.modalities), net.num_classes, net.info)
    _, _, bare = _forward(_NoAux(net), plain, batch, labels, clock, DistInfo(), precision)
    torch.testing.assert_close(result.losses[0].value(), bare.losses[0].value() + aux)
    torch.testing.assert_close(result.metrics["loss_pdf_confidence"], aux.detach())
    assert "loss_pdf_confidence" not in bare.metrics


class _NoAux(torch.nn.Module):
    """The same model with its auxiliary losses dropped: the objective's own loss alone."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch, ctx=None):
        features, out = self.model(batch, ctx)
        out.auxiliary_losses = {}
        return features, out


class _LazyLF(StatelessObjective):
    name = "lazy_lf_for_pdf_test"

    def step(self, inputs):
        value = F.cross_entropy(inputs.outputs.fused_logits, inputs.labels)
        return StepResult(losses=[LossGroup(lambda: value)])


def test_a_lazy_first_group_gets_the_confidence_loss_too(small_shards):
    net, _ = _engine_parts(small_shards)
    batch, labels = _shard_batch(net)
    clock, precision = StepClock(step=0, epoch=0, steps_per_epoch=1), MixedPrecision("fp32", torch.device("cpu"))
    _, outputs, result = _forward(net, _LazyLF(), batch, labels, clock, DistInfo(), precision)
    aux = result.metrics["loss_pdf_confidence"]
    expected = F.cross_entropy(outputs.fused_logits, labels) + aux
    torch.testing.assert_close(result.losses[0].value().detach(), expected)


@pytest.mark.parametrize(("weight", "moves"), [(1.0, True), (0.0, False)])
def test_one_training_step_moves_the_predictors_only_through_their_loss(small_shards, weight, moves):
    net, objective = _engine_parts(small_shards, "mnl", pdf_loss_weight=weight)
    batch, labels = _shard_batch(net)
    before = [p.detach().clone() for p in net.pdf.parameters()]
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
    clock = StepClock(step=0, epoch=0, steps_per_epoch=1)
    train_batch(net, objective, optimizer, batch, labels, clock, DistInfo(), ProcessGroup(), None, SumCounter())
    changed = [not torch.equal(a, p) for a, p in zip(before, net.pdf.parameters())]
    assert all(changed) if moves else not any(changed)


def test_evaluation_scores_the_calibrated_per_sample_fusion(small_shards):
    # Constant predictions, label 0: z_a = [0, 0.5, 0, 0], z_v = [2, 0, 0, 0], c_a = 0.9, c_v = 0.3.
    # Uncalibrated w_a = 0.8083 puts z_f = [0.383, 0.404, ...]: wrong. Calibrated (DU_a / DU_v =
    # 0.0523 / 0.2306 = 0.2269 with C = 4) w_a = 0.508 and z_f[0] = 0.984 wins. Accuracy must be 1.
    net, objective = _engine_parts(small_shards)
    _constant(net, {"audio": [0.0, 0.5, 0.0, 0.0], "visual": [2.0, 0.0, 0.0, 0.0]}, {"audio": 0.9, "visual": 0.3})
    batch, _ = _shard_batch(net)
    labels = torch.zeros(8, dtype=torch.long)
    net.train()
    assert (net(batch)[1].fused_logits.argmax(1) == 1).all()  # training-mode weights get it wrong
    counter = evaluate(net, objective, [(batch, labels)], epoch=0)
    assert counter.sums["acc_fused"].item() == 8 and net.training
    assert counter.sums["acc_audio"].item() == 0 and counter.sums["acc_visual"].item() == 8


def test_fusion_auto_keeps_each_objectives_default_and_pdf_is_accepted_by_lf_and_mnl(small_shards):
    for name, default in [("lf", "mean"), ("mnl", "mean"), ("arm", "concat"), ("aug", "boost")]:
        assert validate_recipe(recipe_dict(small_shards, objective={"name": name})).model.fusion == default
    for name in ("lf", "mnl"):
        recipe = validate_recipe(recipe_dict(small_shards, objective={"name": name}, model={"fusion": "pdf"}))
        assert recipe.model.fusion == "pdf" and recipe.model.pdf_calibration == "eval"


def test_an_objective_that_cannot_use_pdf_is_a_config_error(small_shards):
    with pytest.raises(ConfigError) as info:
        validate_recipe(recipe_dict(small_shards, objective={"name": "ogm_ge"}, model={"fusion": "pdf"}))
    assert "objective.name=ogm_ge" in str(info.value) and "model.fusion=pdf" in str(info.value)
    with pytest.raises(ConfigError, match="pdf_calibration"):
        validate_recipe(recipe_dict(small_shards, model={"fusion": "pdf", "pdf_calibration": "test"}))


def test_cli_refuses_pdf_for_an_objective_without_it_with_exit_2(tmp_path):
    exe = shutil.which("mmbalance")
    command = [exe] if exe else [sys.executable, "-m", "mmbalance.cli"]
    recipe = REPO / "trainables" / "synthetic.yaml"
    args = ["train", "--recipe", str(recipe), "--set", "objective.name=arm", "model.fusion=pdf"]
    done = subprocess.run([*command, *args, "--output", str(tmp_path / "run")], capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "objective.name=arm" in done.stderr and "model.fusion=pdf" in done.stderr
    assert not (tmp_path / "run").exists()


def test_bf16_forward_keeps_the_confidence_loss_in_float32(small_shards):
    # float32_outputs rebuilds HeadOutputs without the auxiliary losses; _forward reads them first.
    net, objective = _engine_parts(small_shards, "mnl")
    batch, labels = _shard_batch(net)
    clock, precision = StepClock(step=0, epoch=0, steps_per_epoch=1), MixedPrecision("bf16", torch.device("cpu"))
    _, outputs, result = _forward(net, objective, batch, labels, clock, DistInfo(), precision)
    assert outputs.fused_logits.dtype == torch.float32 and outputs.unimodal_logits["audio"].dtype == torch.float32
    aux = result.metrics["loss_pdf_confidence"]
    assert aux.dtype == torch.float32 and torch.isfinite(aux) and aux > 0
    assert result.losses[0].value().dtype == torch.float32


class _PartsLF(StatelessObjective):
    name = "parts_lf_for_pdf_test"

    def step(self, inputs):
        return StepResult(
            losses=[LossGroup(parts={"fused": F.cross_entropy(inputs.outputs.fused_logits, inputs.labels)})]
        )


def test_a_parts_first_group_is_refused_with_the_loss_named(small_shards):
    net, _ = _engine_parts(small_shards)
    batch, labels = _shard_batch(net)
    clock, precision = StepClock(step=0, epoch=0, steps_per_epoch=1), MixedPrecision("fp32", torch.device("cpu"))
    with pytest.raises(ValueError, match="pdf_confidence"):
        _forward(net, _PartsLF(), batch, labels, clock, DistInfo(), precision)
