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

Saved names are resolved with one offset for the whole checkpoint: as they are, with a prefix added (the new model
wraps the saved backbone: saved from ``BertModel``, loaded into ``BertForSequenceClassification``), or with a
leading prefix removed (the other way round). Parts are never dropped from inside a name, so a delta saved on
``blocks.1.proj`` never lands on ``blocks.0.proj`` (see :func:`_resolve_placement`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, BinaryIO

import torch
from torch import nn

from ._version import __version__
from .config import CONFIG_NAME, CONFIG_REGISTRY, config_from_dict
from .errors import CheckpointError, DeltaConfigError, DeltaError, DeltaStateError
from .site import DeltaSite
from .io import safe_json
from .io.files import atomic_write as _atomic_write  # noqa: F401 - used by integrations.peft
from .io.files import fsync_directory, open_regular, read_regular_file
from .io.tensor_file import (
    DTYPE_NAMES,
    Header,
    check_entries,
    decode,
    read_data,
    read_header,
    write_tensor_file,
)
from .io.transaction import commit, locked_view
from .structures import find_config

if TYPE_CHECKING:
    from .base import DeltaBase

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
#: Bound on a site's layer index in the range form (nine digits).
_MAX_INDEX = 10**9

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


_RANGE_GROUP = re.compile(r"\{([0-9,-]*)\}")


def _format_indices(indices: list[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0-2,5,7-8"`` (indices sorted, without duplicates)."""
    runs: list[str] = []
    start = prev = indices[0]
    for index in indices[1:] + [None]:  # type: ignore[list-item]
        if index is not None and index == prev + 1:
            prev = index
            continue
        runs.append(str(start) if start == prev else f"{start}-{prev}")
        if index is not None:
            start = prev = index
    return ",".join(runs)


def compress_sites(names: list[str]) -> list[str] | None:
    """Write site names compactly: names that differ only in their first numeric component share one entry.

    ``bert.encoder.layer.{0-5}.attention.self.query`` stands for the six query projections; a name without a
    numeric component, or alone in its group, stays as it is. The form is lossless for the *set* of names (the
    loader orders sites by the backbone's module order, which is the order a delta is built in), and keeps the
    config of a 80-layer model as short as that of a 2-layer one.

    Args:
        names: Full site names, in model order.

    Returns:
        The entries, or ``None`` when a name contains a brace (the compact form would be ambiguous).
    """
    if any("{" in n or "}" in n for n in names) or len(set(names)) != len(names):
        return None
    groups: dict[tuple[str, ...], list[int]] = {}
    literal: dict[tuple[str, ...], str] = {}
    for name in names:
        parts = name.split(".")
        slot = next((i for i, part in enumerate(parts) if part.isdigit() and str(int(part)) == part), None)
        if slot is None:
            literal[(name,)] = name
            groups.setdefault((name,), [])
            continue
        key = tuple(parts[:slot]) + ("{}",) + tuple(parts[slot + 1 :])
        groups.setdefault(key, []).append(int(parts[slot]))
        literal[key] = name
    entries = []
    for key, indices in groups.items():
        if len(indices) <= 1:
            entries.append(literal[key])
        else:
            entries.append(".".join(key).replace("{}", "{" + _format_indices(sorted(indices)) + "}", 1))
    return entries


def _ranges(entry: str, where: str) -> tuple[str, str, list[tuple[int, int]]]:
    """Split a range-form entry into ``(head, tail, [(low, high), ...])``; a plain name has no runs."""
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{where!r} lists a malformed site range {entry[:120]!r} ({why}); the file is corrupt.")

    match = _RANGE_GROUP.search(entry)
    if match is None:
        if "{" in entry or "}" in entry:
            raise bad("unbalanced braces")
        return entry, "", []
    head, tail = entry[: match.start()], entry[match.end() :]
    if "{" in head + tail or "}" in head + tail:
        raise bad("more than one range")
    runs = []
    for run in match.group(1).split(","):
        low, dash, high = run.partition("-")
        high = high if dash else low
        if not (low.isdigit() and high.isdigit()) or len(low) > 9 or len(high) > 9:
            raise bad(f"{run!r} is not an index or a range of indices below {_MAX_INDEX:,}")
        if int(high) < int(low):
            raise bad(f"{run!r} runs backwards")
        runs.append((int(low), int(high)))
    return head, tail, runs


def expand_sites(entries: list[Any], where: str = "the checkpoint", limit: int = MAX_SITES) -> list[str]:
    """Inverse of :func:`compress_sites`: the full site names (each entry's names in increasing index order).

    The number of names is computed from the ranges first and must not exceed ``limit`` (a 300-byte entry such
    as ``x.{0-100000000000}.y`` would otherwise be expanded in full).

    Raises:
        CheckpointError: An entry is not a string, holds a malformed range, the names exceed ``limit``, or a name
            is listed twice.
    """
    if not isinstance(entries, list):
        raise CheckpointError(f"{where!r}: field 'sites' must be a list of strings; the file is corrupt.")
    parsed = []
    total = 0
    for entry in entries:
        if not isinstance(entry, str) or not entry:
            raise CheckpointError(
                f"{where!r} lists a site {_short(entry)} that is not a non-empty string; the file is corrupt."
            )
        head, tail, runs = _ranges(entry, where)
        total += sum(high - low + 1 for low, high in runs) if runs else 1
        if total > limit:
            raise CheckpointError(
                f"{where!r} lists more sites than the {limit:,} possible here (entry {entry[:120]!r}); the file is "
                f"corrupt or was made for another model."
            )
        parsed.append((head, tail, runs))
    names: list[str] = []
    for head, tail, runs in parsed:
        if not runs:
            names.append(head)
        for low, high in runs:
            names.extend(f"{head}{i}{tail}" for i in range(low, high + 1))
    if len(set(names)) != len(names):
        twice = next(n for i, n in enumerate(names) if n in names[:i])
        raise CheckpointError(f"{where!r} lists the site {twice!r} twice; the file is corrupt.")
    return names


# ------------------------------------------------------------------------------------------------ weights file
def write_weights(file: str | os.PathLike[str], tensors: dict[str, torch.Tensor]) -> str:
    """Write named contiguous CPU tensors to the safetensors ``file`` (one tensor per name, deterministic bytes).

    Returns:
        The SHA-256 (hex) of the bytes written.
    """
    with open(file, "wb") as handle:
        return write_tensor_file(handle, tensors, WEIGHTS_METADATA)


def _refuse_stacked(header: Header, where: str) -> None:
    if "stacks" in header.metadata or any("#" in name for name in header.entries):
        raise CheckpointError(
            f"{where!r} stacks tensors (keys like 'lora_A#0'), the layout of a development version of deltakit that "
            f"this version no longer reads. Load it with the deltakit that wrote it and save it again."
        )


def read_weights(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The named tensors of a safetensors weights file, or of a checkpoint directory's ``delta_model.safetensors``.

    The result is keyed exactly like :meth:`DeltaBase.delta_state_dict` (plus any saved backbone tensors), each
    tensor with its own storage. The file's structure is validated before anything is allocated; the SHA-256
    recorded in the config is checked by the loaders, not here (this reads the weights file alone).

    Raises:
        CheckpointError: The file is missing, not a regular file, truncated or corrupt.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        with locked_view(path) as find:
            return _read_weights_file(find(WEIGHTS_NAME))
    return _read_weights_file(path)


def _read_weights_file(file: str) -> dict[str, torch.Tensor]:
    with open_regular(file, "the weights file") as (fd, size):
        header, _ = read_header(fd, size, file)
        _refuse_stacked(header, file)
        return decode(header, read_data(fd, header, file))


def weights_sha256(file: str | os.PathLike[str]) -> str:
    """The SHA-256 (hex) of a regular file's bytes, read in chunks."""
    digest = hashlib.sha256()
    file = os.fspath(file)
    with open_regular(file, "the weights file") as (fd, _):
        while chunk := os.read(fd, 1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def check_weights_hash(path: str | os.PathLike[str], meta: dict[str, Any]) -> bool | None:
    """Compare the weights file of the checkpoint directory ``path`` with the SHA-256 its config records.

    Returns:
        ``True`` when it matches, ``None`` when the config records none (a checkpoint from before deltakit
        recorded it).

    Raises:
        CheckpointError: The bytes differ (the file is corrupt or was modified after saving).
    """
    path = os.fspath(path)
    if meta.get("weights_sha256") is None:
        return None
    with locked_view(path) as find:
        file = find(WEIGHTS_NAME)
        _check_sha(meta, weights_sha256(file), find(CONFIG_NAME), file)
    return True


def _check_sha(meta: dict[str, Any], actual: str, config_file: str, weights_file: str) -> None:
    expected = meta.get("weights_sha256")
    if expected is not None and actual != expected:
        raise CheckpointError(
            f"{weights_file!r} does not match the SHA-256 recorded in {config_file!r} when it was saved: the weights "
            f"file is corrupt or was modified (or the two files come from different saves). Save the delta again, "
            f"or restore both files from a copy."
        )


# ------------------------------------------------------------------------------------------------ config file
def _short(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters (a hostile value may be megabytes long)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _field_error(where: str, key: str, problem: str) -> CheckpointError:
    return CheckpointError(f"{where!r}: field {key!r} {problem}; the file is corrupt or was edited by hand.")


def _check_string_list(meta: dict[str, Any], key: str, where: str, *, unique: bool) -> None:
    value = meta.get(key)
    if not isinstance(value, list):
        raise _field_error(where, key, f"must be a list of strings, got {type(value).__name__}")
    if not all(isinstance(v, str) and v for v in value):
        bad = next(v for v in value if not (isinstance(v, str) and v))
        raise _field_error(where, key, f"must hold non-empty strings only, got {_short(bad)} ({type(bad).__name__})")
    if unique and len(set(value)) != len(value):
        raise _field_error(where, key, "lists a name twice")


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
        raise CheckpointError(f"{where!r} is not a deltakit delta config (format {_short(meta.get('format'))}).")
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= FORMAT_VERSION:
        raise CheckpointError(
            f"{where!r} has format_version {_short(version, 40)}; this deltakit ({__version__}) reads versions 1 to "
            f"{FORMAT_VERSION}. Upgrade deltakit (or the file is corrupt)."
        )
    delta_type = meta.get("delta_type")
    if not isinstance(delta_type, str):
        raise _field_error(where, "delta_type", f"must be a string, got {type(delta_type).__name__}")
    if delta_type not in CONFIG_REGISTRY:
        raise CheckpointError(
            f"{where!r} holds delta_type {_short(delta_type)}, unknown to this deltakit (known: "
            f"{sorted(CONFIG_REGISTRY)})."
        )
    if not isinstance(meta.get("config"), dict):
        raise _field_error(where, "config", f"must be an object, got {type(meta.get('config')).__name__}")
    if meta["config"].get("delta_type", delta_type) != delta_type:
        saved = _short(meta["config"].get("delta_type"), 40)
        raise _field_error(where, "config", f"holds delta_type {saved}, not {delta_type!r}")
    _check_string_list(meta, "sites", where, unique=True)
    if not meta["sites"]:
        raise _field_error(where, "sites", "is empty")
    _check_string_list(meta, "backbone_tensors", where, unique=True)
    for key in ("fingerprint",):
        if meta.get(key) is not None and not isinstance(meta[key], dict):
            raise _field_error(where, key, f"must be an object, got {type(meta[key]).__name__}")
    if not isinstance(meta.get("deltakit_version", ""), str):
        raise _field_error(where, "deltakit_version", "must be a string")
    sha = meta.get("weights_sha256")
    if sha is not None and (not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha)):
        raise _field_error(where, "weights_sha256", f"must be 64 lowercase hex digits, got {_short(sha)}")
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
        raise _field_error(where, "config", f"is not a valid {meta['delta_type']} config ({exc})") from None


def saved_sites(meta: dict[str, Any], where: str, limit: int = MAX_SITES) -> list[str]:
    """The full site names a validated meta lists (range form from version 2), at most ``limit`` of them."""
    if meta["format_version"] >= 2:
        return expand_sites(meta["sites"], where, limit)
    if len(meta["sites"]) > limit:
        raise _field_error(where, "sites", f"lists {len(meta['sites']):,} sites, more than the {limit:,} possible here")
    return list(meta["sites"])


# ------------------------------------------------------------------------------------------------ saving
def save_delta(delta: DeltaBase, path: str | os.PathLike[str], *, overwrite: bool = True) -> str:
    """Write ``delta``'s checkpoint to the directory ``path`` (created if needed); see the module docstring."""
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise CheckpointError(f"Cannot save the delta to {path!r}: it exists and is not a directory.")

    tensors: dict[str, torch.Tensor] = dict(delta.delta_state_dict())
    backbone_params = dict(delta.backbone_model.named_parameters())
    for name in delta.unfrozen_parameter_names:
        if name in tensors:
            raise CheckpointError(f"Backbone tensor name {name!r} collides with a delta tensor name; rename the delta.")
        if name not in backbone_params:
            raise CheckpointError(
                f"Parameter {name!r} kept trainable by freeze_module() no longer exists in the backbone; call "
                f"freeze_module() again."
            )
        tensors[name] = backbone_params[name]
    tensors.update(_without_own_merge(delta))
    for name, tensor in tensors.items():
        if tensor.is_meta:
            raise CheckpointError(
                f"Cannot save {name!r}: it is on the meta device (no data). Materialise the model (e.g. "
                f"model.to_empty(device='cpu') and load weights) before saving."
            )
    make_directory(path)
    write_checkpoint(delta, tensors, path, overwrite=overwrite)
    return path


def make_directory(path: str) -> None:
    """Create the checkpoint directory (and parents) durably if it does not exist."""
    if os.path.isdir(path):
        return
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(f"Cannot create the checkpoint directory {path!r}: {exc.strerror or exc}.") from None
    fsync_directory(os.path.dirname(os.path.abspath(path)))


def _without_own_merge(delta: DeltaBase) -> dict[str, torch.Tensor]:
    """The pre-merge values of the saved backbone tensors that ``delta`` is merged into.

    A host tensor kept trainable by ``freeze_module`` (``exclude=["deltas", "query"]``) is saved, and loading
    re-attaches the delta on top of it: saving the merged value would apply the delta twice. The copy that
    ``merge()`` keeps for an exact unmerge is that value, as long as the tensor was not written since.

    Raises:
        DeltaStateError: No such copy exists (``merge(exact_unmerge=False)``) or the tensor was modified after the
            merge; nothing has been written yet.
    """
    if delta.state != "merged":
        return {}
    merged: dict[int, tuple[Any, str]] = {}
    for site in delta.sites:
        for pname in site.module.merge_versions:
            merged[id(getattr(site.host, pname))] = (site, pname)
    backbone_params = dict(delta.backbone_model.named_parameters())
    out: dict[str, torch.Tensor] = {}
    for name in delta.unfrozen_parameter_names:
        param = backbone_params[name]
        if id(param) not in merged:
            continue
        site, pname = merged[id(param)]
        backup = delta._merge_backup.get(id(site.module), {}).get(pname) if delta._merge_exact else None
        if backup is None:
            why = "it was merged with exact_unmerge=False, so its value without the delta is not kept"
        elif param._version != site.module.merge_versions[pname][1]:
            why = "it was modified after the merge (e.g. an optimizer step), so its value without the delta is unknown"
        else:
            out[name] = backup
            continue
        raise DeltaStateError(
            f"Cannot save {delta._describe()} while merged: the backbone tensor {name!r} is kept trainable by "
            f"freeze_module() and saved with the delta, but it holds the merged delta and {why}. Loading would apply "
            f"the delta twice. Call unmerge() first, then save_finetuned()."
        )
    return out


def write_checkpoint(
    delta: DeltaBase,
    tensors: dict[str, torch.Tensor],
    path: str,
    *,
    fingerprint: dict[str, Any] | None = None,
    overwrite: bool = True,
) -> None:
    """Write ``delta_config.json`` and ``delta_model.safetensors`` for ``delta`` with the given tensors, as one
    atomic step (see :mod:`deltakit.io.transaction`).

    The single writer of the format: :func:`save_delta` passes the delta's own tensors; the distributed helpers
    pass tensors gathered from a sharded model (and the fingerprint computed from the full shapes).

    Args:
        delta: The delta the tensors belong to (type, config, sites).
        tensors: ``{name: tensor}`` keyed like :meth:`DeltaBase.delta_state_dict` plus saved backbone tensors.
        path: An existing directory.
        fingerprint: The backbone fingerprint; computed from ``delta.backbone_model`` when ``None``.
        overwrite: When ``False``, refuse if the directory already holds a checkpoint.

    Raises:
        CheckpointError: Writing failed (the previous checkpoint is unchanged), or ``overwrite=False`` and one exists.
    """
    # Own, contiguous CPU copies: the bytes written are a snapshot, whatever the caller does meanwhile.
    payload = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
    sites = compress_sites(delta.modified_modules)
    meta: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION if sites is not None else 1,
        "deltakit_version": __version__,
        "delta_type": delta.delta_type,
        "config": delta.config.to_dict(),
        "sites": sites if sites is not None else delta.modified_modules,
        "backbone_tensors": list(delta.unfrozen_parameter_names),
        "fingerprint": fingerprint if fingerprint is not None else backbone_fingerprint(
            delta.backbone_model, delta.modified_modules
        ),
    }

    def write_weights_file(handle: BinaryIO) -> None:
        meta["weights_sha256"] = write_tensor_file(handle, payload, WEIGHTS_METADATA)

    def write_config(handle: BinaryIO) -> None:
        try:
            text = json.dumps(meta, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
        except ValueError as exc:
            raise CheckpointError(
                f"Cannot save the config of {delta!r}: {exc} (a non-finite hyper-parameter?)."
            ) from None
        handle.write(text.encode("utf-8"))

    # Applied in this order: the config, which records the weights' hash, is written last.
    commit(path, {WEIGHTS_NAME: write_weights_file, CONFIG_NAME: write_config}, may_replace=overwrite)


# ------------------------------------------------------------------------------------------------ loading
#: ``{saved tensor name: (shape, kind)}``: what a checkpoint must hold (kind: "float" or a safetensors dtype name).
Expected = dict[str, tuple[tuple[int, ...], str]]


def _kind(tensor: torch.Tensor) -> str:
    return "float" if tensor.is_floating_point() else DTYPE_NAMES[tensor.dtype]


def _max_header(expected: Expected) -> int:
    """Header bytes these tensors can need: ~100 per entry plus the name, generously, and room for metadata."""
    return 65536 + sum(len(name) + 512 for name in expected)


def read_checkpoint(
    path: str | os.PathLike[str],
    plan: Callable[[dict[str, Any], str], Expected] | None = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read a checkpoint directory consistently: its config, and its tensors checked against what ``plan`` expects.

    Under a shared lock on the directory (no save can run meanwhile): the config is read and validated, ``plan(meta,
    config_file)`` says which tensors must be there (or raises), the weights header is validated against it before
    any data is read, then the data is read once, hashed and decoded from the same bytes.

    Returns:
        ``(meta, {saved name: tensor})``.

    Raises:
        CheckpointError: Anything invalid, missing, or not matching the SHA-256 the config records.
    """
    path = os.fspath(path)
    with locked_view(path) as find:
        config_file = find(CONFIG_NAME)
        meta = parse_meta(read_regular_file(config_file, "the delta config", MAX_CONFIG_BYTES), config_file)
        expected = plan(meta, config_file) if plan is not None else None
        weights_file = find(WEIGHTS_NAME)
        with open_regular(weights_file, "the weights file") as (fd, size):
            header, head = read_header(
                fd, size, weights_file, **({"max_header": _max_header(expected)} if expected is not None else {})
            )
            _refuse_stacked(header, weights_file)
            if expected is not None:
                check_entries(header, expected, weights_file)
            data = read_data(fd, header, weights_file)
    digest = hashlib.sha256(head)
    digest.update(data)
    _check_sha(meta, digest.hexdigest(), config_file, weights_file)
    return meta, decode(header, data)


def check_finite(name: str, tensor: torch.Tensor, where: str) -> None:
    """Refuse NaN or infinite values in a floating tensor about to be loaded."""
    if tensor.is_floating_point():
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            bad = int(finite.numel() - finite.sum())
            raise CheckpointError(
                f"{where!r}: tensor {name!r} holds {bad:,} NaN or infinite value(s) (after conversion to "
                f"{tensor.dtype}); loading it would make every output NaN. The training diverged or the file is "
                f"corrupt; pass allow_nonfinite=True to load it anyway."
            )


#: How the saved backbone sits in the one loaded into: ``(strip, add)``, dotted prefixes ending with ``"."`` (or
#: empty), at most one of them non-empty. A saved name ``strip + rest`` becomes ``add + rest``.
_Placement = tuple[str, str]


def _place(saved: str, placement: _Placement) -> str | None:
    """The name ``saved`` gets under ``placement``, or ``None`` when it lies outside the part that was moved."""
    strip, add = placement
    if not saved.startswith(strip) or len(saved) == len(strip):
        return None
    return add + saved[len(strip) :]


def _placements_of(saved: str, names: set[str]) -> list[_Placement]:
    """Every placement under which ``saved`` names an existing module: as it is, inside a wrapper that this model
    adds (a model name ends with ``"." + saved``), or without the wrapper it was saved with (a model name equals
    ``saved`` without some leading parts). Parts are only ever added or removed in front, never from inside."""
    found: list[_Placement] = [("", "")] if saved in names else []
    found += [("", n[: -len(saved)]) for n in sorted(names) if n.endswith("." + saved)]
    parts = saved.split(".")
    found += [(".".join(parts[:i]) + ".", "") for i in range(1, len(parts)) if ".".join(parts[i:]) in names]
    return found


def _describe_placement(placement: _Placement) -> str:
    strip, add = placement
    if add:
        return f"inside {add[:-1]!r} (this model wraps the saved backbone)"
    if strip:
        return f"without the saved wrapper {strip[:-1]!r} (the saved backbone wrapped this model)"
    return "under its saved name"


def _like(saved: str, names: list[str], least: int = 1) -> str:
    """A few names of this backbone ending the same way as ``saved`` (in at least ``least`` dotted parts): a hint
    for the error messages."""
    parts = saved.split(".")
    for keep in range(min(len(parts), 3), least - 1, -1):
        tail = "." + ".".join(parts[-keep:])
        similar = [n for n in names if ("." + n).endswith(tail)]
        if similar and len(similar) <= 50:
            more = f" and {len(similar) - 3} more" if len(similar) > 3 else ""
            return f" Names ending like it here: {similar[:3]}{more}."
    return ""


def _resolve_placement(
    sites: list[str], tensors: list[str], modules: list[str], params: list[str], source: str, backbone: nn.Module
) -> _Placement:
    """The one placement under which every saved site is a module of this backbone.

    A backbone wrapped in another module is fine in both directions (saved from ``BertModel`` and loaded into
    ``BertForSequenceClassification``, or the other way round), with one offset for the whole checkpoint. A saved
    site never moves elsewhere inside the model (``blocks.1.proj`` is never taken for ``blocks.0.proj``).

    Raises:
        CheckpointError: A site exists under no placement, the sites need different placements, or several
            placements fit (this backbone holds the saved one more than once).
    """
    where = f"this backbone ({type(backbone).__name__})"
    keys, names = (sites, set(modules)) if sites else (tensors, set(params))
    what = "Delta site" if sites else "Backbone tensor"
    if not keys:
        return ("", "")

    def missing(key: str) -> CheckpointError:
        return CheckpointError(
            f"{what} {key!r} saved in {source!r} does not exist in {where}: no "
            f"{'module' if sites else 'parameter'} there has this name, ends with it (a wrapper around the "
            f"saved backbone) or equals it without leading parts (the saved backbone wrapped around this one)."
            f"{_like(key, sorted(names))} The checkpoint was made for another architecture or another size."
        )

    common = _placements_of(keys[0], names)
    if not common:
        raise missing(keys[0])
    for key in keys[1:]:
        fits = [p for p in common if _place(key, p) in names]
        if not fits:
            own = _placements_of(key, names)
            if not own:
                raise missing(key)
            raise CheckpointError(
                f"The saved sites of {source!r} do not sit together in {where}: {keys[0]!r} is found "
                f"{_describe_placement(common[0])} but {key!r} only {_describe_placement(own[0])}. Load into the "
                f"model the delta was trained on (or one of the same class)."
            )
        common = fits
    if len(common) > 1:
        at = [_place(keys[0], p) for p in common]
        raise CheckpointError(
            f"{source!r} fits {where} in {len(common)} places: its {what.lower()} {keys[0]!r} could be {at[:4]}. "
            f"This model holds the saved backbone more than once; load into the submodule you mean "
            f"(backbone_model=<that submodule>)."
        )
    return common[0]


def load_delta(
    path: str | os.PathLike[str],
    backbone_model: nn.Module,
    *,
    expected_type: type[DeltaBase] | None = None,
    check_backbone: bool = True,
    name: str | None = None,
    allow_nonfinite: bool = False,
    check_meta: Callable[[dict[str, Any]], None] | None = None,
) -> DeltaBase:
    """Load a checkpoint onto ``backbone_model`` after validating it; see :meth:`DeltaBase.from_finetuned`.

    Args:
        allow_nonfinite: Load tensors holding NaN or infinite values (refused by default).
        check_meta: Called with the validated config before anything else is done (e.g. a serving group refusing
            backbone tensors); may raise.
    """
    from .registry import DELTA_REGISTRY

    if not isinstance(path, (str, os.PathLike)):
        raise DeltaError(f"from_finetuned(path=...) must be a directory path (str or os.PathLike), got {path!r:.80}.")
    path = os.fspath(path)
    if not isinstance(backbone_model, nn.Module):
        raise DeltaError(f"backbone_model must be an nn.Module, got {type(backbone_model).__name__}.")
    for flag, value in (("check_backbone", check_backbone), ("allow_nonfinite", allow_nonfinite)):
        if not isinstance(value, bool):
            raise DeltaError(f"from_finetuned({flag}=...) must be True or False, got {value!r}.")
    modules = dict(backbone_model.named_modules())
    backbone_params = dict(backbone_model.named_parameters())
    built: dict[str, Any] = {}

    def plan(meta: dict[str, Any], where: str) -> Expected:
        if check_meta is not None:
            check_meta(meta)
        cls = DELTA_REGISTRY[meta["delta_type"]]
        if expected_type is not None and expected_type.delta_type and not issubclass(cls, expected_type):
            raise CheckpointError(
                f"{path!r} holds a {cls.__name__} ({meta['delta_type']!r}) delta, not a {expected_type.__name__}; "
                f"load it with {cls.__name__}.from_finetuned or AutoDeltaModel.from_finetuned."
            )
        config = config_from_meta(meta, where)
        site_prefixes = [n for n, m in modules.items() if isinstance(m, DeltaSite)]
        names = [n for n in modules if n and not any(n == s or n.startswith(s + ".") for s in site_prefixes)]
        # Each site is a distinct module: a list longer than the backbone's module count is refused unexpanded.
        sites = saved_sites(meta, where, limit=len(names))
        declared = meta["backbone_tensors"]
        if len(declared) > len(backbone_params):
            raise _field_error(
                where, "backbone_tensors", f"lists more tensors than this backbone has ({len(backbone_params)})"
            )
        placement = _resolve_placement(sites, list(declared), names, list(backbone_params), path, backbone_model)
        resolved = [_place(s, placement) for s in sites]
        if len(set(resolved)) != len(resolved):
            raise CheckpointError(
                f"Several saved sites of {path!r} map to the same module of this backbone: {resolved[:4]}."
            )
        if meta["format_version"] >= 2:
            # The compact form records the set of sites; build them in model order, as a fresh delta would be.
            order = {n: i for i, n in enumerate(modules)}
            pairs = sorted(zip(resolved, sites), key=lambda pair: order[pair[0]])
            resolved, sites = [p[0] for p in pairs], [p[1] for p in pairs]
        delta = cls.build_detached(backbone_model, config, [(n, modules[n]) for n in resolved], name=name)
        saved_of = dict(zip(resolved, sites))
        by_length = sorted(saved_of, key=len, reverse=True)
        shared_prefix = f"{delta.delta_type}_shared."
        expected: Expected = {}
        targets: dict[str, str] = {}  # saved name -> live name
        for key, tensor in delta.delta_state_dict().items():
            if key.startswith(shared_prefix):
                saved = key
            else:
                site = next(s for s in by_length if key.startswith(s + "."))
                saved = saved_of[site] + key[len(site) :]
            if saved in expected:
                raise CheckpointError(f"Two tensors of {path!r} would be saved as {saved!r}; the sites collide.")
            expected[saved], targets[saved] = (tuple(tensor.shape), _kind(tensor)), key
        backbone_targets = _backbone_targets(declared, placement, backbone_params, backbone_model, path)
        for saved, target in backbone_targets.items():
            if saved in expected:
                raise _field_error(where, "backbone_tensors", f"lists {saved!r}, which is a delta tensor")
            expected[saved] = (tuple(backbone_params[target].shape), _kind(backbone_params[target]))
        built.update(delta=delta, targets=targets, backbone=backbone_targets, resolved=resolved)
        return expected

    meta, tensors = read_checkpoint(path, plan)
    delta, targets, backbone_targets = built["delta"], built["targets"], built["backbone"]
    live = delta.delta_state_dict()
    values: dict[str, torch.Tensor] = {}
    for saved, key in targets.items():
        values[key] = tensors[saved].to(live[key].dtype)
    backbone_values = {
        target: tensors[saved].to(backbone_params[target].dtype) for saved, target in backbone_targets.items()
    }
    if not allow_nonfinite:
        for key, value in (*values.items(), *backbone_values.items()):
            check_finite(key, value, os.path.join(path, WEIGHTS_NAME))
    if check_backbone and isinstance(meta.get("fingerprint"), dict):
        saved_fp = meta["fingerprint"]
        fresh_fp = backbone_fingerprint(backbone_model, built["resolved"])
        for key in ("config", "host_shapes_sha256"):
            if saved_fp.get(key) != fresh_fp.get(key):
                raise CheckpointError(
                    f"The backbone does not match the one {path!r} was saved from ({key}: saved "
                    f"{str(saved_fp.get(key))[:300]}, this backbone {fresh_fp.get(key)!r}; saved from a "
                    f"{str(saved_fp.get('class'))[:80]}). Pass check_backbone=False to load anyway."
                )

    # Every check passed: now change things.
    with torch.no_grad():
        shared_prefix = f"{delta.delta_type}_shared."
        for site in delta.sites:
            prefix = f"{site.name}.{delta.delta_type}."
            state = {k[len(prefix) :]: v for k, v in values.items() if k.startswith(prefix)}
            site.module.load_state_dict(state, strict=True)
        if delta.shared is not None:
            state = {k[len(shared_prefix) :]: v for k, v in values.items() if k.startswith(shared_prefix)}
            delta.shared.load_state_dict(state, strict=True)
    delta.attach()
    delta.write_backbone_tensors(backbone_values)  # detach() puts the backbone's own values back
    delta.unfrozen_parameter_names = list(backbone_values)
    return delta


def _backbone_targets(
    declared: list[str], placement: _Placement, backbone_params: dict[str, nn.Parameter], backbone: nn.Module, path: str
) -> dict[str, str]:
    """``{saved name: parameter name here}`` of the backbone tensors a checkpoint declares (all must exist)."""
    out: dict[str, str] = {}
    for saved in declared:
        target = _place(saved, placement)
        if target not in backbone_params:
            at = (
                f"which puts it at {target!r}, and there is no such parameter" if target is not None
                else f"and it lies outside {placement[0][:-1]!r}"
            )
            raise CheckpointError(
                f"Backbone tensor {saved!r} saved in {path!r} (kept trainable by freeze_module, e.g. a head) does not "
                f"exist in this backbone ({type(backbone).__name__}): the delta's sites are found "
                f"{_describe_placement(placement)}, {at}.{_like(saved, list(backbone_params), least=2)} Load into "
                f"the model class the delta was trained on."
            )
        out[saved] = target
    return out
