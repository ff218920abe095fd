"""Loading a checkpoint onto a backbone: validate everything, then change the model in one step.

The plan (delta type, config, sites, placement, the exact tensors expected) is made from the validated config
before any tensor byte is read; values are converted and checked (dtype, finiteness, fingerprint) before the model
is touched. See :mod:`deltakit.checkpoint` for the whole contract.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import CheckpointError, DeltaError
from ..heads import head_tensor_key, resize_heads
from ..registry import DELTA_REGISTRY
from ..site import backbone_modules, shared_tensor_key, site_tensor_key
from .fingerprint import check_fingerprint
from .layout import WEIGHTS_NAME
from .meta import config_from_meta, saved_sites
from .meta_fields import field_error
from .placement import backbone_targets, place, resolve_placement
from .read import Expected, check_finite, read_checkpoint, tensor_kind

if TYPE_CHECKING:
    from ..base import DeltaBase


@dataclass
class _Plan:
    """What the validated config says to build, filled in by :func:`_plan`."""

    delta: Any = None
    #: saved tensor name -> key in ``delta.delta_state_dict()``
    targets: dict[str, str] = field(default_factory=dict)
    #: saved backbone tensor name -> parameter name in this backbone
    backbone: dict[str, str] = field(default_factory=dict)
    #: the sites' module names in this backbone
    resolved: list[str] = field(default_factory=list)


def _check_arguments(path: Any, backbone_model: Any, **flags: Any) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise DeltaError(f"from_finetuned(path=...) must be a directory path (str or os.PathLike), got {path!r:.80}.")
    if not isinstance(backbone_model, nn.Module):
        raise DeltaError(f"backbone_model must be an nn.Module, got {type(backbone_model).__name__}.")
    for flag, value in flags.items():
        if not isinstance(value, bool):
            raise DeltaError(f"from_finetuned({flag}=...) must be True or False, got {value!r}.")
    return os.fspath(path)


def _delta_class(meta: dict[str, Any], expected_type: type[DeltaBase] | None, path: str) -> type[DeltaBase]:
    cls = DELTA_REGISTRY[meta["delta_type"]]
    if expected_type is not None and expected_type.delta_type and not issubclass(cls, expected_type):
        raise CheckpointError(
            f"{path!r} holds a {cls.__name__} ({meta['delta_type']!r}) delta, not a {expected_type.__name__}; "
            f"load it with {cls.__name__}.from_finetuned or AutoDeltaModel.from_finetuned."
        )
    return cls


def _place_sites(
    meta: dict[str, Any], where: str, path: str, backbone: nn.Module
) -> tuple[list[str], list[str], Any]:
    """``(resolved, saved, placement)``: the sites' names here and as saved, in this backbone's module order."""
    names = list(backbone_modules(backbone))
    params = dict(backbone.named_parameters())
    # Each site is a distinct module: a list longer than the backbone's module count is refused unexpanded.
    sites = saved_sites(meta, where, limit=len(names))
    declared = meta["backbone_tensors"]
    if len(declared) > len(params):
        raise field_error(where, "backbone_tensors", f"lists more tensors than this backbone has ({len(params)})")
    placement = resolve_placement(sites, list(declared), names, list(params), path, backbone)
    resolved = [place(s, placement) for s in sites]
    if len(set(resolved)) != len(resolved):
        raise CheckpointError(
            f"Several saved sites of {path!r} map to the same module of this backbone: {resolved[:4]}."
        )
    if meta["format_version"] >= 2:
        # The compact form records the set of sites; build them in model order, as a fresh delta would be.
        order = {n: i for i, n in enumerate(names)}
        pairs = sorted(zip(resolved, sites), key=lambda pair: order[pair[0]])
        resolved, sites = [p[0] for p in pairs], [p[1] for p in pairs]
    return resolved, sites, placement  # type: ignore[return-value]


def _place_heads(meta: dict[str, Any], where: str, path: str, backbone: nn.Module, placement: Any) -> dict[str, str]:
    """``{name here: saved name}`` of the modules the delta carries a copy of, placed like its sites."""
    modules = backbone_modules(backbone)
    out: dict[str, str] = {}
    for saved in meta.get("heads") or []:
        here = place(saved, placement)
        if here not in modules:
            raise field_error(
                where, "heads",
                f"lists the module {saved!r}, which does not exist in this backbone ({type(backbone).__name__}) where "
                f"the delta's sites are found (it would be {here!r}). Load into the model class the delta was "
                f"trained on",
            )
        out[here] = saved
    return out


def _delta_targets(
    delta: DeltaBase, saved_of: dict[str, str], path: str, heads_saved_of: dict[str, str] | None = None
) -> dict[str, str]:
    """``{saved name: live key}`` of every tensor of ``delta`` (its sites and heads renamed back to their saved
    names)."""
    shared_prefix = shared_tensor_key(delta.delta_type)
    head_prefix = head_tensor_key(delta.delta_type)
    heads_by_length = sorted(heads_saved_of or {}, key=len, reverse=True)
    by_length = sorted(saved_of, key=len, reverse=True)
    targets: dict[str, str] = {}
    for key in delta.delta_state_dict():
        if key.startswith(shared_prefix):
            saved = key
        elif key.startswith(head_prefix) and heads_saved_of:
            rest = key[len(head_prefix):]
            head = next(h for h in heads_by_length if rest.startswith(h + "."))
            saved = head_prefix + heads_saved_of[head] + rest[len(head):]
        else:
            site = next(s for s in by_length if key.startswith(s + "."))
            saved = saved_of[site] + key[len(site) :]
        if saved in targets:
            raise CheckpointError(f"Two tensors of {path!r} would be saved as {saved!r}; the sites collide.")
        targets[saved] = key
    return targets


def _plan(
    meta: dict[str, Any], where: str, path: str, backbone: nn.Module, cls: type[DeltaBase], name: str | None
) -> tuple[_Plan, Expected]:
    """Build the (detached) delta a validated config describes, and the tensors its weights file must hold."""
    config = config_from_meta(meta, where)
    resolved, sites, placement = _place_sites(meta, where, path, backbone)
    heads = _place_heads(meta, where, path, backbone, placement)
    modules = dict(backbone.named_modules())
    delta = cls.build_detached(
        backbone, config, [(n, modules[n]) for n in resolved], name=name, heads=[(n, modules[n]) for n in heads]
    )
    if delta.head_container is not None and meta.get("head_shapes"):
        # saved names -> names here, then the copies take the recorded sizes (another number of labels)
        shapes = {}
        for key, shape in meta["head_shapes"].items():
            head = next((h for h, saved in heads.items() if key.startswith(saved + ".")), None)
            if head is not None:
                shapes[head + key[len(heads[head]):]] = shape
        try:
            resize_heads(delta.head_container, shapes, path)
        except DeltaError as exc:
            raise CheckpointError(str(exc)) from None
    plan = _Plan(delta=delta, resolved=resolved)
    plan.targets = _delta_targets(delta, dict(zip(resolved, sites)), path, heads)
    live = delta.delta_state_dict()
    expected: Expected = {s: (tuple(live[k].shape), tensor_kind(live[k])) for s, k in plan.targets.items()}
    params = dict(backbone.named_parameters())
    plan.backbone = backbone_targets(meta["backbone_tensors"], placement, params, backbone, path)
    for saved, target in plan.backbone.items():
        if saved in expected:
            raise field_error(where, "backbone_tensors", f"lists {saved!r}, which is a delta tensor")
        expected[saved] = (tuple(params[target].shape), tensor_kind(params[target]))
    return plan, expected


def _write_delta_tensors(delta: DeltaBase, values: dict[str, torch.Tensor]) -> None:
    """Load ``values`` (keyed like ``delta_state_dict``) into the delta's site and shared modules."""
    with torch.no_grad():
        for site in delta.sites:
            prefix = site_tensor_key(site.name, delta.delta_type, "")
            state = {k[len(prefix) :]: v for k, v in values.items() if k.startswith(prefix)}
            site.module.load_state_dict(state, strict=True)
        if delta.shared is not None:
            prefix = shared_tensor_key(delta.delta_type)
            state = {k[len(prefix) :]: v for k, v in values.items() if k.startswith(prefix)}
            delta.shared.load_state_dict(state, strict=True)
        if delta.head_container is not None:
            prefix = head_tensor_key(delta.delta_type)
            state = {k[len(prefix) :]: v for k, v in values.items() if k.startswith(prefix)}
            delta.head_container.load_state_dict(state, strict=True)


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
    path = _check_arguments(
        path, backbone_model, check_backbone=check_backbone, allow_nonfinite=allow_nonfinite
    )
    made: list[_Plan] = []

    def plan(meta: dict[str, Any], where: str) -> Expected:
        if check_meta is not None:
            check_meta(meta)
        cls = _delta_class(meta, expected_type, path)
        planned, expected = _plan(meta, where, path, backbone_model, cls, name)
        made.append(planned)
        return expected

    meta, tensors = read_checkpoint(path, plan)
    built = made[-1]
    delta = built.delta
    live = delta.delta_state_dict()
    params = dict(backbone_model.named_parameters())
    values = {key: tensors[saved].to(live[key].dtype) for saved, key in built.targets.items()}
    backbone_values = {target: tensors[saved].to(params[target].dtype) for saved, target in built.backbone.items()}
    if not allow_nonfinite:
        for key, value in (*values.items(), *backbone_values.items()):
            check_finite(key, value, os.path.join(path, WEIGHTS_NAME))
    if check_backbone:
        check_fingerprint(meta.get("fingerprint"), backbone_model, built.resolved, path, skip=set(backbone_values))

    # Every check passed: now change things.
    _write_delta_tensors(delta, values)
    delta.attach()
    delta.write_backbone_tensors(backbone_values)  # detach() puts the backbone's own values back
    delta.unfrozen_parameter_names = list(backbone_values)
    return delta
