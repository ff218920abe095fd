"""18 architectures: every method's default positions attach and train on a tiny random instance; role inference
for architectures missing from the structure map (and plain nn.Module transformers), with clear ambiguity errors."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaModel

from deltakit import (
    AdapterModel,
    BitFitModel,
    CompacterModel,
    DeltaBase,
    LoraModel,
    LowRankAdapterModel,
    ModuleMatchError,
    ParallelAdapterModel,
)
from deltakit import structures
from deltakit.addressing import find_modules
from deltakit.structures import ROLE_NAMES, STRUCTURES, TINY_ARCHITECTURES, RoleAbsentError, infer_structure, tiny_model

from tests.helpers import assert_state_equal, hook_counts, snapshot

REQUIRED = {
    "bert", "roberta", "deberta-v2", "distilbert", "albert", "electra", "gpt2", "gpt_neox", "opt", "llama",
    "mistral", "qwen2", "gemma", "phi3", "t5", "bart", "vit", "clip",
}

METHODS: dict[str, Callable[[nn.Module], DeltaBase]] = {
    "lora": lambda m: LoraModel(m, lora_r=4, lora_alpha=8),
    "bitfit": lambda m: BitFitModel(m),
    "adapter": lambda m: AdapterModel(m, bottleneck_dim=6),
    "parallel_adapter": lambda m: ParallelAdapterModel(m, bottleneck_dim=6),
    "low_rank_adapter": lambda m: LowRankAdapterModel(m, reduction_factor=4, low_rank_rank=2),
    "compacter": lambda m: CompacterModel(m, reduction_factor=4),
}


def inputs_for(arch: str, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    kind = TINY_ARCHITECTURES[arch][3]
    out: dict[str, torch.Tensor] = {}
    if "text" in kind or kind == "seq2seq":
        out["input_ids"] = torch.randint(3, 128, (2, 6), generator=g)
    if kind == "seq2seq":
        out["decoder_input_ids"] = torch.randint(3, 128, (2, 5), generator=g)
    if "image" in kind:
        out["pixel_values"] = torch.randn(2, 3, 16, 16, generator=g)
    return out


def run(arch: str, model: nn.Module) -> torch.Tensor:
    out = model(**inputs_for(arch))
    return out.logits_per_image if arch == "clip" else out.last_hidden_state


def evaluate(arch: str, model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return run(arch, model)


def test_the_table_covers_the_required_architectures() -> None:
    assert REQUIRED <= set(TINY_ARCHITECTURES)
    for arch in REQUIRED:
        assert tiny_model(arch, num_layers=1).config.model_type in STRUCTURES, arch


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("arch", sorted(TINY_ARCHITECTURES))
def test_default_positions_attach_and_train(arch: str, method: str) -> None:
    model = tiny_model(arch, num_layers=1)
    frozen = snapshot(model)
    base = evaluate(arch, model)
    delta = METHODS[method](model)
    assert delta.sites
    assert torch.equal(evaluate(arch, model), base)  # identity at init
    delta.freeze_module(exclude=["deltas"])
    optimizer = torch.optim.Adam(delta.parameters(), lr=1e-2)
    run(arch, model).float().pow(2).mean().backward()
    own = {id(p) for p in delta.parameters()}
    for name, param in model.named_parameters():
        if id(param) in own:
            assert param.grad is not None, f"{name} received no gradient"
        else:
            assert not param.requires_grad and param.grad is None, name
    assert any(p.grad.abs().sum() > 0 for p in delta.parameters())
    optimizer.step()
    assert not torch.allclose(evaluate(arch, model), base)
    delta.detach()
    assert_state_equal(model, frozen)  # the backbone did not move
    assert torch.equal(evaluate(arch, model), base)


def _table_roles(model: nn.Module) -> dict[str, list[str]]:
    roles = {}
    for role in ROLE_NAMES:
        try:
            roles[role] = [n for n, _ in find_modules(model, [role])]
        except ModuleMatchError:
            pass
    return roles


@pytest.mark.parametrize("arch", sorted(TINY_ARCHITECTURES))
def test_inference_recovers_the_table_when_the_entry_is_hidden(
    arch: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    model = tiny_model(arch)
    expected = _table_roles(model)
    with_table = BitFitModel(model).detach().modified_modules
    monkeypatch.delitem(STRUCTURES, model.config.model_type)
    inferred = infer_structure(model)
    assert not inferred.ambiguous
    for role in ROLE_NAMES:
        assert inferred.roles.get(role, []) == expected.get(role, []), role
    with caplog.at_level(logging.WARNING, logger="deltakit.structures"):
        delta = BitFitModel(model)  # every role but embed
    assert delta.modified_modules == with_table
    assert "no structure map" in caplog.text and "attn.q ->" in caplog.text


def test_fused_projections_are_modified_once_as_a_whole() -> None:
    for arch, fused in (("gpt2", "attn.c_attn"), ("gpt_neox", "attention.query_key_value"), ("phi3", "self_attn.qkv_proj")):
        model = tiny_model(arch)
        names = [n for n, _ in find_modules(model, ["attn.q", "attn.k", "attn.v"])]
        assert len(names) == 2 and all(n.endswith(fused) for n in names), names
        assert LoraModel(model).modified_modules == names
    phi3 = tiny_model("phi3")
    assert [n for n, _ in find_modules(phi3, ["ff.w1"])] == [n for n, _ in find_modules(phi3, ["ff.gate"])]


class MyLlamaConfig(LlamaConfig):
    model_type = "my_llama"  # not in the structure map


def test_unknown_model_type_gets_inferred_roles_and_a_log(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    model = LlamaModel(MyLlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     num_key_value_heads=1, vocab_size=64))
    with caplog.at_level(logging.WARNING, logger="deltakit.structures"):
        delta = BitFitModel(model)
    assert "model_type 'my_llama'" in caplog.text and "ff.gate -> 'layers.0.mlp.gate_proj'" in caplog.text
    per_layer = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                 "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm"]
    assert sorted(delta.modified_modules) == sorted(f"layers.{i}.{p}" for i in range(2) for p in per_layer)


class Block(nn.Module):
    """A hand-written pre-norm transformer block with names deltakit has never seen."""

    def __init__(self, dim: int = 16, wide: int = 40, attn_names: tuple[str, ...] = ("wq", "wk", "wv", "wo")) -> None:
        super().__init__()
        self.norm_a = nn.LayerNorm(dim)
        self.attn = nn.Module()
        for n in attn_names:
            setattr(self.attn, n, nn.Linear(dim, dim))
        self.attn_names = attn_names
        self.norm_b = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, wide)
        self.back = nn.Linear(wide, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm_a(x)
        q, k, v, o = (getattr(self.attn, n) for n in self.attn_names)
        scores = torch.softmax(q(h) @ k(h).transpose(-1, -2) / 4.0, dim=-1)
        x = x + o(scores @ v(h))
        return x + self.back(torch.relu(self.up(self.norm_b(x))))


class TinyTransformer(nn.Module):
    def __init__(self, **block_kwargs: object) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.tok = nn.Embedding(50, 16)
        self.blocks = nn.ModuleList(Block(**block_kwargs) for _ in range(3))  # type: ignore[arg-type]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tok(ids)
        for block in self.blocks:
            x = block(x)
        return x


def test_a_custom_module_transformer_gets_its_roles_inferred(caplog: pytest.LogCaptureFixture) -> None:
    model = TinyTransformer()
    ids = torch.randint(0, 50, (2, 5))
    base = model(ids)
    with caplog.at_level(logging.WARNING, logger="deltakit.structures"):
        lora = LoraModel(model, modified_modules=["attn.q", "attn.v", "ff.w2"], lora_r=2)
    assert "this model (no transformers config)" in caplog.text
    assert lora.modified_modules == [f"blocks.{i}.{p}" for i in range(3) for p in ("attn.wq", "attn.wv", "back")]
    structure = infer_structure(model)
    assert structure.roles["attn.o"] == [f"blocks.{i}.attn.wo" for i in range(3)]
    assert structure.roles["ff.w1"] == [f"blocks.{i}.up" for i in range(3)]
    assert structure.roles["attn.norm"] == [f"blocks.{i}.norm_a" for i in range(3)]
    assert structure.roles["ff.norm"] == [f"blocks.{i}.norm_b" for i in range(3)]
    assert structure.roles["embed"] == ["tok"]
    adapter = AdapterModel(model, bottleneck_dim=4)  # defaults attn.o and ff.w2, inferred
    assert len(adapter.sites) == 6
    lora.freeze_module(exclude=["deltas"])
    for p in adapter.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.Adam([*lora.parameters(), *adapter.parameters()], lr=1e-2)
    model(ids).pow(2).mean().backward()
    optimizer.step()
    assert not torch.allclose(model(ids), base)
    with pytest.raises(RoleAbsentError, match="ff.gate"):
        LoraModel(model, modified_modules=["ff.gate"])


def test_untied_embeddings_of_the_vocabulary_size_are_ambiguous() -> None:
    model = TinyTransformer()
    model.extra = nn.Embedding(50, 16)  # a second, untied embedding of the same size
    with pytest.raises(ModuleMatchError, match=r"'embed'.*candidates: 'tok', 'extra'"):
        LoraModel(model, modified_modules=["embed"])


def test_ambiguous_inference_is_an_error_listing_candidates_and_changes_nothing() -> None:
    model = TinyTransformer(attn_names=("a", "b", "c", "d"))
    keys, hooks, state = list(model.state_dict()), hook_counts(model), snapshot(model)
    with pytest.raises(ModuleMatchError) as info:
        LoraModel(model)  # default attn.q, attn.v
    message = str(info.value)
    assert "Cannot infer the role 'attn.q'" in message and "'blocks.0.attn.a'" in message and "'blocks.0.attn.d'" in message
    assert "modified_modules" in message
    assert list(model.state_dict()) == keys and hook_counts(model) == hooks
    assert_state_equal(model, state)
    # the FFN is still unambiguous
    assert LoraModel(model, modified_modules=["ff.w1"]).modified_modules == [f"blocks.{i}.up" for i in range(3)]


def test_packed_attention_has_no_separate_query_projection() -> None:
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, batch_first=True)
    model = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    with pytest.raises(ModuleMatchError, match=r"'attn.q'.*no module is named like the q projection.*out_proj"):
        LoraModel(model, modified_modules=["attn.q"])
    assert infer_structure(model).roles["ff.w1"] == ["layers.0.linear1", "layers.1.linear1"]


def test_no_layers_means_a_clear_error() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(ModuleMatchError, match="found no transformer layers"):
        LoraModel(model, modified_modules=["attn.q"])


def test_tiny_model_rejects_unknown_names() -> None:
    with pytest.raises(ModuleMatchError, match="llama"):
        structures.tiny_model("no-such-arch")


def test_norm_shape_ignores_deltakit_site_children_but_not_other_children() -> None:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from deltakit.hooks import DeltaSite

    norm = LlamaRMSNorm(8)
    assert structures.norm_shape(norm) == (8,)
    norm.add_module("bitfit", DeltaSite())  # what an attached delta leaves on its host
    assert structures.norm_shape(norm) == (8,)
    norm.add_module("proj", nn.Linear(8, 8))  # a norm with a real sub-module is not RMSNorm-like
    assert structures.norm_shape(norm) is None
