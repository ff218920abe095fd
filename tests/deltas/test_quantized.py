"""Deltas on weight-only quantized backbones (QLoRA-style): training on a torchao int8 / int4 tiny Llama, exact
detach back to the quantized storage, the same function as on the dequantized float backbone, merges refused,
save/load onto a freshly quantized backbone; bitsandbytes and optimum-quanto layers where installed."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable

import pytest
import torch
from torch import nn

from deltakit import AdapterModel, CheckpointError, DeltaGroup, DeltaStateError, DoraModel, IA3Model, LoraModel, VeraModel
from deltakit.base import DeltaBase
from deltakit.quantization import dequantize, is_quantized, logical_shape, quantization_library, quantized_storage
from deltakit.site import delta_site_names, factory_kwargs, is_inside
from deltakit.structures import linear_dims

from tests.helpers import VOCAB, hook_counts, perturb, tiny_llama
from tests.tolerances import assert_same_function

logging.getLogger("torchao").setLevel(logging.ERROR)  # it logs its CUDA-only kernels failing to load, at import
tq = pytest.importorskip(
    "torchao.quantization", reason="torchao is not installed (pip install -e .[quant]); quantized-backbone tests need it"
)

CONFIGS: dict[str, Callable[[], object]] = {
    "int8": tq.Int8WeightOnlyConfig,
    # int4 values (16 levels, groups of 16 along the input), stored unpacked in int8: the numerics of 4-bit
    # weights. torchao's packed int4 layouts need CUDA or the mslk package, which has no CPU build.
    "int4": lambda: tq.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=tq.PerGroup(16)),
}

METHODS: dict[str, Callable[..., DeltaBase]] = {
    "lora": lambda m, **kw: LoraModel(m, modified_modules=["q_proj", "v_proj", "down_proj"], lora_r=4, **kw),
    "dora": lambda m, **kw: DoraModel(m, modified_modules=["q_proj", "v_proj", "down_proj"], lora_r=4, **kw),
    "ia3": lambda m, **kw: IA3Model(m, **kw),
    "adapter": lambda m, **kw: AdapterModel(m, **kw),
    "vera": lambda m, **kw: VeraModel(m, modified_modules=["q_proj", "v_proj"], vera_r=8, **kw),
}
MERGEABLE = ("lora", "dora", "ia3", "vera")
#: Scaling vectors (IA3, VeRA's) move the loss slowly at LoRA's rate (8 steps at 1e-2: -0.004).
LEARNING_RATES = {"ia3": 0.1, "vera": 0.1}


def quantized_llama(config: str = "int8", seed: int = 0) -> nn.Module:
    model = tiny_llama(seed)
    tq.quantize_(model, CONFIGS[config]())
    return model


def batch(seed: int = 1) -> dict[str, torch.Tensor]:
    ids = torch.randint(2, VOCAB, (4, 12), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def storage(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every backbone tensor, quantized weights by their storage tensors (int data, scales, zero points), cloned."""
    out, sites = {}, delta_site_names(model)
    for name, tensor in model.state_dict().items():
        if is_inside(name.rpartition(".")[0], sites):
            continue
        for part, t in quantized_storage(tensor).items():
            out[f"{name}/{part}"] = t.detach().clone()
    return out


