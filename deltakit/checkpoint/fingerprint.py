"""A cheap structural fingerprint of a backbone, recorded at save and compared at load."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from torch import nn

from ..structures import find_config

_ESSENTIALS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
    "is_encoder_decoder",
)


def _host_shapes(backbone: nn.Module, names: list[str]) -> dict[str, dict[str, list[int]]]:
    modules = dict(backbone.named_modules())
    return {
        n: {p: list(t.shape) for p, t in modules[n].named_parameters(recurse=False)}
        for n in names
    }


def backbone_fingerprint(backbone: nn.Module, site_names: list[str]) -> dict[str, Any]:
    """A cheap structural fingerprint: class, config essentials and a hash of the hosts' own parameter shapes.

    Host names are not part of the hash, so a backbone wrapped in another module still matches.
    """
    config = find_config(backbone)
    essentials = {}
    if config is not None:
        for key in _ESSENTIALS:
            value = getattr(config, key, None)
            if isinstance(value, (bool, int, float, str)):
                essentials[key] = value
    shapes = list(_host_shapes(backbone, site_names).values())
    digest = hashlib.sha256(json.dumps(shapes, sort_keys=True).encode()).hexdigest()[:16]
    return {"class": type(backbone).__name__, "config": essentials, "host_shapes_sha256": digest}
