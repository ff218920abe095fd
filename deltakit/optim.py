"""LoRA+: Hayou, Ghosh & Yu 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models" (arXiv:2402.12354).

LoRA's ``B`` (the up-projection, ``out x r``) is trained with a learning rate ``loraplus_lr_ratio`` times that of
``A`` (``eta_B = lambda * eta_A``, the paper recommends ``lambda = 2**4``): with one rate for both, feature learning
in wide models is inefficient. This module only builds optimizer parameter groups; it works with any
``torch.optim.Optimizer`` and with :class:`deltakit.integrations.trainer.DeltaTrainer` (``loraplus_lr_ratio=``).

The groups follow the reference implementation (and PEFT's ``create_loraplus_optimizer``), in this order:

- ``loraplus_A``: LoRA's ``A`` matrices and other trainable matrices (a classifier head): ``lr``, ``weight_decay``.
- ``loraplus_embed``: both factors of a LoRA on an ``nn.Embedding``: ``loraplus_lr_embedding``, ``weight_decay``.
- ``loraplus_B``: LoRA's ``B`` matrices and other trainable vectors: ``lr * loraplus_lr_ratio``, ``weight_decay``.
- ``loraplus_B_nd``: trainable biases and normalisation weights: ``lr * loraplus_lr_ratio``, no weight decay.

Vectors (1-D parameters: biases, norm weights, DoRA's magnitude, any trainable per-feature scale) go with ``B``: like
``B`` they have a width-independent fan-in, which is what the paper's scaling argument gives the large rate to.
Which parameters are LoRA's ``A`` and ``B`` is read from the delta's per-site modules (a LoRA-family site holds
``lora_A`` / ``lora_B`` itself), never from the model's parameter names. Unlike PEFT, normalisation layers of any
class (``LlamaRMSNorm`` too, not only ``nn.LayerNorm``) are exempt from weight decay, as transformers' ``Trainer``
does.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from .base import DeltaBase
from .composite import CompositeDelta
from .config import check_finite_number
from .deltas.lora import LoraEmbeddingSite
from .errors import DeltaError
from .site import DeltaSite

__all__ = ["LORAPLUS_GROUPS", "create_loraplus_optimizer", "loraplus_parameter_groups"]

#: The groups' names, in the order they are handed to the optimizer (those left empty are omitted).
LORAPLUS_GROUPS = ("loraplus_A", "loraplus_embed", "loraplus_B", "loraplus_B_nd")

_DOWN, _EMBED, _UP = "down", "embedding", "up"

# What the groups set themselves (lr and weight_decay are this function's own arguments).
_RESERVED = ("params",)

Target = DeltaBase | Sequence[DeltaBase] | nn.Module


def _site_roles(module: DeltaSite) -> dict[int, str]:
    """The LoRA role of each factor of one per-site module, by parameter identity (empty for other methods).

    The LoRA family's sites (LoRA, DoRA's direction) hold their factors as the parameters ``lora_A`` (down, r x in)
    and ``lora_B`` (up, out x r) of the site module itself: read there, never matched in the model's parameter names.
    A LoRA on an embedding has both factors in the embedding group.
    """
    if isinstance(module, LoraEmbeddingSite):
        return {id(module.lora_A): _EMBED, id(module.lora_B): _EMBED}
    down, up = module._parameters.get("lora_A"), module._parameters.get("lora_B")
    if down is None or up is None:
        return {}
    return {id(down): _DOWN, id(up): _UP}


def _is_norm(module: nn.Module) -> bool:
    """A normalisation layer: torch's, or a model's own (``LlamaRMSNorm``, ``T5LayerNorm``: classes named ``*Norm``)."""
    torch_norms = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.modules.batchnorm._NormBase)
    rms_norm = getattr(nn, "RMSNorm", None)
    if rms_norm is not None:
        torch_norms = (*torch_norms, rms_norm)
    return isinstance(module, torch_norms) or type(module).__name__.endswith("Norm")


class _Collected:
    """The trainable parameters of a target, each with its owning module and attribute name, and the LoRA roles."""

    def __init__(self) -> None:
        self.params: dict[int, tuple[str, nn.Parameter]] = {}
        self.owners: dict[int, tuple[nn.Module, str]] = {}
        self.roles: dict[int, str] = {}

    def add_owners(self, root: nn.Module) -> None:
        for module in root.modules():
            for attr, param in module._parameters.items():
                if param is not None:
                    self.owners.setdefault(id(param), (module, attr))
            if isinstance(module, DeltaSite):
                self.roles.update(_site_roles(module))

    def add_params(self, named: Iterable[tuple[str, nn.Parameter]]) -> None:
        for name, param in named:
            if param.requires_grad and id(param) not in self.params:
                self.params[id(param)] = (name, param)


def _with_members(deltas: list[DeltaBase]) -> list[DeltaBase]:
    """The deltas and, for a :class:`~deltakit.CompositeDelta`, its members (recursively): a composite holds no
    sites itself, so while detached its LoRA factors' roles can only be read from its members' sites."""
    found: list[DeltaBase] = []
    for delta in deltas:
        found.append(delta)
        if isinstance(delta, CompositeDelta):
            found.extend(_with_members(list(delta.members)))
    return found


def _collect(target: Any) -> _Collected:
    """What ``target`` trains: a delta's own parameters and the backbone tensors its ``freeze_module`` kept
    trainable; for several deltas, all of theirs; for a model, every parameter with ``requires_grad``."""
    found = _Collected()
    if isinstance(target, nn.Module):
        found.add_owners(target)
        found.add_params(target.named_parameters())
        return found
    deltas = [target] if isinstance(target, DeltaBase) else list(target) if isinstance(target, (list, tuple)) else None
    if not deltas or not all(isinstance(d, DeltaBase) for d in deltas):
        raise DeltaError(
            f"LoRA+ needs a delta (LoraModel), a list of deltas or a model with LoRA attached, got "
            f"{type(target).__name__}: {target!r:.80}."
        )
    for delta in _with_members(deltas):
        # The sites, whether attached or not; then the backbone (for the trainable tensors it owns).
        for site in delta.sites:
            found.add_owners(site.module)
        if delta.shared is not None:
            found.add_owners(delta.shared)
        found.add_owners(delta.backbone_model)
        found.add_params(delta.named_parameters())
        backbone = dict(delta.backbone_model.named_parameters())
        found.add_params((n, backbone[n]) for n in delta.unfrozen_parameter_names if n in backbone)
    return found


def _check_rates(lr: Any, ratio: Any, lr_embedding: Any, weight_decay: Any) -> None:
    """Refuse rates that are not finite numbers in range (NaN would silently turn every weight into NaN)."""
    where = "create_loraplus_optimizer"
    check_finite_number(where, "lr", lr, low=0.0, hint="Pass the learning rate of the A matrices, e.g. lr=2e-4.")
    check_finite_number(
        where, "loraplus_lr_ratio", ratio, positive=True,
        hint="It is eta_B / eta_A; the LoRA+ paper recommends 16 (= 2**4), set together with a somewhat smaller lr.",
    )
    check_finite_number(where, "loraplus_lr_embedding", lr_embedding, low=0.0)
    check_finite_number(where, "weight_decay", weight_decay, low=0.0)
    if not math.isfinite(float(lr) * float(ratio)):
        raise DeltaError(
            f"create_loraplus_optimizer: lr * loraplus_lr_ratio = {lr!r} * {ratio!r} overflows to infinity; choose "
            f"smaller values."
        )


def check_loraplus_arguments(loraplus_lr_ratio: Any, loraplus_lr_embedding: Any = 1e-6) -> None:
    """Validate LoRA+ settings on their own, before any model or optimizer exists (``DeltaTrainer`` uses it).

    Raises:
        DeltaConfigError: A setting is not a finite number in range.
    """
    _check_rates(0.0, loraplus_lr_ratio, loraplus_lr_embedding, 0.0)


def loraplus_parameter_groups(
    target: Target,
    *,
    lr: float,
    loraplus_lr_ratio: float = 16.0,
    loraplus_lr_embedding: float = 1e-6,
    weight_decay: float = 0.0,
) -> list[dict[str, Any]]:
    """The LoRA+ parameter groups of ``target`` (see the module docstring), ready for any torch optimizer.

    Args:
        target: A LoRA delta (its trainable parameters and the backbone tensors ``freeze_module`` kept trainable),
            a list of deltas, or a model with LoRA deltas attached (every parameter with ``requires_grad``).
        lr: Learning rate of the ``A`` matrices and of other trainable matrices.
        loraplus_lr_ratio: ``eta_B / eta_A`` (> 0; the paper recommends 16).
        loraplus_lr_embedding: Learning rate of the factors of LoRA on embeddings (the reference's 1e-6).
        weight_decay: Weight decay of every group except biases and normalisation weights (0 there).

    Returns:
        A list of dicts with ``params``, ``lr``, ``weight_decay`` and ``name`` (one of :data:`LORAPLUS_GROUPS`), in
        that order; empty groups are left out.

    Raises:
        DeltaConfigError: A rate is not a finite number in range.
        DeltaError: ``target`` is not a delta or model, or it trains no LoRA factor.
    """
    _check_rates(lr, loraplus_lr_ratio, loraplus_lr_embedding, weight_decay)
    found = _collect(target)
    if not any(found.roles.get(key) for key in found.params):
        trained = [name for name, _ in found.params.values()]
        shown = trained[:4] + (["..."] if len(trained) > 4 else [])
        raise DeltaError(
            f"LoRA+ found no trainable LoRA factor in {type(target).__name__} (it trains {len(trained)} tensor(s)"
            f"{': ' + ', '.join(shown) if shown else ''}). LoRA+ sets the learning rate of LoRA's B matrices: give it "
            f"a LoraModel whose parameters require grad (delta.freeze_module(exclude=['deltas', ...])), or use a "
            f"plain optimizer for other methods."
        )
    members: dict[str, list[nn.Parameter]] = {name: [] for name in LORAPLUS_GROUPS}
    for key, (_, param) in found.params.items():
        members[_group_of(found, key, param)].append(param)
    settings = {
        "loraplus_A": (lr, weight_decay),
        "loraplus_embed": (loraplus_lr_embedding, weight_decay),
        "loraplus_B": (lr * loraplus_lr_ratio, weight_decay),
        "loraplus_B_nd": (lr * loraplus_lr_ratio, 0.0),
    }
    groups = []
    for name in LORAPLUS_GROUPS:
        if members[name]:
            rate, decay = settings[name]
            groups.append({"params": members[name], "lr": float(rate), "weight_decay": float(decay), "name": name})
    return groups


def _group_of(found: _Collected, key: int, param: nn.Parameter) -> str:
    role = found.roles.get(key)
    if role == _EMBED:
        return "loraplus_embed"
    if role == _DOWN:
        return "loraplus_A"
    if role != _UP and param.ndim != 1:
        return "loraplus_A"  # a trainable matrix outside LoRA (a classifier head) takes A's rate, like the reference
    owner, attr = found.owners.get(key, (None, ""))
    exempt = param.ndim == 1 and (attr == "bias" or (owner is not None and _is_norm(owner)))
    return "loraplus_B_nd" if exempt else "loraplus_B"


def create_loraplus_optimizer(
    target: Target,
    optimizer_cls: type[torch.optim.Optimizer],
    *,
    lr: float,
    loraplus_lr_ratio: float = 16.0,
    loraplus_lr_embedding: float = 1e-6,
    weight_decay: float = 0.0,
    **optimizer_kwargs: Any,
) -> torch.optim.Optimizer:
    """An optimizer of class ``optimizer_cls`` over ``target``'s LoRA+ parameter groups.

    Example:
        >>> delta = LoraModel(model, modified_modules=["query", "value"])
        >>> delta.freeze_module(exclude=["deltas", "classifier"])
        >>> opt = create_loraplus_optimizer(delta, torch.optim.AdamW, lr=2e-4, loraplus_lr_ratio=16)

    Args:
        target: See :func:`loraplus_parameter_groups`.
        optimizer_cls: Any ``torch.optim.Optimizer`` subclass (``AdamW``, ``SGD``, bitsandbytes' ...).
        lr: Learning rate of the ``A`` matrices.
        loraplus_lr_ratio: ``eta_B / eta_A``.
        loraplus_lr_embedding: Learning rate of LoRA factors on embeddings.
        weight_decay: Weight decay (not applied to biases and normalisation weights).
        **optimizer_kwargs: Other arguments of ``optimizer_cls`` (``betas``, ``momentum``, ...).

    Raises:
        DeltaConfigError: A rate is not a finite number in range.
        DeltaError: ``optimizer_cls`` is not an optimizer class, ``optimizer_kwargs`` repeats what the groups set,
            or ``target`` trains no LoRA factor.
    """
    if not (inspect.isclass(optimizer_cls) and issubclass(optimizer_cls, torch.optim.Optimizer)):
        raise DeltaError(
            f"create_loraplus_optimizer needs a torch.optim.Optimizer subclass as optimizer_cls (e.g. "
            f"torch.optim.AdamW), got {optimizer_cls!r:.80}."
        )
    repeated = [k for k in _RESERVED if k in optimizer_kwargs]
    if repeated:
        raise DeltaError(
            f"create_loraplus_optimizer sets {repeated} itself (per parameter group); pass lr= and weight_decay= as "
            f"its own arguments and leave params out."
        )
    groups = loraplus_parameter_groups(
        target, lr=lr, loraplus_lr_ratio=loraplus_lr_ratio, loraplus_lr_embedding=loraplus_lr_embedding,
        weight_decay=weight_decay,
    )
    return optimizer_cls(groups, lr=float(lr), **optimizer_kwargs)
