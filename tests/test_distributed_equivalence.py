"""A data-parallel step must be the single-process step on the global batch.

Two gloo processes, each fed its half of every global batch in a fixed order, must end with
the same parameters as one process fed the whole batches, for every objective, after 5
steps that cross two epoch boundaries: AUG adds a head at the first boundary (trained, and
frozen as in the official code, under gradient clipping), ARL's coefficients and ARM's scales
are updated every step. Each objective runs on its own fusion (``model.fusion: auto``).
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mmbalance.config import validate_recipe
from mmbalance.data.manifest import read_manifest
from mmbalance.data.synthetic import prepare_synthetic
from mmbalance.engine.distributed import ProcessGroup
from mmbalance.engine.loop import Trainer
from mmbalance.objectives import OBJECTIVES

from helpers import free_port, recipe_dict, small_spec

pytestmark = pytest.mark.integration

GLOBAL_BATCH, STEPS_PER_EPOCH, EPOCHS = 16, 2, 3  # epochs of 2, 2 and 1 steps -> 5 steps
VARIANTS = {  # label -> (objective section, optim extras)
    "lf": ({"name": "lf"}, {}),
    "mnl": ({"name": "mnl", "warmup_epochs": 0, "normalize": "BC"}, {}),
    "arm": ({"name": "arm", "ema": 0.5}, {}),
    "arl": ({"name": "arl", "start": 0, "T": 2.0}, {}),
    "aug": ({"name": "aug", "check_every_epochs": 1, "tau": 0.0}, {}),
    "aug-frozen-clipped": ({"name": "aug", "check_every_epochs": 1, "tau": 0.0, "train_new_heads": False},
                           {"grad_clip": 0.5}),
}


class FixedOrderSource:
    """Global batch i of every epoch is the same rows; rank r takes its contiguous slice."""

    def __init__(self, generator_seed: int, rank: int, world: int, shapes: dict):
        gen = torch.Generator().manual_seed(generator_seed)
        self.batches = [({m: torch.randn(GLOBAL_BATCH, *s, generator=gen) for m, s in shapes.items()},
                         torch.randint(0, 4, (GLOBAL_BATCH,), generator=gen)) for _ in range(STEPS_PER_EPOCH)]
        self.rank, self.world = rank, world

    def train_batches(self, epoch, batch_size):
        steps = STEPS_PER_EPOCH if epoch < EPOCHS - 1 else 1
        lo, hi = self.rank * batch_size, (self.rank + 1) * batch_size

        def gen():
            for inputs, labels in self.batches[:steps]:
                yield {m: x[lo:hi] for m, x in inputs.items()}, labels[lo:hi]
        return gen(), steps

    def eval_batches(self, key, batch_size):
        return iter(())


def test_every_registered_objective_is_covered():
    assert {objective["name"] for objective, _ in VARIANTS.values()} == set(OBJECTIVES)


def train_params(shards, variant, group):
    objective, optim = VARIANTS[variant]
    tree = recipe_dict(shards, objective=dict(objective), model={"boost_hidden": 8})
    tree["schedule"] = {"epochs": EPOCHS, "batch_size": GLOBAL_BATCH}
    tree["optim"] = {"name": "sgd", "lr": 0.1, "momentum": 0.9, **optim}
    recipe = validate_recipe(tree)
    manifest = read_manifest(shards)
    shapes = {m: tuple(manifest.modalities[m].shape) for m in recipe.modalities}
    source = FixedOrderSource(7, group.rank, group.world_size, shapes)
    trainer = Trainer(recipe, manifest, group, source, torch.device("cpu"))
    # Ranks' RNG streams need not agree after setup (dropout, data pipelines): an added head must
    # still be rank 0's everywhere, and one process with rank 0's stream must match.
    torch.manual_seed(1000 + group.rank)
    for epoch in range(EPOCHS):
        trainer.train_epoch(epoch)
        trainer.end_epoch(epoch)
    assert trainer.progress.step == 5
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}, trainer.model.head_counts()


def _worker(rank, world, port, shards, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {name: train_params(shards, name, ProcessGroup.from_torch()) for name in VARIANTS}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()



@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    shards = tmp_path_factory.mktemp("eq") / "shards"
    prepare_synthetic(shards, small_spec())
    out = tmp_path_factory.mktemp("eq-out")
    mp.spawn(_worker, args=(2, free_port(), str(shards), str(out)), nprocs=2, join=True)
    return shards, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_two_workers_match_one_worker_on_the_global_batch(two_rank_results, variant):
    shards, ranks = two_rank_results
    single, single_heads = train_params(shards, variant, ProcessGroup())
    for rank_results in ranks:
        params, heads = rank_results[variant]
        assert heads == single_heads
        assert params.keys() == single.keys()
        for name, value in single.items():
            torch.testing.assert_close(params[name], value, rtol=0, atol=1e-5, msg=f"{variant}: {name}")
    if variant.startswith("aug"):
        assert sum(single_heads.values()) > 2, "the test must cover a head addition"
