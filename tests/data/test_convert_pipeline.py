"""The conversion pipeline itself, with a toy converter (cheap text files): resume, interruption,
bad-file accounting, train statistics, engines, and the ``mmbalance prepare`` command."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydantic import BaseModel, ConfigDict

from helpers.convert import shard_digest
from mmbalance.cli import main
from mmbalance.data.convert.base import BadInput, Listing, ModalityOutput, RawSample, listing_text
from mmbalance.data.convert.pipeline import ConversionError, convert, work_dir_for
from mmbalance.data.manifest import ModalitySpec, read_manifest
from mmbalance.data.shards import load_split

QUIET = {"progress": lambda _: None}


class ToyParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    scale: float = 2.0


class ToyConverter:
    """``root/index.csv`` rows ``id,label,split``; ``root/<id>.txt`` holds one number v.
    Features: ``a`` = float32 [v, scale * v] (train-statistics normalisation per channel),
    ``b`` = uint8 [3, 2, 2] filled with v (fixed normalisation)."""

    name = "toy"
    Params = ToyParams

    def __init__(self, params: ToyParams | None = None, interrupt_at: str | None = None):
        self.params = params or ToyParams()
        self.interrupt_at = interrupt_at
        self.extracted: list[str] = []

    def list_samples(self, root: Path) -> Listing:
        rows = [line.split(",") for line in (root / "index.csv").read_text().splitlines()]
        samples = [RawSample(i, int(label), split, {"value": str(root / f"{i}.txt")}) for i, label, split in rows]
        return Listing(classes=["x", "y"], samples=samples, split_source={"all": "index.csv"})

    def outputs(self) -> dict[str, ModalityOutput]:
        return {
            "a": ModalityOutput(ModalitySpec(dtype="float32", shape=[2]), "train_stats", axis=0),
            "b": ModalityOutput(
                ModalitySpec(dtype="uint8", shape=[3, 2, 2]), ([1.0, 2.0, 3.0], [4.0, 5.0, 6.0]), axis=0, source="fixed"
            ),
        }

    def extract(self, sample: RawSample) -> dict[str, np.ndarray]:
        if sample.sample_id == self.interrupt_at:
            raise KeyboardInterrupt
        self.extracted.append(sample.sample_id)
        text = Path(sample.files["value"]).read_text().strip()
        try:
            v = float(text)
        except ValueError:
            raise BadInput(f"{sample.files['value']}: not a number ({text!r})") from None
        return {"a": np.array([v, self.params.scale * v], np.float32), "b": np.full((3, 2, 2), int(v) % 256, np.uint8)}

    def preprocessing(self) -> dict:
        return {"toy": True}


def make_toy(root: Path, n: int = 20) -> dict[str, tuple[int, str]]:
    root.mkdir(parents=True, exist_ok=True)
    truth = {}
    for k in range(n):
        sid = f"s{k:03d}"
        truth[sid] = (k % 2, ["train", "train", "train", "val", "test"][k % 5])
        (root / f"{sid}.txt").write_text(f"{k * 3 + 1}\n")
    (root / "index.csv").write_text("".join(f"{sid},{label},{split}\n" for sid, (label, split) in truth.items()))
    return truth


def test_round_trip_and_train_statistics(tmp_path):
    truth = make_toy(tmp_path / "raw")
    manifest = convert(ToyConverter(), tmp_path / "raw", tmp_path / "out", engine="local", chunk_size=3, **QUIET)
    for split, info in manifest.splits.items():
        arrays = load_split(tmp_path / "out", manifest, split)
        assert {sid: (int(label), split) for sid, label in zip(arrays.sample_ids, arrays.labels)} == {
            sid: t for sid, t in truth.items() if t[1] == split
        }
    train = load_split(tmp_path / "out", manifest, "train").modalities["a"].astype(np.float64)
    norm = manifest.modalities["a"].normalize
    assert norm.axis == 0 and norm.source == "train split"
    np.testing.assert_allclose(norm.mean, train.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(norm.std, train.std(axis=0), rtol=1e-9)
    assert manifest.modalities["b"].normalize.mean == [1.0, 2.0, 3.0]
    assert manifest.preprocessing["toy"] is True and manifest.preprocessing["params"] == {"scale": 2.0}
    assert not work_dir_for(tmp_path / "out").exists()  # cleaned up after success


def test_shards_are_written_in_the_chosen_encoding_with_the_same_values(tmp_path):
    make_toy(tmp_path / "raw")
    default = convert(ToyConverter(), tmp_path / "raw", tmp_path / "bytes", engine="local", chunk_size=3, **QUIET)
    lists = convert(
        ToyConverter(), tmp_path / "raw", tmp_path / "tensor", engine="local", chunk_size=3, encoding="tensor", **QUIET
    )
    assert {s.encoding for s in default.modalities.values()} == {"bytes"}  # chunks are lists, re-encoded at assembly
    assert {s.encoding for s in lists.modalities.values()} == {"tensor"}
    for split in default.splits:
        a, b = load_split(tmp_path / "bytes", default, split), load_split(tmp_path / "tensor", lists, split)
        assert a.sample_ids == b.sample_ids
        for m in a.modalities:
            np.testing.assert_array_equal(a.modalities[m], b.modalities[m])
    assert default.modalities["a"].normalize == lists.modalities["a"].normalize


def test_output_does_not_depend_on_chunking(tmp_path):
    make_toy(tmp_path / "raw", n=37)
    digests = []
    for size in (1, 5, 64):
        convert(ToyConverter(), tmp_path / "raw", tmp_path / f"out{size}", engine="local", chunk_size=size, **QUIET)
        digests.append(shard_digest(tmp_path / f"out{size}"))
    assert digests[0] == digests[1] == digests[2]


def test_interrupted_conversion_resumes_without_redoing_finished_chunks(tmp_path):
    truth = make_toy(tmp_path / "raw", n=20)
    convert(ToyConverter(), tmp_path / "raw", tmp_path / "clean", engine="local", chunk_size=4, **QUIET)
    order = sorted(truth, key=lambda sid: (["train", "val", "test"].index(truth[sid][1]), sid))  # the pipeline's order

    lines = []
    with pytest.raises(KeyboardInterrupt):  # interrupted inside the 3rd chunk
        first = ToyConverter(interrupt_at=order[9])
        convert(first, tmp_path / "raw", tmp_path / "out", engine="local", chunk_size=4, progress=lines.append)
    assert "rerun the same command to resume" in lines[-1]
    assert not (tmp_path / "out").exists()
    done = sorted(p.name for p in (work_dir_for(tmp_path / "out") / "chunks").glob("*.json"))
    assert len(done) == 2

    again = ToyConverter()
    lines = []
    convert(again, tmp_path / "raw", tmp_path / "out", engine="local", chunk_size=4, progress=lines.append)
    assert any("resuming: 2 of 5 chunks already converted" in line for line in lines)
    assert len(again.extracted) == 20 - 8  # finished chunks were not decoded again
    assert shard_digest(tmp_path / "out") == shard_digest(tmp_path / "clean")


def test_changed_parameters_discard_the_partial_work(tmp_path):
    make_toy(tmp_path / "raw", n=12)
    with pytest.raises(KeyboardInterrupt):
        convert(
            ToyConverter(interrupt_at="s008"), tmp_path / "raw", tmp_path / "out", engine="local", chunk_size=4, **QUIET
        )
    lines = []
    changed = ToyConverter(ToyParams(scale=3.0))
    convert(changed, tmp_path / "raw", tmp_path / "out", engine="local", chunk_size=4, progress=lines.append)
    assert any("starting over" in line for line in lines)
    assert len(changed.extracted) == 12
    assert read_manifest(tmp_path / "out").preprocessing["params"] == {"scale": 3.0}


def test_a_foreign_folder_named_like_the_work_directory_is_never_removed(tmp_path):
    from mmbalance.outputs import UnsafeOutput

    make_toy(tmp_path / "raw", n=4)
    foreign = work_dir_for(tmp_path / "out")
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    with pytest.raises(UnsafeOutput, match="notes.txt"):
        convert(ToyConverter(), tmp_path / "raw", tmp_path / "out", engine="local", **QUIET)
    assert (foreign / "notes.txt").read_text() == "keep"


def test_bad_files_are_listed_and_skipped_only_on_request(tmp_path):
    make_toy(tmp_path / "raw", n=15)
    (tmp_path / "raw" / "s004.txt").write_text("garbage")
    (tmp_path / "raw" / "s007.txt").unlink()
    with pytest.raises(ConversionError, match=r"1 raw file\(s\) are missing:\n  .*s007.txt \(sample s007\)"):
        convert(ToyConverter(), tmp_path / "raw", tmp_path / "out", engine="local", **QUIET)
    (tmp_path / "raw" / "s007.txt").write_text("7")
    with pytest.raises(ConversionError, match=r"1 raw file\(s\) could not be decoded:\n  .*s004.txt: not a number"):
        convert(ToyConverter(), tmp_path / "raw", tmp_path / "out", engine="local", **QUIET)
    (tmp_path / "raw" / "s007.txt").unlink()
    manifest = convert(ToyConverter(), tmp_path / "raw", tmp_path / "out", engine="local", skip_bad=True, **QUIET)
    skipped = manifest.preprocessing["skipped_bad"]
    assert (skipped["count"], skipped["missing"], skipped["corrupt"]) == (2, 1, 1)
    assert sum(info.rows for info in manifest.splits.values()) == 13


def test_existing_output_is_refused_before_any_work(tmp_path):
    make_toy(tmp_path / "raw", n=5)
    (tmp_path / "out").mkdir()
    toy = ToyConverter()
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert(toy, tmp_path / "raw", tmp_path / "out", engine="local", **QUIET)
    assert toy.extracted == []


def test_listing_text_names_at_most_twenty_items():
    text = listing_text([f"f{i}" for i in range(25)])
    assert "f19" in text and "f20" not in text and "... and 5 more" in text


def test_prepare_command_reports_bad_settings_and_bad_trees(tmp_path, capsys):
    assert (
        main(
            [
                "prepare",
                "cremad",
                "--root",
                str(tmp_path),
                "--out",
                str(tmp_path / "o"),
                "--engine",
                "local",
                "--set",
                "frames=0",
            ]
        )
        == 2
    )
    assert "cremad settings: frames: Input should be greater than or equal to 1" in capsys.readouterr().err
    assert (
        main(
            [
                "prepare",
                "cremad",
                "--root",
                str(tmp_path / "nowhere"),
                "--out",
                str(tmp_path / "o"),
                "--engine",
                "local",
            ]
        )
        == 2
    )
    assert "dataset root does not exist" in capsys.readouterr().err
