"""Which failed Train attempts are worth retrying.

Ray Train retries every worker-group failure up to ``FailureConfig.max_failures``, whether a
worker process died (a node lost, an OOM kill, a preemption: retrying from the latest
checkpoint is the point of fault tolerance) or the training function raised a programming or
configuration error that will happen again on every attempt (a retry only re-pays the
worker-group start, 30-60 s, and buries the real error under retry logs).

``is_deterministic`` draws the line: a failure is deterministic when every failing rank
raised one of ``DETERMINISTIC_ERRORS`` from the training function. A dead or unreachable
worker is never deterministic, and neither are ``RuntimeError``/``OSError`` (collective
aborts on the surviving ranks when one rank dies, CUDA out-of-memory, I/O on remote
storage): those are retried as before. Used in two places:

- ``install()`` makes Ray Train's controller raise a deterministic failure at once. Ray 2.60
  has no public hook for a failure policy, so this replaces the factory that
  ``ray.train.v2.api.data_parallel_trainer`` calls; ``tests/test_ray_train.py`` fails if a
  Ray upgrade moves it.
- ``tune/search.run_trial`` records a deterministic failure in the trial's run directory, so
  Tune's retry of that trial re-raises it without training again.
"""

from __future__ import annotations

from typing import Any

# Errors of the training function that a retry repeats: wrong values, types, keys, shapes
# computed in Python, failed invariants. pydantic's ValidationError and ConfigError are
# ValueErrors.
DETERMINISTIC_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    NameError,
    ZeroDivisionError,
    AssertionError,
    NotImplementedError,
    ImportError,
)


def is_deterministic(error: BaseException) -> bool:
    """True when ``error`` (one exception, or Ray Train's error naming each failed rank) would
    recur on a retry."""
    failures = getattr(error, "worker_failures", None)
    if failures is not None:  # ray.train.WorkerGroupError
        return bool(failures) and all(is_deterministic(item) for item in failures.values())
    cause = getattr(error, "_base_exc", None)  # Ray's UserExceptionWithTraceback wrapper
    if cause is not None:
        return is_deterministic(cause)
    return isinstance(error, DETERMINISTIC_ERRORS) and not _is_ray_system_error(error)


def _is_ray_system_error(error: BaseException) -> bool:
    import ray.exceptions

    return isinstance(error, (ray.exceptions.RayActorError, ray.exceptions.RaySystemError))


def _policy_class():
    from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy, FailureDecision

    class RetryOnlyRecoverable(DefaultFailurePolicy):
        """Ray's default policy, except that a deterministic worker failure is raised at once."""

        def make_decision(self, training_failed_error: Any) -> FailureDecision:
            if is_deterministic(training_failed_error):
                return FailureDecision.RAISE
            return super().make_decision(training_failed_error)

    return RetryOnlyRecoverable


def install() -> None:
    """Make every ``TorchTrainer`` started from this process use ``RetryOnlyRecoverable``.
    Idempotent; the policy object travels to Ray Train's controller actor by pickling."""
    from ray.train.v2.api import data_parallel_trainer

    if getattr(data_parallel_trainer.create_failure_policy, "_mmbalance", False):
        return
    policy = _policy_class()

    def create_failure_policy(failure_config):
        return policy(failure_config=failure_config)

    create_failure_policy._mmbalance = True
    data_parallel_trainer.create_failure_policy = create_failure_policy
