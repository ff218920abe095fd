"""Finding the transformers config (and ``model_type``) of whatever model deltakit was handed."""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn


def _configs(model: nn.Module) -> Iterator[object]:
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and isinstance(getattr(config, "model_type", None), str):
            yield config


def detect_model_type(model: nn.Module) -> str | None:
    """The HF ``model_type`` of the first transformers model found in ``model`` (itself or any submodule).

    Returns ``None`` for a plain ``nn.Module`` that holds no transformers model.
    """
    for config in _configs(model):
        return config.model_type  # type: ignore[attr-defined]
    return None


def find_config(model: nn.Module) -> object | None:
    """The HF config of the first transformers model found in ``model``, or ``None``."""
    return next(_configs(model), None)
