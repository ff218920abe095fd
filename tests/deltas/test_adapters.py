"""The adapter family: stacking order, closed-form parameter counts, shared Compacter rules, pairing, errors."""

from __future__ import annotations

import itertools

import pytest
import torch

from deltakit import (
    AdapterModel,
    AutoDeltaModel,
    BitFitModel,
    CompacterModel,
    LowRankAdapterModel,
    ParallelAdapterModel,
    UnsupportedModuleError,
)
from deltakit.checkpoint import read_weights

from tests.helpers import ARCHS, assert_state_equal, hook_counts, perturb, snapshot, tiny_bert


def _reference(model, host, deltas, x):
    """Output with the given deltas composed by hand on ``host`` (no deltakit hook involved)."""
    handle = host.register_forward_hook(lambda m, a, out: _compose(deltas, out))
    try:
        return model(x).logits
    finally:
        handle.remove()


def _compose(deltas, out):
    for delta in deltas:
        out = delta.sites[0].module.adapt(out)
    return out


def test_stacked_adapters_apply_in_attach_order_and_detach_in_any_order() -> None:
    for order in itertools.permutations(range(3)):
        model = tiny_bert()
        x = torch.randint(2, 100, (2, 6))
        target = ["bert.encoder.layer.0.output.dense"]
        deltas = [
            AdapterModel(model, modified_modules=target, bottleneck_dim=4),
            AdapterModel(model, modified_modules=target, bottleneck_dim=3),
            LowRankAdapterModel(model, modified_modules=target, reduction_factor=4, low_rank_rank=2),
        ]
        for i, delta in enumerate(deltas):
            perturb(delta, seed=i)
        host = model.bert.encoder.layer[0].output.dense
        attached = model(x).logits
        for delta in deltas:
            delta.detach()
        base = model(x).logits
        assert torch.equal(_reference(model, host, deltas, x), attached)
        for delta in deltas:
            delta.attach()
        assert torch.equal(model(x).logits, attached)
        remaining = list(deltas)
        for index in order:
            deltas[index].detach()
            remaining.remove(deltas[index])
            if remaining:
                for delta in remaining:
                    delta.detach()
                expected = _reference(model, host, remaining, x)
                for delta in remaining:
                    delta.attach()
                assert torch.equal(model(x).logits, expected)
        assert torch.equal(model(x).logits, base)


def test_stacked_order_equals_hand_composition() -> None:
    model = tiny_bert()
    x = torch.randint(2, 100, (2, 6))
    target = ["bert.encoder.layer.1.output.dense"]
    first = AdapterModel(model, modified_modules=target, bottleneck_dim=4)
    second = LowRankAdapterModel(model, modified_modules=target, reduction_factor=4)
    perturb(first, seed=1)
    perturb(second, seed=2)
    attached = model(x).logits
    first.detach()
    second.detach()
    host = model.bert.encoder.layer[1].output.dense
    assert torch.equal(_reference(model, host, [first, second], x), attached)
    assert not torch.allclose(_reference(model, host, [second, first], x), attached)


# ------------------------------------------------------------------ closed-form parameter counts (from the papers)

D, LAYERS = 32, 2  # tiny BERT: hidden 32, FFN 64, 2 layers; default positions: attn.o and ff.w2 of each layer


def test_adapter_count_is_houlsby_formula() -> None:
    m = 6  # bottleneck; an adapter is d*m + m (down) + m*d + d (up) per position, 2 positions per layer
    delta = AdapterModel(tiny_bert(), bottleneck_dim=m)
    assert delta.num_delta_parameters() == LAYERS * 2 * (2 * D * m + m + D)


def test_parallel_adapter_count_spans_the_ffn() -> None:
    m = 5  # input of ff.w1 (hidden 32) -> output of ff.w2 (hidden 32), one per layer
    delta = ParallelAdapterModel(tiny_bert(), bottleneck_dim=m)
    assert delta.num_delta_parameters() == LAYERS * (D * m + m + m * D + D)
    model = ARCHS["t5"].build()  # T5: encoder (2) and decoder (2) FFN blocks
    assert ParallelAdapterModel(model, bottleneck_dim=m).num_delta_parameters() == 4 * (2 * (32 * m) + m + 32)


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_low_rank_adapter_count(rank: int) -> None:
    m = D // 4
    # W = W_left W_right for down (d x m) and up (m x d): rank*(d + m) each, plus the biases m and d
    delta = LowRankAdapterModel(tiny_bert(), reduction_factor=4, low_rank_rank=rank)
    assert delta.num_delta_parameters() == LAYERS * 2 * (2 * rank * (D + m) + m + D)


