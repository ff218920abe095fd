"""KV-cache objects: their length, their self-attention part, and the cache proxy that prepends a prefix."""

from __future__ import annotations

from typing import Any

import torch

from .probe import unsupported


# ---------------------------------------------------------------------------------------------------- caches
def cache_length(cache: Any, layer_idx: int | None = None) -> int:
    """The number of tokens a cache object holds (for ``layer_idx``, or overall); 0 for ``None``.

    Raises:
        DeltaError: the object has no ``get_seq_length`` (an unknown cache format).
    """
    if cache is None:
        return 0
    getter = getattr(cache, "get_seq_length", None)
    if getter is None:
        raise unsupported(f"The KV cache passed to the model is a {type(cache).__name__} without get_seq_length()")
    length = getter() if layer_idx is None else getter(layer_idx)
    return int(length)


def self_attention_part(cache: Any) -> Any:
    """The self-attention cache of an encoder-decoder cache object, or the cache itself."""
    if isinstance(cache, PrefixedCache):
        return cache  # another prefix delta on the same module went first: stack on top of its cache
    inner = getattr(cache, "self_attention_cache", None)
    return cache if inner is None else inner


class PrefixedCache:
    """What an attention module receives as its cache while a prefix is attached (see the module docstring).

    ``update`` stores the new keys/values in the real cache (if any) and returns the prefix in front of everything
    the cache holds; ``get_seq_length`` counts the prefix. Any other use of the cache by the attention module is
    unknown to deltakit and raises rather than being passed through (which could bypass the prefix silently).
    """

    def __init__(
        self, inner: Any, key: torch.Tensor, value: torch.Tensor, site: str, positions: tuple[Any, Any] | None = None
    ) -> None:
        self._inner = inner
        self._key = key
        self._value = value
        self._site = site
        self._positions = positions  # (shifted, original) cache_position, see inject_prefix

    def _unshift(self, obj: Any) -> Any:
        """The real cache must get the caller's cache_position (a static cache writes at those slots)."""
        if self._positions is None:
            return obj
        shifted, original = self._positions
        if obj is shifted:
            return original
        if isinstance(obj, dict):
            return {k: self._unshift(v) for k, v in obj.items()}
        return obj

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: Any = None, *args: Any, **kwargs: Any):
        if self._inner is not None:
            args = tuple(self._unshift(a) for a in args)
            kwargs = {k: self._unshift(v) for k, v in kwargs.items()}
            key_states, value_states = self._inner.update(key_states, value_states, layer_idx, *args, **kwargs)
        return self._prepend(key_states, self._key), self._prepend(value_states, self._value)

    def _prepend(self, states: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        if states.dim() != 4 or states.shape[1] != prefix.shape[0] or states.shape[-1] != prefix.shape[-1]:
            raise unsupported(
                f"Attention module {self._site!r} produced keys/values of shape {tuple(states.shape)}, but the prefix "
                f"expects (batch, {prefix.shape[0]} kv heads, length, {prefix.shape[-1]})"
            )
        batched = prefix.to(states.dtype).unsqueeze(0).expand(states.shape[0], -1, -1, -1)
        return torch.cat([batched, states], dim=2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return cache_length(self._inner, layer_idx) + self._key.shape[1]

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        raise unsupported(
            f"Attention module {self._site!r} used cache.{name}, which deltakit's prefix cache does not provide"
        )
