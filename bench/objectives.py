"""Per-step time of each objective relative to LF on the same model and batch (CPU).

A step is what the engine does per batch: forward, objective.step, backward and optimizer
step for every loss group. Each objective is compared with LF on a model with the same
fusion (ARL/ARM need concat, AUG boost), so the ratio isolates the objective's cost.

    python bench/objectives.py [--model cnn|mlp] [--steps 30] [--batch 64] [--objectives mnl arl]
                               [--threads 1]

Targets on the tiny MLP (``--model mlp``), where per-step host work shows most: MNL, ARL and
AUG <= 1.15x of LF, ARM <= 1.3x.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mmbalance.engine.distributed import ProcessGroup
from mmbalance.engine.metrics import SumCounter
from mmbalance.engine.steps import StepClock, train_batch
from mmbalance.models import LateFusion, build_encoder
from mmbalance.objectives import OBJECTIVES, DistInfo, build_objective, objective_requirements

# Each objective on its own declared fusion; LF on the same fusion is the reference.
FUSION = {name: objective_requirements(name).default_fusion for name in OBJECTIVES if name != "lf"}
TARGET = {"mnl": 1.15, "arl": 1.15, "arm": 1.3, "aug": 1.15}  # tiny MLP; objectives not listed print no target
SHAPES = {"cnn": {"audio": (40, 63), "image": (28, 28)}, "mlp": {"audio": (32,), "image": (32,)}}
ENCODER = {"cnn": ("cnn", {"channels": [16, 32, 64], "out_dim": 64}), "mlp": ("mlp", {"hidden": [128], "out_dim": 64})}


def build(model_kind: str, fusion: str, objective: str) -> tuple:
    torch.manual_seed(0)
    name, params = ENCODER[model_kind]
    encoders = {m: build_encoder(name, params, shape) for m, shape in SHAPES[model_kind].items()}
    model = LateFusion(encoders, 10, fusion=fusion)
    obj = build_objective(objective, {})
    obj.bind(list(encoders), 10, model.info)
    return model, obj, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


def time_steps(model_kind: str, fusion: str, objective: str, batch: dict, labels: torch.Tensor, steps: int) -> float:
    model, obj, optimizer = build(model_kind, fusion, objective)
    timings = []
    for step in range(steps + 5):
        started = time.perf_counter()
        train_batch(
            model,
            obj,
            optimizer,
            batch,
            labels,
            StepClock(step, 10, 100),
            DistInfo(),
            ProcessGroup(),
            None,
            SumCounter(),
        )
        if step >= 5:  # warm-up steps excluded
            timings.append(time.perf_counter() - started)
    return statistics.median(timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(SHAPES), default="cnn")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--objectives", nargs="+", choices=sorted(FUSION), default=list(FUSION))
    # On a shared host, intra-op threads that wait for each other dominate a tiny step's time;
    # one thread makes the ratio a measure of the objective rather than of the load.
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    batch = {m: torch.randn(args.batch, *shape, generator=generator) for m, shape in SHAPES[args.model].items()}
    labels = torch.randint(0, 10, (args.batch,), generator=generator)
    print(
        f"model={args.model} batch={args.batch} steps={args.steps} threads={torch.get_num_threads()} (median step time)"
    )
    print(f"{'objective':>10} {'fusion':>8} {'LF ms':>8} {'obj ms':>8} {'ratio':>7} {'target':>7}")
    time_steps(args.model, "mean", "lf", batch, labels, args.steps)  # warm up kernels and allocator
    for objective in args.objectives:
        fusion = FUSION[objective]
        # Alternate LF and the objective so drift in machine load hits both alike; keep the best of 3.
        lf, ours = float("inf"), float("inf")
        for _ in range(3):
            lf = min(lf, time_steps(args.model, fusion, "lf", batch, labels, args.steps))
            ours = min(ours, time_steps(args.model, fusion, objective, batch, labels, args.steps))
        ratio = ours / lf
        target = TARGET.get(objective)
        verdict = "" if target is None else ("ok" if ratio <= target else "OVER")
        shown = "-" if target is None else f"{target:.2f}x"
        print(f"{objective:>10} {fusion:>8} {lf * 1e3:>8.2f} {ours * 1e3:>8.2f} {ratio:>6.2f}x {shown:>7} {verdict}")


if __name__ == "__main__":
    main()
