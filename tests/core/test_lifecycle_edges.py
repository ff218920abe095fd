"""Lifecycle edges (issue 10, sections 2, 4 and 6): merge stacks with inexact unmerges, deep copies of a model with
its delta, LoRA on scaled word embeddings, adapters on modules that are not hidden_size wide, the safe merge mode
and inexact unmerges in low precision."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from transformers import BartConfig, BartModel, GemmaConfig, GemmaModel

from deltakit import (
    AdapterModel,
    BitFitModel,
    CompacterModel,
    DeltaError,
    DeltaStateError,
    LoraModel,
    LowRankAdapterModel,
    ParallelAdapterModel,
    PrefixModel,
    SoftPromptModel,
    UnsupportedModuleError,
)
from deltakit.structures import tiny_model

from tests.helpers import VOCAB, assert_state_equal, hook_counts, perturb, snapshot, tiny_bert, tiny_llama
from tests.tolerances import assert_same_function

IDS = torch.randint(2, VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=torch.ones_like(IDS)).logits


def query_weight(model: nn.Module) -> torch.Tensor:
    return model.bert.encoder.layer[0].attention.self.query.weight


# ------------------------------------------------------------------ a merge stack with an inexact unmerge on top
@pytest.mark.parametrize("exact_b", [False, True])
def test_an_exact_merge_unmerges_after_a_later_merge_was_undone_either_way(exact_b: bool) -> None:
    model = tiny_bert()
    original = snapshot(model)
    hooks = hook_counts(model)
    a = LoraModel(model, modified_modules=["query"], name="a")
    b = LoraModel(model, modified_modules=["query"], name="b")
    perturb(a, seed=1, scale=0.2)
    perturb(b, seed=2, scale=0.2)
    a.merge()
    b.merge(exact_unmerge=exact_b)
    b.unmerge()  # the weight is what a's merge left (up to rounding when inexact)
    a.unmerge()  # was refused ("modified after the merge") after an inexact b, and a was stuck merged
    a.detach()
    b.detach()
    assert_state_equal(model, original)  # a's copy was restored: exact whatever b did
    assert hook_counts(model) == hooks


def test_an_optimizer_step_on_a_merged_weight_still_blocks_the_exact_unmerge() -> None:
    model = tiny_bert()
    a = LoraModel(model, modified_modules=["query"])
    perturb(a)
    a.merge()
    with torch.no_grad():
        query_weight(model).add_(1.0)  # not a delta's round trip: restoring the copy would discard this
    with pytest.raises(DeltaStateError, match="modified after the merge"):
        a.unmerge()
    assert a.state == "merged"


# ------------------------------------------------------------------ copy.deepcopy of a model with its delta
def _methods() -> dict[str, object]:
    return {
        "lora": lambda m: LoraModel(m, modified_modules=["query", "value", "word_embeddings"], lora_r=4),
        "bitfit": lambda m: BitFitModel(m, modified_modules=["query", "LayerNorm"]),
        "adapter": lambda m: AdapterModel(m, bottleneck_dim=4),
        "low_rank_adapter": lambda m: LowRankAdapterModel(m, reduction_factor=8),
        "compacter": lambda m: CompacterModel(m, reduction_factor=4),  # shared rules on the backbone root
        "parallel_adapter": lambda m: ParallelAdapterModel(m, bottleneck_dim=4),  # capture hooks on another module
        "prefix": lambda m: PrefixModel(m, prefix_token_num=2, embed_dim=8, mid_dim=8),
        "soft_prompt": lambda m: SoftPromptModel(m, soft_token_num=2),
    }


@pytest.mark.parametrize("method", list(_methods()))
@pytest.mark.parametrize("how", ["tuple", "holder", "delta alone"])
def test_deepcopy_of_a_model_with_its_delta_is_a_full_independent_delta(method: str, how: str) -> None:
    model = tiny_bert()
    bare = logits(model)
    delta = _methods()[method](model)
    perturb(delta, scale=0.1)
    attached = logits(model)
    if how == "tuple":
        model2, delta2 = copy.deepcopy((model, delta))
    elif how == "holder":
        holder = copy.deepcopy({"model": model, "delta": delta})
        model2, delta2 = holder["model"], holder["delta"]
    else:
        delta2 = copy.deepcopy(delta)  # a delta always brings (a copy of) its backbone along
        model2 = delta2.backbone_model
    assert model2 is not model and delta2.backbone_model is model2
    assert all(site.host is model2.get_submodule(site.name) for site in delta2.sites)
    assert torch.equal(logits(model2), attached)
    delta2.detach()
    assert torch.equal(logits(model2), bare) and hook_counts(model2) == hook_counts(tiny_bert())
    assert torch.equal(logits(model), attached)  # the original is untouched
    delta2.attach()
    assert torch.equal(logits(model2), attached)
    if method in ("lora", "bitfit"):
        delta2.merge()  # was refused: "another delta is applied before it" (keys named the original's modules)
        assert_same_function(logits(model2), attached, model=model2)
        delta2.unmerge()
    delta2.detach()
    delta.detach()
    assert_state_equal(model2, snapshot(model))


@pytest.mark.parametrize("exact", [True, False])
def test_deepcopy_of_a_merged_delta_unmerges_like_the_original(exact: bool) -> None:
    model = tiny_bert()
    original = snapshot(model)
    delta = LoraModel(model, modified_modules=["query"])
    perturb(delta, scale=0.1)
    delta.merge(exact_unmerge=exact)
    model2, delta2 = copy.deepcopy((model, delta))
    assert delta2.state == "merged"
    delta2.unmerge()
    delta.unmerge()
    assert_state_equal(model2, snapshot(model))  # the copy did the same operations as the original
    delta2.detach()
    if exact:
        assert_state_equal(model2, original)


def test_deepcopy_keeps_the_refusals_of_the_original() -> None:
    model = tiny_bert()
    delta = LoraModel(model, modified_modules=["query"])
    perturb(delta)
    delta.merge()
    with torch.no_grad():
        query_weight(model).add_(1.0)  # modified after the merge: unmerge must stay refused in the copy too
    model2, delta2 = copy.deepcopy((model, delta))
    with pytest.raises(DeltaStateError, match="modified after the merge"):
        delta2.unmerge()
    model3 = tiny_bert()
    inexact = LoraModel(model3, modified_modules=["query"])
    inexact.merge(exact_unmerge=False)
    with torch.no_grad():
        inexact.sites[0].module.lora_B.add_(1.0)  # the delta changed while merged
    _, copied = copy.deepcopy((model3, inexact))
    with pytest.raises(DeltaStateError, match="parameters changed since the merge"):
        copied.unmerge()


# ------------------------------------------------------------------ LoRA on a scaled word embedding
def _tiny_gemma() -> nn.Module:
    torch.manual_seed(0)
    cfg = GemmaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        head_dim=16, vocab_size=VOCAB,
    )
    return GemmaModel(cfg).eval()


def _tiny_bart() -> nn.Module:
    torch.manual_seed(0)
    cfg = BartConfig(
        d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=VOCAB, scale_embedding=True,
        tie_word_embeddings=False,  # separate encoder embedding: merging into a tied one is refused
    )
    return BartModel(cfg).eval()


SCALED = {"gemma": (_tiny_gemma, "embed_tokens"), "bart": (_tiny_bart, "encoder.embed_tokens")}


def _hidden(model: nn.Module) -> torch.Tensor:
    extra = {"decoder_input_ids": IDS[:, :4]} if isinstance(model, BartModel) else {}
    with torch.no_grad():
        return model(input_ids=IDS, **extra).last_hidden_state


@pytest.mark.parametrize("arch", list(SCALED))
def test_lora_on_a_scaled_embedding_gives_the_same_outputs_merged_and_attached(arch: str) -> None:
    build, site = SCALED[arch]
    model = build()
    assert getattr(model.get_submodule(site), "embed_scale") is not None  # the host scales its lookup
    delta = LoraModel(model, modified_modules=[site], lora_r=4)
    perturb(delta, scale=0.3)
    attached = _hidden(model)
    delta.merge()  # folds (alpha / r) (B A)^T into E, which the host then scales: the hook must scale the same
    merged = _hidden(model)
    assert_same_function(merged, attached, model=model)
    delta.unmerge()
    assert torch.equal(_hidden(model), attached)


@pytest.mark.parametrize("arch", list(SCALED))
def test_lora_on_a_scaled_embedding_agrees_with_peft_both_ways(arch: str, tmp_path) -> None:
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel, get_peft_model

    from deltakit.integrations.peft import export_to_peft, from_peft

    build, site = SCALED[arch]
    model = build()
    delta = LoraModel(model, modified_modules=[site], lora_r=4, lora_alpha=8)
    perturb(delta, scale=0.3)
    ours = _hidden(model)
    # deltakit -> PEFT: the exported factors compute the same function under PEFT, which scales the LoRA term by
    # the embedding's embed_scale.
    export_to_peft(delta, tmp_path / "out")
    theirs = PeftModel.from_pretrained(build(), str(tmp_path / "out")).eval()
    assert_same_function(_hidden(theirs.base_model.model), ours, model=model)
    # PEFT -> deltakit
    peft_model = get_peft_model(build(), PeftLoraConfig(r=4, lora_alpha=8, target_modules=[site])).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:  # PEFT's embedding B starts at zero: give both factors values
                param.copy_(torch.randn(param.shape, generator=g) * 0.3)
    peft_model.save_pretrained(str(tmp_path / "in"))
    loaded = build()
    from_peft(tmp_path / "in", loaded)
    assert_same_function(_hidden(loaded), _hidden(peft_model.base_model.model), model=loaded)


# ------------------------------------------------------------------ adapters on modules not hidden_size wide
ADAPTERS = {
    "adapter": lambda m, mods: AdapterModel(m, modified_modules=mods, bottleneck_dim=4),
    "low_rank_adapter": lambda m, mods: LowRankAdapterModel(m, modified_modules=mods, reduction_factor=8),
    "compacter": lambda m, mods: CompacterModel(m, modified_modules=mods, reduction_factor=4),
    "parallel_adapter": lambda m, mods: ParallelAdapterModel(m, modified_modules=mods, bottleneck_dim=4),
}


@pytest.mark.parametrize("method", list(ADAPTERS))
@pytest.mark.parametrize("where", ["intermediate", "intermediate.dense"])
def test_adapters_size_themselves_from_the_hosts_real_output(method: str, where: str) -> None:
    model = tiny_bert()  # intermediate: 64 wide, hidden 32
    bare = logits(model)
    delta = ADAPTERS[method](model, [where])
    assert torch.equal(logits(model), bare)  # every forward failed in the hook with a shape error before
    perturb(delta, scale=0.1)
    assert not torch.allclose(logits(model), bare)
    delta.detach()
    assert torch.equal(logits(model), bare)


@pytest.mark.parametrize("method", list(ADAPTERS))
def test_adapters_refuse_a_convolution_before_changing_anything(method: str) -> None:
    model = tiny_model("vit")
    state, hooks = snapshot(model), hook_counts(model)
    with pytest.raises(UnsupportedModuleError, match=r"patch_embeddings\.projection.*Conv2d.*channels-first"):
        ADAPTERS[method](model, ["patch_embeddings.projection"])
    assert_state_equal(model, state)
    assert hook_counts(model) == hooks


class _OddBlock(nn.Module):
    """A block whose last registered Linear is not the one producing its output."""

    def __init__(self) -> None:
        super().__init__()
        self.main = nn.Linear(8, 8)
        self.side = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def test_an_adapter_whose_host_output_is_not_what_its_layers_say_fails_with_a_clear_error() -> None:
    model = nn.Sequential(_OddBlock())
    AdapterModel(model, modified_modules=["0"], bottleneck_dim=2)
    with pytest.raises(DeltaError, match=r"built for outputs 3 wide.*shape \(2, 8\)"):
        model(torch.randn(2, 8))


def test_a_parallel_adapter_cannot_read_token_ids() -> None:
    model = tiny_bert()
    state = snapshot(model)
    with pytest.raises(UnsupportedModuleError, match="token ids"):
        ParallelAdapterModel(model, modified_modules=["embeddings.LayerNorm"], input_modules=["word_embeddings"])
    assert_state_equal(model, state)


# ------------------------------------------------------------------ merge(safe=True)
def assert_backbone_equal(model: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    """``assert_state_equal`` for the backbone's own tensors (a broken delta's NaN never equals itself)."""
    state = model.state_dict()
    assert list(state) == list(expected)
    for key, value in expected.items():
        if ".lora." not in key:
            assert torch.equal(state[key], value), key


def _broken_lora(model: nn.Module, value: float, seed: int = 0) -> LoraModel:
    delta = LoraModel(model, modified_modules=["query"], lora_r=4)
    perturb(delta, scale=0.1)
    with torch.no_grad():
        factor = delta.sites[-1].module.lora_B
        flat = factor.view(-1)
        flat[seed % flat.numel()] = value
    return delta


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_safe_merge_refuses_a_non_finite_delta_and_changes_nothing(value: float) -> None:
    model = tiny_bert()
    delta = _broken_lora(model, value)
    state, hooks = snapshot(model), hook_counts(model)
    with pytest.raises(DeltaStateError, match=r"layer\.1\.attention\.self\.query\.weight would not be finite.*delta"):
        delta.merge()  # safe=True is the default
    assert delta.state == "attached"
    assert_backbone_equal(model, state)  # not even the first site (merged before the broken one) was changed
    assert hook_counts(model) == hooks
    delta.merge(safe=False)  # the caller's choice: no check
    assert not torch.isfinite(model.bert.encoder.layer[1].attention.self.query.weight).all()
    delta.unmerge()
    assert_backbone_equal(model, state)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=st.sampled_from([math.nan, math.inf, -math.inf]), seed=st.integers(0, 10_000), exact=st.booleans())
def test_safe_merge_refuses_a_non_finite_entry_anywhere(value: float, seed: int, exact: bool) -> None:
    model = tiny_bert()
    delta = _broken_lora(model, value, seed)
    state = snapshot(model)
    with pytest.raises(DeltaStateError, match="would not be finite"):
        delta.merge(exact_unmerge=exact)
    assert_backbone_equal(model, state)


def test_safe_merge_names_an_overflow_and_a_broken_host() -> None:
    model = tiny_bert().half()
    delta = LoraModel(model, modified_modules=["query"], lora_r=4)
    perturb(delta, scale=0.1)
    with torch.no_grad():
        query_weight(model)[0, 0] = 65504.0  # float16's largest: any positive update overflows it
        delta.sites[0].module.lora_B.fill_(10.0)
        delta.sites[0].module.lora_A.fill_(10.0)
    state = snapshot(model)
    with pytest.raises(DeltaStateError, match="overflows torch.float16"):
        delta.merge()
    assert_state_equal(model, state)
    model = tiny_bert()
    delta = LoraModel(model, modified_modules=["query"], lora_r=4)
    with torch.no_grad():
        query_weight(model)[0, 0] = math.nan
    with pytest.raises(DeltaStateError, match="host weight itself already holds NaN"):
        delta.merge()


# ------------------------------------------------------------------ inexact unmerge and precision
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_an_inexact_merge_in_low_precision_is_refused_with_the_fix(dtype: torch.dtype) -> None:
    model = tiny_llama().to(dtype)
    delta = LoraModel(model, lora_r=4)
    perturb(delta, scale=2.0)  # an update much larger than the weights: (W + d) - d would round W away
    state, hooks = snapshot(model), hook_counts(model)
    with pytest.raises(DeltaStateError, match=r"exact_unmerge=False.*low bits.*exact_unmerge=True"):
        delta.merge(exact_unmerge=False)
    assert delta.state == "attached" and hook_counts(model) == hooks
    assert_state_equal(model, state)
    delta.merge()  # the exact merge keeps a copy: the weights come back bit-for-bit
    delta.unmerge()
    delta.detach()
    assert_state_equal(model, {k: v for k, v in state.items() if ".lora." not in k})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_an_inexact_unmerge_brings_each_entry_back_within_the_stated_tolerance(dtype: torch.dtype) -> None:
    model = tiny_llama().to(dtype)
    delta = LoraModel(model, lora_r=4)
    perturb(delta, scale=2.0)  # large updates: the worst case for (W + d) - d
    weights = {s.name: s.host.weight.detach().clone() for s in delta.sites}
    updates = {s.name: s.module.merge_deltas(s.host)["weight"].detach().to(dtype) for s in delta.sites}
    delta.merge(exact_unmerge=False)
    delta.unmerge()
    u = torch.finfo(dtype).eps / 2
    for site in delta.sites:
        w, d = weights[site.name], updates[site.name]
        bound = u * ((w + d).abs() + w.abs()) * (1 + 4 * u)  # the merge() docstring's two roundings
        assert ((site.host.weight - w).abs() <= bound).all(), site.name


def test_a_routed_adapter_whose_host_output_is_not_what_its_layers_say_fails_with_a_clear_error() -> None:
    from deltakit import DeltaGroup

    model = nn.Sequential(_OddBlock()).eval()
    group = DeltaGroup(model)
    for name in ("a", "b"):
        group.add(AdapterModel(model, modified_modules=["0"], bottleneck_dim=2, name=name).detach())
    with torch.no_grad(), pytest.raises(DeltaError, match=r"routed Adapter.*'0'.*built for outputs 3 wide"):
        with group.route(["a", "b"]):
            model(torch.randn(2, 8))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())  # nothing left behind


# ------------------------------------------------------------------ memory: a dropped delta is freed at once
def test_a_dropped_lora_delta_is_freed_without_the_cycle_collector() -> None:
    # LoRA links sibling sites (q, k, v) through a shared-input group; with strong references both ways that was a
    # cycle, so a delta attached once and then dropped stayed in memory until the cycle collector ran.
    import gc
    import io
    import weakref

    from deltakit import LoraModel
    from tests.helpers import tiny_bert

    model = tiny_bert()
    delta = LoraModel(model, modified_modules=["query", "key", "value"], lora_r=2)
    group = delta.sites[0].module.__dict__["shared_input"]
    assert len(group.sites) == 3  # the siblings are linked (else this test proves nothing)
    copied = copy.deepcopy(model)  # a copy's group links the copies, not the originals
    query = copied.bert.encoder.layer[0].attention.self.query.lora
    assert query.__dict__["shared_input"].sites[0] is query
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)  # and a pickled model keeps its links
    key = loaded.bert.encoder.layer[0].attention.self.key.lora
    assert key.__dict__["shared_input"].sites[1] is key
    delta.detach()
    site = weakref.ref(delta.sites[0].module)
    gc.disable()
    try:
        del delta, group
        assert site() is None
    finally:
        gc.enable()
