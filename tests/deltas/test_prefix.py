"""Prefix tuning on encoders, decoders (GQA included) and encoder-decoders: a reference built with the model's own
cache, padding, generate() (first step, incremental decoding, beam search), reparameterization folding, bad inputs.
The DESIGN §4 contract runs in tests/core/test_contract.py."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn
from transformers import BartConfig, BartForConditionalGeneration, DynamicCache

from deltakit import AutoDeltaModel, DeltaError, ModuleMatchError, PrefixModel, UnsupportedModuleError
from deltakit import hf_compat
from deltakit.errors import DeltaConfigError

from tests.tolerances import assert_same_function, assert_same_gradients
from tests.helpers import REPO_ROOT, VOCAB, assert_state_equal, hook_counts, perturb, snapshot, tiny_bert, tiny_gpt2, tiny_llama, tiny_roberta, tiny_t5


def tiny_bart(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = BartConfig(
        d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=4,
        encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=1,
        bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None,
    )
    return BartForConditionalGeneration(cfg).eval()


BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "bert": tiny_bert, "roberta": tiny_roberta, "gpt2": tiny_gpt2, "llama": tiny_llama, "t5": tiny_t5, "bart": tiny_bart,
}
ENC_DEC = ("t5", "bart")
CAUSAL = ("gpt2", "llama")


def small_prefix(model: nn.Module, **kwargs) -> PrefixModel:
    kwargs.setdefault("prefix_token_num", 3)
    kwargs.setdefault("embed_dim", 16)
    kwargs.setdefault("mid_dim", 16)
    return PrefixModel(model, **kwargs)


def ids_batch(seed: int = 1, batch: int = 2, length: int = 7) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def run(name: str, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None, **extra) -> torch.Tensor:
    kwargs = dict(input_ids=ids, attention_mask=mask, **extra)
    if name in ENC_DEC:
        kwargs.setdefault("decoder_input_ids", ids_batch(seed=5, batch=ids.shape[0], length=4))
    return model(**kwargs).logits


def real_positions(name: str, logits: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Per-sequence logits of the real tokens (sequence-level outputs are returned whole)."""
    if name in CAUSAL:
        return [logits[i][mask[i].bool()] for i in range(mask.shape[0])]
    return [logits[i] for i in range(mask.shape[0])]


# ---------------------------------------------------------------------------------------------------- structure
@pytest.mark.parametrize("name", list(BUILDERS))
def test_default_sites_are_the_attention_modules(name: str) -> None:
    model = BUILDERS[name]()
    delta = small_prefix(model)
    layers = 2
    expected = {"bert": layers, "roberta": layers, "gpt2": layers, "llama": layers, "t5": 3 * layers, "bart": 3 * layers}
    assert len(delta.sites) == expected[name]
    for site in delta.sites:
        assert hf_compat.is_kv_attention(site.host)


def test_grouped_query_attention_gets_one_prefix_per_kv_head() -> None:
    model = tiny_llama()  # 4 query heads, 2 key/value heads, head size 8
    delta = small_prefix(model, reparameterize=False, prefix_token_num=5)
    for key, value in delta.prefix_tensors().values():
        assert key.shape == value.shape == (2, 5, 8)
    shared = small_prefix(tiny_llama(), prefix_token_num=5, mid_dim=7)
    blocks = [w.shape for w in shared.shared.out_weight]
    assert blocks == [(2 * 2 * 8, 7)] * 2  # per layer: (K, V) x 2 kv heads x head size


def test_not_identity_at_init_and_parameters_only_in_the_delta() -> None:
    model = tiny_llama()
    ids = ids_batch()
    base = model(input_ids=ids).logits
    names = [n for n, _ in model.named_parameters()]
    delta = small_prefix(model)
    assert not torch.allclose(model(input_ids=ids).logits, base)
    delta.freeze_module()
    assert delta.num_trainable_parameters() == delta.num_delta_parameters()
    shared = [n for n, _ in model.named_parameters() if n not in names]
    assert shared and all(n.startswith("prefix_shared.") for n in shared)  # the MLP lives once, on the root


