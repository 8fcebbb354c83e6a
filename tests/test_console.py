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


def test_startup_line_splits_the_wall_clock_marks():
    from mmbalance.engine.console import startup_line

    on_ray = startup_line(launched=100.0, ray_ready=104.0, entered=119.5, data_ready=120.0, first=122.25)
    assert on_ray == (
        "start-up: Ray 4.0 s, workers 15.5 s, data 0.5 s, model and first batch 2.2 s "
        "(22.2 s after the command started)"
    )
    local = startup_line(launched=0.0, ray_ready=None, entered=1.0, data_ready=1.5, first=2.0)
    assert local == "start-up: setup 1.0 s, data 0.5 s, model and first batch 0.5 s (2.0 s after the command started)"
