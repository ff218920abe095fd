"""What a module's signature says: the cache and mask keywords, KV attention modules, the installed version."""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from ..errors import DeltaError

#: Names the KV-cache keyword has had in transformers 5.x (``past_key_values`` is the deprecated alias of ``cache``).
CACHE_KWARGS = ("cache", "past_key_values", "layer_past")  # layer_past: GPT-NeoX / Falcon attention modules
#: Names of an attention module's mask argument (``mask`` in T5).
MASK_KWARGS = ("attention_mask", "mask")
#: Arguments whose presence (not ``None``) makes an attention call a cross-attention call.
CROSS_KWARGS = ("key_value_states", "encoder_hidden_states")


def transformers_version() -> str:
    """The installed transformers version (``"not installed"`` without it)."""
    try:
        import transformers
    except ImportError:  # pragma: no cover - transformers is a dependency
        return "not installed"
    return str(transformers.__version__)


def unsupported(what: str) -> DeltaError:
    return DeltaError(
        f"{what} (transformers {transformers_version()}). deltakit's prompt family supports the transformers 5.x "
        f"attention/cache API; please report this with the model class and transformers version."
    )


def forward_parameters(module: nn.Module) -> list[str]:
    """Names of ``module.forward``'s parameters in order (decorators that keep ``__wrapped__`` are seen through)."""
    try:
        return list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return []


def cache_parameter(module: nn.Module) -> str | None:
    """The name under which ``module.forward`` takes a KV cache (``"cache"`` or ``"past_key_values"``), or None."""
    params = forward_parameters(module)
    return next((name for name in CACHE_KWARGS if name in params), None)


def is_kv_attention(module: nn.Module) -> bool:
    """Whether ``module`` is an attention module that consumes a KV cache itself: it takes a cache argument and no
    submodule of it does (so ``LlamaAttention``, not ``LlamaDecoderLayer``; ``BertSelfAttention``, not
    ``BertAttention``)."""
    if cache_parameter(module) is None or _is_whole_model(module):
        return False
    return not any(cache_parameter(child) is not None for _, child in module.named_modules() if child is not module)


def _is_whole_model(module: nn.Module) -> bool:
    """A transformers model (``GPTNeoXModel``): never an attention module, even when its attention layers take their
    cache under a name deltakit does not know."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(module, PreTrainedModel)


def find_attention_modules(model: nn.Module, skip_types: tuple[type, ...] = ()) -> list[tuple[str, nn.Module]]:
    """Every KV-cache attention module of ``model`` (see :func:`is_kv_attention`), in model order."""
    out = []
    for name, module in model.named_modules():
        if skip_types and isinstance(module, skip_types):
            continue
        if name and is_kv_attention(module):
            out.append((name, module))
    return out


def find_config(model: nn.Module) -> Any:
    """The transformers config of ``model`` or of the first submodule that has one (None if there is none)."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "to_dict"):
            return config
    return None
