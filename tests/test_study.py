"""Comparison studies without Ray: the study file, equal budgets, val-only choice of each
method's best configuration, and the summary's statistics on hand-made trial tables."""

import json

import pandas as pd
import pytest

from helpers import recipe_dict
from helpers.study_rows import run_rows
from mmbalance.config import ConfigError
from mmbalance.reports.study_summary import summarize
from mmbalance.reports.verdicts import format_verdicts, weak_modality
from mmbalance.shipped import shipped
from mmbalance.tune.compare import best_configuration
from mmbalance.tune.study import Study, all_methods, final_space, search_space, validate_study


def _study(**fields) -> Study:
    return Study.model_validate({"methods": {"lf": {"set": {"objective.name": "lf"}}}, **fields})


def test_every_shipped_study_fits_the_synthetic_recipe(small_shards):
    studies = shipped("study")
    assert "study_demo" in studies and "quickstart" not in studies
    for path in studies.values():
        from mmbalance.tune.study import load_study

        methods = validate_study(load_study(path), recipe_dict(small_shards))
        assert {"alone:audio", "alone:visual"} <= set(methods)


def test_every_method_gets_the_same_budget_and_the_common_space():
    study = _study(
        methods={
            "lf": {"set": {"objective.name": "lf"}},
            "mnl": {"set": {"objective.name": "mnl"}, "space": {"objective.lam": {"loguniform": [0.1, 1.0]}}},
        },
        budget={"trials": 5, "seeds": [0, 1], "scheduler": {"name": "asha", "grace_period": 2}},
    )
    lf, mnl = (search_space(study, m) for m in study.methods.values())
    assert lf.trial_count() == mnl.trial_count() == 10
    assert set(lf.space) == {"optim.lr"} and set(mnl.space) == {"optim.lr", "objective.lam"}
    assert lf.scheduler == mnl.scheduler and lf.seeds == mnl.seeds == [0, 1]
    final = final_space(study, study.methods["mnl"], {"optim.lr": 0.001, "objective.lam": 0.5})
    assert final.trial_count() == 5 and final.set["objective.lam"] == 0.5 and final.scheduler.name == "fifo"


def test_a_grid_is_refused_because_it_would_change_one_methods_budget():
    with pytest.raises(ValueError, match="use choice, not grid"):
        _study(methods={"mnl": {"set": {"objective.name": "mnl"}, "space": {"objective.lam": {"grid": [0.1, 1.0]}}}})


def test_modalities_alone_and_an_unknown_baseline(small_shards):
    base = recipe_dict(small_shards)
    methods = all_methods(_study(), base)
    assert methods["alone:visual"].modalities == ["visual"]
    assert list(all_methods(_study(modalities_alone=False), base)) == ["lf"]
    with pytest.raises(ConfigError, match="baseline: 'joint' is not a method"):
        all_methods(_study(baseline="joint"), base)


def test_a_method_that_does_not_fit_the_recipe_is_named_before_ray(small_shards):
    study = _study(
        methods={
            "lf": {"set": {"objective.name": "lf"}},
            "bad": {"set": {"objective.name": "lf"}, "space": {"objective.lam": {"choice": [0.1]}}},
        }
    )
    with pytest.raises(ConfigError, match="methods.bad"):
        validate_study(study, recipe_dict(small_shards))


def test_the_best_configuration_is_chosen_on_mean_val_never_on_test():
    frame = pd.DataFrame(
        [
            {"optim.lr": 0.001, "seed": 0, "best_val": 0.50, "test_acc": 0.90},
            {"optim.lr": 0.001, "seed": 1, "best_val": 0.52, "test_acc": 0.91},
            {"optim.lr": 0.002, "seed": 0, "best_val": 0.60, "test_acc": 0.10},
            {"optim.lr": 0.002, "seed": 1, "best_val": 0.58, "test_acc": 0.11},
            {"optim.lr": 0.003, "seed": 0, "best_val": None, "test_acc": None},  # failed
        ]
    )
    best, val = best_configuration(frame, ["optim.lr"])
    assert best == {"optim.lr": 0.002} and isinstance(best["optim.lr"], float) and val == pytest.approx(0.59)


