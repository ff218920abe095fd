"""Soft prompts on encoders, decoders and encoder-decoders: a reference built from inputs_embeds, padding, caller
tensors untouched, labels, generate() (first step, incremental decoding, beam search), bad inputs. The DESIGN §4
contract runs in tests/test_contract.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deltakit import AutoDeltaModel, SoftPromptModel
from deltakit.errors import DeltaConfigError, DeltaError

from .conftest import VOCAB, hook_counts, perturb, tiny_bert, tiny_gpt2, tiny_llama
from .test_prefix import BUILDERS, CAUSAL, ENC_DEC, check_generation, ids_batch, run

N = 4


def soft(model: nn.Module, **kwargs) -> SoftPromptModel:
    kwargs.setdefault("soft_token_num", N)
    return SoftPromptModel(model, **kwargs)


def real_part(name: str, logits: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Per-sequence outputs of the real tokens: decoder-only logits have the prompt positions first."""
    if name in CAUSAL:
        return [logits[i, N:][mask[i].bool()] for i in range(mask.shape[0])]
    return [logits[i] for i in range(mask.shape[0])]


@pytest.mark.parametrize("name", list(BUILDERS))
def test_site_and_output_shapes(name: str) -> None:
    model = BUILDERS[name]()
    ids = ids_batch()
    base = run(name, model, ids, torch.ones_like(ids))
    delta = soft(model)
    assert len(delta.sites) == 1 and delta.sites[0].module.soft_embeds.shape == (N, 32)
    out = run(name, model, ids, torch.ones_like(ids))
    if name in CAUSAL:
        assert out.shape == (2, N + 7, VOCAB)
    else:
        assert out.shape == base.shape and not torch.allclose(out, base)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_equals_the_prompt_given_as_input_embeddings(name: str) -> None:
    """Reference: the unmodified model fed ``[prompt; E(x)]`` as inputs_embeds with a widened mask."""
    model = BUILDERS[name]()
    delta = soft(model)
    perturb(delta, scale=0.3)
    ids = ids_batch()
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    extra = {"token_type_ids": torch.zeros_like(ids)} if name in ("bert",) else {}
    ours = run(name, model, ids, mask, **extra)
    prompt = delta.sites[0].module.soft_embeds.detach().clone()
    delta.detach()
    embeds = torch.cat([prompt.expand(2, -1, -1), model.get_input_embeddings()(ids)], dim=1)
    wide = torch.cat([torch.ones(2, N, dtype=mask.dtype), mask], dim=1)
    kwargs = {"inputs_embeds": embeds, "attention_mask": wide}
    if extra:
        kwargs["token_type_ids"] = torch.zeros_like(wide)
    if name in ENC_DEC:
        kwargs["decoder_input_ids"] = ids_batch(seed=5, batch=2, length=4)
    reference = model(**kwargs).logits
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_without_mask_equals_all_ones_mask_and_inputs_untouched(name: str) -> None:
    model = BUILDERS[name]()
    delta = soft(model)
    perturb(delta, scale=0.3)
    ids = ids_batch()
    mask = torch.ones_like(ids)
    ids_copy, mask_copy = ids.clone(), mask.clone()
    with_mask = run(name, model, ids, mask)
    torch.testing.assert_close(run(name, model, ids, None), with_mask, rtol=1e-5, atol=1e-6)
    assert torch.equal(ids, ids_copy) and torch.equal(mask, mask_copy) and mask.shape == (2, 7)


@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_equals_each_sequence_alone(name: str, side: str) -> None:
    if side == "left" and name not in CAUSAL:
        pytest.skip("encoders pad on the right (absolute positions); left padding is the decoders' case")
    model = BUILDERS[name]()
    delta = soft(model)
    perturb(delta, scale=0.3)
    g = torch.Generator().manual_seed(9)
    seqs = [torch.randint(3, VOCAB, (n,), generator=g) for n in (7, 4)]
    ids = torch.full((2, 7), 1)
    mask = torch.zeros(2, 7, dtype=torch.long)
    for i, seq in enumerate(seqs):
        sl = slice(0, len(seq)) if side == "right" else slice(7 - len(seq), 7)
        ids[i, sl], mask[i, sl] = seq, 1
    decoder = ids_batch(seed=5, batch=2, length=4)
    extra = {"position_ids": (mask.cumsum(-1) - 1).clamp(min=0)} if name in CAUSAL else {}
    if name in ENC_DEC:
        extra = {"decoder_input_ids": decoder}
    batched = real_part(name, run(name, model, ids, mask, **extra), mask)
    for i, seq in enumerate(seqs):
        own = {"decoder_input_ids": decoder[i : i + 1]} if name in ENC_DEC else {}
        alone = run(name, model, seq[None], torch.ones(1, len(seq), dtype=torch.long), **own)
        alone = alone[0, N:] if name in CAUSAL else alone[0]
        torch.testing.assert_close(batched[i], alone, rtol=1e-4, atol=1e-5)


