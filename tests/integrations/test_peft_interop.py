"""PEFT interop in both directions: deltakit LoRA / DoRA (rsLoRA too) -> PEFT adapter directory -> peft.PeftModel,
and PEFT adapter -> deltakit delta, with bit-identical tensors and outputs equal to rounding; options without an
equivalent are refused and change nothing."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from deltakit import AutoDeltaModel, BitFitModel, CheckpointError, DeltaError, DoraModel, LoraModel
from deltakit.integrations.peft import PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME, export_to_peft, from_peft
from deltakit.structures import tiny_model
from tests.helpers import ARCHS, assert_state_equal, hook_counts, perturb, snapshot, tiny_gpt2, tiny_llama, tiny_t5
from tests.tolerances import assert_same_function

peft = pytest.importorskip("peft")

# architecture -> LoRA positions for deltakit (role names) and for PEFT (its suffix names); GPT-2 has Conv1D hosts
ROLES = {
    "bert": ["attn.q", "attn.v", "embed"],
    "gpt2": ["attn.q", "ff.w1", "embed"],
    "llama": ["attn.q", "attn.v", "ff.gate", "ff.w2", "embed"],
}
PEFT_TARGETS = {
    "bert": ["query", "value", "word_embeddings"],
    "gpt2": ["c_attn", "c_fc", "wte"],
    "llama": ["q_proj", "v_proj", "gate_proj", "down_proj", "embed_tokens"],
}
TESTED = list(ROLES)


@pytest.fixture(autouse=True)
def _quiet() -> None:
    warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*save_embedding_layers.*")


def ids(seed: int = 5) -> torch.Tensor:
    return torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(seed))


def same_as_peft(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """deltakit and PEFT compute the same function with other kernels (deltakit adds ``scale * B (A x)`` in one fused
    step, PEFT scales ``B (A x)`` and then adds): equal to float rounding, never promised bit for bit."""
    # the size of the largest tiny model compared here (tiny T5: 33 matmul modules, widths up to 128)
    assert_same_function(ours, theirs, depth=2 * 33, reduction=128)


def hidden(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids())
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def peft_adapter(arch: str, path: str, **options: object) -> tuple[nn.Module, torch.Tensor]:
    """Save a PEFT LoRA adapter with random (non-identity) factors; returns PEFT's model and its output."""
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=PEFT_TARGETS[arch], **options)
    model = peft.get_peft_model(tiny_model(arch), config)
    perturb_lora(model, seed=3)
    model.save_pretrained(path)
    model.eval()
    return model, hidden(model)


