"""No secret on disk: after `train`, `tune --workers 0|1` and `submit`, no file under the run
directory, the experiment directory or Ray's temp/session directory holds a secret.

Fake secrets (WANDB_API_KEY plus other *_API_KEY / *_TOKEN names; never RAY_AUTH_TOKEN, which
would change Ray's auth) are set in this module's environment before its Ray starts, so they are
also in every Ray node process's environment, as on a cluster whose nodes carry the key
(docs/clusters.md). W&B is asked for ``online`` against a closed local port: ``resolve_mode``
falls back to offline (no network needed), while the key is still in the driver's environment,
which is what Ray's own ``WandbLoggerCallback`` copied into the logging actors' runtime_env and so
into ``runtime_env_agent.log``. The Ray tests share one Ray per module, started here with its
own ``_temp_dir`` so that the whole of Ray's on-disk state is scanned.
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

from helpers import free_port, recipe_dict
from mmbalance.config import ConfigError
from mmbalance.launch.submit import refuse_secrets
from mmbalance.tracking import search_wandb
from mmbalance.tracking.wandb_tracker import sanitize, secret_values

FAKES = {
    "WANDB_API_KEY": "fakewandb" + secrets.token_hex(20),  # 49 chars: wandb wants 40+
    "MMB_TEST_API_KEY": "fakeapikey" + secrets.token_hex(12),
    "SOME_SERVICE_TOKEN": "faketoken" + secrets.token_hex(12),
}
ACTOR_KEY = "fakefilekey" + secrets.token_hex(20)  # only ever passed through the driver-side key file
ALL_SECRETS = [*FAKES.values(), ACTOR_KEY]
CLOSED_URL = f"http://127.0.0.1:{free_port()}"  # nothing listens: `online` falls back to offline at once


def leaks(*roots: Path) -> list[str]:
    """Every regular file under ``roots`` that holds one of the fake secrets (symlinks and
    sockets skipped): ``path: VARIABLE``."""
    found = []
    for root in roots:
        for path in Path(root).rglob("*"):
            if path.is_symlink() or not path.is_file():
                continue
            try:
                data = path.read_bytes()
            except OSError:  # removed while we looked
                continue
            found += [
                f"{path}: {name}" for name, value in [*FAKES.items(), ("key file", ACTOR_KEY)] if value.encode() in data
            ]
    return found


# -- without Ray -------------------------------------------------------------------------------


def test_key_file_is_private_read_back_and_removed(monkeypatch):
    path = search_wandb.write_key_file(ACTOR_KEY)
    try:
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        monkeypatch.delenv("WANDB_API_KEY", raising=False)
        search_wandb.load_key_file(str(path))
        assert os.environ["WANDB_API_KEY"] == ACTOR_KEY
    finally:
        search_wandb.remove_key_file(path)
        search_wandb.remove_key_file(path)  # twice is harmless (end of search, then atexit)
    assert not path.parent.exists()


def test_only_an_online_driver_with_an_env_key_writes_a_key_file(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", ACTOR_KEY)
    assert search_wandb.driver_key_file("offline") is None
    assert search_wandb.driver_key_file("disabled") is None
    path = search_wandb.driver_key_file("online")
    try:
        assert path.read_text() == ACTOR_KEY
    finally:
        search_wandb.remove_key_file(path)
    monkeypatch.delenv("WANDB_API_KEY")
    assert search_wandb.driver_key_file("online") is None


def test_sanitize_redacts_every_secret_named_variable_value(monkeypatch):
    for name, value in FAKES.items():
        monkeypatch.setenv(name, value)
    config = {"note": f"token={FAKES['SOME_SERVICE_TOKEN']}", "path": "/data", "list": [FAKES["MMB_TEST_API_KEY"]]}
    assert sanitize(config, secret_values()) == {"note": "<redacted>", "path": "/data", "list": ["<redacted>"]}
    assert sanitize({"a": "x"}, "") == {"a": "x"}  # an empty key redacts nothing


@pytest.mark.parametrize(
    "env_vars", [{"WANDB_API_KEY": "x"}, {"RAY_AUTH_TOKEN": "x"}, {"MY_SERVICE_API_KEY": "x"}, {"GITHUB_TOKEN": "x"}]
)
def test_submit_refuses_a_runtime_env_with_a_secret_name(env_vars):
    with pytest.raises(ConfigError, match="env_vars"):
        refuse_secrets("mmbalance train --recipe r.yaml", {"env_vars": {"WANDB_PROJECT": "p", **env_vars}})


def test_submit_refuses_a_secret_value_in_the_command_or_runtime_env(monkeypatch):
    monkeypatch.setenv("SOME_SERVICE_TOKEN", FAKES["SOME_SERVICE_TOKEN"])
    with pytest.raises(ConfigError, match="secret environment variable"):
        refuse_secrets(f"mmbalance train --set note={FAKES['SOME_SERVICE_TOKEN']}", {})
    with pytest.raises(ConfigError, match="secret environment variable"):
        refuse_secrets("mmbalance train", {"env_vars": {"NOTE": FAKES["SOME_SERVICE_TOKEN"]}})
    refuse_secrets(
        "mmbalance train --recipe r.yaml",
        {"env_vars": {"WANDB_PROJECT": "p", "WANDB_IDENTITY_TOKEN_FILE": "/var/run/t"}},
    )


# -- one Ray for the commands below ------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A local Ray whose whole temp dir is ours to scan; the fakes are set before it starts, so
    every Ray process inherits them (as on nodes that carry the key)."""
    import ray

    temp_dir = Path(tempfile.mkdtemp(prefix="mmb-sec-", dir="/tmp"))  # short: Ray's socket paths must fit
    with pytest.MonkeyPatch.context() as patch:
        for name, value in {**FAKES, "WANDB_BASE_URL": CLOSED_URL, "RAY_USAGE_STATS_ENABLED": "0"}.items():
            patch.setenv(name, value)
        patch.setenv("RAY_AUTH_MODE", os.environ.get("RAY_AUTH_MODE", "disabled"))
        context = ray.init(
            num_cpus=4,
            object_store_memory=200 * 1024**2,
            include_dashboard=True,
            log_to_driver=False,
            _temp_dir=str(temp_dir),
        )
        try:
            yield {
                "ray": ray,
                "temp_dir": temp_dir,
                "gcs": ray.get_runtime_context().gcs_address,
                "dashboard": f"http://{context.dashboard_url}",
            }
        finally:
            ray.shutdown()
            shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture()
