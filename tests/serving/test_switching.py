"""Named deltas on one backbone (DeltaGroup), switching, and merging one delta while others are attached."""

from __future__ import annotations

import pathlib

import pytest
import torch
from torch import nn

from deltakit import (
    AdapterModel,
    AutoDeltaModel,
    BitFitModel,
    CheckpointError,
    DeltaError,
    DeltaGroup,
    DeltaStateError,
    LoraModel,
)

from deltakit.hooks import hook_keys

from tests.tolerances import assert_same_function
from tests.helpers import ARCHS, assert_state_equal, hook_counts, perturb, snapshot

TASKS = ("sentiment", "topic", "question")


def saved_deltas(tmp_path: pathlib.Path) -> tuple[dict[str, pathlib.Path], dict[str, torch.Tensor], torch.Tensor]:
    """Three trained-looking deltas of different methods saved from one backbone; their attached logits."""
    arch = ARCHS["bert"]
    model = arch.build()
    with torch.no_grad():
        bare = arch.run(model)
    makers = {
        "sentiment": lambda: LoraModel(model, lora_r=4),
        "topic": lambda: AdapterModel(model, bottleneck_dim=8),
        "question": lambda: BitFitModel(model),
    }
    paths, logits = {}, {}
    for i, task in enumerate(TASKS):
        delta = makers[task]()
        perturb(delta, seed=10 + i, scale=0.3)
        with torch.no_grad():
            logits[task] = arch.run(model)
        paths[task] = tmp_path / task
        delta.save_finetuned(paths[task])
        delta.detach()
    return paths, logits, bare


def test_load_named_deltas_and_switch_exactly(tmp_path: pathlib.Path) -> None:
    paths, logits, bare = saved_deltas(tmp_path)
    arch = ARCHS["bert"]
    model = arch.build()  # a fresh copy of the same backbone
    bare_state, bare_hooks = snapshot(model), hook_counts(model)
    group = DeltaGroup(model)
    for task in TASKS:
        delta = group.load(task, paths[task])
        assert delta.name == task == delta.child_name and delta.state == "detached"
    assert group.names == list(TASKS) and len(group) == 3 and "topic" in group and "nope" not in group
    assert list(group) == list(TASKS) and group.active == []
    assert_state_equal(model, bare_state)  # loading left the model as it was
    assert hook_counts(model) == bare_hooks
    for _ in range(2):
        for task in ("topic", "sentiment", "question", "sentiment"):
            assert group.switch(task) is group[task]
            assert group.active == [task]
            with torch.no_grad():
                assert torch.equal(arch.run(model), logits[task])
    # the delta lives on the model under its name while attached
    assert isinstance(model.bert.encoder.layer[0].attention.self.query.sentiment, nn.Module)
    assert group.switch(None) is None and group.active == []
    assert_state_equal(model, bare_state)
    assert hook_counts(model) == bare_hooks
    with torch.no_grad():
        assert torch.equal(arch.run(model), bare)
    assert "sentiment" in repr(group)


def test_switch_moves_modules_without_allocating_or_copying(tmp_path: pathlib.Path) -> None:
    paths, _, _ = saved_deltas(tmp_path)
    model = ARCHS["bert"].build()
    group = DeltaGroup(model)
    for task in TASKS:
        group.load(task, paths[task])
    before = {t: [(id(p), p.data_ptr(), p._version) for p in group[t].parameters()] for t in TASKS}
    modules = {t: [id(s.module) for s in group[t].sites] for t in TASKS}
    for task in ("sentiment", "topic", "question", None, "topic"):
        group.switch(task)
    for task in TASKS:
        assert [(id(p), p.data_ptr(), p._version) for p in group[task].parameters()] == before[task]
        assert [id(s.module) for s in group[task].sites] == modules[task]


