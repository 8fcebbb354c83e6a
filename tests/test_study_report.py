"""The study report: a hand-made study (the final runs of test_study's helpers plus search rows),
rendered, and its numbers checked against a recomputation from results.parquet with pandas and
scipy; the page makes no request; ``mmbalance report`` picks the study report for a study."""

from __future__ import annotations

import re

import pandas as pd
import pytest
from scipy import stats

from helpers.study_rows import study_dir
from mmbalance.cli import main
from mmbalance.reports.study_report import write_study_report


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    directory, frame = study_dir(tmp_path_factory.mktemp("report"))
    return directory, frame, write_study_report(directory).read_text()


def _section(page: str, key: str) -> str:
    return page.split(f'<section id="{key}">', 1)[1].split("</section>", 1)[0]


def _half_width(values) -> float:
    values = pd.Series(values, dtype=float)
    return stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / len(values) ** 0.5


def test_the_page_is_self_contained_and_names_every_method(study):
    directory, frame, page = study
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    images = re.findall(r"<img [^>]*src=\"([^\"]*)\"", page)
    assert len(images) >= 5 and all(src.startswith("data:image/png;base64,") for src in images)
    for name in frame["method"].unique():
        assert name in _section(page, "leaderboard")
    assert (directory / "report" / "report.md").is_file() and (directory / "report" / "shapley.png").is_file()
    assert page.index('id="verdict"') < page.index('id="leaderboard"')


def test_the_verdict_names_a_winner_only_where_the_corrected_test_rejects(study):
    verdict = _section(study[2], "verdict")
    sentences = re.findall(r"<p>([^<]*)</p>", verdict)
    lf_again = next(s for s in sentences if s.startswith("lf_again vs lf"))
    broken = next(s for s in sentences if s.startswith("broken vs lf"))
    assert "no significant difference" in lf_again and "wins" not in lf_again
    assert "lf wins, broken is significantly worse" in broken
    assert "not compared" in next(s for s in sentences if s.startswith("alone:audio"))
    assert "chosen on val" in verdict and "(baseline)" in verdict


def test_leaderboard_and_differences_equal_a_recomputation_from_the_parquet(study):
    _, frame, page = study
    final = frame[frame["phase"] == "final"]
    board = _section(page, "leaderboard")
    for name, rows in final.groupby("method"):
        for column in ("test_acc", "best_val"):
            assert f"{rows[column].mean():.4f} ± {_half_width(rows[column]):.4f}" in board, (name, column)
    ranked = final.groupby("method")["best_val"].mean().sort_values(ascending=False, kind="stable").index
    positions = [board.index(f"<td>{name}</td>") for name in ranked]
    assert positions == sorted(positions)  # ranked by val
    lf = final[final["method"] == "lf"].sort_values("seed")["test_acc"].to_numpy()
    broken = final[final["method"] == "broken"].sort_values("seed")["test_acc"].to_numpy()
    diff = broken - lf
    low, high = diff.mean() - _half_width(diff), diff.mean() + _half_width(diff)
    differences = _section(page, "differences")
    assert f"{diff.mean():+.4f} [{low:+.4f}, {high:+.4f}]" in differences
    assert "vs the best modality alone, alone:visual" in differences  # chosen on val, not test (audio)
    shapley = final[final["method"] == "broken"]["test_shapley_audio"]
    assert f"{shapley.mean():.4f} ± {_half_width(shapley):.4f}" in _section(page, "shapley")
    robust = final[final["method"] == "lf"]["robust_missing_audio"].mean()
    assert f"<td>{robust:.4f}</td>" in _section(page, "robustness")


def test_gaps_budget_and_sensitivity_sections(study):
    _, frame, page = study
    gaps = _section(page, "undertraining")
    assert "visual: under-training gap" in gaps and "data:image/png" in gaps
    budget = _section(page, "budget")
    epochs = frame[(frame["phase"] == "search") & (frame["method"] == "lf")]["epochs_run"].sum()
    assert "The budgets are equal: every method had 4 search trials" in budget and f"<td>{epochs}</td>" in budget
    sensitivity = _section(page, "sensitivity")
    assert "lf_again: optim.lr, objective.lam." in sensitivity and "lf: optim.lr." in sensitivity
    assert "test" not in sensitivity.replace("Test is not shown here", "")


def test_unequal_budgets_are_stated_loudly(tmp_path):
    directory, _ = study_dir(tmp_path, {"lf": 4, "lf_again": 4, "broken": 2, "alone:visual": 4, "alone:audio": 4})
    budget = _section(write_study_report(directory).read_text(), "budget")
    assert "BUDGETS ARE NOT EQUAL" in budget and "broken 2" in budget and "color:#b00000" in budget


def test_mmbalance_report_on_a_study_directory_writes_the_study_report(tmp_path, capsys):
    directory, _ = study_dir(tmp_path)
    assert main(["report", str(directory)]) == 0
    page = (directory / "report" / "report.html").read_text()
    assert "Study report: study" in page and 'id="verdict"' in page
    assert str(directory / "report" / "report.html") in capsys.readouterr().out
