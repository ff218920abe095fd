"""The fingerprint compares sampled host weights, not only shapes: a delta loaded onto other weights is refused
(issue 12: a LoRA on a randomly initialised classifier head moved the logits by 0.5 on another seed's backbone)."""

from __future__ import annotations

import json

import pytest
import torch

from deltakit import AutoDeltaModel, DeltaGroup, LoraModel
from deltakit.checkpoint import CONFIG_NAME
from deltakit.errors import CheckpointError
from tests.helpers import assert_state_equal, perturb, snapshot, tiny_bert

IDS = torch.arange(3, 10).view(1, -1)


def _lora_on_the_classifier(path) -> torch.Tensor:
    model = tiny_bert(seed=0)
    delta = LoraModel(model, modified_modules=["query", "classifier"])
    perturb(delta)
    delta.save_finetuned(path)
    return model(IDS).logits


def test_a_delta_on_a_head_loaded_onto_another_seeds_backbone_is_refused(tmp_path) -> None:
    trained = _lora_on_the_classifier(tmp_path / "ckpt")
    other = tiny_bert(seed=1)  # same architecture, head (and everything else) initialised differently
    state = snapshot(other)
    with pytest.raises(CheckpointError, match=r"weights differ.*classifier.*check_backbone=False"):
        AutoDeltaModel.from_finetuned(tmp_path / "ckpt", other)
    assert_state_equal(other, state)
    with pytest.raises(CheckpointError, match="weights differ"):
        DeltaGroup(tiny_bert(seed=1)).load("task", tmp_path / "ckpt")
    # the explicit opt-out loads it, and the outputs are indeed not the trained ones
    AutoDeltaModel.from_finetuned(tmp_path / "ckpt", other, check_backbone=False)
    assert not torch.allclose(other(IDS).logits, trained, atol=1e-3)
    same = tiny_bert(seed=0)
    AutoDeltaModel.from_finetuned(tmp_path / "ckpt", same)
    assert torch.equal(same(IDS).logits, trained)


def test_only_the_head_differing_is_detected(tmp_path) -> None:
    _lora_on_the_classifier(tmp_path / "ckpt")
    model = tiny_bert(seed=0)
    torch.manual_seed(5)
    model.classifier.reset_parameters()  # everything else as trained on
    with pytest.raises(CheckpointError, match="classifier"):
        AutoDeltaModel.from_finetuned(tmp_path / "ckpt", model)


def test_a_lower_precision_copy_of_the_same_weights_matches(tmp_path) -> None:
    _lora_on_the_classifier(tmp_path / "ckpt")
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        AutoDeltaModel.from_finetuned(tmp_path / "ckpt", tiny_bert(seed=0).to(dtype))


def test_checkpoints_without_values_still_load(tmp_path) -> None:
    _lora_on_the_classifier(tmp_path / "ckpt")
    file = tmp_path / "ckpt" / CONFIG_NAME
    meta = json.loads(file.read_text())
    del meta["fingerprint"]["host_values"]  # what deltakit wrote before values were recorded
    del meta["weights_sha256"]
    file.write_text(json.dumps(meta))
    AutoDeltaModel.from_finetuned(tmp_path / "ckpt", tiny_bert(seed=1))


def test_a_malformed_value_sketch_is_a_checkpoint_error(tmp_path) -> None:
    _lora_on_the_classifier(tmp_path / "ckpt")
    file = tmp_path / "ckpt" / CONFIG_NAME
    meta = json.loads(file.read_text())
    meta["fingerprint"]["host_values"]["sketch"] = "not base64!"
    file.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="host_values"):
        AutoDeltaModel.from_finetuned(tmp_path / "ckpt", tiny_bert(seed=0))


def test_a_merged_delta_records_the_weights_it_was_trained_on(tmp_path) -> None:
    model = tiny_bert(seed=0)
    delta = LoraModel(model, modified_modules=["query", "classifier"])
    perturb(delta)
    delta.merge()
    delta.save_finetuned(tmp_path / "ckpt")
    merged = model(IDS).logits
    fresh = tiny_bert(seed=0)
    AutoDeltaModel.from_finetuned(tmp_path / "ckpt", fresh)  # the pre-merge weights were recorded
    assert torch.allclose(fresh(IDS).logits, merged, atol=1e-5)


def test_a_host_the_checkpoint_writes_itself_is_not_compared(tmp_path) -> None:
    """LoRA on the classifier and the classifier kept trainable: its values at load come from the file."""
    model = tiny_bert(seed=0)
    delta = LoraModel(model, modified_modules=["query", "classifier"])
    delta.freeze_module(exclude=["deltas", "classifier"])
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    delta.save_finetuned(tmp_path / "ckpt")
    AutoDeltaModel.from_finetuned(tmp_path / "ckpt", tiny_bert(seed=0))
