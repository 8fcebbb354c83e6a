"""Data-parallel equivalence machinery: fixed global batches split over ranks, and a runner
that starts gloo ranks in fresh processes.

``FixedOrderSource`` gives rank r its contiguous slice of the same global batches, in the same
order every epoch, so one process fed the whole batches is the reference. ``run_ranks(fn, args,
out_dir)`` runs ``fn(group, *args)`` on each of ``world`` gloo ranks (``group`` is the engine's
``ProcessGroup``) and returns what each rank returned; ``fn`` must be a module-level function
(the ranks import it by name).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers import free_port
from mmbalance.engine.distributed import ProcessGroup


class FixedOrderSource:
    """Global batch i of every epoch is the same rows; rank r takes its contiguous slice.

    ``epoch_steps[e]`` is the number of steps of epoch e (the default, 2, 2 and 1, gives 5 steps
    that cross two epoch boundaries)."""

    def __init__(
        self,
        generator_seed: int,
        rank: int,
        world: int,
        shapes: dict,
        global_batch: int = 16,
        epoch_steps: tuple[int, ...] = (2, 2, 1),
        classes: int = 4,
    ):
        gen = torch.Generator().manual_seed(generator_seed)
        self.batches = [
            (
                {m: torch.randn(global_batch, *s, generator=gen) for m, s in shapes.items()},
                torch.randint(0, classes, (global_batch,), generator=gen),
            )
            for _ in range(max(epoch_steps))
        ]
        self.rank, self.world, self.epoch_steps = rank, world, epoch_steps

    @property
    def total_steps(self) -> int:
        return sum(self.epoch_steps)

    def train_batches(self, epoch, batch_size):
        steps = self.epoch_steps[epoch]
        lo, hi = self.rank * batch_size, (self.rank + 1) * batch_size

        def gen():
            for inputs, labels in self.batches[:steps]:
                yield {m: x[lo:hi] for m, x in inputs.items()}, labels[lo:hi]

        return gen(), steps

    def eval_batches(self, key, batch_size):
        return iter(())


def _rank_main(rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(fn(ProcessGroup.from_torch(), *args), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_ranks(fn: Callable[..., Any], args: tuple, out_dir: Path, world: int = 2) -> list[Any]:
    """``[fn(group_of_rank_r, *args) for r in range(world)]``, each rank in its own gloo process."""
    mp.spawn(_rank_main, args=(world, free_port(), fn, tuple(args), str(out_dir)), nprocs=world, join=True)
    return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world)]


def assert_same_tensors(
    got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], atol: float = 1e-5, label: str = ""
) -> None:
    """Same keys, and every tensor within ``atol`` (rtol 0)."""
    assert got.keys() == want.keys()
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=atol, msg=f"{label}: {name}")
