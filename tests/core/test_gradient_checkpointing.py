"""Activation checkpointing (reentrant and non-reentrant) with a frozen backbone: every delta gets its gradient."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import ViTConfig, ViTForImageClassification

from deltakit import AdapterModel, BitFitModel, LoraModel

from tests.tolerances import assert_same_gradients
from tests.helpers import hook_counts, perturb, tiny_bert, tiny_llama

METHODS = {"lora": LoraModel, "adapter": AdapterModel, "bitfit": BitFitModel}


def enable(model: torch.nn.Module, reentrant: bool) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # gradient_checkpointing_enable is a deprecated alias in 5.x
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})


def delta_grads(build, method: str, reentrant: bool | None) -> tuple[dict[str, torch.Tensor | None], object]:
    model = build()
    delta = METHODS[method](model)
    perturb(delta, scale=0.1)  # non-zero deltas, so every parameter's gradient is non-zero
    delta.freeze_module()
    model.train()
    if reentrant is not None:
        enable(model, reentrant)
    ids = torch.randint(2, 100, (2, 7), generator=torch.Generator().manual_seed(3))
    model(input_ids=ids).logits.pow(2).sum().backward()
    return {n: p.grad for n, p in delta.named_parameters()}, model


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("build", [tiny_bert, tiny_llama], ids=["bert", "llama"])
def test_every_delta_parameter_gets_its_gradient(build, method: str, reentrant: bool) -> None:
    reference, _ = delta_grads(build, method, None)
    grads, model = delta_grads(build, method, reentrant)
    embeddings = model.get_input_embeddings().weight
    assert not embeddings.requires_grad and embeddings.grad is None
    assert grads.keys() == reference.keys() and grads
    for name, grad in grads.items():
        assert grad is not None, f"{name} got no gradient under checkpointing (reentrant={reentrant})"
        assert grad.abs().sum() > 0, name
    assert_same_gradients(grads, reference, model=model, tokens=14)


def tiny_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=16, patch_size=8,
        num_labels=2,
    )
    return ViTForImageClassification(cfg)


def test_vision_model_reentrant_needs_and_gets_the_input_hook() -> None:
    """transformers enables input gradients only for ``input_ids`` models; deltakit covers pixel models too."""
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    model = tiny_vit()
    delta = LoraModel(model, modified_modules=["q_proj", "v_proj"])
    perturb(delta, scale=0.1)
    delta.freeze_module()  # the classifier head is frozen too: the loss depends on the backbone through LoRA only
    model.train()
    enable(model, reentrant=True)
    model(pixel_values=pixels).logits.pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in delta.parameters())

    # The control: without deltakit's hook, reentrant checkpointing cuts the graph and backward fails.
    for handle in delta._checkpointing_handles:
        handle.remove()
    with pytest.raises(RuntimeError, match="does not require grad"):
        model(pixel_values=pixels).logits.pow(2).sum().backward()


def test_user_inputs_embeds_get_gradients_and_stay_untouched() -> None:
    model = tiny_bert()
    delta = LoraModel(model)
    delta.freeze_module()
    model.train()
    enable(model, reentrant=True)
    embeds = model.get_input_embeddings()(torch.randint(2, 100, (2, 7))).detach()
    model(inputs_embeds=embeds).logits.pow(2).sum().backward()
    assert all(p.grad is not None for p in delta.parameters())
    assert not embeds.requires_grad  # the caller's tensor is not changed


def test_hook_is_inert_without_checkpointing_and_gone_after_detach() -> None:
    model = tiny_bert()
    before = hook_counts(model)
    delta = LoraModel(model)
    delta.freeze_module()
    model.train()
    seen: list[bool] = []
    probe = model.get_input_embeddings().register_forward_hook(lambda m, a, out: seen.append(out.requires_grad))
    model(input_ids=torch.randint(2, 100, (2, 7)))
    assert seen == [False]  # plain training pays nothing: no gradient w.r.t. the embeddings
    probe.remove()
    delta.detach()
    assert hook_counts(model) == before
