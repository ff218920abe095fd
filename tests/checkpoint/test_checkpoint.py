"""Delta-only checkpoints: contents, atomic writes, and every bad input leaving the backbone unchanged."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

import deltakit.checkpoint as checkpoint
from deltakit import (
    AutoDeltaConfig,
    AutoDeltaModel,
    BitFitModel,
    CheckpointError,
    DeltaConfigError,
    DeltaGroup,
    DeltaStateError,
    LoraConfig,
    LoraModel,
)
from deltakit.checkpoint import WEIGHTS_NAME, read_weights
from deltakit.config import CONFIG_NAME

from tests.helpers import (
    ARCHS,
    assert_state_equal,
    hook_counts,
    perturb,
    snapshot,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
    tiny_roberta,
)


@pytest.fixture
def trained(tmp_path):
    """A LoRA on tiny BERT with a trainable classifier head, saved to tmp_path/ckpt."""
    model = tiny_bert()
    delta = LoraModel(model, modified_modules=["query", "value"], lora_r=4)
    delta.freeze_module(exclude=["deltas", "classifier"])
    perturb(delta)
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    x = torch.randint(2, 100, (2, 6))
    out = model(x).logits
    path = delta.save_finetuned(tmp_path / "ckpt")
    return delta, path, x, out


def test_checkpoint_holds_only_delta_and_unfrozen_tensors(trained) -> None:
    delta, path, x, out = trained
    assert sorted(os.listdir(path)) == [CONFIG_NAME, WEIGHTS_NAME]
    stored = read_weights(path)
    assert set(stored) == set(delta.delta_state_dict()) | {"classifier.weight", "classifier.bias"}
    meta = json.loads(open(os.path.join(path, CONFIG_NAME)).read())
    assert meta["delta_type"] == "lora" and meta["config"]["lora_r"] == 4
    assert meta["backbone_tensors"] == ["classifier.weight", "classifier.bias"]
    assert meta["fingerprint"]["config"]["hidden_size"] == 32
    fresh = tiny_bert()
    loaded = LoraModel.from_finetuned(path, backbone_model=fresh)
    assert torch.equal(fresh(x).logits, out)
    assert loaded.unfrozen_parameter_names == ["classifier.weight", "classifier.bias"]


def test_from_finetuned_works_for_a_wrapped_backbone(trained) -> None:
    _, path, x, out = trained

    class Wrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = tiny_bert()

    wrapper = Wrapper()
    AutoDeltaModel.from_finetuned(path, backbone_model=wrapper)
    assert torch.equal(wrapper.inner(x).logits, out)


def _assert_untouched(model, keys, hooks, state) -> None:
    assert list(model.state_dict()) == keys
    assert hook_counts(model) == hooks
    assert_state_equal(model, state)


@pytest.fixture
def fresh():
    model = tiny_bert()
    return model, list(model.state_dict()), hook_counts(model), snapshot(model)


def test_loading_into_another_architecture_fails_cleanly(trained) -> None:
    _, path, _, _ = trained
    for build in (tiny_gpt2, tiny_llama):
        model = build()
        keys, hooks, state = list(model.state_dict()), hook_counts(model), snapshot(model)
        with pytest.raises(CheckpointError, match="does not exist in this backbone"):
            AutoDeltaModel.from_finetuned(path, backbone_model=model)
        _assert_untouched(model, keys, hooks, state)


def test_shape_mismatch_fails_cleanly(trained) -> None:
    _, path, _, _ = trained
    model = tiny_bert(hidden=48)
    keys, hooks, state = list(model.state_dict()), hook_counts(model), snapshot(model)
    with pytest.raises(CheckpointError, match="Shape mismatch"):
        AutoDeltaModel.from_finetuned(path, backbone_model=model)
    _assert_untouched(model, keys, hooks, state)


def test_missing_and_corrupt_files_fail_cleanly(trained, fresh, tmp_path) -> None:
    _, path, _, _ = trained
    model, keys, hooks, state = fresh
    with pytest.raises(CheckpointError, match="No delta checkpoint directory"):
        AutoDeltaModel.from_finetuned(tmp_path / "nope", backbone_model=model)
    weights = os.path.join(path, WEIGHTS_NAME)
    data = open(weights, "rb").read()
    with open(weights, "wb") as handle:
        handle.write(data[: len(data) // 2])  # truncated
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        AutoDeltaModel.from_finetuned(path, backbone_model=model)
    os.remove(weights)
    with pytest.raises(CheckpointError, match="No delta_model.safetensors"):
        AutoDeltaModel.from_finetuned(path, backbone_model=model)
    with open(os.path.join(path, CONFIG_NAME), "w") as handle:
        handle.write("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        AutoDeltaModel.from_finetuned(path, backbone_model=model)
    os.remove(os.path.join(path, CONFIG_NAME))
    with pytest.raises(CheckpointError, match="No delta_config.json"):
        AutoDeltaModel.from_finetuned(path, backbone_model=model)
    _assert_untouched(model, keys, hooks, state)


def test_wrong_delta_type_and_tampered_tensors_fail_cleanly(trained, fresh, tmp_path) -> None:
    _, path, _, _ = trained
    model, keys, hooks, state = fresh
    with pytest.raises(CheckpointError, match="not a BitFitModel"):
        BitFitModel.from_finetuned(path, backbone_model=model)
    other = tiny_bert()
    bitfit = BitFitModel(other, modified_modules=["query"])
    bitfit.save_finetuned(tmp_path / "bitfit")
    # a weights file from another delta under a lora config: it is not the file the config was saved with ...
    os.replace(tmp_path / "bitfit" / WEIGHTS_NAME, os.path.join(path, WEIGHTS_NAME))
    # (its header is checked against the tensors this delta needs before any data is read or hashed)
    with pytest.raises(CheckpointError, match="does not fit this delta on this backbone"):
        AutoDeltaModel.from_finetuned(path, backbone_model=model)
    # ... and, for a config without the recorded hash (older deltakit), its tensor names do not fit
    meta_path = os.path.join(path, CONFIG_NAME)
    meta = json.loads(open(meta_path).read())
    del meta["weights_sha256"]
    open(meta_path, "w").write(json.dumps(meta))
    with pytest.raises(CheckpointError, match="does not fit"):
        AutoDeltaModel.from_finetuned(path, backbone_model=model)
    _assert_untouched(model, keys, hooks, state)


def test_fingerprint_mismatch_is_an_error_with_an_opt_out(trained, tmp_path) -> None:
    delta, path, x, _ = trained
    meta_path = os.path.join(path, CONFIG_NAME)
    meta = json.loads(open(meta_path).read())
    meta["fingerprint"]["config"]["vocab_size"] = 12345
    open(meta_path, "w").write(json.dumps(meta))
    model = tiny_bert()
    keys, hooks, state = list(model.state_dict()), hook_counts(model), snapshot(model)
    with pytest.raises(CheckpointError, match="check_backbone=False"):
        AutoDeltaModel.from_finetuned(path, backbone_model=model)
    _assert_untouched(model, keys, hooks, state)
    loaded = AutoDeltaModel.from_finetuned(path, backbone_model=model, check_backbone=False)
    assert loaded.state == "attached"


def test_save_is_atomic_when_writing_fails(trained, monkeypatch) -> None:
    delta, path, _, _ = trained
    before = {n: open(os.path.join(path, n), "rb").read() for n in os.listdir(path)}
    perturb(delta, seed=99)

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.save, "write_tensor_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        delta.save_finetuned(path)
    after = {n: open(os.path.join(path, n), "rb").read() for n in os.listdir(path)}
    assert after == before  # old checkpoint intact, no temporary file left behind


def test_save_refuses_to_overwrite_when_asked_and_meta_tensors(trained, tmp_path) -> None:
    delta, path, _, _ = trained
    with pytest.raises(CheckpointError, match="overwrite=True"):
        delta.save_finetuned(path, overwrite=False)
    with torch.device("meta"):
        meta_model = tiny_llama()
    meta_delta = LoraModel(meta_model)
    assert all(p.is_meta for p in meta_delta.parameters())
    with pytest.raises(CheckpointError, match="meta device"):
        meta_delta.save_finetuned(tmp_path / "meta")
    assert not (tmp_path / "meta" / WEIGHTS_NAME).exists()


def test_auto_config_round_trip_and_errors(trained) -> None:
    _, path, _, _ = trained
    config = AutoDeltaConfig.from_finetuned(path)
    assert isinstance(config, LoraConfig) and config.lora_r == 4 and config.modified_modules == ["query", "value"]
    config = AutoDeltaConfig.from_dict({"delta_type": "lora", "lora_r": 2, "modified_modules": ["key"]})
    model = tiny_bert()
    delta = AutoDeltaModel.from_config(config, backbone_model=model)
    assert isinstance(delta, LoraModel) and delta.sites[0].module.lora_A.shape == (2, 32)
    assert LoraModel.from_config({"lora_r": 3}, backbone_model=tiny_bert()).config.lora_r == 3
    with pytest.raises(DeltaConfigError, match="Unknown delta_type 'nope'"):
        AutoDeltaConfig.from_dict({"delta_type": "nope"})
    with pytest.raises(DeltaConfigError, match="lora_rank"):
        AutoDeltaConfig.from_dict({"delta_type": "lora", "lora_rank": 4})
    with pytest.raises(DeltaConfigError, match="positive integer"):
        LoraModel(tiny_bert(), lora_r=0)
    with pytest.raises(DeltaConfigError, match=r"\[0, 1\)"):
        LoraModel(tiny_bert(), lora_dropout=1.5)


def test_checkpoint_files_get_the_usual_file_mode(trained) -> None:
    _, path, _, _ = trained
    umask = os.umask(0)
    os.umask(umask)
    for name in os.listdir(path):
        assert os.stat(os.path.join(path, name)).st_mode & 0o777 == 0o666 & ~umask


# ----------------------------------------------------------------------------- BitFit checkpoints on RMSNorm models


@pytest.mark.parametrize("arch_name", ["llama", "t5"])
def test_two_bitfit_checkpoints_load_onto_one_rms_norm_backbone(arch_name, tmp_path) -> None:
    """The norms already carry the first delta's site module when the second checkpoint is loaded."""
    arch = ARCHS[arch_name]
    x = arch.inputs()
    for seed in (1, 2):
        delta = BitFitModel(arch.build(), name="bitfit")
        perturb(delta, seed=seed)
        delta.save_finetuned(tmp_path / f"task{seed}")
    model = arch.build()
    keys, hooks, state = list(model.state_dict()), hook_counts(model), snapshot(model)
    base = arch.run(model, x)
    group = DeltaGroup(model)
    a = group.load("a", tmp_path / "task1", attach=True)
    only_a = arch.run(model, x)
    b = group.load("b", tmp_path / "task2", attach=True)
    assert a.modified_modules == b.modified_modules
    both = arch.run(model, x)
    # reference: the same biases added by hand, in load order
    reference = arch.build()
    modules = dict(reference.named_modules())
    handles = [
        modules[sa.name].register_forward_hook(lambda m, args, out, ba=sa.module.bias, bb=sb.module.bias: out + ba + bb)
        for sa, sb in zip(a.sites, b.sites)
    ]
    try:
        assert torch.equal(arch.run(reference, x), both)
    finally:
        for handle in handles:
            handle.remove()
    b.detach()
    assert torch.equal(arch.run(model, x), only_a)
    a.detach()
    assert torch.equal(arch.run(model, x), base)
    assert list(model.state_dict()) == keys and hook_counts(model) == hooks
    assert_state_equal(model, state)


