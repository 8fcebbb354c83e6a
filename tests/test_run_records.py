"""A run's result and metrics files are strict JSON: a metric that could not be computed is null."""

import json
import math

import pytest
import torch

from mmbalance.tracking.records import RunRecord, json_safe


def strict_load(text: str):
    def refuse(token):
        raise ValueError(f"non-standard JSON constant {token}")

    return json.loads(text, parse_constant=refuse)


def test_json_safe_replaces_non_finite_floats_at_any_depth():
    value = {"a": math.nan, "b": [1.0, math.inf, {"c": -math.inf}], "d": (2, "x"), "e": torch.tensor(0.5)}
    assert json_safe(value) == {"a": None, "b": [1.0, None, {"c": None}], "d": [2, "x"], "e": 0.5}


def test_result_with_a_nan_metric_is_written_as_strict_json(tmp_path):
    record = RunRecord(tmp_path)
    record.write_result({"test": {"acc_fused": 0.5, "ucom": math.nan}, "best": {"val": [math.inf]}})
    written = strict_load(record.layout.result.read_text())
    assert written == {"test": {"acc_fused": 0.5, "ucom": None}, "best": {"val": [None]}}


def test_metrics_line_with_a_nan_nested_value_is_strict_json(tmp_path):
    record = RunRecord(tmp_path)
    record.append_metrics({"epoch": 0, "val": {"ucom": math.nan}, "loss": float("inf")})
    (line,) = record.metrics_path.read_text().splitlines()
    assert strict_load(line) == {"epoch": 0, "val": {"ucom": None}, "loss": None}


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_summary_writer_nulls_non_finite_values(tmp_path, bad):
    from mmbalance.reports.study_summary import write_summary

    path = write_summary({"methods": {"lf": {"mean": bad, "ci": [bad, 1.0]}}}, tmp_path)
    assert strict_load(path.read_text()) == {"methods": {"lf": {"mean": None, "ci": [None, 1.0]}}}
