"""The per-epoch table reaches stdout exactly once, even where ``print`` is replaced (Ray Train
workers patch it to log and, with a wrapped stdout, print again)."""

from __future__ import annotations

import builtins

from mmbalance.engine.console import EpochTable

METRICS = {
    "epoch": 0,
    "train/loss_total": 1.25,
    "train/acc_fused": 0.5,
    "val/acc_fused": 0.625,
    "val/acc_audio": 0.6,
    "val/acc_visual": 0.4,
    "val/imbalance_ratio": 1.5,
    "train/samples_per_s": 1234.0,
}


def test_epoch_rows_do_not_go_through_print(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(builtins, "print", lambda *a, **k: calls.append(a))  # what a Ray Train worker's patch could do
    table = EpochTable(["audio", "visual"])
    table.row(METRICS)
    table.row({**METRICS, "epoch": 1})
    lines = capsys.readouterr().out.splitlines()
    assert calls == []
    assert len(lines) == 3 and lines[0].split() == [
        "epoch",
        "loss",
        "train_acc",
        "val_acc",
        "val_audio",
        "val_visual",
        "ratio",
        "samples/s",
    ]
    assert lines[1].split() == ["0", "1.2500", "0.5000", "0.6250", "0.6000", "0.4000", "1.5000", "1234"]
    assert lines[2].split()[0] == "1"


def test_a_disabled_table_writes_nothing(capsys):
    EpochTable(["audio"], enabled=False).row(METRICS)
    assert capsys.readouterr().out == ""