def _summary(tmp_path, broken_test):
    seeds = [0, 1, 2, 3, 4]
    lf = [0.80, 0.82, 0.79, 0.81, 0.80]
    rows = (
        run_rows(tmp_path, "lf", seeds, lf, [0.40, 0.41, 0.39, 0.40, 0.42], [0.40] * 5, [0.8] * 5)
        + run_rows(tmp_path, "lf_again", seeds, lf, [0.40, 0.41, 0.39, 0.40, 0.42], [0.40] * 5, [0.8] * 5)
        + run_rows(tmp_path, "broken", seeds, broken_test, [0.10] * 5, [0.10] * 5, [0.1] * 5)
        + run_rows(
            tmp_path, "alone:visual", seeds, [0.60, 0.62, 0.61, 0.59, 0.63], None, [0.61] * 5, [0.6] * 5, alone="visual"
        )
        + run_rows(tmp_path, "alone:audio", seeds, [0.70] * 5, None, [0.7] * 5, [0.55] * 5, alone="audio")
    )
    frame = pd.DataFrame(rows)
    study = Study.model_validate(
        {"methods": {n: {"set": {"objective.name": "lf"}} for n in ("lf", "lf_again", "broken")}, "seeds": seeds}
    )
    methods = {
        **study.methods,
        **{f"alone:{m}": {"set": {"objective.name": "lf"}, "modalities": [m]} for m in ("visual", "audio")},
    }
    methods = {
        k: (v if not isinstance(v, dict) else type(study.methods["lf"]).model_validate(v)) for k, v in methods.items()
    }
    return summarize(frame, study, methods, {})


def test_a_broken_method_is_significantly_worse_and_a_copy_of_lf_is_not_different(tmp_path):
    summary = _summary(tmp_path, broken_test=[0.10, 0.11, 0.09, 0.10, 0.12])
    verdicts = {row["method"]: row for row in summary["vs_baseline"]["test_acc"]}
    assert verdicts["broken"]["verdict"] == "worse" and verdicts["broken"]["difference"] == pytest.approx(0.104 - 0.804)
    assert verdicts["lf_again"]["verdict"] == "no significant difference" and verdicts["lf_again"]["difference"] == 0
    assert set(verdicts) == {"lf_again", "broken"}  # the alone runs see other modalities: not compared here
    table = format_verdicts(summary)
    assert "worse" in table and "no significant difference" in table and "(baseline)" in table


def test_best_alone_is_chosen_on_val_and_the_gap_is_ceiling_minus_in_fusion(tmp_path):
    summary = _summary(tmp_path, broken_test=[0.10] * 5)
    # alone:audio has the higher test accuracy, alone:visual the higher val: val decides.
    assert summary["best_alone"] == "alone:visual"
    gap = summary["undertraining"]["visual"]["by_method"]["lf"]
    assert gap["gap"]["mean"] == pytest.approx(0.61 - 0.404)
    assert gap["gap_per_epoch"] == pytest.approx([0.21, 0.21])  # both curves rise 0.1 per epoch
    assert summary["undertraining"]["visual"]["ceiling"]["mean"] == pytest.approx(0.61)
    assert weak_modality(summary) == "visual"
    budget = summary["methods"]["lf"]["budget"]
    assert budget == {"trials": 0, "epochs": 0, "stopped_early": 0, "failed": 0}  # no search rows in this table


def test_the_study_wandb_report_has_one_runset_per_method_and_the_verdicts(tmp_path):
    import wandb_workspaces.reports.v2 as wr  # in the test extra

    from mmbalance.reports.study_summary import write_summary
    from mmbalance.reports.study_wandb_report import build_study_wandb_report
    from mmbalance.tracking.records import experiment_id

    study = tmp_path / "study"
    study.mkdir()
    write_summary(_summary(tmp_path, broken_test=[0.10, 0.11, 0.09, 0.10, 0.12]), study)
    study_id = experiment_id(study, fresh=True)
    report = build_study_wandb_report(study, "mm-proj", "mm-ent")
    runsets = [r for b in report.blocks if isinstance(b, wr.PanelGrid) for r in b.runsets]
    assert {r.name: r.filters for r in runsets} == {
        name: f"Group = '{name}-{study_id[:8]}'" for name in ("lf", "lf_again", "broken", "alone:visual", "alone:audio")
    }
    markdown = "\n".join(b.text for b in report.blocks if isinstance(b, wr.MarkdownBlock))
    assert "| broken |" in markdown and "worse" in markdown and "no significant difference" in markdown


def test_mmbalance_report_wandb_on_a_study_writes_the_study_spec_offline(tmp_path, monkeypatch):
    from helpers.study_rows import study_dir
    from mmbalance.cli import main
    from mmbalance.tracking.records import experiment_id

    monkeypatch.setenv("WANDB_MODE", "offline")  # never published from a test
    study, _ = study_dir(tmp_path)
    experiment_id(study, fresh=True)
    assert main(["report", str(study), "--wandb", "--wandb-entity", "mm-ent", "--wandb-project", "mm-proj"]) == 0
    spec = json.loads((study / "report" / "wandb_report.json").read_text())
    assert "equal-budget study" in spec["title"] and (study / "report" / "report.html").is_file()
