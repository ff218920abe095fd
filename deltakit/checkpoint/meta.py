"""The config file, ``delta_config.json``: parsing and validating every field, and what the fields describe."""

from __future__ import annotations

import os
import re
from typing import Any

from .._version import __version__
from ..config import CONFIG_REGISTRY, config_from_dict
from ..errors import CheckpointError, DeltaConfigError
from ..io import safe_json
from ..io.files import read_regular_file
from ..io.transaction import locked_view
from .base_model import check_base_model
from .layout import CONFIG_NAME, FORMAT, FORMAT_VERSION, MAX_CONFIG_BYTES, MAX_SITES
from .meta_fields import check_string_list, field_error, short
from .sites import expand_sites


def parse_meta(data: bytes, where: str) -> dict[str, Any]:
    """Parse and validate the bytes of a ``delta_config.json`` read from ``where``.

    Raises:
        CheckpointError: Malformed JSON (see :func:`deltakit.io.safe_json.loads`) or a field of the wrong type or
            value, each named with the file and the field.
    """
    meta = safe_json.loads(data, where)
    if not isinstance(meta, dict):
        raise CheckpointError(f"{where!r} must hold a JSON object, got {type(meta).__name__}; the file is corrupt.")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{where!r} is not a deltakit delta config (format {short(meta.get('format'))}).")
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= FORMAT_VERSION:
        raise CheckpointError(
            f"{where!r} has format_version {short(version, 40)}; this deltakit ({__version__}) reads versions 1 to "
            f"{FORMAT_VERSION}. Upgrade deltakit (or the file is corrupt)."
        )
    delta_type = meta.get("delta_type")
    if not isinstance(delta_type, str):
        raise field_error(where, "delta_type", f"must be a string, got {type(delta_type).__name__}")
    if delta_type not in CONFIG_REGISTRY:
        raise CheckpointError(
            f"{where!r} holds delta_type {short(delta_type)}, unknown to this deltakit (known: "
            f"{sorted(CONFIG_REGISTRY)})."
        )
    if not isinstance(meta.get("config"), dict):
        raise field_error(where, "config", f"must be an object, got {type(meta.get('config')).__name__}")
    if meta["config"].get("delta_type", delta_type) != delta_type:
        saved = short(meta["config"].get("delta_type"), 40)
        raise field_error(where, "config", f"holds delta_type {saved}, not {delta_type!r}")
    check_string_list(meta, "sites", where, unique=True)
    if not meta["sites"]:
        raise field_error(where, "sites", "is empty")
    check_string_list(meta, "backbone_tensors", where, unique=True)
    if meta.get("heads") is not None:  # modules the delta carries a copy of (deltakit.heads); absent before
        check_string_list(meta, "heads", where, unique=True)
    shapes = meta.get("head_shapes")
    if shapes is not None and not (isinstance(shapes, dict) and all(
        isinstance(k, str) and isinstance(v, list) and len(v) <= 8
        and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31 for d in v)
        for k, v in shapes.items()
    )):
        raise field_error(where, "head_shapes", "must map tensor names to shapes (lists of sizes)")
    check_base_model(meta, where)
    for key in ("fingerprint",):
        if meta.get(key) is not None and not isinstance(meta[key], dict):
            raise field_error(where, key, f"must be an object, got {type(meta[key]).__name__}")
    if not isinstance(meta.get("deltakit_version", ""), str):
        raise field_error(where, "deltakit_version", "must be a string")
    sha = meta.get("weights_sha256")
    if sha is not None and (not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha)):
        raise field_error(where, "weights_sha256", f"must be 64 lowercase hex digits, got {short(sha)}")
    return meta


def read_checkpoint_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate ``delta_config.json`` of the checkpoint directory ``path`` (see :func:`parse_meta`)."""
    path = os.fspath(path)
    with locked_view(path) as find:
        file = find(CONFIG_NAME)
        return parse_meta(read_regular_file(file, "the delta config", MAX_CONFIG_BYTES), file)


def config_from_meta(meta: dict[str, Any], where: str) -> Any:
    """The :class:`DeltaConfig` a validated meta describes; an invalid one is a :class:`CheckpointError`."""
    try:
        return config_from_dict({**meta["config"], "delta_type": meta["delta_type"]})
    except (DeltaConfigError, TypeError, ValueError) as exc:
        raise field_error(where, "config", f"is not a valid {meta['delta_type']} config ({exc})") from None


def saved_sites(meta: dict[str, Any], where: str, limit: int = MAX_SITES) -> list[str]:
    """The full site names a validated meta lists (range form from version 2), at most ``limit`` of them."""
    if meta["format_version"] >= 2:
        return expand_sites(meta["sites"], where, limit)
    if len(meta["sites"]) > limit:
        raise field_error(where, "sites", f"lists {len(meta['sites']):,} sites, more than the {limit:,} possible here")
    return list(meta["sites"])
