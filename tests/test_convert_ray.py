"""The conversion pipeline on Ray Data: same bytes as the in-process engine, and it resumes
a conversion that the in-process engine left half done."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "data"))
from helpers.convert import read_back, shard_digest  # noqa: E402
from helpers.cremad_tree import SMALL, make_tree  # noqa: E402
from mmbalance.cli import main  # noqa: E402
from mmbalance.data.convert import build_converter  # noqa: E402
from mmbalance.data.convert.pipeline import convert, work_dir_for  # noqa: E402

pytestmark = pytest.mark.integration


class _Interrupting:
    """Wraps a converter and raises KeyboardInterrupt at one sample (in-process engine only)."""

    def __init__(self, inner, at: str):
        self.inner, self.at = inner, at
        self.name, self.params = inner.name, inner.params

    def __getattr__(self, item):
        return getattr(self.inner, item)

    def extract(self, sample):
        if sample.sample_id == self.at:
            raise KeyboardInterrupt
        return self.inner.extract(sample)


def test_ray_engine_matches_local_engine_and_resumes_its_partial_work(ray_cluster, tmp_path, capsys):
    root = tmp_path / "CREMA-D"
    clips = make_tree(root, actors=(1001, 1002))
    settings = [
        f"--set=image.resize={SMALL['image']['resize']}",
        f"--set=image.crop={SMALL['image']['crop']}",
        "--set=audio.clip_seconds=0.5",
        "--set=frames=2",
        "--set=val_fraction=0.25",
        "--set=test_fraction=0.25",
    ]
    local = build_converter("cremad", {**SMALL, "val_fraction": 0.25, "test_fraction": 0.25})
    convert(local, root, tmp_path / "local", engine="local", chunk_size=5, progress=lambda _: None)

    # Half a conversion in-process, interrupted ...
    listing = local.list_samples(root)
    order = sorted(listing.samples, key=lambda s: (["train", "val", "test"].index(s.split), s.sample_id))
    with pytest.raises(KeyboardInterrupt):
        convert(
            _Interrupting(local, order[12].sample_id),
            root,
            tmp_path / "ray",
            engine="local",
            chunk_size=5,
            progress=lambda _: None,
        )
    assert len(list((work_dir_for(tmp_path / "ray") / "chunks").glob("*.json"))) == 2

    # ... finished by the CLI on Ray Data.
    code = main(
        ["prepare", "cremad", "--root", str(root), "--out", str(tmp_path / "ray"), "--chunk-size", "5", *settings]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "resuming: 2 of 5 chunks already converted" in out
    assert "with the ray engine" in out and "chunk 5/5 done" in out
    assert shard_digest(tmp_path / "ray") == shard_digest(tmp_path / "local")
    _, labels = read_back(tmp_path / "ray")
    assert sum(len(v) for v in labels.values()) == len(clips)