def test_one_bitfit_checkpoint_loads_twice_onto_a_llama(tmp_path) -> None:
    arch = ARCHS["llama"]
    x = arch.inputs()
    delta = BitFitModel(arch.build())
    perturb(delta)
    delta.save_finetuned(tmp_path / "ckpt")
    model = arch.build()
    base = arch.run(model, x)
    first = AutoDeltaModel.from_finetuned(tmp_path / "ckpt", backbone_model=model)
    once = arch.run(model, x)
    second = AutoDeltaModel.from_finetuned(tmp_path / "ckpt", backbone_model=model)
    assert second.name != first.name and second.modified_modules == first.modified_modules
    assert not torch.equal(arch.run(model, x), once)  # the biases now apply twice
    second.detach()
    assert torch.equal(arch.run(model, x), once)
    first.detach()
    assert torch.equal(arch.run(model, x), base)


# ----------------------------------------------------------------------------- merged deltas and unfrozen hosts


def _merged_with_trainable_host(tmp_path, make, host_pattern):
    """A perturbed delta whose host tensors stay trainable, saved once attached (reference) and then merged."""
    arch = ARCHS["bert"]
    model = arch.build()
    x = arch.inputs()
    delta = make(model)
    perturb(delta)
    delta.freeze_module(exclude=["deltas", host_pattern])
    attached = arch.run(model, x)
    delta.save_finetuned(tmp_path / "attached")
    return arch, model, x, delta, attached


