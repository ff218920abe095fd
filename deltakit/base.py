"""``DeltaBase``: the lifecycle every delta method shares.

A delta object plans its sites (matching, type checks, shape inference, building the per-site modules) without
touching the backbone, then attaches them: each per-site module becomes a child of its host module under this
delta's child name and a function of it runs in the host's deltakit hook (see :mod:`deltakit.hooks`).

States and transitions::

    detached --attach()--> attached --merge()--> merged
    detached <--detach()-- attached <--unmerge()-- merged

Every other transition raises :class:`~deltakit.errors.DeltaStateError` and changes nothing.

To add a method (docs/adding_a_method.md), subclass :class:`DeltaBase` in a new file of ``deltakit/deltas/``: set
``delta_type``, ``config_class`` (its hyper-parameters; the keyword constructor is made from it) and
``default_modified_modules``, and implement :meth:`DeltaBase.build_site` returning a
:class:`~deltakit.site.DeltaSite` that declares its composition (:mod:`deltakit.site`). The other public hooks
(:meth:`~DeltaBase.match_sites`, :meth:`~DeltaBase.plan`, :meth:`~DeltaBase.build_shared`,
:meth:`~DeltaBase.extra_hooks`, :meth:`~DeltaBase.on_attach`, :meth:`~DeltaBase.on_detach`) have working defaults;
every way of building a delta (constructor, ``from_config``, checkpoint load, PEFT import, CLI preview) calls them
through :meth:`DeltaBase.build_detached`.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import itertools
import os
import sys
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn.modules import module as _torch_module

from .addressing import find_modules
from .config import DeltaConfig, field_docs
from .errors import DeltaError, DeltaStateError, ModuleMatchError
from .heads import DeltaHeads, HeadRouter, check_heads, head_tensor_key
from .hooks import add_hook, hook_keys, remove_hook
from .registry import DELTA_REGISTRY, register
from .site import (
    Composition,
    DeltaSite,
    SharedParameters,
    backbone_parameters,
    factory_kwargs,
    follow_host,
    shared_tensor_key,
    site_tensor_key,
)

__all__ = ["DELTA_REGISTRY", "DeltaBase", "Site", "factory_kwargs"]

# Order keys: deltas on the same host apply in the order they were created, whatever the attach/detach history.
_ORDER_KEYS = itertools.count()

ATTACHED, DETACHED, MERGED = "attached", "detached", "merged"
#: After merge_and_unload(): the delta is part of the weights and nothing of it is left to act on.
UNLOADED = "unloaded"


@dataclass
class Site:
    """One modified host: its full name in the backbone, the host module and the delta's per-site module.

    ``slot`` is the site's position in its delta's ``sites``: with the delta's order key it forms the site's hook
    key, so the key means the same thing in a copy of the model (``copy.deepcopy``), unlike an object id.
    """

    name: str
    host: nn.Module
    module: DeltaSite
    slot: int = 0


# Switching deltas (detach one, attach another) is on the serving path, so attach/detach avoid nn.Module's slow
# generic paths (``hasattr`` raising through ``__getattr__``, ``.to()`` / ``.train()`` walks when nothing changes,
# ``add_module``'s checks already done here); the observable result is the same.


def _attribute_taken(owner: nn.Module, name: str, mine: nn.Module) -> bool:
    """Whether ``owner`` has an attribute ``name`` that is not the module ``mine`` (``hasattr`` semantics)."""
    if name in owner._modules:
        return owner._modules[name] is not mine
    return name in owner._parameters or name in owner._buffers or name in owner.__dict__ or hasattr(type(owner), name)


def _member(module: nn.Module, name: str) -> Any:
    """``getattr(module, name, None)`` without the failing ``nn.Module.__getattr__`` lookup (for tools inspecting
    modules; the core reads the members :class:`~deltakit.site.DeltaSite` declares directly)."""
    if name in module.__dict__ or hasattr(type(module), name):
        return getattr(module, name)
    return None


def _merged_call_rewrites(host: nn.Module) -> list[str]:
    """The deltas merged into ``host`` whose site rewrites its call (every delta on the host reads what they
    rewrite, which a merged one no longer does)."""
    return [
        child.__dict__["merged_by"][1] for child in host._modules.values()
        if isinstance(child, DeltaSite) and child.__dict__.get("merged_by") is not None
        and type(child).composition is Composition.REWRITES_CALL
    ]


def _merged_after(host: nn.Module, order_key: int) -> list[str]:
    """The deltas created after ``order_key`` that are merged into ``host``'s weights."""
    later = []
    for child in host._modules.values():
        merged_by = child.__dict__.get("merged_by") if isinstance(child, DeltaSite) else None
        if merged_by is not None and merged_by[0] > order_key:
            later.append(merged_by[1])
    return later


def _register_child(host: nn.Module, name: str, module: nn.Module, order: int) -> None:
    """``host.add_module(name, module)`` for a name already checked free by the caller, placed among the host's
    delta children in creation order (``order``: the delta's order key).

    A plain re-registration would append the child, so every detach/attach would move its parameters to the end of
    ``model.parameters()`` (an optimizer state loaded by position would then land on other tensors). Placing it
    before the children of deltas created later makes the order depend only on which deltas are attached, never
    on the attach/detach history. The backbone's own children keep their places.
    """
    module.__dict__["_deltakit_order"] = order
    if getattr(_torch_module, "_global_module_registration_hooks", None):
        host.add_module(name, module)  # someone registered global hooks: let torch run them
    else:
        host._modules[name] = module
    children = host._modules
    later = [n for n, child in children.items() if n != name and child is not None
             and child.__dict__.get("_deltakit_order", -1) > order]
    if later:  # move `name` just before the first of them (dicts keep insertion order: re-insert the tail)
        names = list(children)
        tail = [n for n in names[names.index(later[0]):] if n != name]
        entries = [(n, children.pop(n)) for n in tail]
        children[name] = children.pop(name)
        children.update(entries)


