"""Checkpoint size and layout: one safetensors entry per tensor (about 100 header bytes each, plus the name), a
delta_config.json whose size does not grow with the number of layers (range-form site list), and the range form's
bounded expansion."""

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
from deltakit.checkpoint import FORMAT_VERSION, WEIGHTS_NAME, compress_sites, expand_sites, read_weights
from deltakit.config import CONFIG_NAME
from deltakit.errors import CheckpointError

from tests.helpers import hook_counts, perturb, snapshot, tiny_bert

#: Header bytes per safetensors entry besides its name: ``"<name>":{"dtype":"F32","shape":[8,32],
#: "data_offsets":[123456,124480]},`` is about 60 characters of framing; 100 leaves room for longer numbers.
PER_TENSOR = 100
#: The config: format, versions, hyper-parameters, range-form sites, fingerprint, hash (indented JSON).
CONFIG_BOUND = 1500


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


def _header_bound(delta) -> int:
    names = list(delta.delta_state_dict())
    return 8 + 32 + sum(len(n) + PER_TENSOR for n in names)  # + the length field and {"__metadata__":{"format":"pt"}}


def test_lora_on_query_value_of_a_six_layer_bert_costs_about_100_bytes_per_tensor(tmp_path) -> None:
    """The MiniLM layout (6 layers, bert.encoder.layer.N... names): raw tensor bytes + the header (one entry per
    tensor: its name and ~100 bytes) + a config of at most 1.5 KB."""
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=6, num_attention_heads=2,
                                                     intermediate_size=64, vocab_size=100, max_position_embeddings=64))
    delta = LoraModel(model, lora_r=16, modified_modules=["query", "value"])
    overhead, header, config = _overhead(delta, tmp_path / "ckpt")
    assert overhead == header + config
    assert header <= _header_bound(delta), header
    assert config <= CONFIG_BOUND, config


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
    assert meta["format_version"] == FORMAT_VERSION == 4
    assert meta["sites"][0] == "model.layers.{0-23}.self_attn.q_proj" and len(meta["sites"]) == 7


def test_the_config_is_plain_indented_json_and_saving_twice_gives_the_same_bytes(tmp_path) -> None:
    delta = LoraModel(_bert(2), modified_modules=["query"])
    perturb(delta)
    delta.save_finetuned(tmp_path / "a")
    delta.save_finetuned(tmp_path / "b")
    text = (tmp_path / "a" / CONFIG_NAME).read_text()
    meta = json.loads(text)
    assert text == json.dumps(meta, indent=2, ensure_ascii=False) + "\n"
    assert list(meta)[:2] == ["format", "format_version"]
    assert set(meta) >= {"config", "sites", "backbone_tensors", "fingerprint", "weights_sha256"}
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


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


# ----------------------------------------------------------------------------- one tensor per parameter


def _header(path) -> dict:
    with open(os.path.join(path, WEIGHTS_NAME), "rb") as handle:
        size = struct.unpack("<Q", handle.read(8))[0]
        return json.loads(handle.read(size))


def test_the_issue_setting_llama_12_layers_q_v_has_one_entry_per_tensor(tmp_path) -> None:
    """48 LoRA tensors (12 layers x q,v x A,B), each its own safetensors entry under its delta_state_dict name."""
    delta = LoraModel(_llama(12), lora_r=8, modified_modules=["q_proj", "v_proj"])
    overhead, header, config = _overhead(delta, tmp_path / "ckpt")
    stored = _header(tmp_path / "ckpt")
    assert stored.pop("__metadata__") == {"format": "pt"}
    assert set(stored) == set(delta.delta_state_dict()) and len(stored) == 48
    for name, tensor in delta.delta_state_dict().items():
        assert stored[name]["shape"] == list(tensor.shape) and stored[name]["dtype"] == "F32"
    assert header <= _header_bound(delta) and config <= CONFIG_BOUND, (header, config)


def test_any_safetensors_reader_sees_the_delta_tensors(tmp_path) -> None:
    from safetensors.torch import load_file

    delta = LoraModel(_llama(2), lora_r=4, modified_modules=["q_proj", "v_proj"])
    perturb(delta)
    delta.save_finetuned(tmp_path)
    loaded = load_file(str(tmp_path / WEIGHTS_NAME))
    expected = delta.delta_state_dict()
    assert set(loaded) == set(expected) and all(torch.equal(loaded[k], expected[k]) for k in expected)


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
    # the tensors are independent copies (callers may modify them)
    ptrs = [t.untyped_storage().data_ptr() for t in stored.values()]
    assert len(set(ptrs)) == len(ptrs)
    assert set(_header(tmp_path)) == set(expected) | {"__metadata__"}


def test_a_stacked_file_of_the_development_format_is_refused_clearly(tmp_path) -> None:
    from safetensors.torch import save_file

    delta = LoraModel(tiny_bert(), modified_modules=["query"])
    delta.save_finetuned(tmp_path)
    stacked = {"lora_A#0": torch.zeros(2, 8, 32), "lora_B#0": torch.zeros(2, 32, 8)}
    owners = ["bert.encoder.layer.{0-1}.attention.self.query.lora"]
    save_file(stacked, str(tmp_path / WEIGHTS_NAME), metadata={"format": "deltakit-delta", "stacks": json.dumps(
        {"lora_A#0": owners, "lora_B#0": owners})})
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    meta["format_version"] = 3
    del meta["weights_sha256"]
    (tmp_path / CONFIG_NAME).write_text(json.dumps(meta))
    model = tiny_bert()
    keys, hooks, state = list(model.state_dict()), hook_counts(model), snapshot(model)
    with pytest.raises(CheckpointError, match="stacks tensors.*save it again"):
        AutoDeltaModel.from_finetuned(tmp_path, backbone_model=model)
    with pytest.raises(CheckpointError, match="stacks tensors"):
        read_weights(tmp_path)
    assert list(model.state_dict()) == keys and hook_counts(model) == hooks
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


# ----------------------------------------------------------------------------- bounded expansion


def test_site_ranges_are_counted_before_they_are_expanded() -> None:
    with pytest.raises(CheckpointError, match="more sites than the 1,000"):
        expand_sites(["x.{0-999999999}.y"], "ckpt", limit=1000)
    with pytest.raises(CheckpointError, match="more sites than"):
        expand_sites(["x.{0-600}.y", "z.{0-600}.y"], "ckpt", limit=1000)
    with pytest.raises(CheckpointError, match="malformed site range"):
        expand_sites(["x.{0-100000000000}.y"], "ckpt")  # more than nine digits: refused unparsed
    with pytest.raises(CheckpointError, match="twice"):
        expand_sites(["x.{0-3,2}.y"], "ckpt")
    with pytest.raises(CheckpointError, match="more than one range"):
        expand_sites(["x.{0-3}.{0-3}"], "ckpt")
    assert len(expand_sites(["x.{0-999}.y"], "ckpt", limit=1000)) == 1000