@pytest.mark.parametrize(
    "make, host_pattern, pname",
    [
        (lambda m: LoraModel(m, modified_modules=["query"], lora_r=4), "query", "weight"),
        (lambda m: BitFitModel(m, modified_modules=["query"]), "query", "bias"),
    ],
    ids=["lora", "bitfit"],
)
def test_saving_a_merged_delta_stores_the_unfrozen_host_tensor_without_the_delta(tmp_path, make, host_pattern, pname):
    arch, model, x, delta, attached = _merged_with_trainable_host(tmp_path, make, host_pattern)
    key = f"bert.encoder.layer.0.attention.self.query.{pname}"
    assert key in delta.unfrozen_parameter_names
    original = dict(model.named_parameters())[key].detach().clone()
    delta.merge()
    assert not torch.equal(dict(model.named_parameters())[key], original)
    delta.save_finetuned(tmp_path / "merged")
    stored = read_weights(tmp_path / "merged")
    assert torch.equal(stored[key], original)  # not the merged tensor: reloading would apply the delta twice
    assert all(torch.equal(v, read_weights(tmp_path / "attached")[k]) for k, v in stored.items())
    fresh = arch.build()
    AutoDeltaModel.from_finetuned(tmp_path / "merged", backbone_model=fresh)
    assert torch.equal(arch.run(fresh, x), attached)
    delta.unmerge()  # saving left the merge intact
    assert torch.equal(arch.run(model, x), attached)


