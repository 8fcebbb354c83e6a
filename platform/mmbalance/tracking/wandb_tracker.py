"""W&B on rank 0: the one module that talks to ``wandb``.

Why a wrapper: every trial of a sweep must keep training when W&B cannot be reached, must
never copy a credential into a run directory, and must write its W&B run next to its own
local run record. So ``WandbTracker.start`` decides the mode once (``online`` falls back to
``offline`` without a key or a reachable server, with one printed line), and every other
method is a no-op on a tracker that is not live (``disabled``, ``rank != 0``, failed init).

The offline run lands in ``<run_dir>/wandb/offline-run-<ts>-<run_id>/run-<run_id>.wandb``;
upload it later with ``wandb sync <run_dir>/wandb``, or read it locally with
``wandb leet inspect --json <that dir>``.
"""

from __future__ import annotations

import atexit
import contextlib
import math
import numbers
import os
import socket
import sys
import threading
from pathlib import Path
from typing import Any, Mapping, Sequence
from urllib.parse import urlsplit

from mmbalance.config import TrackingConfig
from mmbalance.config import WandbMode as Mode

SECRET_MARKERS = ("api_key", "apikey", "token", "secret", "password")
REDACTED = "<redacted>"
NETWORK_TIMEOUT_S = 2.0


def is_secret_name(name: str) -> bool:
    """``WANDB_API_KEY``, ``RAY_AUTH_TOKEN``, ``AWS_SECRET_ACCESS_KEY``...: a name that holds a
    credential. Names of where one is kept (``*_FILE``, ``*_PATH``) are not secrets themselves."""
    low = str(name).lower()
    return any(s in low for s in SECRET_MARKERS) and not low.endswith(("_file", "_path", "_dir"))


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """The values of this process's secret-named environment variables (8+ characters, so a
    short flag such as ``1`` is never mistaken for one): what no written file may contain."""
    environ = os.environ if environ is None else environ
    return [v for k, v in environ.items() if is_secret_name(k) and len(v) >= 8]


def sanitize(config: Any, secret: str | Sequence[str] | None = None) -> Any:
    """Copy of ``config`` with every value under a secret-looking key, and every string holding
    ``secret`` (the live API key, or each of several: ``secret_values()``), replaced by
    ``<redacted>``, at any depth."""
    secrets = [s for s in ([secret] if isinstance(secret, str) else secret or []) if s]
    if isinstance(config, dict):
        return {
            k: REDACTED if any(s in str(k).lower() for s in SECRET_MARKERS) else sanitize(v, secrets)
            for k, v in config.items()
        }
    if isinstance(config, (list, tuple)):
        return [sanitize(v, secrets) for v in config]
    if isinstance(config, str) and any(s in config for s in secrets):
        return REDACTED
    return config


def flatten_result(result: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"test": {"acc": .8, "acc_per_modality": {"audio": .6}}}`` ->
    ``{"test/acc": .8, "test/acc_audio": .6}``: the names the epoch metrics already use
    so summary and history line up in reports."""
    flat: dict[str, Any] = {}
    for key, value in result.items():
        if isinstance(value, dict) and str(key).endswith("_per_modality"):
            stem = str(key)[: -len("_per_modality")]
            flat.update({f"{prefix}{stem}_{m}": v for m, v in value.items() if _scalar(v)})
        elif isinstance(value, dict):
            flat.update(flatten_result(value, f"{prefix}{key}/"))
        elif _scalar(value) or isinstance(value, str):
            flat[f"{prefix}{key}"] = value
    return flat


def _scalar(value: Any) -> bool:
    return isinstance(value, numbers.Real)  # bool is an int: logged as 0/1


def _has_credentials(base_url: str) -> bool:
    """What ``wandb.init`` would find: env key or identity token, ``.netrc`` (honours $NETRC
    and $HOME), or a key set earlier in this process by ``wandb.login``. Only checks for
    presence; the value never leaves wandb."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    try:
        from wandb.sdk.lib import wbauth

        return bool(wbauth.read_netrc_auth(host=base_url) or wbauth.session_credentials(host=base_url))
    except Exception:  # a malformed netrc is "no usable key", not a crash
        return False


