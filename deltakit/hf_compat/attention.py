"""Attention modules as the prefix sees them: their geometry, position-bias groups, their call arguments, and
putting a prefix into a call."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import UnsupportedModuleError
from .cache import PrefixedCache, cache_length, self_attention_part
from .masks import extend_attention_mask, prefix_causal_mask
from .probe import (
    CACHE_KWARGS,
    CROSS_KWARGS,
    MASK_KWARGS,
    cache_parameter,
    find_config,
    forward_parameters,
    transformers_version,
    unsupported,
)


def _int_attr(obj: Any, names: tuple[str, ...]) -> int | None:
    for name in names:
        value = getattr(obj, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


@dataclass(frozen=True)
class AttentionGeometry:
    """Shape facts of one attention module: key/value heads (fewer than query heads with GQA) and head size."""

    num_heads: int
    num_kv_heads: int
    head_dim: int


def attention_geometry(name: str, module: nn.Module, backbone: nn.Module) -> AttentionGeometry:
    """Heads, key/value heads and head size of the attention module ``name``, from its attributes and the config.

    Raises:
        UnsupportedModuleError: the sizes cannot be told (not an attention module of a known shape convention).
    """
    config = getattr(module, "config", None) or find_config(backbone)
    heads = _int_attr(module, ("num_heads", "n_heads", "num_attention_heads", "n_head"))
    if heads is None and config is not None:
        heads = _int_attr(config, ("num_attention_heads", "n_head", "num_heads"))
    head_dim = _int_attr(module, ("head_dim", "attention_head_size", "key_value_proj_dim", "d_kv"))
    if head_dim is None and config is not None:
        head_dim = _int_attr(config, ("head_dim", "d_kv"))
        hidden = _int_attr(config, ("hidden_size", "n_embd", "d_model"))
        if head_dim is None and hidden is not None and heads:
            head_dim = hidden // heads
    if heads is None or head_dim is None:
        raise UnsupportedModuleError(
            f"Cannot tell the number of heads / head size of attention module {name!r} ({type(module).__name__}) "
            f"from its attributes or the model config (transformers {transformers_version()}). Point "
            f"modified_modules at the attention modules (e.g. 'self_attn', 'attention.self', 'SelfAttention')."
        )
    groups = _int_attr(module, ("num_key_value_groups",))
    if groups is None:
        kv = _int_attr(module, ("num_key_value_heads", "num_kv_heads"))  # Falcon: multi-query on the module
        if kv is None and config is not None:
            kv = _int_attr(config, ("num_key_value_heads", "num_kv_heads"))
        groups = heads // kv if kv and heads % kv == 0 else 1
    groups = groups or 1
    if heads % groups:
        raise UnsupportedModuleError(
            f"Attention module {name!r}: {heads} heads are not a multiple of {groups} key/value groups."
        )
    return AttentionGeometry(num_heads=heads, num_kv_heads=heads // groups, head_dim=head_dim)


def uses_shared_position_bias(module: nn.Module) -> bool:
    """Whether the attention module takes a ``position_bias`` computed once per stack and passed layer to layer (T5):
    then every layer of a stack must see the same number of extra keys."""
    return "position_bias" in forward_parameters(module)


def check_position_bias_groups(all_modules: list[tuple[str, nn.Module]], chosen: list[str]) -> None:
    """For stacks that share one position bias (T5), refuse to prefix only some of their attention modules.

    Args:
        all_modules: Every KV-cache attention module of the backbone.
        chosen: Names of the modules that will get a prefix.
    """
    groups: dict[str, list[str]] = {}
    for name, module in all_modules:
        if uses_shared_position_bias(module):
            groups.setdefault(re.sub(r"\.\d+\.", ".*.", name), []).append(name)
    chosen_set = set(chosen)
    for pattern, names in groups.items():
        picked = [n for n in names if n in chosen_set]
        if picked and len(picked) != len(names):
            missing = [n for n in names if n not in chosen_set]
            raise UnsupportedModuleError(
                f"The attention modules {pattern!r} share one position bias computed in the first layer (e.g. T5), "
                f"so a prefix must be on all of them or none; missing {missing[:3]}"
                f"{' ...' if len(missing) > 3 else ''}. Select all layers or exclude the whole stack."
            )


# ---------------------------------------------------------------------------------------------------- calls
class CallArgs:
    """Named access to the arguments of one forward call, given the callee's parameter names."""

    def __init__(self, params: list[str], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.params = [p for p in params if p not in ("self", "args", "kwargs")]
        self.args = list(args)
        self.kwargs = dict(kwargs)

    def _index(self, name: str) -> int | None:
        return self.params.index(name) if name in self.params else None

    def has(self, name: str) -> bool:
        index = self._index(name)
        return name in self.kwargs or (index is not None and index < len(self.args))

    def get(self, name: str, default: Any = None) -> Any:
        if name in self.kwargs:
            return self.kwargs[name]
        index = self._index(name)
        if index is not None and index < len(self.args):
            return self.args[index]
        return default

    def set(self, name: str, value: Any) -> None:
        index = self._index(name)
        if name not in self.kwargs and index is not None and index < len(self.args):
            self.args[index] = value
        else:
            self.kwargs[name] = value

    def first_present(self, names: tuple[str, ...]) -> str | None:
        return next((n for n in names if self.has(n)), None)

    def result(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return tuple(self.args), self.kwargs


@dataclass
class AttentionSignature:
    """What a prefix pre-hook needs to know about an attention module's forward, probed once at build time."""

    params: list[str]
    cache_name: str
    mask_name: str | None
    hidden_name: str

    @classmethod
    def probe(cls, name: str, module: nn.Module) -> AttentionSignature:
        params = forward_parameters(module)
        cache_name = cache_parameter(module)
        if cache_name is None:
            raise UnsupportedModuleError(
                f"Prefix tuning cannot modify {name!r} ({type(module).__name__}): its forward takes no KV cache "
                f"argument ({' / '.join(CACHE_KWARGS)}; transformers {transformers_version()}). Point "
                f"modified_modules at attention modules (e.g. 'self_attn', 'attention.self', 'SelfAttention')."
            )
        mask_name = next((m for m in MASK_KWARGS if m in params), None)
        hidden = [p for p in params if p not in ("self",)]
        return cls(params=params, cache_name=cache_name, mask_name=mask_name, hidden_name=hidden[0])


def inject_prefix(
    signature: AttentionSignature,
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    key: torch.Tensor,
    value: torch.Tensor,
    site: str,
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Rewrite one attention call so that ``key``/``value`` ``(kv_heads, n_prefix, head_dim)`` come first.

    The module's cache argument becomes a :class:`PrefixedCache` (backed by the real self-attention cache, or by
    nothing for cross-attention), and its mask is widened; see the module docstring.
    """
    call = CallArgs(signature.params, args, kwargs)
    present = call.first_present(CACHE_KWARGS)
    cache_name = present or signature.cache_name
    cache = call.get(cache_name)
    cross = any(call.get(name) is not None for name in CROSS_KWARGS)
    inner = None if cross or cache is None else self_attention_part(cache)
    if inner is not None and not callable(getattr(inner, "update", None)):
        raise unsupported(f"The KV cache given to {site!r} is a {type(inner).__name__} without update()")
    hidden = call.get(signature.hidden_name)
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        raise unsupported(f"Attention module {site!r} was called without (batch, length, hidden) hidden states first")
    query_len = hidden.shape[1]
    extra = key.shape[1]
    mask_name = "encoder_attention_mask" if cross and "encoder_attention_mask" in signature.params else signature.mask_name
    mask = call.get(mask_name) if mask_name is not None else None
    if mask is not None:
        call.set(mask_name, extend_attention_mask(mask, extra, site))
    else:
        # Without a mask, SDPA decides causality from the call's is_causal, then the module's (default True);
        # modules of releases without that attribute say it with is_decoder (T5 in 5.0).
        causal = call.get("is_causal")
        for attribute in ("is_causal", "is_decoder"):
            if causal is None:
                causal = getattr(module, attribute, None)
        causal = True if causal is None else bool(causal)
        if causal and not cross and query_len > 1:
            if mask_name is None:
                raise unsupported(f"Causal attention module {site!r} takes no attention mask argument")
            past = cache_length(inner, getattr(module, "layer_idx", None) or 0)
            call.set(mask_name, prefix_causal_mask(query_len, past, extra, hidden))
    positions = None
    cache_position = call.get("cache_position")
    if not cross and "position_bias" in signature.params and isinstance(cache_position, torch.Tensor):
        # Releases whose relative position bias counts query positions from cache_position (T5 in 5.0) rather than
        # from the cache length: count the prefix there too, so real tokens keep their relative positions.
        shifted = cache_position + extra
        call.set("cache_position", shifted)
        positions = (shifted, cache_position)
    call.set(cache_name, PrefixedCache(inner, key, value, site, positions))
    return call.result()