def assert_storage_equal(model: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    now = storage(model)
    assert list(now) == list(expected)
    for key, value in expected.items():
        assert now[key].dtype == value.dtype and torch.equal(now[key], value), key


def dequantized_copy(model: nn.Module) -> nn.Module:
    """The float tiny Llama whose linear weights are the values ``model``'s quantized weights stand for."""
    float_model = tiny_llama()
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, module in float_model.named_modules():
            if isinstance(module, nn.Linear):
                module.weight.copy_(dequantize(modules[name].weight))
    return float_model


# ------------------------------------------------------------------------------------------------ recognising hosts
@pytest.mark.parametrize("config", CONFIGS)
def test_quantized_linear_is_recognised_and_read_by_its_library(config: str) -> None:
    reference = tiny_llama().model.layers[0].self_attn.q_proj
    host = quantized_llama(config).model.layers[0].self_attn.q_proj
    assert quantization_library(host.weight) == "torchao" and is_quantized(host.weight)
    assert not is_quantized(reference.weight) and quantization_library(reference.weight) is None
    assert linear_dims(host) == linear_dims(reference) == (32, 32)
    assert logical_shape(host.weight) == reference.weight.shape
    # deltas are created in the host's floating (compute) dtype, never in the integer storage's
    assert factory_kwargs(host) == {"device": torch.device("cpu"), "dtype": torch.float32}
    values = dequantize(host.weight)
    assert type(values) is torch.Tensor and values.dtype == torch.float32 and values.shape == (32, 32)
    # the values are what the layer multiplies by: x W^T for x = I gives W^T (one product per entry: no rounding)
    assert torch.equal(nn.functional.linear(torch.eye(32), host.weight), values.t())
    # and they are a quantization of the float weight: within half a quantization step of it
    qmax = 127 if config == "int8" else 7
    step = reference.weight.detach().abs().amax(dim=1, keepdim=True) / qmax
    assert bool(((values - reference.weight.detach()).abs() <= step).all())
    assert any(t.dtype == torch.int8 for t in quantized_storage(host.weight).values())


# ------------------------------------------------------------------------------------------------ training
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("method", METHODS)
def test_training_lowers_the_loss_and_detach_restores_the_quantized_backbone(method: str, config: str) -> None:
    model = quantized_llama(config)
    before = storage(model)
    keys, hooks = list(model.state_dict()), hook_counts(model)
    data = batch()
    with torch.no_grad():
        base_logits = model(**data).logits
    delta = METHODS[method](model)
    delta.freeze_module(exclude=["deltas"])
    with torch.no_grad():
        assert torch.equal(model(**data).logits, base_logits)  # a fresh delta is the identity
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and {id(p) for p in trainable} == {id(p) for p in delta.parameters()}
    assert all(p.dtype == torch.float32 and not is_quantized(p) for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=LEARNING_RATES.get(method, 1e-2))
    model.train()
    losses = []
    for _ in range(8):
        loss = model(**data).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    # the same batch in every step and no dropout: without learning the loss would repeat exactly
    assert all(b < a for a, b in itertools.pairwise(losses)) and losses[-1] < losses[0] - 0.01, losses
    assert_storage_equal(model, before)  # training never wrote to the quantized weights
    with torch.no_grad():
        trained = model(**data).logits
    delta.detach()
    assert_storage_equal(model, before)
    assert list(model.state_dict()) == keys and hook_counts(model) == hooks
    with torch.no_grad():
        assert torch.equal(model(**data).logits, base_logits)
    delta.attach()
    with torch.no_grad():
        assert torch.equal(model(**data).logits, trained)


@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "vera"])
def test_same_function_as_on_the_dequantized_float_backbone(method: str) -> None:
    """A delta over the quantized layers computes what it computes over float layers holding the same values."""
    quantized = quantized_llama()
    floating = dequantized_copy(quantized)
    data = batch()
    q_delta, f_delta = METHODS[method](quantized), METHODS[method](floating)
    perturb(q_delta, scale=0.3)
    if method == "dora":  # magnitudes near the row norms, so the factor m / ||W + s B A|| stays moderate
        with torch.no_grad():
            for site in q_delta.sites:
                site.module.magnitude.abs_().add_(0.5)
    with torch.no_grad():
        for (name, q_param), (f_name, f_param) in zip(q_delta.named_parameters(), f_delta.named_parameters()):
            assert name == f_name
            f_param.copy_(q_param)
    with torch.no_grad():
        expected, actual = floating(**data).logits, quantized(**data).logits
    assert not torch.equal(actual, quantized_llama()(**data).logits)  # the perturbed delta acts
    assert_same_function(actual, expected, model=floating, note=f"{method} quantized vs dequantized float")


def test_dora_magnitude_starts_at_the_dequantized_row_norms_and_gradients_reach_it() -> None:
    model = quantized_llama()
    delta = METHODS["dora"](model)
    for site in delta.sites:
        norms = torch.linalg.vector_norm(dequantize(site.host.weight), dim=1)
        assert torch.equal(site.module.magnitude.detach(), norms)
    delta.freeze_module(exclude=["deltas"])
    model(**batch()).loss.backward()
    for site in delta.sites:  # B starts at zero, so A's gradient is zero at the first step
        assert all(bool(p.grad.abs().sum() > 0) for p in (site.module.magnitude, site.module.lora_B))