def _inside_save_pretrained(model: nn.Module) -> bool:
    """Whether a ``save_pretrained`` method of ``model`` (or of a module holding it) is running up the stack."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_name == "save_pretrained":
            owner = frame.f_locals.get("self")
            if isinstance(owner, nn.Module) and any(m is model for m in owner.modules()):
                return True
        frame = frame.f_back
    return False


def _check_flag(method: str, name: str, value: Any) -> None:
    """Refuse a non-bool flag (``merge(exact_unmerge="no")`` would otherwise count as true)."""
    if not isinstance(value, bool):
        raise DeltaError(f"{method}({name}=...) must be True or False, got {value!r} ({type(value).__name__}).")


def _keyword_constructor(cls: type[DeltaBase]) -> Any:
    """The OpenDelta-style ``__init__(backbone_model, <config fields>, name=None)`` of a method class, made from its
    config dataclass (the one place a hyper-parameter is declared, with its type, default and one-line doc)."""
    config_class = cls.config_class
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    order = cls.constructor_fields
    if order is None:
        common = ("modified_modules", "exclude_modules", "unfrozen_modules", "modules_to_save")
        order = ("modified_modules", *(n for n in fields if n not in common), "exclude_modules", "unfrozen_modules")
    if "modules_to_save" in fields and "modules_to_save" not in order:
        order = (*order, "modules_to_save")  # every method can carry task heads (deltakit.heads)
    docs = field_docs(config_class)
    where = f"{cls.__module__}.{cls.__qualname__}"
    params = [
        inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        inspect.Parameter("backbone_model", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation="nn.Module"),
    ]
    lines = ["    backbone_model: The model to modify."]
    for field_name in order:
        field = fields.get(field_name)
        if field is None or field.default is dataclasses.MISSING or field_name not in docs:
            raise DeltaError(
                f"{where}.constructor_fields names {field_name!r}: it must be a field of {config_class.__name__} with "
                f"a plain default and a line in the config's docstring (Args: section)."
            )
        params.append(inspect.Parameter(
            field_name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=field.default, annotation=field.type
        ))
        lines.append(f"    {field_name}: {docs[field_name]}")
    params.append(
        inspect.Parameter("name", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None, annotation="str | None")
    )
    lines.append(f"    name: Child-module name of the per-site modules (default {cls.delta_type or 'delta'!r}).")
    params.append(inspect.Parameter("interactive_modify", inspect.Parameter.KEYWORD_ONLY, default=False,
                                    annotation="bool | int"))
    lines.append("    interactive_modify: True (or a port number) to choose modified_modules on a local web page "
                 "first (deltakit.web.picker; blocks until Submit).")
    signature = inspect.Signature(params, return_annotation="None")

    def __init__(self: DeltaBase, *args: Any, **kwargs: Any) -> None:
        bound = signature.bind(self, *args, **kwargs)  # TypeError for a wrong call, as Python's own
        bound.apply_defaults()
        values = dict(bound.arguments)
        del values["self"]
        backbone, name = values.pop("backbone_model"), values.pop("name")
        interactive = values.pop("interactive_modify")
        if interactive is not False and interactive is not None:  # OpenDelta's flag: pick the modules on a page
            from .web.picker import pick_for_constructor

            values["modified_modules"] = pick_for_constructor(type(self), backbone, values, interactive)
            values["exclude_modules"] = None  # the picked patterns match exactly the chosen modules
        DeltaBase.__init__(self, backbone, config_class(**values), name=name)

    __init__.__signature__ = signature  # type: ignore[attr-defined]
    __init__.__qualname__ = f"{cls.__qualname__}.__init__"
    __init__.__module__ = cls.__module__
    __init__.__doc__ = f"Create a {cls.__name__} on ``backbone_model`` and attach it.\n\nArgs:\n" + "\n".join(lines)
    return __init__


class DeltaBase:
    """Base class of all delta objects (``LoraModel``, ``BitFitModel``, ...).

    Args:
        backbone_model: The model to modify; any ``nn.Module`` (a transformers model or one wrapping it).
        config: The method's :class:`~deltakit.config.DeltaConfig`.
        name: Child-module name of this delta's per-site modules (default: the delta type, e.g. ``"lora"``,
            with a numeric suffix when another module already uses it).

    A method class that declares ``config_class`` and no ``__init__`` of its own gets an OpenDelta-style keyword
    constructor made from the config's fields (``LoraModel(model, lora_r=8, modified_modules=[...])``), with its
    signature and docstring, in the order of :attr:`constructor_fields`.
    """

    delta_type: ClassVar[str] = ""
    config_class: ClassVar[type[DeltaConfig]] = DeltaConfig
    #: Positions used when ``modified_modules`` is ``None`` (role names resolved per architecture).
    default_modified_modules: ClassVar[tuple[str, ...]] = ()
    #: Config fields the keyword constructor takes after ``backbone_model``, in order (``name`` comes last).
    #: ``None``: ``modified_modules``, the method's own fields, ``exclude_modules``, ``unfrozen_modules``.
    constructor_fields: ClassVar[tuple[str, ...] | None] = None

    # Defaults for delta objects not made by _build (a composite of deltas): no heads, no guard.
    _head_copies: DeltaHeads | None = None
    _head_originals: ClassVar[dict[str, nn.Module]] = {}
    _save_pretrained_handle: Any = None

    def __init_subclass__(cls, register_type: bool = True, **kwargs: Any) -> None:
        """Register a method class that declares its own ``delta_type`` (``register_type=False``: leave that to
        :func:`deltakit.registry.register`) and give it its keyword constructor."""
        super().__init_subclass__(**kwargs)
        if "config_class" in cls.__dict__ and "__init__" not in cls.__dict__:
            cls.__init__ = _keyword_constructor(cls)  # type: ignore[method-assign]
            if cls.__doc__ and "Args:" not in cls.__doc__:  # the hyper-parameters' docs, for help() and IDEs
                args = cls.__init__.__doc__.partition("Args:\n")[2].replace("\n", "\n    ")
                cls.__doc__ = f"{cls.__doc__.rstrip()}\n\n    Args:\n    {args}\n"
        if register_type and "delta_type" in cls.__dict__ and cls.delta_type:
            register(cls)

    def __init__(self, backbone_model: nn.Module, config: DeltaConfig, *, name: str | None = None) -> None:
        self._build(backbone_model, config, name, None)
        self.attach()

    # ------------------------------------------------------------------ construction
    @classmethod
    def build_detached(
        cls,
        backbone_model: nn.Module,
        config: DeltaConfig,
        matches: list[tuple[str, nn.Module]] | None = None,
        name: str | None = None,
        heads: list[tuple[str, nn.Module]] | None = None,
    ) -> DeltaBase:
        """Plan and build a delta without touching the model: the one path every construction takes.

        Runs :meth:`match_sites` (unless ``matches`` gives the hosts, as a checkpoint or PEFT loader does),
        :meth:`plan`, :meth:`build_shared` and :meth:`build_site` for each host. Call :meth:`attach` to insert it.

        Args:
            backbone_model: The model the delta is for.
            config: The method's config.
            matches: ``(full name, host module)`` pairs in model order; ``None`` resolves ``config.modified_modules``.
            name: The delta's child-module name (see the class docstring).
            heads: ``(full name, module)`` of the modules to carry a copy of (:mod:`deltakit.heads`); ``None``
                resolves ``config.modules_to_save``.
        """
        obj = cls.__new__(cls)
        obj._build(backbone_model, config, name, matches, heads)
        return obj

    def _build(
        self,
        backbone_model: nn.Module,
        config: DeltaConfig,
        name: str | None,
        matches: list[tuple[str, nn.Module]] | None,
        heads: list[tuple[str, nn.Module]] | None = None,
    ) -> None:
        if not isinstance(backbone_model, nn.Module):
            raise DeltaError(
                f"{type(self).__name__} needs an nn.Module as backbone_model, got {type(backbone_model).__name__}."
            )
        if not isinstance(config, self.config_class):
            raise DeltaError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}.")
        self.backbone_model = backbone_model
        self.config = config
        self._order_key = next(_ORDER_KEYS)
        self._state = DETACHED
        self._state_dict_handle: Any = None
        self._set_state_dict = False
        self._merge_backup: dict[int, dict[str, torch.Tensor]] = {}
        self._merge_exact = True
        self._checkpointing_handles: list[Any] = []
        self._checkpointing_hooks: Any = None
        self._extra: list[tuple[nn.Module, Any, bool]] = []
        self.unfrozen_parameter_names: list[str] = []
        # Backbone tensors a checkpoint wrote (a saved head): the values not in the model right now, by name.
        self._swapped_backbone: dict[str, torch.Tensor] = {}
        if matches is None:
            matches = self.match_sites()
        self.plan(matches)
        self.shared: SharedParameters | None = self.build_shared(matches)
        sites = [Site(n, host, self.build_site(n, host), slot) for slot, (n, host) in enumerate(matches)]
        self._check_declared(sites)
        if heads is None:
            heads = self._match_heads()
        check_heads(heads, [site.name for site in sites], type(self).__name__)
        #: The original modules the delta carries a copy of, by full name (see :mod:`deltakit.heads`).
        self._head_originals: dict[str, nn.Module] = dict(heads)
        self._head_copies: DeltaHeads | None = DeltaHeads(heads) if heads else None
        self._save_pretrained_handle: Any = None
        self.child_name = self._pick_child_name(name, sites)
        self.sites: list[Site] = sites

    def _match_heads(self) -> list[tuple[str, nn.Module]]:
        """``config.modules_to_save`` resolved on the backbone (the delta's own modules are never matched)."""
        patterns = self.config.modules_to_save
        if not patterns:
            return []
        return find_modules(self.backbone_model, patterns, what="modules_to_save", skip_types=(DeltaSite,))

    def _check_declared(self, sites: list[Site]) -> None:
        """Refuse what a method built outside the contract (deltakit/site.py), before anything is attached."""
        for site in sites:
            composition = getattr(type(site.module), "composition", None)
            if not isinstance(site.module, DeltaSite) or not isinstance(composition, Composition):
                raise DeltaError(
                    f"{type(self).__name__}.build_site({site.name!r}) returned a {type(site.module).__name__}, which "
                    f"is not a DeltaSite declaring a Composition (see deltakit/site.py)."
                )
        if self.shared is not None and not isinstance(self.shared, SharedParameters):
            raise DeltaError(
                f"{type(self).__name__}.build_shared() returned a {type(self.shared).__name__}; shared parameters "
                f"belong in a deltakit.site.SharedParameters subclass."
            )

    @classmethod
    def from_config(cls, config: DeltaConfig | dict[str, Any], backbone_model: nn.Module, **kwargs: Any) -> DeltaBase:
        """Build and attach a delta from a config object or dict (OpenDelta's ``from_config``).

        Keyword arguments: ``name`` (the delta's child-module name) only.
        """
        name = kwargs.pop("name", None)
        if kwargs:
            raise DeltaError(f"Unexpected keyword arguments for from_config: {sorted(kwargs)}; it accepts name= only.")
        if isinstance(config, dict):
            config = cls.config_class.from_dict(config)
        return cls.build_detached(backbone_model, config, name=name).attach()

    @classmethod
    def from_finetuned(
        cls, path: str | os.PathLike[str], backbone_model: nn.Module, *, check_backbone: bool = True, **kwargs: Any
    ) -> DeltaBase:
        """Load a delta saved by :meth:`save_finetuned` onto ``backbone_model`` and attach it.

        Everything (config, sites, tensor names and shapes, backbone fingerprint) is validated before the model
        is touched; a bad checkpoint raises :class:`~deltakit.errors.CheckpointError` and changes nothing.

        Args:
            path: The checkpoint directory.
            backbone_model: The model to load into (the same architecture the delta was trained on).
            check_backbone: Compare the backbone fingerprint recorded at save time (model type, config essentials);
                pass ``False`` to load into a backbone that differs there but has the same site shapes.
        """
        from .checkpoint import load_delta

        if not isinstance(path, (str, os.PathLike)):
            raise DeltaError(f"from_finetuned(path=...) must be a directory path (str or os.PathLike), got {path!r:.80}.")
        _check_flag("from_finetuned", "check_backbone", check_backbone)
        return load_delta(path, backbone_model, expected_type=cls, check_backbone=check_backbone, **kwargs)

    # ------------------------------------------------------------------ the hooks a method overrides
    def match_sites(self) -> list[tuple[str, nn.Module]]:
        """The hosts to modify, ``(full name, module)`` in model order: ``modified_modules`` (or the default
        positions) resolved. Not called when a loader gives the hosts. The backbone is not modified."""
        patterns = self.config.modified_modules
        use_defaults = patterns is None
        if use_defaults:
            patterns = list(self.default_modified_modules)
            if not patterns:
                raise ModuleMatchError(f"{type(self).__name__} has no default positions: pass modified_modules=[...].")
        try:
            matches = find_modules(
                self.backbone_model,
                patterns,
                self.config.exclude_modules,
                skip_types=(DeltaSite,),
                allow_unmatched_roles=use_defaults,
            )
        except ModuleMatchError as exc:
            if not use_defaults:
                raise
            raise ModuleMatchError(
                f"{type(self).__name__} could not find its default positions {patterns} in this backbone "
                f"({type(self.backbone_model).__name__}): {exc} Pass modified_modules explicitly, e.g. "
                f"{type(self).__name__}(model, modified_modules=['query', 'value'])."
            ) from None
        return matches

    @property
    def heads_name(self) -> str:
        """Child name, on the backbone root, of the head copies while attached (see :mod:`deltakit.heads`)."""
        return f"{self.child_name}_heads"

    @property
    def head_container(self) -> DeltaHeads | None:
        """The module holding the head copies at their paths (``None`` without heads): what checkpoints save and
        load as one state dict and what resizing works on (:mod:`deltakit.heads`)."""
        return self._head_copies

    @property
    def heads(self) -> dict[str, nn.Module]:
        """The delta's own copies of whole modules (``modules_to_save``), by the original module's full name:
        ``{"classifier": <the copy>}``. Empty when it carries none. While the delta is attached each copy runs
        in place of its original."""
        if self._head_copies is None:
            return {}
        return {name: self._head_copies.get(name) for name in self._head_copies.names}

    def head_routes(self) -> list[tuple[nn.Module, str, type, nn.Module]]:
        """What per-sample routing needs of the delta's task heads (:meth:`deltakit.serving.DeltaGroup.route`):
        ``(original module, its full name, router class, the delta's copy)`` per head; empty without heads."""
        if self._head_copies is None:
            return []
        return [(self._head_originals[name], name, HeadRouter, self._head_copies.get(name))
                for name in self._head_copies.names]

    @property
    def shared_name(self) -> str:
        """Child name, on the backbone root, of the parameters shared by all sites (see :meth:`build_shared`)."""
        return f"{self.child_name}_shared"

    def _pick_child_name(self, name: str | None, sites: list[Site]) -> str:
        def free(candidate: str) -> bool:
            if self.shared is not None and hasattr(self.backbone_model, f"{candidate}_shared"):
                return False
            if self._head_copies is not None and hasattr(self.backbone_model, f"{candidate}_heads"):
                return False
            return all(not hasattr(site.host, candidate) for site in sites)

        if name is not None:
            if not isinstance(name, str) or not name.isidentifier() or "." in name:
                raise DeltaError(f"Delta name {name!r} must be a Python identifier (it becomes a child module name).")
            if not free(name):
                taken = [s.name for s in sites if hasattr(s.host, name)]
                raise DeltaError(
                    f"Delta name {name!r} is already used by an attribute of {taken[0]!r}"
                    f"{f' and {len(taken) - 1} more' if len(taken) > 1 else ''}; choose another name."
                )
            return name
        base = self.delta_type or "delta"
        for k in itertools.count():
            candidate = base if k == 0 else f"{base}_{k}"
            if free(candidate):
                return candidate
        raise AssertionError("unreachable")

    def plan(self, matches: list[tuple[str, nn.Module]]) -> None:
        """Whole-delta planning and checks over all hosts, before any site is built (default: nothing).

        Called on every construction path, also when a loader gives the hosts: what every site needs to know about
        the others (a prefix's attention geometry, a parallel adapter's input modules) is found here, and what must
        hold for the hosts together is checked here. Raise before allocating anything.
        """

    def build_shared(self, matches: list[tuple[str, nn.Module]]) -> SharedParameters | None:
        """Parameters shared by all sites (Compacter's PHM rules), or ``None`` (the default).

        The module is registered once, on the backbone root under :attr:`shared_name`, while the delta is attached,
        and saved once; sites reference it without registering it (so it is not duplicated in ``state_dict``).
        """
        return None

    def build_site(self, name: str, host: nn.Module) -> DeltaSite:
        """Build the per-site module for ``host`` (full name ``name``) without modifying it (required).

        Raise :class:`~deltakit.errors.UnsupportedModuleError` naming the type when the host cannot be handled.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement build_site(name, host).")

    def extra_hooks(self) -> list[tuple[nn.Module, Any, bool]]:
        """Hooks besides the sites', ``(module, hook, is_pre_hook)``, installed at :meth:`attach` and removed at
        :meth:`detach` in the same per-module dispatchers (default: none). They carry no parameters."""
        return []

    def on_attach(self) -> None:
        """Called at the end of every :meth:`attach` (default: nothing)."""

    def on_detach(self) -> None:
        """Called at the end of every :meth:`detach` (default: nothing)."""

    # ------------------------------------------------------------------ lifecycle
    @property
    def state(self) -> str:
        """``"attached"``, ``"detached"`` or ``"merged"``."""
        return self._state

    @property
    def name(self) -> str:
        """This delta's name: the child-module name of its per-site modules (``name=`` at creation)."""
        return self.child_name

    @property
    def modified_modules(self) -> list[str]:
        """Full names of the modified host modules, in model order."""
        return [site.name for site in self.sites]

    def _require(self, action: str, *allowed: str) -> None:
        if self._state in allowed:
            return
        hints = {
            (ATTACHED, "attach"): "it is already attached; call detach() first",
            (MERGED, "attach"): "it is merged into the weights (and therefore active); call unmerge() to get hooks back",
            (MERGED, "detach"): "it is merged into the weights; call unmerge() first, then detach()",
            (DETACHED, "detach"): "it is not attached",
            (DETACHED, "merge"): "it is detached; attach() it first",
            (DETACHED, "merge_and_unload"): "it is detached; attach() it first",
            (MERGED, "merge"): "it is already merged",
            (ATTACHED, "unmerge"): "it is not merged",
            (DETACHED, "unmerge"): "it is not merged (it is detached)",
        }
        if self._state == UNLOADED:
            raise DeltaStateError(
                f"Cannot {action}() {self._describe()}: merge_and_unload() folded it into the model's weights and "
                f"removed it, so there is nothing left to act on. Load the checkpoint again (or create a new delta) "
                f"on a fresh backbone."
            )
        hint = hints.get((self._state, action), f"it is {self._state}")
        raise DeltaStateError(f"Cannot {action}() {self._describe()}: {hint}.")

    def _describe(self) -> str:
        return f"{type(self).__name__} '{self.child_name}' ({len(self.sites)} sites)"

    def attach(self) -> DeltaBase:
        """Insert the delta into the backbone (again); outputs become exactly the attached ones."""
        self._require("attach", DETACHED)
        for site in self.sites:
            if _attribute_taken(site.host, self.child_name, site.module):
                raise DeltaStateError(
                    f"Cannot attach {self._describe()}: module {site.name!r} already has an attribute "
                    f"{self.child_name!r} (another delta created while this one was detached?). Detach that delta "
                    f"first, or create this delta with another name=."
                )
        if self.shared is not None and hasattr(self.backbone_model, self.shared_name):
            raise DeltaStateError(
                f"Cannot attach {self._describe()}: the backbone already has an attribute {self.shared_name!r}. Detach "
                f"the delta that uses it first, or create this delta with another name=."
            )
        if self._head_copies is not None and _attribute_taken(
            self.backbone_model, self.heads_name, self._head_copies
        ):
            raise DeltaStateError(
                f"Cannot attach {self._describe()}: the backbone already has an attribute {self.heads_name!r}. Detach "
                f"the delta that uses it first, or create this delta with another name=."
            )
        # Only a site that transforms the host output must not end up behind a delta merged later: additive ones
        # (out + f(x)) commute with it, and call rewrites act before the host runs (deltakit/site.py).
        for site in self.sites:
            rewrites = _merged_call_rewrites(site.host)
            if rewrites:
                raise DeltaStateError(
                    f"Cannot attach {self._describe()}: {', '.join(rewrites)} rewrites the input of {site.name!r} and is "
                    f"merged into its weights, so this delta would read the input unrewritten, changing the result. "
                    f"unmerge() that delta first (you can merge it again afterwards)."
                )
            if type(site.module).composition is not Composition.TRANSFORMS_OUTPUT:
                continue
            later = _merged_after(site.host, self._order_key)
            if later:
                raise DeltaStateError(
                    f"Cannot attach {self._describe()}: on {site.name!r} a delta created after it is merged into the "
                    f"weights ({', '.join(later)}), so this one would act on the merged weights instead of before "
                    f"that delta, changing the result. unmerge() that delta first (you can merge it again afterwards)."
                )
        if self.shared is not None:
            self.shared.to(**factory_kwargs(self.sites[0].host))
            self.shared.train(self.backbone_model.training)
            _register_child(self.backbone_model, self.shared_name, self.shared, self._order_key)
        for site in self.sites:
            follow_host(site.module, site.host)
            _register_child(site.host, self.child_name, site.module, self._order_key)
            self._add_site_hooks(site)
        self._attach_heads()
        self._add_checkpointing_hooks()
        self._swap_backbone_tensors()
        self._install_save_pretrained_guard()
        self._state = ATTACHED
        if self._set_state_dict:
            self._install_state_dict_hook()
        self._extra = self.extra_hooks()
        for index, (module, fn, pre) in enumerate(self._extra):
            add_hook(module, (self._order_key, -1 - index), fn, pre=pre)
        self.on_attach()
        return self

    def _head_key(self, index: int) -> tuple[int, int]:
        # After the site slots: unique among this delta's hook keys (heads never share a module with its sites).
        return (self._order_key, len(self.sites) + index)

    def _attach_heads(self) -> None:
        """Register the head copies on the backbone root and hook each original to run its copy instead."""
        heads = self._head_copies
        if heads is None:
            return
        for name in heads.names:
            follow_host(heads.get(name), self._head_originals[name])
        heads.train(self.backbone_model.training)
        _register_child(self.backbone_model, self.heads_name, heads, self._order_key)
        for index, name in enumerate(heads.names):
            add_hook(self._head_originals[name], self._head_key(index), heads.hook(name))

    def _detach_heads(self) -> None:
        heads = self._head_copies
        if heads is None:
            return
        for index, name in enumerate(heads.names):
            remove_hook(self._head_originals[name], self._head_key(index))
        del self.backbone_model._modules[self.heads_name]

    def _install_save_pretrained_guard(self) -> None:
        """Warn when transformers' ``save_pretrained`` saves the backbone while this delta is in it.

        Such files hold the delta's tensors under extra keys that ``from_pretrained`` drops: the model would reload
        without the delta (and without its heads), silently. A state-dict post-hook on the backbone (removed at
        detach, like every deltakit hook) looks for a ``save_pretrained`` call of this model up the stack, so
        ``state_dict()`` taken for anything else (optimizers, DDP, ``torch.save``) stays silent. A warning, not an
        error: transformers has already written ``config.json`` when it asks for the state dict, and an error there
        would leave a half-written directory.
        """
        self._remove_save_pretrained_guard()
        # A partial over this delta (not a closure), so that copy.deepcopy of the model and the delta rebinds it to
        # the copies; torch sets an attribute on the hook, which a bound method would not take.
        hook = functools.partial(type(self)._warn_if_save_pretrained, self)
        self._save_pretrained_handle = self.backbone_model.register_state_dict_post_hook(hook)

    def _warn_if_save_pretrained(self, module: nn.Module, state_dict: Any, prefix: str, local_metadata: Any) -> None:
        if _inside_save_pretrained(self.backbone_model):
            warnings.warn(
                f"save_pretrained() is saving {type(self.backbone_model).__name__} while {self._describe()} is in it: "
                f"the files hold the delta's tensors under extra keys, which from_pretrained() drops, so the saved "
                f"model reloads WITHOUT the delta. To deploy a plain model, call delta.merge_and_unload() first and "
                f"save what it returns; to keep the delta separate, save it with delta.save_finetuned(dir) and the "
                f"backbone after delta.detach().",
                UserWarning,
                stacklevel=2,
            )

    def _remove_save_pretrained_guard(self) -> None:
        if self._save_pretrained_handle is not None:
            self._save_pretrained_handle.remove()
            self._save_pretrained_handle = None

    def _add_checkpointing_hooks(self) -> None:
        # Reentrant activation checkpointing with a frozen embedding would starve the deltas of gradients.
        from .integrations.checkpointing import CheckpointingInputHooks

        if self._checkpointing_hooks is None:
            self._checkpointing_hooks = CheckpointingInputHooks(self.backbone_model)
        self._remove_checkpointing_hooks()
        self._checkpointing_handles = self._checkpointing_hooks.install()

    def _remove_checkpointing_hooks(self) -> None:
        for handle in self._checkpointing_handles:
            handle.remove()
        self._checkpointing_handles = []

    def _hook_key(self, site: Site) -> tuple[int, int]:
        # (creation order, site slot): unique per site, so sites sharing a source module never collide; no object
        # ids, so a deep copy of the model and its delta finds its own entries.
        return (self._order_key, site.slot)

    def _add_site_hooks(self, site: Site) -> None:
        module, key = site.module, self._hook_key(site)
        target = module.hook_module if module.hook_module is not None else site.host
        if module.forward_pre_hook is not None:
            add_hook(target, key, module.forward_pre_hook, pre=True)
        if module.forward_hook is not None:
            add_hook(target, key, module.forward_hook)
        # A site may also read another module's input (a parallel adapter spanning a block).
        if module.input_source is not None:
            add_hook(module.input_source, key, module.capture_input, pre=True)

    def _remove_site_hooks(self, site: Site) -> None:
        module, key = site.module, self._hook_key(site)
        target = module.hook_module if module.hook_module is not None else site.host
        remove_hook(target, key, pre=True)
        remove_hook(target, key)
        if module.input_source is not None:
            remove_hook(module.input_source, key, pre=True)

    def detach(self) -> DeltaBase:
        """Remove the delta: the backbone is bit-for-bit what it was (outputs, state_dict keys, no hooks left).

        Only the delta's own changes are undone: backbone parameters you unfroze and trained yourself (e.g. a
        classifier head kept trainable by ``freeze_module(exclude=[..., "classifier"])``) keep their values.
        """
        self._require("detach", ATTACHED)
        for site in self.sites:
            self._remove_site_hooks(site)
            del site.host._modules[self.child_name]  # what delattr does, without its lookups (switching is hot)
        if self.shared is not None:
            delattr(self.backbone_model, self.shared_name)
        self._detach_heads()
        self._remove_save_pretrained_guard()
        self._remove_state_dict_hook()
        self._remove_checkpointing_hooks()
        self._swap_backbone_tensors()
        self._state = DETACHED
        for index, (module, _, pre) in enumerate(self._extra):
            remove_hook(module, (self._order_key, -1 - index), pre=pre)
        self._extra = []
        self.on_detach()
        return self

    def write_backbone_tensors(self, values: dict[str, torch.Tensor]) -> None:
        """Write backbone tensors a checkpoint declares (a saved head) into the model while this delta is attached.

        The delta owns these values: :meth:`detach` puts the backbone's own values back (bit for bit) and
        :meth:`attach` the delta's again, including any training done on them meanwhile. So loading a checkpoint
        never changes the backbone for good. Used by the checkpoint and PEFT loaders after every check passed.

        Args:
            values: ``{parameter name in the backbone: value}``, shapes already checked.
        """
        self._require("write backbone tensors of", ATTACHED)
        with torch.no_grad():
            for name, value in values.items():
                param = self.backbone_model.get_parameter(name)
                self._swapped_backbone[name] = param.detach().clone()
                param.copy_(value.to(param.dtype))

    def _swap_backbone_tensors(self) -> None:
        """Exchange the backbone tensors a checkpoint wrote with the values kept aside (see write_backbone_tensors)."""
        if not self._swapped_backbone:
            return
        with torch.no_grad():
            for name, other in self._swapped_backbone.items():
                param = self.backbone_model.get_parameter(name)
                current = param.detach().clone()
                param.copy_(other)
                self._swapped_backbone[name] = current

    def merge(self, exact_unmerge: bool = True, *, safe: bool = True) -> DeltaBase:
        """Fold the delta into the host weights and remove its hooks (zero inference overhead).

        Args:
            exact_unmerge: Keep a copy of the touched host tensors so :meth:`unmerge` restores them bit-for-bit
                (costs their memory). With ``False``, unmerge subtracts the delta again: each entry comes back
                within two roundings, ``u * (|W + delta| + |W|)`` (``u`` the dtype's unit roundoff). That is only
                allowed for float32 and wider weights: in float16 / bfloat16 an update larger than the weight's
                entries would round their low bits away for good, so there the merge is refused.
            safe: Check that every merged tensor is finite (no NaN / Inf from a broken delta or an overflow)
                before changing anything, like PEFT's ``safe_merge``. It costs one temporary tensor the size of
                the largest merged weight and one pass over each; ``safe=False`` skips it.

        Raises:
            DeltaStateError: the method is not linear in the weights, the delta is not attached, another delta
                applied before this one on the same module would make the merged result different, an inexact
                merge was asked for a low-precision weight, or (``safe``) a merged weight would not be finite.
                Nothing is changed then.
        """
        _check_flag("merge", "exact_unmerge", exact_unmerge)
        _check_flag("merge", "safe", safe)
        return self._merge(exact_unmerge, safe, keep_original=True)

    def _merge(self, exact_unmerge: bool, safe: bool, *, keep_original: bool) -> DeltaBase:
        """:meth:`merge`; ``keep_original=False`` (for :meth:`merge_and_unload`) keeps no copy of the touched
        tensors and allows any dtype, since nothing will be unmerged."""
        self._require("merge", ATTACHED)
        if not self.sites or type(self.sites[0].module).merge_deltas is None:
            raise DeltaStateError(f"{type(self).__name__} cannot be merged: its delta is not a change of host weights.")
        self._check_hosts_in_place("merge")
        for site in self.sites:
            keys = hook_keys(site.host)
            if type(site.module).composition is Composition.REWRITES_CALL:
                own = self._hook_key(site)
                if any(k != own for k in (*keys, *hook_keys(site.host, pre=True))):
                    raise DeltaStateError(
                        f"Cannot merge {self._describe()}: it rewrites the input of {site.name!r}, which the other "
                        f"deltas there read too; merged, they would read the input unrewritten and the result would "
                        f"change. Detach (or merge) them first."
                    )
                continue
            if keys and keys[0] != self._hook_key(site):
                raise DeltaStateError(
                    f"Cannot merge {self._describe()}: on {site.name!r} another delta is applied before it, so folding "
                    f"this one into the weight would change the result. Merge or detach the earlier delta first."
                )
        with torch.no_grad():
            planned = [(site, site.module.merge_deltas(site.host)) for site in self.sites]  # may raise: no change yet
            self._check_not_tied(planned)
            if not exact_unmerge and keep_original:
                self._check_inexact_allowed(planned)
            if safe:
                self._check_merged_finite(planned)
            for site, deltas in planned:
                backup, versions = {}, {}
                for pname, delta in deltas.items():
                    param = getattr(site.host, pname)
                    if exact_unmerge:
                        backup[pname] = param.detach().clone()
                    before = param._version
                    param.add_(delta.to(param.dtype))
                    versions[pname] = (before, param._version)
                self._merge_backup[id(site.module)] = backup
                site.module.merge_versions = versions
                site.module.__dict__["merged_by"] = (self._order_key, self._describe())
                self._remove_site_hooks(site)
        self._remove_checkpointing_hooks()
        self._merge_exact = exact_unmerge
        # an inexact unmerge subtracts the delta computed again from these: they must not change meanwhile
        self._merged_delta_versions = [p._version for p in self.parameters()]
        self._state = MERGED
        return self

    def merge_and_unload(self, *, safe: bool = True) -> nn.Module:
        """Fold the delta into the backbone's weights and remove everything of deltakit: the plain model, for
        deployment (PEFT's ``merge_and_unload``).

        Afterwards the model holds no delta module, hook or parameter: ``state_dict()`` has exactly the backbone's
        keys, ``save_pretrained`` / ``from_pretrained`` round-trip it, and it computes what the attached delta
        computed (up to the rounding of the folded weights). Head copies (``modules_to_save``) are written into
        their original modules, and backbone tensors a checkpoint wrote (a saved head) stay. The delta object is
        spent: every later action on it raises (the backbone is changed for good; keep the checkpoint).

        Args:
            safe: As for :meth:`merge`: check that every merged weight is finite before changing anything.

        Returns:
            The backbone model (the same object).

        Raises:
            DeltaStateError: The method cannot merge (its delta is not a change of weights, e.g. prefix tuning or
                a soft prompt), the delta is detached, another delta is still in the model, a head shares its
                weights with another module (tied), or a check of :meth:`merge` fails. Nothing is changed then.
        """
        _check_flag("merge_and_unload", "safe", safe)
        self._require("merge_and_unload", ATTACHED, MERGED)
        if not self.sites or type(self.sites[0].module).merge_deltas is None:
            composition = getattr(type(self.sites[0].module), "composition", None) if self.sites else None
            how = f" (it {composition.value})" if isinstance(composition, Composition) else ""
            raise DeltaStateError(
                f"Cannot merge_and_unload() {self._describe()}: {type(self).__name__} is not a change of the host "
                f"weights{how}, so it cannot be folded into them. Deploy the backbone with the delta attached "
                f"(save_finetuned() + AutoDeltaModel.from_pretrained()), or use a mergeable method (LoRA, BitFit, IA3)."
            )
        self._check_only_delta("merge_and_unload")
        self._check_heads_untied()
        if self._state == ATTACHED:
            self._merge(False, safe, keep_original=False)
        self._unload()
        return self.backbone_model

    def _check_only_delta(self, action: str) -> None:
        """Refuse when another delta's modules are in the model (they would stay, or act on folded weights)."""
        own = {id(site.module) for site in self.sites}
        own.update(id(m) for m in (self.shared, self._head_copies) if m is not None)
        others = [n for n, m in self.backbone_model.named_modules() if isinstance(m, DeltaSite) and id(m) not in own]
        if others:
            raise DeltaStateError(
                f"Cannot {action}() {self._describe()}: other deltas are in the model too ({others[:3]}"
                f"{' and more' if len(others) > 3 else ''}), and the result would not be a plain model. Detach them "
                f"(or merge_and_unload() them first)."
            )

    def _check_heads_untied(self) -> None:
        """A head copy is written into its original: a weight the original shares with another module (an
        ``lm_head`` tied to the embeddings) would change that module too."""
        if not self._head_originals:
            return
        owners: dict[int, list[str]] = {}
        for name, param in backbone_parameters(self.backbone_model).items():
            owners.setdefault(id(param), []).append(name)
        for head, original in self._head_originals.items():
            mine = self._head_copies.get(head).state_dict()  # type: ignore[union-attr]
            theirs = original.state_dict()
            resized = [k for k in mine if k in theirs and mine[k].shape != theirs[k].shape]
            if resized:
                key = resized[0]
                raise DeltaStateError(
                    f"Cannot merge_and_unload() {self._describe()}: its head {head!r} has {key} of size "
                    f"{list(mine[key].shape)}, the model's own {list(theirs[key].shape)} (another number of labels), "
                    f"so the plain model's config would not describe it. Build the backbone with the task's labels "
                    f"(AutoDeltaModelForSequenceClassification.from_pretrained(checkpoint) does) and unload there."
                )
            for pname, param in original.named_parameters():
                outside = [n for n in owners.get(id(param), []) if not n.startswith(head + ".")]
                if outside:
                    raise DeltaStateError(
                        f"Cannot merge_and_unload() {self._describe()}: its head {head!r} shares {head}.{pname} with "
                        f"{outside[0]!r} (tied weights); writing the trained copy into it would change that module "
                        f"too. Untie them first, or deploy with the delta attached."
                    )

    def _unload(self) -> None:
        """Remove every deltakit module and hook of this (merged) delta, leaving its effect in the weights."""
        with torch.no_grad():
            for name, original in self._head_originals.items():
                # strict: the copy is a copy of this very module, so the keys and shapes are the same
                original.load_state_dict(self._head_copies.get(name).state_dict(), strict=True)  # type: ignore[union-attr]
        self._detach_heads()
        for site in self.sites:
            site.module.merge_versions = {}
            site.module.__dict__.pop("merged_by", None)
            del site.host._modules[self.child_name]
        if self.shared is not None:
            delattr(self.backbone_model, self.shared_name)
        for index, (module, _, pre) in enumerate(self._extra):
            remove_hook(module, (self._order_key, -1 - index), pre=pre)
        self._extra = []
        self._remove_checkpointing_hooks()
        self._remove_save_pretrained_guard()
        self._remove_state_dict_hook()
        self._swapped_backbone = {}  # the values a checkpoint wrote stay: they are part of the result
        self._merge_backup.clear()
        self._state = UNLOADED

    def _check_inexact_allowed(self, planned: list[tuple[Site, dict[str, torch.Tensor]]]) -> None:
        """Refuse an inexact merge into a weight with fewer significant bits than float32.

        ``(W + d) - d`` rounds twice at the scale of ``|W + d|``: with 8 (bfloat16) or 11 (float16) significant bits
        an update larger than the weight's entries leaves them mostly rounded away (measured: a large LoRA update
        left 74% of a bfloat16 weight's entries at 0, 19% in float16), and nothing could bring them back.
        """
        for site, deltas in planned:
            for pname in deltas:
                dtype = getattr(site.host, pname).dtype
                if dtype.is_floating_point and torch.finfo(dtype).eps > torch.finfo(torch.float32).eps:
                    raise DeltaStateError(
                        f"Cannot merge {self._describe()} with exact_unmerge=False: {site.name}.{pname} is {dtype}, "
                        f"and unmerging by subtracting the delta again would lose the weight's low bits wherever the "
                        f"update is larger than the weight (in {dtype} most entries can come back as 0). Merge with "
                        f"exact_unmerge=True (the default: a copy of the touched tensors restores them bit-for-bit), "
                        f"or cast the model to float32 first."
                    )

    def _check_merged_finite(self, planned: list[tuple[Site, dict[str, torch.Tensor]]]) -> None:
        """Refuse a merge whose result would hold NaN or Inf (checked tensor by tensor, nothing written)."""
        for site, deltas in planned:
            for pname, delta in deltas.items():
                param = getattr(site.host, pname)
                if param.is_meta:
                    continue  # no values to check
                merged = param.detach() + delta.to(param.dtype)  # what add_ will write, bit for bit
                if bool(torch.isfinite(merged).all()):
                    continue
                if not bool(torch.isfinite(param).all()):
                    why = "the host weight itself already holds NaN or Inf"
                elif not bool(torch.isfinite(delta).all()):
                    why = "the delta's update holds NaN or Inf (its parameters are broken, e.g. a diverged training)"
                else:
                    why = f"adding the update overflows {param.dtype} (the update is too large for this dtype)"
                raise DeltaStateError(
                    f"Cannot merge {self._describe()}: {site.name}.{pname} would not be finite after the merge: "
                    f"{why}. Nothing was changed. Check the delta's parameters (torch.isfinite), or keep the delta "
                    f"unmerged; merge(safe=False) skips this check."
                )

    def _check_hosts_in_place(self, action: str) -> None:
        """Refuse when a host is no longer the module at its name (the model replaced it, e.g.
        ``resize_token_embeddings`` on an untied output layer): the delta would act on a module nobody calls."""
        for site in self.sites:
            try:
                current = self.backbone_model.get_submodule(site.name)
            except AttributeError:
                current = None
            if current is not site.host:
                raise DeltaStateError(
                    f"Cannot {action}() {self._describe()}: the module it modified at {site.name!r} is no longer part "
                    f"of the model (it was replaced, e.g. by resize_token_embeddings()), so the delta has no effect. "
                    f"Create deltas after resizing or replacing modules."
                )

    def _check_not_tied(self, planned: list[tuple[Site, dict[str, torch.Tensor]]]) -> None:
        """Refuse to merge into a tensor shared with another module (tied embeddings): both would change."""
        names_by_id: dict[int, list[str]] = {}
        for pname, param in self.backbone_model.named_parameters(remove_duplicate=False):
            names_by_id.setdefault(id(param), []).append(pname)
        for site, deltas in planned:
            for pname in deltas:
                names = names_by_id.get(id(getattr(site.host, pname)), [])
                if len(names) > 1:
                    raise DeltaStateError(
                        f"Cannot merge {self._describe()}: {site.name}.{pname} is shared with "
                        f"{[n for n in names if n != f'{site.name}.{pname}']} (tied weights), so merging would change "
                        f"those modules too. Keep this delta unmerged, or exclude {site.name!r} from it."
                    )

    def unmerge(self) -> DeltaBase:
        """Undo :meth:`merge`: restore the host weights and put the hooks back."""
        self._require("unmerge", MERGED)
        if not self._merge_exact and [p._version for p in self.parameters()] != getattr(
            self, "_merged_delta_versions", None
        ):
            raise DeltaStateError(
                f"Cannot unmerge {self._describe()}: it was merged with exact_unmerge=False, which subtracts the delta "
                f"again, and its own parameters changed since the merge (an optimizer step?), so the subtraction would "
                f"corrupt the backbone weights. Restore the delta's parameters to their merged values first, or merge "
                f"with exact_unmerge=True (the default) next time."
            )
        if self._merge_exact:
            for site in self.sites:
                for pname, (_, after) in site.module.merge_versions.items():
                    if getattr(site.host, pname)._version != after:
                        raise DeltaStateError(
                            f"Cannot unmerge {self._describe()} exactly: {site.name}.{pname} was modified after the "
                            f"merge (another delta merged later, or an optimizer step). Unmerge deltas in reverse "
                            f"merge order, or merge with exact_unmerge=False."
                        )
        with torch.no_grad():
            for site in self.sites:
                if self._merge_exact:
                    for pname, original in self._merge_backup[id(site.module)].items():
                        param = getattr(site.host, pname)
                        param.copy_(original)
                        self._hand_back_version(site, pname, site.module.merge_versions[pname][0], param._version)
                else:
                    for pname, delta in site.module.merge_deltas(site.host).items():
                        param = getattr(site.host, pname)
                        param.sub_(delta.to(param.dtype))
                        # The tensor is now what the previous merge on this host left, up to the rounding of this
                        # add-and-subtract: that merge may be unmerged in turn (an exact one restores its copy).
                        self._hand_back_version(site, pname, site.module.merge_versions[pname][0], param._version)
                site.module.merge_versions = {}
                site.module.__dict__.pop("merged_by", None)
                self._add_site_hooks(site)
        self._add_checkpointing_hooks()
        self._merge_backup.clear()
        self._state = ATTACHED
        return self

    @staticmethod
    def _hand_back_version(site: Site, pname: str, before: int, now: int) -> None:
        """After an unmerge the tensor is what the previous merge on this host left (bit-for-bit after an exact
        unmerge, up to rounding after an inexact one); tell that merge, so it can be unmerged in turn
        (``_version`` counts every in-place write)."""
        for other in site.host.children():
            versions = getattr(other, "merge_versions", None)
            if other is not site.module and isinstance(other, DeltaSite) and versions and pname in versions:
                if versions[pname][1] == before:
                    versions[pname] = (versions[pname][0], now)

    # ------------------------------------------------------------------ copying
    def __deepcopy__(self, memo: dict[int, Any]) -> DeltaBase:
        """``copy.deepcopy`` of a delta, alone or together with its model (``copy.deepcopy((model, delta))``).

        The copy is a full, independent delta on the copy of the backbone (a delta always copies its backbone with
        it; deep-copying the model and the delta in one call shares that copy): it can be detached, attached,
        merged, unmerged and saved like the original, in any state. Bookkeeping that refers to particular tensors
        (merge backups, in-place version counters, which start again at 0 in a copy) is translated to the copy.
        Pickling (``torch.save`` of a delta object) is not supported the same way: save deltas with
        :meth:`save_finetuned`.
        """
        cls = type(self)
        new = cls.__new__(cls)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            new.__dict__[key] = copy.deepcopy(value, memo)
        new._translate_copied_bookkeeping(self)
        return new

    def _translate_copied_bookkeeping(self, original: DeltaBase) -> None:
        """Make id- and version-based records (copied verbatim) describe this copy's own tensors."""
        backups = self._merge_backup
        self._merge_backup = {}
        for old, new in zip(original.sites, self.sites):
            if id(old.module) in backups:
                self._merge_backup[id(new.module)] = backups[id(old.module)]
            # A tensor's copy restarts its version counter: shift the records by the same amount, so "modified
            # since the merge" stays true exactly when it was true of the original.
            versions = {}
            for pname, (before, after) in new.module.merge_versions.items():
                shift = getattr(new.host, pname)._version - getattr(old.host, pname)._version
                versions[pname] = (before + shift, after + shift)
            new.module.merge_versions = versions
        recorded = getattr(original, "_merged_delta_versions", None)
        if recorded is not None:
            unchanged = [p._version for p in original.parameters()] == recorded
            self._merged_delta_versions = [p._version for p in self.parameters()] if unchanged else None

    # ------------------------------------------------------------------ parameters
    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """This delta's own parameters, named as in the backbone while attached (``<host>.<child>.<param>``)."""
        seen: set[int] = set()
        for site in self.sites:
            for pname, param in site.module.named_parameters():
                if id(param) not in seen:
                    seen.add(id(param))
                    yield f"{site.name}.{self.child_name}.{pname}", param
        if self.shared is not None:
            for pname, param in self.shared.named_parameters():
                if id(param) not in seen:
                    seen.add(id(param))
                    yield f"{self.shared_name}.{pname}", param
        if self._head_copies is not None:
            for pname, param in self._head_copies.named_parameters():
                if id(param) not in seen:
                    seen.add(id(param))
                    yield f"{self.heads_name}.{pname}", param

    def parameters(self) -> Iterator[nn.Parameter]:
        """This delta's own parameters (pass them to an optimizer)."""
        for _, param in self.named_parameters():
            yield param

    def num_delta_parameters(self) -> int:
        """Number of scalar parameters this delta adds."""
        return sum(p.numel() for p in self.parameters())

    def delta_state_dict(self) -> dict[str, torch.Tensor]:
        """This delta's tensors keyed as in its checkpoint: ``<host>.<delta_type>.<param>``, shared tensors
        (stored once) as ``<delta_type>_shared.<param>`` and head copies as ``<delta_type>_heads.<module>.<param>``."""
        out: dict[str, torch.Tensor] = {}
        for site in self.sites:
            for pname, tensor in site.module.state_dict().items():
                out[site_tensor_key(site.name, self.delta_type, pname)] = tensor
        if self.shared is not None:
            for pname, tensor in self.shared.state_dict().items():
                out[shared_tensor_key(self.delta_type, pname)] = tensor
        if self._head_copies is not None:
            for pname, tensor in self._head_copies.state_dict().items():
                out[head_tensor_key(self.delta_type, pname)] = tensor
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Alias of :meth:`delta_state_dict` (what :meth:`save_finetuned` stores, besides unfrozen tensors)."""
        return self.delta_state_dict()

    def num_trainable_parameters(self, module: nn.Module | None = None) -> int:
        """Number of trainable scalars in ``module``; without it, in this delta itself (its sites, shared parameters
        and head copies), as OpenDelta counted. Pass the model to count everything an optimizer over
        ``model.parameters()`` would train (heads kept trainable in place included)."""
        params = self.parameters() if module is None else module.parameters()
        return sum(p.numel() for p in params if p.requires_grad)

    def num_total_parameters(self, module: nn.Module | None = None) -> int:
        """Number of scalars in ``module``; without it, in this delta itself (as OpenDelta counted; the same as
        :meth:`num_delta_parameters`). Pass the model for the whole model, attached deltas included."""
        params = self.parameters() if module is None else module.parameters()
        return sum(p.numel() for p in params)

    def trainable_parameters_summary(self) -> str:
        """The line :meth:`print_trainable_parameters` prints (see there)."""
        trainable = self.num_trainable_parameters(self.backbone_model)
        total = self.num_total_parameters(self.backbone_model)
        own = self.num_delta_parameters()
        backbone = sum(p.numel() for p in backbone_parameters(self.backbone_model).values())
        line = (
            f"trainable params: {trainable:,} || all params: {total:,} || "
            f"trainable%: {100 * trainable / total if total else 0.0:.4f} || "
            f"delta params: {own:,} ({100 * own / backbone if backbone else 0.0:.4f}% of the backbone's {backbone:,})"
        )
        if self._state not in (ATTACHED, MERGED):
            line += f" [{self._state}: the delta is not in the model]"
        return line

    def print_trainable_parameters(self) -> None:
        """Print PEFT's one-line summary, plus the delta's own share:

        ``trainable params: 73,728 || all params: 22,787,330 || trainable%: 0.3236 || delta params: 73,728 (0.3246%
        of the backbone's 22,713,602)``

        *trainable* and *all* count the model as it is now (attached deltas included, what an optimizer over
        ``model.parameters()`` would see); *delta params* is this delta's own size (sites, shared parameters and
        head copies) over the backbone's own parameters (no delta counted). :meth:`log` prints the full table.
        """
        print(self.trainable_parameters_summary())  # the point of the method, like PEFT's

    def trainable_parameters_names(self, module: nn.Module | None = None) -> list[str]:
        """Names of the trainable parameters of ``module`` (default: the backbone)."""
        module = self.backbone_model if module is None else module
        return [n for n, p in module.named_parameters() if p.requires_grad]

    # ------------------------------------------------------------------ freezing
    def freeze_module(
        self,
        module: nn.Module | None = None,
        exclude: Iterable[str] | None = None,
        set_state_dict: bool = False,
    ) -> None:
        """Freeze every parameter of the backbone except those named in ``exclude``.

        Trainability is decided by parameter identity, so tied or shared parameters are handled consistently, and
        calling it again with the same arguments changes nothing.

        Args:
            module: The module to freeze (default: the backbone).
            exclude: What stays trainable: ``"deltas"`` (this delta's parameters), other delta objects (their
                parameters: ``exclude=["deltas", other_delta]`` trains both) and module name patterns in the
                ``modified_modules`` syntax (e.g. ``"classifier"``). Default: the config's ``unfrozen_modules``
                (``["deltas"]``). Parameters of modules kept trainable here are saved by :meth:`save_finetuned`,
                and the patterns become the config's ``unfrozen_modules`` (so the saved config says what was
                trained). A module the delta carries a copy of (``modules_to_save``) is trained through
                ``"deltas"`` and may not be named here.
            set_state_dict: Make ``backbone_model.state_dict()`` return only the trainable tensors (through a
                removable state-dict hook, undone by :meth:`detach`), so tools that save ``state_dict()`` save
                only the delta.
        """
        module = self.backbone_model if module is None else module
        if not isinstance(module, nn.Module):
            raise DeltaError(f"freeze_module(module=...) must be an nn.Module or None, got {type(module).__name__}.")
        explicit = exclude is not None
        exclude = self._exclude_list(exclude)
        _check_flag("freeze_module", "set_state_dict", set_state_dict)
        # Resolve every pattern before changing any requires_grad flag: a bad one leaves the model as it was.
        resolved = [
            (pattern, None if pattern == "deltas" or isinstance(pattern, DeltaBase) else find_modules(
                module, [pattern], what="freeze_module exclude", skip_types=(DeltaSite,)))
            for pattern in exclude
        ]
        self._refuse_head_originals(resolved)
        keep: set[int] = set()
        backbone_keep: set[int] = set()
        for pattern, matches in resolved:
            if pattern == "deltas":
                keep.update(id(p) for p in self.parameters())
                continue
            if isinstance(pattern, DeltaBase):  # another delta on this backbone stays trainable too
                keep.update(id(p) for p in pattern.parameters())
                continue
            for _, matched in matches or ():
                ids = {id(p) for p in matched.parameters()}
                keep.update(ids)
                backbone_keep.update(ids)
        for param in module.parameters():
            param.requires_grad_(id(param) in keep)
        self.unfrozen_parameter_names = [
            n for n, p in backbone_parameters(self.backbone_model).items() if id(p) in backbone_keep
        ]
        patterns = [p for p in exclude if isinstance(p, str)]
        if explicit and patterns != self.config.unfrozen_modules:
            # A new config object: the one passed in may be shared with other deltas (from_config twice).
            self.config = dataclasses.replace(self.config, unfrozen_modules=patterns)
        self._set_state_dict = bool(set_state_dict)
        self._remove_state_dict_hook()
        if self._set_state_dict and self._state != DETACHED:
            self._install_state_dict_hook()

    def _refuse_head_originals(self, resolved: list[tuple[Any, list[tuple[str, nn.Module]] | None]]) -> None:
        """A module this delta carries a copy of is replaced by the copy: unfreezing the original would train
        (and save, and refuse in a DeltaGroup) a module whose output is never used."""
        originals = {id(m): n for n, m in self._head_originals.items()}
        for pattern, matches in resolved:
            for name, matched in matches or ():
                inner = [originals[id(m)] for m in matched.modules() if id(m) in originals]
                if inner:
                    raise DeltaError(
                        f"freeze_module(exclude=[..., {pattern!r}]) names {name!r}, but {self._describe()} carries its "
                        f"own copy of {inner[0]!r} (modules_to_save), which is what runs and is trained with "
                        f"\"deltas\". Drop {pattern!r} from exclude."
                    )

    def _exclude_list(self, exclude: Any) -> list[str | DeltaBase]:
        """``freeze_module``'s ``exclude`` as a list of patterns and delta objects (checked)."""
        if exclude is None:
            return list(self.config.unfrozen_modules or ["deltas"])
        items = [exclude] if isinstance(exclude, (str, DeltaBase)) else exclude
        if not isinstance(items, (list, tuple, set, frozenset)) or not all(
            (isinstance(e, str) and e) or isinstance(e, DeltaBase) for e in items
        ):
            raise DeltaError(
                f"freeze_module(exclude=...) must be a list of module name patterns, \"deltas\" and delta objects, "
                f"got {exclude!r:.120} ({type(exclude).__name__}). Example: exclude=['deltas', 'classifier']."
            )
        return list(items)

    def _install_state_dict_hook(self) -> None:
        backbone = self.backbone_model

        def keep_trainable_only(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
            trainable = {prefix + n for n, p in backbone.named_parameters(remove_duplicate=False) if p.requires_grad}
            for key in [k for k in state_dict if k.startswith(prefix) and k not in trainable]:
                del state_dict[key]

        self._remove_state_dict_hook()
        self._state_dict_handle = backbone.register_state_dict_post_hook(keep_trainable_only)

    def _remove_state_dict_hook(self) -> None:
        if self._state_dict_handle is not None:
            self._state_dict_handle.remove()
            self._state_dict_handle = None

    # ------------------------------------------------------------------ saving and showing
    def save_finetuned(self, path: str | os.PathLike[str], *, overwrite: bool = True) -> str:
        """Write ``delta_config.json`` + ``delta_model.safetensors`` (only delta and explicitly unfrozen tensors).

        Files are written to temporary names and renamed into place. Returns the directory path.
        """
        from .checkpoint import save_delta

        return save_delta(self, path, overwrite=overwrite)

    def log(self, visualization: bool = True, delta_ratio: bool = True, trainable_ratio: bool = True) -> None:
        """Print the backbone's structure tree (delta parameters highlighted) and a parameter-count table."""
        from .visualization import log_delta

        log_delta(self, visualization=visualization, delta_ratio=delta_ratio, trainable_ratio=trainable_ratio)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.child_name!r}, state={self._state!r}, sites={len(self.sites)}, "
            f"parameters={self.num_delta_parameters()})"
        )
