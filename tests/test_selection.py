"""Model selection must never look at the test split."""

import numpy as np
import torch

from helpers import recipe_dict, small_spec
from mmbalance.data.manifest import ModalitySpec
from mmbalance.data.shards import SplitArrays, write_shards
from mmbalance.data.synthetic import generate
from mmbalance.engine.loop import run_training
from mmbalance.engine.run_spec import RunSpec
from mmbalance.tracking.records import RunRecord


def _write(out, permute_test: bool):
    spec = small_spec()
    splits = generate(spec)
    if permute_test:
        test = splits["test"]
        labels = np.random.default_rng(123).permutation(test.labels)
        splits["test"] = SplitArrays(test.sample_ids, labels, test.modalities)
    write_shards(
        out,
        dataset="synthetic",
        classes=[f"c{i}" for i in range(spec.classes)],
        modalities={m: ModalitySpec(dtype="float32", shape=[mod.dim]) for m, mod in spec.modalities.items()},
        splits=splits,
        generator={},
        preprocessing={},
    )


def test_permuting_test_labels_changes_nothing_but_the_test_score(tmp_path):
    runs = {}
    for name, permute in (("clean", False), ("permuted", True)):
        _write(tmp_path / f"shards-{name}", permute)
        tree = recipe_dict(tmp_path / f"shards-{name}")
        tree["schedule"] = {"epochs": 5, "batch_size": 32}
        tree["optim"]["lr"] = 0.02  # noisy val curve: the best epoch is not simply the last
        result = run_training(RunSpec.of(tree, tmp_path / name, verbose=False))
        best = torch.load(tmp_path / name / "checkpoints" / "best" / "state.pt", weights_only=False)
        runs[name] = (result, RunRecord(tmp_path / name).read_metrics(), best)
    (clean, clean_metrics, clean_best), (permuted, permuted_metrics, permuted_best) = runs["clean"], runs["permuted"]

    def strip(rows):
        return [{k: v for k, v in r.items() if k != "train/samples_per_s"} for r in rows]

    assert strip(clean_metrics) == strip(permuted_metrics)
    assert clean["val"] == permuted["val"]
    for key, value in clean_best["model"].items():
        assert torch.equal(value, permuted_best["model"][key]), key
    assert clean["test"]["acc"] != permuted["test"]["acc"]  # the permutation did reach the test split
