"""LoRA and BitFit on convolutions (nn.Conv1d/2d/3d), against PEFT's conv LoRA, on a small diffusion-like conv net
and on tiny ViT / CLIP vision towers; adapters and DoRA on a convolution refused. The conv models are not in the
DESIGN §4 contract matrix (tests/core/test_contract.py runs every method, adapters included, on text models), so the
contract's checks for conv hosts are here."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deltakit import (
    AdapterModel,
    AutoDeltaModel,
    BitFitModel,
    CompacterModel,
    DeltaConfigError,
    DeltaError,
    DeltaGroup,
    DeltaStateError,
    DoraModel,
    LoraModel,
    LowRankAdapterModel,
    ParallelAdapterModel,
    UnsupportedModuleError,
    loraplus_parameter_groups,
)
from deltakit.checkpoint import WEIGHTS_NAME, read_weights
from deltakit.deltas.lora import LoraConvSite
from deltakit.errors import CheckpointError
from deltakit.integrations.peft import PEFT_CONFIG_NAME, export_to_peft, from_peft
from deltakit.structures import conv_geometry, tiny_model
from tests.helpers import assert_state_equal, hook_counts, perturb, snapshot
from tests.tolerances import assert_same_function

peft = pytest.importorskip("peft")

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
SPATIAL = {1: (16,), 2: (8, 8), 3: (4, 6, 6)}
#: The convolutions PEFT computes like deltakit (zero padding, no dilation of a wide kernel).
PEFT_TARGETS = ["conv_in", "block.conv", "down", "grouped", "conv_out"]
#: All of them, with the dilated, reflect-padded one.
ALL = [*PEFT_TARGETS, "dilated"]
#: Everything mergeable (a grouped convolution's LoRA is not).
MERGEABLE = ["conv_in", "block.conv", "down", "dilated", "conv_out"]


class Block(nn.Module):
    """A residual block as in a diffusion UNet: GroupNorm, SiLU, convolution, skip."""

    def __init__(self, dims: int, channels: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(2, channels)
        self.conv = CONV[dims](channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(F.silu(self.norm(x)))


class DiffusionLike(nn.Module):
    """A small diffusion-like conv net in plain torch, every kind of convolution settings once."""

    def __init__(self, dims: int) -> None:
        super().__init__()
        conv = CONV[dims]
        self.conv_in = conv(4, 8, 3, padding=1)
        self.block = Block(dims, 8)
        self.dilated = conv(8, 8, 3, padding=2, dilation=2, padding_mode="reflect", bias=False)
        self.down = conv(8, 16, 3, stride=2, padding=1)
        self.grouped = conv(16, 16, 3, padding="same", groups=2)
        self.conv_out = conv(16, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.block(self.conv_in(x))
        h = self.down(F.silu(self.dilated(h)))
        return self.conv_out(F.silu(self.grouped(h)))


def conv_net(dims: int = 2, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return DiffusionLike(dims).eval()


def images(dims: int = 2, n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 4, *SPATIAL[dims], generator=torch.Generator().manual_seed(seed))


def conv_size(model: nn.Module, positions: int = 1) -> dict[str, int]:
    """``depth`` and ``reduction`` for tests/tolerances.py: every matmul-like module counts twice (forward and
    backward); the longest dot product is a convolution's fan-in, a Linear's width, or the positions a weight
    gradient sums over."""
    widths = []
    for module in model.modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            widths.append(module.weight[0].numel())
        elif isinstance(module, nn.Linear):
            widths.append(module.in_features)
    return {"depth": 2 * len(widths), "reduction": max([positions, *widths])}


def randomize_peft(model: nn.Module, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.3)


def peft_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, param in model.named_parameters():
        for part in ("lora_A", "lora_B"):
            suffix = f".{part}.default.weight"
            if name.endswith(suffix):
                out[f"{name[len('base_model.model.'):-len(suffix)]}.{part}"] = param.grad
    return out


def our_grads(delta: Any) -> dict[str, torch.Tensor]:
    return {f"{s.name}.{p}": getattr(s.module, p).grad for s in delta.sites for p in ("lora_A", "lora_B")}


def assert_same_grads(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], size: dict[str, int]) -> None:
    assert ours.keys() == theirs.keys() and ours
    scale = max(t.abs().max().item() for t in theirs.values())  # one pass: the largest gradient's terms
    for key, expected in theirs.items():
        assert_same_function(ours[key], expected, scale=scale, note=key, **size)


# ------------------------------------------------------------------------------------------------ against PEFT
@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_outputs_and_gradients_equal_peft_conv_lora(dims: int, rslora: bool, tmp_path) -> None:
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=PEFT_TARGETS, use_rslora=rslora)
    theirs = peft.get_peft_model(conv_net(dims), config)
    randomize_peft(theirs)
    theirs.save_pretrained(tmp_path)
    model = conv_net(dims)
    delta = from_peft(tmp_path, model)
    assert [type(s.module) for s in delta.sites] == [LoraConvSite] * len(PEFT_TARGETS)
    delta.freeze_module(exclude=["deltas"])
    x = images(dims)
    ours_out, theirs_out = model(x), theirs(x)
    size = conv_size(model, positions=x.shape[0] * math.prod(x.shape[2:]))
    assert_same_function(ours_out, theirs_out.detach(), **size)
    assert not torch.allclose(ours_out, conv_net(dims)(x))  # the delta does something
    ours_out.pow(2).mean().backward()
    theirs_out.pow(2).mean().backward()
    assert_same_grads(our_grads(delta), peft_grads(theirs), size)


def test_vit_patch_embedding_and_attention_equal_peft(tmp_path) -> None:
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["projection", "q_proj", "v_proj"])
    theirs = peft.get_peft_model(tiny_model("vit"), config)
    randomize_peft(theirs)
    theirs.save_pretrained(tmp_path)
    model = tiny_model("vit")
    delta = from_peft(tmp_path, model)
    assert isinstance(delta.backbone_model.get_submodule("embeddings.patch_embeddings.projection").lora, LoraConvSite)
    delta.freeze_module(exclude=["deltas"])
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    ours, reference = model(pixel_values=x).last_hidden_state, theirs(pixel_values=x).last_hidden_state
    size = conv_size(model, positions=2 * 5)
    assert_same_function(ours, reference.detach(), **size)
    ours.pow(2).mean().backward()
    reference.pow(2).mean().backward()
    assert_same_grads(our_grads(delta), peft_grads(theirs), size)

    # and back: deltakit's export loads in PEFT with the same factors, bit for bit
    export_to_peft(delta, tmp_path / "back")
    again = peft.PeftModel.from_pretrained(tiny_model("vit"), tmp_path / "back")
    ours_state = {k: v for k, v in again.state_dict().items() if "lora_" in k}
    theirs_state = {k: v for k, v in theirs.state_dict().items() if "lora_" in k}
    assert ours_state.keys() == theirs_state.keys()
    assert all(torch.equal(ours_state[k], theirs_state[k]) for k in theirs_state)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_export_of_a_trained_conv_lora_loads_in_peft(dims: int, tmp_path) -> None:
    model = conv_net(dims)
    delta = LoraModel(model, modified_modules=PEFT_TARGETS, lora_r=4, lora_alpha=8)
    perturb(delta, scale=0.3)
    x = images(dims)
    ours = model(x)
    export_to_peft(delta, tmp_path)
    config = json.loads((tmp_path / PEFT_CONFIG_NAME).read_text())
    assert config["target_modules"] == PEFT_TARGETS and config["r"] == 4
    theirs = peft.PeftModel.from_pretrained(conv_net(dims), tmp_path).eval()
    assert_same_function(ours, theirs(x), **conv_size(model))


# ------------------------------------------------------------------------------------------------ the contract
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_fresh_lora_is_identity_then_detach_and_attach_are_exact(dims: int) -> None:
    model, x = conv_net(dims), images(dims)
    base = model(x)
    keys, hooks, state = list(model.state_dict()), hook_counts(model), snapshot(model)
    delta = LoraModel(model, modified_modules=ALL, lora_r=4)
    assert torch.equal(model(x), base)
    perturb(delta, scale=0.2)
    attached = model(x)
    assert not torch.allclose(attached, base)
    for _ in range(2):
        delta.detach()
        assert torch.equal(model(x), base)
        assert list(model.state_dict()) == keys and hook_counts(model) == hooks
        assert_state_equal(model, state)
        delta.attach()
        assert torch.equal(model(x), attached)


def test_gradients_reach_exactly_the_conv_deltas() -> None:
    model = conv_net(2)
    lora = LoraModel(model, modified_modules=ALL, lora_r=4)
    bitfit = BitFitModel(model, modified_modules=["conv_in", "block.norm", "grouped"])
    perturb(lora, seed=1, scale=0.2)
    perturb(bitfit, seed=2, scale=0.2)
    model.requires_grad_(False)
    own = [*lora.parameters(), *bitfit.parameters()]
    for p in own:
        p.requires_grad_(True)
    model(images(2)).pow(2).mean().backward()
    for p in own:
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in model.named_parameters() if "lora" not in n and "bitfit" not in n)


@pytest.mark.parametrize("order", ["lora-first", "bitfit-first"])
def test_two_deltas_on_one_convolution_detach_in_any_order(order: str) -> None:
    model, x = conv_net(2), images(2)
    base = model(x)
    first = LoraModel(model, modified_modules=ALL, lora_r=4)
    second = LoraModel(model, modified_modules=["down", "conv_out"], lora_r=2)
    third = BitFitModel(model, modified_modules=["down", "block.norm"])
    for i, d in enumerate((first, second, third)):
        perturb(d, seed=i, scale=0.2)
    everything = model(x)
    a, b = (first, third) if order == "lora-first" else (third, first)
    a.detach()
    a.attach()
    assert torch.equal(model(x), everything)
    a.detach()
    b.detach()
    second.detach()
    assert torch.equal(model(x), base)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_save_then_load_into_a_fresh_backbone_is_exact(dims: int, tmp_path) -> None:
    model, x = conv_net(dims), images(dims)
    delta = LoraModel(model, modified_modules=ALL, lora_r=4, use_rslora=True)
    bias = BitFitModel(model, modified_modules=["conv_in", "block.norm", "dilated"])
    perturb(delta, seed=1)
    perturb(bias, seed=2)
    attached = model(x)
    delta.save_finetuned(tmp_path / "lora")
    bias.save_finetuned(tmp_path / "bitfit")
    stored = read_weights(tmp_path / "lora" / WEIGHTS_NAME)
    assert set(stored) == set(delta.delta_state_dict())
    assert stored["grouped.lora.lora_B"].shape == (16, 2, *([1] * dims))  # PEFT's layout: (out, r / groups, 1...)
    fresh = conv_net(dims)
    loaded = AutoDeltaModel.from_finetuned(tmp_path / "lora", backbone_model=fresh)
    AutoDeltaModel.from_finetuned(tmp_path / "bitfit", backbone_model=fresh)
    assert type(loaded) is LoraModel and loaded.modified_modules == delta.modified_modules
    assert torch.equal(fresh(x), attached)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_merge_is_close_and_unmerge_restores_the_weights(dims: int) -> None:
    # The dilated, reflect-padded convolution is the test of the update's geometry: merging folds B @ A into the
    # host's kernel, which computes the hooked output only if A pads, strides and dilates as the host does.
    model, x = conv_net(dims), images(dims)
    lora = LoraModel(model, modified_modules=MERGEABLE, lora_r=4)
    bitfit = BitFitModel(model, modified_modules=["conv_in", "block.norm", "down"])
    perturb(lora, seed=1, scale=0.1)
    perturb(bitfit, seed=2, scale=0.1)
    attached, weights = model(x), snapshot(model)
    lora.merge()
    bitfit.merge()
    assert all(not s.host._forward_hooks for s in lora.sites)
    assert_same_function(model(x), attached, **conv_size(model))
    bitfit.unmerge()
    lora.unmerge()
    assert_state_equal(model, weights)
    assert torch.equal(model(x), attached)


def test_merge_of_a_grouped_convolution_is_refused_and_changes_nothing() -> None:
    model, x = conv_net(2), images(2)
    delta = LoraModel(model, modified_modules=["conv_in", "grouped"], lora_r=4)
    perturb(delta, scale=0.1)
    attached, weights = model(x), snapshot(model)
    with pytest.raises(DeltaStateError, match=r"grouped convolution Conv2d\(16, 16.*groups=2.*reads all 16 input"):
        delta.merge()
    assert delta.state == "attached"
    assert_state_equal(model, weights)
    assert torch.equal(model(x), attached)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_model_to_moves_the_conv_deltas(dtype: torch.dtype) -> None:
    model = conv_net(2)
    deltas = [LoraModel(model, modified_modules=ALL, lora_r=4), BitFitModel(model, modified_modules=["down"])]
    for d in deltas:
        perturb(d)
    model.to(dtype)
    assert all(p.dtype == dtype for d in deltas for p in d.parameters())
    if dtype == torch.float64:
        out = model(images(2).to(dtype))
        assert out.dtype == dtype and torch.isfinite(out).all()
    for d in deltas:
        d.detach()
    model.to(torch.float32)
    for d in deltas:
        d.attach()
    assert all(p.dtype == torch.float32 for d in deltas for p in d.parameters())


def test_delta_created_in_bf16_and_bf16_round_trip(tmp_path) -> None:
    model = conv_net(3).to(torch.bfloat16)
    x = images(3).to(torch.bfloat16)
    delta = LoraModel(model, modified_modules=ALL, lora_r=4)
    assert all(p.dtype == torch.bfloat16 for p in delta.parameters())
    perturb(delta)
    out = model(x)
    delta.save_finetuned(tmp_path)
    fresh = conv_net(3).to(torch.bfloat16)
    AutoDeltaModel.from_finetuned(tmp_path, backbone_model=fresh)
    assert torch.equal(fresh(x), out)


def test_an_unbatched_input_gets_the_same_update_as_its_batched_row() -> None:
    # nn.Conv2d takes (C, H, W) too: the delta's convolutions and the per-channel bias must follow.
    model = conv_net(2)
    perturb(LoraModel(model, modified_modules=ALL, lora_r=4), seed=1, scale=0.2)
    perturb(BitFitModel(model, modified_modules=["conv_in", "dilated"]), seed=2, scale=0.2)
    for host in (model.conv_in, model.dilated):
        x = torch.randn(1, host.in_channels, 8, 8, generator=torch.Generator().manual_seed(3))
        assert_same_function(host(x[0]), host(x)[0], **conv_size(model))


def test_a_conv_subclass_whose_forward_ends_in_a_nonlinearity_still_trains() -> None:
    # The update is added in place only to a plain convolution's output: a subclass may end its forward with an op
    # whose backward reads the output (sigmoid), and an in-place write there breaks the backward pass.
    class GatedConv(nn.Conv2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(super().forward(x))

    torch.manual_seed(0)
    model = nn.Sequential(GatedConv(4, 6, 3, padding=1))
    delta = LoraModel(model, modified_modules=["0"], lora_r=2)
    perturb(delta)
    x = images(2).requires_grad_(True)
    model(x).sum().backward()
    assert x.grad is not None and delta.sites[0].module.lora_A.grad.abs().sum() > 0


def test_loraplus_gives_conv_b_kernels_the_b_rate_and_training_lowers_the_loss() -> None:
    model = conv_net(2)
    delta = LoraModel(model, modified_modules=ALL, lora_r=4)
    delta.freeze_module(exclude=["deltas"])
    groups = loraplus_parameter_groups(delta, lr=1e-2, loraplus_lr_ratio=4)
    by_id = {id(p): g["name"] for g in groups for p in g["params"]}
    assert by_id == {
        **{id(s.module.lora_A): "loraplus_A" for s in delta.sites},
        **{id(s.module.lora_B): "loraplus_B" for s in delta.sites},
    }
    x = images(2, n=4)
    target = torch.randn(model(x).shape, generator=torch.Generator().manual_seed(5))
    optimizer = torch.optim.Adam(groups)
    losses = []
    for _ in range(15):
        loss = F.mse_loss(model(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]


# ------------------------------------------------------------------------------------------------ BitFit
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_bitfit_adds_one_bias_per_output_channel(dims: int) -> None:
    model, x = conv_net(dims), images(dims)
    host = model.conv_in
    bare = host(x)
    delta = BitFitModel(model, modified_modules=["conv_in", "block.norm"])
    assert delta.sites[0].module.bias.shape == (8,)
    perturb(delta)
    bias = delta.sites[0].module.bias.detach()
    assert torch.equal(host(x), bare + bias.view(-1, *([1] * dims)))
    norm_bias = delta.sites[1].module.bias.detach()
    h = host(x)
    assert torch.equal(model.block.norm(h), F.group_norm(h, 2, model.block.norm.weight, model.block.norm.bias)
                       + norm_bias.view(-1, *([1] * dims)))


def test_bitfit_on_clip_patch_embedding_without_a_bias_refuses_to_merge() -> None:
    model = tiny_model("clip").vision_model
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    bare = model(pixel_values=x).last_hidden_state
    delta = BitFitModel(model, modified_modules=["embeddings.patch_embedding", "attn.q"])
    lora = LoraModel(model, modified_modules=["embeddings.patch_embedding", "attn.q", "attn.v"], lora_r=4)
    assert torch.equal(model(pixel_values=x).last_hidden_state, bare)
    perturb(delta, seed=1, scale=0.1)
    perturb(lora, seed=2, scale=0.1)
    out, weights = model(pixel_values=x).last_hidden_state, snapshot(model)
    with pytest.raises(DeltaStateError, match="without a bias"):
        delta.merge()
    assert_state_equal(model, weights)
    delta.detach()
    without_bitfit = model(pixel_values=x).last_hidden_state
    lora.merge()
    assert_same_function(model(pixel_values=x).last_hidden_state, without_bitfit, **conv_size(model, positions=10))
    lora.unmerge()
    delta.attach()
    assert torch.equal(model(pixel_values=x).last_hidden_state, out)


# ------------------------------------------------------------------------------------------------ serving
def conv_group(model: nn.Module) -> DeltaGroup:
    group = DeltaGroup(model)
    for i, r in enumerate([2, 4, 6]):
        delta = LoraModel(model, modified_modules=ALL, lora_r=r, name="abc"[i])
        perturb(delta, seed=10 + i, scale=0.2)
        delta.detach()
        group.add(delta)
    bias = BitFitModel(model, modified_modules=["conv_in", "block.norm", "down"], name="shift")
    perturb(bias, seed=20, scale=0.2)
    bias.detach()
    group.add(bias)
    return group


def each_alone(group: DeltaGroup, model: nn.Module, x: torch.Tensor, names: list[Any]) -> list[torch.Tensor]:
    out = []
    for i, name in enumerate(names):
        group.switch(name)
        with torch.no_grad():
            out.append(model(x[i : i + 1])[0])
    group.switch(None)
    return out


def test_switching_conv_deltas_back_and_forth_is_exact() -> None:
    model, x = conv_net(2), images(2)
    base = model(x)
    group = conv_group(model)
    outputs = {}
    for name in ["a", "b", "shift", "c"]:
        group.switch(name)
        outputs[name] = model(x)
    for name in ["c", "shift", "a", "b", None]:
        group.switch(name)
        assert torch.equal(model(x), base if name is None else outputs[name])


@pytest.mark.parametrize("path", ["gather", "segment"])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_a_mixed_batch_of_conv_deltas_equals_each_row_alone(dims: int, path: str) -> None:
    model = conv_net(dims)
    group = conv_group(model)
    names = ["b", None, "a", "shift", "c", "a"]
    x = images(dims, n=len(names))
    with torch.inference_mode(), group.route(names, path=path):
        routed = model(x)
    assert any(r.calls[path] for r in group._routers or [])
    for i, ref in enumerate(each_alone(group, model, x, names)):
        assert_same_function(routed[i], ref, **conv_size(model))


def test_routing_refuses_an_unbatched_input_to_a_convolution() -> None:
    model = conv_net(2)
    group = conv_group(model)
    x = images(2, n=1)[0]  # (C, H, W): no batch dimension
    with torch.no_grad(), group.route(["a"], path="gather"), pytest.raises(DeltaError, match="unbatched input"):
        model.conv_in(x)


# ------------------------------------------------------------------------------------------------ refusals
def unchanged(model: nn.Module):
    state, hooks = snapshot(model), hook_counts(model)

    def check() -> None:
        assert_state_equal(model, state)
        assert hook_counts(model) == hooks

    return check


@pytest.mark.parametrize(("build", "error", "match"), [
    (lambda m: LoraModel(m, modified_modules=["grouped"], lora_r=3), UnsupportedModuleError,
     r"'grouped'.*lora_r=3.*multiple of groups=2"),
    (lambda m: LoraModel(m, modified_modules=["conv_out"], lora_r=10_000), DeltaConfigError,
     r"'conv_out'.*max\(in_channels \* prod\(kernel_size\), out_channels\)"),
    (lambda m: DoraModel(m, modified_modules=["conv_in"]), UnsupportedModuleError, r"DoRA cannot modify 'conv_in'"),
])
def test_bad_settings_on_a_convolution_are_refused_before_any_change(build: Any, error: type, match: str) -> None:
    model = conv_net(2)
    check = unchanged(model)
    with pytest.raises(error, match=match):
        build(model)
    check()


@pytest.mark.parametrize("module", [nn.ConvTranspose2d(4, 4, 3), nn.LazyConv2d(4, 3)])
def test_lora_refuses_transposed_and_unmaterialised_convolutions(module: nn.Module) -> None:
    model = nn.Sequential(module)
    match = "transposed convolutions" if isinstance(module, nn.ConvTranspose2d) else "has not run yet"
    with pytest.raises(UnsupportedModuleError, match=match):
        LoraModel(model, modified_modules=["0"], lora_r=2)
    assert not hook_counts(model)["0"][0]


ADAPTERS = {
    "adapter": lambda m, mods: AdapterModel(m, modified_modules=mods, bottleneck_dim=4),
    "low_rank_adapter": lambda m, mods: LowRankAdapterModel(m, modified_modules=mods, reduction_factor=2),
    "compacter": lambda m, mods: CompacterModel(m, modified_modules=mods, reduction_factor=2),
    "parallel_adapter": lambda m, mods: ParallelAdapterModel(m, modified_modules=mods, bottleneck_dim=4),
}


@pytest.mark.parametrize("dims", [1, 3])
@pytest.mark.parametrize("method", list(ADAPTERS))
def test_adapters_on_a_convolution_are_refused_with_the_reason(method: str, dims: int) -> None:
    model = conv_net(dims)
    check = unchanged(model)
    with pytest.raises(UnsupportedModuleError, match=rf"'down' \(Conv{dims}d\).*channels-first \(N, C, \.\.\.\)"):
        ADAPTERS[method](model, ["down"])
    check()


def test_groupnorm_is_not_mistaken_for_a_last_dimension_norm() -> None:
    # A GroupNorm scales channels (dim 1); counted as a norm of the last dimension, an adapter on a conv block
    # ending in one was sized by its channels and added along the spatial axis whenever the two sizes agreed.
    model = nn.Sequential(nn.Sequential(nn.Conv2d(4, 8, 1), nn.GroupNorm(2, 8)))
    check = unchanged(model)
    with pytest.raises(UnsupportedModuleError, match=r"'0\.1' \(GroupNorm\).*channels-first"):
        AdapterModel(model, modified_modules=["0.1"], bottleneck_dim=2)
    with pytest.raises(UnsupportedModuleError, match="cannot tell the output size of '0'"):  # a block ending in one
        AdapterModel(model, modified_modules=["0"], bottleneck_dim=2)
    check()


def test_from_peft_refuses_conv_dora_and_hosts_peft_computes_differently(tmp_path) -> None:
    theirs = peft.get_peft_model(conv_net(2), peft.LoraConfig(r=4, target_modules=["conv_in"], use_dora=True))
    theirs.save_pretrained(tmp_path / "dora")
    model = conv_net(2)
    check = unchanged(model)
    with pytest.raises(CheckpointError, match=r"DoRA for 'conv_in', a Conv2d.*DoRA on Conv1d/Conv2d/Conv3d is not"):
        from_peft(tmp_path / "dora", model)
    check()
    # PEFT's lora_A ignores the host's reflect padding and dilation: the same factors compute another function.
    theirs = peft.get_peft_model(conv_net(2), peft.LoraConfig(r=4, target_modules=["dilated"]))
    theirs.save_pretrained(tmp_path / "dilated")
    with pytest.raises(CheckpointError, match=r"'dilated'.*padding_mode='reflect'.*Load this adapter with PEFT"):
        from_peft(tmp_path / "dilated", model)
    check()
    delta = LoraModel(model, modified_modules=["conv_in", "dilated"], lora_r=2)
    with pytest.raises(DeltaError, match=r"'dilated'.*padding_mode='reflect'"):
        export_to_peft(delta, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_peft_conv_difference_names_dilation_only_where_the_kernel_is_wide() -> None:
    from deltakit.integrations.peft import peft_conv_difference

    assert peft_conv_difference(conv_geometry(nn.Conv2d(2, 2, 1, dilation=2))) is None  # a 1x1 kernel: no effect
    assert "dilation=(2, 2)" in str(peft_conv_difference(conv_geometry(nn.Conv2d(2, 2, 3, dilation=2))))
    same = conv_geometry(nn.Conv1d(2, 2, 4, padding="same", padding_mode="circular"))
    assert same is not None and same.pre_pad == (1, 2)  # as PyTorch pads: the odd one on the right
