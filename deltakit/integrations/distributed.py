"""Delta-only state dicts and checkpoints of models trained by DDP, FSDP2, accelerate and DeepSpeed.

A delta's per-site modules are ordinary children of their hosts, so every engine wraps, shards and trains them with
no extra code. What the engines do not give you is a *delta-only* save and load that works whatever the engine did
to the parameters:

- DDP / accelerate: parameters are replicated; the wrapper is unwrapped (``.module``) and nothing else is needed.
- FSDP2 (``torch.distributed.fsdp.fully_shard``): parameters are ``DTensor`` shards. Saving gathers only the
  delta's own tensors (``full_tensor()``, a collective), never the backbone; loading re-shards full tensors onto
  the parameters' mesh and placements in place (so an optimizer built on them keeps working).
- DeepSpeed ZeRO-3: parameters are partitioned (``torch.Size([0])`` outside a gather). Saving gathers only the
  delta's parameters (``deepspeed.zero.GatheredParameters``), so the saved delta is complete. ZeRO-1/2 parameters
  are whole on every rank.

Every function that gathers is a *collective*: call it on all ranks. Checkpoints are written by rank 0 in deltakit's
own format (``delta_config.json`` + ``delta_model.safetensors``) and load with
:meth:`~deltakit.AutoDeltaModel.from_finetuned` on a single process, or back onto the sharded model with
:func:`load_delta_checkpoint`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ..base import DeltaBase
from ..checkpoint import (
    backbone_fingerprint,
    check_finite,
    config_from_meta,
    make_directory,
    read_checkpoint,
    saved_sites,
    write_checkpoint,
)
from ..errors import CheckpointError, DeltaError
from ..heads import head_tensor_key
from ..io.tensor_file import DTYPE_NAMES
from ..site import shared_tensor_key, site_tensor_key

__all__ = [
    "delta_state_dict",
    "load_delta_checkpoint",
    "load_delta_state_dict",
    "read_delta_checkpoint",
    "register_accelerate_hooks",
    "save_delta_checkpoint",
    "unwrap_model",
]


def _is_deepspeed_engine(obj: Any) -> bool:
    deepspeed = sys.modules.get("deepspeed")  # never import it here: its first import compiles an op
    return deepspeed is not None and isinstance(obj, deepspeed.DeepSpeedEngine)


def unwrap_model(model_or_engine: Any) -> nn.Module:
    """The user's model inside DDP / DataParallel / DeepSpeed / ``torch.compile`` wrappers (FSDP2 shards in place).

    Args:
        model_or_engine: A model, a wrapper around it, or a DeepSpeed engine.

    Returns:
        The innermost wrapped ``nn.Module``.

    Raises:
        DeltaError: ``model_or_engine`` is not a module or engine.
    """
    model = model_or_engine
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) or _is_deepspeed_engine(model):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            break
    if not isinstance(model, nn.Module):
        raise DeltaError(
            f"Expected a model, a DDP/DeepSpeed wrapper or a compiled model, got {type(model_or_engine).__name__}."
        )
    return model


def _has_zero_master_copies(model_or_engine: Any) -> bool:
    """A DeepSpeed engine training with a ZeRO optimizer (which owns fp32 copies of the parameters); an engine
    sharded for inference (ZeRO-3 without an optimizer) has none."""
    if not _is_deepspeed_engine(model_or_engine) or not model_or_engine.zero_optimization():
        return False
    from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload

    optimizer = model_or_engine.optimizer
    return optimizer is not None and not isinstance(optimizer, DeepSpeedZeRoOffload)


def _check_owner(model_or_engine: Any, delta: DeltaBase) -> nn.Module:
    if not isinstance(delta, DeltaBase):
        raise DeltaError(f"Expected a deltakit delta object (e.g. LoraModel), got {type(delta).__name__}.")
    model = unwrap_model(model_or_engine)
    if not any(m is delta.backbone_model for m in model.modules()):
        raise DeltaError(
            f"The {type(delta).__name__} was not created on this model ({type(model).__name__}): pass the model (or "
            f"engine) the delta is attached to."
        )
    if delta.state != "attached":
        raise DeltaError(f"{delta!r} is {delta.state}; attach() it before saving or loading its tensors.")
    return model


def _named_tensors(delta: DeltaBase) -> Iterator[tuple[str, torch.Tensor]]:
    """The delta's tensors (parameters and buffers, as stored) under their checkpoint keys, then unfrozen backbone
    parameters by their own names; the live objects, in a fixed order (collectives run in the same order on every
    rank)."""
    for site in delta.sites:
        for pname, tensor in site.module.state_dict(keep_vars=True).items():
            yield site_tensor_key(site.name, delta.delta_type, pname), tensor
    if delta.shared is not None:
        for pname, tensor in delta.shared.state_dict(keep_vars=True).items():
            yield shared_tensor_key(delta.delta_type, pname), tensor
    for head, module in delta.heads.items():  # the delta's own head copies (modules_to_save)
        for pname, tensor in module.state_dict(keep_vars=True).items():
            yield head_tensor_key(delta.delta_type, f"{head}.{pname}"), tensor
    if delta.unfrozen_parameter_names:
        params = dict(delta.backbone_model.named_parameters())
        for name in delta.unfrozen_parameter_names:
            if name not in params:
                raise CheckpointError(
                    f"Parameter {name!r} kept trainable by freeze_module() no longer exists in the backbone; call "
                    f"freeze_module() again."
                )
            yield name, params[name]


def _is_dtensor(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def _is_zero3(tensor: torch.Tensor) -> bool:
    return hasattr(tensor, "ds_id")


def _global_shape(tensor: torch.Tensor) -> tuple[int, ...]:
    if _is_zero3(tensor):
        return tuple(tensor.ds_shape)
    return tuple(tensor.shape)  # a DTensor reports its global shape


@contextlib.contextmanager
def _zero3_gathered(tensors: list[torch.Tensor], modifier_rank: int | None = None) -> Iterator[None]:
    partitioned = [t for t in tensors if _is_zero3(t)]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank):
        yield


def delta_state_dict(model_or_engine: Any, delta: DeltaBase) -> dict[str, torch.Tensor]:
    """Complete CPU copies of the delta's tensors (and explicitly unfrozen backbone tensors), whatever the engine.

    Keys are those of a :meth:`~deltakit.DeltaBase.save_finetuned` checkpoint. On FSDP2 and ZeRO-3 this gathers the
    delta's shards (and nothing of the frozen backbone): a collective, call it on every rank.

    Args:
        model_or_engine: The model the delta is attached to, or its DDP / FSDP2 / accelerate / DeepSpeed wrapper.
        delta: The delta object.

    Returns:
        ``{checkpoint key: full CPU tensor}``, the same on every rank.

    Raises:
        DeltaError: The delta does not belong to this model or is not attached.
    """
    _check_owner(model_or_engine, delta)
    named = list(_named_tensors(delta))
    out: dict[str, torch.Tensor] = {}
    with _zero3_gathered([t for _, t in named]):
        for key, tensor in named:
            full = tensor.full_tensor() if _is_dtensor(tensor) else tensor
            out[key] = full.detach().to("cpu").contiguous().clone()
    return out


def load_delta_state_dict(model_or_engine: Any, delta: DeltaBase, state: dict[str, torch.Tensor]) -> None:
    """Copy full tensors (from :func:`delta_state_dict` or a checkpoint) into the delta in place, on any engine.

    Names and shapes are validated first; on an error nothing changes. Parameters keep their identity, so an
    optimizer built on them stays valid. On FSDP2 each rank keeps its own shard of the full tensor; on ZeRO-3 rank
    0's values are scattered (a collective: call it on every rank with the same ``state``).

    Args:
        model_or_engine: The model the delta is attached to, or its wrapper / engine.
        delta: The delta object.
        state: ``{checkpoint key: tensor}`` holding every tensor of the delta (and its unfrozen backbone tensors).

    Raises:
        CheckpointError: Missing, unexpected or wrongly shaped tensors.
        DeltaError: A DeepSpeed engine with a ZeRO optimizer: it keeps its own fp32 copies of the parameters, so
            a later step would undo the load. Load before ``deepspeed.initialize`` or resume with
            ``engine.load_checkpoint``.
    """
    _check_owner(model_or_engine, delta)
    if _has_zero_master_copies(model_or_engine):
        raise DeltaError(
            "Cannot load delta tensors into a DeepSpeed engine with a ZeRO optimizer: it keeps fp32 master copies "
            "that the next step would copy back over the loaded values. Load the delta into the model before "
            "deepspeed.initialize (load_delta_checkpoint(model, delta, path) or AutoDeltaModel.from_finetuned), or "
            "resume a run with engine.save_checkpoint / engine.load_checkpoint."
        )
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        kind = type(state).__name__ if not isinstance(state, Mapping) else "a mapping with non-tensor values"
        raise CheckpointError(
            f"load_delta_state_dict needs a {{name: tensor}} mapping (from delta_state_dict() or a checkpoint), got "
            f"{kind}."
        )
    named = dict(_named_tensors(delta))
    missing = sorted(set(named) - set(state))
    unexpected = sorted(set(state) - set(named))
    if missing or unexpected:
        raise CheckpointError(
            f"The tensors do not fit {delta!r}: missing {missing[:3]}{' ...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{' ...' if len(unexpected) > 3 else ''}. Load a checkpoint of this delta "
            f"(same method, sites and hyper-parameters)."
        )
    for key, target in named.items():
        if tuple(state[key].shape) != _global_shape(target):
            raise CheckpointError(
                f"Shape mismatch for {key!r}: got {tuple(state[key].shape)}, the model has {_global_shape(target)}."
            )
    rank = torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0
    with torch.no_grad(), _zero3_gathered(list(named.values()), modifier_rank=0):
        for key, target in named.items():
            value = state[key]
            if _is_dtensor(target):
                from torch.distributed.tensor import distribute_tensor

                shard = distribute_tensor(
                    value.to(device=target.device, dtype=target.dtype), target.device_mesh, target.placements
                )
                target.to_local().copy_(shard.to_local())
            elif not _is_zero3(target) or rank == 0:
                target.copy_(value.to(device=target.device, dtype=target.dtype))


def _fingerprint(delta: DeltaBase) -> dict[str, Any]:
    """:func:`~deltakit.checkpoint.backbone_fingerprint`, with ZeRO-3 partitioned host weights at their true shape."""
    fingerprint = backbone_fingerprint(delta.backbone_model, delta.modified_modules)
    modules = dict(delta.backbone_model.named_modules())
    hosts = [modules[n] for n in delta.modified_modules]
    if any(_is_zero3(p) for host in hosts for p in host.parameters(recurse=False)):
        shapes = [{p: list(_global_shape(t)) for p, t in host.named_parameters(recurse=False)} for host in hosts]
        fingerprint["host_shapes_sha256"] = hashlib.sha256(json.dumps(shapes, sort_keys=True).encode()).hexdigest()[:16]
    return fingerprint


def save_delta_checkpoint(model_or_engine: Any, delta: DeltaBase, path: str | os.PathLike[str]) -> str:
    """Save the delta of a (possibly sharded) model as a deltakit checkpoint; rank 0 writes.

    A collective (only the delta is gathered on FSDP2 and ZeRO-3; a barrier at the end, so every rank can read the
    files once it returns): call it on every rank. The result is the same ``delta_config.json`` +
    ``delta_model.safetensors`` pair as :meth:`~deltakit.DeltaBase.save_finetuned`.

    Args:
        model_or_engine: The model the delta is attached to, or its wrapper / engine.
        delta: The delta object.
        path: The checkpoint directory (created if needed).

    Returns:
        ``path``.
    """
    path = os.fspath(path)
    state = delta_state_dict(model_or_engine, delta)
    fingerprint = _fingerprint(delta)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not distributed or torch.distributed.get_rank() == 0:
        _write_checkpoint(delta, state, fingerprint, path)
    if distributed:
        torch.distributed.barrier()  # on return the files exist for every rank (a load may follow at once)
    return path


def _write_checkpoint(delta: DeltaBase, state: dict[str, torch.Tensor], fingerprint: dict[str, Any], path: str) -> None:
    if os.path.exists(path) and not os.path.isdir(path):
        raise CheckpointError(f"Cannot save the delta to {path!r}: it exists and is not a directory.")
    make_directory(path)
    write_checkpoint(delta, state, path, fingerprint=fingerprint)


#: Config fields that say where a delta goes, not what it computes (the sites themselves are compared instead).
_PATTERN_FIELDS = ("modified_modules", "exclude_modules", "unfrozen_modules")


def read_delta_checkpoint(
    path: str | os.PathLike[str], delta: DeltaBase, *, allow_nonfinite: bool = False
) -> dict[str, torch.Tensor]:
    """Read a deltakit checkpoint written for ``delta`` (same method and sites) and return its tensors.

    The file must hold exactly the tensors of ``delta`` (and of the backbone tensors ``delta`` keeps trainable), at
    their shapes, in floating dtypes where the parameters are floating: checked on the header, before any tensor data
    is read.

    Args:
        path: A directory written by :meth:`~deltakit.DeltaBase.save_finetuned` or :func:`save_delta_checkpoint`.
        delta: The delta the checkpoint is meant for.
        allow_nonfinite: Accept NaN or infinite values (refused by default).

    Returns:
        ``{checkpoint key: CPU tensor}``.

    Raises:
        CheckpointError: The directory is not a deltakit checkpoint, is corrupt, or belongs to another delta.
    """
    path = os.fspath(path)
    named = dict(_named_tensors(delta))

    def plan(meta: dict[str, Any], where: str) -> dict[str, tuple[tuple[int, ...], str]]:
        if meta["delta_type"] != delta.delta_type:
            raise CheckpointError(
                f"{path!r} holds a {meta['delta_type']!r} delta, but the delta to load into is {delta.delta_type!r}."
            )
        saved_config = config_from_meta(meta, where).to_dict()
        live_config = delta.config.to_dict()
        differ = sorted(k for k in live_config if k not in _PATTERN_FIELDS and saved_config.get(k) != live_config[k])
        if differ:
            raise CheckpointError(
                f"{path!r} was saved with other hyper-parameters than this delta ("
                + ", ".join(f"{k}: saved {saved_config.get(k)!r}, here {live_config[k]!r}" for k in differ[:3])
                + "): its tensors would compute something else here. Create the delta with the saved config "
                "(AutoDeltaConfig.from_finetuned(path)) or load it with AutoDeltaModel.from_finetuned."
            )
        sites = saved_sites(meta, where, limit=len(delta.modified_modules))
        if sorted(sites) != sorted(delta.modified_modules):
            raise CheckpointError(
                f"{path!r} was saved from a delta on other modules ({len(sites)} sites, e.g. {sites[:2]}) than this "
                f"one ({len(delta.modified_modules)} sites, e.g. {delta.modified_modules[:2]}). Load it onto a fresh "
                f"backbone with AutoDeltaModel.from_finetuned instead."
            )
        if sorted(meta["backbone_tensors"]) != sorted(delta.unfrozen_parameter_names):
            raise CheckpointError(
                f"{path!r} declares the backbone tensors {meta['backbone_tensors'][:3]}, but this delta keeps "
                f"{delta.unfrozen_parameter_names[:3]} trainable; call freeze_module() as when it was saved."
            )
        # Only what this delta (and the backbone tensors it keeps trainable) holds may be in the file.
        return {
            key: (_global_shape(t), "float" if t.is_floating_point() else DTYPE_NAMES[t.dtype])
            for key, t in named.items()
        }

    _, tensors = read_checkpoint(path, plan)
    if not allow_nonfinite:
        for key, tensor in tensors.items():
            check_finite(key, tensor.to(named[key].dtype), path)
    return tensors


def load_delta_checkpoint(
    model_or_engine: Any, delta: DeltaBase, path: str | os.PathLike[str], *, allow_nonfinite: bool = False
) -> None:
    """Load a deltakit checkpoint into an existing delta in place, on any engine (every rank reads the files).

    Args:
        model_or_engine: The model the delta is attached to, or its wrapper / engine.
        delta: The delta to load into (same method and sites as the saved one).
        path: The checkpoint directory.
        allow_nonfinite: Accept NaN or infinite values (refused by default).

    Raises:
        CheckpointError: See :func:`read_delta_checkpoint` and :func:`load_delta_state_dict`.
    """
    load_delta_state_dict(model_or_engine, delta, read_delta_checkpoint(path, delta, allow_nonfinite=allow_nonfinite))


def _model_index(models: list[Any], delta: DeltaBase) -> int:
    for i, model in enumerate(models):
        if any(m is delta.backbone_model for m in unwrap_model(model).modules()):
            return i
    raise DeltaError(
        f"{delta!r} is not attached to any model prepared by this Accelerator; call accelerator.prepare(model) on "
        f"the model the delta was created on."
    )


def register_accelerate_hooks(accelerator: Any, delta: DeltaBase) -> list[Any]:
    """Make ``accelerator.save_state`` / ``load_state`` store only the delta of the model it is attached to.

    ``save_state`` then writes deltakit's ``delta_config.json`` + ``delta_model.safetensors`` into the state
    directory instead of the full ``model.safetensors`` (optimizer, scheduler, RNG and sampler states stay
    accelerate's own), and ``load_state`` copies the saved delta into the live parameters in place, after
    validating it. Call it after ``accelerator.prepare``.

    Args:
        accelerator: An ``accelerate.Accelerator``.
        delta: The delta attached to one of the prepared models.

    Returns:
        The two hook handles (``.remove()`` them to go back to accelerate's full-model states).
    """

    def save_hook(models: list[Any], weights: list[dict[str, Any]], output_dir: str) -> None:
        index = _model_index(models, delta)
        save_delta_checkpoint(models[index], delta, output_dir)
        if index < len(weights):
            weights.pop(index)  # accelerate writes the remaining models' weights only

    def load_hook(models: list[Any], input_dir: str) -> None:
        index = _model_index(models, delta)
        load_delta_checkpoint(models[index], delta, input_dir)
        models.pop(index)  # accelerate loads the remaining models only

    return [accelerator.register_save_state_pre_hook(save_hook), accelerator.register_load_state_pre_hook(load_hook)]
