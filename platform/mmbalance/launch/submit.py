"""``mmbalance submit``: run an mmbalance command as a Ray job on a running cluster.

    mmbalance submit --address http://HEAD:8265 [--runtime-env clusters/runtime_env.yaml] [--no-wait] \\
        -- tune search_spaces/mnl_asha.yaml --recipe trainables/avdigits.yaml --storage s3://bucket/prefix

is ``ray job submit --runtime-env FILE -- mmbalance tune ...`` over the Ray Job SDK
(``ray.job_submission.JobSubmissionClient``): the runtime_env YAML is read from the local
disk (relative paths in it, such as ``working_dir: .``, resolve against the current
directory, so run it from the repository root), ``mmbalance <command>`` becomes the job's
shell-quoted entrypoint, the job id is printed, and, unless ``--no-wait``, the job's logs are
followed until it ends. The exit status is 0 when the job SUCCEEDED and 1 when it FAILED or
was STOPPED; Ctrl-C stops following, not the job.

Authentication: Ray 2.59+ clusters started with token auth refuse unauthenticated
submissions. The SDK attaches the token by itself when the submitter's environment has
``RAY_AUTH_MODE=token`` (Ray 2.60 sends none otherwise), reading it from, in this order,
``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token`` (``ray get-auth-token``
prints the current one). This module never reads, prints or forwards a token, and the
runtime_env must never hold one either (see ``clusters/runtime_env.yaml`` and
``docs/clusters.md``). The address comes from ``--address``, then ``RAY_API_SERVER_ADDRESS``,
then ``RAY_ADDRESS``: the flag wins, as it does for ``tune`` and ``train`` (``launch/cluster.py:
choose_address``). Ray's SDK would let the variables beat the flag, so they are hidden from it
while the client is built; the "submitted job" line says which address was used and from where.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from mmbalance.config import ConfigError, read_yaml_mapping
from mmbalance.launch.cluster import choose_address

DEFAULT_RUNTIME_ENV = Path("clusters/runtime_env.yaml")
ADDRESS_VARIABLES = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")  # the SDK lets these override an explicit address
EXIT_CODES = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 1}
POLL_SECONDS = 2.0


def load_runtime_env(path: str | Path) -> dict[str, Any]:
    """The runtime_env mapping in ``path``, checked by Ray's own ``RuntimeEnv`` parser."""
    from ray.runtime_env import RuntimeEnv

    path = Path(path)
    env = read_yaml_mapping(path, "--runtime-env", " (run from the repository root, or pass --runtime-env)")
    for key in ("working_dir", "py_modules"):
        values = env.get(key) or []
        for value in values if isinstance(values, list) else [values]:
            if "://" not in str(value) and not Path(value).exists():
                raise ConfigError(f"--runtime-env {path}: {key} {value!r} does not exist under {Path.cwd()}")
    try:
        RuntimeEnv(**env)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"--runtime-env {path}: {err}") from None
    return env


def build_entrypoint(command: list[str]) -> str:
    """``mmbalance <command ...>`` as one shell-quoted string (the job runs it through a shell)."""
    words = list(command)
    if words and words[0] == "--":
        words = words[1:]
    if words and words[0] == "mmbalance":
        words = words[1:]
    if not words or words[0].startswith("-"):
        raise ConfigError(
            "name the mmbalance command to run after `--`, e.g. "
            "`mmbalance submit --address URL -- tune SPACE --recipe RECIPE`"
        )
    if words[0] == "submit":
        raise ConfigError("a submitted job cannot itself run `mmbalance submit`")
    return shlex.join(["mmbalance", *words])


def refuse_secrets(entrypoint: str, runtime_env: dict[str, Any]) -> None:
    """Refuse a job that would carry a credential: Ray keeps the entrypoint and runtime_env as
    literals in its job records, dashboard and world-readable session logs. So no env var with a
    secret's name (``WANDB_API_KEY``, ``RAY_AUTH_TOKEN``, any ``*_API_KEY`` / ``*_TOKEN``) in
    ``env_vars``, and no secret-named variable's value from this shell anywhere in the job."""
    import json

    from mmbalance.tracking.wandb_tracker import is_secret_name, secret_values

    named = sorted(k for k in (runtime_env.get("env_vars") or {}) if is_secret_name(k))
    if named:
        raise ConfigError(
            f"--runtime-env: env_vars {', '.join(named)} would be written in plain text into Ray's job "
            "records and logs; set secrets on the cluster nodes instead (docs/clusters.md, the W&B key)"
        )
    carried = entrypoint + json.dumps(runtime_env, default=str)
    if any(value in carried for value in secret_values()):
        raise ConfigError(
            "the job's command or runtime_env holds the value of a secret environment variable "
            "(*_API_KEY, *_TOKEN, ...); Ray would write it into its job records and logs: set it on "
            "the cluster nodes instead (docs/clusters.md)"
        )


