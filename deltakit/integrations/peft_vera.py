"""PEFT interop for VeRA: PEFT ``VERA`` adapter directories <-> deltakit :class:`~deltakit.VeraModel` deltas.

PEFT stores per modified module ``base_model.model.<module>.vera_lambda_b`` (out) and ``.vera_lambda_d`` (r),
deltakit's ``lambda_b`` / ``lambda_d``; with ``save_projection`` (PEFT's default) also the shared projections once,
``base_model.vera_A`` (r x in_max) and ``base_model.vera_B`` (out_max x r). Without them both libraries draw the
projections from the seed (``projection_prng_key``, deltakit's ``projection_seed``) the same way, sized for the
widest modified module, so the same seed gives the same matrices. Values are copied, never computed: tensors
round-trip bit for bit.

The functions here are the ``"vera"`` row of :data:`deltakit.integrations.peft.METHODS`.
"""

from __future__ import annotations

import os
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

_VECTORS = {"vera_lambda_b": "lambda_b", "vera_lambda_d": "lambda_d"}  # PEFT key suffix -> site parameter
_PROJECTIONS = {"base_model.vera_A": "vera_A", "base_model.vera_B": "vera_B"}  # full PEFT key -> shared buffer
# PEFT VeraConfig fields deltakit reads, or that do not change a loaded adapter's function (the tensors say where
# the sites are, whatever target_modules / layers_to_transform selected).
_KNOWN = {
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "r", "target_modules", "projection_prng_key", "save_projection", "vera_dropout", "d_initial",
    "fan_in_fan_out", "bias", "modules_to_save", "init_weights", "layers_to_transform", "layers_pattern",
}


def check(config: dict[str, Any], path: str) -> None:
    """Refuse a PEFT ``VERA`` config deltakit cannot reproduce (trained biases, unknown options, bad values)."""
    where = os.path.join(path, PEFT_CONFIG_NAME)
    for key, value in config.items():
        if key not in _KNOWN and value not in (None, False, [], {}, ""):
            raise CheckpointError(
                f"The PEFT adapter {path!r} sets {key}={value!r}, an option this deltakit does not know; it cannot "
                f"tell whether the adapter computes plain VeRA. Load it with PEFT."
            )
    if config.get("bias", "none") != "none":
        raise CheckpointError(
            f"The PEFT adapter {path!r} uses bias={config['bias']!r} (trained bias tensors of the backbone), which "
            f"deltakit's VeRA does not compute, so its outputs could not be reproduced. Load it with PEFT."
        )
    r, seed = config.get("r"), config.get("projection_prng_key", 0)
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise CheckpointError(f"{where!r} has an invalid rank r={r!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise CheckpointError(f"{where!r} has an invalid projection_prng_key={seed!r} (an integer in [0, 2**64)).")
    if config.get("save_projection", True) not in (True, False):
        raise CheckpointError(f"{where!r} has an invalid save_projection={config['save_projection']!r} (true or false).")
    for option, low in (("vera_dropout", 0.0), ("d_initial", None)):
        value = config.get(option)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or (
            low is not None and not low <= value < 1
        )):
            raise CheckpointError(f"{where!r} has an invalid {option}={value!r}.")


