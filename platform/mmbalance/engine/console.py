"""Console progress: a per-batch progress bar and a per-epoch table (rank 0 only)."""

from __future__ import annotations

import sys
from typing import Iterable, Iterator, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def progress_bar(items: Iterable[T], *, total: int, desc: str, enabled: bool) -> Iterator[T]:
    # tqdm hides itself when stderr is not a terminal (disable=None), so CI logs stay readable.
    return iter(tqdm(items, total=total, desc=desc, leave=False, disable=None if enabled else True, file=sys.stderr))


class EpochTable:
    """Prints one aligned line per epoch: losses, fused and per-modality val accuracy."""

    def __init__(self, modalities: list[str], enabled: bool = True):
        self.modalities, self.enabled = modalities, enabled
        self.columns = (
            ["epoch", "loss", "train_acc", "val_acc"] + [f"val_{m}" for m in modalities] + ["ratio", "samples/s"]
        )
        self.printed_header = False

    def row(self, metrics: dict) -> None:
        if not self.enabled:
            return
        if not self.printed_header:
            write_line(" ".join(f"{c:>10}" for c in self.columns))
            self.printed_header = True
        values = [metrics["epoch"], metrics["train/loss_total"], metrics["train/acc_fused"], metrics["val/acc_fused"]]
        values += [metrics[f"val/acc_{m}"] for m in self.modalities]
        values += [metrics["val/imbalance_ratio"], metrics["train/samples_per_s"]]
        write_line(
            " ".join(f"{v:>10d}" if isinstance(v, int) else f"{v:>10.4f}" for v in values[:-1])
            + f" {values[-1]:>10.0f}"
        )


def startup_line(launched: float, ray_ready: float | None, entered: float, data_ready: float, first: float) -> str:
    """Where a run's start-up went, from wall-clock marks (``time.time()``, so marks taken by the
    driver and by a worker on the same host compare): Ray up, the worker group (placement, worker
    processes, process group), the shard checks and data source, then the model and the first
    batch."""
    parts = []
    if ray_ready is not None:
        parts += [f"Ray {ray_ready - launched:.1f} s", f"workers {entered - ray_ready:.1f} s"]
    else:
        parts.append(f"setup {entered - launched:.1f} s")
    parts += [f"data {data_ready - entered:.1f} s", f"model and first batch {first - data_ready:.1f} s"]
    return f"start-up: {', '.join(parts)} ({first - launched:.1f} s after the command started)"


def write_line(line: str) -> None:
    """One line straight to stdout, not through ``print``: a Ray Train worker replaces ``print``
    with a version that logs the text and, when stdout is wrapped, also prints it, so
    `train --workers N` showed every epoch row twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
