"""Wait for Ray's resources to come back after trials end (they return asynchronously)."""

from __future__ import annotations

import time


def settled_resources(ray, baseline, timeout=60.0):
    """Resources are returned asynchronously after trials end: wait until they are back."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        now = ray.available_resources()
        if all(abs(now.get(k, 0.0) - v) < 1e-6 for k, v in baseline.items() if k in ("CPU", "GPU")):
            return now
        time.sleep(1.0)
    return ray.available_resources()