@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_a_mixed_batch_over_the_quantized_backbone_equals_each_row_alone(method: str) -> None:
    """Per-sample routing (DeltaGroup.route) works over quantized hosts like over float ones."""
    model = quantized_llama()
    group = DeltaGroup(model)
    for i, name in enumerate("ab"):
        delta = METHODS[method](model, name=name)
        delta.detach()
        perturb(delta, seed=30 + i, scale=0.1)
        if method in ("dora", "ia3"):  # magnitudes / scales near 1 times their identity values, as trained ones are
            with torch.no_grad():
                for site in delta.sites:
                    for pname, param in site.module.named_parameters():
                        if pname in ("magnitude", "scale"):
                            identity = site.module.weight_norm(site.host) if pname == "magnitude" else 1
                            param.copy_(identity * (1 + 0.1 * torch.rand(param.shape)))
        group.add(delta)
    names = ["b", None, "a", "b"]
    ids = batch()["input_ids"]
    with torch.no_grad(), group.route(names):
        routed = model(input_ids=ids).logits
    assert group._routers and all(sum(r.calls.values()) > 0 for r in group._routers)  # routed, not one by one
    for i, name in enumerate(names):
        group.switch(name)
        with torch.no_grad():
            assert_same_function(routed[i], model(input_ids=ids[i : i + 1]).logits[0], model=model)
    group.switch(None)


# ------------------------------------------------------------------------------------------------ merging
@pytest.mark.parametrize("method", MERGEABLE)
def test_merging_into_a_quantized_weight_is_refused_and_changes_nothing(method: str) -> None:
    model = quantized_llama()
    delta = METHODS[method](model)
    perturb(delta, scale=0.1)
    data = batch()
    before, hooks = storage(model), hook_counts(model)
    with torch.no_grad():
        attached = model(**data).logits
    # DoRA and IA3 refuse exact_unmerge=False for a reason of their own
    for options in ({}, {"safe": False}) + (({"exact_unmerge": False},) if method in ("lora", "vera") else ()):
        with pytest.raises(DeltaStateError, match=r"quantized by torchao \(Int8Tensor\).*merge into a float copy"):
            delta.merge(**options)
    assert delta.state == "attached"
    assert_storage_equal(model, before)
    assert hook_counts(model) == hooks
    with torch.no_grad():
        assert torch.equal(model(**data).logits, attached)


def test_the_documented_route_to_a_merged_quantized_model(tmp_path) -> None:
    """docs/quantization.md: load the delta into the float model, merge there, quantize the merged model."""
    quantized = quantized_llama()
    delta = METHODS["lora"](quantized)
    perturb(delta, scale=0.1)
    delta.save_finetuned(tmp_path)
    floating = tiny_llama()
    LoraModel.from_finetuned(tmp_path, backbone_model=floating).merge()
    tq.quantize_(floating, tq.Int8WeightOnlyConfig())
    data = batch()
    with torch.no_grad():
        merged, attached = floating(**data).logits, quantized(**data).logits
    # not the same function (the merged weights are quantized with the update in them): close, within the error
    # of one int8 quantization of the weights, far from the backbone without the delta
    with torch.no_grad():
        bare = quantized_llama()(**data).logits
    assert (merged - attached).abs().max() < 0.2 * (attached - bare).abs().max()


# ------------------------------------------------------------------------------------------------ save / load
@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "vera"])
def test_save_load_onto_a_freshly_quantized_backbone(method: str, tmp_path) -> None:
    model = quantized_llama()
    delta = METHODS[method](model)
    perturb(delta, scale=0.1)
    data = batch()
    with torch.no_grad():
        attached = model(**data).logits
    delta.save_finetuned(tmp_path)
    fresh = quantized_llama()
    before = storage(fresh)
    loaded = type(delta).from_finetuned(tmp_path, backbone_model=fresh)  # fingerprint and host checks accept it
    with torch.no_grad():
        assert torch.equal(fresh(**data).logits, attached)
    loaded.detach()
    assert_storage_equal(fresh, before)


def test_a_delta_trained_on_the_float_backbone_loads_onto_the_quantized_one(tmp_path) -> None:
    floating = tiny_llama()
    delta = METHODS["lora"](floating)
    perturb(delta, scale=0.1)
    delta.save_finetuned(tmp_path)
    quantized = quantized_llama()
    LoraModel.from_finetuned(tmp_path, backbone_model=quantized)
    float_values = dequantized_copy(quantized_llama())
    # a float backbone with other values than the trained-on ones: the fingerprint's value check refuses it
    with pytest.raises(CheckpointError, match="differ from those the delta"):
        LoraModel.from_finetuned(tmp_path, backbone_model=float_values)
    LoraModel.from_finetuned(tmp_path, backbone_model=float_values, check_backbone=False)
    data = batch()
    with torch.no_grad():
        assert_same_function(quantized(**data).logits, float_values(**data).logits, model=float_values)


