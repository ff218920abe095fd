"""Turning gate probabilities into a discrete structure that never exceeds the budget."""

from __future__ import annotations

import random
from collections.abc import Sequence


def greedy_select(probabilities: Sequence[float], sizes: Sequence[int], budget: float) -> list[int]:
    """The greedy knapsack of S3Delta: take candidates from the most to the least probable, each one that still
    fits under ``budget`` (ties: the earlier candidate first).

    Returns:
        The chosen indices, in candidate order; their sizes sum to at most ``budget``.
    """
    order = sorted(range(len(sizes)), key=lambda i: (-float(probabilities[i]), i))
    return _fill(order, sizes, budget)


def random_select(sizes: Sequence[int], budget: float, seed: int) -> list[int]:
    """A random structure of the same kind: candidates in a random order (``seed``), each taken if it fits."""
    order = list(range(len(sizes)))
    random.Random(f"deltakit-random-structure-{seed}").shuffle(order)
    return _fill(order, sizes, budget)


def _fill(order: Sequence[int], sizes: Sequence[int], budget: float) -> list[int]:
    chosen, used = [], 0
    for i in order:
        if used + sizes[i] <= budget:
            chosen.append(i)
            used += sizes[i]
    return sorted(chosen)
