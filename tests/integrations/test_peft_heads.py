"""Task heads (``modules_to_save``) through PEFT interop: a delta's own head copy exports as PEFT's
``modules_to_save`` (the copy's values, not the backbone's), and PEFT's wrapped modules import as head copies, so
detaching gives the backbone back bit for bit, as disabling the adapter does in PEFT."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
)

from deltakit import AutoDeltaModel, CheckpointError, DeltaError, DoraModel, IA3Model, LoraModel, VeraModel
from deltakit.integrations.peft import METHODS, PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME, export_to_peft, from_peft
from tests.helpers import VOCAB, assert_state_equal, hook_counts, perturb, snapshot, tiny_bert, tiny_roberta
from tests.tolerances import assert_same_function

peft = pytest.importorskip("peft")

IDS = torch.arange(3, 10).view(1, -1)


@pytest.fixture(autouse=True)
def _quiet() -> None:
    warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*vera_A and vera_B.*")  # PEFT rebuilds them from the seed, as we do


def tiny_gpt2_classifier(seed: int = 0, num_labels: int = 2) -> nn.Module:
    torch.manual_seed(seed)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=64, pad_token_id=0,
                        num_labels=num_labels)
    return GPT2ForSequenceClassification(config).eval()


def tiny_llama_classifier(seed: int = 0, num_labels: int = 2) -> nn.Module:
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0,
                         num_labels=num_labels)
    return LlamaForSequenceClassification(config).eval()


def bert_with_labels(num_labels: int) -> nn.Module:
    """``tiny_bert()``'s encoder under a classifier with ``num_labels`` outputs."""
    base = tiny_bert()
    model = BertForSequenceClassification(base.config.__class__(**{**base.config.to_dict(), "num_labels": num_labels}))
    model.load_state_dict({k: v for k, v in base.state_dict().items() if not k.startswith("classifier.")}, strict=False)
    return model.eval()


# model -> (builder, its head, delta positions)
MODELS = {
    "bert": (tiny_bert, "classifier", ["query", "value"]),
    "roberta": (tiny_roberta, "classifier", ["query", "value"]),  # a head that is a tree (dense, out_proj)
    "gpt2": (tiny_gpt2_classifier, "score", ["c_attn", "c_fc"]),  # Conv1D hosts, a bias-free score head
    "llama": (tiny_llama_classifier, "score", ["q_proj", "v_proj"]),
}
BUILD = {
    "lora": lambda m, sites, heads: LoraModel(m, modified_modules=sites, lora_r=4, lora_alpha=8, modules_to_save=heads),
    "dora": lambda m, sites, heads: DoraModel(m, modified_modules=sites, lora_r=4, lora_alpha=8, modules_to_save=heads),
    "ia3": lambda m, sites, heads: IA3Model(m, modified_modules=sites, feedforward_modules=[], modules_to_save=heads),
    "vera": lambda m, sites, heads: VeraModel(m, modified_modules=sites, vera_r=4, modules_to_save=heads),
}
assert set(BUILD) == set(METHODS)  # every method PEFT interop covers


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def trained(method: str, arch: str, model: nn.Module | None = None) -> nn.Module:
    """A delta of ``method`` with a head copy, everything perturbed (sites and head copy alike)."""
    build, head, sites = MODELS[arch]
    delta = BUILD[method](model if model is not None else build(), sites, [head])
    perturb(delta, seed=3, scale=0.3)
    return delta


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("method", list(BUILD))
def test_a_delta_with_a_head_exports_and_peft_computes_the_same(method: str, arch: str, tmp_path) -> None:
    delta = trained(method, arch)
    build, head, _ = MODELS[arch]
    model = delta.backbone_model
    ours = logits(model)
    task_type = "SEQ_CLS" if arch in ("gpt2", "llama") else None  # PEFT's own score head for the decoders
    export_to_peft(delta, tmp_path / "adapter", task_type=task_type)
    config = json.loads((tmp_path / "adapter" / PEFT_CONFIG_NAME).read_text())
    assert config["modules_to_save"] == [head]
    saved = load_file(tmp_path / "adapter" / PEFT_WEIGHTS_NAME)
    copy = delta.heads[head].state_dict()
    for key, value in copy.items():  # the copy's values, bit for bit: not the backbone's
        assert torch.equal(saved[f"base_model.model.{head}.{key}"], value)
    assert not torch.equal(copy[next(iter(copy))], model.get_submodule(head).state_dict()[next(iter(copy))])
    theirs = peft.PeftModel.from_pretrained(build(), tmp_path / "adapter").eval()
    assert_same_function(logits(theirs), ours, model=model)
    # PEFT's disable_adapter runs the original head again (and the bare backbone), as deltakit's detach does
    delta.detach()
    with theirs.disable_adapter():
        assert_same_function(logits(theirs), logits(model), model=model)


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_export_import_export_round_trips_bit_for_bit(method: str, tmp_path) -> None:
    delta = trained(method, "roberta")
    ours = logits(delta.backbone_model)
    export_to_peft(delta, tmp_path / "first")
    fresh = tiny_roberta()
    state = snapshot(fresh)
    back = from_peft(tmp_path / "first", fresh)
    assert list(back.heads) == ["classifier"] and back.unfrozen_parameter_names == []
    assert torch.equal(logits(fresh), ours)  # the same modules and values as the delta exported
    export_to_peft(back, tmp_path / "second")
    for name in (PEFT_CONFIG_NAME,):
        assert json.loads((tmp_path / "first" / name).read_text()) == json.loads((tmp_path / "second" / name).read_text())
    first, second = load_file(tmp_path / "first" / PEFT_WEIGHTS_NAME), load_file(tmp_path / "second" / PEFT_WEIGHTS_NAME)
    assert list(first) == list(second) and all(torch.equal(first[k], second[k]) for k in first)
    back.detach()
    assert_state_equal(fresh, state)


