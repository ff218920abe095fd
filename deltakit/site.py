"""The method contract: what a per-site module declares, all in one place.

A delta method builds one :class:`DeltaSite` per modified host module (see :meth:`deltakit.base.DeltaBase.build_site`).
The class of that module declares, as class attributes and methods:

* ``composition`` (required): how the site combines with the host's computation and with other deltas on the same
  host, one of :class:`Composition`. The core relies on it: a site that only adds a function of an input commutes
  with a delta merged into the host's weights and with the other additive ones (so it may be re-attached under a
  later merged delta, or stay between routed deltas); any other must keep its place in the order.
* ``forward_hook(host, args, kwargs, output) -> output`` (additive and output-transforming sites): the host's new
  output. It may update ``output`` in place: the dispatcher guarantees nobody else holds it.
* ``forward_pre_hook(host, args, kwargs) -> (args, kwargs)`` (sites that rewrite the call): the host's new arguments.
* ``merge_deltas(host) -> {host parameter name: update}`` (optional, the capability to merge): the additive change of
  host weights that computes the same as the hook. Merging is separate from composition: IA3 and DoRA are mergeable
  but transform the output, so they do not commute; IA3's input scaling is a mergeable call rewrite (``W (l x) = (W
  diag(l)) x``), which every other delta on its host reads, so it merges only alone on its host and, merged, takes
  no other delta on that host.
* ``input_source`` and ``capture_input(module, args, kwargs) -> (args, kwargs)`` (optional): the site also reads the
  input of another module (a parallel adapter spanning a block); ``capture_input`` is pre-hooked there.
* ``hook_module`` (optional): the module whose calls the hooks act on when it is not the host (a soft prompt kept on
  the input embedding but prepended at the model's call).
* ``router`` (optional, the opt-in to per-sample routing): a :class:`deltakit.routing.SiteRouter` subclass, and
  ``routing_key()`` for what sites stacked together must share (an activation, a source module).

Parameters shared by all sites of a delta (Compacter's rules, a prefix MLP) live in one :class:`SharedParameters`
module instead. A subclass that declares no composition, or contradicts its declaration, fails when it is defined.
"""

from __future__ import annotations

import enum
from typing import Any, ClassVar

import torch
from torch import nn

from .errors import DeltaError

__all__ = [
    "Composition",
    "DeltaSite",
    "SharedParameters",
    "backbone_modules",
    "backbone_parameters",
    "delta_site_names",
    "factory_kwargs",
    "follow_host",
    "is_inside",
    "shared_tensor_key",
    "site_tensor_key",
]


class Composition(enum.Enum):
    """How a site's hook combines with its host's computation."""

    #: ``out + f(x)``: adds a function of an input and never reads the host output (LoRA, BitFit, parallel adapter).
    #: Commutes with other additive sites and with a delta merged into the host's weights.
    ADDS_INPUT_FUNCTION = "adds a function of an input"
    #: ``g(out)``: reads and transforms the host output (sequential adapters; IA3, DoRA). Order matters.
    TRANSFORMS_OUTPUT = "transforms the host output"
    #: A forward pre-hook rewriting the call's ``args`` / ``kwargs`` (prefix tuning, soft prompts).
    REWRITES_CALL = "rewrites the host call"


#: The hook each composition needs.
_REQUIRED_HOOK = {
    Composition.ADDS_INPUT_FUNCTION: "forward_hook",
    Composition.TRANSFORMS_OUTPUT: "forward_hook",
    Composition.REWRITES_CALL: "forward_pre_hook",
}


