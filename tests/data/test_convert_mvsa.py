"""MVSA-Single converter on tiny fixture trees in both layouts (real JPEGs, a local tokenizer)."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from helpers.convert import read_back, shard_digest, train_one_epoch
from helpers.media import corrupt, write_jpg
from helpers.text import vocab_size, words_of, write_tokenizer
from mmbalance.data.convert import build_converter
from mmbalance.data.convert import text as text_module
from mmbalance.data.convert.base import RawSample
from mmbalance.data.convert.media import IMAGENET_MEAN, IMAGENET_STD
from mmbalance.data.convert.mvsa import CLASSES, read_mvsa_text
from mmbalance.data.convert.pipeline import ConversionError, convert, work_dir_for

SMALL = {"image": {"resize": 36, "crop": 32}, "max_length": 16}
WORDS = ["sunny", "rainy", "happy", "sad", "cat", "dog", "tree", "bus", "late", "lunch", "great", "awful", "park"]
PER_CLASS = {"train": 3, "val": 1, "test": 1}  # jsonl rows per class and split
CP1252_TEXT = "café “great” lunch"  # written to one original-layout .txt as Windows-1252 bytes
LONG_TEXT = " ".join(WORDS * 3)


def text_for(k: int) -> str:
    return f"{WORDS[k % len(WORDS)]} {WORDS[(3 * k + 1) % len(WORDS)]} day"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    texts = [text_for(k) for k in range(60)] + [CP1252_TEXT, LONG_TEXT, "cafe"]
    return write_tokenizer(tmp_path_factory.mktemp("tok") / "bert-tiny", words_of(*texts) | {"cafe"})


def make_jsonl_tree(root: Path) -> dict[str, tuple[int, str, str]]:
    """train/dev/test.jsonl + data/*.jpg; test.jsonl rows have no "id" (the image stem is used).
    Returns sample id -> (label index, split, text)."""
    expected, k = {}, 0
    for split, name in {"train": "train.jsonl", "val": "dev.jsonl", "test": "test.jsonl"}.items():
        lines = []
        for label in CLASSES:
            for _ in range(PER_CLASS[split]):
                sid = str(1000 + k)
                write_jpg(root / "data" / f"{sid}.jpg", value=(37 * k) % 256)
                row = {"text": text_for(k), "img": f"data/{sid}.jpg", "label": label.upper() if k == 0 else label}
                if split != "test":
                    row["id"] = sid
                lines.append(json.dumps(row))
                expected[sid] = (CLASSES.index(label), split, text_for(k))
                k += 1
        (root / name).write_text("\n".join(lines) + "\n\n")
    return expected


def make_original_tree(root: Path) -> tuple[dict[str, int], list[str]]:
    """labelResultAll.txt + data/<id>.jpg/.txt: 5 kept rows per class (equal labels, or one side
    neutral) and two positive/negative conflicts. Returns (kept id -> label index, dropped ids)."""
    rows, kept, k = [], {}, 0
    for label in CLASSES:
        for pair in [(label, label), ("neutral", label), (label, "neutral"), (label, label), ("neutral", label)]:
            k += 1
            rows.append((str(k), pair))
            kept[str(k)] = CLASSES.index(label)
    dropped = [str(k + 1), str(k + 2)]
    rows += [(dropped[0], ("positive", "negative")), (dropped[1], ("negative", "positive"))]
    for sid, _ in rows:
        write_jpg(root / "data" / f"{sid}.jpg", value=(29 * int(sid)) % 256)
        (root / "data" / f"{sid}.txt").write_text(text_for(int(sid)) + "\n", encoding="utf-8")
    (root / "data" / "1.txt").write_bytes(CP1252_TEXT.encode("cp1252"))  # not valid UTF-8
    (root / "labelResultAll.txt").write_text("ID\ttext,image\n" + "".join(f"{sid}\t{t},{i}\n" for sid, (t, i) in rows))
    return kept, dropped


def converter(tokenizer: Path, **settings):
    return build_converter("mvsa_single", {**SMALL, "tokenizer": str(tokenizer), **settings})


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def jsonl_tree(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("mvsa") / "MVSA_Single"
    return root, make_jsonl_tree(root)


def test_jsonl_round_trip_tokens_and_rerun_checksums(jsonl_tree, tokenizer, tmp_path):
    root, expected = jsonl_tree
    convert(converter(tokenizer), root, tmp_path / "a", engine="local", chunk_size=4, progress=quiet)
    manifest, labels = read_back(tmp_path / "a")
    assert manifest.classes == ["negative", "neutral", "positive"]
    seen = {sid: (label, split) for split, rows in labels.items() for sid, label in rows.items()}
    assert seen == {sid: (label, split) for sid, (label, split, _) in expected.items()}  # each once, dev -> val
    assert {s: len(v) for s, v in labels.items()} == {"train": 9, "val": 3, "test": 3}
    image, text = manifest.modalities["image"], manifest.modalities["text"]
    assert (image.dtype, image.shape, text.dtype, text.shape) == ("uint8", [3, 32, 32], "int64", [16])
    assert image.normalize.mean == IMAGENET_MEAN and image.normalize.std == IMAGENET_STD
    assert image.normalize.axis == 0 and image.normalize.source == "ImageNet"
    assert text.normalize is None
    prep = manifest.preprocessing
    assert prep["split_source"] == {"layout": "jsonl", "train": "train.jsonl", "val": "dev.jsonl", "test": "test.jsonl"}
    info = prep["tokenizer"]
    assert (info["pad_id"], info["unk_id"], info["cls_id"], info["sep_id"]) == (0, 1, 2, 3)
    assert info["vocab_size"] == vocab_size(tokenizer)
    assert info["sha256"] == text_module.tokenizer_digest(tokenizer.resolve())
    assert info["word_replace"] == {"pad_id": 0, "replacement_id": 1, "keep_ids": [2, 3]}
    assert info["text_encoder"] == {"vocab_size": vocab_size(tokenizer), "pad_token_id": 0}
    assert prep["skipped_bad"]["count"] == 0

    from transformers import AutoTokenizer

    from mmbalance.data.shards import load_split

    arrays = load_split(tmp_path / "a", manifest, "test")
    sid = arrays.sample_ids[1]
    ids = arrays.modalities["text"][1]
    assert ids[0] == 2 and 3 in ids.tolist() and ids[-1] == 0  # [CLS] ... [SEP] [PAD]...
    tok = AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True)
    assert tok.decode(ids.tolist(), skip_special_tokens=True) == expected[sid][2]

    convert(converter(tokenizer), root, tmp_path / "b", engine="local", chunk_size=100, progress=quiet)
    assert shard_digest(tmp_path / "a") == shard_digest(tmp_path / "b")


def test_original_layout_merges_labels_drops_conflicts_and_carves_splits(tokenizer, tmp_path):
    root = tmp_path / "raw"
    kept, dropped = make_original_tree(root)
    settings = {"val_fraction": 0.2, "test_fraction": 0.2}
    convert(converter(tokenizer, **settings), root, tmp_path / "out", engine="local", chunk_size=6, progress=quiet)
    manifest, labels = read_back(tmp_path / "out")
    seen = {sid: label for rows in labels.values() for sid, label in rows.items()}
    assert seen == kept and not set(dropped) & set(seen)
    assert manifest.preprocessing["dropped_by_listing"] == {"text/image positive-negative conflict": 2}
    # 5 per class: test round(0.2 * 5) = 1 per class, val round(0.25 * 4) = 1 per class (8:1:1 -> 3:1:1 here).
    for split in ("val", "test"):
        assert sorted(labels[split].values()) == [0, 1, 2]
    assert len(labels["train"]) == 9
    source = manifest.preprocessing["split_source"]
    assert source["layout"] == "original" and "seed 0" in source["test"]
    # The Windows-1252 file decodes to the same ids as its Unicode text.
    from transformers import AutoTokenizer

    from mmbalance.data.shards import load_split

    tok = AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True)
    split = next(s for s, rows in labels.items() if "1" in rows)
    arrays = load_split(tmp_path / "out", manifest, split)
    ids = arrays.modalities["text"][arrays.sample_ids.index("1")]
    want = tok(CP1252_TEXT, max_length=16, truncation=True, padding="max_length")["input_ids"]
    assert ids.tolist() == want and 1 not in want[:4]  # "cafe", "“" ... all known words
    # Another seed draws other splits from the same listing.
    other = converter(tokenizer, seed=3, **settings).list_samples(root)
    assert {s.sample_id for s in other.samples if s.split == "test"} != set(labels["test"])


def test_layout_detection_and_errors_name_file_and_line(jsonl_tree, tokenizer, tmp_path):
    both = tmp_path / "both"
    shutil.copytree(jsonl_tree[0], both)
    make_original_tree(both)
    assert converter(tokenizer).list_samples(both).split_source["layout"] == "jsonl"
    assert (
        converter(tokenizer, layout="original", val_fraction=0.2, test_fraction=0.2)
        .list_samples(both)
        .split_source["layout"]
        == "original"
    )
    with pytest.raises(FileNotFoundError, match="neither train.jsonl"):
        converter(tokenizer).list_samples(tmp_path)

    raw = tmp_path / "bad"
    make_jsonl_tree(raw)
    good_dev = (raw / "dev.jsonl").read_text()
    lines = good_dev.splitlines()
    lines[1] = lines[1].replace('"neutral"', '"mixed"')
    (raw / "dev.jsonl").write_text("\n".join(lines))
    with pytest.raises(ValueError, match=r"dev.jsonl line 2: unknown label 'mixed'"):
        converter(tokenizer).list_samples(raw)
    lines = good_dev.splitlines()
    lines[2] = lines[2][:-3]
    (raw / "dev.jsonl").write_text("\n".join(lines))
    with pytest.raises(ValueError, match=r"dev.jsonl line 3: not valid JSON"):
        converter(tokenizer).list_samples(raw)
    (raw / "dev.jsonl").write_bytes(good_dev.encode() + b'{"text": "caf\xe9", "img": "x.jpg", "label": "neutral"}\n')
    with pytest.raises(ValueError, match=r"dev.jsonl line 5: not UTF-8"):
        converter(tokenizer).list_samples(raw)
    (raw / "dev.jsonl").write_text(good_dev + good_dev.splitlines()[0] + "\n")
    with pytest.raises(ValueError, match=r"dev.jsonl line 5: sample id '1009' already used at .*dev.jsonl line 1"):
        converter(tokenizer).list_samples(raw)
    (raw / "test.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="test.jsonl: missing"):
        converter(tokenizer).list_samples(raw)

    orig = tmp_path / "orig"
    make_original_tree(orig)
    label_file = orig / "labelResultAll.txt"
    label_file.write_text(label_file.read_text() + "99\tpositive,happy\n")
    with pytest.raises(ValueError, match=r"labelResultAll.txt line 19: expected two labels"):
        converter(tokenizer, val_fraction=0.2, test_fraction=0.2).list_samples(orig)
    label_file.write_text("ID\ttext,image\n1\tpositive,positive\tneutral,neutral\tpositive,neutral\n")
    with pytest.raises(ValueError, match="line 2: .*MVSA-Multiple is not supported"):
        converter(tokenizer).list_samples(orig)


def test_text_file_decoding_rule(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes("\ufeffnaïve  tweet\n#fun\r\n".encode("utf-8"))
    assert read_mvsa_text(path) == "naïve tweet #fun"
    path.write_bytes(CP1252_TEXT.encode("cp1252"))
    assert read_mvsa_text(path) == CP1252_TEXT
    path.write_bytes(b"bad \x81 byte \xe9")  # 0x81 is undefined in Windows-1252
    assert read_mvsa_text(path) == "bad \ufffd byte é"


def test_missing_and_corrupt_images_are_listed_then_skipped_on_request(tokenizer, tmp_path):
    root = tmp_path / "raw"
    make_jsonl_tree(root)
    (root / "data" / "1002.jpg").unlink()
    corrupt(root / "data" / "1005.jpg", keep=40)
    with pytest.raises(ConversionError, match=r"1 raw file\(s\) are missing:\n.*1002.jpg \(sample 1002\)"):
        convert(converter(tokenizer), root, tmp_path / "out", engine="local", progress=quiet)
    write_jpg(root / "data" / "1002.jpg")
    with pytest.raises(ConversionError, match=r"1 raw file\(s\) could not be decoded:\n.*1005.jpg"):
        convert(converter(tokenizer), root, tmp_path / "out", engine="local", progress=quiet)
    assert not (tmp_path / "out").exists()
    (root / "data" / "1002.jpg").unlink()
    manifest = convert(converter(tokenizer), root, tmp_path / "out", engine="local", skip_bad=True, progress=quiet)
    assert manifest.preprocessing["skipped_bad"] | {"files": None} == {
        "count": 2,
        "missing": 1,
        "corrupt": 1,
        "files": None,
    }
    assert sum(info.rows for info in manifest.splits.values()) == 15 - 2


def test_missing_or_empty_tokenizer_fails_before_any_decoding(jsonl_tree, tmp_path):
    root, _ = jsonl_tree
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match=r"nope: tokenizer directory does not exist"):
        convert(converter(tmp_path / "nope"), root, out, engine="local", progress=quiet)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty: not a tokenizer directory \(none of tokenizer.json"):
        convert(converter(tmp_path / "empty"), root, out, engine="local", progress=quiet)
    assert not out.exists() and not work_dir_for(out).exists()
    with pytest.raises(ValueError, match="mvsa_single settings: tokenizer: Field required"):
        build_converter("mvsa_single", SMALL)
    with pytest.raises(ValueError, match="mvsa_single settings: max_len: unknown setting"):
        build_converter("mvsa_single", {"tokenizer": "x", "max_len": 8})


def test_converter_pickles_truncates_and_checks_the_tokenizer_in_workers(jsonl_tree, tokenizer, tmp_path):
    root, _ = jsonl_tree
    conv = converter(tokenizer)
    listing = conv.list_samples(root)
    sample = listing.samples[0]
    long = RawSample(sample.sample_id, sample.label, sample.split, sample.files, LONG_TEXT)
    before = conv.extract(long)
    assert before["text"].shape == (16,) and before["text"][0] == 2 and before["text"][-1] == 3  # cut, [SEP] kept
    assert 1 not in before["text"].tolist()
    text_module._CACHE.clear()  # as in a fresh Ray worker process
    clone = pickle.loads(pickle.dumps(conv))
    after = clone.extract(long)
    assert all(np.array_equal(before[m], after[m]) for m in before)
    # A worker whose copy of the tokenizer differs fails loudly instead of writing other ids.
    copy = tmp_path / "tok"
    shutil.copytree(tokenizer, copy)
    conv = converter(copy)
    conv.list_samples(root)
    (copy / "vocab.txt").write_text((copy / "vocab.txt").read_text() + "extra\n")
    text_module._CACHE.clear()
    with pytest.raises(RuntimeError, match="tokenizer files differ"):
        pickle.loads(pickle.dumps(conv)).extract(sample)


def test_converted_fixture_trains_one_epoch(jsonl_tree, tokenizer, tmp_path):
    root, _ = jsonl_tree
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


def test_vocab_txt_only_directory_loads_as_bert(jsonl_tree, tokenizer, tmp_path):
    """The pytorch_pretrained_bert layout (vocab.txt next to the weights) MNL's code loads."""
    root, _ = jsonl_tree
    bare = tmp_path / "bert-base-uncased"
    bare.mkdir()
    shutil.copy(tokenizer / "vocab.txt", bare / "vocab.txt")
    full, vocab_only = converter(tokenizer), converter(bare)
    full.list_samples(root)
    listing = vocab_only.list_samples(root)
    assert vocab_only.preprocessing()["tokenizer"]["files"] == ["vocab.txt"]
    for sample in listing.samples[:3]:
        assert np.array_equal(full.extract(sample)["text"], vocab_only.extract(sample)["text"])
