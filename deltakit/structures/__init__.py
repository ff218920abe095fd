"""Common structure: architecture-independent *role names* for the modules of transformer backbones.

A role name such as ``attn.q`` (the query projection of every attention block) or ``ff.w2`` (the second, output
projection of every feed-forward block) lets one ``modified_modules`` list work across architectures, and is how
each delta method states its default positions. This file is the only place that knows the module names of
concrete transformers architectures.

Roles:

============  ===============================================================================
``attn.q``    query projection (self- and, in encoder-decoders, cross-attention)
``attn.k``    key projection
``attn.v``    value projection
``attn.o``    attention output projection
``ff.w1``     first (up) projection of the feed-forward block
``ff.gate``   gate projection of a gated feed-forward block (Llama's ``gate_proj``)
``ff.w2``     second (down / output) projection of the feed-forward block
``attn.norm`` the layer norm that belongs to the attention sub-block
``ff.norm``   the layer norm that belongs to the feed-forward sub-block
``embed``     the token embedding
============  ===============================================================================

A role maps to one or more patterns in the addressing syntax of :mod:`deltakit.addressing` (a dotted suffix, or a
``[r]`` regex matched against whole dotted suffixes). A pattern of a role may match nothing in a given model (for
example cross-attention in an encoder-only T5), but the role as a whole must match something.

Fused projections. On architectures with a fused query/key/value projection (GPT-2's ``c_attn``, GPT-NeoX's
``query_key_value``, Phi-3's ``qkv_proj``), ``attn.q``, ``attn.k`` and ``attn.v`` all resolve to the fused module,
which is then modified once, as a whole (a LoRA on it adapts q, k and v together; it is not restricted to the
query slice). Likewise Phi-3's fused ``gate_up_proj`` is both ``ff.w1`` and ``ff.gate``.

Architectures whose ``model_type`` is not in :data:`STRUCTURES` (and plain ``nn.Module`` transformers) get their
roles *inferred* from the module structure by :func:`infer_structure`: the repeated layer blocks, the attention
blocks inside them and their projections (by name), the feed-forward projections (by shape), the norms (by place).
What was inferred is logged (logger ``deltakit.structures``, level WARNING) so the user can check it; a role that
cannot be told apart raises a :class:`~deltakit.errors.ModuleMatchError` listing the candidate module names.

Files: ``roles`` (the role names and the per-architecture maps), ``model_config`` (finding the transformers
config), ``hosts`` (what kind of host a module is), ``inference`` (roles of unmapped architectures) and ``tiny``
(tiny random models of every mapped architecture). Import the names from ``deltakit.structures``.
"""

from __future__ import annotations

from .hosts import (
    ConvGeometry,
    channels_first_width,
    conv_geometry,
    is_conv1d,
    is_convolution,
    linear_dims,
    norm_shape,
)
from .inference import InferredStructure, RoleAbsentError, infer_structure, log_inferred
from .model_config import detect_model_type, find_config
from .roles import ROLE_NAMES, STRUCTURES, is_role_name, role_patterns
from .tiny import MAX_TINY_LAYERS, TINY_ARCHITECTURES, tiny_config, tiny_model

__all__ = [
    "MAX_TINY_LAYERS",
    "ROLE_NAMES",
    "STRUCTURES",
    "TINY_ARCHITECTURES",
    "ConvGeometry",
    "InferredStructure",
    "RoleAbsentError",
    "channels_first_width",
    "conv_geometry",
    "detect_model_type",
    "find_config",
    "infer_structure",
    "is_conv1d",
    "is_convolution",
    "is_role_name",
    "linear_dims",
    "log_inferred",
    "norm_shape",
    "role_patterns",
    "tiny_config",
    "tiny_model",
]
