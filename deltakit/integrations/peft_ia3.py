"""PEFT interop for (IA)^3: PEFT ``IA3`` adapter directories <-> deltakit :class:`~deltakit.IA3Model` deltas.

PEFT stores one vector per modified module, ``base_model.model.<module>.ia3_l``: shaped ``(out, 1)`` when it scales
the module's output, ``(1, in)`` when it scales its input (a module of ``feedforward_modules``). deltakit's sites
hold the same vectors as ``scale``; on a fused q/k/v projection (GPT-2's ``c_attn``) a deltakit site with
``fused_qkv="kv"`` holds only the key and value entries, and its PEFT vector has ones for the queries. An imported
fused vector whose query entries are all exactly one becomes such a site; otherwise the delta scales the whole
output (``fused_qkv="all"``, what PEFT computes). Values are copied, never computed: tensors round-trip bit for bit.

The functions here are the ``"ia3"`` row of :data:`deltakit.integrations.peft.METHODS`.
"""

from __future__ import annotations

import os
import re
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, DeltaError
from ..site import backbone_modules
from ..structures import is_conv1d, linear_dims
from .peft import (
    KEY_PREFIX, PEFT_CONFIG_NAME, PeftAdapter, apply_backbone_tensors, backbone_tensor_targets, load_heads,
    resolve_module, split_backbone_tensors, split_heads,
)

__all__ = ["check", "dump", "load"]

SUFFIX = "ia3_l"
# PEFT IA3Config fields: deltakit reads the tensors, so none of them changes what an adapter computes.
_KNOWN = {
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "target_modules", "exclude_modules", "feedforward_modules", "fan_in_fan_out",
    "modules_to_save", "init_ia3_weights",
}


def check(config: dict[str, Any], path: str) -> None:
    """Refuse a PEFT ``IA3`` config deltakit cannot reproduce (an option it does not know, a bad
    ``feedforward_modules``)."""
    where = os.path.join(path, PEFT_CONFIG_NAME)
    for key, value in config.items():
        if key not in _KNOWN and value not in (None, False, [], {}, ""):
            raise CheckpointError(
                f"The PEFT adapter {path!r} sets {key}={value!r}, an option this deltakit does not know; it cannot "
                f"tell whether the adapter computes plain (IA)^3. Load it with PEFT."
            )
    ff = config.get("feedforward_modules")
    if ff is not None and not isinstance(ff, str) and not (
        isinstance(ff, list) and all(isinstance(p, str) and p for p in ff)
    ):
        raise CheckpointError(f"{where!r} has an invalid feedforward_modules={ff!r} (a list of names, a regex or null).")


def _peft_feedforward(saved: str, patterns: Any) -> bool:
    """Whether PEFT treats the module saved as ``saved`` as feed-forward (its rule: a string is a regex matched
    against the whole name, a list entry matches when the name ends with it)."""
    if not patterns:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, saved) is not None
    return any(saved.endswith(p) for p in patterns)


