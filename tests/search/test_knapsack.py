"""deltakit.search.knapsack: a selected structure never exceeds its budget, and the greedy order is respected."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from deltakit.search import greedy_select, random_select

sizes_st = st.lists(st.integers(1, 5000), min_size=1, max_size=60)


@settings(max_examples=300, deadline=None)
@given(sizes=sizes_st, data=st.data())
def test_greedy_selection_never_exceeds_the_budget_and_takes_what_fits(sizes, data) -> None:
    probs = data.draw(st.lists(st.floats(0, 1), min_size=len(sizes), max_size=len(sizes)))
    budget = data.draw(st.floats(0, 1.2 * sum(sizes)))
    chosen = greedy_select(probs, sizes, budget)
    assert sum(sizes[i] for i in chosen) <= budget
    assert chosen == sorted(set(chosen))
    # Greedy: every candidate left out did not fit after the more probable ones taken before it.
    order = sorted(range(len(sizes)), key=lambda i: (-probs[i], i))
    used = 0
    for i in order:
        if i in chosen:
            used += sizes[i]
        else:
            assert used + sizes[i] > budget


@settings(max_examples=200, deadline=None)
@given(sizes=sizes_st, seed=st.integers(0, 10_000), data=st.data())
def test_random_selection_never_exceeds_the_budget_and_is_seeded(sizes, seed, data) -> None:
    budget = data.draw(st.floats(0, 1.2 * sum(sizes)))
    chosen = random_select(sizes, budget, seed)
    assert sum(sizes[i] for i in chosen) <= budget
    assert random_select(sizes, budget, seed) == chosen


def test_the_most_probable_candidates_come_first() -> None:
    assert greedy_select([0.1, 0.9, 0.5, 0.8], [10, 10, 10, 10], 25) == [1, 3]
    assert greedy_select([0.1, 0.9, 0.5, 0.8], [10, 30, 10, 10], 25) == [2, 3]  # the likeliest does not fit