class DeltaSite(nn.Module):
    """Base class of the per-site modules a delta registers as children of its hosts; see the module docstring.

    Addressing never matches a module inside a :class:`DeltaSite`, so one delta cannot modify another by accident.
    While merged, ``merge_versions`` maps each host tensor the delta was folded into to its in-place version
    counter before and after the merge (used to unmerge exactly, in the right order).
    """

    composition: ClassVar[Composition | None]
    router: ClassVar[type | None] = None
    forward_hook: Any = None
    forward_pre_hook: Any = None
    merge_deltas: Any = None
    input_source: Any = None
    capture_input: Any = None
    hook_module: Any = None

    merge_versions: dict[str, tuple[int, int]]

    def __init__(self) -> None:
        super().__init__()
        self.merge_versions = {}

    def routing_key(self) -> tuple[Any, ...]:
        """What sites stacked into one router must share (besides their router class); default nothing."""
        return ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        where = f"{cls.__module__}.{cls.__qualname__}"
        if not hasattr(cls, "composition"):
            raise DeltaError(
                f"{where} must declare how it composes with its host: composition = Composition.ADDS_INPUT_FUNCTION "
                f"(out + f(x), e.g. LoRA), Composition.TRANSFORMS_OUTPUT (g(out), e.g. an adapter) or "
                f"Composition.REWRITES_CALL (a pre-hook rewriting the call, e.g. a prefix). See deltakit/site.py."
            )
        composition = cls.composition
        if composition is None:
            if cls.forward_hook is not None or cls.forward_pre_hook is not None:
                raise DeltaError(f"{where} declares composition = None (shared parameters) but defines a hook.")
            return
        if not isinstance(composition, Composition):
            raise DeltaError(f"{where}.composition must be a deltakit.site.Composition, got {composition!r}.")
        hook = _REQUIRED_HOOK[composition]
        if getattr(cls, hook) is None:
            raise DeltaError(f"{where} declares {composition.name} and must define {hook}().")
        if composition is Composition.REWRITES_CALL and cls.forward_hook is not None:
            raise DeltaError(f"{where} declares REWRITES_CALL: it acts through forward_pre_hook only.")
        if (cls.input_source is None) != (cls.capture_input is None):
            raise DeltaError(f"{where} must define input_source and capture_input together (or neither).")


class SharedParameters(DeltaSite):
    """Parameters shared by all sites of one delta (stored once, on the backbone root); applies nothing itself."""

    composition = None


def factory_kwargs(host: nn.Module) -> dict[str, Any]:
    """``device``/``dtype`` of the host's own parameters, so a delta is created where its host lives.

    A non-floating host weight (a quantized model's int8 storage) sets only the device: the delta stays in the
    default floating dtype.
    """
    param = next(host.parameters(recurse=False), None)
    if param is None:
        param = next(host.parameters(), None)
    if param is None:
        return {}
    if not param.dtype.is_floating_point:
        return {"device": param.device}
    return {"device": param.device, "dtype": param.dtype}


def _first_parameter(module: nn.Module) -> torch.Tensor | None:
    """The first parameter of ``module`` or of its children (depth first), without building a generator chain."""
    for param in module._parameters.values():
        if param is not None:
            return param
    for child in module._modules.values():
        if child is not None:
            param = _first_parameter(child)
            if param is not None:
                return param
    return None


def follow_host(module: nn.Module, host: nn.Module) -> None:
    """Put a module that is off the model's tree (a detached per-site module, a head copy serving a route() block) on
    its host's device/dtype (a ``model.to(...)`` done while it was away) and training flag (a new module starts in
    training mode); no work when they already agree."""
    mine = _first_parameter(module)
    theirs = next((p for p in host._parameters.values() if p is not None), None)
    if mine is None or theirs is None or mine.device != theirs.device or (
        mine.dtype != theirs.dtype and theirs.dtype.is_floating_point
    ):
        kwargs = factory_kwargs(host)
        if kwargs:
            module.to(**kwargs)
    if module.training != host.training:
        module.train(host.training)


# ------------------------------------------------------------------------------ what belongs to deltas in a model
def site_tensor_key(site_name: str, delta_type: str, param: str) -> str:
    """The checkpoint key of a site's tensor: ``<host module>.<delta_type>.<param>`` (relative to the backbone)."""
    return f"{site_name}.{delta_type}.{param}"


def shared_tensor_key(delta_type: str, param: str = "") -> str:
    """The checkpoint key of a tensor shared by all sites, ``<delta_type>_shared.<param>`` (its prefix when
    ``param`` is empty)."""
    return f"{delta_type}_shared.{param}"


def is_inside(name: str, sites: set[str]) -> bool:
    """Whether ``name`` is one of ``sites`` or lies under one (each dotted prefix is looked up once)."""
    if name in sites:
        return True
    cut = name.rfind(".")
    while cut > 0:
        if name[:cut] in sites:
            return True
        cut = name.rfind(".", 0, cut)
    return False


def delta_site_names(model: nn.Module) -> set[str]:
    """Names of the :class:`DeltaSite` modules attached anywhere in ``model``."""
    return {n for n, m in model.named_modules() if isinstance(m, DeltaSite)}


def backbone_modules(model: nn.Module) -> dict[str, nn.Module]:
    """``model``'s own modules by name, without its root and without the delta sites and everything inside them.

    Addressing, loaders and importers look for hosts here: a delta's own modules are never a host.
    """
    sites = delta_site_names(model)
    return {n: m for n, m in model.named_modules() if n and not is_inside(n, sites)}


def backbone_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """``model``'s own parameters by name, without those of attached delta sites."""
    sites = delta_site_names(model)
    return {n: p for n, p in model.named_parameters() if not is_inside(n.rpartition(".")[0], sites)}