def perturb_lora(model: nn.Module, seed: int) -> None:
    """Random values for PEFT's LoRA factors only (a fresh lora_B is zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.3)


@pytest.mark.parametrize("arch", TESTED)
def test_export_loads_in_peft_with_identical_outputs(arch: str, tmp_path) -> None:
    model = tiny_model(arch)
    delta = LoraModel(model, modified_modules=ROLES[arch], lora_r=4, lora_alpha=8)
    perturb(delta, scale=0.3)
    ours = hidden(model)
    export_to_peft(delta, tmp_path / "adapter")
    assert sorted(os.listdir(tmp_path / "adapter")) == [PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME]
    theirs = peft.PeftModel.from_pretrained(tiny_model(arch), tmp_path / "adapter").eval()
    same_as_peft(hidden(theirs), ours)
    assert not torch.allclose(hidden(tiny_model(arch)), ours)
    config = json.loads((tmp_path / "adapter" / PEFT_CONFIG_NAME).read_text())
    assert config["fan_in_fan_out"] is (arch == "gpt2") and config["r"] == 4 and config["lora_alpha"] == 8
    # PEFT's own factors are ours, bit for bit
    for site in delta.sites:
        layer = theirs.base_model.model.get_submodule(site.name)
        a = layer.lora_embedding_A["default"] if isinstance(site.host, nn.Embedding) else layer.lora_A["default"].weight
        assert torch.equal(a, site.module.lora_A)


@pytest.mark.parametrize("arch", TESTED)
def test_import_of_a_peft_adapter_gives_identical_outputs(arch: str, tmp_path) -> None:
    _, theirs = peft_adapter(arch, str(tmp_path / "peft"))
    model = tiny_model(arch)
    delta = from_peft(tmp_path / "peft", model)
    assert isinstance(delta, LoraModel) and delta.state == "attached"
    ours = hidden(model)
    same_as_peft(ours, theirs)
    assert delta.config.lora_r == 4 and delta.config.lora_alpha == 8
    # and back: the re-exported file holds exactly PEFT's tensors
    export_to_peft(delta, tmp_path / "again")
    original = load_file(tmp_path / "peft" / PEFT_WEIGHTS_NAME)
    again = load_file(tmp_path / "again" / PEFT_WEIGHTS_NAME)
    # (PEFT also stores an unchanged copy of a targeted embedding's weight for Llama: not needed, not re-exported)
    assert sorted(again) == sorted(k for k in original if ".base_layer." not in k)
    assert all(torch.equal(original[k], again[k]) for k in again)
    # a deltakit checkpoint of the imported delta reloads identically; detach restores the backbone
    delta.save_finetuned(tmp_path / "deltakit")
    fresh = tiny_model(arch)
    AutoDeltaModel.from_finetuned(tmp_path / "deltakit", fresh)
    assert torch.equal(hidden(fresh), ours)  # save/load: the same operations, bit for bit
    delta.detach()
    assert torch.equal(hidden(model), hidden(tiny_model(arch)))


SCALE_ARCHS = {"llama": (tiny_llama, ["q_proj", "v_proj"]), "t5": (tiny_t5, ["q", "v"])}


@pytest.mark.parametrize("arch", list(SCALE_ARCHS))
@pytest.mark.parametrize(("r", "alpha"), [(4, 4), (4, 8), (8, 16), (3, 7), (2, 8)])
def test_outputs_against_peft_within_float_rounding(arch: str, r: int, alpha: int, tmp_path) -> None:
    # The factors always convert bit for bit (tested above). The outputs are two computations (deltakit adds
    # scale * (B A x) in one fused step, PEFT scales B A x and then adds, with other GEMM calls): they agree to float
    # rounding, whatever the scale, on any CPU (docs/peft_interop.md). Bit-for-bit equality seen on one machine for
    # power-of-two scales is a coincidence of its GEMM kernels, not a promise.
    build, targets = SCALE_ARCHS[arch]
    inputs = ARCHS[arch].inputs()

    def run(model: nn.Module) -> torch.Tensor:
        with torch.no_grad():  # T5 itself rounds differently in grad mode when its weights require grad
            return model(**inputs).logits

    model = build()
    delta = LoraModel(model, modified_modules=["attn.q", "attn.v"], lora_r=r, lora_alpha=alpha)
    perturb(delta, scale=0.3)
    export_to_peft(delta, tmp_path / "export")
    theirs = peft.PeftModel.from_pretrained(build(), tmp_path / "export").eval()
    same_as_peft(run(model), run(theirs))
    trained = peft.get_peft_model(build(), peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets))
    perturb_lora(trained, seed=2)
    trained.save_pretrained(tmp_path / "peft")
    imported = build()
    from_peft(tmp_path / "peft", imported)
    same_as_peft(run(imported), run(trained.eval()))


def test_embedding_weights_peft_saved_along_are_applied_and_exported_back(tmp_path) -> None:
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=PEFT_TARGETS["llama"])
    trained = peft.get_peft_model(tiny_model("llama"), config)
    perturb_lora(trained, seed=4)
    with torch.no_grad():  # e.g. new token rows trained alongside the adapter
        trained.base_model.model.embed_tokens.base_layer.weight[100:].normal_()
    trained.save_pretrained(tmp_path / "peft", save_embedding_layers=True)
    trained.eval()
    model = tiny_model("llama")
    delta = from_peft(tmp_path / "peft", model)
    assert delta.unfrozen_parameter_names == ["embed_tokens.weight"]
    same_as_peft(hidden(model), hidden(trained))
    export_to_peft(delta, tmp_path / "back")
    assert "base_model.model.embed_tokens.base_layer.weight" in load_file(tmp_path / "back" / PEFT_WEIGHTS_NAME)
    reloaded = peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "back").eval()
    same_as_peft(hidden(reloaded), hidden(trained))


def tiny_classifier(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        vocab_size=128, num_labels=3)
    return BertForSequenceClassification(config).eval()


def test_a_trained_classifier_head_travels_as_modules_to_save(tmp_path) -> None:
    model = tiny_classifier()
    delta = LoraModel(model, lora_r=4)
    delta.freeze_module(exclude=["deltas", "classifier"])
    perturb(delta, scale=0.3)
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    ours = hidden(model)
    export_to_peft(delta, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / PEFT_CONFIG_NAME).read_text())["modules_to_save"] == ["classifier"]
    theirs = peft.PeftModel.from_pretrained(tiny_classifier(), tmp_path / "adapter").eval()
    same_as_peft(hidden(theirs), ours)
    # PEFT -> deltakit with PEFT's SEQ_CLS task type (it saves the classifier on its own)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")
    trained = peft.get_peft_model(tiny_classifier(), config)
    perturb_lora(trained, seed=9)
    with torch.no_grad():
        trained.base_model.model.classifier.modules_to_save["default"].weight.add_(1.0)
    trained.save_pretrained(tmp_path / "seq_cls")
    trained.eval()
    target = tiny_classifier()
    state = snapshot(target)
    imported = from_peft(tmp_path / "seq_cls", target)
    same_as_peft(hidden(target), hidden(trained))
    # PEFT's wrapper copy becomes the delta's own head copy: the backbone's classifier is never written
    assert list(imported.heads) == ["classifier"] and imported.unfrozen_parameter_names == []
    assert imported.config.modules_to_save == ["classifier"]
    imported.detach()
    assert_state_equal(target, state)


REFUSED = {
    "bias": {"bias": "all"},
    "rank_pattern": {"rank_pattern": {"query": 2}},
}


@pytest.mark.parametrize("option", list(REFUSED))
def test_peft_options_without_an_equivalent_are_refused_and_change_nothing(option: str, tmp_path) -> None:
    peft_adapter("bert", str(tmp_path / "peft"), **REFUSED[option])
    model = tiny_model("bert")
    keys, hooks, state = list(model.state_dict()), hook_counts(model), snapshot(model)
    with pytest.raises(CheckpointError, match=option):
        from_peft(tmp_path / "peft", model)
    assert list(model.state_dict()) == keys and hook_counts(model) == hooks
    assert_state_equal(model, state)


def _edit_config(path, **changes: object) -> None:
    file = path / PEFT_CONFIG_NAME
    config = json.loads(file.read_text())
    config.update(changes)
    file.write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"peft_type": "ADALORA"}, "ADALORA"),
        ({"lora_bias": True}, "lora_bias"),
        ({"target_parameters": ["experts.weight"]}, "target_parameters"),
        ({"trainable_token_indices": [1, 2]}, "trainable_token_indices"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights"),
        ({"alpha_pattern": {"query": 32}}, "alpha_pattern"),
        ({"some_future_option": True}, "some_future_option"),
        ({"r": 8}, "rank r=8"),
    ],
)
def test_bad_or_unsupported_adapter_configs(changes: dict, match: str, tmp_path) -> None:
    peft_adapter("bert", str(tmp_path / "peft"))
    _edit_config(tmp_path / "peft", **changes)
    model = tiny_model("bert")
    state = snapshot(model)
    with pytest.raises(CheckpointError, match=match):
        from_peft(tmp_path / "peft", model)
    assert_state_equal(model, state)
    assert all(h == (0, 0) for h in hook_counts(model).values())


def test_bad_files_and_backbones_are_clear_errors(tmp_path) -> None:
    peft_adapter("bert", str(tmp_path / "peft"))
    model = tiny_model("bert")
    state, hooks = snapshot(model), hook_counts(model)
    with pytest.raises(CheckpointError, match="another size"):
        from_peft(tmp_path / "peft", _wider_bert())
    with pytest.raises(CheckpointError, match="does not exist"):
        from_peft(tmp_path / "peft", tiny_model("llama"))
    with pytest.raises(CheckpointError, match="No PEFT adapter directory"):
        from_peft(tmp_path / "missing", model)
    with pytest.raises(CheckpointError, match="no adapter_config.json"):
        from_peft(tmp_path, model)
    weights = tmp_path / "peft" / PEFT_WEIGHTS_NAME
    tensors = load_file(weights)
    del tensors["base_model.model.encoder.layer.0.attention.self.query.lora_B.weight"]
    save_file(tensors, weights)
    with pytest.raises(CheckpointError, match="incomplete"):
        from_peft(tmp_path / "peft", model)
    weights.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        from_peft(tmp_path / "peft", model)
    weights.unlink()
    with pytest.raises(CheckpointError, match="no adapter_model.safetensors"):
        from_peft(tmp_path / "peft", model)
    assert_state_equal(model, state)
    assert hook_counts(model) == hooks


def _wider_bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                vocab_size=128)).eval()


def test_export_refuses_what_peft_cannot_hold_and_writes_nothing(tmp_path) -> None:
    model = tiny_classifier()
    with pytest.raises(DeltaError, match="deltas only"):
        export_to_peft(BitFitModel(model), tmp_path / "bitfit")
    assert not (tmp_path / "bitfit").exists()
    delta = LoraModel(tiny_classifier(), lora_r=2)
    delta.unfrozen_parameter_names = ["classifier.weight"]  # as if only the weight were kept trainable
    with pytest.raises(DeltaError, match="whole modules"):
        export_to_peft(delta, tmp_path / "partial")
    assert not (tmp_path / "partial").exists()
    export_to_peft(LoraModel(tiny_classifier(), lora_r=2), tmp_path / "ok")
    with pytest.raises(CheckpointError, match="overwrite=True"):
        export_to_peft(LoraModel(tiny_classifier(), lora_r=2), tmp_path / "ok", overwrite=False)


def test_import_into_a_backbone_wrapped_in_a_user_module(tmp_path) -> None:
    _, theirs = peft_adapter("bert", str(tmp_path / "peft"))

    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = tiny_model("bert")

        def forward(self, input_ids: torch.Tensor):
            return self.encoder(input_ids=input_ids)

    wrapped = Wrapper().eval()
    delta = from_peft(tmp_path / "peft", wrapped)  # sites found by their unique dotted suffix
    assert delta.modified_modules[0] == "encoder.embeddings.word_embeddings"
    same_as_peft(hidden(wrapped), theirs)


# ---------------------------------------------------------------------------------- heads that are module trees
# PEFT wraps every module whose full name ends with a modules_to_save entry (a plain string suffix) and saves the
# tensors of its whole subtree; SEQ_CLS / TOKEN_CLS add "classifier" and "score" on their own. RoBERTa's head is a
# tree (classifier.dense, classifier.out_proj), DistilBERT's has a pre_classifier that "classifier" also matches.


def roberta_classifier(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                           vocab_size=128, max_position_embeddings=72, pad_token_id=1, num_labels=3)
    return RobertaForSequenceClassification(config).eval()


def distilbert_classifier(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = DistilBertConfig(vocab_size=128, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                              max_position_embeddings=64, num_labels=3)
    return DistilBertForSequenceClassification(config).eval()


def peft_seq_cls_adapter(build, targets: list[str], path) -> nn.Module:
    """A PEFT SEQ_CLS adapter with random factors and a changed head (every modules_to_save copy); PEFT's model."""
    trained = peft.get_peft_model(build(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                            task_type="SEQ_CLS"))
    perturb_lora(trained, seed=11)
    with torch.no_grad():
        for name, param in trained.named_parameters():
            if ".modules_to_save.default." in name:
                param.add_(0.5)
    trained.save_pretrained(path)
    return trained.eval()


