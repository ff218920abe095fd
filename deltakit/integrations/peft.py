"""PEFT interop: move deltas between deltakit and HuggingFace PEFT's adapter directories.

A PEFT adapter directory holds ``adapter_config.json`` (the PEFT config, with its ``peft_type``) and
``adapter_model.safetensors`` with tensors keyed ``base_model.model.<module>.<name>``. For the low-rank methods:

* LoRA (``peft_type`` ``"LORA"``): ``...lora_A.weight`` (r x in), ``...lora_B.weight`` (out x r), for embeddings
  ``...lora_embedding_A`` (r x vocab) and ``...lora_embedding_B`` (dim x r). Both libraries compute
  ``h = W x + s B A x`` with ``s = lora_alpha / r`` (``use_rslora``: ``lora_alpha / sqrt(r)``) and the same factor
  shapes (also for transformers' ``Conv1D``, PEFT's ``fan_in_fan_out``). On ``nn.Conv1d/2d/3d`` the same keys hold
  convolution kernels, ``lora_A`` (r, in, *kernel) and ``lora_B`` (out, r / groups, 1, ...), as deltakit's
  ``LoraConvSite`` stores them. PEFT's ``lora_A`` pads with zeros and is not dilated whatever the host does, so a
  conv LoRA on a host with another ``padding_mode`` or a dilated kernel converts in neither direction.
* DoRA (``"LORA"`` with ``use_dora``): the same factors plus ``...lora_magnitude_vector`` (out), deltakit's
  ``magnitude``.

A conversion is a renaming of tensors: no arithmetic, the tensors round-trip bit for bit.

* :func:`export_to_peft` writes a deltakit delta as a PEFT adapter directory that
  ``peft.PeftModel.from_pretrained(backbone, path)`` loads onto the same backbone class.
* :func:`from_peft` loads a PEFT adapter directory onto a backbone as an attached deltakit delta.

Neither needs ``peft`` installed. PEFT options that change the adapter's function in a way deltakit does not
compute (per-module ranks, trained biases, ...) are refused with an error naming the option; nothing is changed then.

The methods table
-----------------
:data:`METHODS` maps a deltakit ``delta_type`` to a :class:`PeftMethod`, the only per-method part of this module::

    "lora": PeftMethod(
        peft_type="LORA",                  # PEFT's peft_type in adapter_config.json
        selects=lambda config: ...,        # among the rows of one peft_type, whether this one reads the config
        check=...,                         # (config, path) -> None: CheckpointError for what it cannot compute
        load=...,                          # (adapter: PeftAdapter, backbone_model, name) -> the attached delta
        dump=...,                          # (delta) -> (PEFT config fields, {full PEFT key: tensor})
    )

``dump`` gives the method's own config fields (``peft_type``, ``target_modules``, ...); :func:`export_to_peft` adds
``task_type``, ``base_model_name_or_path``, ``revision``, ``inference_mode`` and ``modules_to_save`` (with the
backbone tensors they need) and writes the files atomically. ``load`` gets the checked config and the tensors
(:class:`PeftAdapter`) and may use :func:`resolve_module`, :func:`split_backbone_tensors`, :func:`split_heads` /
:func:`load_heads` (PEFT's ``modules_to_save`` as the delta's head copies) and :func:`apply_backbone_tensors`. A
row whose code lives in another module names it with :func:`later` (``load=later("deltakit.integrations.peft_ia3",
"load")``), so that module can import the helpers here.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import CheckpointError, DeltaError
from ..heads import resize_heads
from ..io.files import atomic_write
from ..site import backbone_modules, backbone_parameters
from ..structures import ConvGeometry, find_config, is_conv1d

__all__ = [
    "KEY_PREFIX", "METHODS", "PEFT_CONFIG_NAME", "PEFT_WEIGHTS_NAME", "PeftAdapter", "PeftHeads", "PeftMethod",
    "apply_backbone_tensors", "backbone_tensor_targets", "export_to_peft", "from_peft", "later", "load_heads",
    "peft_conv_difference", "read_peft_config", "resolve_module", "split_backbone_tensors", "split_heads",
]

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."

# Modules PEFT adds to modules_to_save on its own for a task type (its PeftModelFor... classes do so when they are
# built, at training and at loading time).
_TASK_MODULES_TO_SAVE = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}


# ------------------------------------------------------------------------------------------------ the table
@dataclass(frozen=True)
class PeftAdapter:
    """A PEFT adapter directory as read from disk: its checked config and its tensors (keys as in the file)."""

    path: str
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    @property
    def file(self) -> str:
        """The weights file (for error messages)."""
        return os.path.join(self.path, PEFT_WEIGHTS_NAME)


@dataclass(frozen=True)
class PeftMethod:
    """One row of :data:`METHODS` (see the module docstring)."""

    peft_type: str
    selects: Callable[[dict[str, Any]], bool]
    check: Callable[[dict[str, Any], str], None]
    load: Callable[[PeftAdapter, nn.Module, str | None], Any]
    dump: Callable[[Any], tuple[dict[str, Any], dict[str, torch.Tensor]]]


def later(module: str, name: str) -> Callable[..., Any]:
    """``module.name``, imported at the first call (a row whose code imports this module)."""

    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    call.__qualname__ = f"{module}.{name}"
    return call


# ------------------------------------------------------------------------------------------------ low rank: LoRA, DoRA
_LINEAR = {"lora_A.weight": "lora_A", "lora_B.weight": "lora_B"}  # PEFT key suffix -> site parameter
_EMBEDDING = {"lora_embedding_A": "lora_A", "lora_embedding_B": "lora_B"}
_DORA_LINEAR = {**_LINEAR, "lora_magnitude_vector": "magnitude"}
_LOW_RANK_SUFFIXES = tuple(dict.fromkeys([*_DORA_LINEAR, *_EMBEDDING]))

# PEFT LoraConfig fields that deltakit reads or that do not change a loaded adapter's function.
_HARMLESS = {
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "r", "target_modules", "exclude_modules", "lora_alpha", "lora_dropout", "fan_in_fan_out",
    "modules_to_save", "init_lora_weights", "layers_to_transform", "layers_pattern", "rank_pattern",
    "alpha_pattern", "qalora_group_size", "runtime_config", "ensure_weight_tying", "megatron_core", "eva_config",
    "lora_ga_config", "corda_config", "loftq_config", "bias", "use_rslora", "use_dora", "lora_bias",
}
# Options that must be off (None, False, empty), with what they mean, for the error message.
_MUST_BE_OFF = {
    "lora_bias": "a trained bias on lora_B",
    "use_qalora": "QALoRA (quantization-aware pooling of the input)",
    "target_parameters": "LoRA on raw nn.Parameters (e.g. MoE expert tensors) instead of modules",
    "trainable_token_indices": "trainable rows of the embedding matrix",
    "layer_replication": "replicated layers sharing weights",
    "alora_invocation_tokens": "activated LoRA (applied only after invocation tokens)",
    "arrow_config": "Arrow routing among several LoRA experts",
    "use_bdlora": "block-diagonal LoRA",
    "kasa_config": "KaSA (singular-value adaptation)",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA (stochastic LoRA)",
    "megatron_config": "Megatron tensor-parallel LoRA layers",
}
# init_lora_weights values that rewrite the base model's weights at initialisation: the adapter only works together
# with that rewritten base, which a plain backbone is not.
_BASE_REWRITING_INITS = ("pissa", "olora", "loftq", "corda")


def _uses_dora(config: dict[str, Any]) -> bool:
    return bool(config.get("use_dora"))


def peft_conv_difference(geometry: ConvGeometry) -> str | None:
    """Why PEFT's conv LoRA would compute something else than deltakit's on this host, or ``None``.

    PEFT builds ``lora_A`` from the host's kernel size, stride and padding only: it pads with zeros and is not
    dilated. deltakit's follows the host in both (which is what merging computes), so the two agree only where those
    settings make no difference.
    """
    if geometry.pre_pad is not None:
        return f"padding_mode={geometry.padding_mode!r} (PEFT's lora_A pads with zeros)"
    if any(d != 1 for d in geometry.dilation) and any(k != 1 for k in geometry.kernel_size):
        return f"dilation={geometry.dilation} (PEFT's lora_A is not dilated)"
    return None


def _check_low_rank_config(config: dict[str, Any], path: str) -> None:
    """Refuse a PEFT ``LORA`` config (LoRA or DoRA) with an option deltakit cannot compute."""
    where = os.path.join(path, PEFT_CONFIG_NAME)
    method = "DoRA" if _uses_dora(config) else "LoRA"

    def refuse(option: str, value: Any, meaning: str) -> CheckpointError:
        return CheckpointError(
            f"The PEFT adapter {path!r} uses {option}={value!r} ({meaning}), which deltakit's {method} does not "
            f"compute, so its outputs could not be reproduced. Re-train or merge it with PEFT, or load it with PEFT."
        )

    for option, meaning in _MUST_BE_OFF.items():
        value = config.get(option)
        if value not in (None, False, [], {}, ""):
            raise refuse(option, value, meaning)
    for option in ("use_rslora", "use_dora"):
        if config.get(option) not in (None, True, False):
            raise CheckpointError(f"{where!r} has an invalid {option}={config[option]!r} (true or false).")
    if config.get("bias", "none") != "none":
        raise refuse("bias", config["bias"], "trained bias tensors of the backbone, which PEFT keeps outside the adapter")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        raise refuse("init_lora_weights", init, "an initialisation that rewrites the base model's weights")
    if config.get("loftq_config"):
        raise refuse("loftq_config", config["loftq_config"], "LoftQ, which rewrites the base model's weights")
    for key, value in config.items():
        if key not in _HARMLESS and key not in _MUST_BE_OFF and value not in (None, False, [], {}, ""):
            raise CheckpointError(
                f"The PEFT adapter {path!r} sets {key}={value!r}, an option this deltakit does not know; it cannot "
                f"tell whether the adapter computes plain {method}. Load it with PEFT."
            )
    r, alpha = config.get("r"), config.get("lora_alpha")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise CheckpointError(f"{where!r} has an invalid rank r={r!r}.")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise CheckpointError(f"{where!r} has an invalid lora_alpha={alpha!r}.")
    for option, default in (("rank_pattern", r), ("alpha_pattern", alpha)):
        pattern = config.get(option) or {}
        if not isinstance(pattern, dict):
            raise CheckpointError(f"{where!r} has an invalid {option}={pattern!r}.")
        different = {k: v for k, v in pattern.items() if v != default}
        if different:
            raise refuse(
                option, different, f"per-module ranks or scales; a deltakit {method} has one rank and one lora_alpha. "
                f"Split it into several deltas by module"
            )


def _dump_low_rank(delta: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """PEFT config fields and tensors of a deltakit LoRA or DoRA delta."""
    from ..deltas.dora import DoraSite
    from ..deltas.lora import LoraConvSite, LoraEmbeddingSite, LoraSite

    cfg = delta.config
    dora = delta.delta_type == "dora"
    tensors: dict[str, torch.Tensor] = {}
    conv1d = linear = 0
    for site in delta.sites:
        module = site.module
        if isinstance(module, LoraEmbeddingSite):
            keys = _EMBEDDING
        elif isinstance(module, LoraConvSite):
            difference = peft_conv_difference(module.geometry)
            if difference is not None:
                raise DeltaError(
                    f"Cannot export the LoRA of {site.name!r} to PEFT: the convolution has {difference}, so PEFT would "
                    f"compute another function from the same factors. Keep it as a deltakit checkpoint "
                    f"(save_finetuned), or leave that convolution out of the delta."
                )
            keys = _LINEAR
        elif isinstance(module, (LoraSite, DoraSite)):
            keys = _DORA_LINEAR if dora else _LINEAR
            conv1d += int(module.transposed)
            linear += int(not module.transposed)
        else:  # pragma: no cover - LoraModel and DoraModel build only these
            raise DeltaError(f"Site {site.name!r} holds a {type(module).__name__}, which PEFT cannot express.")
        for suffix, attr in keys.items():
            tensors[f"{KEY_PREFIX}{site.name}.{suffix}"] = getattr(module, attr)
    fields = {
        "peft_type": "LORA",
        "r": cfg.lora_r,
        "lora_alpha": cfg.lora_alpha,
        "lora_dropout": cfg.lora_dropout,
        # Full module names: PEFT matches a list entry against the whole name or a dotted suffix of it.
        "target_modules": delta.modified_modules,
        "exclude_modules": None,
        # PEFT corrects this per layer (with a warning) when Linear and Conv1D hosts are mixed.
        "fan_in_fan_out": conv1d > 0 and linear == 0,
        "bias": "none",
        "use_rslora": cfg.use_rslora,
        "use_dora": dora,
        "lora_bias": False,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    return fields, tensors


def _load_low_rank(adapter: PeftAdapter, backbone_model: nn.Module, name: str | None) -> Any:
    """A PEFT ``LORA`` adapter (LoRA, or DoRA with ``use_dora``) as an attached deltakit ``LoraModel`` /
    ``DoraModel``."""
    from ..deltas.dora import DoraConfig, DoraModel
    from ..deltas.lora import LoraConfig, LoraEmbeddingSite, LoraModel

    path, config, file = adapter.path, adapter.config, adapter.file
    dora = _uses_dora(config)
    kinds = [_DORA_LINEAR] if dora else [_LINEAR, _EMBEDDING]
    method = "DoRA" if dora else "LoRA"
    # Sort the tensors into factors per site and everything else (modules_to_save, base_layer copies).
    factors: dict[str, dict[str, torch.Tensor]] = {}
    extras: dict[str, torch.Tensor] = {}
    for key, tensor in adapter.tensors.items():
        if not key.startswith(KEY_PREFIX):
            raise CheckpointError(f"{file!r} holds {key!r}, which does not start with {KEY_PREFIX!r}: not a PEFT LoRA file.")
        rest = key[len(KEY_PREFIX) :]
        for suffix in _LOW_RANK_SUFFIXES:
            if rest.endswith("." + suffix):
                factors.setdefault(rest[: -len(suffix) - 1], {})[suffix] = tensor
                break
        else:
            extras[rest] = tensor
    if not factors:
        raise CheckpointError(f"{file!r} holds no LoRA factors (lora_A / lora_B tensors).")
    r = config["r"]
    for site, parts in factors.items():
        if dora and set(parts) & set(_EMBEDDING):
            raise CheckpointError(
                f"The PEFT adapter {path!r} holds a DoRA for the embedding {site!r}: DoRA on embeddings is not "
                f"implemented in deltakit. Leave the embedding out of target_modules, or load the adapter with PEFT."
            )
        kind = next((k for k in kinds if set(k) & set(parts) - {"lora_magnitude_vector"}), None)
        if kind is None or set(parts) != set(kind):
            expected = f" (a {method} site needs {sorted(kinds[0])})" if dora or "lora_magnitude_vector" in parts else ""
            raise CheckpointError(
                f"{file!r} holds an incomplete or mixed {method} set for {site!r}: {sorted(parts)}{expected}; the file "
                f"is corrupt, or use_dora in {PEFT_CONFIG_NAME} does not match it."
            )
        a, b = parts[next(iter(kind))], parts[list(kind)[1]]
        if kind is not _EMBEDDING and dora and (a.dim() > 2 or b.dim() > 2):
            # PEFT stores LoRA of an nn.ConvNd as conv kernels: lora_A (r, in, *kernel), lora_B (out, r, 1, ...).
            found = [n for n, m in backbone_model.named_modules() if n == site or n.endswith("." + site)]
            host = type(backbone_model.get_submodule(found[0])).__name__ if len(found) == 1 else "convolution"
            raise CheckpointError(
                f"The PEFT adapter {path!r} holds a DoRA for {site!r}, a {host} (factors shaped {tuple(a.shape)} "
                f"and {tuple(b.shape)}, convolution kernels): DoRA on Conv1d/Conv2d/Conv3d is not implemented in "
                f"deltakit (LoRA on them is). Leave the convolution out of target_modules, or load the adapter with "
                f"PEFT."
            )
        conv = kind is _LINEAR and a.dim() > 2
        if conv and (b.dim() != a.dim() or a.shape[0] != r):
            raise CheckpointError(
                f"Conv LoRA factors of {site!r} in {file!r} have shapes {tuple(a.shape)} and {tuple(b.shape)}: not "
                f"kernels of rank r={r} as adapter_config.json says (lora_A (r, in, *kernel), lora_B (out, r / "
                f"groups, 1, ...))."
            )
        if not conv and (a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r):
            raise CheckpointError(
                f"LoRA factors of {site!r} in {file!r} have shapes {tuple(a.shape)} and {tuple(b.shape)}, not rank "
                f"r={r} as adapter_config.json says (per-module ranks need rank_pattern, which deltakit refuses)."
            )
    base_layer = split_backbone_tensors(adapter, set(factors), extras)

    # Resolve and build everything (validated) before touching the model.
    modules = backbone_modules(backbone_model)
    names = list(modules)
    resolved = {site: resolve_module(site, names, path) for site in factors}
    heads, extras = split_heads(adapter, backbone_model, extras, base_layer, list(resolved.values()))
    order = {n: i for i, n in enumerate(names)}
    sites = sorted(resolved, key=lambda s: order[resolved[s]])
    config_class, delta_class = (DoraConfig, DoraModel) if dora else (LoraConfig, LoraModel)
    delta_config = config_class(
        lora_r=r,
        lora_alpha=config["lora_alpha"],
        lora_dropout=float(config.get("lora_dropout") or 0.0),
        use_rslora=bool(config.get("use_rslora")),
        modified_modules=[resolved[s] for s in sites],
        modules_to_save=heads.names,
    )
    delta = delta_class.build_detached(
        backbone_model, delta_config, [(resolved[s], modules[resolved[s]]) for s in sites], name=name,
        heads=heads.modules,
    )
    for site_name, site in zip(sites, delta.sites):
        embedding = isinstance(site.module, LoraEmbeddingSite)
        keys = _EMBEDDING if embedding else kinds[0]
        if next(iter(keys)) not in factors[site_name]:
            raise CheckpointError(
                f"{file!r} stores {site_name!r} as a {'linear' if embedding else 'embedding'} LoRA, but "
                f"{site.name!r} here is a {type(site.host).__name__}."
            )
        for key, attr in keys.items():
            own = getattr(site.module, attr)
            if tuple(factors[site_name][key].shape) != tuple(own.shape):
                raise CheckpointError(
                    f"Shape mismatch for {site_name}.{key}: the adapter {path!r} has "
                    f"{tuple(factors[site_name][key].shape)}, {site.name!r} of this backbone needs {tuple(own.shape)}. "
                    f"The adapter was trained on a backbone of another size."
                )
        geometry = getattr(site.module, "geometry", None)
        if geometry is not None and peft_conv_difference(geometry) is not None:
            raise CheckpointError(
                f"The PEFT adapter {path!r} holds a LoRA for the convolution {site.name!r}, which has "
                f"{peft_conv_difference(geometry)}; deltakit's LoRA follows the host there (as merging does), so it "
                f"would compute another function than PEFT from these factors. Load this adapter with PEFT, or leave "
                f"that convolution out of target_modules."
            )
        if not embedding and geometry is None and site.module.transposed != is_conv1d(site.host):  # pragma: no cover
            raise CheckpointError(f"Internal error: layout of {site.name!r}.")
    backbone_tensors = backbone_tensor_targets(adapter, backbone_model, extras, base_layer, resolved)
    load_heads(delta, heads, path)  # into the detached delta's own copies: the model is not touched

    # Every check passed: now change things.
    with torch.no_grad():
        for site_name, site in zip(sites, delta.sites):
            keys = _EMBEDDING if isinstance(site.module, LoraEmbeddingSite) else kinds[0]
            for key, attr in keys.items():
                own = getattr(site.module, attr)
                own.copy_(factors[site_name][key].to(own.dtype))
    delta.attach()
    apply_backbone_tensors(delta, backbone_tensors)
    return delta


#: deltakit delta_type -> how it converts to and from PEFT (see the module docstring).
METHODS: dict[str, PeftMethod] = {
    "lora": PeftMethod("LORA", lambda c: not _uses_dora(c), _check_low_rank_config, _load_low_rank, _dump_low_rank),
    "dora": PeftMethod("LORA", _uses_dora, _check_low_rank_config, _load_low_rank, _dump_low_rank),
    "ia3": PeftMethod(
        "IA3", lambda c: True, later("deltakit.integrations.peft_ia3", "check"),
        later("deltakit.integrations.peft_ia3", "load"), later("deltakit.integrations.peft_ia3", "dump"),
    ),
    "vera": PeftMethod(
        "VERA", lambda c: True, later("deltakit.integrations.peft_vera", "check"),
        later("deltakit.integrations.peft_vera", "load"), later("deltakit.integrations.peft_vera", "dump"),
    ),
}


# ------------------------------------------------------------------------------------------------------ export
def export_to_peft(
    delta: Any,
    path: str | os.PathLike[str],
    *,
    task_type: str | None = None,
    base_model_name_or_path: str | os.PathLike[str] | None = None,
    overwrite: bool = True,
) -> str:
    """Write a deltakit delta (LoRA, DoRA; see :data:`METHODS`) as a PEFT adapter directory.

    The directory holds ``adapter_config.json`` and ``adapter_model.safetensors``; load it with
    ``peft.PeftModel.from_pretrained(backbone, path)`` where ``backbone`` is a model of the same class as the
    delta's ``backbone_model`` (module names are relative to it). The delta's head copies
    (``modules_to_save=["classifier"]``, ``delta.heads``) and backbone tensors kept trainable with
    ``freeze_module(exclude=[..., "classifier"])`` go to PEFT's ``modules_to_save``, one entry per topmost module
    all of whose parameters are trained (RoBERTa's ``classifier``, not its ``dense`` and ``out_proj``); for a head
    the file holds the copy's values (what runs while the delta is attached), not the backbone module's.

    A head whose size differs from the backbone's module (6 labels on a backbone built with 2) is written at its
    own size; ``PeftModel.from_pretrained`` then loads it only onto a backbone built with that size
    (``num_labels=6``), since PEFT loads the file into a copy of the backbone's module. ``from_peft`` resizes it.

    Args:
        delta: A delta whose method :data:`METHODS` lists (any state: attached, detached or merged; its own
            parameters are exported).
        path: Target directory (created if needed).
        task_type: PEFT's ``task_type`` (e.g. ``"CAUSAL_LM"``, ``"SEQ_CLS"``); ``None`` loads as a plain
            ``PeftModel``. PEFT adds ``classifier``/``score`` to ``modules_to_save`` for ``"SEQ_CLS"`` and
            ``"TOKEN_CLS"`` (``qa_outputs`` for ``"QUESTION_ANS"``) and loads those modules whole from the file:
            they must hold no delta site, and their frozen tensors are written along at their current values.
        base_model_name_or_path: Recorded in the config (default: the backbone config's ``_name_or_path``).
        overwrite: Replace an existing adapter in ``path``.

    Returns:
        The directory path.

    Raises:
        DeltaError: ``delta`` is of a method PEFT interop does not cover, or holds something PEFT cannot express
            (part of a module's own parameters trainable, trainable modules around delta sites, a ``task_type``
            head with delta sites inside, a head tied to another module); nothing is written.
        CheckpointError: ``path`` is not a usable directory.
    """
    from ..base import DeltaBase

    method = METHODS.get(getattr(delta, "delta_type", None)) if isinstance(delta, DeltaBase) else None
    if method is None:
        raise DeltaError(
            f"export_to_peft converts {', '.join(sorted(METHODS))} deltas only, got {type(delta).__name__}: PEFT "
            f"interop has no adapter format for deltakit's {getattr(delta, 'delta_type', '?')!r} deltas. Save it with "
            f"save_finetuned() instead."
        )
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise CheckpointError(f"Cannot export the delta to {path!r}: it exists and is not a directory.")
    if not overwrite and any(os.path.exists(os.path.join(path, n)) for n in (PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME)):
        raise CheckpointError(f"{path!r} already holds a PEFT adapter; pass overwrite=True to replace it.")

    fields, tensors = method.dump(delta)
    modules_to_save, wrapped = _modules_to_save(delta, task_type)
    params = dict(delta.backbone_model.named_parameters())
    for name in delta.unfrozen_parameter_names:
        owner, _, pname = name.rpartition(".")
        if owner in delta.modified_modules:  # a site's own weight kept trainable: PEFT's base_layer copy of it
            tensors[f"{KEY_PREFIX}{owner}.base_layer.{pname}"] = params[name]
    for module in wrapped:
        for key, tensor in _wrapped_state(delta, module).items():
            tensors[f"{KEY_PREFIX}{module}.{key}"] = tensor
    for name, tensor in tensors.items():
        if tensor.is_meta:
            raise CheckpointError(f"Cannot export {name!r}: it is on the meta device (no data).")
    payload = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}

    if base_model_name_or_path is None:
        config = find_config(delta.backbone_model)
        base_model_name_or_path = getattr(config, "_name_or_path", None) or None
    elif isinstance(base_model_name_or_path, os.PathLike):
        base_model_name_or_path = os.fspath(base_model_name_or_path)  # a local path is recorded as a string
    if base_model_name_or_path is not None and not isinstance(base_model_name_or_path, str):
        raise DeltaError(
            f"export_to_peft(base_model_name_or_path=...) must be a hub id or a path (str or os.PathLike), got "
            f"{type(base_model_name_or_path).__name__}: {base_model_name_or_path!r:.80}."
        )
    peft_config = {
        "peft_type": fields.pop("peft_type"),
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        **fields,
        "modules_to_save": modules_to_save or None,
    }
    text = json.dumps(peft_config, indent=2) + "\n"
    os.makedirs(path, exist_ok=True)
    atomic_write(path, PEFT_WEIGHTS_NAME, lambda tmp: save_file(payload, tmp, metadata={"format": "pt"}))

    def write_config(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)

    atomic_write(path, PEFT_CONFIG_NAME, write_config)
    return path



def _peft_wraps(name: str, patterns: list[str] | tuple[str, ...]) -> bool:
    """Whether PEFT wraps the backbone module ``name`` for these ``modules_to_save`` entries: it compares the
    module's full name inside the ``PeftModel`` against each entry as a plain string suffix (so ``"classifier"``
    also matches ``"pre_classifier"``)."""
    full = KEY_PREFIX + name
    return any(full.endswith(p) for p in patterns)


def _modules_to_save(delta: Any, task_type: str | None) -> tuple[list[str], list[str]]:
    """PEFT ``modules_to_save`` for the delta's head copies and the backbone tensors the user kept trainable, and
    every module PEFT will then wrap (and read whole from the file).

    PEFT saves and loads whole modules (each entry's full subtree), and wraps a module inside another wrapped one in
    a way it cannot load back. A head the delta owns (:mod:`deltakit.heads`) counts as a trained module (its copy's
    values are what goes in the file, see :func:`_wrapped_state`). Each entry is the topmost module all of whose
    parameters are trained (a head, or kept trainable in place) and that holds no delta site (RoBERTa's
    ``classifier``, not ``classifier.dense`` and ``classifier.out_proj``), never going above a module that PEFT wraps
    on its own for ``task_type`` (such a module becomes the entry when trained modules sit inside it). Everything
    PEFT would then wrap is checked: no wrapped module may hold a delta site or sit inside another wrapped one.
    PEFT loads every tensor of every module it wraps from the file, so the frozen ones among them (a frozen
    ``classifier`` under ``"SEQ_CLS"``, DistilBERT's ``pre_classifier`` which ``"classifier"`` also matches) are
    written along at their current values.

    Returns:
        ``(entries, wrapped)``: the config's ``modules_to_save`` and the modules PEFT wraps for it and the task type,
        in model order.

    Raises:
        DeltaError: part of a module's own parameters is trainable, a trainable module holds delta sites, or PEFT
            would wrap a module that holds delta sites (e.g. ``task_type`` adds a head with LoRA inside).
    """
    sites = [site.name for site in delta.sites]
    backbone = delta.backbone_model
    modules = dict(backbone.named_modules())
    names = list(backbone_modules(backbone))
    params = dict(backbone.named_parameters())
    heads = _head_parameters(delta, modules)
    in_place = [n for n in delta.unfrozen_parameter_names if n.rpartition(".")[0] not in sites]
    unfrozen = list(dict.fromkeys([*in_place, *heads]))
    task_patterns = _TASK_MODULES_TO_SAVE.get(task_type or "", ())
    forced = [n for n in names if _peft_wraps(n, task_patterns)]

    def sites_in(module: str) -> list[str]:
        return [s for s in sites if s == module or s.startswith(module + ".")]

    trainable = {id(params[n]) for n in unfrozen}
    wanted = set(unfrozen)
    entries: list[str] = []
    for name in unfrozen:
        owner = name.rpartition(".")[0]
        own = [f"{owner}.{p}" if owner else p for p, _ in modules[owner].named_parameters(recurse=False)]
        if set(own) - wanted:
            raise DeltaError(
                f"Cannot express the trainable backbone tensors of {owner!r} in PEFT: PEFT's modules_to_save saves "
                f"whole modules, but only {sorted(set(own) & wanted)} of {own} are kept trainable. Keep the whole "
                f"module trainable (freeze_module(exclude=['deltas', {owner!r}])) or freeze it."
            )
        if sites_in(owner) or not owner:
            raise DeltaError(
                f"Cannot export {owner or 'the backbone model itself'!r} as a trained module: it holds delta sites, "
                f"and PEFT cannot wrap a module both ways. Keep only its own submodules without delta sites trainable, "
                f"or freeze it."
            )
        top = owner
        while "." in top:
            parent = top.rpartition(".")[0]
            if (
                sites_in(parent)
                or any(f.startswith(parent + ".") for f in forced)
                or not all(id(p) in trainable for p in modules[parent].parameters())
            ):
                break
            top = parent
        if top not in entries:
            entries.append(top)

    # A module PEFT wraps for the task type takes in the trainable modules inside it (PEFT saves it whole).
    for module in forced:
        inner = [e for e in entries if e.startswith(module + ".")]
        if inner and not sites_in(module):
            entries = [e for e in entries if e not in inner]
            if module not in entries:
                entries.append(module)
    # An entry that ends with another one adds nothing PEFT would not wrap anyway (DistilBERT's "pre_classifier"
    # next to "classifier"): leave it out, as PEFT's own configs do.
    entries = [e for e in entries if not any(o != e and e.endswith(o) for o in entries)]

    # What PEFT will wrap for these entries and the task type, by its own matching rule.
    wrapped = [n for n in names if _peft_wraps(n, entries) or n in forced]
    for module in wrapped:
        inner = [n for n in wrapped if n.startswith(module + ".")]
        holding = sites_in(module)
        if module in forced and holding:
            raise DeltaError(
                f"Cannot export for task_type={task_type!r}: PEFT then wraps {module!r} as a whole trained module (it "
                f"adds {list(task_patterns)} to modules_to_save and matches them as name suffixes), but it holds the "
                f"delta sites {holding}, which PEFT cannot load. Keep the delta out of {module!r}, or export with "
                f"task_type=None (PeftModel.from_pretrained then loads it as a plain PeftModel)."
            )
        if holding or inner:
            matched = [e for e in entries if _peft_wraps(module, [e])] or list(task_patterns)
            problem = f"holds the delta sites {holding}" if holding else f"encloses the wrapped modules {inner}"
            raise DeltaError(
                f"Cannot express the trained modules in PEFT: PEFT matches modules_to_save entries as name suffixes, "
                f"so {matched} makes it wrap {module!r}, which {problem}; PEFT cannot load that. Freeze the trainable "
                f"tensors under {module!r}, drop it from modules_to_save, or rename the modules so that no other "
                f"module name ends with them."
            )
    return entries, wrapped


def _head_parameters(delta: Any, modules: dict[str, nn.Module]) -> list[str]:
    """The backbone names of the parameters of the modules ``delta`` carries a copy of (its heads).

    Raises:
        DeltaError: a head shares a parameter with a module outside it (an ``lm_head`` tied to the embeddings):
            PEFT treats tied ``modules_to_save`` by options of its own (``ensure_weight_tying``), which this export
            does not write, so it refuses rather than guess.
    """
    by_id: dict[int, list[str]] = {}
    for name, param in backbone_parameters(delta.backbone_model).items():
        by_id.setdefault(id(param), []).append(name)
    out: list[str] = []
    for head in delta.heads:
        for pname, param in modules[head].named_parameters(prefix=head, remove_duplicate=False):
            owners = by_id.get(id(param), [])
            if not owners or not owners[0].startswith(head + "."):
                raise DeltaError(
                    f"Cannot export the head {head!r} of {delta!r} to PEFT: its {pname} is the same tensor as "
                    f"{(owners or ['another module'])[0]!r} (tied weights), which this export does not express "
                    f"(PEFT handles tied modules_to_save with options of its own). Keep it as a deltakit checkpoint "
                    f"(save_finetuned), or untie the weights before training the head."
                )
            out.append(pname)
    return out


def _wrapped_state(delta: Any, module: str) -> dict[str, torch.Tensor]:
    """The tensors PEFT reads for the wrapped ``module`` (its ``state_dict()`` keys): a head's copy where the delta
    owns one (what runs while it is attached, in its own size), the backbone's current values elsewhere."""
    heads = delta.heads
    for head, copy in heads.items():
        if module == head or module.startswith(head + "."):
            inner = module[len(head) + 1 :]
            return dict((copy.get_submodule(inner) if inner else copy).state_dict())
    state = dict(delta.backbone_model.get_submodule(module).state_dict())
    for head, copy in heads.items():
        if head.startswith(module + "."):
            inner = head[len(module) + 1 :]
            state = {k: v for k, v in state.items() if not k.startswith(inner + ".")}
            state.update({f"{inner}.{k}": v for k, v in copy.state_dict().items()})
    return state


# ------------------------------------------------------------------------------------------------------ import
def _select(config: dict[str, Any], where: str) -> PeftMethod:
    """The :data:`METHODS` row that reads this PEFT config."""
    peft_type = config.get("peft_type")
    rows = [m for m in METHODS.values() if m.peft_type == peft_type]
    if not rows:
        known = sorted({m.peft_type for m in METHODS.values()})
        raise CheckpointError(
            f"{where!r} holds a PEFT {peft_type!r} adapter; deltakit imports PEFT adapters of type {known} only."
        )
    chosen = [m for m in rows if m.selects(config)]
    if len(chosen) != 1:  # pragma: no cover - the rows of one peft_type partition its configs
        raise CheckpointError(f"{where!r}: {len(chosen)} deltakit methods claim this PEFT {peft_type!r} config.")
    return chosen[0]


def read_peft_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check ``adapter_config.json`` of a PEFT adapter directory (of a type :data:`METHODS` lists).

    Raises:
        CheckpointError: missing or malformed file, an adapter type deltakit does not import, or an option deltakit
            cannot reproduce (the message names the option and why).
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"No PEFT adapter directory at {path!r} (from_peft reads a local directory).")
    where = os.path.join(path, PEFT_CONFIG_NAME)
    try:
        with open(where, encoding="utf-8") as handle:
            config = json.load(handle)
    except FileNotFoundError:
        raise CheckpointError(
            f"{path!r} has no {PEFT_CONFIG_NAME}: it is not a PEFT adapter directory "
            f"(a deltakit checkpoint loads with AutoDeltaModel.from_finetuned)."
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{where!r} is not valid JSON ({exc}).") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{where!r} must hold a JSON object, got {type(config).__name__}.")
    _select(config, where).check(config, path)
    saved = config.get("modules_to_save")
    if saved is not None and (not isinstance(saved, list) or not all(isinstance(p, str) and p for p in saved)):
        raise CheckpointError(f"{where!r} has an invalid modules_to_save={saved!r} (a list of module names or null).")
    return config


def resolve_module(saved: str, names: list[str], path: str) -> str:
    """The backbone module (or parameter) named ``saved`` in an adapter, or, for a wrapped backbone, the one whose
    name ends with ``"." + saved``.

    Raises:
        CheckpointError: no such name, or several end with it.
    """
    if saved in names:
        return saved
    found = [n for n in names if n.endswith("." + saved)]
    if len(found) == 1:
        return found[0]
    if found:
        raise CheckpointError(f"The PEFT adapter {path!r} targets {saved!r}, which is ambiguous here: {found[:4]}.")
    raise CheckpointError(
        f"The PEFT adapter {path!r} targets module {saved!r}, which does not exist in this backbone "
        f"({len(names)} modules searched). Load it into the model class the adapter was trained on."
    )


def split_backbone_tensors(adapter: PeftAdapter, sites: set[str], extras: dict[str, torch.Tensor]) -> dict[str, str]:
    """Check the adapter's tensors that are not the method's own (``extras``, keys without :data:`KEY_PREFIX`).

    PEFT saves the whole subtree of every module it wrapped for ``modules_to_save`` (plus the task type's own
    entries), so a tensor belongs to it when any module enclosing it is one PEFT wraps (:func:`split_heads` then
    makes those modules the delta's heads); and it saves copies of a site's own weights as
    ``<site>.base_layer.<name>`` (embeddings, ``save_embedding_layers``).

    Returns:
        ``{key: site}`` for the ``base_layer`` copies (``sites``: the adapter's site names as saved).

    Raises:
        CheckpointError: a tensor that is neither.
    """
    config = adapter.config
    patterns = config.get("modules_to_save") or []
    task_patterns = [p for p in _TASK_MODULES_TO_SAVE.get(config.get("task_type") or "", ()) if p not in patterns]
    base_layer: dict[str, str] = {}
    for key in extras:
        site_name, marker, _ = key.partition(".base_layer.")
        if marker and site_name in sites:
            base_layer[key] = site_name
            continue
        parts = key.split(".")
        enclosing = [".".join(parts[:i]) for i in range(1, len(parts))]
        if not any(_peft_wraps(module, patterns + task_patterns) for module in enclosing):
            also = f" (and {task_patterns} for task_type={config.get('task_type')!r})" if task_patterns else ""
            raise CheckpointError(
                f"{adapter.file!r} holds {key!r}, which is neither a delta tensor nor part of modules_to_save="
                f"{patterns}{also}: no module enclosing it ends with one of those names, so deltakit cannot tell what "
                f"it is."
            )
    return base_layer


@dataclass(frozen=True)
class PeftHeads:
    """The modules a PEFT adapter wrapped whole for ``modules_to_save``, as deltakit head copies
    (:mod:`deltakit.heads`): see :func:`split_heads`.

    Attributes:
        modules: ``(name in this backbone, module)`` of each, in model order: the ``heads=`` of
            :meth:`~deltakit.DeltaBase.build_detached`.
        values: ``{name in this backbone: {key relative to the module: tensor}}`` as the file holds them.
    """

    modules: list[tuple[str, nn.Module]]
    values: dict[str, dict[str, torch.Tensor]]

    @property
    def names(self) -> list[str] | None:
        """The heads' names (a config's ``modules_to_save``), ``None`` when there are none."""
        return [name for name, _ in self.modules] or None


def split_heads(
    adapter: PeftAdapter, backbone_model: nn.Module, extras: dict[str, torch.Tensor], base_layer: dict[str, str],
    sites: list[str],
) -> tuple[PeftHeads, dict[str, torch.Tensor]]:
    """Sort the checked ``extras`` (:func:`split_backbone_tensors`) into whole modules PEFT wrapped and the rest.

    PEFT's ``modules_to_save`` are copies: the wrapper runs its copy and disabling the adapter runs the original
    again. deltakit's heads are the same thing, so each tensor inside a module PEFT wraps (the outermost one that
    encloses it) goes to that module's head; the ``base_layer`` copies of a site's own weight stay backbone tensors
    (:func:`backbone_tensor_targets`).

    Args:
        sites: The delta's sites in this backbone (a wrapped module may not hold one).

    Returns:
        ``(heads, rest)``: the heads, and the extras that are not theirs.

    Raises:
        CheckpointError: a wrapped module that does not exist here or holds a delta site.
    """
    config = adapter.config
    patterns = [*(config.get("modules_to_save") or []), *_TASK_MODULES_TO_SAVE.get(config.get("task_type") or "", ())]
    modules = backbone_modules(backbone_model)
    names = list(modules)
    saved_heads: dict[str, dict[str, torch.Tensor]] = {}
    rest: dict[str, torch.Tensor] = {}
    for key, tensor in extras.items():
        if key in base_layer:
            rest[key] = tensor
            continue
        parts = key.split(".")
        saved = next(".".join(parts[:i]) for i in range(1, len(parts)) if _peft_wraps(".".join(parts[:i]), patterns))
        saved_heads.setdefault(saved, {})[key[len(saved) + 1 :]] = tensor
    here: dict[str, str] = {}
    for saved in saved_heads:
        head = resolve_module(saved, names, adapter.path)
        if head in here:  # two sets of values for one module ("pooler.dense", "bert.pooler.dense"): one was lost
            raise CheckpointError(
                f"{adapter.file!r} holds tensors for {here[head]!r} and {saved!r}, which both name the module "
                f"{head!r} of this backbone: two copies of one module; the file was edited or made for another model."
            )
        here[head] = saved
    order = {n: i for i, n in enumerate(names)}
    for head, saved in here.items():
        overlap = [s for s in sites if s == head or s.startswith(head + ".") or head.startswith(s + ".")]
        if overlap:
            raise CheckpointError(
                f"{adapter.file!r} holds {saved!r} whole (modules_to_save) and delta tensors for {overlap[0]!r}, "
                f"which overlaps it; a module cannot be both a trained copy and a delta site (PEFT cannot load that "
                f"either). The file was edited or made for another model."
            )
    ordered = sorted(here, key=order.__getitem__)
    return PeftHeads([(n, modules[n]) for n in ordered], {n: saved_heads[here[n]] for n in ordered}), rest


def load_heads(delta: Any, heads: PeftHeads, path: str) -> None:
    """Give the detached ``delta``'s head copies (built with ``heads=heads.modules``) the adapter's values.

    A ``Linear`` head with another number of outputs than the backbone's (an adapter trained with 6 labels on a
    2-label backbone) is resized as deltakit's checkpoint loader does (:func:`deltakit.heads.resize_heads`); every
    tensor of the copy must be in the file, with its shape, as PEFT itself requires.

    Raises:
        CheckpointError: a tensor missing, unknown or of another shape; nothing of the model is changed.
    """
    if not heads.modules:
        return
    copies = delta.head_container  # the DeltaHeads module: what the checkpoint loader resizes and fills too
    shapes = {f"{head}.{key}": list(t.shape) for head, values in heads.values.items() for key, t in values.items()}
    try:
        resize_heads(copies, shapes, f"The PEFT adapter {path!r}")
    except DeltaError as exc:
        raise CheckpointError(str(exc)) from None
    state: dict[str, torch.Tensor] = {}
    for head, values in heads.values.items():
        own = copies.get(head).state_dict()
        missing, unknown = sorted(set(own) - set(values)), sorted(set(values) - set(own))
        if missing or unknown:
            raise CheckpointError(
                f"The PEFT adapter {path!r} wraps {head!r} whole (modules_to_save), but its file "
                f"{'lacks ' + str(missing[:4]) if missing else 'also holds ' + str(unknown[:4])} of that module "
                f"(it has {sorted(own)[:8]} here): the file is incomplete, or the adapter was made for another model."
            )
        for key, tensor in values.items():
            if tuple(tensor.shape) != tuple(own[key].shape):
                raise CheckpointError(
                    f"Shape mismatch for the modules_to_save tensor {head}.{key}: adapter {tuple(tensor.shape)}, this "
                    f"backbone {tuple(own[key].shape)}."
                )
            state[f"{head}.{key}"] = tensor
    with torch.no_grad():
        copies.load_state_dict(state, strict=True)


def backbone_tensor_targets(
    adapter: PeftAdapter, backbone_model: nn.Module, extras: dict[str, torch.Tensor], base_layer: dict[str, str],
    resolved: dict[str, str],
) -> dict[str, torch.Tensor]:
    """``{backbone parameter name: tensor}`` for the checked ``extras`` (see :func:`split_backbone_tensors`;
    ``resolved`` maps the adapter's site names to the backbone's), shapes checked; an unchanged ``base_layer`` copy
    of a site's weight is dropped. The loaders here pass what :func:`split_heads` leaves (the ``base_layer``
    copies): PEFT's wrapped modules become head copies, not backbone tensors; any other key is looked up as a
    backbone parameter.

    Raises:
        CheckpointError: a target that does not exist, or a shape that does not fit.
    """
    params = dict(backbone_model.named_parameters())
    param_names = list(backbone_parameters(backbone_model))
    targets: dict[str, torch.Tensor] = {}
    for key, tensor in extras.items():
        if key in base_layer:
            site_name = base_layer[key]
            target = resolved[site_name] + "." + key[len(site_name) + len(".base_layer.") :]
            if target not in params:
                raise CheckpointError(f"{adapter.file!r} holds {key!r}, but {target!r} does not exist in this backbone.")
        else:
            target = resolve_module(key, param_names, adapter.path)
        if tuple(params[target].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"Shape mismatch for the modules_to_save tensor {key!r}: adapter {tuple(tensor.shape)}, backbone "
                f"{tuple(params[target].shape)} (e.g. another num_labels for a classifier head)."
            )
        if key in base_layer and torch.equal(params[target].detach().cpu(), tensor.to(params[target].dtype)):
            continue  # PEFT saved an unchanged copy of the host's weight (it does so for embeddings): nothing to do
        targets[target] = tensor
    return targets


def apply_backbone_tensors(delta: Any, tensors: dict[str, torch.Tensor]) -> None:
    """Write checked backbone tensors (:func:`backbone_tensor_targets`) into the backbone of the attached ``delta``
    and record them as its unfrozen backbone tensors (so ``save_finetuned`` keeps them and ``detach()`` puts the
    backbone's own values back)."""
    delta.write_backbone_tensors(tensors)
    delta.unfrozen_parameter_names = [n for n, _ in delta.backbone_model.named_parameters() if n in tensors]


def from_peft(path: str | os.PathLike[str], backbone_model: nn.Module, *, name: str | None = None) -> Any:
    """Load a PEFT adapter directory onto ``backbone_model`` as an attached deltakit delta.

    LoRA adapters become a ``LoraModel``, DoRA ones (``use_dora``) a ``DoraModel``; ``use_rslora`` carries over.
    The sites are the modules the adapter holds tensors for (so ``target_modules``, ``layers_to_transform`` etc.
    are honoured as saved). Each module PEFT wrapped whole for ``modules_to_save`` (or for the ``task_type``: a
    ``classifier`` / ``score`` under ``"SEQ_CLS"``) becomes a head of the delta (``delta.heads``): its own copy with
    the file's values, as PEFT's wrapper copy, so detaching the delta gives the backbone back bit for bit; a
    ``Linear`` head with another number of outputs than this backbone's is resized (as ``from_finetuned`` does).
    Only the copies of a site's own weight that PEFT saves for embeddings (``<site>.base_layer.weight``), when they
    differ from the backbone's, are written into the backbone and recorded as the delta's unfrozen backbone tensors
    (so :meth:`~deltakit.DeltaBase.save_finetuned` keeps them); detaching does not restore those.

    Args:
        path: The adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``).
        backbone_model: The model the adapter was trained on (same class; the weights are not checked).
        name: Child-module name of the per-site modules (default: the delta type, ``"lora"`` / ``"dora"``).

    Returns:
        The attached delta, with its hyper-parameters from the adapter and ``modified_modules`` set to the full
        names of its sites.

    Raises:
        CheckpointError: the directory is not an adapter deltakit can import, its tensors are inconsistent, or they
            do not fit the backbone; everything is checked before the model is touched.
    """
    path = os.fspath(path)
    if not isinstance(backbone_model, nn.Module):
        raise DeltaError(f"backbone_model must be an nn.Module, got {type(backbone_model).__name__}.")
    config = read_peft_config(path)
    method = _select(config, os.path.join(path, PEFT_CONFIG_NAME))
    file = os.path.join(path, PEFT_WEIGHTS_NAME)
    if not os.path.isfile(file):
        extra = " (pickled adapter_model.bin files are not read: convert it to safetensors)" if os.path.isfile(
            os.path.join(path, "adapter_model.bin")
        ) else ""
        raise CheckpointError(f"The PEFT adapter {path!r} has no {PEFT_WEIGHTS_NAME}{extra}.")
    try:
        tensors = load_file(file, device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{file!r} is corrupt or truncated and cannot be read ({exc}).") from None
    return method.load(PeftAdapter(path, config, tensors), backbone_model, name)
