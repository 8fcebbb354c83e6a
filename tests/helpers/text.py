"""A tiny local BERT (WordPiece, lower-casing) tokenizer for text converter tests: built from a
written vocab.txt, nothing downloaded."""

from __future__ import annotations

from pathlib import Path

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # ids 0..4: pad 0, unk 1, cls 2, sep 3


def write_tokenizer(directory: Path, words) -> Path:
    """Save a BERT tokenizer whose vocabulary is ``SPECIAL`` + the sorted distinct lower-cased
    ``words`` (punctuation included as its own words) into ``directory``; returns it. The
    directory keeps the vocab.txt next to what ``save_pretrained`` writes, as a saved
    bert-base-uncased does."""
    from transformers import BertTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    vocab = SPECIAL + sorted({w.lower() for w in words} - set(SPECIAL))
    (directory / "vocab.txt").write_text("".join(f"{token}\n" for token in vocab), encoding="utf-8")
    # from_pretrained on a vocab.txt-only folder works in transformers 4.x and 5.x alike.
    tokenizer = BertTokenizer.from_pretrained(str(directory), local_files_only=True)
    assert len(tokenizer) == len(vocab), (len(tokenizer), len(vocab))
    tokenizer.save_pretrained(str(directory))
    return directory


def vocab_size(directory: Path) -> int:
    return len((directory / "vocab.txt").read_text(encoding="utf-8").splitlines())


def words_of(*texts: str) -> set[str]:
    """The BERT basic-tokenizer words of ``texts``: lower-cased, punctuation split off."""
    import re

    return {w for text in texts for w in re.findall(r"\w+|[^\w\s]", text.lower())}
