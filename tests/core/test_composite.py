"""CompositeDelta: several deltas of different types attached, detached, saved, loaded and switched as one."""

from __future__ import annotations

import json
import os

import pytest
import torch

from deltakit import (
    AdapterModel,
    AutoDeltaModel,
    BitFitModel,
    CheckpointError,
    CompositeDelta,
    DeltaError,
    DeltaGroup,
    DeltaStateError,
    LoraModel,
)
from deltakit.composite import COMPOSITE_MANIFEST, load_composite
from tests.helpers import assert_state_equal, hook_counts, perturb, snapshot, tiny_bert

X = torch.randint(0, 100, (3, 6), generator=torch.Generator().manual_seed(0))


def logits(model):
    return model.eval()(input_ids=X).logits


def make(model, prefix="c", seed=0):
    members = [
        LoraModel(model, modified_modules=["query", "value"], lora_r=2, name=f"{prefix}_lora"),
        BitFitModel(model, modified_modules=["attn.norm", "query"], name=f"{prefix}_bitfit"),
        AdapterModel(model, modified_modules=["attn.o"], bottleneck_dim=4, name=f"{prefix}_adapter"),
    ]
    for k, member in enumerate(members):
        perturb(member, seed=seed + k, scale=0.2)
    return CompositeDelta(members, name=prefix)


def test_attach_and_detach_as_a_unit_exactly() -> None:
    model = tiny_bert()
    state, hooks, base = snapshot(model), hook_counts(model), logits(model)
    composite = make(model)
    attached = logits(model)
    assert not torch.equal(attached, base)
    assert composite.num_delta_parameters() == sum(m.num_delta_parameters() for m in composite.members)
    composite.detach()
    assert all(m.state == "detached" for m in composite.members)
    assert_state_equal(model, state)
    assert hook_counts(model) == hooks and torch.equal(logits(model), base)
    composite.attach()
    assert torch.equal(logits(model), attached)


def test_merge_and_unmerge_every_member() -> None:
    model = tiny_bert()
    composite = CompositeDelta([LoraModel(model, modified_modules=["query"], lora_r=2),
                                BitFitModel(model, modified_modules=["value"])])  # fmt: skip
    for m in composite.members:
        perturb(m, scale=0.2)
    attached, state = logits(model), snapshot(model)
    composite.merge()
    assert composite.state == "merged" and all(m.state == "merged" for m in composite.members)
    from tests.tolerances import assert_same_function

    assert_same_function(logits(model), attached, model=model, tokens=X.numel())
    composite.unmerge()
    assert_state_equal(model, state)


def test_a_refused_attach_leaves_every_member_detached() -> None:
    model = tiny_bert()
    composite = make(model).detach()
    blocker = BitFitModel(model, modified_modules=["attn.norm"], name="c_bitfit")  # takes the second member's name
    state = snapshot(model)
    with pytest.raises(DeltaStateError, match="c_bitfit"):
        composite.attach()
    assert composite.state == "detached" and all(m.state == "detached" for m in composite.members)
    assert_state_equal(model, state)
    blocker.detach()
    composite.attach()


def test_save_and_load_in_one_call_bit_for_bit(tmp_path) -> None:
    model = tiny_bert()
    composite = make(model)
    composite.freeze_module(exclude=["deltas", "classifier"])
    with torch.no_grad():
        model.classifier.weight.add_(0.5)  # a trained head, saved with the unit
    expected = logits(model)
    composite.save_finetuned(tmp_path / "ckpt")
    manifest = json.loads((tmp_path / "ckpt" / COMPOSITE_MANIFEST).read_text())
    assert [m["delta_type"] for m in manifest["members"]] == ["lora", "bitfit", "adapter"]

    fresh = tiny_bert()
    state, base = snapshot(fresh), logits(fresh)
    loaded = AutoDeltaModel.from_finetuned(tmp_path / "ckpt", fresh)
    assert isinstance(loaded, CompositeDelta) and loaded.name == "c"
    assert [m.name for m in loaded.members] == ["c_c_lora", "c_c_bitfit", "c_c_adapter"]
    assert torch.equal(logits(fresh), expected)
    loaded.detach()
    assert_state_equal(fresh, state)  # the head too: it came and went with the unit
    assert torch.equal(logits(fresh), base)


