"""The (IA)^3 benchmark's folded diagnostic (benchmarks/ia3_folded.py) computes what the hooked delta computes.

Its timing is only meaningful if it is the same function with the same gradients: a wrong backward formula would
make it look cheaper than anything real could be.
"""

from __future__ import annotations

import copy

import pytest
import torch

from benchmarks import ia3_folded
from deltakit import IA3Model
from tests.helpers import perturb, tiny_bert
from tests.tolerances import assert_same_function, assert_same_gradients


def _pair():
    template = tiny_bert()
    pristine = copy.deepcopy(template)
    delta = IA3Model(template)
    perturb(delta, scale=0.3)
    delta.freeze_module(exclude=["deltas"])
    vectors = ia3_folded.fold_into_copy(pristine, delta)
    return template, delta, pristine, vectors


def test_folded_copy_matches_the_hooked_delta_in_loss_and_vector_gradients() -> None:
    model, delta, folded, vectors = _pair()
    ids = torch.randint(5, 90, (3, 9), generator=torch.Generator().manual_seed(1))
    model.eval(), folded.eval()
    out, out_folded = model(input_ids=ids).logits, folded(input_ids=ids).logits
    assert_same_function(out_folded, out, model=model, tokens=ids.numel())
    out.square().mean().backward()
    out_folded.square().mean().backward()
    expected = [site.module.scale.grad for site in delta.sites]
    assert all(g is not None for g in expected) and all(v.grad is not None for v in vectors)
    assert_same_gradients([v.grad for v in vectors], expected, model=model, tokens=ids.numel())


def test_folded_copy_refuses_hosts_it_cannot_fold() -> None:
    from tests.helpers import tiny_gpt2

    backbone = tiny_gpt2()
    delta = IA3Model(copy.deepcopy(backbone))  # GPT-2: fused c_attn (key/value positions) and Conv1D hosts
    with pytest.raises(TypeError, match="plain nn.Linear"):
        ia3_folded.fold_into_copy(backbone, delta)
