"""Task heads a delta carries (``modules_to_save``, deltakit.heads): used while attached, gone bit for bit when
detached, trained through ``"deltas"``, switched with the delta."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from deltakit import DeltaGroup, LoraModel
from deltakit.errors import DeltaError, ModuleMatchError
from tests.helpers import assert_state_equal, hook_counts, snapshot, tiny_bert, tiny_gpt2

IDS = torch.arange(3, 10).view(1, -1)


def _with_head(model: nn.Module, **kwargs) -> LoraModel:
    delta = LoraModel(model, modified_modules=["query"], modules_to_save=["classifier"], **kwargs)
    with torch.no_grad():
        delta.heads["classifier"].weight.add_(0.5)  # a trained head
    return delta


def test_the_copy_runs_while_attached_and_the_original_is_back_bit_for_bit_when_detached() -> None:
    model = tiny_bert()
    base, state, hooks, keys = model(IDS).logits, snapshot(model), hook_counts(model), list(model.state_dict())
    delta = _with_head(model)
    attached = model(IDS).logits
    assert not torch.equal(attached, base)
    assert set(delta.heads) == {"classifier"} and delta.heads["classifier"] is not model.classifier
    assert "lora_heads.classifier.weight" in model.state_dict()  # under the delta's own prefix while attached
    delta.detach()
    assert torch.equal(model(IDS).logits, base)
    assert_state_equal(model, state)
    assert list(model.state_dict()) == keys and hook_counts(model) == hooks
    delta.attach()
    assert torch.equal(model(IDS).logits, attached)


def test_a_fresh_head_copy_changes_nothing() -> None:
    model = tiny_bert()
    base = model(IDS).logits
    LoraModel(model, modified_modules=["query"], modules_to_save=["classifier"])
    assert torch.equal(model(IDS).logits, base)


def test_the_head_copy_is_trained_through_deltas_and_the_original_stays_frozen() -> None:
    model = tiny_bert()
    original = model.classifier.weight.detach().clone()
    delta = _with_head(model)
    delta.freeze_module(exclude=["deltas"])
    assert delta.heads["classifier"].weight.requires_grad and not model.classifier.weight.requires_grad
    assert "lora_heads.classifier.weight" in dict(delta.named_parameters())
    model.train()
    model(IDS, labels=torch.tensor([1])).loss.backward()
    assert delta.heads["classifier"].weight.grad is not None and model.classifier.weight.grad is None
    assert torch.equal(model.classifier.weight, original)
    assert delta.config.unfrozen_modules == ["deltas"]


def test_unfreezing_the_original_of_a_head_is_refused() -> None:
    model = tiny_bert()
    delta = _with_head(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(DeltaError, match="carries its own copy of 'classifier'"):
        delta.freeze_module(exclude=["deltas", "classifier"])
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_freeze_module_records_what_was_kept_trainable_in_the_config() -> None:
    """Item 7's finding: the saved config said unfrozen_modules ["deltas"] while it held a head."""
    model = tiny_bert()
    delta = LoraModel(model, modified_modules=["query"])
    delta.freeze_module(exclude=["deltas", "classifier"])
    assert delta.config.unfrozen_modules == ["deltas", "classifier"]
    delta.freeze_module()  # the recorded default does the same again
    assert set(delta.unfrozen_parameter_names) == {"classifier.weight", "classifier.bias"}


def test_the_head_follows_dtype_moves_and_deep_copies() -> None:
    model = tiny_bert()
    delta = _with_head(model)
    model.to(torch.float64)
    assert delta.heads["classifier"].weight.dtype == torch.float64
    attached = model(IDS).logits
    copied_model, copied = copy.deepcopy((model, delta))
    assert torch.equal(copied_model(IDS).logits, attached)
    with torch.no_grad():
        copied.heads["classifier"].weight.zero_()  # the copy owns its own head
    assert torch.equal(model(IDS).logits, attached)
    copied.detach()
    delta.detach()
    assert torch.equal(copied_model(IDS).logits, model(IDS).logits)


def test_a_sequential_head_is_not_handed_an_extra_child() -> None:
    model = tiny_bert()
    model.classifier = nn.Sequential(nn.Linear(32, 8), nn.Tanh(), nn.Linear(8, 2))
    base = model(IDS).logits
    delta = LoraModel(model, modified_modules=["query"], modules_to_save=["classifier"])
    assert torch.equal(model(IDS).logits, base) and len(model.classifier) == 3
    with torch.no_grad():
        delta.heads["classifier"][2].bias.add_(1.0)
    assert torch.allclose(model(IDS).logits, base + 1.0)


def test_a_head_copy_leaves_out_what_other_deltas_attached_to_the_original() -> None:
    model = tiny_bert()
    other = LoraModel(model, modified_modules=["classifier"], name="other")
    with torch.no_grad():
        other.sites[0].module.lora_B.add_(1.0)
    delta = LoraModel(model, modified_modules=["query"], modules_to_save=["classifier"])
    head = delta.heads["classifier"]
    assert not hasattr(head, "other") and not head._forward_hooks
    other.detach()
    delta.detach()
    reference = tiny_bert()
    assert torch.equal(head(torch.ones(1, 32)), reference.classifier(torch.ones(1, 32)))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"modified_modules": ["classifier"], "modules_to_save": ["classifier"]}, "also modifies 'classifier'"),
        ({"modified_modules": ["dense"], "modules_to_save": ["pooler"]}, "lies inside"),
        ({"modified_modules": ["query"], "modules_to_save": ["pooler", "pooler.dense"]}, "lies inside it"),
    ],
)
def test_overlapping_heads_and_sites_are_refused_before_anything_changes(options, message) -> None:
    model = tiny_bert()
    state, hooks = snapshot(model), hook_counts(model)
    with pytest.raises(DeltaError, match=message):
        LoraModel(model, **options)
    assert_state_equal(model, state)
    assert hook_counts(model) == hooks


def test_a_head_pattern_that_matches_nothing_names_it() -> None:
    with pytest.raises(ModuleMatchError, match="modules_to_save"):
        LoraModel(tiny_bert(), modified_modules=["query"], modules_to_save=["classifer"])


def test_a_score_head_of_a_decoder(tmp_path) -> None:
    model = tiny_gpt2()
    base = model(IDS).logits
    delta = LoraModel(model, modified_modules=["c_attn"], modules_to_save=["lm_head"])
    assert torch.equal(model(IDS).logits, base)
    with torch.no_grad():
        delta.heads["lm_head"].weight.mul_(2.0)
    assert not torch.equal(model(IDS).logits, base)
    assert model.lm_head.weight is model.transformer.wte.weight  # the tie of the original is untouched
    delta.detach()
    assert torch.equal(model(IDS).logits, base)


def test_switch_brings_each_deltas_own_head(tmp_path) -> None:
    model = tiny_bert()
    group = DeltaGroup(model)
    outputs = {}
    for seed, name in ((1, "spelling"), (2, "topic")):
        delta = LoraModel(model, modified_modules=["query"], modules_to_save=["classifier"], name=name)
        torch.manual_seed(seed)
        with torch.no_grad():
            for param in delta.parameters():
                param.add_(torch.randn_like(param) * 0.1)
        outputs[name] = model(IDS).logits
        delta.detach()
        group.add(delta)
    base = model(IDS).logits
    for name in ("topic", "spelling", "topic"):
        group.switch(name)
        assert torch.equal(model(IDS).logits, outputs[name])
    group.switch(None)
    assert torch.equal(model(IDS).logits, base)