def test_saving_again_replaces_the_members(tmp_path) -> None:
    model = tiny_bert()
    composite = make(model)
    path = tmp_path / "ckpt"
    composite.save_finetuned(path)
    first = sorted(os.listdir(path))
    perturb(composite.members[0], seed=9)
    composite.save_finetuned(path)
    entries = sorted(os.listdir(path))
    assert len([e for e in entries if e.startswith("members-")]) == 1 and entries != first
    fresh = tiny_bert()
    AutoDeltaModel.from_finetuned(path, fresh)
    assert torch.equal(logits(fresh), logits(model))
    with pytest.raises(CheckpointError, match="overwrite"):
        composite.save_finetuned(path, overwrite=False)


def test_a_bad_member_leaves_the_backbone_unchanged(tmp_path) -> None:
    model = tiny_bert()
    make(model).save_finetuned(tmp_path / "ckpt")
    manifest = json.loads((tmp_path / "ckpt" / COMPOSITE_MANIFEST).read_text())
    weights = tmp_path / "ckpt" / manifest["members"][2]["directory"] / "delta_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    fresh = tiny_bert()
    state, hooks = snapshot(fresh), hook_counts(fresh)
    with pytest.raises(CheckpointError):
        AutoDeltaModel.from_finetuned(tmp_path / "ckpt", fresh)
    assert_state_equal(fresh, state)
    assert hook_counts(fresh) == hooks


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m["members"][0].update(directory="../elsewhere"),
        lambda m: m["members"][0].update(directory="/abs/path"),
        lambda m: m.update(format="other"),
        lambda m: m.update(members=[]),
        lambda m: m["members"][0].update(name="not an identifier"),
        lambda m: m["members"][0].update(delta_type="bitfit"),
    ],
)
def test_a_bad_manifest_is_refused(tmp_path, edit) -> None:
    model = tiny_bert()
    make(model).save_finetuned(tmp_path / "ckpt")
    file = tmp_path / "ckpt" / COMPOSITE_MANIFEST
    manifest = json.loads(file.read_text())
    edit(manifest)
    file.write_text(json.dumps(manifest))
    fresh = tiny_bert()
    state, hooks = snapshot(fresh), hook_counts(fresh)
    with pytest.raises(CheckpointError):
        load_composite(tmp_path / "ckpt", fresh)
    assert_state_equal(fresh, state)
    assert hook_counts(fresh) == hooks


def test_delta_group_switches_between_composites(tmp_path) -> None:
    model = tiny_bert()
    base = logits(model)
    a = make(model, "a", seed=0)
    out_a = logits(model)
    a.detach()
    b = make(model, "b", seed=10)
    out_b = logits(model)
    b.detach()
    group = DeltaGroup(model)
    group.add(a)
    group.add(b)
    for name, expected in (("a", out_a), ("b", out_b), (None, base), ("a", out_a)):
        group.switch(name)
        assert torch.equal(logits(model), expected), name
    assert group.active == ["a"]
    with pytest.raises(DeltaError, match="switch"), group.route(["a", "b", None]):  # not routable: switch() only
        pass


def test_composites_loaded_twice_do_not_clash(tmp_path) -> None:
    model = tiny_bert()
    make(model).save_finetuned(tmp_path / "ckpt")
    expected = logits(model)
    fresh = tiny_bert()
    group = DeltaGroup(fresh)
    for name in ("x", "y"):
        group.add(AutoDeltaModel.from_finetuned(tmp_path / "ckpt", fresh, name=name).detach())
    group.switch("x")
    group.switch("y")  # attaches y while x is still attached: the member names must differ
    assert torch.equal(logits(fresh), expected)


def test_bad_members_are_refused() -> None:
    model, other = tiny_bert(), tiny_bert()
    lora = LoraModel(model, modified_modules=["query"])
    with pytest.raises(DeltaError, match="non-empty"):
        CompositeDelta([])
    with pytest.raises(DeltaError, match="twice"):
        CompositeDelta([lora, lora])
    with pytest.raises(DeltaError, match="same backbone"):
        CompositeDelta([lora, LoraModel(other, modified_modules=["query"])])
    with pytest.raises(DeltaStateError, match="all be attached or all detached"):
        CompositeDelta([lora, BitFitModel(model, modified_modules=["value"]).detach()])
    with pytest.raises(DeltaError, match="identifier"):
        CompositeDelta([lora], name="a b")


def test_saving_over_a_single_delta_checkpoint_is_refused(tmp_path) -> None:
    model = tiny_bert()
    LoraModel(model, modified_modules=["query"]).save_finetuned(tmp_path / "single")
    composite = CompositeDelta([BitFitModel(model, modified_modules=["value"])])
    with pytest.raises(CheckpointError, match="single-delta"):
        composite.save_finetuned(tmp_path / "single")
