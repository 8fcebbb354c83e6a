"""Experiment reports: a tiny real experiment (trained and scored in-process, no Ray), its
HTML/Markdown report checked against numbers recomputed here with plain Python, the W&B
Report built offline, and the ``mmbalance report`` command."""

from __future__ import annotations

import argparse
import base64
import json
import re
import statistics
import struct
import sys
from pathlib import Path

import pytest
import yaml

from helpers import recipe_dict, small_spec
from mmbalance.config import ConfigError, Recipe
from mmbalance.data.synthetic import prepare_synthetic
from mmbalance.engine.evaluation import evaluate_run
from mmbalance.engine.loop import run_training
from mmbalance.engine.run_spec import RunSpec
from mmbalance.reports.command import add_report_parser
from mmbalance.reports.render import build_report
from mmbalance.tune.search import _flatten_scores, _label, write_results
from mmbalance.tune.space import trial_recipe

METHODS = [  # a bundle grid, as `method: {grid: [...]}` in a search space writes it
    {"objective.name": "lf", "model.fusion": "mean"},
    {"objective.name": "mnl", "model.fusion": "mean", "objective.lam": 0.3, "objective.warmup_epochs": 0},
    {"objective.name": "mnl", "model.fusion": "mean", "objective.lam": 1.0, "objective.warmup_epochs": 0},
    {
        "objective.name": "mnl",
        "model.fusion": "mean",
        "objective.lam": 0.3,
        "objective.warmup_epochs": 1,
        "objective.guidance": "confidence",
        "objective.scope": "all",
    },
]
# The ablation row of each method, written out by hand (MNL defaults: confidence_ucom, nontarget).
STRATEGY = ["lf", "mnl (confidence_ucom, nontarget)", "mnl (confidence_ucom, nontarget)", "mnl (confidence, all)"]
SEEDS = (0, 1)
LEVELS = (5, 10)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _train_and_score(base: dict, experiment: Path) -> list[dict]:
    rows = []
    for index, method in enumerate(METHODS):
        for seed in SEEDS:
            trial_id = f"trial{index}{seed}"
            tree = trial_recipe(base, {}, {"method": method}, seed)
            run_dir = experiment / "trials" / trial_id
            run_training(RunSpec.of(tree, run_dir, verbose=False))
            score = evaluate_run(run_dir, yaml.safe_load((run_dir / "config.yaml").read_text()))
            rows.append(
                {
                    "trial_id": trial_id,
                    "method": _label(method),
                    "seed": seed,
                    "epochs_run": 3,
                    "stop_reason": "completed",
                    "run_dir": str(run_dir),
                    **_flatten_scores(score),
                }
            )
    return rows


@pytest.fixture(scope="module")
def experiment(tmp_path_factory) -> Path:
    """4 configurations (LF, 3 MNL) x 2 seeds, 3 epochs each, rows assembled as tune/search.py does."""
    root = tmp_path_factory.mktemp("report")
    shards = root / "shards"
    spec = small_spec()
    prepare_synthetic(shards, spec.model_copy(update={"samples": {"train": 256, "val": 128, "test": 128}}))
    base = recipe_dict(shards, schedule={"epochs": 3, "batch_size": 64})
    base["eval"]["corruptions"] = [{"modality": "visual", "name": "gaussian", "levels": list(LEVELS)}]
    if "tracking" in Recipe.model_fields:
        base["tracking"] = {"wandb": "disabled"}
    directory = root / "exp-report"
    write_results(_train_and_score(base, directory), directory)
    return directory


@pytest.fixture(scope="module")
def report(experiment) -> Path:
    return build_report(experiment)


def _rows(experiment: Path) -> list[dict]:
    return json.loads((experiment / "results.json").read_text())


def _stats(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values)


def _md_table(markdown: str, caption: str) -> list[dict[str, str]]:
    lines = markdown.splitlines()
    start = lines.index(f"**{caption}**") + 2
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append([cell.strip() for cell in line.strip("|").split(" | ")])
    header, body = table[0], table[2:]
    return [dict(zip(header, row)) for row in body]


