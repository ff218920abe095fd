"""Common structure: architecture-independent *role names* (``attn.q``, ``ff.w2``, ...) for the modules of
transformer backbones, what kind of host a module is, and tiny models of every mapped architecture.

The role table, the per-architecture maps and how fused projections resolve are documented in
:mod:`deltakit.structures.roles`; architectures without a map get their roles inferred
(:func:`infer_structure`, logger ``deltakit.structures``).

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
