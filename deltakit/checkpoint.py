"""Delta-only checkpoints: ``delta_config.json`` + ``delta_model.safetensors``.

The weights file holds this delta's tensors, named ``<host module>.<delta_type>.<param>`` relative to the backbone,
plus the backbone tensors the user explicitly kept trainable through ``freeze_module`` (e.g. a classifier head),
under their own names. Never pickle. Tensors of the same parameter, shape and dtype at many sites (the 48
``lora_A``/``lora_B`` of a 24-site LoRA) are stored stacked as one tensor, with their owners listed once in the
range form in the file's metadata (see :func:`pack_tensors`): safetensors spends ~110 header bytes per tensor,
so this keeps a checkpoint within a few KB of its raw tensor bytes whatever the number of sites, and makes loading
one read per stack. :func:`read_weights` gives back the named tensors. Both files are written to temporary names in the target directory and renamed
into place, so a crash leaves either the old or the new file, never half of one.

The config is kept small (the files add a few KB to the raw tensor bytes): one top-level key per line without
indentation, and the site list in a lossless range form (``model.layers.{0-79}.self_attn.q_proj``, see
:func:`compress_sites`), so its size does not grow with the number of layers. It also records the SHA-256 of the
weights file's bytes (``weights_sha256``): safetensors has no checksum of its own, so a flipped byte in the tensor
data would otherwise load silently.

Loading validates everything first: the config, the delta type, the file's integrity (its structure, then the
recorded SHA-256 when the config has one; checkpoints written before it was recorded still load), that every saved site
resolves to exactly one module of the new backbone, that tensor names and shapes fit, and that the backbone
fingerprint (model type and config essentials, host shapes) agrees. Only then is the model touched.

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
import tempfile
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from . import __version__
from .config import CONFIG_NAME, CONFIG_REGISTRY, AutoDeltaConfig, load_json
from .errors import CheckpointError, DeltaError, DeltaStateError
from .hooks import DeltaSite
from .structures import find_config

if TYPE_CHECKING:
    from .base import DeltaBase

WEIGHTS_NAME = "delta_model.safetensors"
FORMAT = "deltakit-delta"
#: Version 2 writes the site list in the compact range form of :func:`compress_sites`; version 1 (a plain list of
#: names) is still read, and still written for the rare backbone whose module names contain braces. Version 3 stacks
#: same-shaped tensors in the weights file (:func:`pack_tensors`); files of versions 1 and 2 hold none and still load.
FORMAT_VERSION = 3
#: Separator between a parameter name and the stack number in a stacked tensor's key (``lora_A#0``). Module and
#: parameter names never contain it, so a stacked key cannot collide with a real tensor name.
_STACK_MARK = "#"

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


_RANGE_GROUP = re.compile(r"\{([0-9,-]+)\}")


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


def expand_sites(entries: list[Any], where: str = "the checkpoint") -> list[str]:
    """Inverse of :func:`compress_sites`: the full site names (each entry's names in increasing index order).

    Raises:
        CheckpointError: An entry is not a string or holds a malformed range.
    """
    names: list[str] = []
    for entry in entries:
        if not isinstance(entry, str):
            raise CheckpointError(f"{where!r} lists a site {entry!r} that is not a string; the file is corrupt.")
        match = _RANGE_GROUP.search(entry)
        if match is None:
            if "{" in entry or "}" in entry:
                raise CheckpointError(f"{where!r} lists a malformed site range {entry!r}; the file is corrupt.")
            names.append(entry)
            continue
        head, tail = entry[: match.start()], entry[match.end() :]
        indices: list[int] = []
        for run in match.group(1).split(","):
            low, _, high = run.partition("-")
            if not low.isdigit() or (high and not high.isdigit()) or (high and int(high) < int(low)):
                raise CheckpointError(f"{where!r} lists a malformed site range {entry!r}; the file is corrupt.")
            indices.extend(range(int(low), int(high or low) + 1))
        names.extend(f"{head}{i}{tail}" for i in indices)
    return names


def pack_tensors(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """Stack tensors that share a parameter name, shape and dtype across owners into one tensor each.

    ``a.0.q.lora.lora_A`` ... ``a.11.v.lora.lora_A`` (all ``(8, 768)``) become one ``(24, 8, 768)`` tensor keyed
    ``lora_A#0``, whose owners (``a.{0-11}.q.lora``, ``a.{0-11}.v.lora``, in :func:`compress_sites` form) give
    the order along dimension 0. A tensor alone in its group, or whose owner names cannot be written in the range
    form, is kept under its own name.

    Args:
        tensors: Named tensors (dotted names).

    Returns:
        ``(stored, stacks)``: the tensors to write, and ``{stacked key: owner entries}``.
    """
    groups: dict[tuple[str, tuple[int, ...], torch.dtype], list[str]] = {}
    for name, tensor in tensors.items():
        owner, _, leaf = name.rpartition(".")
        groups.setdefault((leaf, tuple(tensor.shape), tensor.dtype), []).append(name)
    stored: dict[str, torch.Tensor] = {}
    stacks: dict[str, list[str]] = {}
    counts: dict[str, int] = {}
    for (leaf, _, _), names in groups.items():
        owners = [name.rpartition(".")[0] for name in names]
        entries = compress_sites(owners) if len(names) > 1 and all(owners) else None
        if entries is None or any(_STACK_MARK in name for name in names):
            stored.update((name, tensors[name]) for name in names)
            continue
        by_owner = dict(zip(owners, names))
        key = f"{leaf}{_STACK_MARK}{counts.get(leaf, 0)}"
        counts[leaf] = counts.get(leaf, 0) + 1
        stored[key] = torch.stack([tensors[by_owner[owner]] for owner in expand_sites(entries)])
        stacks[key] = entries
    return stored, stacks


def unpack_tensors(
    stored: dict[str, torch.Tensor], stacks: dict[str, Any], where: str = "the checkpoint"
) -> dict[str, torch.Tensor]:
    """Inverse of :func:`pack_tensors`: the named tensors (each its own copy).

    Raises:
        CheckpointError: The stack description does not fit the stored tensors (a corrupt file).
    """
    if not isinstance(stacks, dict):
        raise CheckpointError(f"{where!r} has a corrupt stack table in its metadata.")
    tensors = {key: value for key, value in stored.items() if key not in stacks}
    for key, entries in stacks.items():
        if not isinstance(key, str) or _STACK_MARK not in key or key not in stored or not isinstance(entries, list):
            raise CheckpointError(f"{where!r} lists a stacked tensor {key!r} it does not hold; the file is corrupt.")
        owners = expand_sites(entries, where)
        stacked = stored[key]
        if stacked.dim() == 0 or stacked.shape[0] != len(owners):
            raise CheckpointError(
                f"{where!r}: stacked tensor {key!r} has shape {tuple(stacked.shape)} but lists {len(owners)} owners; "
                f"the file is corrupt."
            )
        leaf = key.rpartition(_STACK_MARK)[0]
        for owner, tensor in zip(owners, stacked.unbind(0)):
            name = f"{owner}.{leaf}"
            if name in tensors:
                raise CheckpointError(f"{where!r} holds tensor {name!r} twice; the file is corrupt.")
            tensors[name] = tensor.clone()  # own storage: the caller may keep, change or save it
    return tensors


def write_weights(file: str, tensors: dict[str, torch.Tensor], *, stack: bool = True) -> None:
    """Write named CPU tensors to the safetensors ``file`` in deltakit's layout (stacked, see :func:`pack_tensors`)."""
    stored, stacks = pack_tensors(tensors) if stack else (tensors, {})
    metadata = {"format": FORMAT}
    if stacks:
        metadata["stacks"] = json.dumps(stacks, separators=(",", ":"))
    save_file(stored, file, metadata=metadata)


def read_weights(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The named tensors of a deltakit weights file (or of a checkpoint directory's ``delta_model.safetensors``).

    Stacked tensors are split back into one tensor per owner, so the result is keyed exactly like
    :meth:`DeltaBase.delta_state_dict` (plus any saved backbone tensors). This reads the file alone: the SHA-256
    recorded in the config is checked by the loaders (see :func:`check_weights_hash`).

    Raises:
        CheckpointError: The file is missing, truncated or corrupt.
    """
    path = os.fspath(path)
    file = os.path.join(path, WEIGHTS_NAME) if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise CheckpointError(f"The delta checkpoint {os.path.dirname(file) or '.'!r} has no {WEIGHTS_NAME}.")
    try:
        with safe_open(file, framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            stored = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{file!r} is corrupt or truncated and cannot be read ({exc}).") from None
    if "stacks" not in metadata:
        return stored
    try:
        stacks = json.loads(metadata["stacks"])
    except ValueError:
        raise CheckpointError(f"{file!r} has a corrupt stack table in its metadata.") from None
    return unpack_tensors(stored, stacks, file)


def _compact_json(meta: dict[str, Any]) -> str:
    """One top-level key per line, everything inside it without spaces: readable, and a few hundred bytes."""
    lines = [f"{json.dumps(key)}:{json.dumps(value, separators=(',', ':'))}" for key, value in meta.items()]
    return "{\n" + ",\n".join(lines) + "\n}\n"


def _atomic_write(directory: str, final_name: str, write: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{final_name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; a checkpoint gets the usual file mode
        os.replace(tmp, os.path.join(directory, final_name))
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_delta(delta: DeltaBase, path: str | os.PathLike[str], *, overwrite: bool = True) -> str:
    """Write ``delta``'s checkpoint to the directory ``path`` (created if needed); see the module docstring."""
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise CheckpointError(f"Cannot save the delta to {path!r}: it exists and is not a directory.")
    if not overwrite and any(os.path.exists(os.path.join(path, n)) for n in (CONFIG_NAME, WEIGHTS_NAME)):
        raise CheckpointError(f"{path!r} already holds a delta checkpoint; pass overwrite=True to replace it.")

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
    os.makedirs(path, exist_ok=True)
    write_checkpoint(delta, tensors, path)
    return path


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
) -> None:
    """Write ``delta_config.json`` and ``delta_model.safetensors`` for ``delta`` with the given tensors.

    The single writer of the format: :func:`save_delta` passes the delta's own tensors; the distributed helpers
    pass tensors gathered from a sharded model (and the fingerprint computed from the full shapes).

    Args:
        delta: The delta the tensors belong to (type, config, sites).
        tensors: ``{name: tensor}`` keyed like :meth:`DeltaBase.delta_state_dict` plus saved backbone tensors.
        path: An existing directory.
        fingerprint: The backbone fingerprint; computed from ``delta.backbone_model`` when ``None``.
    """
    # Own, contiguous CPU copies: safetensors refuses shared storage (tied weights) and non-CPU memory.
    payload = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
    sites = compress_sites(delta.modified_modules)
    meta = {
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
    digest: dict[str, str] = {}

    def write_weights_file(tmp: str) -> None:
        # A site list that cannot be written in the range form (names with braces) keeps the version-1 layout.
        write_weights(tmp, payload, stack=sites is not None)
        digest["sha256"] = weights_sha256(tmp)

    _atomic_write(path, WEIGHTS_NAME, write_weights_file)
    meta["weights_sha256"] = digest["sha256"]
    text = _compact_json(meta)

    def write_config(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)

    _atomic_write(path, CONFIG_NAME, write_config)


def read_checkpoint_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate ``delta_config.json`` of the checkpoint directory ``path``."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(
            f"No delta checkpoint directory at {path!r} (deltakit loads local directories written by save_finetuned)."
        )
    meta = load_json(os.path.join(path, CONFIG_NAME))
    where = os.path.join(path, CONFIG_NAME)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{where!r} is not a deltakit delta config (format {meta.get('format')!r}).")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{where!r} has format_version {version!r}; this deltakit ({__version__}) reads up to {FORMAT_VERSION}. "
            f"Upgrade deltakit."
        )
    for key, kind in (("delta_type", str), ("config", dict), ("sites", list), ("backbone_tensors", list)):
        if not isinstance(meta.get(key), kind):
            raise CheckpointError(f"{where!r} lacks a valid {key!r} entry; the file is corrupt.")
    if meta["delta_type"] not in CONFIG_REGISTRY:
        raise CheckpointError(
            f"{where!r} holds delta_type {meta['delta_type']!r}, unknown to this deltakit "
            f"(known: {sorted(CONFIG_REGISTRY)})."
        )
    return meta


def weights_sha256(file: str | os.PathLike[str]) -> str:
    """The SHA-256 (hex) of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_weights_hash(path: str | os.PathLike[str], meta: dict[str, Any]) -> bool | None:
    """Compare the weights file of the checkpoint directory ``path`` with the SHA-256 its config records.

    Returns:
        ``True`` when it matches, ``None`` when the config records none (a checkpoint from before deltakit
        recorded it).

    Raises:
        CheckpointError: The bytes differ (the file is corrupt or was modified after saving), or the recorded
            value is malformed.
    """
    path = os.fspath(path)
    expected = meta.get("weights_sha256")
    if expected is None:
        return None
    config = os.path.join(path, CONFIG_NAME)
    if not isinstance(expected, str) or not re.fullmatch(r"[0-9a-f]{64}", expected):
        raise CheckpointError(f"{config!r} has a malformed weights_sha256 entry {expected!r}; the file is corrupt.")
    file = os.path.join(path, WEIGHTS_NAME)
    if weights_sha256(file) != expected:
        raise CheckpointError(
            f"{file!r} does not match the SHA-256 recorded in {config!r} when it was saved: the weights file is "
            f"corrupt or was modified (or the two files come from different saves). Save the delta again, or "
            f"restore both files from a copy."
        )
    return True


def _read_tensors(path: str, meta: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of the checkpoint directory ``path``, checked against the SHA-256 in ``meta`` (the directory's
    config, read again when ``None``). A file that does not parse gets its own, more precise error first."""
    if not os.path.isfile(os.path.join(path, WEIGHTS_NAME)):
        raise CheckpointError(f"The delta checkpoint {path!r} has no {WEIGHTS_NAME}.")
    tensors = read_weights(os.path.join(path, WEIGHTS_NAME))
    check_weights_hash(path, meta if meta is not None else read_checkpoint_meta(path))
    return tensors


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
) -> DeltaBase:
    """Load a checkpoint onto ``backbone_model`` after validating it; see :meth:`DeltaBase.from_finetuned`."""
    from .base import DELTA_REGISTRY, DeltaBase

    path = os.fspath(path)
    if not isinstance(backbone_model, nn.Module):
        raise DeltaError(f"backbone_model must be an nn.Module, got {type(backbone_model).__name__}.")
    meta = read_checkpoint_meta(path)
    config = AutoDeltaConfig.from_dict(meta["config"])
    cls = DELTA_REGISTRY[meta["delta_type"]]
    if expected_type is not None and expected_type is not DeltaBase and not issubclass(cls, expected_type):
        raise CheckpointError(
            f"{path!r} holds a {cls.__name__} ({meta['delta_type']!r}) delta, not a {expected_type.__name__}; "
            f"load it with {cls.__name__}.from_finetuned or AutoDeltaModel.from_finetuned."
        )
    tensors = _read_tensors(path, meta)

    modules = dict(backbone_model.named_modules())
    site_prefixes = [n for n, m in modules.items() if isinstance(m, DeltaSite)]
    names = [
        n for n in modules if n and not any(n == s or n.startswith(s + ".") for s in site_prefixes)
    ]
    saved_sites = expand_sites(meta["sites"], path) if meta["format_version"] >= 2 else list(meta["sites"])
    backbone_params = dict(backbone_model.named_parameters())
    placement = _resolve_placement(
        saved_sites, list(meta["backbone_tensors"]), names, list(backbone_params), path, backbone_model
    )
    resolved = [_place(s, placement) for s in saved_sites]
    if len(set(resolved)) != len(resolved):
        raise CheckpointError(f"Several saved sites of {path!r} map to the same module of this backbone: {resolved}.")
    if meta["format_version"] >= 2:
        # The compact form records the set of sites; build them in model order, as a fresh delta would be.
        order = {n: i for i, n in enumerate(modules)}
        pairs = sorted(zip(resolved, saved_sites), key=lambda pair: order[pair[0]])
        resolved, saved_sites = [p[0] for p in pairs], [p[1] for p in pairs]
    delta = cls._build_detached(backbone_model, config, [(n, modules[n]) for n in resolved], name=name)

    # Tensor names: delta tensors (saved site names -> resolved names), then backbone tensors.
    expected = delta.delta_state_dict()
    rename = dict(zip(saved_sites, resolved))
    delta_keys = {k for k in tensors if k not in set(meta["backbone_tensors"])}
    mapped: dict[str, torch.Tensor] = {}
    shared_prefix = f"{delta.delta_type}_shared."
    for key in sorted(k for k in delta_keys if k.startswith(shared_prefix)):
        mapped[key] = tensors[key]
        delta_keys.discard(key)
    for key in delta_keys:
        site = next((s for s in sorted(rename, key=len, reverse=True) if key.startswith(s + ".")), None)
        if site is None:
            raise CheckpointError(f"{path!r} holds tensor {key!r}, which belongs to no saved site; the file is corrupt.")
        mapped[rename[site] + key[len(site) :]] = tensors[key]
    missing = sorted(set(expected) - set(mapped))
    unexpected = sorted(set(mapped) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path!r} does not fit a {cls.__name__} with this config on this backbone: missing tensors "
            f"{missing[:3]}{' ...' if len(missing) > 3 else ''}, unexpected tensors {unexpected[:3]}"
            f"{' ...' if len(unexpected) > 3 else ''}."
        )
    for key, tensor in mapped.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"Shape mismatch for {key!r}: the checkpoint {path!r} has {tuple(tensor.shape)}, this backbone needs "
                f"{tuple(expected[key].shape)}. The delta was trained on a backbone of another size or with other "
                f"hyper-parameters."
            )
    backbone_tensors: dict[str, torch.Tensor] = {}
    for saved in meta["backbone_tensors"]:
        if saved not in tensors:
            raise CheckpointError(f"{path!r} lists backbone tensor {saved!r} but does not contain it; file corrupt.")
        target = _place(saved, placement)
        if target not in backbone_params:
            at = (
                f"which puts it at {target!r}, and there is no such parameter" if target is not None
                else f"and it lies outside {placement[0][:-1]!r}"
            )
            raise CheckpointError(
                f"Backbone tensor {saved!r} saved in {path!r} (kept trainable by freeze_module, e.g. a head) does not "
                f"exist in this backbone ({type(backbone_model).__name__}): the delta's sites are found "
                f"{_describe_placement(placement)}, {at}.{_like(saved, list(backbone_params), least=2)} Load into "
                f"the model class the delta was trained on."
            )
        if tuple(backbone_params[target].shape) != tuple(tensors[saved].shape):
            raise CheckpointError(
                f"Shape mismatch for backbone tensor {target!r}: checkpoint {tuple(tensors[saved].shape)}, "
                f"backbone {tuple(backbone_params[target].shape)} (e.g. another num_labels for a classifier head)."
            )
        backbone_tensors[target] = tensors[saved]
    if check_backbone and isinstance(meta.get("fingerprint"), dict):
        saved_fp = meta["fingerprint"]
        fresh_fp = backbone_fingerprint(backbone_model, resolved)
        for key in ("config", "host_shapes_sha256"):
            if saved_fp.get(key) != fresh_fp.get(key):
                raise CheckpointError(
                    f"The backbone does not match the one {path!r} was saved from ({key}: saved {saved_fp.get(key)!r}, "
                    f"this backbone {fresh_fp.get(key)!r}; saved from a {saved_fp.get('class')}). Pass "
                    f"check_backbone=False to load anyway."
                )

    # Every check passed: now change things.
    with torch.no_grad():
        for site in delta.sites:
            prefix = f"{site.name}.{delta.delta_type}."
            state = {k[len(prefix) :]: v for k, v in mapped.items() if k.startswith(prefix)}
            own = site.module.state_dict()
            site.module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)
        if delta.shared is not None:
            own = delta.shared.state_dict()
            state = {k[len(shared_prefix) :]: v for k, v in mapped.items() if k.startswith(shared_prefix)}
            delta.shared.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)
    delta.attach()
    with torch.no_grad():
        for target, tensor in backbone_tensors.items():
            backbone_params[target].copy_(tensor.to(backbone_params[target].dtype))
    delta.unfrozen_parameter_names = list(backbone_tensors)
    return delta
