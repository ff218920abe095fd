"""The DESIGN §4 contract, for every delta method and variant, over tiny BERT, RoBERTa, GPT-2, T5 and Llama."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from deltakit import AutoDeltaModel, DeltaBase, DeltaStateError, LoraModel
from deltakit.checkpoint import WEIGHTS_NAME, read_weights
from deltakit.registry import DELTA_REGISTRY

from tests.tolerances import assert_same_function
from tests.helpers import Arch, assert_state_equal, hook_counts, perturb, snapshot

#: The contract's variants of each registered delta type: {variant name: constructor keyword arguments}.
SETTINGS: dict[str, dict[str, dict[str, Any]]] = {
    "lora": {
        "lora-default": {"lora_r": 4, "lora_alpha": 8},
        "lora-embed-ff": {"modified_modules": ["embed", "ff.w1", "ff.w2"], "lora_r": 2},
        "lora-rslora": {"lora_r": 4, "lora_alpha": 8, "use_rslora": True},
    },
    "dora": {
        "dora-default": {"lora_r": 4, "lora_alpha": 8},
        "dora-ff-rslora": {"modified_modules": ["ff.w1", "ff.w2"], "lora_r": 2, "use_rslora": True},
    },
    "bitfit": {"bitfit-default": {}},
    "adapter": {
        "adapter-default": {"bottleneck_dim": 6},
        "adapter-ffw1": {"modified_modules": ["ff.w1"], "bottleneck_dim": 4, "non_linearity": "relu"},
    },
    "parallel_adapter": {
        "parallel-default": {"bottleneck_dim": 6, "scaled": 2.0},
        "parallel-same-module": {"modified_modules": ["attn.o"], "bottleneck_dim": 4},
    },
    "low_rank_adapter": {"low-rank-adapter-default": {"reduction_factor": 4, "low_rank_rank": 2}},
    "compacter": {
        "compacter-default": {"reduction_factor": 4},
        "compacter++-unshared": {
            "modified_modules": ["ff.w2"], "reduction_factor": 4, "phm_rank": 2, "shared_phm_rule": False,
            "factorized_phm_rule": True,
        },
    },
    "prefix": {
        "prefix-default": {"prefix_token_num": 3, "embed_dim": 8, "mid_dim": 8},
        "prefix-direct-self-attn": {
            "modified_modules": [r"[r](self_attn|attention\.self|attn|SelfAttention)"], "prefix_token_num": 2,
            "reparameterize": False,
        },
    },
    "soft_prompt": {"soft-prompt": {"soft_token_num": 3}},
    "ia3": {
        "ia3-default": {},
        "ia3-outputs-fused-all": {"modified_modules": ["attn.q", "attn.k", "ff.w1"], "feedforward_modules": [],
                                  "fused_qkv": "all"},
    },
    "vera": {
        "vera-default": {"vera_r": 8},
        "vera-ff-seeded": {"modified_modules": ["attn.o", "ff.w1", "ff.w2"], "vera_r": 4, "projection_seed": 7,
                           "d_initial": 0.5},
    },
}


def _shipped(delta_type: str) -> bool:
    """A method of the package (methods registered by a test for its own duration are not part of the contract)."""
    return DELTA_REGISTRY[delta_type].__module__.startswith("deltakit.")


def _variant(delta_type: str, kwargs: dict[str, Any]) -> Callable[[nn.Module], DeltaBase]:
    return lambda model: DELTA_REGISTRY[delta_type](model, **kwargs)


#: Generated from the registry: every variant of every shipped method.
VARIANTS: dict[str, Callable[[nn.Module], DeltaBase]] = {
    name: _variant(delta_type, kwargs)
    for delta_type, variants in SETTINGS.items()
    if delta_type in DELTA_REGISTRY and _shipped(delta_type)
    for name, kwargs in variants.items()
}
MERGEABLE = ("lora", "bitfit", "dora", "ia3", "vera")
# The prompt family changes the output from the start: a prefix adds keys every query attends to, a soft prompt adds
# input positions (decoder-only logits even gain positions). Everything else in the contract applies to them.
NOT_IDENTITY = ("prefix", "soft-prompt")


def _differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape != b.shape or not torch.allclose(a, b)


def _embeddings_tied(model: nn.Module) -> bool:
    output = model.get_output_embeddings()
    return output is not None and output.weight is model.get_input_embeddings().weight


def test_every_registered_method_is_covered() -> None:
    """A new method gets its variants here, or this fails (deltakit/registry.py is the list of methods)."""
    shipped = sorted(t for t in DELTA_REGISTRY if _shipped(t))
    assert [t for t in shipped if not SETTINGS.get(t)] == []
    assert sorted(SETTINGS) == shipped  # and nothing here names a method that no longer exists


@pytest.fixture(params=list(VARIANTS))
def variant(request: pytest.FixtureRequest) -> str:
    return request.param


def test_fresh_attach_is_identity_and_perturbation_changes_output(arch: Arch, variant: str) -> None:
    model = arch.build()
    base = arch.run(model)
    delta = VARIANTS[variant](model)
    assert delta.sites, "the default positions must match something"
    fresh = arch.run(model)
    if variant.startswith(NOT_IDENTITY):
        assert _differs(fresh, base)
    else:
        assert torch.equal(fresh, base)
    perturb(delta)
    assert _differs(arch.run(model), fresh)


def test_gradients_reach_exactly_the_trainable_set(arch: Arch, variant: str) -> None:
    model = arch.build()
    delta = VARIANTS[variant](model)
    perturb(delta)
    delta.freeze_module(exclude=["deltas"])
    arch.run(model).float().pow(2).mean().backward()
    own = {id(p) for p in delta.parameters()}
    for name, param in model.named_parameters():
        if id(param) in own:
            assert param.requires_grad and param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert not param.requires_grad and param.grad is None, name
    assert delta.num_trainable_parameters() == delta.num_delta_parameters() > 0


def test_detach_and_attach_are_exact_and_repeatable(arch: Arch, variant: str) -> None:
    model = arch.build()
    base = arch.run(model)
    keys, hooks, state = list(model.state_dict()), hook_counts(model), snapshot(model)
    delta = VARIANTS[variant](model)
    perturb(delta)
    attached = arch.run(model)
    for _ in range(3):
        delta.detach()
        assert torch.equal(arch.run(model), base)
        assert list(model.state_dict()) == keys
        assert hook_counts(model) == hooks
        assert_state_equal(model, state)
        delta.attach()
        assert torch.equal(arch.run(model), attached)


@pytest.mark.parametrize("order", ["first-first", "second-first"])
def test_two_deltas_on_the_same_modules_detach_in_any_order(arch: Arch, order: str) -> None:
    model = arch.build()
    base = arch.run(model)
    keys, hooks = list(model.state_dict()), hook_counts(model)
    first = LoraModel(model, lora_r=4)
    perturb(first, seed=1)
    only_first = arch.run(model)
    second = LoraModel(model, lora_r=2)  # same default positions: two LoRAs on each host
    perturb(second, seed=2)
    both = arch.run(model)
    assert first.child_name != second.child_name
    a, b = (first, second) if order == "first-first" else (second, first)
    a.detach()
    a.attach()  # re-attaching puts it back in its original place: exact
    assert torch.equal(arch.run(model), both)
    a.detach()
    b.detach()
    assert torch.equal(arch.run(model), base)
    assert list(model.state_dict()) == keys and hook_counts(model) == hooks
    first.attach()
    assert torch.equal(arch.run(model), only_first)
    second.attach()
    assert torch.equal(arch.run(model), both)


def test_save_then_load_into_a_fresh_backbone(arch: Arch, variant: str, tmp_path) -> None:
    model = arch.build()
    delta = VARIANTS[variant](model)
    perturb(delta)
    attached = arch.run(model)
    delta.save_finetuned(tmp_path / "ckpt")
    stored = read_weights(tmp_path / "ckpt" / WEIGHTS_NAME)
    assert set(stored) == set(delta.delta_state_dict())
    assert sum(t.numel() for t in stored.values()) == delta.num_delta_parameters()
    fresh = arch.build()
    loaded = AutoDeltaModel.from_finetuned(tmp_path / "ckpt", backbone_model=fresh)
    assert type(loaded) is type(delta)
    assert loaded.modified_modules == delta.modified_modules
    assert torch.equal(arch.run(fresh), attached)


def test_merge_is_close_and_unmerge_restores_weights(arch: Arch, variant: str) -> None:
    model = arch.build()
    delta = VARIANTS[variant](model)
    perturb(delta, scale=0.1)
    attached = arch.run(model)
    weights = snapshot(model)
    if not variant.startswith(MERGEABLE):
        with pytest.raises(DeltaStateError, match="cannot be merged"):
            delta.merge()
        assert delta.state == "attached"
        assert_state_equal(model, weights)
        assert torch.equal(arch.run(model), attached)
        return
    hosts_without_bias = [s.name for s in delta.sites if getattr(s.host, "bias", None) is None]
    tied = variant == "lora-embed-ff" and _embeddings_tied(model)
    if (variant.startswith("bitfit") and hosts_without_bias) or tied:
        with pytest.raises(DeltaStateError, match="tied weights" if tied else "without a bias"):
            delta.merge()
        assert delta.state == "attached"
        assert_state_equal(model, weights)
        assert torch.equal(arch.run(model), attached)
        return
    delta.merge()
    assert delta.state == "merged"
    assert all(not s.host._forward_hooks for s in delta.sites)
    assert_same_function(arch.run(model), attached, model=model)
    delta.unmerge()
    assert_state_equal(model, weights)
    assert torch.equal(arch.run(model), attached)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_model_to_moves_the_delta(arch: Arch, variant: str, dtype: torch.dtype) -> None:
    model = arch.build()
    delta = VARIANTS[variant](model)
    perturb(delta)
    model.to(dtype)
    assert all(p.dtype == dtype for p in delta.parameters())
    if dtype == torch.float64:
        out = arch.run(model)
        assert out.dtype == torch.float64 and torch.isfinite(out).all()
    delta.detach()
    model.to(torch.float32)
    delta.attach()  # a model moved while the delta was detached: attach follows the host
    assert all(p.dtype == torch.float32 for p in delta.parameters())


def test_delta_created_in_host_dtype_and_bf16_round_trip(arch: Arch, variant: str, tmp_path) -> None:
    model = arch.build().to(torch.bfloat16)
    delta = VARIANTS[variant](model)
    assert all(p.dtype == torch.bfloat16 for p in delta.parameters())
    perturb(delta)
    out = arch.run(model)
    delta.save_finetuned(tmp_path)
    fresh = arch.build().to(torch.bfloat16)
    AutoDeltaModel.from_finetuned(tmp_path, backbone_model=fresh)
    assert torch.equal(arch.run(fresh), out)


def test_illegal_transitions_raise_and_change_nothing(arch: Arch, variant: str) -> None:
    model = arch.build()
    delta = VARIANTS[variant](model)
    perturb(delta, scale=0.1)
    attached = arch.run(model)
    state = snapshot(model)
    for action in ("attach", "unmerge"):
        with pytest.raises(DeltaStateError):
            getattr(delta, action)()
        assert_state_equal(model, state)
        assert torch.equal(arch.run(model), attached)
    delta.detach()
    detached = arch.run(model)
    for action in ("detach", "merge", "unmerge"):
        with pytest.raises(DeltaStateError):
            getattr(delta, action)()
        assert torch.equal(arch.run(model), detached)
    delta.attach()
    unmergeable = not variant.startswith(MERGEABLE) or (variant.startswith("bitfit") and any(getattr(s.host, "bias", None) is None for s in delta.sites)) or (
        variant == "lora-embed-ff" and _embeddings_tied(model)
    )
    if not unmergeable:
        delta.merge()
        merged_state = snapshot(model)
        for action in ("merge", "detach", "attach"):
            with pytest.raises(DeltaStateError):
                getattr(delta, action)()
            assert_state_equal(model, merged_state)
        delta.unmerge()
        assert_state_equal(model, state)
