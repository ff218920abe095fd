"""The exact preview of a delta: the method's own planning (``build_detached``), summarised, never attached.

One code path for ``deltakit show --delta``, the picker's live numbers and its final check, so what the page shows is
what the constructor would do. The method class is passed in (this module sits below the methods).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .tree import DELTA_TYPES


def backbone_parameters(model: nn.Module) -> int:
    """Scalars of the backbone itself (parameters of attached deltas not counted; tied tensors once)."""
    delta_ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, DELTA_TYPES):
            delta_ids.update(id(p) for p in module.parameters())
    seen: set[int] = set()
    total = 0
    for param in model.parameters():
        if id(param) not in seen and id(param) not in delta_ids:
            seen.add(id(param))
            total += param.numel()
    return total


def plan_preview(
    delta_class: Any,
    model: nn.Module,
    modified_modules: list[str] | None = None,
    exclude_modules: list[str] | None = None,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Plan ``delta_class`` on ``model`` and describe the sites, without changing the model.

    Args:
        delta_class: A :class:`~deltakit.base.DeltaBase` subclass (``LoraModel``, ...).
        model: The backbone.
        modified_modules: Patterns (``None``: the method's default positions).
        exclude_modules: Patterns never to modify.
        options: The method's other hyper-parameters (``{"lora_r": 16}``).

    Returns:
        ``{"type", "sites", "shared_parameters", "parameters"}``: one ``{"module", "type", "parameters"}`` dict per
        site in model order, the parameters shared by all sites (stored once) and the total.

    Raises:
        DeltaError: a bad option, a pattern that matches nothing, a module the method cannot modify.
    """
    values = dict(options or {})
    values.update(modified_modules=modified_modules, exclude_modules=exclude_modules)
    config = delta_class.config_class.from_dict(values)
    planned = delta_class.build_detached(model, config)  # matching, checks and site modules; the model is untouched
    sites = [
        {
            "module": site.name,
            "type": type(site.host).__name__,
            "parameters": sum(p.numel() for p in site.module.parameters()),
        }
        for site in planned.sites
    ]
    shared = sum(p.numel() for p in planned.shared.parameters()) if planned.shared is not None else 0
    return {
        "type": delta_class.delta_type,
        "sites": sites,
        "shared_parameters": shared,
        "parameters": shared + sum(site["parameters"] for site in sites),
    }
