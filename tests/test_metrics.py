"""SumCounter: packed per-step adds give the same (sum, count) per name as one add per name."""

from __future__ import annotations

import torch

from mmbalance.engine.metrics import SumCounter


def test_add_means_sums_mean_times_count_per_name():
    counter = SumCounter()
    counter.add_means({"loss_total": torch.tensor(0.5), "loss_a": torch.tensor(2.0)}, 4)
    counter.add_means({"loss_total": torch.tensor(1.5), "loss_a": torch.tensor(1.0)}, 2)
    pairs = counter.pairs()
    # loss_total: 0.5 * 4 + 1.5 * 2 = 5 over 6 samples; loss_a: 2 * 4 + 1 * 2 = 10 over 6.
    assert pairs["loss_total"][0].item() == 5.0 and pairs["loss_total"][1].item() == 6.0
    assert pairs["loss_a"][0].item() == 10.0 and pairs["loss_a"][1].item() == 6.0
    assert counter.means() == {"loss_a": 10.0 / 6.0, "loss_total": 5.0 / 6.0}


def test_add_pairs_keeps_tensor_counts_and_prefix():
    counter = SumCounter()
    stats = {"guided": (torch.tensor(3.0), torch.tensor(8.0)), "k": (torch.tensor(0.25), torch.tensor(1.0))}
    counter.add_pairs(stats, prefix="stat:")
    counter.add_pairs(
        {"guided": (torch.tensor(1.0), torch.tensor(8.0)), "k": (torch.tensor(0.75), torch.tensor(1.0))}, "stat:"
    )
    pairs = counter.pairs()
    assert set(pairs) == {"stat:guided", "stat:k"}
    assert pairs["stat:guided"][0].item() == 4.0 and pairs["stat:guided"][1].item() == 16.0
    assert pairs["stat:k"][0].item() == 1.0 and pairs["stat:k"][1].item() == 2.0


def test_packed_adds_are_bit_identical_to_one_add_per_name():
    torch.manual_seed(0)
    packed, single = SumCounter(), SumCounter()
    for _ in range(50):
        values = {name: torch.rand(()) * 3 for name in ("loss_total", "loss_fused", "loss_mnl")}
        stats = {"s": (torch.rand(()) * 64, torch.tensor(64.0))}
        packed.add_means(values, 64)
        packed.add_pairs(stats)
        for name, value in values.items():
            single.add(name, value * 64, 64)
        single.add("s", *stats["s"])
    got, expected = packed.pairs(), single.pairs()
    assert set(got) == set(expected)
    for name in expected:
        assert torch.equal(got[name][0], expected[name][0]) and torch.equal(got[name][1], expected[name][1])


def test_name_added_by_several_paths_gets_the_sum_of_all():
    # Warm-up steps log fewer metrics than later ones: the same name sits in two packed sets.
    counter = SumCounter()
    counter.declare(["loss_fused"], torch.device("cpu"))
    counter.add_means({"loss_fused": torch.tensor(1.0)}, 2)
    counter.add_means({"loss_fused": torch.tensor(3.0), "loss_mnl": torch.tensor(0.5)}, 2)
    counter.add("loss_fused", torch.tensor(4.0), 1)
    pairs = counter.pairs()
    assert pairs["loss_fused"][0].item() == 2.0 + 6.0 + 4.0 and pairs["loss_fused"][1].item() == 5.0
    assert pairs["loss_mnl"][0].item() == 1.0 and pairs["loss_mnl"][1].item() == 2.0
    assert counter.sums["loss_fused"].item() == 12.0 and counter.counts["loss_fused"].item() == 5.0


def test_values_that_cannot_be_stacked_fall_back_to_one_add_each():
    counter = SumCounter()
    counter.add_pairs(
        {"hist": (torch.tensor([1.0, 2.0]), torch.tensor(2.0)), "k": (torch.tensor(0.5), torch.tensor(1.0))}
    )
    counter.add_means({"a": torch.tensor(1.0), "b": torch.tensor(2.0, dtype=torch.float64)}, 3)
    pairs = counter.pairs()
    assert pairs["hist"][0].tolist() == [1.0, 2.0] and pairs["k"][0].item() == 0.5
    assert pairs["a"][0].item() == 3.0 and pairs["b"][0].item() == 6.0 and pairs["b"][1].item() == 3.0


def test_reduce_sees_every_packed_name_once():
    counter = SumCounter()
    counter.add_means({"x": torch.tensor(1.0), "y": torch.tensor(2.0)}, 1)
    calls = []

    def double(t):
        calls.append(t.numel())
        return t * 2

    pairs = counter.pairs(double)
    assert calls == [4]  # (sum, count) of x and y in one collective
    assert pairs["x"][0].item() == 2.0 and pairs["y"][1].item() == 2.0
