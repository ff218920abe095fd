"""Checkpoint size: the compact delta_config.json (range-form site list) and the bytes-over-raw-tensors bound."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

from deltakit import AutoDeltaModel, LoraModel
from deltakit.checkpoint import WEIGHTS_NAME, compress_sites, expand_sites
from deltakit.config import CONFIG_NAME
from deltakit.errors import CheckpointError

from .conftest import hook_counts, perturb, snapshot, tiny_bert

BOUND = 4096


def _bert(layers: int) -> nn.Module:
    torch.manual_seed(0)
    return BertModel(BertConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=64,
                                vocab_size=100, max_position_embeddings=64)).eval()


def _llama(layers: int) -> nn.Module:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=100)).eval()


def _overhead(delta, path) -> tuple[int, int, int]:
    """(total bytes - raw tensor bytes, safetensors header bytes, config bytes)."""
    delta.save_finetuned(path)
    total = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    raw = sum(p.numel() * p.element_size() for p in delta.parameters())
    with open(os.path.join(path, WEIGHTS_NAME), "rb") as handle:
        header = 8 + struct.unpack("<Q", handle.read(8))[0]
    return total - raw, header, os.path.getsize(os.path.join(path, CONFIG_NAME))


# ----------------------------------------------------------------------------- the range form


def test_compress_sites_examples() -> None:
    names = [f"model.layers.{i}.self_attn.{p}" for i in range(80) for p in ("q_proj", "v_proj")]
    assert compress_sites(names) == ["model.layers.{0-79}.self_attn.q_proj", "model.layers.{0-79}.self_attn.v_proj"]
    assert compress_sites(["lm_head", "h.0.attn", "x.3.y", "x.5.y", "x.6.y", "x.07.y"]) == [
        "lm_head", "h.0.attn", "x.{3,5-6}.y", "x.07.y"
    ]
    # T5: the first numeric component (the block) is the one folded.
    t5 = ["encoder.block.0.layer.0.SelfAttention.q", "encoder.block.1.layer.0.SelfAttention.q"]
    assert compress_sites(t5) == ["encoder.block.{0-1}.layer.0.SelfAttention.q"]
    assert compress_sites(["a.{0}.b"]) is None
    assert expand_sites(["x.{3,5-6}.y", "lm_head"]) == ["x.3.y", "x.5.y", "x.6.y", "lm_head"]


_part = st.one_of(st.sampled_from(["layer", "q", "attn", "h", "block", "dense"]), st.integers(0, 30).map(str))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(_part, min_size=1, max_size=5).map(".".join), max_size=40, unique=True))
def test_compress_then_expand_gives_back_the_same_names(names: list[str]) -> None:
    entries = compress_sites(names)
    assert entries is not None
    assert sorted(expand_sites(entries)) == sorted(names)
    assert len(entries) <= len(names)


@pytest.mark.parametrize("bad", ["x.{}.y", "x.{3-1}.y", "x.{a}.y", "x.{1.y", "x.1}.y", 7])
def test_malformed_site_ranges_are_checkpoint_errors(bad) -> None:
    with pytest.raises(CheckpointError, match="corrupt"):
        expand_sites([bad], "ckpt")


# ----------------------------------------------------------------------------- the bound


def test_lora_on_query_value_of_a_six_layer_bert_stays_within_4kb(tmp_path) -> None:
    """The MiniLM layout (6 layers, bert.encoder.layer.N... names): raw tensor bytes + at most 4 KB on disk."""
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=6, num_attention_heads=2,
                                                     intermediate_size=64, vocab_size=100, max_position_embeddings=64))
    delta = LoraModel(model, lora_r=16, modified_modules=["query", "value"])
    overhead, header, config = _overhead(delta, tmp_path / "ckpt")
    assert overhead == header + config
    assert overhead <= BOUND, (header, config)
    assert config < 800


def test_config_size_does_not_grow_with_the_number_of_layers(tmp_path) -> None:
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    sizes = []
    for layers in (2, 24):
        delta = LoraModel(_llama(layers), lora_r=4, modified_modules=targets)
        _, _, config = _overhead(delta, tmp_path / f"l{layers}")
        sizes.append(config)
    # 12x the sites, but only "{0-1}" -> "{0-23}" in each of the 7 entries and the layer count in the fingerprint.
    assert sizes[1] - sizes[0] == 7 + 1
    meta = json.loads((tmp_path / "l24" / CONFIG_NAME).read_text())
    assert meta["format_version"] == 2
    assert meta["sites"][0] == "model.layers.{0-23}.self_attn.q_proj" and len(meta["sites"]) == 7


def test_compact_config_is_still_one_key_per_line_json(tmp_path) -> None:
    delta = LoraModel(_bert(2), modified_modules=["query"])
    delta.save_finetuned(tmp_path)
    text = (tmp_path / CONFIG_NAME).read_text()
    lines = text.strip().splitlines()
    assert lines[0] == "{" and lines[-1] == "}"
    assert [json.loads("{" + line.rstrip(",") + "}") for line in lines[1:-1]]
    assert set(json.loads(text)) >= {"format", "format_version", "config", "sites", "fingerprint"}


# ----------------------------------------------------------------------------- compatibility and order


def test_version_1_checkpoints_still_load(tmp_path) -> None:
    model = _bert(3)
    delta = LoraModel(model, modified_modules=["query", "value"])
    perturb(delta)
    x = torch.randint(2, 100, (2, 5))
    out = model(x).last_hidden_state
    delta.save_finetuned(tmp_path)
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    meta["format_version"] = 1
    meta["sites"] = delta.modified_modules
    (tmp_path / CONFIG_NAME).write_text(json.dumps(meta, indent=2))
    fresh = _bert(3)
    loaded = AutoDeltaModel.from_finetuned(tmp_path, backbone_model=fresh)
    assert loaded.modified_modules == delta.modified_modules
    assert torch.equal(fresh(x).last_hidden_state, out)


def test_loaded_sites_follow_the_backbone_order(tmp_path) -> None:
    model = _bert(3)
    delta = LoraModel(model, modified_modules=["value", "query", "intermediate.dense"])
    perturb(delta)
    delta.save_finetuned(tmp_path)
    fresh = _bert(3)
    loaded = AutoDeltaModel.from_finetuned(tmp_path, backbone_model=fresh)
    assert loaded.modified_modules == delta.modified_modules
    assert list(loaded.delta_state_dict()) == list(delta.delta_state_dict())
    assert all(torch.equal(a, b) for a, b in zip(loaded.parameters(), delta.parameters()))


def test_module_names_with_braces_fall_back_to_the_plain_list(tmp_path) -> None:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.ModuleDict({"w{1}": nn.Linear(4, 4), "w2": nn.Linear(4, 4)}))

    model = build()
    delta = LoraModel(model, modified_modules=["w{1}", "w2"], lora_r=2)
    perturb(delta)
    x = torch.randn(3, 4)
    out = model[0]["w{1}"](x)
    delta.save_finetuned(tmp_path)
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert meta["format_version"] == 1 and meta["sites"] == ["0.w{1}", "0.w2"]
    fresh = build()
    AutoDeltaModel.from_finetuned(tmp_path, backbone_model=fresh)
    assert torch.equal(fresh[0]["w{1}"](x), out)


def test_a_corrupt_site_range_leaves_the_model_untouched(tmp_path) -> None:
    delta = LoraModel(tiny_bert(), modified_modules=["query"])
    delta.save_finetuned(tmp_path)
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    meta["sites"] = [meta["sites"][0].replace("{0-1}", "{1-0}")]
    (tmp_path / CONFIG_NAME).write_text(json.dumps(meta))
    model = tiny_bert()
    keys, hooks, state = list(model.state_dict()), hook_counts(model), snapshot(model)
    with pytest.raises(CheckpointError, match="malformed site range"):
        AutoDeltaModel.from_finetuned(tmp_path, backbone_model=model)
    assert list(model.state_dict()) == keys and hook_counts(model) == hooks
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
