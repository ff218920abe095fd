"""torch.compile: LoRA + Adapter + BitFit compile with fullgraph=True, match eager; detach/attach recompiles by
itself, merge/unmerge follow the documented rule (torch.compiler.reset()).

One test on purpose: a cold compile costs 30-60 s on the CI machine.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from deltakit import AdapterModel, BitFitModel, LoraModel

from tests.tolerances import assert_same_function, assert_same_gradients
from tests.helpers import perturb, tiny_bert


@pytest.mark.slow
def test_compiled_model_with_three_methods_matches_eager_and_follows_detach_attach() -> None:
    torch.compiler.reset()
    model = tiny_bert().eval()  # eval: no dropout, so compiled and eager runs are comparable; autograd stays on
    deltas = [
        LoraModel(model, modified_modules=["query", "value"]),
        AdapterModel(model),
        BitFitModel(model),
    ]
    for i, delta in enumerate(deltas):
        perturb(delta, seed=i, scale=0.1)
    deltas[0].freeze_module(exclude=["deltas"])
    for delta in deltas[1:]:
        for p in delta.parameters():
            p.requires_grad_(True)
    params = [p for d in deltas for p in d.parameters()]
    ids = torch.randint(2, 100, (2, 7), generator=torch.Generator().manual_seed(0))

    def step(fn) -> tuple[torch.Tensor, list[torch.Tensor]]:
        for p in params:
            p.grad = None
        out = fn(input_ids=ids).logits
        out.pow(2).sum().backward()
        return out.detach(), [p.grad.clone() for p in params]

    eager_out, eager_grads = step(model)
    compiled = torch.compile(model, fullgraph=True)  # fullgraph: any graph break raises
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out, grads = step(compiled)
    assert_same_function(out, eager_out, model=model, tokens=ids.numel())
    assert_same_gradients(grads, eager_grads, model=model, tokens=ids.numel())

    # The documented rule: detach/attach changes hooks and submodules, Dynamo's guards notice, the compiled model
    # recompiles and computes what eager computes.
    deltas[0].detach()
    with torch.no_grad():
        eager_detached = model(input_ids=ids).logits
        compiled_detached = compiled(input_ids=ids).logits
    assert_same_function(compiled_detached, eager_detached, model=model, tokens=ids.numel())
    assert not torch.allclose(compiled_detached, eager_out, atol=1e-4)  # the LoRA really is gone
    deltas[0].attach()
    with torch.no_grad():
        assert_same_function(compiled(input_ids=ids).logits, eager_out, model=model, tokens=ids.numel())

        # merge()/unmerge() only remove/add hooks, which Dynamo does not guard by default: the documented rule is
        # torch.compiler.reset() after them, and the compiled model then again computes what eager computes.
        deltas[0].merge()
        torch.compiler.reset()
        assert_same_function(compiled(input_ids=ids).logits, model(input_ids=ids).logits, model=model, tokens=ids.numel())
        deltas[0].unmerge()
        torch.compiler.reset()
        assert_same_function(compiled(input_ids=ids).logits, eager_out, model=model, tokens=ids.numel())
    torch.compiler.reset()