def test_switch_leaves_deltas_outside_the_group_alone() -> None:
    arch = ARCHS["llama"]
    model = arch.build()
    shared = LoraModel(model, name="shared", modified_modules=["attn.o"])
    perturb(shared, seed=1)
    group = DeltaGroup(model)
    for i in range(2):
        delta = LoraModel(model, name=f"t{i}")
        perturb(delta, seed=2 + i)
        group.add(delta.detach())
    group.switch("t0")
    group.switch("t1")
    group.switch(None)
    assert shared.state == "attached" and group.active == []


def test_load_refuses_checkpoints_with_backbone_tensors(tmp_path: pathlib.Path) -> None:
    arch = ARCHS["bert"]
    model = arch.build()
    delta = LoraModel(model)
    delta.freeze_module(exclude=["deltas", "classifier"])
    delta.save_finetuned(tmp_path / "with_head")
    delta.detach()
    state, hooks = snapshot(model), hook_counts(model)
    group = DeltaGroup(model)
    with pytest.raises(DeltaError, match="backbone tensors.*classifier"):
        group.load("task", tmp_path / "with_head")
    assert len(group) == 0
    assert_state_equal(model, state)
    assert hook_counts(model) == hooks
    with pytest.raises(CheckpointError):
        group.load("task", tmp_path / "missing")
    assert len(group) == 0


def test_group_membership_errors() -> None:
    model = ARCHS["bert"].build()
    other = ARCHS["bert"].build()
    group = DeltaGroup(model)
    a = group.add(LoraModel(model, name="a"))
    assert group.active == ["a"]
    with pytest.raises(DeltaError, match="another model"):
        group.add(LoraModel(other, name="b"))
    with pytest.raises(DeltaError, match="named 'c', not 'x'"):
        group.add(LoraModel(model, name="c").detach(), name="x")
    with pytest.raises(DeltaError, match="already in the group"):
        group.add(a)
    with pytest.raises(DeltaError, match="already has a delta named 'a'"):
        group.load("a", "/nonexistent")
    with pytest.raises(DeltaError, match="identifier"):
        group.load("not a name", "/nonexistent")
    with pytest.raises(DeltaError, match="needs a delta object"):
        group.add(model)  # type: ignore[arg-type]
    with pytest.raises(DeltaError, match="has no delta named 'zz'"):
        group.switch("zz")
    with pytest.raises(DeltaError, match="backbone nn.Module"):
        DeltaGroup("model")  # type: ignore[arg-type]
    assert group.names == ["a"]
    assert group.remove("a") is a and a.state == "detached" and len(group) == 0


def test_switch_and_remove_refuse_merged_deltas() -> None:
    arch = ARCHS["bert"]
    model = arch.build()
    group = DeltaGroup(model)
    a = group.add(LoraModel(model, name="a"))
    b = group.add(LoraModel(model, name="b").detach())
    perturb(a)
    a.merge()
    weights = snapshot(model)
    with pytest.raises(DeltaStateError, match="merged"):
        group.switch("b")
    with pytest.raises(DeltaStateError, match="merged"):
        group.remove("a")
    assert_state_equal(model, weights)
    assert a.state == "merged" and b.state == "detached"
    a.unmerge()
    group.switch("b")
    assert group.active == ["b"]


def test_auto_from_finetuned_name(tmp_path: pathlib.Path) -> None:
    paths, logits, _ = saved_deltas(tmp_path)
    arch = ARCHS["bert"]
    model = arch.build()
    delta = AutoDeltaModel.from_finetuned(paths["topic"], backbone_model=model, name="topic")
    assert delta.name == "topic" and delta.state == "attached"
    with torch.no_grad():
        assert torch.equal(arch.run(model), logits["topic"])
    group = DeltaGroup(model)
    group.add(delta, name="topic")
    assert group.active == ["topic"]


# ------------------------------------------------------------------ merging with other deltas attached


def lora_pair(arch_name: str = "bert") -> tuple[nn.Module, LoraModel, LoraModel]:
    model = ARCHS[arch_name].build()
    first = LoraModel(model, name="first", lora_r=4)
    second = LoraModel(model, name="second", lora_r=2, modified_modules=["attn.q", "attn.k"])  # shares attn.q
    perturb(first, seed=1)
    perturb(second, seed=2)
    return model, first, second


