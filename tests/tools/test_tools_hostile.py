"""Hostile and edge inputs to the LoRA tools (deltakit.combine, deltakit.optim): each gives a correct result or a
clear deltakit error that leaves the sources and the model unchanged."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from deltakit import BitFitModel, CompositeDelta, DeltaError, LoraModel, combine_loras, loraplus_parameter_groups
from tests.helpers import assert_state_equal, hook_counts, perturb, snapshot, tiny_bert
from tests.tolerances import assert_same_function

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

ROLES = ["attn.q", "attn.v", "embed"]


def ids() -> torch.Tensor:
    return torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(5))


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids()).logits


def two(dtype: torch.dtype = torch.float32) -> tuple[nn.Module, list[LoraModel]]:
    """A tiny BERT with two random LoRA deltas whose factors are in ``dtype`` (the model stays float32)."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    model = tiny_bert()
    deltas = []
    for i in range(2):
        delta = LoraModel(model, modified_modules=ROLES, lora_r=4, lora_alpha=8, name=f"s{i}")
        perturb(delta, seed=10 + i, scale=0.3)
        for site in delta.sites:
            site.module.to(dtype)
        deltas.append(delta)
    return model, deltas


def refused_and_unchanged(model: nn.Module, deltas: list, call, match: str) -> None:
    """``call()`` raises a DeltaError matching ``match``; the model, its outputs and the deltas are as before."""
    state, hooks, before = snapshot(model), hook_counts(model), logits(model)
    factors = [[p.detach().clone() for p in d.parameters()] for d in deltas]
    with pytest.raises(DeltaError, match=match):
        call()
    assert_state_equal(model, state)
    assert hook_counts(model) == hooks
    assert torch.equal(logits(model), before)
    assert all(torch.equal(p, q) for d, saved in zip(deltas, factors) for p, q in zip(d.parameters(), saved))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("options", [{"method": "svd", "rank": 3}, {"method": "ties_svd", "density": 0.5},
                                     {"method": "dare_linear_svd", "density": 0.5}, {"method": "svd", "svd_clamp": 0.9}])
def test_svd_methods_take_half_precision_deltas(dtype: torch.dtype, options: dict) -> None:
    # torch has no float16 / bfloat16 SVD kernel: this raised NotImplementedError ("linalg_svd_cpu"). What the
    # result computes is checked against the exact sum below (test_half_precision_svd_..._truncation).
    model, deltas = two(dtype)
    combined = combine_loras(deltas, [0.5, 1.0], **options)
    assert combined.state == "detached"
    assert all(torch.isfinite(p).all() and p.abs().max() > 0 for p in combined.parameters())
    assert all(s.module.lora_A.shape[0] == options.get("rank", 4) for s in combined.sites)


def test_a_huge_int_weight_is_a_clear_error() -> None:
    model, deltas = two()
    # math.isfinite(10**400) raised OverflowError
    refused_and_unchanged(model, deltas, lambda: combine_loras(deltas, [10**400, 1.0]), r"weights\[0\] must be a finite")


@pytest.mark.parametrize(
    ("weights", "options"),
    [([1e300, 1.0], {"method": "cat"}), ([1e300, 1.0], {"method": "linear"}), ([1e300, 1.0], {"method": "svd"}),
     ([1.0, 1.0], {"method": "dare_linear", "density": 1e-300}),
     ([1.0, 1.0], {"method": "dare_linear_svd", "density": 1e-300})],
)
def test_weights_overflowing_the_dtype_are_refused(weights: list, options: dict) -> None:
    # was: a combined delta full of inf/NaN (cat, linear, DARE) or a raw torch LinAlgError from LAPACK (SVD)
    model, deltas = two()
    refused_and_unchanged(model, deltas, lambda: combine_loras(deltas, weights, **options), "overflow their dtype")


@pytest.mark.parametrize("method", ["cat", "svd"])
def test_a_source_with_nan_factors_is_refused(method: str) -> None:
    model, deltas = two()
    for delta in deltas:
        delta.detach()  # detached sources (any state is read): the model's outputs stay finite to compare
    with torch.no_grad():
        deltas[1].sites[1].module.lora_B[0, 0] = float("inf")  # inf, not NaN: torch.equal then shows "unchanged"
    refused_and_unchanged(model, deltas, lambda: combine_loras(deltas, [1.0, 1.0], method=method),
                          r"deltas\[1\].*NaN or inf values in lora_B at 'bert.encoder.layer.0.attention.self.query'")


def test_a_delta_spent_by_merge_and_unload_is_refused() -> None:
    # was accepted: the combination then held its update, already folded into the weights, a second time
    model, deltas = two()
    deltas[1].detach()
    deltas[0].merge_and_unload()
    refused_and_unchanged(model, [deltas[1]], lambda: combine_loras(deltas, [1.0, 1.0]),
                          r"deltas\[0\].*merge_and_unload\(\)ed.*apply it twice")


def test_lora_on_a_convolution_is_named_in_the_error() -> None:
    # was: "not a sum of low-rank terms ... (a DoRA magnitude, for example)", wrong for a conv LoRA
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten())
    deltas = [LoraModel(model, modified_modules=["0"], lora_r=2, name=f"c{i}") for i in range(2)]
    with pytest.raises(DeltaError, match="does not combine LoRA on convolutions yet.*LoraConvSite at '0'"):
        combine_loras(deltas, [1.0, 1.0])


def test_a_detached_composite_gets_its_lora_groups() -> None:
    # was: "LoRA+ found no trainable LoRA factor in CompositeDelta" once the composite was detached
    model = tiny_bert()
    lora = LoraModel(model, modified_modules=["attn.q"], lora_r=4, name="a")
    composite = CompositeDelta([lora, BitFitModel(model)])
    composite.freeze_module(exclude=["deltas"])
    attached = loraplus_parameter_groups(composite, lr=1e-3)
    composite.detach()
    detached = loraplus_parameter_groups(composite, lr=1e-3)
    describe = [[(g["name"], g["lr"], [id(p) for p in g["params"]]) for g in groups] for groups in (attached, detached)]
    assert describe[0] == describe[1]
    by_name = {g["name"]: g["params"] for g in detached}
    assert [id(p) for p in by_name["loraplus_B"]] == [id(s.module.lora_B) for s in lora.sites]


def test_half_precision_svd_result_attaches_and_computes_the_truncation() -> None:
    model, deltas = two(torch.bfloat16)
    combined = combine_loras(deltas, [1.0, 1.0], method="svd", rank=8)  # rank 8 = the sum: nothing truncated
    exact = combine_loras(deltas, [1.0, 1.0], method="cat")
    for d in deltas:
        d.detach()
    combined.attach()
    got = logits(model)
    combined.detach()
    exact.attach()
    assert_same_function(got, logits(model), model=model)
