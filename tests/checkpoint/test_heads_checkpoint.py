"""A delta's head copies travel in its checkpoint (``<delta_type>_heads.<module>.<param>``, listed under "heads"),
come back with it, and make checkpoints that a DeltaGroup accepts (the README quickstart's case)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from deltakit import AutoDeltaModel, DeltaGroup, LoraModel
from deltakit.checkpoint import CONFIG_NAME, WEIGHTS_NAME
from deltakit.errors import CheckpointError, DeltaError
from tests.helpers import assert_state_equal, perturb, snapshot, tiny_bert

IDS = torch.arange(3, 10).view(1, -1)


def _trained(path, name: str = "lora", seed: int = 7) -> torch.Tensor:
    model = tiny_bert()
    delta = LoraModel(model, modified_modules=["query", "value"], modules_to_save=["classifier"], name=name)
    delta.freeze_module(exclude=["deltas"])
    perturb(delta, seed=seed)  # sites and head copy alike
    delta.save_finetuned(path)
    return model(IDS).logits


def test_the_checkpoint_holds_the_head_under_its_own_prefix(tmp_path) -> None:
    _trained(tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / CONFIG_NAME).read_text())
    assert meta["heads"] == ["classifier"] and meta["backbone_tensors"] == []
    assert meta["config"]["modules_to_save"] == ["classifier"] and meta["config"]["unfrozen_modules"] == ["deltas"]
    keys = set(load_file(tmp_path / "ckpt" / WEIGHTS_NAME))
    assert {"lora_heads.classifier.weight", "lora_heads.classifier.bias"} <= keys
    assert not any(k.startswith("classifier.") for k in keys)


def test_the_head_loads_with_the_delta_and_detach_gives_the_backbone_back(tmp_path) -> None:
    trained = _trained(tmp_path / "ckpt")
    fresh = tiny_bert()
    state = snapshot(fresh)
    delta = AutoDeltaModel.from_finetuned(tmp_path / "ckpt", fresh)
    assert torch.equal(fresh(IDS).logits, trained)
    assert delta.heads["classifier"].weight.requires_grad
    delta.detach()
    assert_state_equal(fresh, state)


def test_a_group_loads_deltas_with_heads_and_switches_between_them(tmp_path) -> None:
    """Issue 12: checkpoints made with freeze_module(exclude=[..., "classifier"]) were refused by DeltaGroup.load."""
    outputs = {name: _trained(tmp_path / name, seed=seed) for seed, name in ((1, "spelling"), (2, "topic"))}
    model = tiny_bert()
    base = model(IDS).logits
    group = DeltaGroup(model)
    for name in outputs:
        group.load(name, tmp_path / name)
    for name in ("topic", "spelling", "topic"):
        group.switch(name)
        assert torch.equal(model(IDS).logits, outputs[name])
    group.switch(None)
    assert torch.equal(model(IDS).logits, base)


def test_a_group_still_refuses_a_head_saved_as_backbone_tensors(tmp_path) -> None:
    model = tiny_bert()
    delta = LoraModel(model, modified_modules=["query"])
    delta.freeze_module(exclude=["deltas", "classifier"])
    delta.save_finetuned(tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / CONFIG_NAME).read_text())
    assert meta["config"]["unfrozen_modules"] == ["deltas", "classifier"]  # the config says what was trained
    with pytest.raises(DeltaError, match="backbone tensors"):
        DeltaGroup(tiny_bert()).load("task", tmp_path / "ckpt")


def test_a_head_missing_from_this_backbone_is_refused_naming_it(tmp_path) -> None:
    _trained(tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / CONFIG_NAME).read_text())
    meta["heads"] = ["classifier2"]
    (tmp_path / "ckpt" / CONFIG_NAME).write_text(json.dumps(meta))
    fresh = tiny_bert()
    state = snapshot(fresh)
    with pytest.raises(CheckpointError, match="classifier2"):
        AutoDeltaModel.from_finetuned(tmp_path / "ckpt", fresh)
    assert_state_equal(fresh, state)


def test_a_checkpoint_without_its_head_tensors_is_refused(tmp_path) -> None:
    _trained(tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / CONFIG_NAME).read_text())
    del meta["heads"]  # the file still holds the head tensors: unexpected now
    del meta["weights_sha256"]
    (tmp_path / "ckpt" / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="lora_heads.classifier"):
        AutoDeltaModel.from_finetuned(tmp_path / "ckpt", tiny_bert())


def test_a_head_with_another_number_of_labels_joins_a_shared_backbone(tmp_path) -> None:
    """A six-label topic head and a two-label one served on one backbone (built with two labels)."""
    from transformers import BertForSequenceClassification

    base = tiny_bert()
    topic = BertForSequenceClassification(base.config.__class__(**{**base.config.to_dict(), "num_labels": 6})).eval()
    encoder = {k: v for k, v in base.state_dict().items() if not k.startswith("classifier.")}
    topic.load_state_dict(encoder, strict=False)  # the same encoder, its own 6-label classifier
    delta = LoraModel(topic, modified_modules=["query"], modules_to_save=["classifier"])
    perturb(delta)
    delta.save_finetuned(tmp_path / "topic")
    trained = topic(IDS).logits
    meta = json.loads((tmp_path / "topic" / CONFIG_NAME).read_text())
    assert meta["head_shapes"]["classifier.weight"] == [6, 32]

    shared = tiny_bert()
    group = DeltaGroup(shared)
    group.load("topic", tmp_path / "topic")
    group.switch("topic")
    assert shared(IDS).logits.shape[-1] == 6 and torch.equal(shared(IDS).logits, trained)
    group.switch(None)
    assert shared(IDS).logits.shape[-1] == 2
    with pytest.raises(DeltaError, match="another number of labels"):
        group["topic"].attach().merge_and_unload()
    assert group["topic"].state == "attached"


def test_a_head_that_differs_in_more_than_its_outputs_is_refused(tmp_path) -> None:
    _trained(tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / CONFIG_NAME).read_text())
    meta["head_shapes"]["classifier.weight"] = [2, 16]
    (tmp_path / "ckpt" / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="only the number of outputs"):
        AutoDeltaModel.from_finetuned(tmp_path / "ckpt", tiny_bert())


def test_the_distributed_savers_and_trainer_resume_carry_the_head(tmp_path) -> None:
    from deltakit.integrations.distributed import load_delta_state_dict, read_delta_checkpoint, save_delta_checkpoint

    model = tiny_bert()
    delta = LoraModel(model, modified_modules=["query"], modules_to_save=["classifier"])
    perturb(delta)
    trained = model(IDS).logits
    save_delta_checkpoint(model, delta, tmp_path / "ckpt")
    assert "lora_heads.classifier.weight" in load_file(tmp_path / "ckpt" / WEIGHTS_NAME)
    live_model = tiny_bert()
    live = LoraModel(live_model, modified_modules=["query"], modules_to_save=["classifier"])
    load_delta_state_dict(live_model, live, read_delta_checkpoint(tmp_path / "ckpt", live))  # what resume does
    assert torch.equal(live_model(IDS).logits, trained)