def test_import_of_peft_seq_cls_adapter_with_a_nested_head(tmp_path) -> None:
    trained = peft_seq_cls_adapter(roberta_classifier, ["query", "value"], tmp_path / "peft")
    saved = load_file(tmp_path / "peft" / PEFT_WEIGHTS_NAME)
    assert "base_model.model.classifier.dense.weight" in saved  # the head's tensors sit two levels down
    model = roberta_classifier()
    delta = from_peft(tmp_path / "peft", model)
    same_as_peft(hidden(model), hidden(trained))
    assert not torch.allclose(hidden(model), hidden(roberta_classifier()))
    # the whole tree PEFT wrapped is one head copy, with the file's values
    assert list(delta.heads) == ["classifier"] and delta.unfrozen_parameter_names == []
    wrapper = trained.base_model.model.classifier.modules_to_save["default"]
    assert all(torch.equal(v, wrapper.state_dict()[k]) for k, v in delta.heads["classifier"].state_dict().items())
    # and back to PEFT as SEQ_CLS: the head is one modules_to_save entry, as PEFT wrote it
    export_to_peft(delta, tmp_path / "back", task_type="SEQ_CLS")
    assert json.loads((tmp_path / "back" / PEFT_CONFIG_NAME).read_text())["modules_to_save"] == ["classifier"]
    reloaded = peft.PeftModel.from_pretrained(roberta_classifier(), tmp_path / "back").eval()
    same_as_peft(hidden(reloaded), hidden(trained))


