"""The segmented routing path (rows grouped by delta, each delta's own factors) and the automatic choice."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from deltakit import DeltaGroup, LoraModel
from deltakit import routing

from tests.helpers import ARCHS, perturb
from tests.tolerances import assert_same_function
from tests.serving.test_serving import alone_logits, batch_for, make_group, routed_paths

NAMES = ["b", None, "a", "c", "a", "b", "d", "c"]  # unsorted, repeated, with a bare row


def lora_group(model: nn.Module, ranks: tuple[int, ...] = (2, 8, 16, 32)) -> DeltaGroup:
    group = DeltaGroup(model)
    for i, r in enumerate(ranks):
        delta = LoraModel(model, lora_r=r, name="abcd"[i])
        perturb(delta, seed=50 + i, scale=0.3)
        delta.detach()
        group.add(delta)
    return group


@pytest.mark.parametrize("arch_name", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("inference", [False, True])
def test_segment_path_equals_each_row_alone_with_mixed_ranks(arch_name: str, inference: bool) -> None:
    arch = ARCHS[arch_name]
    model = arch.build().eval()
    group = lora_group(model)
    batch = batch_for(arch, len(NAMES))
    context = torch.inference_mode if inference else torch.no_grad
    with context(), group.route(NAMES, path="segment"):
        segmented = model(**batch).logits
    assert routed_paths(group)["segment"] > 0 and routed_paths(group)["gather"] == 0
    assert all(r._stack is None for r in group._routers or [])  # no stack, so no padding to rank 32
    with torch.no_grad(), group.route(NAMES, path="gather"):
        gathered = model(**batch).logits
    for i, ref in enumerate(alone_logits(group, model, batch, NAMES)):
        assert_same_function(segmented[i], ref, model=model)
        assert_same_function(gathered[i], ref, model=model)


@pytest.mark.parametrize("method", ["bitfit", "adapter", "low_rank_adapter", "compacter", "lora_all"])
def test_segment_path_for_other_methods(method: str) -> None:
    arch = ARCHS["llama"]
    model = arch.build().eval()
    group = make_group(model, [("a", method), ("b", method), ("c", "lora")])
    names = ["b", "a", None, "c", "b"]
    batch = batch_for(arch, len(names))
    with torch.no_grad(), group.route(names, path="segment"):
        out = model(**batch).logits
    for i, ref in enumerate(alone_logits(group, model, batch, names)):
        assert_same_function(out[i], ref, model=model)


def test_parallel_adapter_and_autograd_fall_back_to_gather() -> None:
    arch = ARCHS["llama"]
    model = arch.build().eval()
    group = make_group(model, [("a", "parallel_adapter"), ("b", "lora")])
    names = ["a", "b"]
    batch = batch_for(arch, 2)
    with torch.no_grad(), group.route(names, path="segment"):
        out = model(**batch).logits
    kinds = {type(r).__name__: r.calls for r in group._routers or []}
    assert kinds["ParallelAdapterRouter"]["segment"] == 0 and kinds["LoraRouter"]["segment"] > 0
    with group.route(names, path="segment"):  # gradients on: the segmented path writes in place, so gather
        graded = model(**batch).logits
    assert kinds["LoraRouter"]["gather"] > 0
    for i, ref in enumerate(alone_logits(group, model, batch, names)):
        assert_same_function(out[i], ref, model=model)
        assert_same_function(graded[i].detach(), ref, model=model)


@pytest.mark.parametrize("path", ["segment", "auto"])
def test_segment_path_in_generate_with_beams(path: str) -> None:
    arch = ARCHS["llama"]
    model = arch.build().eval()
    group = lora_group(model)
    names = ["c", "a", None]
    batch = batch_for(arch, 3, length=5)
    kw: dict[str, Any] = dict(max_new_tokens=4, do_sample=False, num_beams=2, pad_token_id=0)
    with torch.no_grad(), group.route(names, path=path):
        routed = model.generate(**batch, **kw)
    for i, name in enumerate(names):
        group.switch(name)
        with torch.no_grad():
            alone = model.generate(**{k: v[i : i + 1] for k, v in batch.items()}, **kw)
        assert torch.equal(routed[i], alone[0])
    group.switch(None)


def test_auto_follows_the_cost_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    arch = ARCHS["llama"]
    model = arch.build().eval()
    group = lora_group(model, ranks=(4, 4))
    batch = batch_for(arch, 4)
    with torch.no_grad(), group.route(["a", "a", "a", "a"]):
        model(**batch)
    slot_elems = {r.slot_elems for r in group._routers or []}
    # One segment of 4 rows: segment when 1 * SEGMENT_COST <= 4 * slot elements.
    monkeypatch.setattr(routing, "SEGMENT_COST", 4 * min(slot_elems))
    with torch.no_grad(), group.route(["a", "a", "a", "a"]):
        model(**batch)
    monkeypatch.setattr(routing, "SEGMENT_COST", 4 * max(slot_elems) + 1)
    before = routed_paths(group)
    with torch.no_grad(), group.route(["a", "a", "a", "a"]):
        model(**batch)
    after = routed_paths(group)
    assert after["gather"] > before["gather"] and after["segment"] == before["segment"]
    # Two segments of 2 rows each, same rows: twice the segment cost for the same gather cost.
    monkeypatch.setattr(routing, "SEGMENT_COST", 2 * min(slot_elems))
    before = routed_paths(group)
    with torch.no_grad(), group.route(["a", "b", "b", "a"]):
        model(**batch)
    after = routed_paths(group)
    assert after["segment"] > before["segment"]
    monkeypatch.setattr(routing, "SEGMENT_COST", 2 * max(slot_elems) + 1)
    before = routed_paths(group)
    with torch.no_grad(), group.route(["a", "b", "b", "a"]):
        model(**batch)
    assert routed_paths(group)["segment"] == before["segment"]