def prefix_cache(keys_values: list[tuple[torch.Tensor, torch.Tensor]], batch: int) -> DynamicCache:
    """The model's own cache holding the given per-layer prefixes ``(kv_heads, n, head_dim)``: the reference."""
    cache = DynamicCache()
    for layer, (key, value) in enumerate(keys_values):
        cache.update(key.unsqueeze(0).expand(batch, -1, -1, -1), value.unsqueeze(0).expand(batch, -1, -1, -1), layer)
    return cache


# ---------------------------------------------------------------------------------------------------- reference
@pytest.mark.parametrize("name", CAUSAL)
@pytest.mark.parametrize("padded", [False, True])
def test_equals_a_prefix_put_in_the_models_own_cache(name: str, padded: bool) -> None:
    """Reference: the same prefixes written into a cache object and given to the unmodified model, with the mask
    widened and the positions given explicitly, yield the same logits."""
    model = BUILDERS[name]()
    delta = small_prefix(model)
    perturb(delta, scale=0.3)
    ids = ids_batch()
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :3] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    ours = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    prefixes = delta.prefix_tensors()
    delta.detach()
    cache = prefix_cache([prefixes[site] for site in delta.modified_modules], batch=2)
    wide = torch.cat([torch.ones(2, 3, dtype=mask.dtype), mask], dim=1)
    kwarg = hf_compat.cache_parameter(model)
    reference = model(input_ids=ids, attention_mask=wide, position_ids=positions, **{kwarg: cache}).logits
    keep = mask.bool()
    assert_same_function(ours[keep], reference[keep], model=model)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_eager_and_sdpa_attention_agree(name: str) -> None:
    outs = []
    for impl in ("eager", "sdpa"):
        model = BUILDERS[name]()
        model.set_attn_implementation(impl)
        torch.manual_seed(3)
        delta = small_prefix(model)
        perturb(delta, scale=0.3)
        ids = ids_batch()
        mask = torch.ones_like(ids)
        mask[1, -2:] = 0
        outs.append(run(name, model, ids, mask))
    assert_same_function(outs[0], outs[1], model=model)


# ---------------------------------------------------------------------------------------------------- padding
@pytest.mark.parametrize("name", list(BUILDERS))
def test_without_mask_equals_all_ones_mask(name: str) -> None:
    model = BUILDERS[name]()
    delta = small_prefix(model)
    perturb(delta, scale=0.3)
    ids = ids_batch()
    assert_same_function(run(name, model, ids, None), run(name, model, ids, torch.ones_like(ids)), model=model)


@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_equals_each_sequence_alone(name: str, side: str) -> None:
    if side == "left" and name not in CAUSAL:
        pytest.skip("encoders pad on the right (absolute / relative positions); left padding is the decoders' case")
    model = BUILDERS[name]()
    delta = small_prefix(model)
    perturb(delta, scale=0.3)
    lengths = [7, 4]
    g = torch.Generator().manual_seed(9)
    seqs = [torch.randint(3, VOCAB, (n,), generator=g) for n in lengths]
    pad_id = 1
    ids = torch.full((2, 7), pad_id)
    mask = torch.zeros(2, 7, dtype=torch.long)
    for i, seq in enumerate(seqs):
        sl = slice(0, len(seq)) if side == "right" else slice(7 - len(seq), 7)
        ids[i, sl], mask[i, sl] = seq, 1
    decoder = ids_batch(seed=5, batch=2, length=4)
    extra = {"position_ids": (mask.cumsum(-1) - 1).clamp(min=0)} if name in CAUSAL else {}
    if name in ENC_DEC:
        extra = {"decoder_input_ids": decoder}
    batched = real_positions(name, run(name, model, ids, mask, **extra), mask)
    for i, seq in enumerate(seqs):
        own = {"decoder_input_ids": decoder[i : i + 1]} if name in ENC_DEC else {}
        alone = run(name, model, seq[None], torch.ones(1, len(seq), dtype=torch.long), **own)[0]
        assert_same_function(batched[i], alone, model=model)