def _split(adapter: PeftAdapter) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``({saved module: {suffix: vector}}, {buffer: projection}, {other key without prefix: tensor})``."""
    vectors: dict[str, dict[str, torch.Tensor]] = {}
    projections: dict[str, torch.Tensor] = {}
    extras: dict[str, torch.Tensor] = {}
    for key, tensor in adapter.tensors.items():
        if key in _PROJECTIONS:
            projections[_PROJECTIONS[key]] = tensor
            continue
        if not key.startswith(KEY_PREFIX):
            raise CheckpointError(
                f"{adapter.file!r} holds {key!r}, which does not start with {KEY_PREFIX!r}: not a PEFT VeRA file."
            )
        rest = key[len(KEY_PREFIX) :]
        for suffix in _VECTORS:
            if rest.endswith("." + suffix):
                vectors.setdefault(rest[: -len(suffix) - 1], {})[suffix] = tensor
                break
        else:
            extras[rest] = tensor
    if not vectors:
        raise CheckpointError(f"{adapter.file!r} holds no VeRA vectors (vera_lambda_b / vera_lambda_d tensors).")
    for site, parts in vectors.items():
        if set(parts) != set(_VECTORS):
            raise CheckpointError(f"{adapter.file!r} holds an incomplete VeRA set for {site!r}: {sorted(parts)}.")
    return vectors, projections, extras


def load(adapter: PeftAdapter, backbone_model: nn.Module, name: str | None) -> Any:
    """A PEFT ``VERA`` adapter as an attached deltakit ``VeraModel`` (everything checked before the model changes)."""
    from ..deltas.vera import VeraConfig, VeraModel

    path, file, config = adapter.path, adapter.file, adapter.config
    vectors, projections, extras = _split(adapter)
    saved_projection = bool(config.get("save_projection", True))
    if saved_projection and set(projections) != set(_PROJECTIONS.values()):
        raise CheckpointError(
            f"{file!r} lacks the shared projections {sorted(_PROJECTIONS)} although {PEFT_CONFIG_NAME} says "
            f"save_projection=true: the file is incomplete."
        )
    base_layer = split_backbone_tensors(adapter, set(vectors), extras)
    modules = backbone_modules(backbone_model)
    names = list(modules)
    resolved = {saved: resolve_module(saved, names, path) for saved in vectors}
    heads, extras = split_heads(adapter, backbone_model, extras, base_layer, list(resolved.values()))
    order = {n: i for i, n in enumerate(names)}
    saved_sites = sorted(resolved, key=lambda s: order[resolved[s]])
    for saved in saved_sites:
        host = modules[resolved[saved]]
        if linear_dims(host) is None:
            raise CheckpointError(
                f"The PEFT adapter {path!r} holds VeRA vectors for {saved!r}, a {type(host).__name__}: deltakit's "
                f"VeRA supports nn.Linear and transformers Conv1D only. Load the adapter with PEFT."
            )
    try:
        delta_config = VeraConfig(
            vera_r=config["r"],
            d_initial=float(config.get("d_initial", 0.1)),
            vera_dropout=float(config.get("vera_dropout") or 0.0),
            projection_seed=int(config.get("projection_prng_key", 0)),
            save_projection=saved_projection,
            modified_modules=[resolved[s] for s in saved_sites],
            modules_to_save=heads.names,
        )
        delta = VeraModel.build_detached(
            backbone_model, delta_config, [(resolved[s], modules[resolved[s]]) for s in saved_sites], name=name,
            heads=heads.modules,
        )
    except DeltaError as exc:  # e.g. a rank this backbone's hosts cannot use
        raise CheckpointError(f"The PEFT adapter {path!r} does not fit this backbone: {exc}") from None
    for saved, site in zip(saved_sites, delta.sites):
        for suffix, attr in _VECTORS.items():
            own = getattr(site.module, attr)
            if tuple(vectors[saved][suffix].shape) != tuple(own.shape):
                raise CheckpointError(
                    f"Shape mismatch for {saved}.{suffix}: the adapter {path!r} has "
                    f"{tuple(vectors[saved][suffix].shape)}, {site.name!r} of this backbone needs {tuple(own.shape)}."
                )
    shared = delta.shared
    for attr, tensor in projections.items():
        own = getattr(shared, attr)
        if tuple(tensor.shape) != tuple(own.shape):
            raise CheckpointError(
                f"{file!r} holds the shared projection {attr} shaped {tuple(tensor.shape)}, but the modified modules "
                f"here need {tuple(own.shape)} (rank x widest input, widest output x rank): the adapter was made for "
                f"another backbone or another set of modules."
            )
    backbone_tensors = backbone_tensor_targets(adapter, backbone_model, extras, base_layer, resolved)
    load_heads(delta, heads, path)  # into the detached delta's own copies: the model is not touched

    # Every check passed: now change things.
    with torch.no_grad():
        for saved, site in zip(saved_sites, delta.sites):
            for suffix, attr in _VECTORS.items():
                own = getattr(site.module, attr)
                own.copy_(vectors[saved][suffix].to(own.dtype))
        for attr, tensor in projections.items():
            own = getattr(shared, attr)
            own.copy_(tensor.to(own.dtype))
    delta.attach()
    apply_backbone_tensors(delta, backbone_tensors)
    return delta


def dump(delta: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """PEFT config fields and tensors of a deltakit ``VeraModel``."""
    cfg = delta.config
    tensors: dict[str, torch.Tensor] = {}
    conv1d = linear = 0
    for site in delta.sites:
        conv1d += int(is_conv1d(site.host))
        linear += int(not is_conv1d(site.host))
        for suffix, attr in _VECTORS.items():
            tensors[f"{KEY_PREFIX}{site.name}.{suffix}"] = getattr(site.module, attr)
    if cfg.save_projection:
        for key, attr in _PROJECTIONS.items():
            tensors[key] = getattr(delta.shared, attr)
    fields = {
        "peft_type": "VERA",
        "r": cfg.vera_r,
        # Full module names: PEFT matches a list entry against the whole name or a dotted suffix of it, and sizes
        # the projections it draws from the seed for the widest of these modules, as deltakit does.
        "target_modules": delta.modified_modules,
        "projection_prng_key": cfg.projection_seed,
        "save_projection": cfg.save_projection,
        "vera_dropout": cfg.vera_dropout,
        "d_initial": cfg.d_initial,
        # PEFT corrects this per layer (with a warning) when Linear and Conv1D hosts are mixed.
        "fan_in_fan_out": conv1d > 0 and linear == 0,
        "bias": "none",
        "init_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    return fields, tensors
