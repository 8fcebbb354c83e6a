"""`ray job submit` end to end against a real local head with token auth (slow).

Starts its own head (`ray start --head`, token auth as Ray 2.60 configures it) with its own
HOME, so the token and session files stay in the test's directory; other modules' Ray is
shut down by then (the shared fixture is module-scoped: one Ray instance per host).
"""

import os
import shutil
import subprocess

import pandas as pd
import pytest
import yaml

from helpers import REPO, free_port, recipe_dict

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), RAY_AUTH_MODE="token", RAY_USAGE_STATS_ENABLED="0")
    ray = shutil.which("ray")
    subprocess.run([ray, "get-auth-token", "--generate"], env=env, check=True, capture_output=True, text=True)
    dashboard = free_port()
    started = subprocess.run(
        [
            ray,
            "start",
            "--head",
            "--node-ip-address=127.0.0.1",
            f"--port={free_port()}",
            f"--dashboard-port={dashboard}",
            "--dashboard-host=127.0.0.1",
            "--num-cpus=4",
            "--object-store-memory=300000000",
            "--disable-usage-stats",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert started.returncode == 0, started.stderr
    try:
        yield env, f"http://127.0.0.1:{dashboard}"
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True, timeout=120)


def _submit(env, address, *command):
    return subprocess.run(
        [
            shutil.which("ray"),
            "job",
            "submit",
            "--address",
            address,
            "--runtime-env",
            str(REPO / "clusters" / "runtime_env.yaml"),
            "--",
            *command,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_tune_job_submitted_with_the_shipped_runtime_env_succeeds(head, small_shards, tmp_path):
    env, address = head
    space = tmp_path / "space.yaml"
    space.write_text(
        yaml.safe_dump(
            {
                "space": {"optim.lr": {"choice": [0.001, 0.01]}},
                "samples": 2,
                "scheduler": {"name": "fifo"},
                "max_concurrent": 2,
                "workers": 0,
            }
        )
    )
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(recipe_dict(small_shards)))
    out = tmp_path / "search"
    done = _submit(env, address, "mmbalance", "tune", str(space), "--recipe", str(recipe), "--output", str(out))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "succeeded" in done.stdout.lower()
    frame = pd.read_parquet(out / "results.parquet")
    assert len(frame) == 2 and frame["test_acc"].notna().all()


def test_job_with_a_bad_recipe_fails_with_the_validation_message(head, small_shards, tmp_path):
    env, address = head
    recipe = tmp_path / "recipe.yaml"
    tree = recipe_dict(small_shards)
    tree["optim"]["lr"] = -1.0
    recipe.write_text(yaml.safe_dump(tree))
    done = _submit(env, address, "mmbalance", "train", "--recipe", str(recipe), "--output", str(tmp_path / "run"))
    assert done.returncode != 0
    assert "failed" in (done.stdout + done.stderr).lower()
    assert "optim.lr: Input should be greater than 0" in done.stdout + done.stderr