def _check_cell(cell: str, expected: tuple[float, float], text: str) -> None:
    """A "mean ± std" cell matches the independent numbers (to its 4 decimals) and the HTML shows it."""
    mean, std = (float(x) for x in cell.split(" ± "))
    assert abs(mean - expected[0]) <= 5e-5 + 1e-12 and abs(std - expected[1]) <= 5e-5 + 1e-12, (cell, expected)
    assert f"{expected[0]:.4f} ± {expected[1]:.4f}" in text


def test_report_files_and_valid_pngs(report):
    out = report.parent
    assert report.name == "report.html" and out.name == "report" and (out / "report.md").is_file()
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["accuracy_curves.png", "imbalance_ratio.png", "lambda_sensitivity.png", "warmup_sensitivity.png"]
    for name in pngs:
        _assert_png((out / name).read_bytes())
        assert f"]({name})" in (out / "report.md").read_text()


def _assert_png(data: bytes) -> None:
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR" and data[-8:-4] == b"IEND"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 100 and height > 100


def test_leaderboard_matches_independent_mean_std(experiment, report):
    markdown, page = (report.parent / "report.md").read_text(), report.read_text()
    table = _md_table(markdown, "Leaderboard")
    rows = _rows(experiment)
    expected = {}
    for method in {r["method"] for r in rows}:
        trials = [r for r in rows if r["method"] == method]
        expected[method] = {
            "n": len(trials),
            "val": _stats([r["best_val"] for r in trials]),
            "test": _stats([r["test_acc"] for r in trials]),
            "audio": _stats([r["test_acc_audio"] for r in trials]),
        }
    assert sorted(row["method"] for row in table) == sorted(expected)
    vals = [expected[row["method"]]["val"][0] for row in table]
    assert vals == sorted(vals, reverse=True)  # ranked by val, never by test
    for row in table:
        want = expected[row["method"]]
        assert row["n"] == str(want["n"]) == "2"
        _check_cell(row["val acc"], want["val"], page)
        _check_cell(row["test acc"], want["test"], page)
        _check_cell(row["test acc audio"], want["audio"], page)


def test_ablation_table_in_mnl_paper_form(experiment, report):
    markdown, page = (report.parent / "report.md").read_text(), report.read_text()
    table = _md_table(markdown, "gaussian noise on visual: test acc vs ε")
    assert list(table[0]) == ["strategy", "configuration", "n", "ε=0", "ε=5", "ε=10"]
    assert [row["strategy"] for row in table][0] == "lf"
    rows = _rows(experiment)
    for strategy in set(STRATEGY):
        # the strategy's configuration with the best mean val; ties go to the first listed
        candidates = [_label(m) for m, s in zip(METHODS, STRATEGY) if s == strategy]
        mean_val = {c: statistics.mean(r["best_val"] for r in rows if r["method"] == c) for c in candidates}
        best = max(candidates, key=lambda c: (mean_val[c], -candidates.index(c)))
        trials = [r for r in rows if r["method"] == best]
        row = next(r for r in table if r["strategy"] == strategy)
        assert row["configuration"] == best and row["n"] == "2"
        _check_cell(row["ε=0"], _stats([r["test_acc"] for r in trials]), page)
        for level in LEVELS:
            _check_cell(row[f"ε={level}"], _stats([r[f"robust_gaussian_visual_{level}"] for r in trials]), page)
    assert len(table) == len(set(STRATEGY))