def submit(args: argparse.Namespace, *, out: TextIO | None = None) -> int:
    """Submit ``args.argv`` as a Ray job; 0 if it succeeded (or --no-wait), 1 if it failed or stopped."""
    from ray.job_submission import JobSubmissionClient

    out = out or sys.stdout
    entrypoint = build_entrypoint(args.argv)
    runtime_env = load_runtime_env(args.runtime_env) if args.runtime_env else {}
    refuse_secrets(entrypoint, runtime_env)
    address, where = choose_address(args.address, ADDRESS_VARIABLES)
    with _address_variables_hidden(bool(args.address)):
        client = JobSubmissionClient(address)
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, submission_id=args.submission_id)
    where = where if address else f"{where}: Ray's auto-detection"
    print(f"submitted job {job_id} to {client.get_address()} ({where}): {entrypoint}", file=out, flush=True)
    if args.no_wait:
        print(f"follow it with `ray job logs --follow {job_id}`; stop it with `ray job stop {job_id}`", file=out)
        return 0
    try:
        status = follow(client, job_id, out=out)
    except KeyboardInterrupt:
        print(f"\nstopped following; job {job_id} keeps running (`ray job stop {job_id}` stops it)", file=out)
        raise
    info = client.get_job_info(job_id)
    message = f": {info.message}" if getattr(info, "message", None) else ""
    print(f"job {job_id} {status}{message}", file=out, flush=True)
    return EXIT_CODES.get(status, 1)


@contextlib.contextmanager
def _address_variables_hidden(hide: bool):
    """While the SDK picks its address: without the variables that would beat ``--address``."""
    saved = {name: os.environ.pop(name) for name in ADDRESS_VARIABLES if hide and name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def follow(client: Any, job_id: str, *, out: TextIO | None = None, poll_s: float | None = None) -> str:
    """Stream the job's logs to ``out`` until it ends; returns the terminal status name."""
    import aiohttp

    out, poll_s = out or sys.stdout, POLL_SECONDS if poll_s is None else poll_s
    shown = [0]  # characters already written, so a fallback to polling does not repeat them
    try:
        asyncio.run(_tail(client, job_id, out, shown))
    except (OSError, RuntimeError, aiohttp.ClientError) as err:
        # Log streaming is a websocket; a proxy in front of the dashboard may refuse it or
        # drop it. Fall back to polling the whole log, which every Job API server supports.
        print(f"(log streaming unavailable: {err}; polling every {poll_s:g}s)", file=sys.stderr)
        _poll_logs(client, job_id, out, poll_s, shown[0])
    return _wait_terminal(client, job_id, poll_s)


async def _tail(client: Any, job_id: str, out: TextIO, shown: list[int]) -> None:
    async for chunk in client.tail_job_logs(job_id):
        out.write(chunk)
        out.flush()
        shown[0] += len(chunk)


def _poll_logs(client: Any, job_id: str, out: TextIO, poll_s: float, shown: int = 0) -> None:
    while True:
        done = _status_name(client.get_job_status(job_id)) in EXIT_CODES
        logs = client.get_job_logs(job_id)
        out.write(logs[shown:])
        out.flush()
        shown = max(shown, len(logs))
        if done:
            return
        time.sleep(poll_s)


def _wait_terminal(client: Any, job_id: str, poll_s: float) -> str:
    # The log stream can close a moment before the job's status is updated.
    while (status := _status_name(client.get_job_status(job_id))) not in EXIT_CODES:
        time.sleep(poll_s)
    return status


def _status_name(status: Any) -> str:
    return str(getattr(status, "value", status))


def _run_submit(args: argparse.Namespace) -> None:
    """The CLI handler: ``main()`` ignores handlers' return values, so a failed job exits via SystemExit."""
    from ray.exceptions import AuthenticationError

    try:
        code = submit(args)
    except AuthenticationError as err:
        print(
            f"mmbalance submit: error: {err}\n(export RAY_AUTH_MODE=token and the cluster's token as RAY_AUTH_TOKEN, "
            "RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token; see docs/clusters.md)",
            file=sys.stderr,
        )
        raise SystemExit(2) from None
    except ConnectionError as err:
        print(f"mmbalance submit: error: cannot reach the Ray Job API: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if code:
        raise SystemExit(code)


def add_submit_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``mmbalance submit`` on the CLI's subparsers."""
    sub = subparsers.add_parser(
        "submit",
        help="run an mmbalance command as a Ray job on a cluster (Ray Job SDK)",
        description="Submit `mmbalance <command>` to a Ray cluster and follow its logs; everything after `--` is "
        "the command. Exit status: 0 if the job SUCCEEDED, 1 if it FAILED or was STOPPED.",
    )
    sub.add_argument(
        "--address",
        help="Ray dashboard / Job API address, e.g. http://HEAD:8265 "
        "(default: RAY_API_SERVER_ADDRESS, then RAY_ADDRESS; --address beats both)",
    )
    sub.add_argument(
        "--runtime-env",
        default=str(DEFAULT_RUNTIME_ENV),
        metavar="FILE",
        help=f"runtime_env YAML, paths relative to the current directory (default {DEFAULT_RUNTIME_ENV}; "
        "pass '' for none)",
    )
    sub.add_argument("--submission-id", help="job id to use instead of a generated one (must be unique on the cluster)")
    sub.add_argument("--no-wait", action="store_true", help="print the job id and return without following the logs")
    sub.add_argument(
        "argv",
        nargs=argparse.REMAINDER,
        metavar="-- COMMAND ...",
        help="the mmbalance command to run on the cluster, e.g. `-- tune SPACE --recipe RECIPE`",
    )
    sub.set_defaults(func=_run_submit)
    return sub