# ------------------------------------------------------------------------------------------------ bitsandbytes
def _bnb_layers() -> tuple[nn.Module, nn.Module, nn.Linear]:
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (optional; torchao is tested)")
    torch.manual_seed(0)
    reference = nn.Linear(64, 32)
    int8 = bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=False, threshold=0.0)
    nf4 = bnb.nn.Linear4bit(64, 32, quant_type="nf4", compute_dtype=torch.float32)
    for layer in (int8, nf4):
        layer.load_state_dict(reference.state_dict())
    return int8.to("cpu"), nf4.to("cpu"), reference  # bitsandbytes quantizes when the layer moves to a device


def test_bitsandbytes_layers_take_lora_and_dora_and_refuse_merging() -> None:
    int8, nf4, reference = _bnb_layers()
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
    for layer, packed in ((int8, False), (nf4, True)):
        model = nn.Sequential(layer)
        assert quantization_library(layer.weight) == "bitsandbytes" and linear_dims(layer) == (64, 32)
        assert logical_shape(layer.weight) == (32, 64) and (layer.weight.shape != (32, 64)) == packed
        values = dequantize(layer.weight)
        assert values.shape == (32, 64) and values.dtype == torch.float32
        with torch.no_grad():  # what the layer multiplies by (x = I), and a quantization of the float weight
            assert_same_function(layer(torch.eye(64)) - layer.bias, values.t(), depth=2, reduction=64)
            # within NF4's widest half step (0.14 of the block's largest entry, itself stored in 8 bits; int8: 1/254)
            assert (values - reference.weight).abs().max() < 0.2 * reference.weight.abs().max()
        with torch.no_grad():
            base = model(x)
        for make in (lambda m: LoraModel(m, modified_modules=["0"], lora_r=4),
                     lambda m: DoraModel(m, modified_modules=["0"], lora_r=4)):
            delta = make(model)
            delta.freeze_module(exclude=["deltas"])
            with torch.no_grad():
                assert torch.equal(model(x), base)
            model(x).square().sum().backward()
            assert all(p.grad is not None for p in delta.parameters())
            perturb(delta, scale=0.1)
            with pytest.raises(DeltaStateError, match="quantized by bitsandbytes"):
                delta.merge()
            delta.detach()
            with torch.no_grad():
                assert torch.equal(model(x), base)


def test_optimum_quanto_layers_take_lora_and_dora_and_refuse_merging() -> None:
    quanto = pytest.importorskip("optimum.quanto", reason="optimum-quanto is not installed (optional; torchao is tested)")
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
    for weights in (quanto.qint8, quanto.qint4):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 32))
        quanto.quantize(model, weights=weights)
        quanto.freeze(model)  # the weight becomes its quantized tensor
        layer = model[0]
        assert quantization_library(layer.weight) == "optimum-quanto" and linear_dims(layer) == (64, 32)
        values = dequantize(layer.weight)
        assert type(values) is torch.Tensor and values.shape == (32, 64)
        with torch.no_grad():
            base = model(x)
            assert_same_function(layer(torch.eye(64)) - layer.bias, values.t(), depth=2, reduction=64)
        for make in (lambda m: LoraModel(m, modified_modules=["0"], lora_r=4),
                     lambda m: DoraModel(m, modified_modules=["0"], lora_r=4)):
            delta = make(model)
            delta.freeze_module(exclude=["deltas"])
            with torch.no_grad():
                assert torch.equal(model(x), base)
            model(x).square().sum().backward()
            assert all(p.grad is not None for p in delta.parameters())
            perturb(delta, scale=0.1)
            with pytest.raises(DeltaStateError, match="quantized by optimum-quanto"):
                delta.merge()
            delta.detach()
            with torch.no_grad():
                assert torch.equal(model(x), base)


def test_the_speed_benchmark_runs() -> None:
    """benchmarks/quantized_step.py (the figures in docs/quantization.md), one round, so that it cannot rot."""
    from benchmarks import quantized_step

    medians = quantized_step.main(["tiny", "--rounds", "1"])
    assert sorted(medians) == sorted(f"{q}-{m}" for q in ("float", "int8", "int4") for m in ("lora", "dora"))
    assert all(seconds > 0 for seconds in medians.values())
