"""The base model reference a checkpoint records, so that one call can rebuild backbone + delta.

``delta_config.json`` holds ``"base_model"``: the ``name_or_path`` the backbone was loaded from (as the user gave it
to ``from_pretrained``: a local directory or a hub id; ``null`` for a model built from a config), its class and
module, and the config entries a task head needs to be rebuilt with the right shape (``num_labels`` through
``id2label`` / ``label2id``, ``problem_type``). :mod:`deltakit.auto` reads it back
(``AutoDeltaModel.from_pretrained``). Older checkpoints have no such field.
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from .meta_fields import field_error, short

__all__ = ["HEAD_CONFIG_KEYS", "PROBLEM_TYPES", "base_model_record", "check_base_model"]

#: Config entries of a task model that shape its head or its loss: what rebuilding it needs besides the weights.
HEAD_CONFIG_KEYS = ("num_labels", "id2label", "label2id", "problem_type")

#: The values transformers' task heads understand for ``config.problem_type`` (any other fails only at the loss).
PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")

_LABEL_ID = re.compile(r"-?(0|[1-9][0-9]{0,17})")  # as str(int) writes it: "01" and "1" would be one label


def base_model_record(backbone: nn.Module) -> dict[str, Any] | None:
    """What to record about ``backbone``: ``None`` when it is not a transformers model (no ``config`` with a
    ``model_type``), since only those can be rebuilt by name."""
    config = getattr(backbone, "config", None)
    if config is None or not isinstance(getattr(config, "model_type", None), str):
        return None
    name = getattr(config, "_name_or_path", None) or None
    head: dict[str, Any] = {}
    id2label = getattr(config, "id2label", None)
    if isinstance(id2label, dict) and id2label:
        head["num_labels"] = len(id2label)
        # transformers' default names (LABEL_0, ...) are what num_labels alone rebuilds: not worth recording
        if any(str(v) != f"LABEL_{k}" for k, v in id2label.items()):
            head["id2label"] = {str(k): str(v) for k, v in id2label.items()}
    label2id = getattr(config, "label2id", None)
    if "id2label" in head and isinstance(label2id, dict) and label2id:
        head["label2id"] = {str(k): int(v) for k, v in label2id.items()}
    problem_type = getattr(config, "problem_type", None)
    if isinstance(problem_type, str):
        head["problem_type"] = problem_type
    return {
        "name_or_path": None if name is None else str(name),
        "class": type(backbone).__name__,
        "module": type(backbone).__module__,
        "config": head,
    }


def check_base_model(meta: dict[str, Any], where: str) -> None:
    """Validate the optional ``base_model`` field of a parsed config (types only)."""
    record = meta.get("base_model")
    if record is None:
        return
    if not isinstance(record, dict):
        raise field_error(where, "base_model", f"must be an object or null, got {type(record).__name__}")
    name = record.get("name_or_path")
    if name is not None and not (isinstance(name, str) and name):
        raise field_error(where, "base_model", f"has name_or_path {short(name)}, not a non-empty string or null")
    for key in ("class", "module"):
        if not isinstance(record.get(key), str) or not record[key]:
            raise field_error(where, "base_model", f"has {key} {short(record.get(key))}, not a non-empty string")
    head = record.get("config", {})
    if not isinstance(head, dict):
        raise field_error(where, "base_model", f"has config {short(head)}, not an object")
    for key in ("id2label", "label2id"):
        value = head.get(key)
        if value is not None and not (isinstance(value, dict) and all(isinstance(k, str) for k in value)):
            raise field_error(where, "base_model", f"has config.{key} {short(value)}, not an object")
    if head.get("label2id") is not None and not all(
        isinstance(v, int) and not isinstance(v, bool) for v in head["label2id"].values()
    ):
        raise field_error(where, "base_model", "has config.label2id with a value that is not an integer")
    # ASCII digits only, and short: str.isdigit() accepts "²", and int() refuses it or a 5,000-digit key.
    bad_key = next((k for k in head.get("id2label") or {} if not _LABEL_ID.fullmatch(k)), None)
    if bad_key is not None:
        raise field_error(where, "base_model", f"has config.id2label with the key {short(bad_key)}, not an integer")
    labels = head.get("num_labels")
    if labels is not None and (not isinstance(labels, int) or isinstance(labels, bool) or not 0 < labels < 2**31):
        raise field_error(where, "base_model", f"has config.num_labels {short(labels)}, not a positive integer")
    if labels is not None and head.get("id2label") is not None and labels != len(head["id2label"]):
        # base_model_record writes both from one config; the loader would silently build len(id2label) labels
        raise field_error(
            where, "base_model", f"has config.num_labels {labels} and {len(head['id2label'])} entries in id2label"
        )
    if head.get("problem_type") is not None and head["problem_type"] not in PROBLEM_TYPES:
        raise field_error(
            where, "base_model", f"has config.problem_type {short(head['problem_type'])}, not one of {PROBLEM_TYPES}"
        )
