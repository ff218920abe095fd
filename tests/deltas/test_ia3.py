"""(IA)^3 (deltakit/deltas/ia3.py): where it scales, the fused q/k/v projection, merging, routing, switching and
PEFT interop. The generic lifecycle (identity, exact detach, save/load, dtype moves) runs in tests/core/test_contract.py
for every architecture; here are the method's own promises."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deltakit import (
    AutoDeltaModel, CheckpointError, DeltaConfigError, DeltaGroup, DeltaStateError, IA3Model, LoraModel,
    UnsupportedModuleError,
)
from deltakit.checkpoint import WEIGHTS_NAME, read_weights
from deltakit.deltas.ia3 import IA3InputSite, IA3Site
from deltakit.integrations.peft import PEFT_CONFIG_NAME, export_to_peft, from_peft
from deltakit.structures import tiny_model

from tests.helpers import ARCHS, Arch, assert_state_equal, hook_counts, perturb, snapshot
from tests.tolerances import assert_same_function


def ones_plus_noise(delta: IA3Model, seed: int = 0, scale: float = 0.3) -> None:
    """Vectors near one, as after training (``perturb`` would put them around zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in delta.parameters():
            p.copy_(1 + torch.randn(p.shape, generator=g) * scale)


# ------------------------------------------------------------------------------------------------ positions
def test_default_positions_scale_keys_values_and_the_ffn_input(arch: Arch) -> None:
    model = arch.build()
    delta = IA3Model(model)
    kinds = {s.name: type(s.module) for s in delta.sites}
    inputs = [n for n, k in kinds.items() if k is IA3InputSite]
    outputs = [n for n, k in kinds.items() if k is IA3Site]
    assert inputs and outputs
    ffn_output = {"bert": "output.dense", "roberta": "output.dense", "gpt2": "mlp.c_proj", "t5": "DenseReluDense.wo",
                  "llama": "mlp.down_proj"}[arch.name]
    assert all(n.endswith(ffn_output) and "attention" not in n for n in inputs)
    assert all(p.dtype == torch.float32 and torch.equal(p, torch.ones_like(p)) for p in delta.parameters())


def test_gpt2_fused_projection_scales_only_keys_and_values() -> None:
    model = ARCHS["gpt2"].build()
    host = model.transformer.h[0].attn.c_attn
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = host(x)
    delta = IA3Model(model)
    site = next(s.module for s in delta.sites if s.host is host)
    assert isinstance(site, IA3Site) and site.scale.numel() == 64  # k and v of 3 x 32 outputs
    ones_plus_noise(delta)
    with torch.no_grad():
        scaled = host(x)
    assert torch.equal(scaled[..., :32], base[..., :32])  # queries untouched
    assert torch.equal(scaled[..., 32:], base[..., 32:] * site.scale)


def test_fused_all_scales_the_whole_output_as_peft_does() -> None:
    delta = IA3Model(ARCHS["gpt2"].build(), fused_qkv="all")
    assert {s.module.scale.numel() for s in delta.sites if isinstance(s.module, IA3Site)} == {96}


@pytest.mark.parametrize("arch_name, expected", [("gpt_neox", "interleaved"), ("phi3", "contiguous")])
def test_fused_layouts_of_other_architectures(arch_name: str, expected: str) -> None:
    model = tiny_model(arch_name)
    delta = IA3Model(model, modified_modules=["attn.k"])
    site = delta.sites[0].module
    out = delta.sites[0].host.out_features
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    positions = site.positions.tolist()
    if expected == "contiguous":  # [q | k | v]
        assert positions == list(range(cfg.num_attention_heads * head_dim, out))
    else:  # per head [q | k | v]
        assert positions[:head_dim] == list(range(head_dim, 2 * head_dim))
        assert len(positions) == 2 * out // 3


def test_feedforward_input_is_scaled_before_the_projection() -> None:
    model = ARCHS["llama"].build()
    delta = IA3Model(model)
    ones_plus_noise(delta)
    host = model.model.layers[0].mlp.down_proj
    site = next(s.module for s in delta.sites if s.host is host)
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(host(x), F.linear(x * site.scale, host.weight))  # the same operations: bit for bit


def test_explicit_feedforward_modules_choose_the_input_sites() -> None:
    delta = IA3Model(ARCHS["bert"].build(), modified_modules=["attn.v", "attn.o", "ff.w1"],
                     feedforward_modules=["attention.output.dense"])
    kinds = {s.name.split("layer.")[1][2:]: type(s.module) for s in delta.sites if ".layer.0." in s.name}
    assert kinds == {"attention.self.value": IA3Site, "attention.output.dense": IA3InputSite,
                     "intermediate.dense": IA3Site}
    none = IA3Model(ARCHS["bert"].build(), feedforward_modules=[])
    assert all(isinstance(s.module, IA3Site) for s in none.sites)


def test_detach_removes_the_pre_hooks_too() -> None:
    arch = ARCHS["t5"]
    model = arch.build()
    base, hooks, state = arch.run(model), hook_counts(model), snapshot(model)
    delta = IA3Model(model)
    ones_plus_noise(delta)
    attached = arch.run(model)
    assert any(pre for _, pre in hook_counts(model).values())
    delta.detach()
    assert hook_counts(model) == hooks and torch.equal(arch.run(model), base)
    assert_state_equal(model, state)
    delta.attach()
    assert torch.equal(arch.run(model), attached)


# ------------------------------------------------------------------------------------------------ training
def test_training_step_reaches_every_vector_and_nothing_else() -> None:
    arch = ARCHS["gpt2"]
    model = arch.build().train()
    delta = IA3Model(model)
    delta.freeze_module(exclude=["deltas"])
    optimizer = torch.optim.SGD(delta.parameters(), lr=0.1)
    before = [p.detach().clone() for p in delta.parameters()]
    arch.run(model).float().pow(2).mean().backward()
    optimizer.step()
    assert all(not torch.equal(p, b) for p, b in zip(delta.parameters(), before))


# ------------------------------------------------------------------------------------------------ merge
def test_merge_folds_vectors_and_unmerge_restores_exactly(arch: Arch) -> None:
    model = arch.build()
    delta = IA3Model(model)
    ones_plus_noise(delta)
    attached, weights = arch.run(model), snapshot(model)
    delta.merge()
    assert hook_counts(model) == {n: (0, 0) for n in hook_counts(model)}
    assert_same_function(arch.run(model), attached, model=model)
    delta.unmerge()
    assert_state_equal(model, weights)
    assert torch.equal(arch.run(model), attached)


def test_inexact_merge_is_refused_and_changes_nothing() -> None:
    arch = ARCHS["bert"]
    model = arch.build()
    delta = IA3Model(model)
    ones_plus_noise(delta)
    attached, weights = arch.run(model), snapshot(model)
    with pytest.raises(DeltaStateError, match="exact_unmerge=False"):
        delta.merge(exact_unmerge=False)
    assert delta.state == "attached" and torch.equal(arch.run(model), attached)
    assert_state_equal(model, weights)


def test_merging_an_input_scale_under_another_delta_reading_that_input_is_refused() -> None:
    arch = ARCHS["llama"]
    model = arch.build()
    ia3 = IA3Model(model, modified_modules=["ff.w2"])
    ones_plus_noise(ia3)
    lora = LoraModel(model, modified_modules=["ff.w2"], lora_r=2)
    perturb(lora, scale=0.3)
    both, weights = arch.run(model), snapshot(model)
    with pytest.raises(DeltaStateError, match="rewrites the input of .*which the other deltas there read too"):
        ia3.merge()
    assert ia3.state == "attached" and torch.equal(arch.run(model), both)
    assert_state_equal(model, weights)
    lora.detach()
    ia3.merge()  # alone on its hosts: fine
    # Merged, it no longer scales the input that a delta attached there would read: attaching one is refused.
    merged, hooks = arch.run(model), hook_counts(model)
    with pytest.raises(DeltaStateError, match="rewrites the input of .* and is merged into its weights"):
        lora.attach()
    assert lora.state == "detached" and hook_counts(model) == hooks and torch.equal(arch.run(model), merged)
    ia3.unmerge()
    lora.attach()
    assert torch.equal(arch.run(model), both)


# ------------------------------------------------------------------------------------------------ serving
def _group(model: nn.Module, names: list[str]) -> DeltaGroup:
    group = DeltaGroup(model)
    for i, name in enumerate(names):
        delta = IA3Model(model, name=name, fused_qkv="all" if i == 2 else "kv")
        ones_plus_noise(delta, seed=10 + i)
        group.add(delta.detach())
    return group


def test_routed_batch_equals_each_row_alone(arch: Arch) -> None:
    model = arch.build()
    group = _group(model, ["a", "b", "c"])
    rows = ["b", None, "a", "c", "b"]
    batch = {k: v.repeat(3, 1)[: len(rows)] for k, v in arch.inputs().items()}
    with torch.no_grad(), group.route(rows):
        mixed = arch.run(model, batch)
    for i, name in enumerate(rows):
        group.switch(name)
        with torch.no_grad():
            alone = arch.run(model, {k: v[i : i + 1] for k, v in batch.items()})
        assert_same_function(mixed[i], alone[0], model=model)
    group.switch(None)
    assert not torch.allclose(mixed[0], mixed[1], atol=1e-4) or not torch.allclose(mixed[0], mixed[2], atol=1e-4)


def test_switching_back_and_forth_is_exact() -> None:
    arch = ARCHS["gpt2"]
    model = arch.build()
    group = _group(model, ["a", "b"])
    outputs = {}
    for name in ("a", "b", None):
        group.switch(name)
        outputs[name] = arch.run(model)
    assert not torch.equal(outputs["a"], outputs["b"])
    for name in ("b", "a", None, "a"):
        group.switch(name)
        assert torch.equal(arch.run(model), outputs[name])


# ------------------------------------------------------------------------------------------------ checkpoints
def test_checkpoint_holds_the_vectors_and_round_trips(tmp_path) -> None:
    arch = ARCHS["gpt2"]
    model = arch.build()
    delta = IA3Model(model, modified_modules=["c_attn", "mlp.c_fc", "mlp.c_proj"], feedforward_modules=["c_fc"])
    ones_plus_noise(delta)
    attached = arch.run(model)
    delta.save_finetuned(tmp_path)
    stored = read_weights(tmp_path / WEIGHTS_NAME)
    assert sorted(stored) == sorted(delta.delta_state_dict()) and all(k.endswith(".ia3.scale") for k in stored)
    assert stored["transformer.h.0.attn.c_attn.ia3.scale"].shape == (64,)
    fresh = arch.build()
    loaded = AutoDeltaModel.from_finetuned(tmp_path, backbone_model=fresh)
    assert isinstance(loaded, IA3Model) and loaded.config == delta.config
    assert [type(s.module) for s in loaded.sites] == [type(s.module) for s in delta.sites]
    assert torch.equal(arch.run(fresh), attached)


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_hosts_and_settings_are_clear_errors_and_change_nothing() -> None:
    model = ARCHS["bert"].build()
    state, hooks = snapshot(model), hook_counts(model)
    with pytest.raises(UnsupportedModuleError, match="word_embeddings.*Embedding"):
        IA3Model(model, modified_modules=["word_embeddings"])
    with pytest.raises(UnsupportedModuleError, match="LayerNorm"):
        IA3Model(model, modified_modules=["attention.output.LayerNorm"])
    with pytest.raises(DeltaConfigError, match="feedforward_modules pattern 'intermediate.dense' matches none"):
        IA3Model(model, feedforward_modules=["intermediate.dense"])
    with pytest.raises(DeltaConfigError, match="fused_qkv"):
        IA3Model(model, fused_qkv="q")
    with pytest.raises(DeltaConfigError, match="feedforward_modules"):
        IA3Model(model, feedforward_modules=[3])
    assert_state_equal(model, state)
    assert hook_counts(model) == hooks and not any("ia3" in n for n, _ in model.named_modules())


# ------------------------------------------------------------------------------------------------ PEFT
peft = pytest.importorskip("peft")

PEFT_ARCHS = ("bert", "gpt2", "llama")


@pytest.fixture(autouse=True)
def _quiet() -> None:
    warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
    warnings.filterwarnings("ignore", category=FutureWarning)


def _hidden(model: nn.Module) -> torch.Tensor:
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _same_as_peft(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert_same_function(ours, theirs, depth=2 * 33, reduction=128)  # bound of the largest tiny model compared


@pytest.mark.parametrize("arch", PEFT_ARCHS)
def test_export_loads_in_peft_with_the_same_outputs(arch: str, tmp_path) -> None:
    model = tiny_model(arch)
    delta = IA3Model(model)
    ones_plus_noise(delta)
    ours = _hidden(model)
    export_to_peft(delta, tmp_path)
    config = json.loads((tmp_path / PEFT_CONFIG_NAME).read_text())
    assert config["peft_type"] == "IA3" and set(config["feedforward_modules"]) < set(config["target_modules"])
    theirs = peft.PeftModel.from_pretrained(tiny_model(arch), tmp_path).eval()
    _same_as_peft(_hidden(theirs), ours)
    assert not torch.allclose(_hidden(tiny_model(arch)), ours)


@pytest.mark.parametrize("arch", PEFT_ARCHS)
def test_peft_adapter_imports_with_the_same_outputs_and_exports_back(arch: str, tmp_path) -> None:
    theirs_model = peft.get_peft_model(tiny_model(arch), peft.IA3Config())
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in theirs_model.named_parameters():
            if "ia3_l" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
    theirs_model.eval().save_pretrained(tmp_path / "peft")
    theirs = _hidden(theirs_model)
    model = tiny_model(arch)
    delta = from_peft(tmp_path / "peft", model)
    assert isinstance(delta, IA3Model) and delta.state == "attached"
    # PEFT scales GPT-2's queries too: the import keeps that (fused_qkv="all")
    assert delta.config.fused_qkv == ("all" if arch == "gpt2" else "kv")
    _same_as_peft(_hidden(model), theirs)
    export_to_peft(delta, tmp_path / "again")
    again = read_weights(tmp_path / "again" / "adapter_model.safetensors")
    original = read_weights(tmp_path / "peft" / "adapter_model.safetensors")
    assert again.keys() == original.keys() and all(torch.equal(again[k], original[k]) for k in original)


def test_a_fused_vector_with_unit_queries_imports_as_keys_and_values_only(tmp_path) -> None:
    model = tiny_model("gpt2")
    delta = IA3Model(model)
    ones_plus_noise(delta)
    export_to_peft(delta, tmp_path)
    loaded = from_peft(tmp_path, tiny_model("gpt2"))
    assert loaded.config.fused_qkv == "kv"
    assert all(torch.equal(a, b) for a, b in zip(loaded.parameters(), delta.parameters()))


def test_peft_files_that_do_not_fit_are_refused_and_change_nothing(tmp_path) -> None:
    peft.get_peft_model(tiny_model("llama"), peft.IA3Config()).save_pretrained(tmp_path / "ok")
    model = tiny_model("bert")
    state = snapshot(model)
    with pytest.raises(CheckpointError, match="does not exist in this backbone"):
        from_peft(tmp_path / "ok", model)
    config_file = tmp_path / "ok" / PEFT_CONFIG_NAME
    config = json.loads(config_file.read_text())
    config["feedforward_modules"] = []  # the file's (1, in) vectors now contradict the config
    config_file.write_text(json.dumps(config))
    llama = tiny_model("llama")
    llama_state = snapshot(llama)
    with pytest.raises(CheckpointError, match=r"ia3_l of shape \(1, 64\)"):
        from_peft(tmp_path / "ok", llama)
    config["some_future_option"] = True
    config_file.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="some_future_option"):
        from_peft(tmp_path / "ok", llama)
    assert_state_equal(model, state)
    assert_state_equal(llama, llama_state)


def test_blocked_scale_gradient_equals_plain_autograd() -> None:
    """The training path computes both gradients block by block (deltakit/deltas/ia3.py, scale_backward): same as
    autograd's ``x * l`` to rounding, for inputs longer than one block."""
    from deltakit.deltas.ia3 import block_rows, scale_features

    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, block_rows(24) + 17, 24, generator=g, requires_grad=True)
    scale = (1 + 0.2 * torch.randn(24, generator=g)).requires_grad_()
    upstream = torch.randn(3, block_rows(24) + 17, 24, generator=g)
    grads = torch.autograd.grad(scale_features(x, scale, in_place=False), (x, scale), upstream)
    expected = torch.autograd.grad(x * scale, (x, scale), upstream)
    assert torch.equal(grads[0], expected[0])  # the same product
    assert_same_function(grads[1], expected[1], depth=1, reduction=x.shape[0] * x.shape[1],
                         scale=(upstream * x).abs().max().item())


def test_scale_gradient_of_a_half_precision_input_accumulates_in_float32() -> None:
    """l's gradient sums ``grad * x`` over every row: in bfloat16 the partial sums of a long input lose precision
    at each addition, so the sum runs in float32 and only the result is rounded (within one bfloat16 rounding of
    the exact sum)."""
    from deltakit.deltas.ia3 import scale_features

    g = torch.Generator().manual_seed(5)
    rows, width = 64 * 1024, 8  # many rows: many partial sums
    # Positive terms: no cancellation, so the exact sum's magnitude bounds the error of every partial sum.
    x = torch.rand(rows, width, generator=g).to(torch.bfloat16).requires_grad_()
    scale = torch.ones(width, dtype=torch.bfloat16, requires_grad=True)
    upstream = torch.rand(rows, width, generator=g).to(torch.bfloat16)
    (grad,) = torch.autograd.grad(scale_features(x, scale, in_place=False), (scale,), upstream)
    exact = (upstream.double() * x.detach().double()).sum(0)
    assert grad.dtype == torch.bfloat16
    assert ((grad.double() - exact).abs() / exact).max() <= 2.0**-8  # one rounding of bfloat16 (8 bits)
