"""clusters/ holds configuration only, valid for the tools that read it, with no secret in it;
``mmbalance submit`` (mmbalance/launch/submit.py) drives the Ray Job SDK correctly. No Ray cluster starts.

Cluster-launcher YAMLs are checked the way ``ray up`` checks them (ray/autoscaler/_private/
commands.py ``_bootstrap_config``): ``prepare_config`` merges the provider's defaults.yaml and
fills per-node-type bounds, then ``validate_config`` applies ray/autoscaler/ray-schema.json (no
unknown keys anywhere) and the cross-field rules. Nothing touches a cloud API. KubeRay manifests
have no offline schema here, so the fields KubeRay requires are checked one by one.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
import shlex
from collections import Counter
from pathlib import Path

import pytest
import yaml

from helpers import REPO
from mmbalance.config import ConfigError
from mmbalance.launch import submit as jobs

CLUSTERS = REPO / "clusters"
KUBERAY = {"RayCluster": CLUSTERS / "kuberay-raycluster.yaml", "RayJob": CLUSTERS / "kuberay-rayjob.yaml"}
RUNTIME_ENV = CLUSTERS / "runtime_env.yaml"


def _pin(package: str) -> str:
    for line in (REPO / "constraints.txt").read_text().splitlines():
        name, _, version = line.split("#")[0].strip().partition("==")
        if name.strip().lower() == package:
            return version.strip()
    raise AssertionError(f"constraints.txt pins no {package}")


RAY_VERSION = _pin("ray")


def _load(path: Path):
    return yaml.safe_load(path.read_text())


def _launcher_configs() -> list[Path]:
    return sorted(p for p in CLUSTERS.glob("*.yaml") if isinstance(_load(p), dict) and "provider" in _load(p))


LAUNCHER_CONFIGS = _launcher_configs()


def _ray_up_checks(config: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


# --- cluster-launcher configs ------------------------------------------------------------------


def test_there_is_a_launcher_config_per_cloud():
    assert {p.name for p in LAUNCHER_CONFIGS} >= {"aws-gpu.yaml", "gcp-gpu.yaml"}


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_launcher_config_passes_rays_own_validation(path):
    prepared = _ray_up_checks(_load(path))
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_launcher_validation_rejects_a_misspelled_key():
    config = _load(LAUNCHER_CONFIGS[0])
    config["idle_timeout_minute"] = config.pop("idle_timeout_minutes")
    import jsonschema

    with pytest.raises(jsonschema.ValidationError, match="idle_timeout_minute"):
        _ray_up_checks(config)


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_launcher_config_pins_the_projects_ray_and_installs_with_constraints(path):
    config = _load(path)
    images = [v for k, v in config["docker"].items() if k in ("image", "head_image", "worker_image")]
    assert images and all(img.startswith(f"rayproject/ray:{RAY_VERSION}-") for img in images), images
    setup = " ".join(config["setup_commands"])
    assert "pip install" in setup and "-c constraints.txt -e ." in setup
    assert "." in config["file_mounts"].values(), "the repository must be synced for setup_commands"
    assert {"shards/", "runs/", ".git/"} <= set(config["rsync_exclude"])
    assert config["head_start_ray_commands"] and config["worker_start_ray_commands"]


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_launcher_head_is_a_cpu_only_safe_node_and_workers_autoscale(path):
    config = _load(path)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU") == 0 and head["resources"].get("TRAIN_DRIVER", 0) >= 1
    assert head.get("max_workers", 0) == 0
    workers = {name: spec for name, spec in types.items() if name != config["head_node_type"]}
    assert workers and config["idle_timeout_minutes"] > 0
    for name, spec in workers.items():
        assert 0 <= spec["min_workers"] <= spec["max_workers"] <= config["max_workers"], name
        assert "TRAIN_DRIVER" not in spec["resources"], f"{name}: drivers belong on the head"


# --- KubeRay manifests ---------------------------------------------------------------------------


def _containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def _check_ray_cluster_spec(spec: dict, where: str) -> None:
    assert spec["rayVersion"] == RAY_VERSION, f"{where}: rayVersion must equal constraints.txt's ray"
    assert spec["enableInTreeAutoscaling"] is True, where
    head = spec["headGroupSpec"]
    assert "rayStartParams" in head and _containers(head), where
    params = head["rayStartParams"]
    assert str(params.get("num-gpus")) == "0", f"{where}: the head is CPU-only"
    assert json.loads(json.loads(params["resources"]))["TRAIN_DRIVER"] >= 1, where
    for container in _containers(head):
        assert "nvidia.com/gpu" not in container.get("resources", {}).get("limits", {}), where
    groups = spec["workerGroupSpecs"]
    assert groups, where
    for group in groups:
        for field in ("groupName", "replicas", "minReplicas", "maxReplicas", "template"):
            assert field in group, f"{where}: worker group lacks {field}"
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], where
    gpu_limits = [c["resources"]["limits"].get("nvidia.com/gpu", 0) for g in groups for c in _containers(g)]
    assert any(int(n) >= 1 for n in gpu_limits), f"{where}: no worker group requests nvidia.com/gpu"
    for group in [head, *groups]:
        for container in _containers(group):
            assert container["image"].startswith(f"rayproject/ray:{RAY_VERSION}-"), container["image"]
            env = {e["name"]: e for e in container.get("env", [])}
            assert "value" not in env["WANDB_API_KEY"], f"{where}: WANDB_API_KEY must come from a Secret"
            assert env["WANDB_API_KEY"]["valueFrom"]["secretKeyRef"]["name"], where


def test_raycluster_manifest_has_what_kuberay_requires():
    manifest = _load(KUBERAY["RayCluster"])
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayCluster")
    assert manifest["metadata"]["name"]
    _check_ray_cluster_spec(manifest["spec"], "RayCluster")


def test_rayjob_manifest_has_what_kuberay_requires():
    manifest = _load(KUBERAY["RayJob"])
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayJob")
    spec = manifest["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] >= 0
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert isinstance(runtime_env, dict) and "://" in runtime_env["working_dir"], (
        "a RayJob's submitter has no checkout: working_dir must be a remote URI"
    )
    _check_ray_cluster_spec(spec["rayClusterSpec"], "RayJob.rayClusterSpec")


def test_rayjob_entrypoint_runs_mmbalance_commands_the_cli_accepts():
    from mmbalance.cli import build_parser

    entrypoint = _load(KUBERAY["RayJob"])["spec"]["entrypoint"]
    commands = [part.split() for part in entrypoint.split("&&")]
    assert commands and all(words[0] == "mmbalance" for words in commands), entrypoint
    assert any(words[1] == "tune" for words in commands)
    for words in commands:
        try:
            build_parser().parse_args(shlex.split(" ".join(words))[1:])
        except SystemExit:
            pytest.fail(f"`{' '.join(words)}` is not a valid mmbalance command line")


# --- runtime_env ---------------------------------------------------------------------------------


def test_runtime_env_ships_the_code_and_leaves_data_and_runs_behind(monkeypatch):
    from ray._private.runtime_env.packaging import _get_excludes

    monkeypatch.chdir(REPO)  # its paths are relative to where one submits from
    env = jobs.load_runtime_env(RUNTIME_ENV)  # also parsed by Ray's RuntimeEnv
    assert env["working_dir"] == "."
    assert {"shards/", "runs/", "demo/", "wandb/", ".venv/", ".git/", "*.parquet"} <= set(env["excludes"])
    excluded = _get_excludes(REPO, env["excludes"])
    for path in (
        "shards/synthetic/train/part-00000.parquet",
        "runs/x/metrics.jsonl",
        "demo/runs/lf/result.json",
        "wandb/run-1/files/config.yaml",
        ".git/HEAD",
        ".venv/bin/python",
        "data.parquet",
    ):
        assert excluded(REPO / path), f"{path} would be uploaded"
    for path in (
        "platform/mmbalance/cli.py",
        "trainables/synthetic.yaml",
        "search_spaces/quickstart.yaml",
        "constraints.txt",
        "pyproject.toml",
    ):  # the last two: runtime_env's pip installs from them
        assert not excluded(REPO / path), f"{path} would be left behind"


def test_runtime_env_passes_only_non_secret_settings():
    env = _load(RUNTIME_ENV)
    assert env["env_vars"].get("WANDB_PROJECT")
    for name, value in env["env_vars"].items():
        assert isinstance(value, str), f"{name}: runtime_env env_vars are strings"
        assert not SECRET_NAME.search(name) or REFERENCE.match(value), f"{name}: a secret in runtime_env"


# --- no secrets under clusters/ ------------------------------------------------------------------

SECRET_NAME = re.compile(r"api_?key|secret|token|password|passwd|credential|private_?key", re.I)
# A value that names a variable ($X, ${X}) or a command's output ($(...)) instead of holding one.
REFERENCE = re.compile(r"^\$(\{?[A-Za-z_][A-Za-z0-9_]*\}?|\()")
TEXT_RULES = {
    "PEM block": re.compile(r"-----BEGIN"),
    "AWS secret key setting": re.compile(r"aws_secret_access_key", re.I),
    "AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "40+ hex characters (W&B keys, tokens)": re.compile(r"(?<![0-9A-Za-z])[0-9a-fA-F]{40,}(?![0-9A-Za-z])"),
}
INLINE_ASSIGNMENT = re.compile(r"(?P<name>\b[A-Za-z_][A-Za-z0-9_]*)\s*[:=]\s*['\"]?(?P<value>[^\s'\"#,;{}\[\]]+)")
TOKEN = re.compile(r"[A-Za-z0-9+/_=-]{32,}")


def _credential_shaped(value: str) -> bool:
    """Long, mixed letters and digits, not a reference: a key, token or password, not a name or path."""
    return (
        len(value) >= 12
        and not REFERENCE.match(value)
        and re.search(r"[A-Za-z]", value) is not None
        and re.search(r"\d", value) is not None
        and "/" not in value.strip("/")
    )


def _entropy(text: str) -> float:
    counts = Counter(text)
    return -sum(n / len(text) * math.log2(n / len(text)) for n in counts.values())


def _structural_findings(node, path: str = "") -> list[str]:
    """Secret-named keys holding literal scalars, and Kubernetes env entries with a literal value."""
    found = []
    if isinstance(node, dict):
        if SECRET_NAME.search(str(node.get("name", ""))) and "value" in node:
            found.append(f"{path}: env {node['name']} has a literal value (use valueFrom.secretKeyRef)")
        for key, value in node.items():
            where = f"{path}.{key}" if path else str(key)
            if isinstance(value, str) and key in ("runtimeEnvYAML",):
                found += _structural_findings(yaml.safe_load(value), where)
            elif (
                isinstance(value, (str, int, float))
                and SECRET_NAME.search(str(key))
                and str(value)
                and not REFERENCE.match(str(value))
            ):
                found.append(f"{where}: a secret-named key with a literal value")
            else:
                found += _structural_findings(value, where)
    elif isinstance(node, list):
        for i, item in enumerate(node):
            found += _structural_findings(item, f"{path}[{i}]")
    return found


def find_secrets(path: Path) -> list[str]:
    """Everything in ``path`` that looks like a secret value; empty when the file is clean."""
    text = path.read_text()
    found = [
        f"{path.name}:{n}: {rule}"
        for n, line in enumerate(text.splitlines(), 1)
        for rule, pattern in TEXT_RULES.items()
        if pattern.search(line)
    ]
    for n, line in enumerate(text.splitlines(), 1):
        for match in INLINE_ASSIGNMENT.finditer(line):
            if SECRET_NAME.search(match["name"]) and _credential_shaped(match["value"]):
                found.append(f"{path.name}:{n}: {match['name']} is assigned a literal")
        for token in TOKEN.findall(line):
            mixed = all(re.search(c, token) for c in ("[a-z]", "[A-Z]", r"\d"))
            if mixed and _entropy(token) >= 4.0:
                found.append(f"{path.name}:{n}: high-entropy token")
    if path.suffix in (".yaml", ".yml"):
        for document in yaml.safe_load_all(text):
            found += [f"{path.name}: {f}" for f in _structural_findings(document)]
    return found


def test_no_file_under_clusters_holds_a_secret():
    files = [p for p in CLUSTERS.rglob("*") if p.is_file()]
    assert files
    findings = [f for p in files for f in find_secrets(p)]
    assert not findings, "\n".join(findings)


def _fake(kind: str) -> str:
    # Built at run time so no secret-shaped literal sits in this file either.
    hex_key = "9f3a" * 10
    mixed = "Zq8" + "xK2mP7vR4tY9wB3n" * 2 + "Lc5"
    return {
        "wandb key in runtime_env": f"env_vars:\n  WANDB_API_KEY: {hex_key}\n",
        "kubernetes env with a literal": f'env:\n  - name: WANDB_API_KEY\n    value: "{mixed[:20]}"\n',
        "shell export": f"# ray start\nexport WANDB_API_KEY={mixed[:18]}\n",
        "aws secret key": "provider:\n  aws_" + "secret_access_key: whatever\n",
        "private key": "ssh: |\n  -----" + "BEGIN OPENSSH PRIVATE KEY-----\n",
        "github-style token in a comment": f"# token ghp_{mixed}\nkey: v\n",
        "secret in a RayJob runtimeEnvYAML": (
            "spec:\n  runtimeEnvYAML: |\n    env_vars:\n      HF_TOKEN: hf" + "abc123XYZ789def\n"
        ),
    }[kind]


@pytest.mark.parametrize(
    "kind",
    [
        "wandb key in runtime_env",
        "kubernetes env with a literal",
        "shell export",
        "aws secret key",
        "private key",
        "github-style token in a comment",
        "secret in a RayJob runtimeEnvYAML",
    ],
)
def test_the_secret_scan_flags_a_planted_secret(tmp_path, kind):
    planted = tmp_path / "leaky.yaml"
    planted.write_text(_fake(kind))
    assert find_secrets(planted), f"{kind} was not flagged"


def test_the_secret_scan_accepts_references(tmp_path):
    clean = tmp_path / "clean.yaml"
    clean.write_text(
        "env_vars:\n  WANDB_API_KEY: ${WANDB_API_KEY}\n  WANDB_PROJECT: mmbalance\n"
        "env:\n  - name: WANDB_API_KEY\n    valueFrom:\n      secretKeyRef: {name: wandb, key: api-key}\n"
        'cmd: export WANDB_API_KEY="$WANDB_KEY"; RAY_AUTH_TOKEN=$(cat ~/.ray/auth_token)\n'
    )
    assert find_secrets(clean) == []


# --- mmbalance submit (launch/submit.py) ------------------------------------------------------------------


class FakeClient:
    """Stands in for ray.job_submission.JobSubmissionClient; records every call."""

    instances: list["FakeClient"] = []
    final_status = "SUCCEEDED"
    stream_fails = False

    def __init__(self, address=None, **kwargs):
        self.address, self.submitted, self.status_calls = address, None, 0
        FakeClient.instances.append(self)

    def get_address(self):
        return self.address or "http://127.0.0.1:8265"

    def submit_job(self, *, entrypoint, runtime_env=None, submission_id=None, **kwargs):
        self.submitted = {"entrypoint": entrypoint, "runtime_env": runtime_env, "submission_id": submission_id}
        return submission_id or "raysubmit_fake"

    async def tail_job_logs(self, job_id):
        yield "epoch 1\n"
        if self.stream_fails:
            raise RuntimeError("WebSocket connection closed unexpectedly")
        yield "epoch 2\n"

    def get_job_logs(self, job_id):
        return "epoch 1\nepoch 2\n"

    def get_job_status(self, job_id):
        from ray.job_submission import JobStatus

        self.status_calls += 1
        return JobStatus.RUNNING if self.status_calls == 1 else JobStatus(self.final_status)

    def get_job_info(self, job_id):
        return argparse.Namespace(message="Job finished." if self.final_status == "SUCCEEDED" else "exit code 1")


@pytest.fixture
def fake_client(monkeypatch):
    import ray.job_submission

    FakeClient.instances, FakeClient.final_status, FakeClient.stream_fails = [], "SUCCEEDED", False
    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", FakeClient)
    for variable in jobs.ADDRESS_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(jobs, "POLL_SECONDS", 0.0)
    monkeypatch.setattr(jobs.time, "sleep", lambda s: None)
    return FakeClient


def _submit_args(*argv, **options) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mmbalance")
    jobs.add_submit_parser(parser.add_subparsers(dest="command"))
    flags = [f"--{k.replace('_', '-')}" + ("" if v is True else f"={v}") for k, v in options.items()]
    return parser.parse_args(["submit", *flags, "--", *argv])


COMMAND = [
    "tune",
    "search_spaces/my space.yaml",
    "--recipe",
    "trainables/synthetic.yaml",
    "--set",
    "objective.guidance=prior:audio",
    "--storage",
    "s3://bucket/prefix",
]


def test_submit_sends_a_shell_quoted_mmbalance_entrypoint_and_the_runtime_env_file(
    fake_client, tmp_path, monkeypatch, capsys
):
    (tmp_path / "code").mkdir()
    env_file = tmp_path / "env.yaml"
    env_file.write_text("working_dir: code\nexcludes: [runs/]\nenv_vars: {WANDB_PROJECT: mmbalance}\n")
    monkeypatch.chdir(tmp_path)
    args = _submit_args(*COMMAND, address="http://head:8265", runtime_env=str(env_file), submission_id="exp-1")
    assert args.func is jobs._run_submit
    assert jobs.submit(args) == 0
    client = fake_client.instances[0]
    assert client.address == "http://head:8265"
    entrypoint = client.submitted["entrypoint"]
    assert entrypoint.startswith("mmbalance tune 'search_spaces/my space.yaml' --recipe")
    assert shlex.split(entrypoint) == ["mmbalance", *COMMAND]
    assert client.submitted["runtime_env"] == yaml.safe_load(env_file.read_text())
    assert client.submitted["submission_id"] == "exp-1"
    out = capsys.readouterr().out
    assert "submitted job exp-1 to http://head:8265" in out
    assert "epoch 1\nepoch 2\n" in out and "job exp-1 SUCCEEDED" in out


@pytest.mark.parametrize(("final", "code"), [("SUCCEEDED", 0), ("FAILED", 1), ("STOPPED", 1)])
def test_submit_exit_status_follows_the_jobs_final_status(fake_client, monkeypatch, capsys, final, code):
    fake_client.final_status = final
    monkeypatch.chdir(REPO)
    assert jobs.submit(_submit_args(*COMMAND)) == code  # default --runtime-env clusters/runtime_env.yaml
    assert f"{final}" in capsys.readouterr().out.splitlines()[-1]
    if code:
        with pytest.raises(SystemExit) as exited:  # the CLI handler turns it into the process's exit status
            jobs._run_submit(_submit_args(*COMMAND))
        assert exited.value.code == code


def test_submit_polls_without_repeating_logs_when_streaming_breaks(fake_client, monkeypatch, capsys):
    fake_client.stream_fails = True
    monkeypatch.chdir(REPO)
    assert jobs.submit(_submit_args(*COMMAND)) == 0
    assert capsys.readouterr().out.count("epoch 1\n") == 1


def test_submit_no_wait_returns_after_printing_the_job_id(fake_client, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    assert jobs.submit(_submit_args(*COMMAND, no_wait=True, runtime_env="")) == 0
    assert fake_client.instances[0].submitted["runtime_env"] == {}
    assert fake_client.instances[0].status_calls == 0
    assert "raysubmit_fake" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [[], ["--"], ["--", "--workers", "2"], ["--", "submit", "--", "tune"]])
def test_submit_refuses_a_missing_or_recursive_command(argv):
    with pytest.raises(ConfigError):
        jobs.build_entrypoint(argv)


def test_submit_accepts_a_leading_mmbalance_word():
    command = ["--", "mmbalance", "train", "--recipe", "r.yaml"]
    assert jobs.build_entrypoint(command) == "mmbalance train --recipe r.yaml"


def test_submit_refuses_a_runtime_env_whose_working_dir_is_missing(tmp_path, monkeypatch):
    env_file = tmp_path / "env.yaml"
    env_file.write_text("working_dir: not-here\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="not-here"):
        jobs.load_runtime_env(env_file)
