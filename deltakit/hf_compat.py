"""Everything the prompt family (prefix tuning, soft prompts) needs to know about transformers internals.

This is the only module of deltakit that touches KV-cache objects, attention-mask formats, the name of the cache
keyword and the way attention modules consume them. Nothing here relies on one private detail of one
transformers version: each fact is probed from what the objects expose (forward signatures, ``update`` /
``get_seq_length`` of cache objects, mask dtypes and ranks), and when nothing fits a :class:`DeltaError` naming the
installed transformers version is raised, never a silent no-op.

How prefixes get in. Every transformers attention module of the 5.x line computes its keys and values and then
asks the cache for the full sequence: ``keys, values = cache.update(new_keys, new_values, layer_idx, ...)``. A
forward pre-hook on the attention module hands it a :class:`PrefixedCache` instead of the cache it was given (or
of ``None``): ``update`` forwards to the real cache, which therefore stores only real tokens (so the model's own
bookkeeping of positions and lengths is untouched, and ``generate()``'s own cache works), and returns the prefix
keys/values in front of the real ones. The attention mask the module receives is widened by the prefix length
(the prefix is visible to every query), and where the model relies on an implicit causal mask (SDPA's
``is_causal``, top-left aligned and cropping extra keys) an explicit bottom-right aligned one is built.
Cross-attention gets a proxy without a backing cache, so its keys are recomputed (with the prefix) at each step.
Relative position biases computed from the cache length (T5) see the prefix in that length, which keeps the
real tokens' relative positions unchanged.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import DeltaError, UnsupportedModuleError

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


def _unsupported(what: str) -> DeltaError:
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
        raise _unsupported(f"The KV cache passed to the model is a {type(cache).__name__} without get_seq_length()")
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
            raise _unsupported(
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
        raise _unsupported(
            f"Attention module {self._site!r} used cache.{name}, which deltakit's prefix cache does not provide"
        )


# ---------------------------------------------------------------------------------------------------- masks
def extend_attention_mask(mask: Any, extra: int, site: str) -> Any:
    """Widen an attention mask by ``extra`` visible key positions in front (the prefix).

    Handles the formats attention modules receive: 4-D ``(batch, heads, queries, keys)`` boolean (True = attend)
    or additive float (0 = attend), and 2-D ``(batch, keys)`` padding masks (1 = attend). ``None`` stays ``None``.
    """
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise _unsupported(f"Attention module {site!r} received an attention mask of type {type(mask).__name__}")
    if mask.dim() == 4:
        fill = True if mask.dtype == torch.bool else 0
        pad = torch.full((*mask.shape[:-1], extra), fill, dtype=mask.dtype, device=mask.device)
        return torch.cat([pad, mask], dim=-1)
    if mask.dim() == 2:
        pad = torch.ones(mask.shape[0], extra, dtype=mask.dtype, device=mask.device)
        return torch.cat([pad, mask], dim=-1)
    raise _unsupported(f"Attention module {site!r} received a {mask.dim()}-D attention mask of shape {tuple(mask.shape)}")


def prefix_causal_mask(query_len: int, past_len: int, extra: int, like: torch.Tensor) -> torch.Tensor:
    """An additive ``(1, 1, q, extra + past + q)`` mask: prefix visible to all, real keys bottom-right causal."""
    keys = torch.arange(past_len + query_len, device=like.device)
    queries = torch.arange(query_len, device=like.device)[:, None] + past_len
    allowed = torch.cat([torch.ones(query_len, extra, dtype=torch.bool, device=like.device), keys[None, :] <= queries], 1)
    dtype = like.dtype if like.dtype.is_floating_point else torch.float32
    zero = torch.zeros((), dtype=dtype, device=like.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min).view(1, 1, query_len, -1)


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
        raise _unsupported(f"The KV cache given to {site!r} is a {type(inner).__name__} without update()")
    hidden = call.get(signature.hidden_name)
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        raise _unsupported(f"Attention module {site!r} was called without (batch, length, hidden) hidden states first")
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
                raise _unsupported(f"Causal attention module {site!r} takes no attention mask argument")
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


# ---------------------------------------------------------------------------------------------------- soft prompts
def is_encoder_decoder(model: nn.Module) -> bool:
    """Whether the backbone is an encoder-decoder transformers model."""
    config = find_config(model)
    return bool(getattr(config, "is_encoder_decoder", False))


def input_embeddings(model: nn.Module) -> nn.Module:
    """The input token embedding module (``get_input_embeddings()``)."""
    getter = getattr(model, "get_input_embeddings", None)
    embedding = getter() if callable(getter) else None
    if not isinstance(embedding, nn.Module):
        raise UnsupportedModuleError(
            f"Soft prompts need the backbone's input embeddings: {type(model).__name__} has no get_input_embeddings() "
            f"returning a module (transformers {transformers_version()})."
        )
    return embedding


def _innermost_with(model: nn.Module, needed: tuple[str, ...]) -> tuple[str, nn.Module] | None:
    found = [(n, m) for n, m in model.named_modules() if all(p in forward_parameters(m) for p in needed)]
    for name, module in found:
        inside = [n for n, _ in found if n != name and (name == "" or n.startswith(name + "."))]
        if not inside:
            return name, module
    return None


def soft_prompt_targets(model: nn.Module) -> tuple[tuple[str, nn.Module], tuple[str, nn.Module] | None]:
    """Where soft prompts go in: the module that embeds the tokens and takes the attention mask (the base model, or
    the encoder of an encoder-decoder), and for encoder-decoders also the decoder (whose cross-attention mask must
    cover the prompt). For a bare base model (``BertModel``, ``LlamaModel``) the first is the root, named ``""``.
    """
    names = {id(m): n for n, m in model.named_modules()}
    if is_encoder_decoder(model):
        parts = []
        for getter_name in ("get_encoder", "get_decoder"):
            getter = getattr(model, getter_name, None)
            part = getter() if callable(getter) else None
            if not isinstance(part, nn.Module) or id(part) not in names:
                raise UnsupportedModuleError(
                    f"Soft prompts on the encoder-decoder {type(model).__name__} need {getter_name}() to return one of "
                    f"its modules (transformers {transformers_version()})."
                )
            parts.append((names[id(part)], part))
        return parts[0], parts[1]
    target = _innermost_with(model, ("inputs_embeds", "attention_mask", "input_ids"))
    if target is None:
        raise UnsupportedModuleError(
            f"Soft prompts found no module of {type(model).__name__} (itself included) whose forward takes input_ids, "
            f"inputs_embeds and attention_mask, as a transformers base model's does (transformers "
            f"{transformers_version()}). Pass the transformers model itself (e.g. BertModel or LlamaForCausalLM)."
        )
    return target, None


def module_name(model: nn.Module, module: nn.Module, what: str) -> str:
    """The name of ``module`` inside ``model`` (``""`` for the root).

    Raises:
        UnsupportedModuleError: ``module`` is not part of ``model``.
    """
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    raise UnsupportedModuleError(
        f"The {what} of {type(model).__name__} ({type(module).__name__}) is not one of its modules "
        f"(transformers {transformers_version()})."
    )


#: Child names of the head that ``*ForSequenceClassification`` models apply to every position before pooling one.
SEQUENCE_HEAD_NAMES = ("score", "classifier")


def sequence_classification_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """The ``*ForSequenceClassification`` module of a model that is not an encoder-decoder, and its classification
    head (``score``, or ``classifier``), or None.

    Decoder-only classifiers (GPT-2, Llama, Mistral, Qwen2, GPT-NeoX, OPT, ...) apply the head at every position and
    pool the logits at the last non-padding token, an index they compute from the caller's ``input_ids``: with a
    soft prompt in front it must index the real tokens, see :func:`keep_real_positions`. Heads applied to one pooled
    vector (BERT's, RoBERTa's) return no position dimension and are never changed.
    """
    if is_encoder_decoder(model):
        return None
    for module in model.modules():
        if type(module).__name__.endswith("ForSequenceClassification"):
            for name in SEQUENCE_HEAD_NAMES:
                head = module._modules.get(name)
                if isinstance(head, nn.Module):
                    return module, head
            return None
    return None


def input_length(params: list[str], args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    """The number of positions the caller passes (from ``input_ids``, else ``inputs_embeds``), or None."""
    call = CallArgs(params, args, kwargs)
    ids, embeds = call.get("input_ids"), call.get("inputs_embeds")
    if isinstance(ids, torch.Tensor) and ids.dim() >= 1:
        return int(ids.shape[-1])
    if isinstance(embeds, torch.Tensor) and embeds.dim() == 3:
        return int(embeds.shape[1])
    return None


def keep_real_positions(output: Any, length: int | None) -> Any:
    """The per-position output ``(batch, positions, ...)`` of a classification head, cut to its last ``length``
    positions (the real tokens; soft prompts sit in front) when it has more. Anything else is returned unchanged."""
    if length is None or not isinstance(output, torch.Tensor) or output.dim() != 3 or output.shape[1] <= length:
        return output
    return output[:, -length:]


def _prepend_mask(mask: torch.Tensor, count: int, where: str) -> torch.Tensor:
    if mask.dim() != 2:
        raise DeltaError(
            f"Soft prompts need a 2-D (batch, length) attention mask at {where!r}, got shape {tuple(mask.shape)}; pass "
            f"the usual padding mask (1 = token, 0 = padding)."
        )
    return torch.cat([torch.ones(mask.shape[0], count, dtype=mask.dtype, device=mask.device), mask], dim=1)


def prepend_soft_prompt(
    params: list[str],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    prompt: torch.Tensor,
    embedding: nn.Module,
    where: str,
    limit: int | None = None,
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Rewrite a call of the embedding module's consumer: soft prompt embeddings ``(n, hidden)`` in front of the
    token embeddings, attention mask and token type ids extended, position ids shifted. When the call continues a
    KV cache that already holds the prompt, only the mask and positions are adjusted. New tensors are built; the
    caller's are never modified. ``limit``: the model's number of absolute positions (see :func:`position_limit`),
    checked so that an input the prompt pushes past it gets a clear error.
    """
    call = CallArgs(params, args, kwargs)
    count = prompt.shape[0]
    cache_name = call.first_present(CACHE_KWARGS)
    cache = call.get(cache_name) if cache_name else None
    past = cache_length(cache) if cache is not None else 0
    continuing = past > 0
    if limit is not None:
        tokens = next((t.shape[1] for t in (call.get("input_ids"), call.get("inputs_embeds"))
                       if isinstance(t, torch.Tensor) and t.dim() >= 2), 0)
        total = past + tokens + (0 if continuing else count)
        if total > limit:
            raise DeltaError(
                f"Soft prompts: {where!r} would need {total} positions ({count} soft prompt tokens, "
                f"{total - count} of input and cache), but the model has {limit} position embeddings. Shorten the "
                f"input (or max_new_tokens) by {total - limit}, or use fewer soft tokens."
            )
    mask = call.get("attention_mask")
    if mask is not None:
        call.set("attention_mask", _prepend_mask(mask, count, where))
    if continuing:
        for name in ("position_ids", "cache_position"):
            value = call.get(name)
            if value is not None:
                call.set(name, value + count)
        return call.result()
    input_ids, embeds = call.get("input_ids"), call.get("inputs_embeds")
    if embeds is None:
        if input_ids is None:
            raise DeltaError(f"Soft prompts: the call of {where!r} has neither input_ids nor inputs_embeds.")
        embeds = embedding(input_ids)
        call.set("input_ids", None)
    batch = embeds.shape[0]
    soft = prompt.to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
    call.set("inputs_embeds", torch.cat([soft, embeds], dim=1))
    token_types = call.get("token_type_ids")
    if token_types is not None:
        zeros = torch.zeros(token_types.shape[0], count, dtype=token_types.dtype, device=token_types.device)
        call.set("token_type_ids", torch.cat([zeros, token_types], dim=1))
    for name in ("position_ids", "cache_position"):
        value = call.get(name)
        if value is not None:
            head = torch.arange(count, dtype=value.dtype, device=value.device)
            head = head.expand(*value.shape[:-1], count) if value.dim() > 1 else head
            call.set(name, torch.cat([head, value + count], dim=-1))
    return call.result()


