"""The automatic routing choice on later calls of a route() block, where gather keeps its gathered factors.

A first call of a block pays gather's copy of each row's factors (``SEGMENT_COST`` rule); a later call with as many
rows (generate()'s decoding steps) reuses the kept copy, so only the factor reads remain to weigh against the
segments (``KEPT_SEGMENT_COST`` rule). The tiny models make every real cost tiny, so the tests set the constants
where a real model would put the batch: the point is which rule decides, and that both give each row its own delta.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from deltakit import DeltaGroup, LoraModel
from deltakit import routing

from tests.helpers import ARCHS, perturb
from tests.tolerances import assert_same_function
from tests.serving.test_serving import alone_logits, batch_for, routed_paths

DISTINCT = ["a", "b", "c", "d"]  # every row its own delta: as many segments as rows


def lora_group(model: nn.Module, names: str = "abcd", rank: int = 4) -> DeltaGroup:
    """Detached, perturbed LoRAs of one rank (so a slot holds exactly each delta's factors, no padding)."""
    group = DeltaGroup(model)
    for i, name in enumerate(names):
        delta = LoraModel(model, lora_r=rank, name=name)
        perturb(delta, seed=70 + i, scale=0.3)
        delta.detach()
        group.add(delta)
    return group


def calls_by_path(group: DeltaGroup, model: nn.Module, batch: dict[str, torch.Tensor], times: int) -> tuple[
        list[dict[str, int]], list[torch.Tensor]]:
    """Run ``times`` forwards in the open block: each call's routed calls by path, and its logits."""
    counts, outputs = [], []
    for _ in range(times):
        before = routed_paths(group)
        outputs.append(model(**batch).logits)
        after = routed_paths(group)
        counts.append({k: after[k] - before[k] for k in after})
    return counts, outputs


def test_kept_factors_turn_a_segmented_first_call_into_gathered_later_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every row its own delta, segments cheap against a fresh copy: the first call segments; from the second call
    on the gathered factors are kept, gather reads exactly the factors segment would (no padding, no bare row) and
    saves the per-segment cost, so ``auto`` gathers. (The old rule ignored the kept copy and segmented on every
    call: 2.1x gather's time at hidden 256, r=64, 32 distinct deltas in 32 rows.)"""
    arch = ARCHS["llama"]
    model = arch.build().eval()
    group = lora_group(model)
    batch = batch_for(arch, len(DISTINCT))
    monkeypatch.setattr(routing, "SEGMENT_COST", 1)  # a fresh gather always costs more than the segments
    with torch.no_grad(), group.route(DISTINCT):
        counts, outputs = calls_by_path(group, model, batch, 3)
        kept = [entry[3] for r in group._routers or [] for entry in r._state().gathered.values()]
    routers = len(group._routers or [])
    assert routers > 0
    assert counts == [{"gather": 0, "segment": routers}, *[{"gather": routers, "segment": 0}] * 2]
    assert kept and all(k is not None for k in kept)  # kept from the second call on (the first gather)
    for out in outputs:
        for i, ref in enumerate(alone_logits(group, model, batch, DISTINCT)):
            assert_same_function(out[i], ref, model=model)


@pytest.mark.parametrize("gather_cache_mb", [0, 1e-6])
def test_without_room_to_keep_factors_later_calls_follow_the_first_call_rule(
        monkeypatch: pytest.MonkeyPatch, gather_cache_mb: float) -> None:
    """No budget (0) or one too small for the gathered factors: every later call would copy again, so the first
    call's rule still decides (and segments here)."""
    arch = ARCHS["llama"]
    model = arch.build().eval()
    group = lora_group(model)
    batch = batch_for(arch, len(DISTINCT))
    monkeypatch.setattr(routing, "SEGMENT_COST", 1)
    with torch.no_grad(), group.route(DISTINCT, gather_cache_mb=gather_cache_mb):
        counts, _ = calls_by_path(group, model, batch, 3)
    assert all(c["gather"] == 0 and c["segment"] > 0 for c in counts)


@pytest.mark.parametrize("names, charged", [(["a", "a", "b", "b"], 1), (["b", "b", "a", "a"], 2)])
def test_later_calls_follow_the_kept_factor_rule(monkeypatch: pytest.MonkeyPatch, names: list[str],
                                                 charged: int) -> None:
    """Two deltas on two rows each: a later call segments exactly when ``charged * KEPT_SEGMENT_COST <= 4 rows *
    slot - 2 deltas' elements`` (= 2 slots, one rank), whatever the first call's rule said. Rows sorted by delta
    are charged one segment less (gather's own fixed cost); unsorted ones pay it back in the sort."""
    arch = ARCHS["llama"]
    model = arch.build().eval()
    group = lora_group(model, "ab")
    batch = batch_for(arch, len(names))
    monkeypatch.setattr(routing, "SEGMENT_COST", 10**12)  # the first call always gathers
    with torch.no_grad(), group.route(names):
        model(**batch)
    slots = {r.slot_elems for r in group._routers or []}
    expected = alone_logits(group, model, batch, names)
    for cost, path in ((2 * min(slots) // charged, "segment"), (2 * max(slots) // charged + 1, "gather")):
        monkeypatch.setattr(routing, "KEPT_SEGMENT_COST", cost)
        with torch.no_grad(), group.route(names):
            counts, outputs = calls_by_path(group, model, batch, 3)
        other = "gather" if path == "segment" else "segment"
        assert counts[0]["segment"] == 0, counts
        assert all(c[other] == 0 and c[path] > 0 for c in counts[1:]), (cost, counts)
        for i, ref in enumerate(expected):
            assert_same_function(outputs[2][i], ref, model=model)


def test_generate_segments_the_prompt_and_gathers_the_decoding_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """generate(): the prompt's forward is a first call, every decoding step a later one; the tokens are each row's
    own delta's."""
    arch = ARCHS["llama"]
    model = arch.build().eval()
    group = lora_group(model)
    batch = batch_for(arch, len(DISTINCT), length=5)
    kw: dict[str, Any] = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    monkeypatch.setattr(routing, "SEGMENT_COST", 1)
    with torch.no_grad(), group.route(DISTINCT):
        routed = model.generate(**batch, **kw)
    routers = len(group._routers or [])
    assert routed_paths(group) == {"segment": routers, "gather": 3 * routers}  # the prompt, then 3 decoding steps
    for i, name in enumerate(DISTINCT):
        group.switch(name)
        with torch.no_grad():
            alone = model.generate(**{k: v[i : i + 1] for k, v in batch.items()}, **kw)
        assert torch.equal(routed[i], alone[0])  # greedy tokens (each step's logits agree to rounding)
    group.switch(None)


def test_kept_factors_dropped_for_other_rows_give_their_budget_back() -> None:
    # A block calls the model with 2 rows and with 2 x 2 rows (each sample twice, as generate() expands for
    # num_beams) in turn: each call keeps its gathered copy and drops the other size's. The dropped copy's bytes
    # stayed charged to the block's gather_cache_mb, so the budget ran out while almost nothing was kept (and the
    # auto rule, which had counted on kept factors, then paid a fresh copy on every call).
    arch = ARCHS["llama"]
    model = arch.build().eval()
    group = lora_group(model, "ab")
    small, large = batch_for(arch, 2), batch_for(arch, 4)
    with torch.no_grad(), group.route(["a", "b"], path="gather", gather_cache_mb=1):
        for _ in range(3):
            model(**small)
            model(**large)
        budget = group._serving.local.call.budget
        held = sum(entry[3].nbytes for r in group._routers or [] for entry in r._state().gathered.values()
                   if entry[3] is not None)
        assert held > 0
        assert budget.left == 2**20 - held
