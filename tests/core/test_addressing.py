"""Name-based addressing: suffixes at dot boundaries, [r] regexes, excludes, role names, errors."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from deltakit import BitFitModel, LoraModel, ModuleMatchError, UnsupportedModuleError, find_modules

from tests.helpers import ARCHS, assert_state_equal, hook_counts, snapshot, tiny_bert


def names(model: nn.Module, patterns, exclude=None, **kw) -> list[str]:
    return [n for n, _ in find_modules(model, patterns, exclude, **kw)]


def test_suffix_matches_only_at_dot_boundaries() -> None:
    model = nn.Module()
    model.value = nn.Linear(2, 2)
    model.xvalue = nn.Linear(2, 2)
    model.block = nn.Module()
    model.block.value = nn.Linear(2, 2)
    model.block.my_value = nn.Linear(2, 2)
    assert names(model, ["value"]) == ["value", "block.value"]
    assert names(model, ["block.value"]) == ["block.value"]
    assert names(model, ["xvalue"]) == ["xvalue"]


def test_regex_must_match_a_whole_suffix() -> None:
    model = tiny_bert()
    got = names(model, [r"[r]layer\.0\.output\.dense"])
    assert got == ["bert.encoder.layer.0.output.dense"]  # not attention.output.dense, not layer.10...
    assert names(model, [r"[r](query|key)"]) == [
        f"bert.encoder.layer.{i}.attention.self.{p}" for i in range(2) for p in ("query", "key")
    ]
    with pytest.raises(ModuleMatchError):
        names(model, [r"[r]uery"])  # a partial component is not a whole suffix


def test_exclude_removes_matches_inside_excluded_modules() -> None:
    model = tiny_bert()
    got = names(model, ["query", "value"], exclude=["encoder.layer.0"])
    assert got == ["bert.encoder.layer.1.attention.self.query", "bert.encoder.layer.1.attention.self.value"]
    with pytest.raises(ModuleMatchError, match="excluded"):
        names(model, ["query"], exclude=["encoder"])


def test_pattern_matching_nothing_names_it_and_suggests_close_names() -> None:
    model = tiny_bert()
    with pytest.raises(ModuleMatchError) as info:
        names(model, ["querry"])
    message = str(info.value)
    assert "'querry'" in message and "'query'" in message
    with pytest.raises(ModuleMatchError, match="exclude_modules pattern 'nonexistent'"):
        names(model, ["query"], exclude=["nonexistent"])
    with pytest.raises(ModuleMatchError, match="Invalid regular expression"):
        names(model, ["[r](unclosed"])
    with pytest.raises(ModuleMatchError, match="not a dotted module name"):
        names(model, ["attention..query"])


def test_bad_pattern_leaves_the_model_unchanged() -> None:
    model = tiny_bert()
    keys, hooks, state = list(model.state_dict()), hook_counts(model), snapshot(model)
    with pytest.raises(ModuleMatchError):
        LoraModel(model, modified_modules=["query", "no_such_module"])
    with pytest.raises(UnsupportedModuleError, match="BertSelfAttention"):
        LoraModel(model, modified_modules=["query", "attention.self"])
    with pytest.raises(UnsupportedModuleError, match="Dropout"):
        BitFitModel(model, modified_modules=["attention.self.dropout"])
    assert list(model.state_dict()) == keys and hook_counts(model) == hooks
    assert_state_equal(model, state)


ROLE_EXPECTATIONS = {
    "bert": {"attn.q": "attention.self.query", "ff.w2": "layer.0.output.dense", "attn.norm": "attention.output.LayerNorm"},
    "roberta": {"attn.v": "attention.self.value", "ff.w1": "intermediate.dense"},
    "gpt2": {"attn.q": "attn.c_attn", "attn.o": "attn.c_proj", "ff.w2": "mlp.c_proj", "ff.norm": "h.0.ln_2"},
    "t5": {"attn.q": "EncDecAttention.q", "ff.w1": "DenseReluDense.wi", "ff.norm": "decoder.block.0.layer.2.layer_norm"},
    "llama": {"attn.k": "self_attn.k_proj", "ff.gate": "mlp.gate_proj", "ff.w2": "mlp.down_proj"},
}


@pytest.mark.parametrize("arch_name", list(ROLE_EXPECTATIONS))
def test_role_names_resolve_per_architecture(arch_name: str) -> None:
    model = ARCHS[arch_name].build()
    for role, expected_suffix in ROLE_EXPECTATIONS[arch_name].items():
        got = names(model, [role])
        assert any(n.endswith(expected_suffix) for n in got), (role, got)
        assert len(got) >= 2  # one per layer at least
    if arch_name == "t5":  # self- and cross-attention, encoder and decoder
        q = names(model, ["attn.q"])
        assert len(q) == 6 and sum("EncDecAttention" in n for n in q) == 2
    if arch_name == "gpt2":  # q and v live in the fused c_attn: one site per layer
        assert names(model, ["attn.q", "attn.v"]) == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]


def test_roles_work_inside_a_user_wrapper_module() -> None:
    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = tiny_bert()
            self.head = nn.Linear(2, 3)

        def forward(self, input_ids):
            return self.head(self.encoder(input_ids=input_ids).logits)

    model = Wrapper()
    delta = LoraModel(model)  # default positions attn.q, attn.v found inside the wrapper
    assert delta.modified_modules == [
        f"encoder.bert.encoder.layer.{i}.attention.self.{p}" for i in range(2) for p in ("query", "value")
    ]


def test_unknown_architecture_without_modified_modules_is_a_clear_error() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ModuleMatchError) as info:
        LoraModel(model)
    message = str(info.value)
    assert "modified_modules" in message and "attn.q" in message
    delta = LoraModel(model, modified_modules=["0", "2"])
    assert delta.modified_modules == ["0", "2"]


def test_a_delta_never_modifies_another_delta() -> None:
    model = tiny_bert()
    LoraModel(model, modified_modules=["query"])
    with pytest.raises(ModuleMatchError):
        LoraModel(model, modified_modules=["lora"])
    bitfit = BitFitModel(model, modified_modules=["query"])
    assert bitfit.modified_modules == ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.attention.self.query"]


# ---------------------------------------------------------------- property-based: random module trees

SEGMENT = st.sampled_from(["a", "b", "ab", "q", "v", "x1", "0", "1", "10", "layer", "dense"])


@st.composite
def module_trees(draw: st.DrawFn) -> nn.Module:
    def build(depth: int) -> nn.Module:
        module = nn.Module() if depth > 0 else nn.Linear(1, 1)
        if depth > 0:
            for name in draw(st.lists(SEGMENT, min_size=1, max_size=3, unique=True)):
                child_depth = draw(st.integers(0, depth - 1))
                module.add_module(name, build(child_depth))
        return module

    return build(draw(st.integers(1, 4)))


def reference_suffix_match(name: str, pattern: str) -> bool:
    want = pattern.split(".")
    have = name.split(".")
    return len(have) >= len(want) and have[len(have) - len(want) :] == want


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=module_trees(), pattern=st.lists(SEGMENT, min_size=1, max_size=3).map(".".join))
def test_suffix_matching_agrees_with_a_component_wise_reference(tree: nn.Module, pattern: str) -> None:
    all_names = [n for n, _ in tree.named_modules() if n]
    expected = [n for n in all_names if reference_suffix_match(n, pattern)]
    if expected:
        assert names(tree, [pattern]) == expected
        # the same suffix written as an escaped regex selects the same modules
        assert names(tree, ["[r]" + re.escape(pattern)]) == expected
    else:
        with pytest.raises(ModuleMatchError):
            names(tree, [pattern])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=module_trees(), data=st.data())
def test_exclusion_removes_exactly_the_excluded_subtrees(tree: nn.Module, data: st.DataObject) -> None:
    all_names = [n for n, _ in tree.named_modules() if n]
    excluded_root = data.draw(st.sampled_from(all_names))
    pattern = "[r].*"  # every module
    exclude = [excluded_root]
    # the exclude pattern is a suffix too: every module ending with it goes, with everything inside it
    expected = [
        n for n in all_names
        if not any(n == m or n.startswith(m + ".") for m in all_names if reference_suffix_match(m, excluded_root))
    ]
    if expected:
        assert names(tree, [pattern], exclude) == expected
    else:
        with pytest.raises(ModuleMatchError, match="excluded"):
            names(tree, [pattern], exclude)


def test_default_positions_skip_roles_the_architecture_lacks() -> None:
    model = tiny_bert()
    delta = BitFitModel(model)  # includes ff.gate, which BERT does not have
    assert len(delta.sites) == 2 * 8
    assert not any("gate" in n for n in delta.modified_modules)
    assert torch.equal(delta.sites[0].module.bias, torch.zeros(32))