def test_sensitivity_and_robustness_tables(experiment, report):
    markdown, page = (report.parent / "report.md").read_text(), report.read_text()
    rows = _rows(experiment)
    lam = {
        r["trial_id"]: yaml.safe_load((experiment / "trials" / r["trial_id"] / "config.yaml").read_text())[
            "objective"
        ].get("lam")
        for r in rows
    }
    table = _md_table(markdown, "λ sensitivity")
    assert [(row["objective.name"], row["objective.lam"]) for row in table] == [("mnl", "0.3"), ("mnl", "1")]
    for row in table:
        trials = [r for r in rows if lam[r["trial_id"]] == float(row["objective.lam"])]
        assert row["n"] == str(len(trials))
        _check_cell(row["val acc"], _stats([r["best_val"] for r in trials]), page)
        _check_cell(row["test acc"], _stats([r["test_acc"] for r in trials]), page)
    warmup = _md_table(markdown, "warm-up epochs sensitivity")
    assert [row["objective.warmup_epochs"] for row in warmup] == ["0", "1"] and warmup[0]["n"] == "4"
    robust = _md_table(markdown, "Robustness")
    assert list(robust[0])[2:] == [
        "clean test acc",
        "audio missing",
        "visual missing",
        "gaussian visual ε=5",
        "gaussian visual ε=10",
    ]
    for row in robust:
        trials = [r for r in rows if r["method"] == row["method"]]
        _check_cell(row["visual missing"], _stats([r["robust_missing_visual"] for r in trials]), page)


def test_html_is_self_contained(report):
    page = report.read_text()
    assert "http://" not in page and "https://" not in page
    assert not re.search(r"<(script|link|iframe)\b|@import|url\(", page)
    sources = re.findall(r'\bsrc="([^"]*)"', page)
    assert len(sources) == 4 and len(re.findall(r"<img\b", page)) == 4
    for source in sources:
        assert source.startswith("data:image/png;base64,")
        _assert_png(base64.b64decode(source.split(",", 1)[1]))
    assert all(href.startswith("#") for href in re.findall(r'\bhref="([^"]*)"', page))


def test_sections_skip_with_a_note(experiment, tmp_path):
    """LF trials only, without corruption scores: ablation, λ and warm-up are skipped with a note."""
    rows = [
        {k: v for k, v in r.items() if not k.startswith("robust_gaussian")}
        for r in _rows(experiment)
        if r["method"] == _label(METHODS[0])
    ]
    write_results(rows, tmp_path)
    markdown = (build_report(tmp_path, tmp_path / "out").parent / "report.md").read_text()
    assert "Skipped: no robust_<corruption>_<modality>_<level> columns" in markdown
    assert "Skipped: objective.lam takes fewer than two values" in markdown
    assert "Skipped: objective.warmup_epochs takes fewer than two values" in markdown
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["accuracy_curves.png", "imbalance_ratio.png"]
    assert len(_md_table(markdown, "Robustness")) == 1


def test_group_by_resolved_keys(experiment, tmp_path):
    markdown = (build_report(experiment, tmp_path, group_by=["objective.name"]).parent / "report.md").read_text()
    table = {row["objective.name"]: row for row in _md_table(markdown, "Leaderboard")}
    assert table["lf"]["n"] == "2" and table["mnl"]["n"] == "6"
    mnl = [r for r in _rows(experiment) if not r["method"].startswith("objective.name=lf")]
    _check_cell(table["mnl"]["test acc"], _stats([r["test_acc"] for r in mnl]), markdown)
    with pytest.raises(ConfigError, match="no such column"):
        build_report(experiment, tmp_path, group_by=["objective.nope"])


# -- W&B Report -----------------------------------------------------------------------------------


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")