def test_a_merged_delta_whose_unfrozen_host_cannot_be_recovered_refuses_to_save(tmp_path) -> None:
    arch, model, x, delta, attached = _merged_with_trainable_host(
        tmp_path, lambda m: LoraModel(m, modified_modules=["query"], lora_r=4), "query"
    )
    path = tmp_path / "attached"
    before = {n: (path / n).read_bytes() for n in os.listdir(path)}
    delta.merge(exact_unmerge=False)  # no copy of the weight without the delta is kept
    with pytest.raises(DeltaStateError, match=r"query\.weight.*unmerge\(\)"):
        delta.save_finetuned(path)
    assert {n: (path / n).read_bytes() for n in os.listdir(path)} == before
    delta.unmerge()
    delta.merge()
    with torch.no_grad():
        model.bert.encoder.layer[0].attention.self.query.weight.add_(1.0)  # e.g. an optimizer step after merge()
    with pytest.raises(DeltaStateError, match="modified after"):
        delta.save_finetuned(path)
    assert {n: (path / n).read_bytes() for n in os.listdir(path)} == before


# ----------------------------------------------------------------------------- integrity


def _flip_last_data_byte(path) -> None:
    weights = os.path.join(path, WEIGHTS_NAME)
    data = bytearray(open(weights, "rb").read())
    data[-1] ^= 0x01  # inside the last tensor's data: the header still parses
    open(weights, "wb").write(bytes(data))


def test_a_flipped_tensor_byte_is_a_clear_error_and_changes_nothing(fresh, tmp_path) -> None:
    delta = LoraModel(tiny_bert(), modified_modules=["query", "value"], lora_r=4)
    perturb(delta)
    path = delta.save_finetuned(tmp_path / "ckpt")
    model, keys, hooks, state = fresh
    assert len(json.loads(open(os.path.join(path, CONFIG_NAME)).read())["weights_sha256"]) == 64
    _flip_last_data_byte(path)
    read_weights(path)  # safetensors itself has no checksum: the file still parses
    with pytest.raises(CheckpointError, match=r"delta_model\.safetensors.*corrupt or was modified"):
        AutoDeltaModel.from_finetuned(path, backbone_model=model)
    _assert_untouched(model, keys, hooks, state)
    group = DeltaGroup(model)
    with pytest.raises(CheckpointError, match="corrupt or was modified"):
        group.load("task", path)
    assert group.names == []
    _assert_untouched(model, keys, hooks, state)


def test_checkpoints_without_a_weights_hash_still_load(trained) -> None:
    _, path, x, out = trained
    meta_path = os.path.join(path, CONFIG_NAME)
    meta = json.loads(open(meta_path).read())
    del meta["weights_sha256"]
    open(meta_path, "w").write(json.dumps(meta))
    model = tiny_bert()
    AutoDeltaModel.from_finetuned(path, backbone_model=model)
    assert torch.equal(model(x).logits, out)


class _Blocks(torch.nn.Module):
    """A plain module (no config) with ``blocks.<i>.proj``; the blocks listed in ``without`` have no ``proj``."""

    def __init__(self, n: int, without: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Sequential() for _ in range(n))
        for i, block in enumerate(self.blocks):
            if i not in without:
                block.add_module("proj", torch.nn.Linear(8, 8))


