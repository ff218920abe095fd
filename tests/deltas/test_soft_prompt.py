"""Soft prompts on encoders, decoders and encoder-decoders: a reference built from inputs_embeds, padding, caller
tensors untouched, labels, generate() (first step, incremental decoding, beam search), bad inputs. The DESIGN §4
contract runs in tests/core/test_contract.py."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
)

from deltakit import AutoDeltaModel, SoftPromptModel
from deltakit.errors import DeltaConfigError, DeltaError, DeltaStateError

from tests.tolerances import assert_same_function
from tests.helpers import VOCAB, hook_counts, perturb, tiny_bert, tiny_gpt2, tiny_llama
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
    assert_same_function(ours, reference, model=model)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_without_mask_equals_all_ones_mask_and_inputs_untouched(name: str) -> None:
    model = BUILDERS[name]()
    delta = soft(model)
    perturb(delta, scale=0.3)
    ids = ids_batch()
    mask = torch.ones_like(ids)
    ids_copy, mask_copy = ids.clone(), mask.clone()
    with_mask = run(name, model, ids, mask)
    assert_same_function(run(name, model, ids, None), with_mask, model=model)
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
        assert_same_function(batched[i], alone, model=model)


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
    assert_same_function(loss, expected, model=model, tokens=64)
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


# ---------------------------------------------------------------- decoder-only sequence classification
def tiny_llama_classifier(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0, num_labels=3,
    )
    return LlamaForSequenceClassification(cfg).eval()


def tiny_gpt2_classifier(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=64, pad_token_id=0, num_labels=3)
    return GPT2ForSequenceClassification(cfg).eval()


CLASSIFIERS = {"llama": tiny_llama_classifier, "gpt2": tiny_gpt2_classifier}


def padded_batch(side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Two sequences (7 and 4 real tokens, ids >= 3) padded with the pad id 0 on ``side`` ("none": both full)."""
    ids = ids_batch()
    mask = torch.ones_like(ids)
    if side == "right":
        mask[1, 4:] = 0
    elif side == "left":
        mask[1, :3] = 0
    return ids * mask, mask


def pooled_reference(
    model: nn.Module, prompts: list[torch.Tensor], ids: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """The unmodified model's backbone fed ``[prompts...; E(x)]`` (the last prompt given first: it is prepended last),
    its head applied at every position, pooled by hand at the last real token (``n + last real index``)."""
    batch = ids.shape[0]
    parts = [p.expand(batch, -1, -1) for p in reversed(prompts)] + [model.get_input_embeddings()(ids)]
    count = sum(p.shape[0] for p in prompts)
    wide = torch.cat([torch.ones(batch, count, dtype=mask.dtype), mask], dim=1)
    hidden = model.base_model(inputs_embeds=torch.cat(parts, dim=1), attention_mask=wide).last_hidden_state
    last_real = torch.stack([torch.nonzero(row).max() for row in mask])
    return model.score(hidden)[torch.arange(batch), count + last_real]


@pytest.mark.parametrize("name", list(CLASSIFIERS))
@pytest.mark.parametrize("side", ["right", "left", "none"])
def test_decoder_sequence_classification_pools_the_last_real_token(name: str, side: str) -> None:
    model = CLASSIFIERS[name]()
    delta = soft(model)
    perturb(delta, scale=0.3)
    ids, mask = padded_batch(side)
    labels = torch.tensor([2, 0])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        prompt = delta.sites[0].module.soft_embeds.detach().clone()
        delta.detach()
        expected = pooled_reference(model, [prompt], ids, mask)
    assert out.logits.shape == (2, 3)
    assert_same_function(out.logits, expected, model=model)
    assert_same_function(out.loss, nn.functional.cross_entropy(expected, labels), model=model)


@pytest.mark.parametrize("name", list(CLASSIFIERS))
def test_decoder_sequence_classification_with_inputs_embeds(name: str) -> None:
    """Given inputs_embeds, transformers pools the last position (it cannot see padding): still the last real token."""
    model = CLASSIFIERS[name]()
    delta = soft(model)
    perturb(delta, scale=0.3)
    ids, mask = padded_batch("none")
    with torch.no_grad():
        out = model(inputs_embeds=model.get_input_embeddings()(ids), attention_mask=mask).logits
        prompt = delta.sites[0].module.soft_embeds.detach().clone()
        delta.detach()
        expected = pooled_reference(model, [prompt], ids, mask)
    assert_same_function(out, expected, model=model)


def test_decoder_sequence_classification_hooks_follow_the_delta() -> None:
    model = tiny_llama_classifier()
    hooks = hook_counts(model)
    ids, mask = padded_batch("right")
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask).logits
        first = soft(model)
        perturb(first, seed=1, scale=0.3)
        one = model(input_ids=ids, attention_mask=mask).logits
        second = soft(model, soft_token_num=2)  # two prompts stacked: still pooled at the last real token
        perturb(second, seed=2, scale=0.3)
        both = model(input_ids=ids, attention_mask=mask).logits
        prompts = [d.sites[0].module.soft_embeds.detach().clone() for d in (first, second)]
        with pytest.raises(DeltaStateError):
            first.merge()
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, both)
        second.detach()
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, one)
        first.detach()
        assert hook_counts(model) == hooks
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, base)
        assert_same_function(both, pooled_reference(model, prompts, ids, mask), model=model)
        # the head, called by itself, is not touched
        hidden = torch.randn(2, 9, 32)
        first.attach()
        assert torch.equal(model.score(hidden), nn.functional.linear(hidden, model.score.weight))