# ---------------------------------------------------------------------------------------------------- generate
def generation_inputs(name: str) -> dict[str, torch.Tensor]:
    ids = ids_batch(seed=4, length=6)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def greedy(model: nn.Module, inputs: dict[str, torch.Tensor], steps: int = 5, **kwargs):
    return model.generate(
        **inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, num_beams=1, output_logits=True,
        return_dict_in_generate=True, **kwargs,
    )


def full_step_logits(name: str, model: nn.Module, inputs: dict[str, torch.Tensor], sequences: torch.Tensor, step: int) -> torch.Tensor:
    """The last-position logits of one full forward over everything generated before ``step`` (no cache)."""
    if name in ENC_DEC:
        return model(**inputs, decoder_input_ids=sequences[:, : step + 1]).logits[:, -1]
    seq = sequences[:, : inputs["input_ids"].shape[1] + step]
    return model(input_ids=seq, attention_mask=torch.ones_like(seq), use_cache=False).logits[:, -1]


def check_generation(name: str, model: nn.Module, delta: object, steps: int = 5) -> None:
    inputs = generation_inputs(name)
    base = greedy(model, inputs, steps)
    delta.attach() if delta.state == "detached" else None  # type: ignore[attr-defined]
    out = greedy(model, inputs, steps)
    first = full_step_logits(name, model, inputs, out.sequences, 0)
    assert_same_function(out.logits[0], first, model=model)
    # far beyond the 1e-5 agreement above: generate() used the delta
    assert not torch.allclose(out.logits[0], base.logits[0], rtol=1e-3, atol=1e-3), "generate() ignored the delta"
    for step in range(1, steps):
        assert_same_function(out.logits[step], full_step_logits(name, model, inputs, out.sequences, step), model=model)
    beams = model.generate(**inputs, max_new_tokens=3, num_beams=3, do_sample=False)
    assert beams.shape[0] == 2 and torch.isfinite(beams.float()).all()


@pytest.mark.parametrize("name", ["gpt2", "llama", "t5", "bart"])
@pytest.mark.parametrize("reparameterize", [True, False])
def test_generate_uses_the_prefix_and_the_cache_matches_recomputation(name: str, reparameterize: bool) -> None:
    model = BUILDERS[name]()
    delta = small_prefix(model, reparameterize=reparameterize)
    perturb(delta, scale=0.5)
    delta.detach()
    check_generation(name, model, delta)


def test_generate_with_left_padding_matches_each_prompt_alone() -> None:
    model = tiny_llama()
    delta = small_prefix(model)
    perturb(delta, scale=0.5)
    ids = torch.full((2, 6), 0)
    mask = torch.zeros_like(ids)
    prompts = [ids_batch(seed=6, batch=1, length=6)[0], ids_batch(seed=7, batch=1, length=3)[0]]
    for i, p in enumerate(prompts):
        ids[i, 6 - len(p):], mask[i, 6 - len(p):] = p, 1
    out = greedy(model, {"input_ids": ids, "attention_mask": mask}, 4)
    for i, p in enumerate(prompts):
        alone = greedy(model, {"input_ids": p[None], "attention_mask": torch.ones(1, len(p), dtype=torch.long)}, 4)
        assert torch.equal(out.sequences[i, 6:], alone.sequences[0, len(p):])
        for step in range(4):
            assert_same_function(out.logits[step][i], alone.logits[step][0], model=model)