def _refuses(path, model, match: str, **kwargs) -> str:
    keys, hooks, state = list(model.state_dict()), hook_counts(model), snapshot(model)
    with pytest.raises(CheckpointError, match=match) as info:
        AutoDeltaModel.from_finetuned(path, backbone_model=model, **kwargs)
    _assert_untouched(model, keys, hooks, state)
    return str(info.value)


def test_a_saved_site_never_lands_on_another_layer(tmp_path) -> None:
    # A plain module has no config, so the default fingerprint check cannot tell the sizes apart.
    torch.manual_seed(0)
    LoraModel(_Blocks(2), modified_modules=["blocks.1.proj"]).save_finetuned(tmp_path / "net")
    message = _refuses(
        tmp_path / "net", _Blocks(1), r"'blocks.1.proj' saved in .* does not exist in this backbone \(_Blocks\)"
    )
    assert "'blocks.0.proj'" in message  # named as a hint only

    # Layer 1 of a BERT never goes to layer 0 of a one-layer BERT, even without the fingerprint check.
    LoraModel(tiny_bert(), modified_modules=["query"], exclude_modules=["encoder.layer.0"]).save_finetuned(
        tmp_path / "bert"
    )
    torch.manual_seed(0)
    one_layer = BertForSequenceClassification(
        BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=100,
                   max_position_embeddings=64, num_labels=2)
    ).eval()
    _refuses(tmp_path / "bert", one_layer, r"'bert.encoder.layer.1.attention.self.query' saved in .* does not exist",
             check_backbone=False)


def test_wrapped_backbones_load_in_both_directions_with_one_offset(trained, tmp_path) -> None:
    x = torch.randint(2, 100, (2, 6))
    # Saved from the BertModel inside a classifier, loaded into a whole classifier (which wraps it as 'bert').
    model = tiny_bert()
    inner_delta = LoraModel(model.bert, modified_modules=["query", "value"], lora_r=4)
    perturb(inner_delta)
    want = model.bert(x).last_hidden_state
    inner_delta.save_finetuned(tmp_path / "inner")
    fresh = tiny_bert()
    loaded = AutoDeltaModel.from_finetuned(tmp_path / "inner", backbone_model=fresh)
    assert loaded.modified_modules[0] == "bert.encoder.layer.0.attention.self.query"
    assert torch.equal(fresh.bert(x).last_hidden_state, want)

    # Saved from a whole classifier (delta only), loaded into the BertModel of a fresh one: 'bert.' is dropped.
    model = tiny_bert()
    outer_delta = LoraModel(model, modified_modules=["query", "value"], lora_r=4)
    perturb(outer_delta)
    want = model.bert(x).last_hidden_state
    outer_delta.save_finetuned(tmp_path / "outer")
    fresh = tiny_bert()
    loaded = AutoDeltaModel.from_finetuned(tmp_path / "outer", backbone_model=fresh.bert)
    assert loaded.modified_modules[0] == "encoder.layer.0.attention.self.query"
    assert torch.equal(fresh.bert(x).last_hidden_state, want)

    # A model that holds the saved backbone twice: refused, whichever copy would be meant.
    class Twins(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = tiny_bert(), tiny_bert()

    _refuses(tmp_path / "outer", Twins(), r"fits this backbone \(Twins\) in 2 places.*backbone_model=")

    # Sites found only under different offsets (one inside 'a', one inside 'b') are never split across them.
    class Halves(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = _Blocks(1), _Blocks(2, without=(0,))

    torch.manual_seed(0)
    LoraModel(_Blocks(2), modified_modules=["proj"]).save_finetuned(tmp_path / "halves")
    _refuses(tmp_path / "halves", Halves(), r"do not sit together in this backbone \(Halves\)")


def test_a_missing_backbone_tensor_is_reported_as_missing(trained) -> None:
    _, path, _, _ = trained
    # The sites fit the BertModel inside a classifier, but the saved head does not exist there.
    message = _refuses(
        path, tiny_bert().bert, r"Backbone tensor 'classifier.weight' saved in .* does not exist in this backbone "
        r"\(BertModel\)"
    )
    assert "ambiguous" not in message
    # A BERT classifier checkpoint on RoBERTa: its sites do not exist there (nor does the head).
    message = _refuses(
        path, tiny_roberta(), r"'bert.encoder.layer.0.attention.self.query' saved in .* does not exist in this "
        r"backbone \(RobertaForSequenceClassification\)", check_backbone=False,
    )
    assert "ambiguous" not in message