def _reachable(base_url: str, timeout: float = NETWORK_TIMEOUT_S) -> bool:
    """TCP connect to the server, in a daemon thread so a slow DNS lookup (which socket
    timeouts do not bound) cannot stall the trial either."""
    parts = urlsplit(base_url)
    host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    ok: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True, name="wandb-reachability")
    thread.start()
    thread.join(timeout + 0.5)
    return bool(ok)


def _base_url() -> str:
    try:  # env WANDB_BASE_URL or `wandb login --host` settings; loading them starts no process
        from wandb.sdk import wandb_setup

        return wandb_setup.singleton().settings.base_url
    except Exception:
        return os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")


def resolve_mode(cfg: TrackingConfig) -> tuple[Mode, str | None]:
    """The mode to run in, and why it differs from the requested one (``None`` if not)."""
    if cfg.wandb != "online":
        return cfg.wandb, None
    base_url = _base_url()
    if not _has_credentials(base_url):
        return "offline", "no API key"
    if not _reachable(base_url):
        return "offline", f"{urlsplit(base_url).hostname} unreachable"
    return "online", None


def _settings(mode: Mode):
    import wandb

    return wandb.Settings(
        mode=mode,
        reinit="create_new",  # several trackers in one process (a driver, tests) never share a run
        init_timeout=30.0,  # wandb's default 90 s would stall a trial whose service cannot start
        finish_timeout=120.0
        if mode == "online"
        else 0.0,  # a slow upload never blocks the end of a trial; `wandb sync` retries
        console="off",  # no stdout/stderr capture: Ray streams worker logs, and output.log could hold anything
        silent=True,  # wandb's banner lines would repeat per trial; we print our own single line
        save_code=False,
        disable_code=True,
        disable_git=True,  # no source copy, no diff.patch in the run dir
        disable_job_creation=True,
        x_disable_meta=True,  # wandb-metadata.json records the command line, host and executable
        x_disable_machine_info=True,
        x_disable_stats=True,  # no system-metrics sampler in every trial
        x_save_requirements=False,  # no pip freeze per trial
    )