def test_import_follows_peft_suffix_matching_of_modules_to_save(tmp_path) -> None:
    trained = peft_seq_cls_adapter(distilbert_classifier, ["q_lin", "v_lin"], tmp_path / "peft")
    saved = load_file(tmp_path / "peft" / PEFT_WEIGHTS_NAME)
    assert "base_model.model.pre_classifier.weight" in saved  # PEFT matched "classifier" as a plain suffix
    model = distilbert_classifier()
    delta = from_peft(tmp_path / "peft", model)
    same_as_peft(hidden(model), hidden(trained))
    assert list(delta.heads) == ["pre_classifier", "classifier"] and delta.unfrozen_parameter_names == []


def test_modules_to_save_outside_the_adapter_patterns_are_still_refused(tmp_path) -> None:
    peft_seq_cls_adapter(roberta_classifier, ["query", "value"], tmp_path / "peft")
    _edit_config(tmp_path / "peft", modules_to_save=["out_proj"], task_type=None)  # "classifier" no longer named
    model = roberta_classifier()
    state = snapshot(model)
    with pytest.raises(CheckpointError, match="'classifier.dense.*neither a delta tensor nor part of modules_to_save"):
        from_peft(tmp_path / "peft", model)
    assert_state_equal(model, state)
    assert all(h == (0, 0) for h in hook_counts(model).values())
    _edit_config(tmp_path / "peft", modules_to_save="classifier")
    with pytest.raises(CheckpointError, match="invalid modules_to_save"):
        from_peft(tmp_path / "peft", model)


