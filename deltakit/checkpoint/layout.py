"""The checkpoint layout: file names, format identity and version, and the size bounds every reader applies."""

from __future__ import annotations

from ..config import CONFIG_NAME

__all__ = [
    "CONFIG_NAME",
    "FORMAT",
    "FORMAT_VERSION",
    "MAX_CONFIG_BYTES",
    "MAX_SITES",
    "WEIGHTS_METADATA",
    "WEIGHTS_NAME",
]

WEIGHTS_NAME = "delta_model.safetensors"
FORMAT = "deltakit-delta"
#: 4: one tensor per parameter, indented config, deterministic bytes. 3 (development only) stacked same-shaped
#: tensors; its files without stacks still load. 2: the site list in range form. 1: a plain list of sites (still
#: written for the rare backbone whose module names contain braces).
FORMAT_VERSION = 4
#: Largest ``delta_config.json`` read: a plain site list of a huge MoE model is a few MB.
MAX_CONFIG_BYTES = 16 * 2**20
#: Most sites a site list may expand to without a backbone to bound it (``deltakit inspect``): above the number of
#: linear modules of today's largest mixture-of-experts models (~47k), far below what would exhaust memory.
MAX_SITES = 2**18
#: Metadata of the weights file ("pt" is what the ecosystem's tools look for).
WEIGHTS_METADATA = {"format": "pt"}
