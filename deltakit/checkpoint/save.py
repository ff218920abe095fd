"""Saving: the one writer of the format, an atomic and durable step (see :mod:`deltakit.io.transaction`)."""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any, BinaryIO

import torch

from .._version import __version__
from ..errors import CheckpointError, DeltaStateError
from ..heads import head_shapes
from ..io.files import fsync_directory
from ..io.tensor_file import write_tensor_file
from ..io.transaction import commit
from .base_model import base_model_record
from .fingerprint import ValueOf, backbone_fingerprint, host_values
from .layout import CONFIG_NAME, FORMAT, FORMAT_VERSION, WEIGHTS_METADATA, WEIGHTS_NAME
from .sites import compress_sites

if TYPE_CHECKING:
    from ..base import DeltaBase

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


def pristine_values(delta: DeltaBase) -> ValueOf:
    """``value_of`` for the fingerprint: a host tensor's values without the delta's own merge (the copy kept for an
    exact unmerge); ``None`` (unknown) for a tensor merged without such a copy."""
    merged = {site.name: site for site in delta.sites if site.module.merge_versions} if delta.state == "merged" else {}

    def value_of(host: str, pname: str, tensor: torch.Tensor) -> torch.Tensor | None:
        site = merged.get(host)
        if site is None or pname not in site.module.merge_versions:
            return tensor
        if not delta._merge_exact:
            return None
        return delta._merge_backup.get(id(site.module), {}).get(pname)

    return value_of


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
    if fingerprint is None:
        fingerprint = backbone_fingerprint(delta.backbone_model, delta.modified_modules, value_of=lambda *_: None)
    # The value sketch is always made here, where the backbone tensors the checkpoint writes itself are known (a
    # loader compares everything else against the backbone it is given).
    fingerprint = {**fingerprint, "host_values": host_values(
        delta.backbone_model, delta.modified_modules, pristine_values(delta), skip=set(delta.unfrozen_parameter_names)
    )}
    meta: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION if sites is not None else 1,
        "deltakit_version": __version__,
        "delta_type": delta.delta_type,
        "config": delta.config.to_dict(),
        "sites": sites if sites is not None else delta.modified_modules,
        "backbone_tensors": list(delta.unfrozen_parameter_names),
        "fingerprint": fingerprint,
        "base_model": base_model_record(delta.backbone_model),
    }
    if delta.heads:
        meta["heads"] = list(delta.heads)
        meta["head_shapes"] = head_shapes(delta.head_container)  # type: ignore[arg-type]

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