@pytest.mark.parametrize("arch_name", ["bert", "llama"])
def test_merge_first_delta_while_another_is_attached(arch_name: str) -> None:
    arch = ARCHS[arch_name]
    model, first, second = lora_pair(arch_name)
    with torch.no_grad():
        both = arch.run(model)
    weights = snapshot(model)
    first.merge()
    assert (first.state, second.state) == ("merged", "attached")
    query = first.sites[0].host
    assert [k[0] for k in hook_keys(query)] == [second._order_key]  # only the unmerged delta is hooked there
    with torch.no_grad():
        assert_same_function(arch.run(model), both, model=model)
    # the second delta can now be merged too (nothing unmerged comes before it): no hooks left at all
    second.merge()
    assert all(not s.host._forward_hooks and not s.host._forward_pre_hooks for s in first.sites + second.sites)
    with torch.no_grad():
        assert_same_function(arch.run(model), both, model=model)
    # unmerge in reverse order restores the weights bit-for-bit and the attached outputs exactly
    with pytest.raises(DeltaStateError, match="modified after the merge"):
        first.unmerge()
    second.unmerge()
    first.unmerge()
    with torch.no_grad():
        assert torch.equal(arch.run(model), both)
    second.detach()
    first.detach()
    assert_state_equal(model, snapshot(ARCHS[arch_name].build()))
    del weights


def test_merge_refused_behind_an_earlier_delta_changes_nothing() -> None:
    arch = ARCHS["bert"]
    model, first, second = lora_pair()
    with torch.no_grad():
        both = arch.run(model)
    weights, hooks = snapshot(model), hook_counts(model)
    with pytest.raises(DeltaStateError, match="another delta is applied before it"):
        second.merge()
    assert second.state == "attached"
    assert_state_equal(model, weights)
    assert hook_counts(model) == hooks
    with torch.no_grad():
        assert torch.equal(arch.run(model), both)
    # detaching the earlier delta makes the merge legal
    first.detach()
    second.merge()
    assert second.state == "merged"
    # re-attaching the earlier delta on top of the merged one, then merging it too, is well-defined (LoRA is linear)
    first.attach()
    with torch.no_grad():
        assert_same_function(arch.run(model), both, model=model)
    first.merge()
    with torch.no_grad():
        assert_same_function(arch.run(model), both, model=model)
    with pytest.raises(DeltaStateError, match="modified after the merge"):
        second.unmerge()  # first was merged later into the same weights: unmerge in reverse order
    first.unmerge()
    second.unmerge()
    state = model.state_dict()  # the same tensors (child order differs: first was re-attached after second)
    assert sorted(state) == sorted(weights) and all(torch.equal(state[k], v) for k, v in weights.items())
    with torch.no_grad():
        assert_same_function(arch.run(model), both, model=model)


def test_merged_lora_and_bitfit_have_no_hooks_and_match_attached() -> None:
    arch = ARCHS["bert"]
    model = arch.build()
    bare_hooks = hook_counts(model)
    lora = LoraModel(model, modified_modules=["attn.q", "attn.v", "ff.w1"])
    bitfit = BitFitModel(model, modified_modules=["attn.q", "ff.w2"])  # shares attn.q with the LoRA
    perturb(lora, seed=5)
    perturb(bitfit, seed=6)
    with torch.no_grad():
        attached = arch.run(model)
    weights = snapshot(model)
    lora.merge()
    bitfit.merge()
    counts = hook_counts(model)  # the merged deltas' modules stay registered (hook-free) until detach()
    assert {n: c for n, c in counts.items() if n in bare_hooks} == bare_hooks
    assert all(c == (0, 0) for n, c in counts.items() if n not in bare_hooks)
    with torch.no_grad():
        assert_same_function(arch.run(model), attached, model=model)
    bitfit.unmerge()
    lora.unmerge()
    with torch.no_grad():
        assert torch.equal(arch.run(model), attached)
    assert_state_equal(model, weights)
