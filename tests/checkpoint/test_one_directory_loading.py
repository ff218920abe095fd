"""One-directory loading: the checkpoint records the base model, and ``AutoDeltaModel...from_pretrained(dir)``
builds backbone + delta in one call (PEFT's ``AutoPeftModel...from_pretrained``)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

from deltakit import (
    AutoDeltaModel,
    AutoDeltaModelForCausalLM,
    AutoDeltaModelForSeq2SeqLM,
    AutoDeltaModelForSequenceClassification,
    LoraModel,
)
from deltakit.checkpoint import CONFIG_NAME
from deltakit.errors import CheckpointError
from tests.helpers import perturb, tiny_bert, tiny_gpt2, tiny_t5

IDS = torch.arange(3, 10).view(1, -1)
LABELS = {0: "negative", 1: "positive", 2: "neutral"}


def _classifier_checkpoint(tmp_path, monkeypatch) -> torch.Tensor:
    """A 3-label classifier loaded by a relative path, LoRA + head, saved; returns the trained logits."""
    tiny_bert().bert.save_pretrained(tmp_path / "base")  # an encoder without a head, like a hub sentence encoder
    monkeypatch.chdir(tmp_path)
    model = AutoModelForSequenceClassification.from_pretrained(
        "base", id2label=LABELS, label2id={v: k for k, v in LABELS.items()}
    ).eval()
    delta = LoraModel(model, modified_modules=["query"], modules_to_save=["classifier"])
    perturb(delta)
    delta.save_finetuned(tmp_path / "ckpt")
    return model(IDS).logits


def test_the_checkpoint_records_the_base_model_as_given(tmp_path, monkeypatch) -> None:
    _classifier_checkpoint(tmp_path, monkeypatch)
    record = json.loads((tmp_path / "ckpt" / CONFIG_NAME).read_text())["base_model"]
    assert record["name_or_path"] == "base"  # as given, not resolved
    assert record["class"] == "BertForSequenceClassification"
    assert record["config"]["num_labels"] == 3
    assert record["config"]["id2label"] == {"0": "negative", "1": "positive", "2": "neutral"}


@pytest.mark.parametrize("loader", [AutoDeltaModelForSequenceClassification, AutoDeltaModel])
def test_one_call_builds_backbone_and_delta(tmp_path, monkeypatch, loader) -> None:
    trained = _classifier_checkpoint(tmp_path, monkeypatch)
    delta = loader.from_pretrained(tmp_path / "ckpt")
    model = delta.backbone_model.eval()
    assert model.config.id2label == LABELS and model.num_labels == 3
    assert delta.state == "attached" and set(delta.heads) == {"classifier"}
    assert torch.equal(model(IDS).logits, trained)


def test_from_pretrained_keywords_reach_the_backbone_and_the_loader(tmp_path, monkeypatch) -> None:
    _classifier_checkpoint(tmp_path, monkeypatch)
    delta = AutoDeltaModelForSequenceClassification.from_pretrained(
        tmp_path / "ckpt", dtype=torch.float64, name="sentiment"
    )
    assert delta.name == "sentiment" and delta.backbone_model.classifier.weight.dtype == torch.float64


def test_a_moved_base_model_is_given_explicitly(tmp_path, monkeypatch) -> None:
    trained = _classifier_checkpoint(tmp_path, monkeypatch)
    (tmp_path / "base").rename(tmp_path / "moved")
    with pytest.raises(CheckpointError, match=r"'base'.*working directory.*base_model_name_or_path"):
        AutoDeltaModelForSequenceClassification.from_pretrained(tmp_path / "ckpt")
    delta = AutoDeltaModelForSequenceClassification.from_pretrained(
        tmp_path / "ckpt", base_model_name_or_path=tmp_path / "moved"
    )
    assert torch.equal(delta.backbone_model.eval()(IDS).logits, trained)


def test_a_hub_id_while_offline_is_a_clear_error(tmp_path, monkeypatch) -> None:
    _classifier_checkpoint(tmp_path, monkeypatch)
    meta = json.loads((tmp_path / "ckpt" / CONFIG_NAME).read_text())
    meta["base_model"]["name_or_path"] = "deltakit-tests/no-such-model"
    (tmp_path / "ckpt" / CONFIG_NAME).write_text(json.dumps(meta))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match=r"no-such-model.*HF_HUB_OFFLINE.*local cache"):
        AutoDeltaModelForSequenceClassification.from_pretrained(tmp_path / "ckpt")


def test_a_backbone_built_from_a_config_records_nowhere_to_load_from(tmp_path) -> None:
    LoraModel(tiny_bert(), modified_modules=["query"]).save_finetuned(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="built from a config.*base_model_name_or_path"):
        AutoDeltaModel.from_pretrained(tmp_path / "ckpt")
    tiny_bert().save_pretrained(tmp_path / "base")
    delta = AutoDeltaModel.from_pretrained(tmp_path / "ckpt", base_model_name_or_path=tmp_path / "base")
    assert type(delta.backbone_model).__name__ == "BertForSequenceClassification"


def test_a_checkpoint_of_an_older_deltakit_says_what_to_do(tmp_path) -> None:
    LoraModel(tiny_bert(), modified_modules=["query"]).save_finetuned(tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / CONFIG_NAME).read_text())
    del meta["base_model"]
    (tmp_path / "ckpt" / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="records no base model.*from_finetuned"):
        AutoDeltaModelForSequenceClassification.from_pretrained(tmp_path / "ckpt")


def test_a_malformed_base_model_record_is_refused(tmp_path) -> None:
    LoraModel(tiny_bert(), modified_modules=["query"]).save_finetuned(tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / CONFIG_NAME).read_text())
    meta["base_model"]["config"] = {"num_labels": "three"}
    (tmp_path / "ckpt" / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="base_model"):
        AutoDeltaModel.from_finetuned(tmp_path / "ckpt", tiny_bert())


@pytest.mark.parametrize(
    ("build", "auto", "loader", "modules"),
    [
        (tiny_gpt2, AutoModelForCausalLM, AutoDeltaModelForCausalLM, ["c_attn"]),
        (tiny_t5, AutoModelForSeq2SeqLM, AutoDeltaModelForSeq2SeqLM, ["q", "v"]),
    ],
)
def test_language_models_load_in_one_call(tmp_path, build, auto, loader, modules) -> None:
    build().save_pretrained(tmp_path / "base")
    model = auto.from_pretrained(tmp_path / "base").eval()
    delta = LoraModel(model, modified_modules=modules)
    perturb(delta)
    kwargs = {"decoder_input_ids": IDS} if model.config.is_encoder_decoder else {}
    trained = model(IDS, **kwargs).logits
    delta.save_finetuned(tmp_path / "ckpt")
    loaded = loader.from_pretrained(tmp_path / "ckpt").backbone_model.eval()
    assert torch.equal(loaded(IDS, **kwargs).logits, trained)
