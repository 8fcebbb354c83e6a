"""UPMC Food-101 converter on a tiny fixture tree in the distributed layout (real JPEGs, a local tokenizer)."""

from __future__ import annotations

import csv
import io
import shutil
from pathlib import Path

import pytest

from helpers.convert import read_back, shard_digest, train_one_epoch
from helpers.media import corrupt, write_jpg
from helpers.text import vocab_size, words_of, write_tokenizer
from mmbalance.data.convert import build_converter
from mmbalance.data.convert.pipeline import ConversionError, convert, work_dir_for

SMALL = {"image": {"resize": 36, "crop": 32}, "max_length": 16, "val_fraction": 0.2}
CLASSES = ["apple_pie", "baby_back_ribs", "caesar_salad"]
PER_CLASS = {"train": 5, "test": 2}
WORDS = ["easy", "best", "homemade", "recipe", "grilled", "classic", "quick", "crispy", "sweet", "spicy", "fresh"]
UNQUOTED = ("apple_pie_extra.jpg", "warm pie, vanilla", "apple_pie")  # written without quotes: the comma stays text


def text_for(k: int, class_name: str) -> str:
    dish = class_name.replace("_", " ")
    if k % 3 == 0:
        return f"{WORDS[k % len(WORDS)].title()} {dish}, {WORDS[(k + 4) % len(WORDS)]} recipe"  # a quoted comma
    return f"{WORDS[k % len(WORDS)]} {dish}"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    texts = [text_for(k, c) for k in range(40) for c in CLASSES] + [UNQUOTED[1]]
    return write_tokenizer(tmp_path_factory.mktemp("tok") / "bert-tiny", words_of(*texts))


def make_tree(root: Path) -> dict[str, dict[str, tuple[int, str]]]:
    """images/{train,test}/<class>/*.jpg + texts/*_titles.csv. Returns csv split -> sample id -> (label, text)."""
    expected: dict[str, dict[str, tuple[int, str]]] = {}
    k = 0
    for split, count in PER_CLASS.items():
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        rows = expected[split] = {}
        for label, class_name in enumerate(CLASSES):
            for n in range(count):
                name = f"{class_name}_{split[:2]}{n}.jpg"
                write_jpg(root / "images" / split / class_name / name, value=(41 * k) % 256, size=(40, 30))
                writer.writerow([name, text_for(k, class_name), class_name])
                rows[f"{split}/{Path(name).stem}"] = (label, text_for(k, class_name))
                k += 1
        text = out.getvalue()
        if split == "train":
            write_jpg(root / "images" / "train" / "apple_pie" / UNQUOTED[0], value=7)
            text += ",".join(UNQUOTED) + "\n"
            text += text.splitlines()[0] + "\n"  # an exact duplicate row: kept once, counted
            rows[f"train/{Path(UNQUOTED[0]).stem}"] = (0, UNQUOTED[1])
        (root / "texts").mkdir(parents=True, exist_ok=True)
        (root / "texts" / f"{split}_titles.csv").write_text(text)
    return expected


def converter(tokenizer: Path, **settings):
    return build_converter("food101", {**SMALL, "tokenizer": str(tokenizer), **settings})


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("food") / "UPMC_Food101"
    return root, make_tree(root)


def test_round_trip_splits_tokens_and_rerun_checksums(tree, tokenizer, tmp_path):
    root, expected = tree
    convert(converter(tokenizer), root, tmp_path / "a", engine="local", chunk_size=5, progress=quiet)
    manifest, labels = read_back(tmp_path / "a")
    assert manifest.classes == CLASSES
    # test == test_titles.csv; train + val == train_titles.csv; every row exactly once, right label.
    assert {sid: label for sid, label in labels["test"].items()} == {s: v[0] for s, v in expected["test"].items()}
    trainval = {**labels["train"], **labels["val"]}
    assert len(trainval) == len(labels["train"]) + len(labels["val"])
    assert trainval == {s: v[0] for s, v in expected["train"].items()}
    # val: round(0.2 * n) of each class's train rows (apple_pie has 6 rows, the others 5 -> 1 each).
    assert sorted(labels["val"].values()) == [0, 1, 2]
    assert {s: len(v) for s, v in labels.items()} == {"train": 13, "val": 3, "test": 6}
    assert manifest.modalities["image"].shape == [3, 32, 32] and manifest.modalities["text"].shape == [16]
    assert manifest.modalities["image"].normalize.source == "ImageNet"
    assert manifest.modalities["text"].normalize is None
    prep = manifest.preprocessing
    assert prep["split_source"]["test"] == "texts/test_titles.csv"
    assert prep["dropped_by_listing"] == {"duplicate csv row": 1}
    assert prep["tokenizer"]["vocab_size"] == vocab_size(tokenizer)
    assert prep["tokenizer"]["word_replace"] == {"pad_id": 0, "replacement_id": 1, "keep_ids": [2, 3]}

    from transformers import AutoTokenizer

    from mmbalance.data.shards import load_split

    tok = AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True)
    for split, sid in (("test", "test/apple_pie_te0"), ("train", "train/apple_pie_extra")):
        arrays = load_split(tmp_path / "a", manifest, split)
        ids = arrays.modalities["text"][arrays.sample_ids.index(sid)].tolist()
        text = expected[sid.split("/")[0]][sid][1]
        assert "," in text and 1 not in ids  # the comma survived the csv, every word is known
        decoded = tok.decode(ids, skip_special_tokens=True)
        assert decoded.replace(" ", "") == text.lower().replace(" ", "")

    convert(converter(tokenizer), root, tmp_path / "b", engine="local", chunk_size=50, progress=quiet)
    assert shard_digest(tmp_path / "a") == shard_digest(tmp_path / "b")
    # Another seed carves another val from the same rows; test never changes.
    other = converter(tokenizer, seed=5).list_samples(root)
    assert {s.sample_id for s in other.samples if s.split == "test"} == set(labels["test"])
    assert {s.sample_id for s in other.samples if s.split == "val"} != set(labels["val"])


