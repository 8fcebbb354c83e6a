"""The precedence table of README.md ("Precedence"), one test per row, without starting Ray.

Recipe keys, lowest to highest: recipe file < the space's ``set:`` < ``--set`` < the drawn value.
Ray address: ``--address`` > ``RAY_ADDRESS`` (and ``RAY_API_SERVER_ADDRESS`` for ``submit``) >
a local Ray.
"""

import argparse

import pandas as pd
import pytest
import yaml

from helpers import REPO, recipe_dict
from mmbalance.cli import main
from mmbalance.config import ConfigError
from mmbalance.launch import cluster
from mmbalance.launch import submit as jobs
from mmbalance.tune.space import SearchSpace, trial_recipe, validate_against

QUICKSTART = str(REPO / "search_spaces" / "quickstart.yaml")  # set: objective.name mnl, schedule.epochs 9


def _space(**fields) -> SearchSpace:
    return SearchSpace.model_validate({"scheduler": {"name": "fifo"}, **fields})


# -- recipe keys ---------------------------------------------------------------------------


def test_space_set_beats_the_recipe_file():
    tree = trial_recipe({"schedule": {"epochs": 12}}, {"schedule.epochs": 9}, {}, 0)
    assert tree["schedule"]["epochs"] == 9


def test_user_set_beats_the_space_set():
    tree = trial_recipe(
        {"objective": {"name": "lf"}}, {"objective.name": "mnl"}, {}, 0, overrides={"objective.name": "arm"}
    )
    assert tree["objective"]["name"] == "arm"


def test_user_set_beats_the_space_set_on_the_command_line(small_shards, tmp_path, monkeypatch, capsys):
    """`tune quickstart --set schedule.epochs=12`: the trials get 12 epochs, not the space's 9."""
    import mmbalance.tune.search as search

    seen = {}

    def fake_run_search(space, base, output, run):
        seen.update(base=base, overrides=run.overrides, space=space)
        return pd.DataFrame(columns=[*space.space, "seed", "stop_reason", "best_val", "test_acc"])

    monkeypatch.setattr(search, "run_search", fake_run_search)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(recipe_dict(small_shards)))
    assert (
        main(
            [
                "tune",
                QUICKSTART,
                "--recipe",
                str(recipe),
                "--output",
                str(tmp_path / "out"),
                "--set",
                "schedule.epochs=12",
                "--wandb",
                "disabled",
            ]
        )
        == 0
    )
    assert "note: --set schedule.epochs=12 beats the space's set: schedule.epochs: 9" in capsys.readouterr().out
    space, base, overrides = seen["space"], seen["base"], seen["overrides"]
    assert base == yaml.safe_load(recipe.read_text())  # the recipe file alone: --set travels separately
    assert overrides == {"schedule.epochs": 12, "tracking.wandb": "disabled"}
    tree = trial_recipe(base, space.set, {"objective.lam": 0.1}, 0, overrides=overrides)
    assert tree["schedule"]["epochs"] == 12 and tree["objective"]["name"] == "mnl"


def test_the_draw_beats_user_set_so_a_searched_key_in_set_is_refused(small_shards):
    space = _space(space={"objective.lam": {"choice": [0.1, 0.5]}}, set={"objective.name": "mnl"})
    with pytest.raises(ConfigError, match=r"--set objective.lam: the search space searches objective.lam"):
        validate_against(space, recipe_dict(small_shards), {"objective.lam": 1.0})
    assert trial_recipe({}, {}, {"objective.lam": 0.1}, 0, overrides={"objective.lam": 1.0})["objective"]["lam"] == 0.1


