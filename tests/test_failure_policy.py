"""Which failures are retried: worker deaths and possibly transient errors, never a
deterministic error of the training function (launch/failure_policy.py, tune/search.run_trial)."""

import json

import pytest
import ray.exceptions
from ray.train import FailureConfig
from ray.train.v2._internal.execution.failure_handling import FailureDecision
from ray.train.v2.api import data_parallel_trainer
from ray.train.v2.api.exceptions import WorkerGroupError

from mmbalance.launch import failure_policy
from mmbalance.launch.failure_policy import is_deterministic
from mmbalance.tune.search import FAILED, RepeatedTrialError, error_summary, raise_recorded_failure, record_failure


def _group(**failures):
    return WorkerGroupError("failed", {int(rank[1:]): err for rank, err in failures.items()})


@pytest.mark.parametrize(
    "error, expected",
    [
        (ValueError("objective.lam must be > 0"), True),
        (KeyError("visual"), True),
        (TypeError("bad"), True),
        (RuntimeError("Connection closed by peer"), False),  # a collective aborted: another rank may have died
        (OSError("s3 read timed out"), False),
        (ray.exceptions.RayActorError(), False),
    ],
)
def test_single_errors(error, expected):
    assert is_deterministic(error) is expected


def test_a_worker_group_error_is_deterministic_only_if_every_failing_rank_raised_one():
    assert is_deterministic(_group(r0=ValueError("x"), r1=ValueError("x")))
    assert not is_deterministic(_group(r0=ValueError("x"), r1=ray.exceptions.RayActorError()))
    assert not is_deterministic(_group(r0=ValueError("x"), r1=RuntimeError("gloo")))
    assert not is_deterministic(WorkerGroupError("failed", {}))


def test_policy_raises_deterministic_failures_and_retries_deaths_within_the_budget():
    original = data_parallel_trainer.create_failure_policy
    failure_policy.install()
    policy = data_parallel_trainer.create_failure_policy(FailureConfig(max_failures=2))
    try:
        assert policy.make_decision(_group(r0=ValueError("bad value"))) == FailureDecision.RAISE
        death = _group(r1=ray.exceptions.RayActorError())
        assert policy.make_decision(death) == FailureDecision.RETRY
        assert policy.make_decision(death) == FailureDecision.RETRY
        assert policy.make_decision(death) == FailureDecision.RAISE  # max_failures=2 still applies
    finally:
        data_parallel_trainer.create_failure_policy = original


def test_install_is_idempotent():
    original = data_parallel_trainer.create_failure_policy
    try:
        failure_policy.install()
        installed = data_parallel_trainer.create_failure_policy
        failure_policy.install()
        assert data_parallel_trainer.create_failure_policy is installed is not original
    finally:
        data_parallel_trainer.create_failure_policy = original


def test_a_deterministic_trial_failure_is_recorded_and_reraised_without_training(tmp_path):
    record_failure(tmp_path, _group(r0=ValueError("fusion mean cannot serve arm")))
    assert json.loads((tmp_path / FAILED).read_text()) == {
        "kind": "ValueError",
        "message": "fusion mean cannot serve arm",
    }
    with pytest.raises(RepeatedTrialError) as raised:
        raise_recorded_failure(tmp_path)
    kind, message = error_summary(raised.value)
    assert kind == "ValueError" and message.startswith("fusion mean cannot serve arm")


def test_a_recoverable_trial_failure_is_not_recorded(tmp_path):
    record_failure(tmp_path, RuntimeError("NCCL timeout"))
    record_failure(tmp_path, _group(r1=ray.exceptions.RayActorError()))
    assert not (tmp_path / FAILED).exists()
    raise_recorded_failure(tmp_path)  # nothing recorded: the retry trains
