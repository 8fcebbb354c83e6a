"""bench/gpu.py's code path on CPU at its tiny size: every precision row is printed with
positive samples/s for the engine and the bare loop and their ratio (no GPU needed)."""

from __future__ import annotations

import subprocess
import sys

from helpers import REPO


def test_gpu_benchmark_runs_on_cpu_and_prints_a_row_per_precision():
    command = [
        sys.executable,
        str(REPO / "bench" / "gpu.py"),
        "--device",
        "cpu",
        "--size",
        "tiny",
        "--steps",
        "1",
        "--batch",
        "4",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {line.split()[0]: line.split()[1:] for line in done.stdout.splitlines()[2:] if line.strip()}
    assert set(rows) == {"fp32", "bf16", "fp16"}, done.stdout
    for precision, (engine, bare, ratio, _peak) in rows.items():
        assert float(engine) > 0 and float(bare) > 0, precision
        assert abs(float(ratio) - float(engine) / float(bare)) <= 0.01 * float(ratio) + 0.01, (
            precision
        )  # printed rounded
