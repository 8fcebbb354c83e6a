"""``mmbalance compare`` end to end on Ray Tune (integration): a method made broken on purpose
ranks last and is called significantly worse; LF under a second name is found no different."""

import json
import shutil
import subprocess

import pandas as pd
import pytest
import yaml

from helpers import recipe_dict

pytestmark = pytest.mark.integration


def test_a_broken_method_ranks_last_and_a_copy_of_lf_is_no_different(ray_cluster, small_shards, tmp_path):
    study = {
        "methods": {
            "lf": {"set": {"objective.name": "lf"}, "space": {"optim.lr": {"choice": [0.003]}}},
            "lf_again": {"set": {"objective.name": "lf"}, "space": {"optim.lr": {"choice": [0.003]}}},
            "broken": {"set": {"objective.name": "lf"}, "space": {"optim.lr": {"choice": [10.0]}}},
        },
        "common_space": {},
        "modalities_alone": False,
        "baseline": "lf",
        "budget": {"trials": 1, "seeds": [0], "scheduler": {"name": "fifo"}},
        "seeds": [0, 1, 2, 3, 4],
        "max_concurrent": 2,
        "workers": 0,
    }
    study_file, recipe = tmp_path / "study.yaml", tmp_path / "recipe.yaml"
    study_file.write_text(yaml.safe_dump(study))
    recipe.write_text(yaml.safe_dump(recipe_dict(small_shards)))
    out = tmp_path / "study"
    done = subprocess.run(
        [
            shutil.which("mmbalance"),
            "compare",
            str(study_file),
            "--recipe",
            str(recipe),
            "--output",
            str(out),
            "--address",
            ray_cluster.get_runtime_context().gcs_address,
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    frame = pd.read_parquet(out / "results.parquet")
    assert sorted(frame.groupby(["method", "phase"]).size().items()) == [
        (("broken", "final"), 5),
        (("broken", "search"), 1),
        (("lf", "final"), 5),
        (("lf", "search"), 1),
        (("lf_again", "final"), 5),
        (("lf_again", "search"), 1),
    ]
    summary = json.loads((out / "study.json").read_text())
    verdicts = {row["method"]: row for row in summary["vs_baseline"]["test_acc"]}
    assert verdicts["broken"]["verdict"] == "worse", verdicts
    assert verdicts["lf_again"]["verdict"] == "no significant difference", verdicts
    final = frame[frame["phase"] == "final"]
    means = final.groupby("method")["test_acc"].mean()
    assert means.idxmin() == "broken"
    assert summary["methods"]["lf"]["scores"]["test_acc"]["mean"] == pytest.approx(means["lf"])
    # Equal budgets, chosen on val: every method ran the same number of search trials.
    assert {m["budget"]["trials"] for m in summary["methods"].values()} == {1}
    table = done.stdout[done.stdout.index("method ") :]
    assert "broken" in table and "worse" in table and "no significant difference" in table