def test_sequence_level_float_labels_are_not_token_labels() -> None:
    """Multi-label targets (batch, num_labels) of float dtype are left alone even when num_labels equals the length."""
    torch.manual_seed(0)
    cfg = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=VOCAB,
        max_position_embeddings=64, num_labels=7, problem_type="multi_label_classification",
    )
    model = BertForSequenceClassification(cfg).eval()
    soft(model)
    ids = ids_batch()
    targets = (torch.rand(2, 7, generator=torch.Generator().manual_seed(3)) > 0.5).float()
    out = model(input_ids=ids, labels=targets)
    expected = nn.functional.binary_cross_entropy_with_logits(out.logits, targets)
    torch.testing.assert_close(out.loss, expected)


# ---------------------------------------------------------------- bare base models
BASE_MODELS = {"bert": tiny_bert, "llama": tiny_llama, "gpt2": tiny_gpt2}


@pytest.mark.parametrize("name", list(BASE_MODELS))
def test_bare_base_model_equals_the_prompt_given_as_input_embeddings(name: str, tmp_path) -> None:
    model = BASE_MODELS[name]().base_model
    hooks = hook_counts(model)
    delta = soft(model)
    perturb(delta, scale=0.3)
    assert [n for n, _ in delta.named_parameters()] == [n for n, p in model.named_parameters() if "soft_prompt" in n]
    ids = ids_batch()
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask).last_hidden_state
        prompt = delta.sites[0].module.soft_embeds.detach().clone()
        delta.save_finetuned(tmp_path / "soft")
        delta.detach()
        assert hook_counts(model) == hooks
        embeds = torch.cat([prompt.expand(2, -1, -1), model.get_input_embeddings()(ids)], dim=1)
        wide = torch.cat([torch.ones(2, N, dtype=mask.dtype), mask], dim=1)
        reference = model(inputs_embeds=embeds, attention_mask=wide).last_hidden_state
        assert ours.shape == (2, N + 7, 32)
        assert_same_function(ours, reference, model=model)
        delta.attach()
        assert torch.equal(model(input_ids=ids, attention_mask=mask).last_hidden_state, ours)
        fresh = BASE_MODELS[name]().base_model
        AutoDeltaModel.from_finetuned(tmp_path / "soft", backbone_model=fresh)
        assert torch.equal(fresh(input_ids=ids, attention_mask=mask).last_hidden_state, ours)


# ---------------------------------------------------------------- pickling the whole model
@pytest.mark.parametrize("name", ["gpt2", "t5", "llama-classifier"])
def test_whole_model_pickles_with_the_prompt(name: str) -> None:
    model = tiny_llama_classifier() if name == "llama-classifier" else BUILDERS[name]()
    delta = soft(model)
    perturb(delta, scale=0.3)
    ids, mask = padded_batch("right")
    kwargs = {"input_ids": ids, "attention_mask": mask}
    if name == "t5":
        kwargs["decoder_input_ids"] = ids_batch(seed=5, batch=2, length=4)
    if name == "gpt2":
        kwargs["labels"] = ids
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        out, again = model(**kwargs), loaded(**kwargs)
    assert torch.equal(out.logits, again.logits)
    if name == "gpt2":
        assert torch.equal(out.loss, again.loss)


def test_an_input_the_prompt_pushes_past_the_position_table_gets_a_clear_error() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64, vocab_size=100)).eval()
    SoftPromptModel(model, soft_token_num=10)
    ids = torch.randint(3, 100, (1, 54))
    with torch.no_grad():
        model(input_ids=ids)  # 10 + 54 = 64: fits
        with pytest.raises(DeltaError, match="would need 65 positions .*has 64 position embeddings.*Shorten"):
            model(input_ids=torch.randint(3, 100, (1, 55)))
        with pytest.raises(DeltaError, match="would need 65 positions"):
            model.generate(input_ids=ids[:, :5], attention_mask=torch.ones(1, 5, dtype=torch.long),
                           max_new_tokens=55, do_sample=False, pad_token_id=0)
        out = model.generate(input_ids=ids[:, :5], attention_mask=torch.ones(1, 5, dtype=torch.long),
                             max_new_tokens=49, do_sample=False, pad_token_id=0)  # the last position that fits
    assert out.shape == (1, 54)