def test_deprecated_cache_keyword_still_gets_the_prefix() -> None:
    """Incremental decoding driven by hand with the old ``past_key_values`` keyword equals recomputation."""
    model = tiny_gpt2()
    delta = small_prefix(model)
    perturb(delta, scale=0.5)
    ids = ids_batch(length=5)
    out = model(input_ids=ids[:, :4], use_cache=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the alias is announced for removal; it must work until then
        step = model(input_ids=ids[:, 4:], past_key_values=out.past_key_values, use_cache=True).logits[:, -1]
    assert_same_function(step, model(input_ids=ids).logits[:, -1], model=model)


# ---------------------------------------------------------------------------------------------------- folding
@pytest.mark.parametrize("name", ["llama", "t5"])
def test_fold_reparameterization_is_exact_and_saves_only_prefixes(name: str, tmp_path) -> None:
    model = BUILDERS[name]()
    delta = small_prefix(model)
    perturb(delta, scale=0.3)
    ids = ids_batch()
    before = run(name, model, ids, torch.ones_like(ids))
    mlp = delta.num_delta_parameters()
    delta.fold_reparameterization()
    assert delta.shared is None and delta.config.reparameterize is False
    assert not hasattr(model, "prefix_shared")
    assert torch.equal(run(name, model, ids, torch.ones_like(ids)), before)
    per_site = sum(2 * s.module.geometry.num_kv_heads * s.module.geometry.head_dim * 3 for s in delta.sites)
    assert delta.num_delta_parameters() == per_site < mlp
    delta.save_finetuned(tmp_path / "folded")
    fresh = BUILDERS[name]()
    loaded = AutoDeltaModel.from_finetuned(tmp_path / "folded", backbone_model=fresh)
    assert isinstance(loaded, PrefixModel) and loaded.shared is None
    assert torch.equal(run(name, fresh, ids, torch.ones_like(ids)), before)
    delta.detach()
    assert delta.fold_reparameterization() is delta  # nothing left to fold


def test_fold_while_detached_then_attach() -> None:
    model = tiny_gpt2()
    delta = small_prefix(model)
    perturb(delta, scale=0.3)
    ids = ids_batch()
    attached = model(input_ids=ids).logits
    delta.detach()
    delta.fold_reparameterization()
    delta.attach()
    assert torch.equal(model(input_ids=ids).logits, attached)


# ---------------------------------------------------------------------------------------------------- bad inputs
def test_bad_inputs_raise_clear_errors_and_change_nothing() -> None:
    model = tiny_t5()
    keys, hooks, state = list(model.state_dict()), hook_counts(model), snapshot(model)
    with pytest.raises(UnsupportedModuleError, match="takes no KV cache"):
        PrefixModel(model, modified_modules=["DenseReluDense.wi"])
    with pytest.raises(UnsupportedModuleError, match="share one position bias"):
        PrefixModel(model, modified_modules=["encoder.block.1.layer.0.SelfAttention"])
    with pytest.raises(ModuleMatchError):
        PrefixModel(model, modified_modules=["no_such_module"])
    for bad in ({"prefix_token_num": 0}, {"mid_dim": -1}, {"reparameterize": "yes"}):
        with pytest.raises(DeltaConfigError):
            PrefixModel(model, **bad)
    assert list(model.state_dict()) == keys and hook_counts(model) == hooks
    assert_state_equal(model, state)


def test_selected_layers_only_and_exclusion() -> None:
    model = tiny_llama()
    only = small_prefix(model, modified_modules=["layers.1.self_attn"])
    assert only.modified_modules == ["model.layers.1.self_attn"]
    only.detach()
    excluded = small_prefix(model, exclude_modules=["layers.0"])
    assert excluded.modified_modules == ["model.layers.1.self_attn"]


def test_unknown_cache_use_and_mask_formats_raise() -> None:
    key = torch.zeros(2, 3, 4)
    proxy = hf_compat.PrefixedCache(None, key, key, "layer")
    with pytest.raises(DeltaError, match="cache.reorder_cache"):
        proxy.reorder_cache(torch.tensor([0]))
    with pytest.raises(DeltaError, match="expects"):
        proxy.update(torch.zeros(1, 5, 2, 4), torch.zeros(1, 5, 2, 4), 0)
    with pytest.raises(DeltaError, match="3-D attention mask"):
        hf_compat.extend_attention_mask(torch.ones(1, 2, 3), 2, "layer")
    bool_mask = torch.tensor([[[[True, False]]]])
    assert torch.equal(hf_compat.extend_attention_mask(bool_mask, 1, "x"), torch.tensor([[[[True, True, False]]]]))
    float_mask = torch.tensor([[[[0.0, -1e9]]]])
    assert torch.equal(hf_compat.extend_attention_mask(float_mask, 2, "x"), torch.tensor([[[[0.0, 0.0, 0.0, -1e9]]]]))


def test_training_moves_the_output_towards_a_target() -> None:
    model = tiny_llama()
    delta = small_prefix(model)
    delta.freeze_module()
    ids = ids_batch(length=6)
    labels = torch.full_like(ids, 7)
    opt = torch.optim.Adam(delta.parameters(), lr=3e-2)
    losses = []
    for _ in range(40):
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3


@pytest.mark.parametrize("stack", ["encoder", "decoder"])
def test_t5_relative_positions_of_real_tokens_are_unchanged(stack: str) -> None:
    """T5's first layer returns its position bias: the real keys' part must equal the base model's (the prefix
    counts in front, so real tokens keep their relative distances)."""
    model = tiny_t5()
    attention = getattr(model, stack).block[0].layer[0].SelfAttention
    seen = []
    handle = attention.register_forward_hook(lambda module, args, out: seen.append(out[1]))
    ids = ids_batch()
    model(input_ids=ids, decoder_input_ids=ids_batch(seed=5, length=4))
    small_prefix(model)
    model(input_ids=ids, decoder_input_ids=ids_batch(seed=5, length=4))
    handle.remove()
    base, prefixed = seen
    assert prefixed.shape[-1] == base.shape[-1] + 3
    torch.testing.assert_close(prefixed[..., 3:], base.expand_as(prefixed[..., 3:]))


def test_prefix_generation_example_tiny(capsys) -> None:
    """examples/prefix_generation.py --tiny: the frozen random Llama learns to continue the cycle with the prefix
    alone, and folding the MLP away changes no generated token."""
    import importlib.util

    path = REPO_ROOT / "examples" / "prefix_generation.py"
    spec = importlib.util.spec_from_file_location("prefix_generation", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--tiny"]) == 0
    out = capsys.readouterr().out
    assert "learned the pattern" in out and "same tokens: True; reloaded into a fresh backbone, same tokens: True" in out


def test_no_grad_prefix_cache_follows_parameter_changes() -> None:
    """Under no_grad the MLP output is reused; any change of the MLP (optimizer step, load, dtype) is seen."""
    model = tiny_llama()
    delta = small_prefix(model)
    ids = ids_batch()
    with torch.no_grad():
        first = model(input_ids=ids).logits
        again = model(input_ids=ids).logits
        assert torch.equal(first, again)
        delta.shared.out_bias[1].add_(0.5)  # in place, as an optimizer does
        changed = model(input_ids=ids).logits
    assert not torch.allclose(changed, first)
    torch.testing.assert_close(model(input_ids=ids).logits, changed)  # with autograd: computed afresh, same values
    model.to(torch.float64)
    with torch.no_grad():
        assert model(input_ids=ids).logits.dtype == torch.float64


@pytest.mark.slow  # a benchmark run with timing rounds (about 5 CPU seconds); the folding it checks is tested above
def test_prefix_benchmark_quick(tmp_path) -> None:
    """benchmarks/prefix.py --quick runs and writes a consistent report (no timing is asserted)."""
    import importlib.util
    import json
    import math
    import sys

    path = REPO_ROOT / "benchmarks" / "prefix.py"
    spec = importlib.util.spec_from_file_location("deltakit_bench_prefix", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["deltakit_bench_prefix"] = module
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    try:
        assert module.main(["--quick", "--quiet", "--output", str(tmp_path / "prefix.json")]) == 0
    finally:
        torch.set_num_threads(threads)
    data = json.loads((tmp_path / "prefix.json").read_text())
    gen, train = data["generation"], data["training_step"]
    assert gen["folded_generates_same_tokens"] is True and gen["prefix_changes_generation"] is True
    for section, key in ((train, "prefix/frozen"), (gen, "prefix/base"), (gen, "prefix-folded/base")):
        ratio = section["ratios"][key]["cpu"]
        assert ratio["n"] == 3 and math.isfinite(ratio["median"]) and ratio["median"] > 0
    assert train["sites"] == 2 and train["prefix_parameters"] > 0
    assert "| generation | prefix / base |" in (tmp_path / "prefix.md").read_text()


@pytest.mark.parametrize("method", ["prefix", "soft_prompt"])
def test_gradient_checkpointing_gives_the_same_gradients(method: str) -> None:
    """Activation checkpointing recomputes each layer during backward: the prompt delta must be recomputed the
    same way (same values, same saved tensors), and the gradients must equal those of a plain backward."""
    from deltakit import SoftPromptModel

    grads = []
    for checkpointing in (False, True):
        model = tiny_llama().train()
        torch.manual_seed(5)
        delta = small_prefix(model) if method == "prefix" else SoftPromptModel(model, soft_token_num=3)
        delta.freeze_module()
        if checkpointing:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # renamed in late 5.x; the old name works in all 5.x
                model.gradient_checkpointing_enable()
        ids = ids_batch()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append([p.grad.clone() for p in delta.parameters()])
    assert_same_gradients(grads[1], grads[0], model=model, tokens=64)


def test_a_cache_object_of_unknown_form_is_refused_clearly() -> None:
    model = tiny_gpt2()
    small_prefix(model)
    attention = model.transformer.h[0].attn
    with pytest.raises(DeltaError, match=r"without update\(\).*transformers"):
        attention(torch.randn(1, 3, 32), **{hf_compat.cache_parameter(attention): object()})


# ---------------------------------------------------------------------------------------------------- stacking
@pytest.mark.parametrize("name", CAUSAL)
@pytest.mark.parametrize("padded", [False, True])
def test_two_prefix_deltas_stack_like_one_longer_prefix(name: str, padded: bool) -> None:
    """The later delta's prefix goes in front of the earlier one's: [p2; p1; tokens], checked against the model's
    own cache holding that concatenation."""
    model = BUILDERS[name]()
    first = small_prefix(model, prefix_token_num=2)
    second = small_prefix(model, prefix_token_num=3, name="prefix2")
    perturb(first, seed=1, scale=0.3)
    perturb(second, seed=2, scale=0.3)
    ids = ids_batch()
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :3] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    p1, p2 = first.prefix_tensors(), second.prefix_tensors()
    second.detach()
    first.detach()
    both = [tuple(torch.cat([p2[site][i], p1[site][i]], dim=1) for i in (0, 1)) for site in first.modified_modules]
    cache = prefix_cache(both, batch=2)  # [p2; p1] per layer
    wide = torch.cat([torch.ones(2, 5, dtype=mask.dtype), mask], dim=1)
    kwarg = hf_compat.cache_parameter(model)
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=wide, position_ids=positions, **{kwarg: cache}).logits
    keep = mask.bool()
    assert_same_function(ours[keep], reference[keep], model=model)


@pytest.mark.parametrize("name", ["gpt2", "llama", "t5", "bart"])
def test_two_prefix_deltas_in_generate_match_recomputation(name: str) -> None:
    model = BUILDERS[name]()
    first = small_prefix(model, prefix_token_num=2)
    second = small_prefix(model, prefix_token_num=3, name="prefix2")
    perturb(first, seed=1, scale=0.5)
    perturb(second, seed=2, scale=0.5)
    inputs = generation_inputs(name)
    with torch.no_grad():
        out = greedy(model, inputs, 4)
        for step in range(4):
            assert_same_function(out.logits[step], full_step_logits(name, model, inputs, out.sequences, step), model=model)
        second.detach()
        only_first = greedy(model, inputs, 4)
    assert not torch.allclose(out.logits[0], only_first.logits[0], rtol=1e-3, atol=1e-3)  # the second one acts


def tiny_gpt_neox() -> nn.Module:
    from transformers import GPTNeoXForCausalLM

    from deltakit.structures import tiny_config

    torch.manual_seed(0)
    return GPTNeoXForCausalLM(tiny_config("gpt_neox")).eval()


def tiny_falcon() -> nn.Module:
    from transformers import FalconConfig, FalconForCausalLM

    torch.manual_seed(0)
    cfg = FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB)  # multi-query
    return FalconForCausalLM(cfg).eval()