def position_limit(model: nn.Module) -> int | None:
    """How many absolute positions the model's learned position embedding has (GPT-2 ``wpe``, BERT
    ``position_embeddings``, OPT/BART ``embed_positions`` minus their offset), or None (rotary / relative positions)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and name.rpartition(".")[2] in (
            "position_embeddings", "wpe", "embed_positions"
        ):
            return module.num_embeddings - int(getattr(module, "offset", 0) or 0)
    return None


def extend_encoder_mask(
    params: list[str], args: tuple[Any, ...], kwargs: dict[str, Any], count: int, where: str
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A decoder call attending to an encoder output that starts with ``count`` soft prompt positions: widen its
    ``encoder_attention_mask`` when it still has the prompt-less length."""
    call = CallArgs(params, args, kwargs)
    mask, states = call.get("encoder_attention_mask"), call.get("encoder_hidden_states")
    if mask is not None and isinstance(states, torch.Tensor) and mask.shape[-1] == states.shape[1] - count:
        call.set("encoder_attention_mask", _prepend_mask(mask, count, where))
    return call.result()


def extend_token_labels(
    params: list[str], args: tuple[Any, ...], kwargs: dict[str, Any], count: int, ignore_index: int = -100
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Token-level ``labels`` (one integer per input token) get ``count`` ignored positions in front, matching the
    logits of the soft prompt positions; sequence-level labels (class ids, or float multi-label / regression targets
    of shape ``(batch, num_labels)``) are left alone."""
    call = CallArgs(params, args, kwargs)
    labels, ids, embeds = call.get("labels"), call.get("input_ids"), call.get("inputs_embeds")
    length = ids.shape[1] if isinstance(ids, torch.Tensor) else embeds.shape[1] if isinstance(embeds, torch.Tensor) else None
    cache_name = call.first_present(CACHE_KWARGS)
    if cache_name is not None and cache_length(call.get(cache_name)) > 0:
        return call.result()
    if (
        isinstance(labels, torch.Tensor)
        and labels.dim() == 2
        and not labels.is_floating_point()
        and length is not None
        and labels.shape[1] == length
    ):
        head = torch.full((labels.shape[0], count), ignore_index, dtype=labels.dtype, device=labels.device)
        call.set("labels", torch.cat([head, labels], dim=1))
    return call.result()
