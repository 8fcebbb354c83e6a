"""A data-parallel step must be the single-process step on the global batch.

Two gloo processes, each fed its half of every global batch in a fixed order, must end with
the same parameters as one process fed the whole batches, for every registered objective at its
defaults (on its own fusion, ``model.fusion: auto``), after 5 steps that cross two epoch
boundaries. Extra variants reach what the defaults do not within 5 steps: AUG adds a head at
every boundary (trained, and frozen as in the official code, under gradient clipping), ARL's
coefficients act from the first step, ARM's scales move fast.
"""

import pytest
import torch

from helpers import recipe_dict, small_spec
from helpers.distributed import FixedOrderSource, assert_same_tensors, run_ranks
from mmbalance.config import validate_recipe
from mmbalance.data.manifest import read_manifest
from mmbalance.data.synthetic import prepare_synthetic
from mmbalance.engine.distributed import ProcessGroup
from mmbalance.engine.loop import Trainer
from mmbalance.objectives import OBJECTIVES

pytestmark = pytest.mark.integration

GLOBAL_BATCH, EPOCH_STEPS = 16, (2, 2, 1)  # epochs of 2, 2 and 1 steps -> 5 steps
EXTRA_VARIANTS = {  # label -> (objective section, optim extras[, model extras])
    "arm-ema-0.5": ({"name": "arm", "ema": 0.5}, {}),
    "arl-start-0": ({"name": "arl", "start": 0, "T": 2.0}, {}),
    "aug-check-every-epoch": ({"name": "aug", "check_every_epochs": 1, "tau": 0.0}, {}),
    "aug-frozen-clipped": (
        {"name": "aug", "check_every_epochs": 1, "tau": 0.0, "train_new_heads": False},
        {"grad_clip": 0.5},
    ),
    # Each rank's 8 samples as 2 micro-batches of 4 (optim.accumulate); compared below with one
    # process taking the whole 16 at once, too.
    "lf-accumulate-2": ({"name": "lf"}, {"accumulate": 2}),
    "mnl-accumulate-2": ({"name": "mnl"}, {"accumulate": 2}),
    "aug-accumulate-2": ({"name": "aug", "check_every_epochs": 1, "tau": 0.0}, {"accumulate": 2}),
    # OGM-GE: the window's edges, noise on the leader only, the continuous coefficient, clipping.
    "ogm_ge-window-dominant": (
        {"name": "ogm_ge", "start_epoch": 1, "end_epoch": 1, "noise_on": "dominant", "coeff_form": "ratio_minus_one"},
        {"grad_clip": 0.5},
    ),
    # PMR: the official constant coefficient, and the moving average with epoch-end prototypes only.
    "pmr-official": ({"name": "pmr", "coeff_form": "official_step", "mu": 0.0}, {}),
    "pmr-momentum-no-initial": ({"name": "pmr", "momentum": 0.5, "initial_prototypes": "none"}, {}),
    "mmpareto-official-accumulate-2-clipped": (
        {"name": "mmpareto", "rescale_scope": "parameter", "solver_edges": "official"},
        {"accumulate": 2, "grad_clip": 0.5},
    ),
    # MLA: the released projector as written (GSPlugin), under clipping; and micro-batch accumulation.
    "mla-official-projection-clipped": (
        {
            "name": "mla",
            "projector_update": "before_step",
            "denominator": "elementwise",
            "alpha_decay": True,
            "normalize_projector": True,
            "skip_first_step": True,
        },
        {"grad_clip": 0.5},
    ),
    "mla-accumulate-2": ({"name": "mla"}, {"accumulate": 2}),
    # PDF's per-sample weights and confidence loss on top of MNL and LF (the MNL paper's PDF rows).
    **{f"{name}-pdf": ({"name": name}, {}, {"fusion": "pdf"}) for name in ("mnl", "lf")},
}
# Objectives whose loss is a mean of per-sample terms: accumulation is exactly the full-batch step.
ACCUMULATION_REFERENCES = {"lf-accumulate-2": "lf", "mnl-accumulate-2": "mnl"}
VARIANTS = {**{name: ({"name": name}, {}) for name in OBJECTIVES}, **EXTRA_VARIANTS}


def test_every_registered_objective_is_covered():
    assert {objective["name"] for objective, *_ in VARIANTS.values()} == set(OBJECTIVES)


def train_params(shards, variant, group):
    objective, optim, *model = VARIANTS[variant]
    tree = recipe_dict(shards, objective=dict(objective), model={"boost_hidden": 8, **(model[0] if model else {})})
    tree["schedule"] = {"epochs": len(EPOCH_STEPS), "batch_size": GLOBAL_BATCH}
    tree["optim"] = {"name": "sgd", "lr": 0.1, "momentum": 0.9, **optim}
    recipe = validate_recipe(tree)
    manifest = read_manifest(shards)
    shapes = {m: tuple(manifest.modalities[m].shape) for m in recipe.modalities}
    source = FixedOrderSource(7, group.rank, group.world_size, shapes, GLOBAL_BATCH, EPOCH_STEPS)
    trainer = Trainer(recipe, manifest, group, source, torch.device("cpu"))
    # Ranks' RNG streams need not agree after setup (dropout, data pipelines): an added head must
    # still be rank 0's everywhere, and one process with rank 0's stream must match.
    torch.manual_seed(1000 + group.rank)
    for epoch in range(len(EPOCH_STEPS)):
        trainer.train_epoch(epoch)
        trainer.end_epoch(epoch)
    assert trainer.progress.step == 5
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}, trainer.model.head_counts()


def every_variant(group, shards):
    return {name: train_params(shards, name, group) for name in VARIANTS}


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    shards = tmp_path_factory.mktemp("eq") / "shards"
    prepare_synthetic(shards, small_spec())
    return shards, run_ranks(every_variant, (str(shards),), tmp_path_factory.mktemp("eq-out"))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_two_workers_match_one_worker_on_the_global_batch(two_rank_results, variant):
    shards, ranks = two_rank_results
    single, single_heads = train_params(shards, variant, ProcessGroup())
    for rank_results in ranks:
        params, heads = rank_results[variant]
        assert heads == single_heads
        assert_same_tensors(params, single, atol=1e-5, label=variant)
    if VARIANTS[variant][0]["name"] == "aug":
        assert sum(single_heads.values()) > 2, "the test must cover a head addition"


@pytest.mark.parametrize("variant", list(ACCUMULATION_REFERENCES))
def test_two_ranks_accumulating_half_batches_match_one_step_on_the_full_batch(two_rank_results, variant):
    shards, ranks = two_rank_results
    single, _ = train_params(shards, ACCUMULATION_REFERENCES[variant], ProcessGroup())
    for rank_results in ranks:
        assert_same_tensors(rank_results[variant][0], single, atol=1e-5, label=variant)
