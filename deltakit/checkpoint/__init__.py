"""Delta-only checkpoints: ``delta_config.json`` + ``delta_model.safetensors`` in a directory.

**Layout** (format 4). The weights file is a plain safetensors file with one tensor per parameter, named exactly as
in :meth:`DeltaBase.delta_state_dict` (``<host module>.<delta_type>.<param>`` relative to the backbone, shared
tensors as ``<delta_type>_shared.<param>``), plus the backbone tensors the user explicitly kept trainable through
``freeze_module`` (e.g. a classifier head) under their own names: ``safetensors.load_file``, PEFT-style converters,
mergekit and the hub viewer see the delta's tensors as they are. Never pickle. ``delta_config.json`` is indented
JSON: format and version, deltakit version, delta type and hyper-parameters, the sites (in a lossless range form,
``model.layers.{0-79}.self_attn.q_proj``, see :func:`compress_sites`), the declared backbone tensors, a cheap
backbone fingerprint and the SHA-256 of the weights file (safetensors has no checksum of its own). Saving the same
delta twice gives the same bytes. Versions 1 and 2 (no stacked tensors) still load; files of the development
format 3 that stack tensors (``lora_A#0``) are refused with a request to save them again.

**Saving** changes the directory in one atomic, durable step (see :mod:`deltakit.io.transaction`): after a crash
at any moment (``kill -9``, power loss, full disk) the directory loads as the old or the new checkpoint, whole;
leftovers of a crashed save are removed by the next save and ignored by loaders. Concurrent savers are serialized
by a lock on the directory (the last one wins) and a loader never sees a mix.

**Loading** trusts nothing in the files and changes nothing before everything is validated: the config (regular
file, size-bounded, strict JSON, every field's type), the delta type, the site list (expanded only up to the
number of modules the backbone has), that every saved site resolves to exactly one module of the new backbone,
then the weights file's header (bounded, every dtype, shape and byte range) against exactly the tensors this delta
and the declared backbone tensors need, before any tensor byte is read. The SHA-256 is computed over the very bytes
that are parsed. Then dtypes (floating data only for floating parameters), finiteness (NaN/Inf refused unless
``allow_nonfinite=True``) and the backbone fingerprint. Only then is the model touched; a checkpoint writes only the
delta's own tensors and the backbone tensors its config declares.

Saved names are resolved with one offset for the whole checkpoint (see :mod:`deltakit.checkpoint.placement`).

**Files of this package**, one concern each: ``layout`` (names, version, bounds), ``sites`` (the range form of
the site list), ``meta`` (parsing and validating the config), ``weights`` (the weights file and its hash),
``fingerprint``, ``save``, ``read`` (a consistent read of both files), ``placement`` and ``load``. The names below
are the public API; import them from ``deltakit.checkpoint``.
"""

from __future__ import annotations

from .fingerprint import backbone_fingerprint
from .layout import (
    CONFIG_NAME,
    FORMAT,
    FORMAT_VERSION,
    MAX_CONFIG_BYTES,
    MAX_SITES,
    WEIGHTS_METADATA,
    WEIGHTS_NAME,
)
from .load import load_delta
from .meta import config_from_meta, parse_meta, read_checkpoint_meta, saved_sites
from .read import Expected, check_finite, read_checkpoint
from .save import make_directory, save_delta, write_checkpoint
from .sites import compress_sites, expand_sites
from .weights import check_weights_hash, read_weights, refuse_stacked, weights_sha256, write_weights

__all__ = [
    "CONFIG_NAME",
    "FORMAT",
    "FORMAT_VERSION",
    "MAX_CONFIG_BYTES",
    "MAX_SITES",
    "WEIGHTS_METADATA",
    "WEIGHTS_NAME",
    "Expected",
    "backbone_fingerprint",
    "check_finite",
    "check_weights_hash",
    "compress_sites",
    "config_from_meta",
    "expand_sites",
    "load_delta",
    "make_directory",
    "parse_meta",
    "read_checkpoint",
    "read_checkpoint_meta",
    "read_weights",
    "refuse_stacked",
    "save_delta",
    "saved_sites",
    "weights_sha256",
    "write_checkpoint",
    "write_weights",
]