@pytest.mark.parametrize(
    "kwargs, per_projection, rules",
    [
        # Compacter: B_i = s_i t_i (rank k): n * (in/n * k + k * out/n) = k * (in + out); rules n^3 once
        ({}, lambda i, o, n: 1 * (i + o), lambda n, sites: n**3),
        ({"phm_rank": 2}, lambda i, o, n: 2 * (i + o), lambda n, sites: n**3),
        # PHM adapter (full B_i): n * (in/n) * (out/n) = in*out/n
        ({"factorized_phm": False}, lambda i, o, n: i * o // n, lambda n, sites: n**3),
        # rules per PHM layer (2 per site), rank-1 factorized: 2 * n * n each
        ({"shared_phm_rule": False, "factorized_phm_rule": True}, lambda i, o, n: i + o, lambda n, sites: sites * 2 * 2 * n * n),
    ],
)
def test_compacter_count(kwargs, per_projection, rules) -> None:
    n, m = 4, D // 4
    delta = CompacterModel(tiny_bert(), reduction_factor=4, hypercomplex_division=n, **kwargs)
    sites = LAYERS * 2
    per_site = per_projection(D, m, n) + m + per_projection(m, D, n) + D
    assert delta.num_delta_parameters() == sites * per_site + rules(n, sites)


def test_compacter_shared_rules_are_one_tensor_saved_once(tmp_path) -> None:
    model = tiny_bert()
    delta = CompacterModel(model, reduction_factor=4)
    rule = delta.shared.rule.phm_rule
    for site in delta.sites:
        assert site.module.down_sampler._shared_rule[0].phm_rule is rule
        assert site.module.up_sampler._shared_rule[0].phm_rule is rule
    assert sum(1 for n in model.state_dict() if "phm_rule" in n) == 1
    perturb(delta)
    x = torch.randint(2, 100, (2, 6))
    out = model(x).logits
    delta.save_finetuned(tmp_path)
    stored = read_weights(tmp_path)
    assert [k for k in stored if "phm_rule" in k] == ["compacter_shared.rule.phm_rule"]
    fresh = tiny_bert()
    loaded = AutoDeltaModel.from_finetuned(tmp_path, backbone_model=fresh)
    assert torch.equal(fresh(x).logits, out)
    assert loaded.shared is not None and "compacter_shared" in dict(fresh.named_children())
    loaded.detach()
    assert "compacter_shared" not in dict(fresh.named_children())


def test_compacter_divisibility_is_checked_before_anything_changes() -> None:
    model = tiny_bert()
    keys, hooks, state = list(model.state_dict()), hook_counts(model), snapshot(model)
    with pytest.raises(UnsupportedModuleError, match="hypercomplex_division 5"):
        CompacterModel(model, reduction_factor=4, hypercomplex_division=5)
    with pytest.raises(UnsupportedModuleError, match="bottleneck 2"):
        CompacterModel(model, reduction_factor=16, hypercomplex_division=4)  # 32 // 16 = 2, not a multiple of 4
    assert list(model.state_dict()) == keys and hook_counts(model) == hooks
    assert_state_equal(model, state)


@pytest.mark.parametrize("arch_name", ["bert", "gpt2", "t5", "llama"])
def test_parallel_adapter_pairs_each_ffn_output_with_its_own_input(arch_name: str) -> None:
    model = ARCHS[arch_name].build()
    delta = ParallelAdapterModel(model)
    modules = {m: n for n, m in model.named_modules()}
    def layer_of(name: str) -> list[str]:  # the path up to the first layer index, e.g. ['encoder', 'block', '1']
        parts = name.split(".")
        first_index = next(i for i, part in enumerate(parts) if part.isdigit())
        return parts[: first_index + 1]

    assert len({modules[s.module.input_source] for s in delta.sites}) == len(delta.sites)
    for site in delta.sites:
        source = modules[site.module.input_source]
        assert layer_of(source) == layer_of(site.name) and source != site.name


def test_parallel_adapter_reads_the_input_and_adds_to_the_output() -> None:
    model = tiny_bert()
    x = torch.randint(2, 100, (2, 6))
    base = model(x).logits
    delta = ParallelAdapterModel(model, bottleneck_dim=4, scaled=0.5)
    perturb(delta)
    attached = model(x).logits
    delta.detach()
    layer = model.bert.encoder.layer[0]
    site = delta.sites[0].module
    captured = {}
    h1 = layer.intermediate.dense.register_forward_pre_hook(lambda m, a: captured.__setitem__("x", a[0]))
    h2 = layer.output.dense.register_forward_hook(
        lambda m, a, out: out + 0.5 * site.up(torch.nn.functional.gelu(site.down(captured["x"]), approximate="tanh"))
    )
    other = delta.sites[1].module
    h3 = model.bert.encoder.layer[1].intermediate.dense.register_forward_pre_hook(lambda m, a: captured.__setitem__("y", a[0]))
    h4 = model.bert.encoder.layer[1].output.dense.register_forward_hook(
        lambda m, a, out: out + 0.5 * other.up(torch.nn.functional.gelu(other.down(captured["y"]), approximate="tanh"))
    )
    try:
        assert torch.equal(model(x).logits, attached)
    finally:
        for h in (h1, h2, h3, h4):
            h.remove()
    assert torch.equal(model(x).logits, base)


def test_adapter_on_a_block_with_tuple_output_uses_the_config_hidden_size() -> None:
    model = tiny_bert()
    x = torch.randint(2, 100, (2, 6))
    base = model(x).logits
    delta = AdapterModel(model, modified_modules=["layer.0.attention"], bottleneck_dim=4)
    assert delta.sites[0].module.down.in_features == 32
    assert torch.equal(model(x).logits, base)
    perturb(delta)
    assert not torch.allclose(model(x).logits, base)
    delta.detach()
    assert torch.equal(model(x).logits, base)


@pytest.mark.parametrize("cls", [AdapterModel, LowRankAdapterModel, CompacterModel])
def test_default_positions_cover_t5_encoder_and_decoder_including_cross_attention(cls) -> None:
    kwargs = {"bottleneck_dim": 4} if cls is AdapterModel else {"reduction_factor": 4}
    delta = cls(ARCHS["t5"].build(), **kwargs)
    names = delta.modified_modules
    assert sum(n.startswith("encoder.") for n in names) == 2 * 2  # attn.o and ff.w2 of 2 encoder blocks
    assert sum(n.startswith("decoder.") for n in names) == 2 * 3  # self-attn o, cross-attn o, ff.w2
    assert sum("EncDecAttention.o" in n for n in names) == 2


def _hand_biases(model, deltas):
    """Forward hooks adding each delta's BitFit biases in order, on a model without deltakit hooks."""
    modules = dict(model.named_modules())
    handles = []
    for name in deltas[0].modified_modules:
        biases = [next(s.module.bias for s in d.sites if s.name == name) for d in deltas]

        def add(module, args, out, biases=biases):
            for bias in biases:
                out = out + bias
            return out

        handles.append(modules[name].register_forward_hook(add))
    return handles


@pytest.mark.parametrize("arch_name", ["llama", "t5"])
def test_two_bitfit_deltas_stack_on_rms_norms_and_detach_exactly(arch_name: str) -> None:
    """A first BitFit delta's site module is a child of each norm; a second BitFit must still see an RMSNorm there."""
    arch = ARCHS[arch_name]
    model = arch.build()
    x = arch.inputs()
    keys, hooks, state = list(model.state_dict()), hook_counts(model), snapshot(model)
    base = arch.run(model, x)
    first = BitFitModel(model, name="task_a")
    perturb(first, seed=1)
    only_first = arch.run(model, x)
    second = BitFitModel(model, name="task_b")
    perturb(second, seed=2)
    assert second.modified_modules == first.modified_modules
    assert any(type(s.host).__name__ in ("LlamaRMSNorm", "T5LayerNorm") for s in second.sites)
    both = arch.run(model, x)

    reference = ARCHS[arch_name].build()
    handles = _hand_biases(reference, [first, second])
    try:
        assert torch.equal(arch.run(reference, x), both)
    finally:
        for handle in handles:
            handle.remove()
    handles = _hand_biases(reference, [second])
    try:
        only_second = arch.run(reference, x)
    finally:
        for handle in handles:
            handle.remove()

    second.detach()
    assert torch.equal(arch.run(model, x), only_first)
    second.attach()
    first.detach()
    assert torch.equal(arch.run(model, x), only_second)
    second.detach()
    assert torch.equal(arch.run(model, x), base)
    assert list(model.state_dict()) == keys and hook_counts(model) == hooks
    assert_state_equal(model, state)


@pytest.mark.parametrize(
    "modules",
    [["ff.w1", "ff.w2"], ["intermediate.dense", "output.dense"], ["attention.output.dense", "attention.output.dense"]],
)
def test_parallel_adapter_warns_when_modified_modules_read_like_opendelta_pairs(modules: list[str]) -> None:
    # OpenDelta read ["ff.w1", "ff.w2"] as one adapter across the block; deltakit builds one per module. Silently
    # twice the adapters and none across the block: the list now warns with the explicit form.
    with pytest.warns(UserWarning, match=r"OpenDelta read this list as pairs.*input_modules=\['ff.w1'\]"):
        ParallelAdapterModel(tiny_bert(), modified_modules=modules, bottleneck_dim=4)


@pytest.mark.parametrize(
    ("modules", "inputs"), [(["ff.w2"], None), (["ff.w1", "ff.w2"], ["ff.w1"]), (["attn.q", "attn.v"], None)]
)
def test_parallel_adapter_stays_quiet_for_unambiguous_lists(modules: list[str], inputs: list[str] | None) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ParallelAdapterModel(tiny_bert(), modified_modules=modules, input_modules=inputs, bottleneck_dim=4)
