"""Local run records: resolved config, one metrics line per epoch, the final result.

Layout of a run directory::

    config.yaml        the resolved, validated recipe
    metrics.jsonl      one JSON object per epoch (rewritten up to the resumed epoch on resume)
    result.json        {"val": {"best_acc", "best_epoch"}, "test": {...}, "epochs": n}
    checkpoints/latest/state.pt, checkpoints/best/state.pt
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import yaml


def _finite(value: Any) -> Any:
    # JSON has no NaN; a metric that could not be computed is recorded as null.
    return None if isinstance(value, float) and not math.isfinite(value) else value


class RunRecord:
    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)

    @property
    def metrics_path(self) -> Path:
        return self.dir / "metrics.jsonl"

    def write_config(self, recipe: dict[str, Any]) -> None:
        (self.dir / "config.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))

    def append_metrics(self, metrics: dict[str, Any]) -> None:
        with open(self.metrics_path, "a") as handle:
            handle.write(json.dumps({k: _finite(v) for k, v in metrics.items()}) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.is_file():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    def truncate_metrics(self, epochs_done: int) -> None:
        """On resume, keep only the epochs the checkpoint covers (no duplicated epoch lines)."""
        kept = [m for m in self.read_metrics() if m["epoch"] < epochs_done]
        tmp = self.metrics_path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(m) + "\n" for m in kept))
        os.replace(tmp, self.metrics_path)

    def write_result(self, result: dict[str, Any]) -> None:
        tmp = self.dir / "result.json.tmp"
        tmp.write_text(json.dumps(result, indent=2, sort_keys=True, default=_finite) + "\n")
        os.replace(tmp, self.dir / "result.json")

    def checkpoint_dir(self, which: str) -> Path:
        return self.dir / "checkpoints" / which