@pytest.mark.parametrize("build", [tiny_gpt_neox, tiny_falcon], ids=["gpt_neox", "falcon"])
def test_attention_taking_layer_past_gets_the_prefix(build) -> None:
    """GPT-NeoX and Falcon attention take their cache as ``layer_past``: the default positions are those modules
    (not the whole base model), Falcon's single key/value head is respected, and the result equals the prefix put
    in the model's own cache; generate() with the cache equals recomputation."""
    model = build()
    delta = small_prefix(model, prefix_token_num=2)
    perturb(delta, scale=0.3)
    assert [type(s.host).__name__ for s in delta.sites] == [type(s.host).__name__ for s in delta.sites[:1]] * 2
    assert type(delta.sites[0].host).__name__.endswith("Attention")
    ids = ids_batch()
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    prefixes = delta.prefix_tensors()
    delta.detach()
    cache = prefix_cache([prefixes[site] for site in delta.modified_modules], batch=2)
    positions = torch.arange(ids.shape[1]).expand(2, -1)
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=torch.ones(2, 2 + ids.shape[1], dtype=torch.long),
                          position_ids=positions, **{hf_compat.cache_parameter(model): cache}).logits
    assert_same_function(ours, reference, model=model)
    delta.attach()
    inputs = generation_inputs("llama")
    with torch.no_grad():
        out = greedy(model, inputs, 4)
        for step in range(4):
            assert_same_function(out.logits[step], full_step_logits("llama", model, inputs, out.sequences, step), model=model)


