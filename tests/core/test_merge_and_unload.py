"""merge_and_unload(): the plain model for deployment; save_pretrained() while a delta is in the model warns;
print_trainable_parameters() gives PEFT's line plus the delta's share."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import BertForSequenceClassification

from deltakit import BitFitModel, LoraModel, PrefixModel
from deltakit.errors import DeltaStateError
from deltakit.site import DeltaSite
from tests.helpers import assert_state_equal, hook_counts, perturb, snapshot, tiny_bert, tiny_gpt2
from tests.tolerances import assert_same_function

IDS = torch.arange(3, 10).view(1, -1)


def _trained(model, **kwargs) -> LoraModel:
    delta = LoraModel(model, modified_modules=["query", "value"], modules_to_save=["classifier"], **kwargs)
    perturb(delta)
    return delta


def test_the_result_is_the_plain_model_with_the_delta_and_head_folded_in(tmp_path) -> None:
    model = tiny_bert()
    keys, hooks = list(model.state_dict()), hook_counts(model)
    delta = _trained(model)
    attached = model(IDS).logits
    head = {k: v.clone() for k, v in delta.heads["classifier"].state_dict().items()}
    plain = delta.merge_and_unload()
    assert plain is model
    assert list(plain.state_dict()) == keys  # exactly the backbone's keys, in order
    assert hook_counts(plain) == hooks
    assert not any(isinstance(m, DeltaSite) for m in plain.modules())
    assert not hasattr(plain, "lora_heads")
    assert all(torch.equal(plain.classifier.state_dict()[k], v) for k, v in head.items())  # the copy's values
    merged = plain(IDS).logits
    assert_same_function(merged, attached, model=plain)

    plain.save_pretrained(tmp_path / "plain")
    reloaded = BertForSequenceClassification.from_pretrained(tmp_path / "plain").eval()
    # The same weights, bit for bit; the outputs agree to rounding only: the reloaded tensors live in other memory
    # (safetensors' buffers), and without SIMD the CPU kernels took another path and rounded differently (seen with
    # ATEN_CPU_CAPABILITY=default; equal under AVX2 and AVX-512).
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in plain.state_dict().items())
    assert_same_function(reloaded(IDS).logits, merged, model=plain)


def test_a_merged_delta_unloads_too() -> None:
    model = tiny_bert()
    delta = _trained(model)
    delta.merge()
    merged = model(IDS).logits
    delta.merge_and_unload()
    assert torch.equal(model(IDS).logits, merged)
    assert not any(isinstance(m, DeltaSite) for m in model.modules())


def test_the_spent_delta_refuses_everything() -> None:
    delta = _trained(tiny_bert())
    delta.merge_and_unload()
    for action in (delta.attach, delta.detach, delta.merge, delta.unmerge, delta.merge_and_unload):
        with pytest.raises(DeltaStateError, match="merge_and_unload"):
            action()


def test_a_method_that_cannot_merge_refuses_with_the_reason_and_changes_nothing() -> None:
    model = tiny_gpt2()
    delta = PrefixModel(model, prefix_token_num=2)
    state = snapshot(model)
    keys = list(model.state_dict())
    with pytest.raises(DeltaStateError, match="not a change of the host weights.*rewrites the host call"):
        delta.merge_and_unload()
    assert delta.state == "attached" and list(model.state_dict()) == keys
    assert_state_equal(model, state)


def test_another_delta_in_the_model_is_refused() -> None:
    model = tiny_bert()
    delta = _trained(model)
    BitFitModel(model, modified_modules=["output.dense"])
    state = snapshot(model)
    with pytest.raises(DeltaStateError, match="other deltas are in the model"):
        delta.merge_and_unload()
    assert delta.state == "attached"
    assert_state_equal(model, state)


def test_a_detached_delta_is_refused() -> None:
    delta = _trained(tiny_bert())
    delta.detach()
    with pytest.raises(DeltaStateError, match="attach"):
        delta.merge_and_unload()


def test_a_head_tied_to_the_embeddings_is_refused() -> None:
    model = tiny_gpt2()
    delta = LoraModel(model, modified_modules=["c_attn"], modules_to_save=["lm_head"])
    state = snapshot(model)
    with pytest.raises(DeltaStateError, match="tied"):
        delta.merge_and_unload()
    assert delta.state == "attached"
    assert_state_equal(model, state)


def test_save_pretrained_while_a_delta_is_attached_warns_with_the_fix(tmp_path) -> None:
    model = tiny_bert()
    delta = _trained(model)
    with pytest.warns(UserWarning, match=r"reloads WITHOUT the delta.*merge_and_unload\(\).*save_finetuned"):
        model.save_pretrained(tmp_path / "attached")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.state_dict()  # anything else that takes the state dict stays silent
        delta.detach()
        model.save_pretrained(tmp_path / "detached")  # the bare backbone: nothing is lost
        delta.attach()
        delta.merge_and_unload()
        model.save_pretrained(tmp_path / "plain")


def test_print_trainable_parameters_gives_peft_s_line_and_the_delta_s_share(capsys) -> None:
    model = tiny_bert()
    backbone = sum(p.numel() for p in model.parameters())
    delta = _trained(model)
    delta.freeze_module(exclude=["deltas"])
    own = sum(p.numel() for p in delta.parameters())
    delta.print_trainable_parameters()
    line = capsys.readouterr().out.strip()
    total = backbone + own
    assert line == (
        f"trainable params: {own:,} || all params: {total:,} || trainable%: {100 * own / total:.4f} || "
        f"delta params: {own:,} ({100 * own / backbone:.4f}% of the backbone's {backbone:,})"
    )
    delta.detach()
    assert delta.trainable_parameters_summary().endswith("[detached: the delta is not in the model]")


def test_the_counting_helpers_default_to_the_delta_itself_as_in_opendelta() -> None:
    # OpenDelta's num_trainable_parameters() / num_total_parameters() counted the delta object; deltakit counted the
    # whole backbone, so a head trained in place was silently included (the OpenDelta difference was not needed).
    model = tiny_bert()
    delta = LoraModel(model, modified_modules=["query", "value"])
    delta.freeze_module(exclude=["deltas", "classifier"])
    own = sum(p.numel() for p in delta.parameters())
    head = sum(p.numel() for p in model.classifier.parameters())
    assert delta.num_trainable_parameters() == delta.num_total_parameters() == delta.num_delta_parameters() == own
    assert delta.num_trainable_parameters(model) == own + head
    assert delta.num_total_parameters(model) == sum(p.numel() for p in model.parameters())
    assert "classifier.weight" in delta.trainable_parameters_names()  # the names still list the backbone's
    delta.freeze_module(exclude=["classifier"])  # the delta frozen too: its own trainable count drops to 0
    assert delta.num_trainable_parameters() == 0 and delta.num_total_parameters() == own