def _rewrite_first_row(path: Path, row: str) -> None:
    lines = path.read_text().splitlines()
    path.write_text("\n".join([row] + lines[1:]) + "\n")


def test_csv_and_folders_must_agree(tree, tokenizer, tmp_path):
    root = tmp_path / "raw"
    shutil.copytree(tree[0], root)
    train_csv = root / "texts" / "train_titles.csv"
    good = train_csv.read_text()
    _rewrite_first_row(train_csv, "apple_pie_tr0.jpg,some pie,baby_back_ribs")
    with pytest.raises(
        ValueError,
        match=r"train_titles.csv line 1: class 'baby_back_ribs' but apple_pie_tr0.jpg "
        r"lies in .*images/train/apple_pie",
    ):
        converter(tokenizer).list_samples(root)
    _rewrite_first_row(train_csv, "apple_pie/apple_pie_tr0.jpg,some pie,caesar_salad")
    with pytest.raises(ValueError, match=r"line 1: class 'caesar_salad' but the file is given as 'apple_pie/"):
        converter(tokenizer).list_samples(root)
    _rewrite_first_row(train_csv, "donut_1.jpg,a donut,donuts")
    with pytest.raises(ValueError, match=r"train_titles.csv line 1: unknown class 'donuts'"):
        converter(tokenizer).list_samples(root)
    train_csv.write_text(good + "apple_pie_tr0.jpg,another text,apple_pie\n")
    with pytest.raises(ValueError, match=r"line 18: apple_pie_tr0.jpg already listed on line 1"):
        converter(tokenizer).list_samples(root)
    train_csv.write_text(good + "just_a_file.jpg\n")
    with pytest.raises(ValueError, match=r"line 18: expected '<file>.jpg,<text>,<class_name>'"):
        converter(tokenizer).list_samples(root)
    (root / "texts" / "test_titles.csv").unlink()
    with pytest.raises(FileNotFoundError, match="test_titles.csv: missing"):
        converter(tokenizer).list_samples(root)


def test_missing_and_corrupt_images_are_listed_then_skipped_on_request(tree, tokenizer, tmp_path):
    root = tmp_path / "raw"
    shutil.copytree(tree[0], root)
    missing = root / "images" / "test" / "caesar_salad" / "caesar_salad_te1.jpg"
    missing.unlink()
    corrupt(root / "images" / "train" / "baby_back_ribs" / "baby_back_ribs_tr3.jpg", keep=40)
    with pytest.raises(
        ConversionError,
        match=r"1 raw file\(s\) are missing:\n.*caesar_salad_te1.jpg "
        r"\(sample test/caesar_salad_te1\)",
    ):
        convert(converter(tokenizer), root, tmp_path / "out", engine="local", progress=quiet)
    write_jpg(missing)
    with pytest.raises(ConversionError, match=r"1 raw file\(s\) could not be decoded:\n.*baby_back_ribs_tr3.jpg"):
        convert(converter(tokenizer), root, tmp_path / "out", engine="local", progress=quiet)
    assert not (tmp_path / "out").exists()
    missing.unlink()
    manifest = convert(converter(tokenizer), root, tmp_path / "out", engine="local", skip_bad=True, progress=quiet)
    assert manifest.preprocessing["skipped_bad"] | {"files": None} == {
        "count": 2,
        "missing": 1,
        "corrupt": 1,
        "files": None,
    }
    assert sum(info.rows for info in manifest.splits.values()) == 22 - 2


def test_missing_tokenizer_fails_before_any_decoding(tree, tmp_path):
    root, _ = tree
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match=r"no-such-tokenizer: tokenizer directory does not exist"):
        convert(converter(tmp_path / "no-such-tokenizer"), root, out, engine="local", progress=quiet)
    assert not out.exists() and not work_dir_for(out).exists()
    with pytest.raises(ValueError, match="food101 settings: tokenizer: Field required"):
        build_converter("food101", {})


def test_converted_fixture_trains_one_epoch(tree, tokenizer, tmp_path):
    root, _ = tree
    convert(converter(tokenizer), root, tmp_path / "shards", engine="local", progress=quiet)
    encoders = {
        "image": {"encoder": "cnn", "params": {"channels": [4], "out_dim": 8}},
        "text": {
            "encoder": "text",
            "params": {"vocab_size": vocab_size(tokenizer), "hidden_size": 16, "num_layers": 1, "num_heads": 2},
        },
    }
    result = train_one_epoch(tmp_path / "shards", encoders, tmp_path)
    assert 0.0 <= result["test"]["acc"] <= 1.0
    assert set(result["test"]["acc_per_modality"]) == {"image", "text"}
