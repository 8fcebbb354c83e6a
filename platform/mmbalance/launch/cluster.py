"""Connecting to Ray and checking that a request fits before anything is scheduled.

On a laptop, Ray is started in-process with logical CPUs for every worker plus headroom:
Ray Data's read and decode tasks need CPUs of their own, and a 2-worker run on a 2-CPU
Ray hangs waiting for them (docs/architecture.md §R2). On a cluster (``--address``, or else
``RAY_ADDRESS``) nothing is started: the request is checked against what the cluster has.
``--address`` beats ``RAY_ADDRESS`` (``choose_address``), and one line says which was used.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

DATA_HEADROOM_CPUS = 2  # Ray Data read/decode tasks
DRIVER_CPUS = 0  # the TorchTrainer controller actor requests no CPU in Train V2


@dataclass(frozen=True)
class Request:
    workers: int
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0

    @property
    def cpus(self) -> float:
        return self.workers * self.cpus_per_worker + DRIVER_CPUS

    @property
    def gpus(self) -> float:
        return self.workers * self.gpus_per_worker


class DoesNotFit(RuntimeError):
    """The cluster cannot hold the requested workers; raised before any actor starts."""


def connect(request: Request, address: str | None = None, *, verbose: bool = True) -> bool:
    """Returns True when Ray was started here (a local, fixed-size cluster).

    ``verbose=False`` (what a search passes by default) keeps Ray's own chatter off the
    console: worker and actor output is not streamed to this process (it stays in Ray's
    session logs), and the driver's Ray logger shows warnings and errors only. ``mmbalance
    train --workers`` keeps the default: its per-epoch table is printed by rank 0, a worker.
    A process that is already connected keeps its settings."""
    import ray

    if ray.is_initialized():
        return False
    quiet = {} if verbose else {"logging_level": logging.WARNING}
    if not verbose:
        mute_ray_notices()
    address, where = choose_address(address)
    if address:
        print(f"Ray address {address} ({where})", flush=True)
        ray.init(address=address, log_to_driver=verbose, **quiet)
        return False
    local_cpus = max(os.cpu_count() or 1, int(request.cpus + 0.999) + DATA_HEADROOM_CPUS)
    # The dashboard serves the state API that Ray Train's PlacementGroupCleaner needs to free the
    # placement groups of Train-in-Tune trials that Tune stops (they leak otherwise). Ray 2.60
    # starts that cleaner for every TorchTrainer, a plain `train --workers` too: without the
    # dashboard it logs "Failed to query Ray Train Controller actor state" every few seconds.
    # Measured on 2 cores: ray.init 20.4/14.2 s with it, 13.6/16.7 s without (noise > cost).
    ray.init(
        num_cpus=local_cpus,
        object_store_memory=object_store_bytes(),
        include_dashboard=True,
        log_to_driver=verbose,
        **quiet,
    )
    return True


def choose_address(explicit: str | None, variables: tuple[str, ...] = ("RAY_ADDRESS",)) -> tuple[str | None, str]:
    """The Ray address a command uses and where it came from, for the line that says so.

    ``--address`` (``explicit``) beats the environment: a flag typed for this command is more
    specific than a variable exported once in a shell profile. ``ray.init`` agrees; Ray's job
    SDK lets the variables win, so ``jobs.submit`` hides them. Then the first of ``variables``
    that is set; else ``None``: start Ray locally."""
    env = [(name, os.environ[name]) for name in variables if os.environ.get(name)]
    if explicit:
        ignored = "".join(f"; {name}={value} ignored" for name, value in env if value != explicit)
        return explicit, f"from --address{ignored}"
    if env:
        name, value = env[0]
        return value, f"from {name}; no --address given"
    return None, f"no --address, no {' or '.join(variables)}"


class DropMessages(logging.Filter):
    """Drops log records whose message contains one of ``fragments``."""

    def __init__(self, *fragments: str):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


# Informational: token auth is on (Ray's default since 2.59). The "disabled" warning stays.
_AUTH_NOTICE = DropMessages("Token authentication is enabled")


def mute_ray_notices() -> None:
    """Quiet mode's filter for the one notice ``ray.init`` prints on every local start."""
    auth = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if _AUTH_NOTICE not in auth.filters:
        auth.addFilter(_AUTH_NOTICE)


def object_store_bytes() -> int:
    # Ray's default (30% of RAM) is far more than shards of this size need, and on small
    # machines /dev/shm is tight; 1 GiB or a quarter of RAM, whichever is smaller.
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        total = 8 << 30
    return int(min(1 << 30, total // 4))


def check_fits(request: Request, autoscaling: bool = False) -> None:
    """Refuse a request the cluster cannot hold. On a cluster that may autoscale, GPUs and
    CPUs not up yet are expected, so the shortfall is printed instead of refused."""
    import ray

    total = ray.cluster_resources()
    cpus, gpus = total.get("CPU", 0.0), total.get("GPU", 0.0)
    problems = []
    if request.cpus + DATA_HEADROOM_CPUS > cpus:
        problems.append(
            f"{request.workers} workers x {request.cpus_per_worker} CPU + {DATA_HEADROOM_CPUS} CPUs for "
            f"Ray Data need {request.cpus + DATA_HEADROOM_CPUS:g} CPUs, the cluster has {cpus:g}"
        )
    if request.gpus > gpus:
        problems.append(
            f"{request.workers} workers x {request.gpus_per_worker} GPU need {request.gpus:g} GPUs, "
            f"the cluster has {gpus:g}"
        )
    if problems and autoscaling:
        print("note: the cluster is short now (" + "; ".join(problems) + "); waiting for the autoscaler")
    elif problems:
        raise DoesNotFit("requested workers cannot fit: " + "; ".join(problems))