def files(tmp_path, small_shards):
    """A one-trial search space and a 2-epoch recipe with W&B on (see the module docstring)."""
    tree = recipe_dict(small_shards, tracking={"wandb": "online"})
    tree["schedule"] = {"epochs": 2, "batch_size": 32}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(tree))
    (tmp_path / "space.yaml").write_text(
        yaml.safe_dump(
            {
                "space": {"optim.lr": {"choice": [0.001]}},
                "samples": 1,
                "scheduler": {"name": "fifo"},
                "max_concurrent": 1,
            }
        )
    )
    return tmp_path


def _mmbalance(*args: str, cwd: Path) -> str:
    env = {**os.environ, **FAKES, "WANDB_BASE_URL": CLOSED_URL}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(
        [shutil.which("mmbalance"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=400
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def _assert_clean(cluster, out: Path) -> None:
    scanned = [p for p in out.rglob("*") if p.is_file()]
    assert any("wandb" in p.parts for p in scanned), "W&B must have logged (offline) for the scan to mean anything"
    assert leaks(out, cluster["temp_dir"]) == []


@pytest.mark.integration
def test_logging_actor_gets_the_key_from_the_file_not_a_runtime_env(cluster):
    ray = cluster["ray"]
    options = search_wandb.logging_actor_options()
    assert "runtime_env" not in options and options["num_cpus"] == 0 and options["max_restarts"] == 0

    @ray.remote(**options)
    class Probe:
        def key(self, path):
            search_wandb.load_key_file(path)
            return os.environ.get("WANDB_API_KEY")

    path = search_wandb.write_key_file(ACTOR_KEY)
    try:
        assert ray.get(Probe.remote().key.remote(str(path))) == ACTOR_KEY
    finally:
        search_wandb.remove_key_file(path)


@pytest.mark.integration
def test_train_writes_no_secret(files):
    """In-process training (Ray-based training is what a tune --workers 1 trial runs)."""
    _mmbalance("train", "--recipe", str(files / "recipe.yaml"), "--output", str(files / "run"), cwd=files)
    assert leaks(files / "run") == [] and (files / "run" / "wandb").is_dir()


@pytest.mark.integration
@pytest.mark.parametrize("workers", ["0", "1"])
def test_tune_writes_no_secret(cluster, files, workers):
    log = _mmbalance(
        "tune",
        str(files / "space.yaml"),
        "--recipe",
        str(files / "recipe.yaml"),
        "--output",
        str(files / "search"),
        "--workers",
        workers,
        "--address",
        cluster["gcs"],
        cwd=files,
    )
    _assert_clean(cluster, files / "search")
    assert "core_worker.cc" not in log  # the logging actor's max_restarts error line (logging_actor_options)


@pytest.mark.integration
def test_submitted_search_writes_no_secret(cluster, files):
    command = [
        "tune",
        str(files / "space.yaml"),
        "--recipe",
        str(files / "recipe.yaml"),
        "--output",
        str(files / "search"),
        "--workers",
        "0",
    ]
    log = _mmbalance("submit", "--address", cluster["dashboard"], "--runtime-env", "", "--", *command, cwd=files)
    assert "SUCCEEDED" in log
    _assert_clean(cluster, files / "search")