@pytest.mark.parametrize("frozen", [True, False])
def test_fold_keeps_the_delta_frozen_or_trainable(frozen: bool) -> None:
    model = tiny_llama()
    delta = small_prefix(model)
    if frozen:
        delta.freeze_module(exclude=[])  # everything frozen, the delta included
    delta.fold_reparameterization()
    assert all(p.requires_grad is not frozen for p in delta.parameters())


# ---------------------------------------------------------------------------------------------- P-tuning v2 alias
def test_p_tuning_v2_is_the_prefix_method_with_direct_prefixes(tmp_path) -> None:
    """PTuningV2Model is PrefixModel with P-tuning v2's default (no MLP): same delta_type, no second registry entry,
    the same computation as PrefixModel(reparameterize=False), prefix checkpoints that every loader reads."""
    from deltakit import PTuningV2Config, PTuningV2Model
    from deltakit.registry import CONFIG_REGISTRY, DELTA_REGISTRY

    assert PTuningV2Model.delta_type == PTuningV2Config.delta_type == "prefix"
    assert DELTA_REGISTRY["prefix"] is PrefixModel and PTuningV2Model not in DELTA_REGISTRY.values()
    assert PTuningV2Config not in CONFIG_REGISTRY.values()

    model = tiny_gpt2()
    torch.manual_seed(7)
    delta = PTuningV2Model(model, prefix_token_num=3)
    assert isinstance(delta, PrefixModel) and delta.config.reparameterize is False and delta.shared is None
    assert {n.rpartition(".")[2] for n, _ in delta.named_parameters()} == {"prefix_key", "prefix_value"}
    ids = ids_batch()
    with torch.no_grad():
        ours = model(input_ids=ids).logits
    other = tiny_gpt2()
    torch.manual_seed(7)
    PrefixModel(other, prefix_token_num=3, reparameterize=False)
    with torch.no_grad():
        assert torch.equal(other(input_ids=ids).logits, ours)  # the same operations, run twice

    delta.save_finetuned(tmp_path / "ptv2")
    for loader in (AutoDeltaModel.from_finetuned, PrefixModel.from_finetuned, PTuningV2Model.from_finetuned):
        fresh = tiny_gpt2()
        loaded = loader(tmp_path / "ptv2", backbone_model=fresh)
        assert type(loaded) is PrefixModel and loaded.config.reparameterize is False
        with torch.no_grad():
            assert torch.equal(fresh(input_ids=ids).logits, ours)
    # The MLP is still available, and the configs are interchangeable with the prefix ones.
    assert PTuningV2Model(tiny_gpt2(), reparameterize=True, embed_dim=8, mid_dim=8).shared is not None
    from_dict = PTuningV2Model.from_config({"prefix_token_num": 2}, tiny_gpt2())
    assert from_dict.config.reparameterize is False
    assert AutoDeltaModel.from_config(PTuningV2Config(prefix_token_num=2), tiny_gpt2()).config.reparameterize is False