def test_a_searched_key_in_set_exits_2_naming_the_key(small_shards, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(
        [
            "tune",
            QUICKSTART,
            "--recipe",
            str(REPO / "trainables" / "synthetic.yaml"),
            "--output",
            str(out),
            "--set",
            f"data.path={small_shards}",
            "objective.guidance=confidence",
        ]
    )
    assert code == 2
    assert "mmbalance tune: error: --set objective.guidance: the search space searches" in capsys.readouterr().err
    assert not out.exists()  # refused before the output (or Ray) was touched


@pytest.mark.parametrize("key", ["seed", "model.fusion", "model"])
def test_a_set_of_a_seed_or_a_bundled_key_is_refused(small_shards, key):
    bundles = {"grid": [{"objective.name": "arm", "model.fusion": "concat"}, {"objective.name": "lf"}]}
    space = _space(space={"method": bundles})
    with pytest.raises(ConfigError, match=f"--set {key}:"):
        validate_against(space, recipe_dict(small_shards), {key: 1})


# -- Ray address ---------------------------------------------------------------------------


def test_address_flag_beats_ray_address(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.9:6379")
    address, where = cluster.choose_address("10.0.0.1:6379")
    assert address == "10.0.0.1:6379"
    assert where == "from --address; RAY_ADDRESS=10.0.0.9:6379 ignored"


def test_ray_address_beats_a_local_ray(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.9:6379")
    assert cluster.choose_address(None) == ("10.0.0.9:6379", "from RAY_ADDRESS; no --address given")
    monkeypatch.delenv("RAY_ADDRESS")
    assert cluster.choose_address(None)[0] is None


@pytest.mark.parametrize(
    "flag, expected, line",
    [
        (
            "10.0.0.1:6379",
            "10.0.0.1:6379",
            "Ray address 10.0.0.1:6379 (from --address; RAY_ADDRESS=10.0.0.9:6379 ignored)",
        ),
        (None, "10.0.0.9:6379", "Ray address 10.0.0.9:6379 (from RAY_ADDRESS; no --address given)"),
    ],
)
def test_prepare_uses_the_same_address_rule_and_says_so(monkeypatch, capsys, flag, expected, line):
    import ray

    from mmbalance.commands.prepare import _start_ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.9:6379")
    assert _start_ray(flag, None) is True
    assert calls[0]["address"] == expected and line in capsys.readouterr().out


def test_connect_passes_the_chosen_address_to_ray_and_says_so(monkeypatch, capsys):
    """``tune`` and ``train --workers`` connect through ``connect``; ray.init is faked here."""
    import ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.9:6379")
    assert cluster.connect(cluster.Request(workers=1), "10.0.0.1:6379") is False
    assert calls[0]["address"] == "10.0.0.1:6379"
    assert "Ray address 10.0.0.1:6379 (from --address; RAY_ADDRESS=10.0.0.9:6379 ignored)" in capsys.readouterr().out


class _RecordingClient:
    """Records the address and the environment the SDK would read when the client is built."""

    instances = []

    def __init__(self, address=None):
        import os

        self.address, self.env = address, {v: os.environ.get(v) for v in jobs.ADDRESS_VARIABLES}
        _RecordingClient.instances.append(self)

    def submit_job(self, **kwargs):
        return "raysubmit_1"

    def get_address(self):
        return self.address


def _submit_args(address=None) -> argparse.Namespace:
    return argparse.Namespace(
        argv=["--", "train", "--recipe", "r.yaml"], runtime_env="", address=address, submission_id=None, no_wait=True
    )


def test_submit_address_flag_beats_the_environment(monkeypatch, capsys):
    import os

    import ray.job_submission

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", _RecordingClient)
    monkeypatch.setenv("RAY_ADDRESS", "http://other:8265")
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://api:8265")
    assert jobs.submit(_submit_args("http://head:8265")) == 0
    client = _RecordingClient.instances[-1]
    assert client.address == "http://head:8265"
    assert client.env == {"RAY_API_SERVER_ADDRESS": None, "RAY_ADDRESS": None}  # hidden from the SDK
    assert os.environ["RAY_ADDRESS"] == "http://other:8265"  # and back afterwards
    out = capsys.readouterr().out
    assert (
        "submitted job raysubmit_1 to http://head:8265 (from --address; RAY_API_SERVER_ADDRESS=http://api:8265 "
        "ignored; RAY_ADDRESS=http://other:8265 ignored)" in out
    )


def test_submit_without_the_flag_uses_the_environment(monkeypatch, capsys):
    import ray.job_submission

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", _RecordingClient)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_ADDRESS", "http://other:8265")
    assert jobs.submit(_submit_args()) == 0
    assert _RecordingClient.instances[-1].address == "http://other:8265"
    assert "(from RAY_ADDRESS; no --address given)" in capsys.readouterr().out
