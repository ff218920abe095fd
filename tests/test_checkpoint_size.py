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
from transformers import BertConfig, BertForSequenceClassification, BertModel, LlamaConfig, LlamaForCausalLM

from deltakit import AutoDeltaModel, LoraModel
from deltakit.checkpoint import WEIGHTS_NAME, compress_sites, expand_sites, pack_tensors, read_weights, unpack_tensors
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
    assert meta["format_version"] == 3
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


# ----------------------------------------------------------------------------- stacked tensors in the weights file


def _header(path) -> dict:
    with open(os.path.join(path, WEIGHTS_NAME), "rb") as handle:
        size = struct.unpack("<Q", handle.read(8))[0]
        return json.loads(handle.read(size))


def test_the_issue_setting_llama_12_layers_q_v_stays_within_4kb(tmp_path) -> None:
    """48 LoRA tensors (12 layers x q,v x A,B): one safetensors entry each would cost ~5.3 KB of header alone."""
    delta = LoraModel(_llama(12), lora_r=8, modified_modules=["q_proj", "v_proj"])
    overhead, header, config = _overhead(delta, tmp_path / "ckpt")
    assert overhead <= BOUND, (header, config)
    stored = {k for k in _header(tmp_path / "ckpt") if k != "__metadata__"}
    # k_proj/v_proj are narrower than q_proj (grouped-query attention): two shapes per parameter name.
    assert stored == {"lora_A#0", "lora_B#0", "lora_B#1"}


def test_header_size_does_not_grow_with_the_number_of_layers(tmp_path) -> None:
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    sizes = []
    for layers in (2, 24):
        delta = LoraModel(_llama(layers), lora_r=4, modified_modules=targets)
        _, header, _ = _overhead(delta, tmp_path / f"l{layers}")
        sizes.append(header)
    assert sizes[1] - sizes[0] <= 64, sizes  # only digits of shapes, offsets and ranges change


def test_read_weights_gives_back_exactly_the_named_tensors(tmp_path) -> None:
    model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                                     intermediate_size=64, vocab_size=100))
    delta = LoraModel(model, modified_modules=["query", "value", "intermediate.dense"], lora_r=2)
    delta.freeze_module(exclude=["deltas", "classifier"])
    perturb(delta)
    delta.save_finetuned(tmp_path)
    stored = read_weights(tmp_path)
    expected = dict(delta.delta_state_dict())
    expected.update({k: v for k, v in model.state_dict().items() if k.startswith("classifier.")})
    assert list(stored) != [] and set(stored) == set(expected)
    assert all(torch.equal(stored[k], expected[k]) for k in expected)
    # the tensors are independent copies (save_file refuses shared storage; callers may modify them)
    ptrs = [t.untyped_storage().data_ptr() for t in stored.values()]
    assert len(set(ptrs)) == len(ptrs)
    # classifier tensors are alone in their groups: stored under their own names
    assert {"classifier.weight", "classifier.bias"} <= set(_header(tmp_path))


@given(st.lists(st.tuples(st.integers(0, 5), st.sampled_from(["q", "v", "dense"]), st.sampled_from(["a", "b"]),
                          st.sampled_from([(2, 3), (3, 2), (4,)])), max_size=20, unique_by=lambda t: t[:3]))
@settings(max_examples=60, deadline=None)
def test_pack_then_unpack_is_the_identity(items) -> None:
    tensors = {f"layer.{i}.{m}.lora.{p}": torch.randn(shape) for i, m, p, shape in items}
    stored, stacks = pack_tensors(tensors)
    assert sum(t.numel() for t in stored.values()) == sum(t.numel() for t in tensors.values())
    back = unpack_tensors(stored, json.loads(json.dumps(stacks)))
    assert set(back) == set(tensors) and all(torch.equal(back[k], tensors[k]) for k in tensors)


def test_a_corrupt_stack_table_is_a_clear_error_and_changes_nothing(tmp_path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    delta = LoraModel(tiny_bert(), modified_modules=["query"])
    delta.save_finetuned(tmp_path)
    file = str(tmp_path / WEIGHTS_NAME)
    with safe_open(file, framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    model = tiny_bert()
    keys, hooks, state = list(model.state_dict()), hook_counts(model), snapshot(model)
    stacks = json.loads(metadata["stacks"])
    key = next(iter(stacks))
    for bad, message in (
        ("{not json", "corrupt stack table"),
        (json.dumps({key: stacks[key] + ["extra.owner"]}), "lists 3 owners"),
        (json.dumps({"missing#0": stacks[key]}), "does not hold"),
    ):
        save_file(tensors, file, metadata={**metadata, "stacks": bad})
        with pytest.raises(CheckpointError, match=message):
            AutoDeltaModel.from_finetuned(tmp_path, backbone_model=model)
        assert list(model.state_dict()) == keys and hook_counts(model) == hooks
        assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
