"""One-directory loading from a hostile or corrupt ``base_model`` record: every case is a deltakit error naming the
file and the field (or a correct load), never a tokenizer or another object built from the checkpoint's say-so, and
the checkpoint and base model files are never changed."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from deltakit import AutoDeltaModel, AutoDeltaModelForSequenceClassification, LoraModel
from deltakit.checkpoint import CONFIG_NAME
from deltakit.errors import CheckpointError
from tests.helpers import perturb, tiny_bert

IDS = torch.arange(3, 10).view(1, -1)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A 2-label BERT saved with from_pretrained, and a LoRA + classifier checkpoint of it (read-only: copy it)."""
    root = tmp_path_factory.mktemp("s7")
    tiny_bert().save_pretrained(root / "base")
    model = AutoModelForSequenceClassification.from_pretrained(root / "base").eval()
    delta = LoraModel(model, modified_modules=["query"], lora_r=2, modules_to_save=["classifier"])
    perturb(delta)
    delta.save_finetuned(root / "ckpt")
    return root


def _digest(*folders: Path) -> dict[str, str]:
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for d in folders for f in sorted(d.iterdir())}


def _edited(saved: Path, tmp_path: Path, change) -> Path:
    """A copy of the checkpoint whose ``base_model`` record ``change`` edited in place."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(saved / "ckpt", ckpt)
    meta = json.loads((ckpt / CONFIG_NAME).read_text())
    change(meta["base_model"])
    (ckpt / CONFIG_NAME).write_text(json.dumps(meta))
    return ckpt


@pytest.mark.parametrize(
    "class_name",
    ["AutoTokenizer", "AutoConfig", "BertConfig", "AutoProcessor", "os.system", "__import__", "models.bert.BertModel"],
)
def test_a_class_that_is_not_a_transformers_model_is_refused_by_name(saved, tmp_path, class_name: str) -> None:
    ckpt = _edited(saved, tmp_path, lambda r: r.__setitem__("class", class_name))
    before = _digest(ckpt, saved / "base")
    with pytest.raises(CheckpointError, match=rf"records the base model class '{class_name}', which is not a model"):
        AutoDeltaModel.from_pretrained(ckpt)
    assert _digest(ckpt, saved / "base") == before


@pytest.mark.parametrize("class_name", ["T5ForConditionalGeneration", "TimmBackbone"])
def test_a_class_that_does_not_fit_the_saved_files_is_a_checkpoint_error(saved, tmp_path, class_name: str) -> None:
    # A T5 class over a BERT directory, a model needing timm (not installed here, or not fitting BERT's files if it
    # is): transformers fails with its own exception types (StrictDataclassFieldValidationError, ImportError)
    ckpt = _edited(saved, tmp_path, lambda r: r.__setitem__("class", class_name))
    before = _digest(ckpt, saved / "base")
    with pytest.raises(CheckpointError, match=rf"{class_name}\.from_pretrained.*model_class="):
        AutoDeltaModel.from_pretrained(ckpt)
    assert _digest(ckpt, saved / "base") == before


def test_a_backbone_built_with_ignore_mismatched_sizes_says_to_pass_it_again(saved, tmp_path) -> None:
    # the saved base is a 2-label classifier; the delta was trained on a 3-label one built from it
    model = AutoModelForSequenceClassification.from_pretrained(
        saved / "base", num_labels=3, ignore_mismatched_sizes=True
    ).eval()
    delta = LoraModel(model, modified_modules=["query"], lora_r=2, modules_to_save=["classifier"])
    perturb(delta)
    trained = model(IDS).logits
    delta.save_finetuned(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match=r"ignore_mismatched_sizes=True"):
        AutoDeltaModelForSequenceClassification.from_pretrained(tmp_path / "ckpt")
    loaded = AutoDeltaModelForSequenceClassification.from_pretrained(tmp_path / "ckpt", ignore_mismatched_sizes=True)
    assert torch.equal(loaded.backbone_model.eval()(IDS).logits, trained)


@pytest.mark.parametrize(
    ("head", "match"),
    [
        ({"num_labels": 2, "id2label": {"0": "a", "\u00b2": "b"}}, r"id2label with the key '\u00b2'"),  # isdigit()
        ({"num_labels": 2, "id2label": {"0": "a", "--1": "b"}}, r"id2label with the key '--1'"),
        ({"num_labels": 2, "id2label": {"1": "a", "01": "b"}}, r"id2label with the key .01."),  # one label, twice
        ({"num_labels": 2, "id2label": {"0": "a", "9" * 5000: "b"}}, r"id2label with the key '9999"),
        ({"num_labels": 5, "id2label": {"0": "a", "1": "b"}}, r"num_labels 5 and 2 entries in id2label"),
        ({"num_labels": 2, "problem_type": "rm -rf"}, r"problem_type 'rm -rf', not one of"),
    ],
    ids=["superscript-key", "double-minus-key", "leading-zero-key", "5000-digit-key", "num-labels-vs-id2label",
         "problem-type"],
)
def test_a_bad_head_record_is_a_field_error_before_any_load(saved, tmp_path, head, match: str) -> None:
    ckpt = _edited(saved, tmp_path, lambda r: r.__setitem__("config", head))
    before = _digest(ckpt, saved / "base")
    with pytest.raises(CheckpointError, match=rf"field 'base_model' has config\.{match}"):
        AutoDeltaModel.from_pretrained(ckpt)
    with pytest.raises(CheckpointError, match="field 'base_model'"):  # the record is checked with every read
        AutoDeltaModel.from_finetuned(ckpt, tiny_bert())
    assert _digest(ckpt, saved / "base") == before