def trained_roberta_head(**lora: object) -> LoraModel:
    model = roberta_classifier()
    delta = LoraModel(model, lora_r=4, lora_alpha=8, **lora)
    delta.freeze_module(exclude=["deltas", "classifier"])
    perturb(delta, scale=0.3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith("classifier."):
                param.add_(0.5)
    return delta


@pytest.mark.parametrize("task_type", [None, "SEQ_CLS"])
def test_export_of_a_trainable_head_tree_loads_in_peft(task_type: str | None, tmp_path) -> None:
    delta = trained_roberta_head()
    ours = hidden(delta.backbone_model)
    export_to_peft(delta, tmp_path / "adapter", task_type=task_type)
    assert json.loads((tmp_path / "adapter" / PEFT_CONFIG_NAME).read_text())["modules_to_save"] == ["classifier"]
    theirs = peft.PeftModel.from_pretrained(roberta_classifier(), tmp_path / "adapter").eval()
    same_as_peft(hidden(theirs), ours)
    back = roberta_classifier()
    from_peft(tmp_path / "adapter", back)
    assert torch.equal(hidden(back), ours)


def test_export_of_part_of_a_head_tree(tmp_path) -> None:
    # only out_proj trainable: a module of its own, which PEFT wraps alone when nothing wraps the whole head
    delta = trained_roberta_head()
    delta.unfrozen_parameter_names = ["classifier.out_proj.weight", "classifier.out_proj.bias"]
    with torch.no_grad():
        delta.backbone_model.classifier.dense.weight.copy_(roberta_classifier().classifier.dense.weight)
        delta.backbone_model.classifier.dense.bias.copy_(roberta_classifier().classifier.dense.bias)
    ours = hidden(delta.backbone_model)
    export_to_peft(delta, tmp_path / "plain")
    assert json.loads((tmp_path / "plain" / PEFT_CONFIG_NAME).read_text())["modules_to_save"] == ["classifier.out_proj"]
    theirs = peft.PeftModel.from_pretrained(roberta_classifier(), tmp_path / "plain").eval()
    same_as_peft(hidden(theirs), ours)
    # SEQ_CLS makes PEFT wrap and load the whole "classifier": it is the entry, its frozen dense goes along
    export_to_peft(delta, tmp_path / "seq_cls", task_type="SEQ_CLS")
    assert json.loads((tmp_path / "seq_cls" / PEFT_CONFIG_NAME).read_text())["modules_to_save"] == ["classifier"]
    assert "base_model.model.classifier.dense.weight" in load_file(tmp_path / "seq_cls" / PEFT_WEIGHTS_NAME)
    theirs = peft.PeftModel.from_pretrained(roberta_classifier(), tmp_path / "seq_cls").eval()
    same_as_peft(hidden(theirs), ours)


def test_export_writes_the_frozen_modules_peft_wraps_and_loads(tmp_path) -> None:
    # a frozen classifier under SEQ_CLS: PEFT wraps it for the task and reads its tensors from the file
    model = tiny_classifier()
    delta = LoraModel(model, lora_r=4)
    perturb(delta, scale=0.3)
    export_to_peft(delta, tmp_path / "frozen", task_type="SEQ_CLS")
    config = json.loads((tmp_path / "frozen" / PEFT_CONFIG_NAME).read_text())
    assert config["modules_to_save"] is None and delta.unfrozen_parameter_names == []
    theirs = peft.PeftModel.from_pretrained(tiny_classifier(), tmp_path / "frozen").eval()
    same_as_peft(hidden(theirs), hidden(model))
    # DistilBERT: the entry "classifier" also makes PEFT wrap (and read) pre_classifier
    model = distilbert_classifier()
    delta = LoraModel(model, modified_modules=["attn.q"], lora_r=4)
    delta.freeze_module(exclude=["deltas", "classifier"])
    perturb(delta, scale=0.3)
    with torch.no_grad():
        model.classifier.weight.add_(0.5)
    for task_type in (None, "SEQ_CLS"):
        export_to_peft(delta, tmp_path / str(task_type), task_type=task_type)
        assert json.loads((tmp_path / str(task_type) / PEFT_CONFIG_NAME).read_text())["modules_to_save"] == [
            "classifier"
        ]
        theirs = peft.PeftModel.from_pretrained(distilbert_classifier(), tmp_path / str(task_type)).eval()
        same_as_peft(hidden(theirs), hidden(model))


def test_export_refuses_lora_inside_a_head_peft_wraps_for_the_task(tmp_path) -> None:
    delta = LoraModel(roberta_classifier(), modified_modules=["attn.q", "classifier.out_proj"], lora_r=2)
    with pytest.raises(DeltaError, match="task_type='SEQ_CLS'.*classifier.out_proj"):
        export_to_peft(delta, tmp_path / "nested", task_type="SEQ_CLS")
    assert not (tmp_path / "nested").exists()
    delta = LoraModel(tiny_classifier(), modified_modules=["attn.q", "classifier"], lora_r=2)
    with pytest.raises(DeltaError, match="task_type='SEQ_CLS'"):
        export_to_peft(delta, tmp_path / "site", task_type="SEQ_CLS")
    assert not (tmp_path / "site").exists()
    export_to_peft(delta, tmp_path / "plain")  # without the task type PEFT wraps nothing there
    theirs = peft.PeftModel.from_pretrained(tiny_classifier(), tmp_path / "plain").eval()
    same_as_peft(hidden(theirs), hidden(delta.backbone_model))


def test_export_records_a_path_given_as_a_path_object(tmp_path) -> None:
    from pathlib import Path

    delta = LoraModel(tiny_model("bert"), lora_r=2)
    export_to_peft(delta, tmp_path / "adapter", base_model_name_or_path=Path("/models/my-bert"))
    assert json.loads((tmp_path / "adapter" / PEFT_CONFIG_NAME).read_text())["base_model_name_or_path"] == (
        "/models/my-bert"
    )
    with pytest.raises(DeltaError, match="must be a hub id or a path"):
        export_to_peft(delta, tmp_path / "bad", base_model_name_or_path=42)
    assert not (tmp_path / "bad").exists()


# ---------------------------------------------------------------------------------------------- rsLoRA and DoRA
# DoRA positions (no embeddings: deltakit refuses DoRA on them) for deltakit (role names) and PEFT (suffixes).
DORA_ROLES = {"bert": ["attn.q", "attn.v"], "gpt2": ["attn.q", "ff.w1"], "llama": ["attn.q", "attn.v", "ff.gate", "ff.w2"]}
DORA_TARGETS = {"bert": ["query", "value"], "gpt2": ["c_attn", "c_fc"], "llama": ["q_proj", "v_proj", "gate_proj", "down_proj"]}


@pytest.mark.parametrize("arch", TESTED)
def test_rslora_adapter_imports_with_its_scale_and_exports_back(arch: str, tmp_path) -> None:
    _, theirs = peft_adapter(arch, str(tmp_path / "peft"), use_rslora=True)
    model = tiny_model(arch)
    delta = from_peft(tmp_path / "peft", model)
    assert isinstance(delta, LoraModel) and delta.config.use_rslora is True
    assert all(s.module.scaling == 8 / 2 for s in delta.sites)  # lora_alpha / sqrt(r) = 8 / sqrt(4)
    ours = hidden(model)
    same_as_peft(ours, theirs)
    # the plain-LoRA scale (8 / 4) would be another function: the flag matters
    assert not torch.allclose(ours, hidden(from_peft_without_rslora(tmp_path)))
    export_to_peft(delta, tmp_path / "again")
    assert json.loads((tmp_path / "again" / PEFT_CONFIG_NAME).read_text())["use_rslora"] is True
    reloaded = peft.PeftModel.from_pretrained(tiny_model(arch), tmp_path / "again").eval()
    same_as_peft(hidden(reloaded), theirs)
    # and through a deltakit checkpoint: the flag is in delta_config.json
    delta.save_finetuned(tmp_path / "deltakit")
    fresh = tiny_model(arch)
    assert AutoDeltaModel.from_finetuned(tmp_path / "deltakit", fresh).config.use_rslora is True
    assert torch.equal(hidden(fresh), ours)


def from_peft_without_rslora(tmp_path) -> nn.Module:
    """The same adapter read as if use_rslora were off (what a loader that drops the flag serves)."""
    import shutil

    shutil.copytree(tmp_path / "peft", tmp_path / "plain")
    _edit_config(tmp_path / "plain", use_rslora=False)
    arch = json.loads((tmp_path / "plain" / PEFT_CONFIG_NAME).read_text())["auto_mapping"]["base_model_class"]
    model = tiny_model({"BertModel": "bert", "GPT2Model": "gpt2", "LlamaModel": "llama"}[arch])
    from_peft(tmp_path / "plain", model)
    return model


def peft_dora_adapter(arch: str, path, **options: object) -> tuple[nn.Module, torch.Tensor]:
    """A PEFT DoRA adapter with random factors and magnitudes; PEFT's model and output."""
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=DORA_TARGETS[arch], use_dora=True, **options)
    model = peft.get_peft_model(tiny_model(arch), config)
    perturb_dora(model, seed=3)
    model.save_pretrained(path)
    model.eval()
    return model, hidden(model)