def _vectors(adapter: PeftAdapter) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``({saved module: ia3_l}, {other key without prefix: tensor})``."""
    vectors: dict[str, torch.Tensor] = {}
    extras: dict[str, torch.Tensor] = {}
    for key, tensor in adapter.tensors.items():
        if not key.startswith(KEY_PREFIX):
            raise CheckpointError(
                f"{adapter.file!r} holds {key!r}, which does not start with {KEY_PREFIX!r}: not a PEFT IA3 file."
            )
        rest = key[len(KEY_PREFIX) :]
        if rest.endswith("." + SUFFIX):
            vectors[rest[: -len(SUFFIX) - 1]] = tensor
        else:
            extras[rest] = tensor
    if not vectors:
        raise CheckpointError(f"{adapter.file!r} holds no IA3 vectors (ia3_l tensors).")
    return vectors, extras


def load(adapter: PeftAdapter, backbone_model: nn.Module, name: str | None) -> Any:
    """A PEFT ``IA3`` adapter as an attached deltakit ``IA3Model`` (everything checked before the model changes)."""
    from ..deltas.ia3 import IA3Config, IA3Model

    path, file = adapter.path, adapter.file
    vectors, extras = _vectors(adapter)
    base_layer = split_backbone_tensors(adapter, set(vectors), extras)
    modules = backbone_modules(backbone_model)
    names = list(modules)
    resolved = {saved: resolve_module(saved, names, path) for saved in vectors}
    heads, extras = split_heads(adapter, backbone_model, extras, base_layer, list(resolved.values()))
    order = {n: i for i, n in enumerate(names)}
    saved_sites = sorted(resolved, key=lambda s: order[resolved[s]])
    feedforward: list[str] = []
    for saved in saved_sites:
        host, vector = modules[resolved[saved]], vectors[saved]
        dims = linear_dims(host)
        if dims is None:
            raise CheckpointError(
                f"The PEFT adapter {path!r} scales {saved!r}, a {type(host).__name__}: deltakit's (IA)^3 supports "
                f"nn.Linear and transformers Conv1D only. Leave it out of target_modules, or load the adapter with PEFT."
            )
        ff = _peft_feedforward(saved, adapter.config.get("feedforward_modules"))
        expected = (1, dims[0]) if ff else (dims[1], 1)
        if tuple(vector.shape) != expected:
            raise CheckpointError(
                f"{file!r} holds ia3_l of shape {tuple(vector.shape)} for {saved!r}, but this backbone's "
                f"{type(host).__name__} needs {expected} (it scales its {'input' if ff else 'output'} per "
                f"feedforward_modules in {PEFT_CONFIG_NAME}): the adapter was made for another backbone, or the "
                f"file does not match its config."
            )
        if ff:
            feedforward.append(resolved[saved])
    backbone_tensors = backbone_tensor_targets(adapter, backbone_model, extras, base_layer, resolved)

    def build(fused_qkv: str) -> Any:
        config = IA3Config(
            modified_modules=[resolved[s] for s in saved_sites], feedforward_modules=feedforward, fused_qkv=fused_qkv,
            modules_to_save=heads.names,
        )
        matches = [(resolved[s], modules[resolved[s]]) for s in saved_sites]
        return IA3Model.build_detached(backbone_model, config, matches, name=name, heads=heads.modules)

    delta = build("kv")
    # A fused q/k/v site holds the key and value entries only: the query entries must be exactly one for that.
    for saved, site in zip(saved_sites, delta.sites):
        positions = getattr(site.module, "positions", None)
        if positions is not None:
            rest = torch.ones(vectors[saved].numel(), dtype=torch.bool)
            rest[positions.cpu()] = False
            if not bool((vectors[saved].flatten()[rest] == 1).all()):
                delta = build("all")  # PEFT scaled the queries too
                break
    with torch.no_grad():
        for saved, site in zip(saved_sites, delta.sites):
            vector = vectors[saved].flatten()
            positions = getattr(site.module, "positions", None)
            if positions is not None:
                vector = vector[positions.cpu()]
            site.module.scale.copy_(vector.to(site.module.scale.dtype))
    load_heads(delta, heads, path)  # into the detached delta's own copies (refusing leaves the model untouched)
    delta.attach()
    apply_backbone_tensors(delta, backbone_tensors)
    return delta


def dump(delta: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """PEFT config fields and tensors of a deltakit ``IA3Model``."""
    from ..deltas.ia3 import IA3InputSite, IA3Site

    tensors: dict[str, torch.Tensor] = {}
    feedforward: list[str] = []
    conv1d = linear = 0
    for site in delta.sites:
        module = site.module
        if isinstance(module, IA3InputSite):
            vector = module.full_scale().detach().view(1, -1)
            feedforward.append(site.name)
        elif isinstance(module, IA3Site):
            vector = module.full_scale().detach().view(-1, 1)
        else:  # pragma: no cover - IA3Model builds only these
            raise DeltaError(f"Site {site.name!r} holds a {type(module).__name__}, which PEFT cannot express.")
        conv1d += int(is_conv1d(site.host))
        linear += int(not is_conv1d(site.host))
        tensors[f"{KEY_PREFIX}{site.name}.{SUFFIX}"] = vector
    fields = {
        "peft_type": "IA3",
        # Full module names: PEFT matches a list entry against the whole name or (feed-forward) a suffix of it.
        "target_modules": delta.modified_modules,
        "feedforward_modules": feedforward,
        "exclude_modules": None,
        # PEFT corrects this per layer (with a warning) when Linear and Conv1D hosts are mixed.
        "fan_in_fan_out": conv1d > 0 and linear == 0,
        "init_ia3_weights": True,
    }
    return fields, tensors
