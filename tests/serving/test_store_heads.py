"""Registered deltas that own a task head (``modules_to_save``) load on a miss of ``switch`` / ``route`` like
``from_finetuned`` loads them: the head copy with its own values and size (a 6-label head on a 2-label backbone),
whichever path the store takes (the full loader on the first miss of a site list, one read afterwards)."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch
from transformers import BertForSequenceClassification

from deltakit import AutoDeltaModel, CheckpointError, DeltaGroup, LoraModel
from deltakit.checkpoint import CONFIG_NAME
from deltakit.store import load_into, read_stored
from tests.helpers import assert_state_equal, perturb, snapshot, tiny_bert

IDS = torch.arange(3, 10).view(1, -1)


def labelled_bert(num_labels: int) -> torch.nn.Module:
    """The encoder of ``tiny_bert()`` under a fresh classifier with ``num_labels`` outputs."""
    base = tiny_bert()
    model = BertForSequenceClassification(base.config.__class__(**{**base.config.to_dict(), "num_labels": num_labels}))
    model.load_state_dict({k: v for k, v in base.state_dict().items() if not k.startswith("classifier.")}, strict=False)
    return model.eval()


def save_head_delta(path: pathlib.Path, num_labels: int, seed: int) -> None:
    """A LoRA with its own classifier copy (``num_labels`` outputs), trained values, saved to ``path``."""
    delta = LoraModel(labelled_bert(num_labels), modified_modules=["query", "value"], modules_to_save=["classifier"])
    perturb(delta, seed=seed, scale=0.3)
    delta.save_finetuned(path)


def from_finetuned_logits(path: pathlib.Path) -> torch.Tensor:
    """What the delta computes loaded alone onto a fresh 2-label backbone by the checkpoint loader."""
    model = tiny_bert()
    AutoDeltaModel.from_finetuned(path, model)
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture
def saved(tmp_path: pathlib.Path) -> dict[str, pathlib.Path]:
    # Three deltas on the same list of sites: the first miss takes the full loader, the next ones the fast read.
    paths = {}
    for seed, (name, labels) in enumerate((("first", 6), ("topic", 6), ("spelling", 2), ("other", 3))):
        paths[name] = tmp_path / name
        save_head_delta(paths[name], labels, seed=20 + seed)
    return paths


def test_a_registered_delta_with_a_resized_head_switches_in_like_from_finetuned(saved) -> None:
    model = tiny_bert()
    state = snapshot(model)
    group = DeltaGroup(model, max_active=2)
    for name, path in saved.items():
        group.register(name, path)
    # every miss after the first reads the checkpoint straight into a built delta (the fast path)
    for name in ("first", "topic", "spelling", "other", "topic", "first"):
        group.switch(name)
        with torch.no_grad():
            logits = model(IDS).logits
        # the same operations as from_finetuned's delta (same modules, same values): bit for bit
        assert torch.equal(logits, from_finetuned_logits(saved[name])), name
    assert group.store_stats["misses"] >= 5 and group.store_stats["evictions"] >= 3
    group.switch(None)
    assert_state_equal(model, state)


def test_the_fast_read_builds_the_head_at_its_recorded_size(saved) -> None:
    # load_into directly: the one-read path a miss takes once the site list has been resolved
    model = tiny_bert()
    state = snapshot(model)
    reference = AutoDeltaModel.from_finetuned(saved["topic"], tiny_bert())
    entry = read_stored("topic", saved["topic"])
    assert entry.head_names == ("classifier",)
    hosts = [(site.name, model.get_submodule(site.name)) for site in reference.sites]
    delta = load_into(entry, model, hosts)
    assert delta is not None and delta.state == "detached"
    assert_state_equal(model, state)  # built and read, nothing attached
    assert delta.heads["classifier"].out_features == 6
    ours, theirs = delta.delta_state_dict(), reference.delta_state_dict()
    assert list(ours) == list(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_head_that_does_not_fit_is_refused_on_the_miss_and_changes_nothing(saved) -> None:
    meta_file = saved["topic"] / CONFIG_NAME
    meta = json.loads(meta_file.read_text())
    meta["head_shapes"]["classifier.weight"] = [6, 16]  # another hidden size: not a head of this backbone
    meta_file.write_text(json.dumps(meta))
    model = tiny_bert()
    group = DeltaGroup(model)
    group.register("first", saved["first"])
    group.register("topic", saved["topic"])
    group.switch("first")
    with torch.no_grad():
        before = model(IDS).logits
    state = snapshot(model)
    with pytest.raises(CheckpointError, match="only the number of outputs"):
        group.switch("topic")
    assert_state_equal(model, state)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, before)


def test_register_refuses_head_tensors_the_config_does_not_list(saved) -> None:
    meta_file = saved["topic"] / CONFIG_NAME
    meta = json.loads(meta_file.read_text())
    del meta["heads"], meta["head_shapes"]
    meta_file.write_text(json.dumps(meta))
    group = DeltaGroup(tiny_bert())
    with pytest.raises(CheckpointError, match="'lora_heads.classifier.*none of the sites and heads"):
        group.register("topic", saved["topic"])
    assert "topic" not in group