def peft_seq_cls(build, targets: list[str], path, seed: int = 11) -> nn.Module:
    """A PEFT SEQ_CLS LoRA adapter, random factors and a changed head copy; returns PEFT's model."""
    model = peft.get_peft_model(build(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="SEQ_CLS"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name or ".modules_to_save.default." in name:
                param.add_(torch.randn(param.shape, generator=g) * 0.3)
    model.save_pretrained(path)
    return model.eval()


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_a_peft_seq_cls_adapter_imports_as_a_head_and_detach_gives_the_backbone_back(arch: str, tmp_path) -> None:
    build, head, sites = MODELS[arch]
    theirs = peft_seq_cls(build, sites, tmp_path / "peft")
    model = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    base = logits(model)
    delta = from_peft(tmp_path / "peft", model)
    assert list(delta.heads) == [head] and delta.unfrozen_parameter_names == []
    assert_same_function(logits(model), logits(theirs), model=model)
    delta.detach()
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert torch.equal(logits(model), base)
    assert all(h == (0, 0) for h in hook_counts(model).values())
    delta.attach()  # and back: the same modules, the same outputs
    assert_same_function(logits(model), logits(theirs), model=model)


def test_the_imported_head_travels_in_a_deltakit_checkpoint(tmp_path) -> None:
    peft_seq_cls(tiny_bert, ["query", "value"], tmp_path / "peft")
    model = tiny_bert()
    delta = from_peft(tmp_path / "peft", model)
    expected = logits(model)
    delta.save_finetuned(tmp_path / "ckpt")
    fresh = tiny_bert()
    AutoDeltaModel.from_finetuned(tmp_path / "ckpt", fresh)
    assert torch.equal(logits(fresh), expected)


def test_a_six_label_head_on_a_two_label_backbone(tmp_path) -> None:
    # export: the file holds the head at its own size; PEFT loads it onto a backbone built with six labels
    delta = trained("lora", "bert", model=bert_with_labels(6))
    delta.backbone_model.config.num_labels = 2  # the copy keeps 6 outputs whatever the backbone's config says
    ours = logits(delta.backbone_model)
    assert ours.shape[-1] == 6
    export_to_peft(delta, tmp_path / "adapter")
    assert load_file(tmp_path / "adapter" / PEFT_WEIGHTS_NAME)["base_model.model.classifier.weight"].shape == (6, 32)
    with pytest.raises(Exception, match="size mismatch|shape"):  # PEFT cannot resize a 2-label classifier
        peft.PeftModel.from_pretrained(tiny_bert(), tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(bert_with_labels(6), tmp_path / "adapter").eval()
    assert_same_function(logits(theirs), ours, model=delta.backbone_model)
    # import: onto the 2-label backbone the head is resized, as deltakit's checkpoint loader does
    model = tiny_bert()
    state = snapshot(model)
    back = from_peft(tmp_path / "adapter", model)
    assert back.heads["classifier"].out_features == 6
    assert torch.equal(logits(model), ours)
    back.detach()
    assert logits(model).shape[-1] == 2
    assert_state_equal(model, state)


def tiny_distilbert(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                              max_position_embeddings=64, num_labels=2)
    return DistilBertForSequenceClassification(config).eval()


def test_modules_peft_also_wraps_go_along_at_their_current_values(tmp_path) -> None:
    # DistilBERT: the entry "classifier" makes PEFT wrap pre_classifier too (a name suffix); it is not the delta's
    model = tiny_distilbert()
    delta = LoraModel(model, modified_modules=["q_lin"], lora_r=4, modules_to_save=["classifier"])
    perturb(delta, seed=4, scale=0.3)
    export_to_peft(delta, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / PEFT_CONFIG_NAME).read_text())["modules_to_save"] == ["classifier"]
    saved = load_file(tmp_path / "adapter" / PEFT_WEIGHTS_NAME)
    assert torch.equal(saved["base_model.model.pre_classifier.weight"], model.pre_classifier.weight)
    assert torch.equal(saved["base_model.model.classifier.weight"], delta.heads["classifier"].weight)
    theirs = peft.PeftModel.from_pretrained(tiny_distilbert(), tmp_path / "adapter").eval()
    assert_same_function(logits(theirs), logits(model), model=model)
    # back: both wrapped modules are copies; pre_classifier's equals the backbone's, and export writes one entry again
    back = from_peft(tmp_path / "adapter", tiny_distilbert())
    assert list(back.heads) == ["pre_classifier", "classifier"]
    export_to_peft(back, tmp_path / "again")
    assert json.loads((tmp_path / "again" / PEFT_CONFIG_NAME).read_text())["modules_to_save"] == ["classifier"]
    again = load_file(tmp_path / "again" / PEFT_WEIGHTS_NAME)
    assert list(again) == list(saved) and all(torch.equal(again[k], saved[k]) for k in saved)


def test_a_head_inside_the_module_the_task_type_wraps(tmp_path) -> None:
    # RoBERTa, a copy of classifier.out_proj only: under SEQ_CLS PEFT wraps the whole classifier, so the entry is
    # "classifier", written with the frozen dense at its current values and out_proj from the copy
    model = tiny_roberta()
    delta = LoraModel(model, modified_modules=["query"], lora_r=4, modules_to_save=["classifier.out_proj"])
    perturb(delta, seed=5, scale=0.3)
    ours = logits(model)
    export_to_peft(delta, tmp_path / "adapter", task_type="SEQ_CLS")
    assert json.loads((tmp_path / "adapter" / PEFT_CONFIG_NAME).read_text())["modules_to_save"] == ["classifier"]
    saved = load_file(tmp_path / "adapter" / PEFT_WEIGHTS_NAME)
    assert torch.equal(saved["base_model.model.classifier.dense.weight"], model.classifier.dense.weight)
    assert torch.equal(saved["base_model.model.classifier.out_proj.weight"], delta.heads["classifier.out_proj"].weight)
    theirs = peft.PeftModel.from_pretrained(tiny_roberta(), tmp_path / "adapter").eval()
    assert_same_function(logits(theirs), ours, model=model)
    without = tmp_path / "plain"  # without the task type PEFT wraps the head alone
    export_to_peft(delta, without)
    assert json.loads((without / PEFT_CONFIG_NAME).read_text())["modules_to_save"] == ["classifier.out_proj"]
    # imported, the whole classifier PEFT wrapped is one head: the same function
    fresh = tiny_roberta()
    back = from_peft(tmp_path / "adapter", fresh)
    assert list(back.heads) == ["classifier"]
    assert torch.equal(logits(fresh), ours)


def test_peft_unload_keeps_the_trained_head(tmp_path) -> None:
    # PEFT's unload() returns the wrapper's copy in place of the original (without the LoRA): the trained head stays
    delta = trained("lora", "bert")
    export_to_peft(delta, tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(tiny_bert(), tmp_path / "adapter").eval()
    plain = theirs.unload()
    copy = delta.heads["classifier"]
    assert torch.equal(plain.classifier.weight, copy.weight) and torch.equal(plain.classifier.bias, copy.bias)


def _edit_weights(path, change) -> None:
    tensors = load_file(path / PEFT_WEIGHTS_NAME)
    change(tensors)
    save_file(tensors, path / PEFT_WEIGHTS_NAME, metadata={"format": "pt"})


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda t: t.pop("base_model.model.classifier.bias"), r"wraps 'classifier' whole.*lacks \['bias'\]"),
        (lambda t: t.update({"base_model.model.classifier.extra": torch.zeros(2)}), r"also holds \['extra'\]"),
        (lambda t: t.update({"base_model.model.classifier.weight": torch.zeros(2, 16)}), "only the number of outputs"),
    ],
    ids=["missing", "unknown", "another-input-size"],
)
def test_a_head_that_does_not_fit_is_refused_and_changes_nothing(change, match: str, tmp_path) -> None:
    peft_seq_cls(tiny_bert, ["query", "value"], tmp_path / "peft")
    _edit_weights(tmp_path / "peft", change)
    model = tiny_bert()
    state = snapshot(model)
    with pytest.raises(CheckpointError, match=match):
        from_peft(tmp_path / "peft", model)
    assert_state_equal(model, state)
    assert all(h == (0, 0) for h in hook_counts(model).values())
    assert not any(n.endswith("_heads") for n, _ in model.named_children())


def test_engine_export_refuses_a_delta_with_a_head_and_writes_nothing(tmp_path) -> None:
    # export_to_peft now writes heads as modules_to_save, which vLLM / LoRAX do not serve: refused before writing
    from deltakit.integrations.engines import export_for_engine

    model = tiny_llama_classifier()
    delta = LoraModel(model, modified_modules=["q_proj"], lora_r=2, modules_to_save=["model.norm"])
    with pytest.raises(DeltaError, match=r"copies of \['model.norm'\].*vLLM does not serve"):
        export_for_engine(delta, tmp_path / "adapter", task_type=None)
    assert not (tmp_path / "adapter").exists()
