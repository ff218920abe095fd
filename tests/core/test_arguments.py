"""Every public argument is checked (issue 10, section 6): type, finiteness and range, before anything is allocated
or attached. Each bad argument raises a deltakit error naming the argument, and leaves the model unchanged: the
same ``state_dict`` (``torch.equal``), the same modules, the same hooks and ``requires_grad`` flags."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from deltakit import (
    AdapterModel,
    AutoDeltaConfig,
    AutoDeltaModel,
    BitFitModel,
    CompacterModel,
    DeltaConfigError,
    DeltaError,
    LoraConfig,
    LoraModel,
    LowRankAdapterModel,
    ModuleMatchError,
    ParallelAdapterModel,
    PrefixModel,
    SoftPromptModel,
    UnsupportedModuleError,
)
from deltakit.config import CONFIG_REGISTRY, MAX_SCALE, MAX_SIZE

from tests.helpers import assert_state_equal, hook_counts, snapshot, tiny_bert

TB = 2**40  # sizes that would ask for ~140 TB


# (id, call on a fresh tiny BERT, expected error type, fragment of the message)
CASES: list[tuple[str, Callable[[nn.Module], Any], type[Exception], str]] = [
    # patterns
    ("modified_modules=42", lambda m: LoraModel(m, modified_modules=42), DeltaConfigError,
     "modified_modules must be a list"),
    ("modified_modules=[1]", lambda m: LoraModel(m, modified_modules=["query", 1]), DeltaConfigError,
     "modified_modules"),
    ("modified_modules=['']", lambda m: LoraModel(m, modified_modules=[""]), DeltaConfigError, "non-empty strings"),
    ("exclude_modules=dict", lambda m: LoraModel(m, exclude_modules={"a": 1}), DeltaConfigError, "exclude_modules"),
    ("unfrozen_modules=5", lambda m: BitFitModel(m, unfrozen_modules=5), DeltaConfigError, "unfrozen_modules"),
    ("input_modules=5", lambda m: ParallelAdapterModel(m, input_modules=5), DeltaConfigError, "input_modules"),
    # LoRA
    ("lora_alpha=inf", lambda m: LoraModel(m, lora_alpha=math.inf), DeltaConfigError, "lora_alpha must be a finite"),
    ("lora_alpha=nan", lambda m: LoraModel(m, lora_alpha=math.nan), DeltaConfigError, "lora_alpha must be a finite"),
    # An int too large for a float: math.isfinite raised OverflowError (not a deltakit error)
    ("lora_alpha=10**400", lambda m: LoraModel(m, lora_alpha=10**400), DeltaConfigError, "lora_alpha must be a finite"),
    ("lora_alpha=1e308", lambda m: LoraModel(m, lora_alpha=1e308), DeltaConfigError, f"<= {MAX_SCALE:g}"),
    ("lora_alpha=0", lambda m: LoraModel(m, lora_alpha=0), DeltaConfigError, "> 0"),
    ("lora_alpha='16'", lambda m: LoraModel(m, lora_alpha="16"), DeltaConfigError, "lora_alpha"),
    ("lora_alpha=True", lambda m: LoraModel(m, lora_alpha=True), DeltaConfigError, "lora_alpha"),
    ("lora_r=2**40", lambda m: LoraModel(m, lora_r=TB), DeltaConfigError, "lora_r must be a positive integer"),
    ("lora_r>host", lambda m: LoraModel(m, lora_r=65), DeltaConfigError,
     "attention.self.query' (Linear in=32, out=32)"),
    ("lora_r>embedding", lambda m: LoraModel(m, modified_modules=["word_embeddings"], lora_r=65), DeltaConfigError,
     "Embedding(100, 32)"),
    ("lora_r=8.0", lambda m: LoraModel(m, lora_r=8.0), DeltaConfigError, "lora_r"),
    ("lora_r=0", lambda m: LoraModel(m, lora_r=0), DeltaConfigError, "lora_r"),
    ("lora_dropout=nan", lambda m: LoraModel(m, lora_dropout=math.nan), DeltaConfigError, "lora_dropout"),
    ("lora_dropout=1", lambda m: LoraModel(m, lora_dropout=1.0), DeltaConfigError, "[0, 1)"),
    # adapters
    ("non_linearity=['gelu']", lambda m: AdapterModel(m, non_linearity=["gelu"]), DeltaConfigError, "non_linearity"),
    ("non_linearity=None", lambda m: AdapterModel(m, non_linearity=None), DeltaConfigError, "choose one of"),
    ("bottleneck_dim=2**62", lambda m: AdapterModel(m, bottleneck_dim=2**62), DeltaConfigError, "bottleneck_dim"),
    ("bottleneck_dim>host", lambda m: AdapterModel(m, bottleneck_dim=65), DeltaConfigError, "output width 32"),
    ("low_rank_rank=2**40", lambda m: LowRankAdapterModel(m, low_rank_rank=TB), DeltaConfigError, "low_rank_rank"),
    ("low_rank_rank>host", lambda m: LowRankAdapterModel(m, low_rank_rank=65), DeltaConfigError, "output width 32"),
    ("low_rank_w_init=list", lambda m: LowRankAdapterModel(m, low_rank_w_init=["glorot-normal"]), DeltaConfigError,
     "low_rank_w_init"),
    ("reduction_factor=0", lambda m: LowRankAdapterModel(m, reduction_factor=0), DeltaConfigError, "reduction_factor"),
    ("phm_init_range=nan", lambda m: CompacterModel(m, phm_init_range=math.nan), DeltaConfigError, "phm_init_range"),
    ("phm_init_range=inf", lambda m: CompacterModel(m, phm_init_range=math.inf), DeltaConfigError, "phm_init_range"),
    ("phm_c_init=x", lambda m: CompacterModel(m, phm_c_init="x"), DeltaConfigError, "phm_c_init"),
    ("factorized_phm='yes'", lambda m: CompacterModel(m, factorized_phm="yes"), DeltaConfigError, "True or False"),
    ("hypercomplex_division=2**20", lambda m: CompacterModel(m, hypercomplex_division=2**20), DeltaConfigError,
     "hypercomplex_division"),
    ("hypercomplex_division>host", lambda m: CompacterModel(m, reduction_factor=1, hypercomplex_division=64),
     UnsupportedModuleError, "multiples of hypercomplex_division 64"),
    ("phm_rank>block", lambda m: CompacterModel(m, reduction_factor=4, phm_rank=65), DeltaConfigError, "phm_rank"),
    ("scaled=nan", lambda m: ParallelAdapterModel(m, scaled=math.nan), DeltaConfigError, "scaled must be a finite"),
    ("scaled=inf", lambda m: ParallelAdapterModel(m, scaled=math.inf), DeltaConfigError, "scaled"),
    ("scaled=0", lambda m: ParallelAdapterModel(m, scaled=0), DeltaConfigError, "other than 0"),
    ("scaled=1e6", lambda m: ParallelAdapterModel(m, scaled=1e6), DeltaConfigError, "scaled"),
    ("parallel bottleneck=2**62", lambda m: ParallelAdapterModel(m, bottleneck_dim=2**62), DeltaConfigError,
     "bottleneck_dim"),
    ("parallel bottleneck>host", lambda m: ParallelAdapterModel(m, bottleneck_dim=129), DeltaConfigError,
     "wider of the two widths"),
    # prompts
    ("init_range=inf", lambda m: SoftPromptModel(m, init_range=math.inf), DeltaConfigError, "init_range"),
    ("init_range=nan", lambda m: SoftPromptModel(m, init_range=math.nan), DeltaConfigError, "init_range"),
    ("soft_token_num=2**40", lambda m: SoftPromptModel(m, soft_token_num=TB), DeltaConfigError, "soft_token_num"),
    ("token_init=1", lambda m: SoftPromptModel(m, token_init=1), DeltaConfigError, "token_init"),
    ("prefix_token_num=2**40", lambda m: PrefixModel(m, prefix_token_num=TB), DeltaConfigError, "prefix_token_num"),
    ("mid_dim=2**40", lambda m: PrefixModel(m, mid_dim=TB), DeltaConfigError, "mid_dim"),
    ("reparameterize='no'", lambda m: PrefixModel(m, reparameterize="no"), DeltaConfigError, "reparameterize"),
    # construction
    ("name=5", lambda m: LoraModel(m, name=5), DeltaError, "identifier"),
    ("from_config(5)", lambda m: LoraModel.from_config(5, m), DeltaError, "needs a LoraConfig"),
    ("from_config(bogus=)", lambda m: LoraModel.from_config({"lora_r": 4}, m, bogus=1), DeltaError, "bogus"),
    ("from_config(list)", lambda m: LoraModel.from_config([("lora_r", 4)], m), DeltaError, "LoraConfig"),
    ("AutoDeltaModel.from_config(5)", lambda m: AutoDeltaModel.from_config(5, m), DeltaConfigError, "delta config"),
    ("from_dict(type=['lora'])", lambda m: AutoDeltaConfig.from_dict({"delta_type": ["lora"]}), DeltaConfigError,
     "Unknown delta_type"),
    ("from_dict([])", lambda m: AutoDeltaConfig.from_dict([]), DeltaConfigError, "needs a dict"),
    ("LoraConfig.from_dict('x')", lambda m: LoraConfig.from_dict("lora"), DeltaConfigError, "needs a dict"),
    ("from_dict(key=1)", lambda m: LoraConfig.from_dict({1: 2}), DeltaConfigError, "keys must be strings"),
    ("from_finetuned(path=5)", lambda m: LoraModel.from_finetuned(5, m), DeltaError, "directory path"),
    ("from_finetuned(check_backbone=)", lambda m: LoraModel.from_finetuned("x", m, check_backbone="no"), DeltaError,
     "check_backbone"),
]


# Methods of a live delta: (id, call on a LoRA attached to a fresh tiny BERT, error type, message fragment).
METHOD_CASES: list[tuple[str, Callable[[LoraModel], Any], type[Exception], str]] = [
    ("freeze_module(exclude=5)", lambda d: d.freeze_module(exclude=5), DeltaError, "exclude"),
    ("freeze_module(exclude=[5])", lambda d: d.freeze_module(exclude=["deltas", 5]), DeltaError, "exclude"),
    ("freeze_module(exclude=[''])", lambda d: d.freeze_module(exclude=[""]), DeltaError, "exclude"),
    ("freeze_module(module=5)", lambda d: d.freeze_module(module=5), DeltaError, "nn.Module"),
    ("freeze_module(set_state_dict=)", lambda d: d.freeze_module(set_state_dict="yes"), DeltaError, "set_state_dict"),
    ("freeze_module(exclude=missing)", lambda d: d.freeze_module(exclude=["deltas", "no_such_module"]),
     ModuleMatchError, "no_such_module"),  # resolved before any requires_grad flag changes
    ("merge(exact_unmerge=)", lambda d: d.merge(exact_unmerge="no"), DeltaError, "exact_unmerge"),
    ("merge(safe=)", lambda d: d.merge(safe=1), DeltaError, "safe"),
]


def _model_fingerprint(model: nn.Module) -> tuple[Any, ...]:
    return (
        [n for n, _ in model.named_modules()],
        hook_counts(model),
        [(n, p.requires_grad) for n, p in model.named_parameters()],
    )


def _check_refused(model: nn.Module, call: Callable[[], Any], error: type[Exception], fragment: str) -> None:
    before_state, before = snapshot(model), _model_fingerprint(model)
    with pytest.raises(error) as info:
        call()
    assert isinstance(info.value, DeltaError), f"{type(info.value).__name__} is not a deltakit error"
    assert fragment in str(info.value), str(info.value)
    assert_state_equal(model, before_state)
    assert _model_fingerprint(model) == before


@pytest.mark.parametrize(("call", "error", "fragment"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_bad_argument_is_a_clear_error_and_changes_nothing(call, error, fragment) -> None:
    model = tiny_bert()
    _check_refused(model, lambda: call(model), error, fragment)


@pytest.mark.parametrize(
    ("call", "error", "fragment"), [c[1:] for c in METHOD_CASES], ids=[c[0] for c in METHOD_CASES]
)
def test_a_bad_method_argument_is_a_clear_error_and_changes_nothing(call, error, fragment) -> None:
    model = tiny_bert()
    delta = LoraModel(model, modified_modules=["query"], lora_r=4)
    _check_refused(model, lambda: call(delta), error, fragment)
    assert delta.state == "attached"


# ------------------------------------------------------------------ every config field, any value
VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70), st.floats(allow_nan=True),
    st.text(max_size=5), st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=1),
)
FIELDS = [(t, f.name) for t, cls in sorted(CONFIG_REGISTRY.items()) for f in dataclasses.fields(cls)]


@pytest.mark.parametrize(("delta_type", "field"), FIELDS, ids=[f"{t}.{f}" for t, f in FIELDS])
@settings(max_examples=40, deadline=None)
@given(value=VALUES)
def test_any_value_of_any_config_field_is_accepted_sanely_or_refused_clearly(
    delta_type: str, field: str, value: Any
) -> None:
    cls = CONFIG_REGISTRY[delta_type]
    try:
        config = cls(**{field: value})
    except DeltaConfigError:
        return  # a clear refusal
    accepted = getattr(config, field)
    if isinstance(accepted, bool) or accepted is None:
        return
    if isinstance(accepted, (int, float)):
        assert math.isfinite(accepted), f"{delta_type}.{field} accepted {value!r}"
        # Sizes and scales are bounded (an allocation, an overflow); a seed is any 64-bit value (torch.Generator).
        bound = 2**64 - 1 if field.endswith("seed") else max(MAX_SIZE, MAX_SCALE)
        assert abs(accepted) <= bound, f"{delta_type}.{field} accepted {value!r}"
    elif isinstance(accepted, list):
        assert all(isinstance(v, str) and v for v in accepted), f"{delta_type}.{field} accepted {value!r}"
    else:
        assert isinstance(accepted, str), f"{delta_type}.{field} accepted {value!r} ({type(accepted).__name__})"


# ------------------------------------------------------------------ the CLI's size options
@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["show", "bert", "--layers", "100000"], "--layers must be between 1 and 256"),
        (["show", "bert", "--layers", "0"], "--layers must be between 1 and 256"),
        (["show", "bert", "--no-tree", "--delta", "lora", "--option", f"lora_r={TB}"], "lora_r"),
        (["show", "bert", "--no-tree", "--delta", "prefix", "--option", "embed_dim=100000000"], "embed_dim"),
        (["show", "bert", "--no-tree", "--delta", "adapter", "--option", "bottleneck_dim=4611686018427387904"],
         "bottleneck_dim"),
    ],
)
def test_show_bounds_its_size_options_up_front(argv: list[str], fragment: str, capsys) -> None:
    from deltakit.cli import main

    assert main(argv) == 1
    assert fragment in capsys.readouterr().err


@pytest.mark.parametrize("bad", [5, "bert", None, [nn.Linear(2, 2)]])
def test_visualization_of_something_that_is_not_a_model_is_a_deltakit_error(bad: Any) -> None:
    from deltakit import DeltaError, Visualization

    with pytest.raises(DeltaError, match="Visualization needs an nn.Module"):
        Visualization(bad)