def test_wandb_report_builds_offline(experiment, offline, tmp_path, monkeypatch):
    import wandb_workspaces.reports.v2 as wr  # in the test extra: a missing package fails, never skips
    from wandb_workspaces import expr
    from wandb_workspaces.reports.v2 import interface

    from mmbalance.reports.wandb_report import build_wandb_report, load_report_spec, report_spec, write_wandb_report

    report = build_wandb_report(experiment, "mm-proj", "mm-ent")
    assert (report.entity, report.project) == ("mm-ent", "mm-proj")
    headings = [b.text for b in report.blocks if isinstance(b, wr.H1)]
    assert headings == [
        "Leaderboard",
        "Robustness in the MNL paper's ablation form",
        "Per-modality accuracy over epochs",
        "λ sensitivity",
        "warm-up epochs sensitivity",
        "Imbalance ratio over epochs",
        "Missing-modality and corruption robustness",
    ]
    grids = [b for b in report.blocks if isinstance(b, wr.PanelGrid)]
    panels = [p for g in grids for p in g.panels]
    assert {type(p).__name__ for p in panels} >= {"BarPlot", "RunComparer", "LinePlot", "ParallelCoordinatesPlot"}
    assert sum(isinstance(b, wr.MarkdownBlock) for b in report.blocks) >= 5
    for runset in (r for g in grids for r in g.runsets):
        assert (runset.entity, runset.project, runset.filters) == ("mm-ent", "mm-proj", "Group = 'exp-report'")
        leaf = expr.expr_to_filters(runset.filters)
        assert (leaf.key.section, leaf.key.name, leaf.op, leaf.value) == ("run", "group", "=", "exp-report")
    lines = {y for p in panels if isinstance(p, wr.LinePlot) for y in p.y}
    assert lines == {"val/acc_fused", "val/acc_audio", "val/acc_visual", "val/imbalance_ratio"}
    # A search made with its own id groups its runs by name and id: the report selects that group.
    from mmbalance.tracking.records import experiment_group

    group = experiment_group(experiment)
    assert group.startswith("exp-report-") and len(group) == len("exp-report-") + 8
    regrouped = build_wandb_report(experiment, "mm-proj", "mm-ent")
    assert {r.filters for b in regrouped.blocks if isinstance(b, wr.PanelGrid) for r in b.runsets} == {
        f"Group = '{group}'"
    }
    (experiment / "experiment_id.json").unlink()
    parallel = next(p for p in panels if isinstance(p, wr.ParallelCoordinatesPlot))
    searched = ["objective.name", "objective.lam", "objective.warmup_epochs", "objective.guidance", "objective.scope"]
    assert [c.metric for c in parallel.columns] == [*map(wr.Config, searched), wr.SummaryMetric("val/best_acc")]

    spec_path = write_wandb_report(report, tmp_path)
    spec = json.loads(spec_path.read_text())
    assert spec["__type__"] == "Report" and report_spec(load_report_spec(spec)) == spec
    # The server-side model, as the library's own tests build it: the project lookup stubbed.
    monkeypatch.setattr(interface, "_get_api", lambda: None)
    monkeypatch.setattr(interface, "execute_graphql", lambda api, query, variables: {"project": {"internalId": "p1"}})
    model = load_report_spec(spec)._to_model()
    assert model.project.entity_name == "mm-ent" and len(model.spec.blocks) > len(report.blocks)


def test_wandb_report_without_the_extra(experiment, monkeypatch):
    from mmbalance.reports.wandb_report import MissingExtra, build_wandb_report

    for name in ("wandb_workspaces", "wandb_workspaces.reports", "wandb_workspaces.reports.v2"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(MissingExtra, match=r"pip install 'mmbalance\[reports\]'"):
        build_wandb_report(experiment, "p", "e")


def test_report_command(experiment, offline, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="mmbalance")
    add_report_parser(parser.add_subparsers(dest="command", required=True))
    argv = ["report", str(experiment), "--out", str(tmp_path / "out"), "--group-by", "method"]
    try:
        import wandb_workspaces  # noqa: F401

        argv += ["--wandb", "--wandb-project", "mm-proj", "--wandb-entity", "mm-ent"]
    except ImportError:
        pass
    args = parser.parse_args(argv)
    html = args.func(args)
    lines = capsys.readouterr().out.strip().splitlines()
    assert html == tmp_path / "out" / "report.html" and html.is_file() and (tmp_path / "out" / "report.md").is_file()
    assert lines[-1] == f"report written to {html}"
    if "--wandb" in argv:
        assert (tmp_path / "out" / "wandb_report.json").is_file()
        assert any("mmbalance report" in line and "--wandb" in line for line in lines)


def test_missing_results_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="results.parquet"):
        build_report(tmp_path)
