"""Automatic delta-structure search (S3Delta, Hu et al. NeurIPS 2022): which delta goes where under a budget.

- :mod:`~deltakit.search.candidates`: :class:`CandidateSet` (a method with settings at module patterns) expanded
  into :class:`Candidate` s with their exact sizes;
- :mod:`~deltakit.search.gates`: gate probabilities under the budget (the shift solved by bisection),
  binary-concrete samples, and :class:`GatedSite` / :class:`GatedDelta`, which scale a candidate's contribution
  from outside the method;
- :mod:`~deltakit.search.knapsack`: the greedy knapsack (never over the budget) and random structures;
- :mod:`~deltakit.search.search`: :class:`StructureSearch` (fit, select, detach) and :class:`Structure` (build
  it on a fresh backbone as a :class:`~deltakit.composite.CompositeDelta`).

See docs/structure_search.md.
"""

from __future__ import annotations

from .candidates import Candidate, CandidateSet
from .gates import GateBank, GatedDelta, GatedSite, concrete_sample, expected_size, solve_shift
from .knapsack import greedy_select, random_select
from .search import Structure, StructureSearch, list_candidates, random_structure

__all__ = [
    "Candidate",
    "CandidateSet",
    "GateBank",
    "GatedDelta",
    "GatedSite",
    "Structure",
    "StructureSearch",
    "concrete_sample",
    "expected_size",
    "greedy_select",
    "list_candidates",
    "random_select",
    "random_structure",
    "solve_shift",
]
