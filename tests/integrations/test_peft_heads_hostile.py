"""PEFT adapters with heads (``modules_to_save``) that are hostile or unusual: two head copies round trip and
detach exactly; two sets of values for one module and a head with no outputs are refused, changing nothing."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from deltakit import CheckpointError, LoraModel
from deltakit.integrations.peft import PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME, export_to_peft, from_peft
from tests.helpers import assert_state_equal, hook_counts, perturb, snapshot, tiny_bert

pytest.importorskip("peft")

IDS = torch.arange(3, 10).view(1, -1)
PREFIX = "base_model.model."


@pytest.fixture(autouse=True)
def _quiet() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _exported(path, heads: list[str]) -> torch.Tensor:
    """A LoRA on ``query`` with copies of ``heads``, all perturbed, exported to ``path``; returns its logits."""
    model = tiny_bert()
    delta = LoraModel(model, modified_modules=["query"], lora_r=2, modules_to_save=heads)
    perturb(delta, seed=2, scale=0.3)
    export_to_peft(delta, path)
    return _logits(model)


def _edit(path, config=None, tensors=None) -> None:
    if config is not None:
        values = json.loads((path / PEFT_CONFIG_NAME).read_text())
        config(values)
        (path / PEFT_CONFIG_NAME).write_text(json.dumps(values))
    if tensors is not None:
        values = load_file(path / PEFT_WEIGHTS_NAME)
        tensors(values)
        save_file(values, path / PEFT_WEIGHTS_NAME, metadata={"format": "pt"})


def _refused_and_unchanged(path, match: str) -> None:
    model = tiny_bert()
    state = snapshot(model)
    with pytest.raises(CheckpointError, match=match):
        from_peft(path, model)
    assert_state_equal(model, state)
    assert all(h == (0, 0) for h in hook_counts(model).values())


def test_two_head_copies_round_trip_and_detach_gives_the_backbone_back(tmp_path) -> None:
    ours = _exported(tmp_path / "adapter", ["classifier", "bert.pooler"])
    config = json.loads((tmp_path / "adapter" / PEFT_CONFIG_NAME).read_text())
    assert sorted(config["modules_to_save"]) == ["bert.pooler", "classifier"]
    model = tiny_bert()
    state, base = snapshot(model), _logits(model)
    delta = from_peft(tmp_path / "adapter", model)
    assert list(delta.heads) == ["bert.pooler", "classifier"]
    assert torch.equal(_logits(model), ours)  # the same modules and values as the delta exported
    delta.detach()
    assert_state_equal(model, state)
    assert torch.equal(_logits(model), base)
    assert all(h == (0, 0) for h in hook_counts(model).values())


def test_two_sets_of_values_for_one_module_are_refused(tmp_path) -> None:
    # "pooler.dense" (a suffix) and "bert.pooler.dense" both name bert.pooler.dense: one set was dropped silently
    _exported(tmp_path / "adapter", ["classifier"])

    def add_two(t: dict[str, torch.Tensor]) -> None:
        for name, fill in (("bert.pooler.dense", 0.0), ("pooler.dense", 1.0)):
            t[f"{PREFIX}{name}.weight"] = torch.full((32, 32), fill)
            t[f"{PREFIX}{name}.bias"] = torch.full((32,), fill)

    _edit(tmp_path / "adapter", lambda c: c.__setitem__("modules_to_save", ["classifier", "dense"]), add_two)
    _refused_and_unchanged(tmp_path / "adapter", r"'bert\.pooler\.dense' and 'pooler\.dense'.*both name the module")


def test_a_head_with_no_outputs_is_refused(tmp_path) -> None:
    _exported(tmp_path / "adapter", ["classifier"])

    def empty(t: dict[str, torch.Tensor]) -> None:
        t[f"{PREFIX}classifier.weight"] = torch.zeros(0, 32)
        t[f"{PREFIX}classifier.bias"] = torch.zeros(0)

    _edit(tmp_path / "adapter", tensors=empty)
    _refused_and_unchanged(tmp_path / "adapter", r"classifier\.(weight|bias)' has the size \[0.*at least one")
