"""Failures are loud: a search whose trials fail exits non-zero with the first error of each
kind, and a combination of space values that cannot train is refused before Ray starts."""

import threading
from dataclasses import replace

import pandas as pd
import pytest
import yaml

from helpers import recipe_dict
from mmbalance.cli import main
from mmbalance.tune.search import SearchFailed, check_failures


def _files(tmp_path, shards, space: dict, **recipe_sections):
    space_file, recipe_file = tmp_path / "space.yaml", tmp_path / "recipe.yaml"
    space_file.write_text(yaml.safe_dump(space, sort_keys=False))
    recipe_file.write_text(yaml.safe_dump(recipe_dict(shards, **recipe_sections)))
    return str(space_file), str(recipe_file)


def test_a_bad_combination_exits_2_naming_it_before_ray_starts(small_shards, tmp_path, monkeypatch, capsys):
    """Each value fits on its own (arm with auto fusion, lf with mean); arm with mean does not."""
    import ray

    import mmbalance.launch.cluster as cluster

    monkeypatch.setattr(cluster, "connect", lambda *a, **k: pytest.fail("Ray must not start"))
    space, recipe = _files(
        tmp_path,
        small_shards,
        {
            "space": {"objective.name": {"choice": ["lf", "arm"]}, "model.fusion": {"grid": ["auto", "mean"]}},
            "scheduler": {"name": "fifo"},
        },
    )
    out = tmp_path / "out"
    assert main(["tune", space, "--recipe", recipe, "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert (
        "mmbalance tune: error: search space combination {objective.name: arm, model.fusion: mean} "
        "does not fit the recipe" in err
    )
    assert "needs model.fusion in [concat]" in err
    assert not out.exists() and not ray.is_initialized()


def test_failed_fraction_is_a_validated_space_key(tmp_path):
    from mmbalance.config import ConfigError
    from mmbalance.tune.space import load_space

    with pytest.raises(SearchFailed, match="every trial failed"):
        check_failures([("t1", "ValueError", "bad")], 1, 1.0)
    check_failures([("t1", "ValueError", "bad")], 2, 0.5)  # half failed: allowed at 0.5
    with pytest.raises(SearchFailed, match="2 of 3 trials failed, more than max_failed_fraction=0.5"):
        check_failures([("t1", "ValueError", "bad"), ("t2", "ValueError", "bad again")], 3, 0.5)
    path = tmp_path / "space.yaml"
    path.write_text("max_failed_fraction: 1.5\n")
    with pytest.raises(ConfigError, match="max_failed_fraction"):
        load_space(path)


@pytest.mark.integration
def test_a_search_whose_trials_all_die_exits_1_with_the_first_error(
    ray_cluster, small_shards, tmp_path, monkeypatch, capsys
):
    """Every trial process dies in its first step, on every attempt (the test keeps re-arming the
    one-shot ``fault_hook``): Tune gives up on each after its retry; the command exits 1 and says
    why, and results.parquet records every trial with stop_reason ``error``."""
    import mmbalance.tune.search as search

    marker = tmp_path / "kill-marker"
    fault = {"rank": 0, "epoch": 0, "step": 0, "once_file": str(marker), "delay_s": 0.0}
    real_run_search = search.run_search

    def run_search_with_fault(space, base, output, run):
        return real_run_search(space, base, output, replace(run, fault=fault))

    monkeypatch.setattr(search, "run_search", run_search_with_fault)
    space, recipe = _files(
        tmp_path,
        small_shards,
        {
            "space": {"optim.lr": {"choice": [0.001]}},
            "seeds": [0, 1],
            "scheduler": {"name": "fifo"},
            "max_concurrent": 1,  # one at a time: two trials at step 0 within one re-arm interval share a marker
            "workers": 0,
        },
        schedule={"epochs": 2, "batch_size": 32},
    )
    out = tmp_path / "out"
    done = threading.Event()

    def rearm():  # the hook fires once per marker file: removing it lets it fire again
        while not done.wait(0.05):
            marker.unlink(missing_ok=True)

    thread = threading.Thread(target=rearm, daemon=True)
    thread.start()
    try:
        with pytest.raises(SystemExit) as exited:
            main(["tune", space, "--recipe", recipe, "--output", str(out)])
    finally:
        done.set()
        thread.join()
    assert exited.value.code == 1
    err = capsys.readouterr().err
    assert "mmbalance tune: error: the search failed: every trial failed" in err
    assert "first error of each kind:" in err and "ActorDiedError (2 trials; first: trial" in err
    frame = pd.read_parquet(out / "results.parquet")
    assert len(frame) == 2 and set(frame["stop_reason"]) == {"error"}


def test_combination_checks_are_capped_but_every_value_is_checked():
    from mmbalance.tune.space import MAX_CHECKED_COMBINATIONS, SearchSpace, probe_combinations

    values = list(range(10))
    space = SearchSpace.model_validate({"space": {f"optim.k{i}": {"choice": values} for i in range(4)}})  # 10^4 combos
    probes = probe_combinations(space)
    assert len(probes) == MAX_CHECKED_COMBINATIONS
    for key in space.space:
        assert {p[key] for p in probes} == set(values)
