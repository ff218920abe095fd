"""Compact modified_modules patterns: exact for any selection (checked by the matcher itself), readable forms."""

from __future__ import annotations

import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from deltakit import find_modules
from deltakit.errors import ModuleMatchError
from deltakit.structures import tiny_model
from deltakit.web.patterns import compact_patterns, int_set_regex, verify_patterns
from deltakit.web.tree import selectable_names


@settings(max_examples=200, deadline=None)
@given(st.sets(st.integers(min_value=0, max_value=250), min_size=1, max_size=40))
def test_int_set_regex_matches_exactly_the_set(values: set[int]) -> None:
    regex = re.compile(int_set_regex(values))
    assert {n for n in range(400) if regex.fullmatch(str(n))} == values
    assert not regex.fullmatch("0" + str(min(values)))  # no leading zeros: module names never have them


@pytest.mark.parametrize("arch", ["llama", "t5", "bert", "gpt2"])
def test_random_selections_round_trip_through_the_matcher(arch: str) -> None:
    model = tiny_model(arch, num_layers=3 if arch == "t5" else 12)
    names = selectable_names(model)
    rng = random.Random(arch)
    for _ in range(60):
        selection = rng.sample(names, rng.randint(1, 25))
        patterns = compact_patterns(names, selection)
        matched = [n for n, _ in find_modules(model, patterns)]
        assert sorted(matched) == sorted(selection), patterns


def test_readable_forms() -> None:
    model = tiny_model("llama", num_layers=12)
    names = selectable_names(model)
    q = [n for n in names if n.endswith("q_proj")]
    v = [n for n in names if n.endswith("v_proj")]
    assert compact_patterns(names, q + v) == ["q_proj", "v_proj"]
    some = [n for n in q if int(n.split(".")[1]) in (0, 1, 2, 3, 7, 10, 11)]
    assert compact_patterns(names, some) == [r"[r]layers\.(?:[0-3]|7|1[0-1])\.self_attn\.q_proj"]
    assert compact_patterns(names, ["layers.3.mlp.down_proj", "layers.1"]) == ["layers.1", "layers.3.mlp.down_proj"]
    assert verify_patterns(model, ["q_proj"], q) == q


def test_unknown_names_are_refused() -> None:
    model = tiny_model("llama", num_layers=2)
    with pytest.raises(ModuleMatchError, match="does not have"):
        compact_patterns(selectable_names(model), ["layers.9.self_attn.q_proj"])


def test_a_selection_no_pattern_can_write_is_refused() -> None:
    model = nn.Module()
    model.a = nn.Module()
    model.a.b = nn.Linear(2, 2)
    model.x = nn.Module()
    model.x.a = nn.Module()
    model.x.a.b = nn.Linear(2, 2)
    with pytest.raises(ModuleMatchError, match="suffix of another module"):
        compact_patterns(selectable_names(model), ["a.b"])
    assert compact_patterns(selectable_names(model), ["a.b", "x.a.b"]) == ["b"]


def test_verify_names_what_differs() -> None:
    model = tiny_model("llama", num_layers=2)
    with pytest.raises(ModuleMatchError, match="extra"):
        verify_patterns(model, ["q_proj"], ["layers.0.self_attn.q_proj"])
