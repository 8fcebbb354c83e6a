"""GPU benchmark: the engine's training step against a bare PyTorch loop, per precision.

CREMA-D-sized audio-visual data (one uint8 frame 3x224x224 and a float32 spectrogram 257x188
per sample) through the late-fusion model with two ResNet-18 encoders. For each precision
(fp32, bf16, fp16) it times, side by side in one run:

- ``engine``: ``engine/steps.train_batch`` with LF, as a training run does it (pinned host
  batches copied with ``non_blocking``, uint8 frames scaled on the device, metrics on device);
- ``bare``: the same model, data and loss (fused CE + each modality's CE) in a plain
  ``autocast`` / ``GradScaler`` PyTorch loop.

It prints samples/s of both, their ratio (the engine's overhead), the peak GPU memory, and,
with ``--ray-data``, the streamed Ray Data / in-process ratio from ``bench/data.py``.

    python bench/gpu.py                       # on a GPU: full size, under 5 minutes
    python bench/gpu.py --device cpu --size tiny --steps 2   # the code path on CPU (tests use it)

Timings of one run only; rerun for spread. Nothing here is needed to train.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mmbalance.engine.distributed import ProcessGroup
from mmbalance.engine.metrics import SumCounter
from mmbalance.engine.precision import MixedPrecision
from mmbalance.engine.steps import StepClock, train_batch
from mmbalance.models import LateFusion, build_encoder
from mmbalance.objectives import DistInfo, build_objective

REPO = Path(__file__).resolve().parents[1]
SIZES = {  # per-sample shapes: the visual frame (uint8) and the audio spectrogram (float32)
    "full": {"visual": (1, 3, 224, 224), "audio": (257, 188)},
    "small": {"visual": (1, 3, 112, 112), "audio": (128, 94)},
    "tiny": {"visual": (1, 3, 32, 32), "audio": (32, 24)},
}
CLASSES = 6  # CREMA-D's emotions


def make_data(size: str, batch: int, batches: int, pin: bool) -> list[tuple[dict, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    shapes = SIZES[size]
    data = []
    for _ in range(batches):
        inputs = {
            "visual": torch.randint(0, 256, (batch, *shapes["visual"]), generator=gen, dtype=torch.uint8),
            "audio": torch.randn(batch, *shapes["audio"], generator=gen),
        }
        labels = torch.randint(0, CLASSES, (batch,), generator=gen)
        if pin:
            inputs, labels = {m: x.pin_memory() for m, x in inputs.items()}, labels.pin_memory()
        data.append((inputs, labels))
    return data


def build(size: str, device: torch.device):
    torch.manual_seed(0)
    encoders = {m: build_encoder("resnet18", {}, shape) for m, shape in SIZES[size].items()}
    model = LateFusion(encoders, CLASSES, fusion="mean").to(device)
    objective = build_objective("lf", {})
    objective.bind(list(encoders), CLASSES, model.info)
    return model, objective, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


def to_device(inputs: dict, labels: torch.Tensor, device: torch.device):
    moved = {m: x.to(device, non_blocking=True) for m, x in inputs.items()}
    moved["visual"] = moved["visual"].float().div_(255.0)
    return moved, labels.to(device, non_blocking=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def samples_per_s(step, data, steps: int, device: torch.device) -> float:
    """Median samples/s of ``step(inputs, labels, step_index)`` over ``steps`` steps after 2
    warm-up steps (cuDNN autotuning, the allocator), synchronising the device around each."""
    timings = []
    for index in range(steps + 2):
        inputs, labels = data[index % len(data)]
        sync(device)
        started = time.perf_counter()
        step(*to_device(inputs, labels, device), index)
        sync(device)
        if index >= 2:
            timings.append(time.perf_counter() - started)
    return data[0][1].numel() / statistics.median(timings)


def time_engine(size, device, precision, data, steps) -> float:
    model, objective, optimizer = build(size, device)
    mixed = MixedPrecision(precision, device)
    counter = SumCounter()

    def step(batch, y, index):
        clock = StepClock(index, 0, steps + 2)
        train_batch(model, objective, optimizer, batch, y, clock, DistInfo(), ProcessGroup(), None, counter, mixed)

    rate = samples_per_s(step, data, steps, device)
    counter.means()  # the epoch-end host read, outside the timed steps
    return rate


def time_bare(size, device, precision, data, steps) -> float:
    model, _, optimizer = build(size, device)
    mixed = MixedPrecision(precision, device)

    def step(batch, y, index):
        optimizer.zero_grad(set_to_none=True)
        with mixed.autocast():
            _, out = model(batch, None)
        loss = F.cross_entropy(out.fused_logits.float(), y)
        loss = loss + sum(F.cross_entropy(z.float(), y) for z in out.unimodal_logits.values())
        mixed.scale(loss).backward()
        mixed.unscale(optimizer)
        mixed.step(optimizer)

    return samples_per_s(step, data, steps, device)


def ray_data_ratio(args: list[str]) -> str:
    """The last lines of ``bench/data.py`` (it starts its own Ray)."""
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "data.py"), *args], capture_output=True, text=True, timeout=600
    )
    lines = (done.stdout.strip().splitlines() or [done.stderr.strip()[-300:]])[-3:]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", choices=sorted(SIZES), default=None, help="default: full on a GPU, small on CPU")
    parser.add_argument("--batch", type=int, default=None, help="default: 64 on a GPU, 8 on CPU")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement (after 2 warm-up steps)")
    parser.add_argument("--precisions", default="fp32,bf16,fp16")
    parser.add_argument("--ray-data", nargs="*", metavar="ARG", help="also run bench/data.py with these arguments")
    args = parser.parse_args()
    device = torch.device(args.device)
    size = args.size or ("full" if device.type == "cuda" else "small")
    batch = args.batch or (64 if device.type == "cuda" else 8)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu ({torch.get_num_threads()} threads)"
    data = make_data(size, batch, batches=4, pin=device.type == "cuda")
    print(f"device={name} size={size} {SIZES[size]} batch={batch} steps={args.steps} torch={torch.__version__}")
    print(f"{'precision':>9} {'engine/s':>10} {'bare/s':>10} {'ratio':>6} {'peak MiB':>9}")
    for precision in args.precisions.split(","):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        bare = time_bare(size, device, precision, data, args.steps)
        engine = time_engine(size, device, precision, data, args.steps)
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
        # Four significant digits: a slow step on a busy CPU gives rates below 1/s, where one
        # decimal would print a ratio that the printed rates contradict.
        print(f"{precision:>9} {engine:10.4g} {bare:10.4g} {engine / bare:6.3g} {peak:9.0f}", flush=True)
    if args.ray_data is not None:
        print("Ray Data (bench/data.py " + " ".join(args.ray_data) + "):")
        print(ray_data_ratio(args.ray_data))


if __name__ == "__main__":
    main()
