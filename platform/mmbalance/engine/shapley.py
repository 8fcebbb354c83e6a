"""Exact Shapley values of a small cooperative game: how much each modality adds to a score.

``value(S)`` is the score with only the modalities in ``S`` present (``evaluation.py`` masks the
rest with ``missing``'s neutral fill). The Shapley value of ``m`` is its marginal gain averaged
over every order in which the modalities could be added:

    phi_m = sum over S ⊆ M \\ {m} of |S|! (M - |S| - 1)! / M! * (value(S ∪ {m}) - value(S))

All 2^M coalitions are evaluated, so the values are exact (no sampling) and M is capped at
``MAX_PLAYERS``. The weights and sums are exact rationals, so the values add up to
``value(all) - value(∅)`` (efficiency) without rounding drift before the final conversion.
"""

from __future__ import annotations

from fractions import Fraction
from itertools import combinations
from math import factorial
from typing import Callable, Iterable

MAX_PLAYERS = 4  # 2^4 = 16 coalitions, i.e. 16 test passes; beyond that exact enumeration is not offered


def coalitions(players: Iterable[str]) -> list[frozenset[str]]:
    """Every subset of ``players``, smallest first (the empty set, then singletons, ...)."""
    names = list(players)
    return [frozenset(c) for size in range(len(names) + 1) for c in combinations(names, size)]


def shapley_values(value: Callable[[frozenset[str]], float], modalities: Iterable[str]) -> dict[str, float]:
    """``{m: phi_m}`` for the game ``value`` over ``modalities`` (M <= ``MAX_PLAYERS``), each
    coalition's value read once. Raises ValueError for no modality, a repeated name, or M > 4."""
    players = list(modalities)
    if not players:
        raise ValueError("shapley_values needs at least one modality")
    if len(set(players)) != len(players):
        raise ValueError(f"shapley_values: modality names repeat: {players}")
    if len(players) > MAX_PLAYERS:
        raise ValueError(
            f"exact Shapley values take at most {MAX_PLAYERS} modalities (2^M coalitions), "
            f"got {len(players)}: {players}"
        )
    n = len(players)
    v = {s: Fraction(value(s)) for s in coalitions(players)}  # a float converts to its exact rational
    weight = [Fraction(factorial(k) * factorial(n - k - 1), factorial(n)) for k in range(n)]
    phi = {m: sum((weight[len(s)] * (v[s | {m}] - v[s]) for s in v if m not in s), Fraction(0)) for m in players}
    # Efficiency holds by construction; checking it in exact arithmetic guards the enumeration.
    assert sum(phi.values()) == v[frozenset(players)] - v[frozenset()], "Shapley efficiency violated"
    return {m: float(phi[m]) for m in players}
