"""The pyarrow-only example in docs/data-format.md must produce shards that train."""

import re

from helpers import REPO, recipe_dict
from mmbalance.data.shards import validate_shards
from mmbalance.engine.loop import run_training
from mmbalance.engine.run_spec import RunSpec


def test_documented_pyarrow_example_writes_trainable_shards(tmp_path, monkeypatch):
    text = (REPO / "docs" / "data-format.md").read_text()
    snippet = re.search(r"## Writing shards with pyarrow alone\n\n```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet, "data-format.md", "exec"), {})
    shards = tmp_path / "shards" / "mine"
    manifest = validate_shards(shards)
    assert manifest.modalities["video"].shape == [4, 4]
    tree = recipe_dict(shards, modalities=("audio", "video"))
    tree["modalities"]["video"] = {"encoder": "cnn", "params": {"channels": [4], "out_dim": 8, "pooled_size": 2}}
    tree["schedule"] = {"epochs": 1, "batch_size": 32}
    result = run_training(RunSpec.of(tree, tmp_path / "run", verbose=False))
    assert set(result["test"]["acc_per_modality"]) == {"audio", "video"}