def test_token_type_ids_are_extended_and_position_ids_shifted() -> None:
    model = tiny_bert()
    delta = soft(model)
    perturb(delta, scale=0.3)
    ids = ids_batch()
    types = torch.zeros_like(ids)
    types[:, 4:] = 1
    out = model(input_ids=ids, token_type_ids=types).logits
    positions = torch.arange(7).expand(2, -1)
    torch.testing.assert_close(model(input_ids=ids, token_type_ids=types, position_ids=positions).logits, out)
    assert not torch.allclose(model(input_ids=ids).logits, out)  # the token types reached the model


def test_causal_lm_labels_get_ignored_prompt_positions() -> None:
    model = tiny_gpt2()
    delta = soft(model)
    perturb(delta, scale=0.3)
    ids = ids_batch()
    labels = ids.clone()
    loss = model(input_ids=ids, labels=labels).loss
    logits = model(input_ids=ids).logits
    # the last prompt position predicts the first real token, each real position the next one
    expected = nn.functional.cross_entropy(logits[:, N - 1 : -1].reshape(-1, VOCAB), ids.reshape(-1))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(labels, ids)  # the caller's labels are not modified


def test_sequence_classification_labels_untouched() -> None:
    model = tiny_bert()
    soft(model)
    out = model(input_ids=ids_batch(), labels=torch.tensor([0, 1]))
    assert out.loss.dim() == 0 and out.logits.shape == (2, 2)


@pytest.mark.parametrize("name", ["gpt2", "llama", "t5", "bart"])
def test_generate_uses_the_prompt_and_the_cache_matches_recomputation(name: str) -> None:
    model = BUILDERS[name]()
    delta = soft(model)
    perturb(delta, scale=0.5)
    delta.detach()
    check_generation(name, model, delta)


def test_inits() -> None:
    model = tiny_llama()
    delta = soft(model, soft_token_num=5)
    rows = model.get_input_embeddings().weight
    prompt = delta.sites[0].module.soft_embeds
    assert all(any(torch.equal(p, r) for r in rows) for p in prompt)  # drawn from the vocabulary
    delta.detach()
    uniform = soft(model, soft_token_num=50, token_init=False, init_range=0.1)
    values = uniform.sites[0].module.soft_embeds
    assert values.abs().max() <= 0.1 and values.std() > 0.03


def test_bad_inputs_raise_and_change_nothing(tmp_path) -> None:
    model = tiny_llama()
    hooks = hook_counts(model)
    for bad in ({"soft_token_num": 0}, {"init_range": -1.0}, {"token_init": 1}):
        with pytest.raises(DeltaConfigError):
            SoftPromptModel(model, **bad)
    with pytest.raises(DeltaConfigError, match="modified_modules must be None"):
        SoftPromptModel.from_config({"soft_token_num": 2, "modified_modules": ["embed_tokens"]}, model)
    with pytest.raises(DeltaError):
        SoftPromptModel(nn.Linear(2, 2))
    assert hook_counts(model) == hooks
    delta = soft(model)
    with pytest.raises(DeltaError, match="2-D"):
        model(input_ids=ids_batch(), attention_mask=torch.ones(2, 1, 7, 7))
    delta.detach()
    assert hook_counts(model) == hooks


def test_save_load_and_two_prompts_stack(tmp_path) -> None:
    model = tiny_gpt2()
    first = soft(model)
    perturb(first, seed=1)
    ids = ids_batch()
    one = model(input_ids=ids).logits
    second = soft(model, soft_token_num=2)
    perturb(second, seed=2)
    both = model(input_ids=ids).logits
    assert both.shape == (2, 7 + N + 2, VOCAB)
    first.detach()
    first.attach()
    assert torch.equal(model(input_ids=ids).logits, both)
    second.detach()
    assert torch.equal(model(input_ids=ids).logits, one)
    first.save_finetuned(tmp_path / "soft")
    fresh = tiny_gpt2()
    AutoDeltaModel.from_finetuned(tmp_path / "soft", backbone_model=fresh)
    assert torch.equal(fresh(input_ids=ids).logits, one)
