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

Files: ``probe`` (signatures, keywords, finding KV attention modules), ``attention`` (geometry and call arguments
of an attention module, putting a prefix in), ``cache`` (cache objects and the prefixing proxy), ``masks``, and
``prompts`` (what soft prompts need). Import the names from ``deltakit.hf_compat``.
"""

from __future__ import annotations

from .attention import (
    AttentionGeometry,
    AttentionSignature,
    CallArgs,
    attention_geometry,
    check_position_bias_groups,
    inject_prefix,
    uses_shared_position_bias,
)
from .cache import (
    PrefixedCache,
    cache_length,
    self_attention_part,
)
from .masks import (
    extend_attention_mask,
    prefix_causal_mask,
)
from .probe import (
    CACHE_KWARGS,
    CROSS_KWARGS,
    MASK_KWARGS,
    cache_parameter,
    find_attention_modules,
    find_config,
    forward_parameters,
    is_kv_attention,
    transformers_version,
    unsupported,
)
from .prompts import (
    SEQUENCE_HEAD_NAMES,
    extend_encoder_mask,
    extend_token_labels,
    input_embeddings,
    input_length,
    is_encoder_decoder,
    keep_real_positions,
    module_name,
    position_limit,
    prepend_soft_prompt,
    sequence_classification_head,
    soft_prompt_targets,
)

__all__ = [
    "AttentionGeometry",
    "AttentionSignature",
    "CACHE_KWARGS",
    "CROSS_KWARGS",
    "CallArgs",
    "MASK_KWARGS",
    "PrefixedCache",
    "SEQUENCE_HEAD_NAMES",
    "attention_geometry",
    "cache_length",
    "cache_parameter",
    "check_position_bias_groups",
    "extend_attention_mask",
    "extend_encoder_mask",
    "extend_token_labels",
    "find_attention_modules",
    "find_config",
    "forward_parameters",
    "inject_prefix",
    "input_embeddings",
    "input_length",
    "is_encoder_decoder",
    "is_kv_attention",
    "keep_real_positions",
    "module_name",
    "position_limit",
    "prefix_causal_mask",
    "prepend_soft_prompt",
    "self_attention_part",
    "sequence_classification_head",
    "soft_prompt_targets",
    "transformers_version",
    "unsupported",
    "uses_shared_position_bias",
]