class WandbTracker:
    """A live W&B run, or a no-op. Build it with ``WandbTracker.start``."""

    def __init__(self, run: Any = None, mode: Mode = "disabled"):
        self.run, self.mode = run, mode

    @property
    def active(self) -> bool:
        return self.run is not None

    @property
    def sync_dir(self) -> Path | None:
        """The run's own folder under ``<run_dir>/wandb`` (what ``wandb sync`` takes)."""
        return Path(self.run.settings.sync_dir) if self.run is not None else None

    @classmethod
    def start(
        cls,
        cfg: TrackingConfig,
        *,
        run_dir: Path,
        run_id: str,
        run_name: str,
        group: str | None,
        config: dict[str, Any],
        rank: int = 0,
        job_type: str = "train",
        resume: bool = False,
    ) -> "WandbTracker":
        """Start the trial's run. ``run_id`` is the run's own id (``records.RunRecord.identity``,
        or ``records.trial_run_id`` for a search trial), never a directory name; ``group`` is the
        experiment name. ``resume`` says this start continues that same run (``--resume``, a
        restart, the scores added to a trial's run): only then is W&B allowed to append to an
        existing run, so a new run can never land in another one's history."""
        if rank != 0 or cfg.wandb == "disabled":
            return cls()
        mode, reason = resolve_mode(cfg)
        import wandb

        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        kwargs = dict(
            project=cfg.project,
            entity=cfg.entity,
            group=group,
            name=run_name,
            id=run_id,
            resume="allow" if resume else None,
            dir=str(run_dir),
            job_type=job_type,
            config=sanitize(config, secret_values()),
        )
        try:
            with _quiet_exit_hooks():
                run = wandb.init(**kwargs, settings=_settings(mode))
        except Exception as error:  # noqa: BLE001 - tracking must never end a trial
            if mode != "online":
                _say(f"wandb: init failed ({type(error).__name__}: {error}); W&B tracking is off for this run")
                return cls()
            mode, reason = "offline", f"online init failed ({type(error).__name__})"
            try:
                run = wandb.init(**kwargs, settings=_settings(mode))
            except Exception as error2:  # noqa: BLE001
                _say(f"wandb: init failed ({type(error2).__name__}: {error2}); W&B tracking is off for this run")
                return cls()
        tracker = cls(run, mode)
        if reason is not None:
            # The parent also holds any earlier fragments of a resumed trial: sync them all.
            _say(
                f"wandb: {reason}; logging offline to {tracker.sync_dir} "
                f"(sync later with: wandb sync {tracker.sync_dir.parent})"
            )
        return tracker

    def log_epoch(self, metrics: dict[str, Any]) -> None:
        """One history row per epoch, at ``step=epoch`` (so rows align with ASHA's clock and
        with metrics.jsonl). Strings and other non-numbers are left to the local record."""
        if self.run is None:
            return
        row = {k: (int(v) if isinstance(v, bool) else v) for k, v in metrics.items() if _scalar(v)}
        self.run.log(row, step=int(metrics["epoch"]))

    def log_epoch_again(self, metrics: dict[str, Any]) -> None:
        """``log_epoch`` for an epoch an earlier, killed start may not have flushed. Online, a
        resumed run knows its next step: an epoch W&B already has is skipped (W&B would drop
        it with a warning). Offline, a resumed run starts at step 0 and the row is written; when
        the fragments are synced, W&B drops a row for a step it already has."""
        if self.run is None or int(getattr(self.run, "step", 0) or 0) > int(metrics["epoch"]):
            return
        self.log_epoch(metrics)

    def summary(self, result: dict[str, Any]) -> None:
        """The final result (best val, test, robustness, ...) as flat summary keys; NaN is
        dropped, as in the local record where it becomes null."""
        if self.run is None:
            return
        flat = flatten_result(result)
        self.run.summary.update({k: v for k, v in flat.items() if not (isinstance(v, float) and math.isnan(v))})

    def finish(self, exit_code: int = 0) -> None:
        if self.run is None:
            return
        run, self.run = self.run, None
        run.finish(exit_code=exit_code)

    def __enter__(self) -> "WandbTracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # SystemExit(0) is how Tune ends a trial it stops (ASHA): a clean finish, not a crash.
        # The process is torn down while the run finishes, so wandb's complaints are muted.
        if exc_type is SystemExit and not getattr(exc, "code", 0):
            _silenced(self.finish, exit_code=0)
            return
        self.finish(exit_code=0 if exc_type is None else 1)


@contextlib.contextmanager
def _quiet_exit_hooks():
    """Wrap the exit hooks wandb registers during ``init`` so they cannot print tracebacks.

    A Tune trial that ASHA stops is ended while its run is still open; wandb's exit hook then
    finds its service connection gone and prints a traceback per trial. What was logged is
    already on disk (every ``log`` goes to the run file as it happens), so the hook's failure
    costs nothing but noise — which, in a 100-trial search, buries the search's own output."""
    captured = []
    register = atexit.register

    def capture(func, *args, **kwargs):
        captured.append((func, args, kwargs))
        return register(func, *args, **kwargs)

    atexit.register = capture
    try:
        yield
    finally:
        atexit.register = register
        for func, args, kwargs in captured:
            atexit.unregister(func)
            register(_silenced, func, *args, **kwargs)


def _silenced(func, *args, **kwargs) -> None:
    with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull), contextlib.redirect_stdout(devnull):
        try:
            func(*args, **kwargs)
        except Exception:  # noqa: BLE001 - see _quiet_exit_hooks
            pass


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