def perturb_dora(model: nn.Module, seed: int) -> None:
    """Random LoRA factors; magnitudes moved by up to 20% from the row norms PEFT starts them at."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.2 * (torch.rand(param.shape, generator=g) * 2 - 1))
            elif "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.3)


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("arch", TESTED)
def test_peft_dora_adapter_imports_and_exports_back(arch: str, rslora: bool, tmp_path) -> None:
    _, theirs = peft_dora_adapter(arch, tmp_path / "peft", use_rslora=rslora)
    model = tiny_model(arch)
    delta = from_peft(tmp_path / "peft", model)
    assert isinstance(delta, DoraModel) and delta.state == "attached" and delta.config.use_rslora is rslora
    ours = hidden(model)
    same_as_peft(ours, theirs)
    assert not torch.allclose(ours, hidden(tiny_model(arch)))
    export_to_peft(delta, tmp_path / "again")
    original = load_file(tmp_path / "peft" / PEFT_WEIGHTS_NAME)
    again = load_file(tmp_path / "again" / PEFT_WEIGHTS_NAME)
    assert sorted(again) == sorted(original) and any(k.endswith(".lora_magnitude_vector") for k in again)
    assert all(torch.equal(original[k], again[k]) for k in again)  # a renaming: bit for bit
    config = json.loads((tmp_path / "again" / PEFT_CONFIG_NAME).read_text())
    assert config["use_dora"] is True and config["use_rslora"] is rslora
    reloaded = peft.PeftModel.from_pretrained(tiny_model(arch), tmp_path / "again").eval()
    same_as_peft(hidden(reloaded), theirs)
    delta.detach()
    assert torch.equal(hidden(model), hidden(tiny_model(arch)))


@pytest.mark.parametrize("arch", TESTED)
def test_deltakit_dora_exports_to_peft_with_the_same_outputs(arch: str, tmp_path) -> None:
    model = tiny_model(arch)
    delta = DoraModel(model, modified_modules=DORA_ROLES[arch], lora_r=4, lora_alpha=8)
    perturb(delta, scale=0.3)
    ours = hidden(model)
    export_to_peft(delta, tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(tiny_model(arch), tmp_path / "adapter").eval()
    same_as_peft(hidden(theirs), ours)
    for site in delta.sites:  # PEFT holds our magnitudes, bit for bit
        layer = theirs.base_model.model.get_submodule(site.name)
        assert torch.equal(layer.lora_magnitude_vector["default"].weight, site.module.magnitude)


def test_peft_dora_on_an_embedding_is_refused_and_changes_nothing(tmp_path) -> None:
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "word_embeddings"], use_dora=True)
    peft.get_peft_model(tiny_model("bert"), config).save_pretrained(tmp_path / "peft")
    model = tiny_model("bert")
    state, hooks = snapshot(model), hook_counts(model)
    with pytest.raises(CheckpointError, match="DoRA on embeddings is not implemented"):
        from_peft(tmp_path / "peft", model)
    assert_state_equal(model, state)
    assert hook_counts(model) == hooks


@pytest.mark.parametrize("use_dora", [True, False])
def test_a_file_that_does_not_match_use_dora_is_refused(use_dora: bool, tmp_path) -> None:
    # DoRA tensors with use_dora off (or plain LoRA tensors with it on) would be read as another function
    if use_dora:
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=DORA_TARGETS["bert"])
        peft.get_peft_model(tiny_model("bert"), config).save_pretrained(tmp_path / "peft")
    else:
        peft_dora_adapter("bert", tmp_path / "peft")
    _edit_config(tmp_path / "peft", use_dora=use_dora)
    model = tiny_model("bert")
    state = snapshot(model)
    with pytest.raises(CheckpointError, match="use_dora"):
        from_peft(tmp_path / "peft", model)
    assert_state_equal(model, state)


@pytest.mark.parametrize("option", ["use_rslora", "use_dora"])
def test_a_non_boolean_flag_is_refused(option: str, tmp_path) -> None:
    peft_adapter("bert", str(tmp_path / "peft"))
    _edit_config(tmp_path / "peft", **{option: "yes"})
    with pytest.raises(CheckpointError, match=option):
        from_peft(tmp_path / "peft", tiny_model("bert"))


def test_export_refuses_a_head_tied_to_another_module_and_writes_nothing(tmp_path) -> None:
    # GPT-2's lm_head shares its weight with wte: PEFT ties such modules_to_save by options this export does not write
    delta = LoraModel(tiny_gpt2(), modified_modules=["attn.q"], lora_r=2, modules_to_save=["lm_head"])
    with pytest.raises(DeltaError, match=r"head 'lm_head'.*same tensor as 'transformer.wte.weight' \(tied"):
        export_to_peft(delta, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()
