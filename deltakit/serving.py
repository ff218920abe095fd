"""Multi-task serving: many named deltas on one backbone, fast switching, and per-sample routing.

A :class:`DeltaGroup` is a plain object the user holds: it maps names to delta objects built on one backbone. It
puts nothing on the model, so the model's ``state_dict``, copies and wrappers are unaffected, and dropping the
group drops its deltas (see docs/serving.md for the reasons).

* :meth:`DeltaGroup.switch` makes one delta the active one: a detach plus an attach, which move existing modules
  and hook entries around (no allocation, no copy of weights, O(sites) Python work).
* :meth:`DeltaGroup.route` runs one batch in which row ``i`` uses delta ``names[i]``. On every modified module one
  :class:`SiteRouter` per kind of delta stacks the factors of all the group's deltas there (plus an all-zero slot
  for rows routed to no delta), gathers each row's factors by index and applies them with batched matmuls: one
  pass for all deltas, not one pass per delta. The per-method routers live next to their methods
  (``LoraRouter`` in deltas/lora.py, ...); a per-site module opts in with a ``router`` class attribute.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Hashable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .base import ATTACHED, DETACHED, MERGED, DeltaBase, factory_kwargs
from .errors import DeltaError, DeltaStateError
from .hooks import DeltaSite, add_hook, hook_keys, remove_hook

__all__ = ["DeltaGroup", "SiteRouter"]


class SiteRouter:
    """Applies, on one host module, the per-site modules of several deltas of one kind, each row with its own.

    Subclasses implement :meth:`build` (stack the sites' factors, with a last all-zero slot) and :meth:`apply`
    (the routed forward hook given the stack and each row's slot). A router is created by :class:`DeltaGroup`;
    while a :meth:`DeltaGroup.route` block is open, its :meth:`forward_hook` sits in the host's deltakit hook.

    Args:
        host: The modified module.
        host_name: Its full name in the backbone (for error messages).
        entries: ``(delta, per-site module)`` pairs, in slot order.
    """

    #: Set by routers that read another module's input (a parallel adapter); :meth:`capture_input` is hooked there.
    source: nn.Module | None = None

    def __init__(self, host: nn.Module, host_name: str, entries: list[tuple[DeltaBase, DeltaSite]]) -> None:
        self.host = host
        self.host_name = host_name
        self.deltas = [d for d, _ in entries]
        self.sites = [s for _, s in entries]
        self.zero_slot = len(entries)
        # Where each parameter lives ((module, name)), so that a parameter object replaced by another (e.g.
        # load_state_dict(..., assign=True)) is noticed, not only in-place changes of the old one.
        sources: list[tuple[nn.Module, str]] = []
        seen: set[int] = set()
        for delta, site in entries:
            owners = [site, *([delta.shared] if delta.shared is not None else [])]
            for owner in owners:
                for module in owner.modules():
                    for pname, p in module._parameters.items():
                        if p is not None and id(p) not in seen:
                            seen.add(id(p))
                            sources.append((module, pname))
        self._sources = sources
        self.params = self._current_params()
        self._ids = list(map(id, self.params))
        self._stack: dict[str, torch.Tensor] | None = None
        self._stamp: tuple[Any, ...] | None = None
        self.slots: torch.Tensor | None = None
        self._expanded: dict[tuple[int, torch.device | None], torch.Tensor] = {}
        self._captured: torch.Tensor | None = None
        # Gathered per-row factors kept between forward calls of one route() block (see gather()).
        self._gathered: dict[str, tuple[torch.Tensor, torch.Tensor, bool, torch.Tensor | None]] = {}
        self._budget: _GatherBudget | None = None

    # -------------------------------------------------------------- stacks
    def build(self) -> dict[str, torch.Tensor]:
        """Stack the sites' factors (slot ``k`` = ``self.sites[k]``, last slot all zero)."""
        raise NotImplementedError

    def apply(
        self, stack: dict[str, torch.Tensor], slots: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any],
        output: Any,
    ) -> Any:
        """The host's new output, row ``j`` computed with slot ``slots[j]``."""
        raise NotImplementedError

    def _target(self) -> dict[str, Any]:
        return factory_kwargs(self.host)

    def _current_params(self) -> list[torch.Tensor]:
        return [module._parameters[pname] for module, pname in self._sources]

    def sync_params(self) -> None:
        """Follow parameter objects replaced since the last block (``load_state_dict(..., assign=True)``): the
        stack is rebuilt from the new ones."""
        current = self._current_params()
        ids = list(map(id, current))
        if ids != self._ids:
            self.params, self._ids = current, ids  # holding the new objects keeps the ids unique
            self._stack = None

    def stack(self) -> dict[str, torch.Tensor]:
        """The stacked factors, rebuilt when a parameter changed (version counter, storage, device or dtype).

        With autograd on and a trainable delta parameter, the stack is built differentiably at every call (so
        gradients reach the deltas) and not cached.
        """
        params = self.params  # current objects: sync_params() runs when a route() block opens
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return {k: v.to(**self._target()) for k, v in self.build().items()}
        host_param = next((p for p in self.host._parameters.values() if p is not None), None)
        stamp = (
            [p._version for p in params],
            params[0].data_ptr() if params else 0,
            None if host_param is None else (host_param.dtype, host_param.device),
        )
        if self._stack is None or stamp != self._stamp:
            # Plain tensors (not inference tensors), so they can serve inside and outside inference_mode.
            with torch.inference_mode(False), torch.no_grad():
                self._stack = {k: v.to(**self._target()).contiguous() for k, v in self.build().items()}
            self._stamp = stamp
        return self._stack

    # -------------------------------------------------------------- rows
    def rows(self, n: int, device: torch.device | None = None) -> torch.Tensor:
        """Each of ``n`` rows' slot (on ``device``): ``n`` is the batch size, or ``k`` times it (each sample repeated
        ``k`` times in a row, as ``generate()`` expands for ``num_beams`` / ``num_return_sequences``)."""
        slots = self.slots
        assert slots is not None
        key = (n, device)
        cached = self._expanded.get(key)
        if cached is not None:
            return cached
        batch = slots.shape[0]
        if n % batch:
            raise DeltaError(
                f"DeltaGroup.route() was given {batch} names, but {self.host_name!r} received a batch of {n} "
                f"rows (not a multiple of {batch}). Pass one name per sample of the batch, with the batch on dim 0."
            )
        expanded = slots if n == batch else slots.repeat_interleave(n // batch)
        expanded = self._expanded[key] = expanded.to(device) if device is not None else expanded
        return expanded

    def gather(self, stack: dict[str, torch.Tensor], key: str, slots: torch.Tensor) -> torch.Tensor:
        """``stack[key][slots]``: each row's factors, copied out of the stack.

        ``generate()`` calls the model once per token with the same rows, so inside one :meth:`DeltaGroup.route`
        block the copy is kept from the second identical call on (same stack tensor, same slots, same inference
        mode) while the block's ``gather_cache_mb`` allows; a single forward pass keeps nothing. A rebuilt stack
        (changed parameters) is a new tensor and is gathered afresh.
        """
        source = stack[key]
        inference = torch.is_inference_mode_enabled()
        entry = self._gathered.get(key)
        if entry is not None and entry[0] is source and entry[1] is slots and entry[2] == inference:
            if entry[3] is not None:
                return entry[3]
            gathered = source.index_select(0, slots)
            if self._budget is not None and self._budget.take(gathered.nbytes):
                self._gathered[key] = (source, slots, inference, gathered)
            return gathered
        gathered = source.index_select(0, slots)
        if self._budget is not None and not source.requires_grad:
            self._gathered[key] = (source, slots, inference, None)  # seen once: keep it if it comes again
        return gathered

    def _reset(self) -> None:
        """Forget everything tied to one route() block."""
        self.slots = None
        self._expanded = {}
        self._captured = None
        self._gathered = {}
        self._budget = None

    def _check_mode(self, module: nn.Module) -> None:
        if module.training:
            raise DeltaStateError(
                f"Per-sample routing is for inference: {self.host_name!r} is in training mode. Call model.eval() "
                f"(train each delta on its own, attached with DeltaGroup.switch())."
            )

    def forward_hook(self, host: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        """The routed forward hook (installed by :meth:`DeltaGroup.route`)."""
        self._check_mode(host)
        first = self._captured if self.source is not None else (args[0] if args else next(iter(kwargs.values())))
        stack = self.stack()
        slots = self.rows(first.shape[0], next(iter(stack.values())).device)
        return self.apply(stack, slots, args, kwargs, output)

    def capture_input(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
        """Forward pre-hook on :attr:`source`: remember its input for :meth:`forward_hook`."""
        self._captured = args[0] if args else next(iter(kwargs.values()))
        return args, kwargs


class _GatherBudget:
    """Bytes one route() block may still spend on kept gathered factors (shared by its routers)."""

    def __init__(self, megabytes: float) -> None:
        self.left = float(megabytes) * 2**20  # float: inf means no limit

    def take(self, nbytes: int) -> bool:
        if nbytes > self.left:
            return False
        self.left -= nbytes
        return True


def _router_key(site: DeltaSite) -> Hashable:
    key_fn = getattr(type(site), "routing_key", None)
    return (type(site).router, key_fn(site) if key_fn is not None else ())  # type: ignore[attr-defined]


class DeltaGroup:
    """Named deltas on one backbone: look-up by name, fast switching, per-sample routing.

    Example:
        >>> group = DeltaGroup(model)
        >>> group.load("sentiment", "ckpt/sentiment")
        >>> group.load("topic", "ckpt/topic")
        >>> group.switch("topic")                  # only "topic" is active
        >>> with torch.inference_mode(), group.route(["sentiment", None, "topic"]):
        ...     logits = model(**batch).logits      # row i uses names[i]; None: the backbone alone

    Args:
        backbone_model: The model every delta of the group is built on.
    """

    def __init__(self, backbone_model: nn.Module) -> None:
        if not isinstance(backbone_model, nn.Module):
            raise DeltaError(f"DeltaGroup needs the backbone nn.Module, got {type(backbone_model).__name__}.")
        self.backbone_model = backbone_model
        self._deltas: dict[str, DeltaBase] = {}
        self._routing = False
        self._routers: list[SiteRouter] | None = None
        self._routable: list[str] = []

    # -------------------------------------------------------------- membership
    def _check_not_routing(self, action: str) -> None:
        if self._routing:
            raise DeltaStateError(f"Cannot {action} inside a DeltaGroup.route() block; leave the block first.")

    def _check_new_name(self, name: Any) -> None:
        if not isinstance(name, str) or not name.isidentifier():
            raise DeltaError(f"Delta name {name!r} must be a Python identifier (it becomes a child module name).")
        if name in self._deltas:
            raise DeltaError(f"The group already has a delta named {name!r}; remove() it first or choose another name.")

    def add(self, delta: DeltaBase, name: str | None = None) -> DeltaBase:
        """Adopt a delta built on this group's backbone; its group name is its ``name=`` (child-module name).

        Args:
            delta: The delta object (any state).
            name: If given, must equal ``delta.name`` (a check, since the name is fixed at creation).

        Returns:
            ``delta``.
        """
        self._check_not_routing("add() a delta")
        if not isinstance(delta, DeltaBase):
            raise DeltaError(f"DeltaGroup.add() needs a delta object (LoraModel, ...), got {type(delta).__name__}.")
        if delta.backbone_model is not self.backbone_model:
            raise DeltaError(
                f"{delta._describe()} is built on another model than this group's backbone "
                f"({type(self.backbone_model).__name__} at {id(self.backbone_model):#x}); create it on the group's "
                f"backbone."
            )
        if name is not None and name != delta.child_name:
            raise DeltaError(
                f"{delta._describe()} is named {delta.child_name!r}, not {name!r}: a delta's name is fixed when it is "
                f"created (name=...). Add it without name= or create it with name={name!r}."
            )
        if any(d is delta for d in self._deltas.values()):
            raise DeltaError(f"{delta._describe()} is already in the group.")
        self._check_new_name(delta.child_name)
        self._deltas[delta.child_name] = delta
        self._routers = None
        return delta

    def load(
        self, name: str, path: str | os.PathLike[str], *, attach: bool = False, check_backbone: bool = True
    ) -> DeltaBase:
        """Load a checkpoint written by ``save_finetuned`` onto the backbone under ``name`` and add it.

        Args:
            name: Group name and child-module name of the delta.
            path: The checkpoint directory.
            attach: Leave the delta attached (default: detached; use :meth:`switch`).
            check_backbone: See :meth:`DeltaBase.from_finetuned`.

        Returns:
            The loaded delta.

        Raises:
            CheckpointError: The checkpoint is invalid (nothing changed).
            DeltaError: The name is taken, or the checkpoint carries backbone tensors (e.g. a classifier head kept
                trainable): on a shared backbone they would overwrite each other's.
        """
        from .checkpoint import load_delta, read_checkpoint_meta

        self._check_not_routing("load() a delta")
        self._check_new_name(name)
        meta = read_checkpoint_meta(path)
        if meta["backbone_tensors"]:
            raise DeltaError(
                f"The checkpoint {os.fspath(path)!r} also holds backbone tensors {meta['backbone_tensors'][:3]}: "
                f"deltas sharing one backbone would overwrite each other's copies. Keep task-specific weights in "
                f"the delta (e.g. LoRA on the 'classifier' Linear) or load it with AutoDeltaModel.from_finetuned "
                f"on its own backbone."
            )
        delta = load_delta(path, self.backbone_model, check_backbone=check_backbone, name=name)
        if not attach:
            delta.detach()
        self._deltas[name] = delta
        self._routers = None
        return delta

    def remove(self, name: str) -> DeltaBase:
        """Detach (if attached) and forget the delta ``name``; returns it. A merged delta must be unmerged first."""
        self._check_not_routing("remove() a delta")
        delta = self[name]
        if delta.state == MERGED:
            raise DeltaStateError(
                f"Cannot remove {delta._describe()} from the group: it is merged; unmerge() it first."
            )
        if delta.state == ATTACHED:
            delta.detach()
        del self._deltas[name]
        self._routers = None
        return delta

    def __getitem__(self, name: str) -> DeltaBase:
        try:
            return self._deltas[name]
        except KeyError:
            raise DeltaError(f"The group has no delta named {name!r}; it has {self.names}.") from None

    def __contains__(self, name: object) -> bool:
        return name in self._deltas

    def __len__(self) -> int:
        return len(self._deltas)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._deltas))

    @property
    def names(self) -> list[str]:
        """The deltas' names, in the order they were added."""
        return list(self._deltas)

    @property
    def active(self) -> list[str]:
        """Names of the group's deltas that currently change the model (attached or merged)."""
        return [n for n, d in self._deltas.items() if d.state != DETACHED]

    def __repr__(self) -> str:
        return f"DeltaGroup({type(self.backbone_model).__name__}, deltas={self.names}, active={self.active})"

    # -------------------------------------------------------------- switching
    def switch(self, name: str | None) -> DeltaBase | None:
        """Make ``name`` the only active delta of the group (``None``: the bare backbone).

        Detaches the group's other attached deltas and attaches ``name``: existing modules and hook entries are
        moved, nothing is allocated or copied. Deltas outside the group are left as they are.

        Returns:
            The now active delta, or ``None``.
        """
        self._check_not_routing("switch()")
        target = None if name is None else self[name]
        merged = [n for n, d in self._deltas.items() if d.state == MERGED and d is not target]
        if merged:
            raise DeltaStateError(
                f"Cannot switch to {name!r}: group delta(s) {merged} are merged into the weights; unmerge() them first."
            )
        detached = []
        for delta in self._deltas.values():
            if delta is not target and delta._state == ATTACHED:
                delta.detach()
                detached.append(delta)
        if target is not None and target.state == DETACHED:
            try:
                target.attach()
            except Exception:
                for delta in sorted(detached, key=lambda d: d._order_key):  # refused: put everything back
                    delta.attach()
                raise
        return target

    def refresh(self) -> None:
        """Drop the stacked factors kept for :meth:`route`, so the next routed call rebuilds them.

        Stacks follow parameter changes by themselves (in-place version counters, replaced parameter objects, device
        and dtype moves). Writes through ``param.data`` bypass version counters, as they bypass autograd: after
        such an edit call ``refresh()``.
        """
        for router in self._routers or []:
            router.sync_params()
            router._stack = None
            router._stamp = None

    # -------------------------------------------------------------- routing
    def _build_routers(self) -> list[SiteRouter]:
        groups: dict[tuple[int, Hashable], tuple[nn.Module, str, list[tuple[DeltaBase, DeltaSite]]]] = {}
        routable: list[str] = []
        for name, delta in self._deltas.items():
            if not delta.sites or not all(getattr(type(s.module), "router", None) for s in delta.sites):
                continue
            routable.append(name)
            for site in delta.sites:
                key = (id(site.host), _router_key(site.module))
                groups.setdefault(key, (site.host, site.name, []))[2].append((delta, site.module))
        routers = []
        for (_, (router_cls, _)), (host, host_name, entries) in groups.items():
            routers.append(router_cls(host, host_name, entries))
        self._routable = routable
        return routers

    @staticmethod
    def _check_outside_order(active: list[SiteRouter]) -> None:
        """A router applies all its deltas at one place in the host's order; a delta outside the group attached
        on the same host and created between two of them would run on the wrong side of some (unless all of them
        only add a function of the host's input, which commutes)."""
        for router in active:
            keys = [d._order_key for d in router.deltas]
            between = [k for k in hook_keys(router.host) if min(keys) < k[0] < max(keys)]
            if not between:
                continue
            children = {id(child): child for child in router.host._modules.values()}
            modules = [*router.sites, *(children.get(k[1]) for k in between)]
            if not all(getattr(type(m), "merge_deltas", None) is not None for m in modules):
                raise DeltaStateError(
                    f"route(): on {router.host_name!r} a delta outside the group is attached and was created between "
                    f"group deltas, so routing (which applies the group's deltas at one place) would change the "
                    f"order for some rows. Detach it, or add it to the group."
                )

    @contextlib.contextmanager
    def route(self, names: Sequence[str | None], *, gather_cache_mb: float = 256) -> Iterator[DeltaGroup]:
        """Per-sample routing: inside the block, row ``i`` of each batch runs with delta ``names[i]``.

        ``None`` routes a row to the bare backbone. Works in ``forward`` and in ``generate()`` (greedy, beam search,
        sampling): a module that sees ``k * len(names)`` rows routes row ``j`` to ``names[j // k]``. While the
        block is open the group's attached deltas are detached (each row sees only its own delta) and they are
        re-attached on exit. Inference only (eval mode).

        Each modified module gathers every row's factors from its stack before its batched matmuls. From the
        second forward call with the same rows on (``generate()``'s decoding steps) the gathered factors are kept
        for the rest of the block, up to ``gather_cache_mb`` in all, which about halves the routing cost of a
        decoding step; a single forward pass keeps nothing.

        Args:
            names: One delta name (or ``None``) per sample of the batch.
            gather_cache_mb: Memory (MiB) the block may use to keep gathered factors between forward calls;
                ``0`` gathers at every call. Freed when the block exits.

        Raises:
            DeltaError: unknown name, a delta of a method without routing support, a batch of the wrong size, a
                negative ``gather_cache_mb``.
            DeltaStateError: training mode, a merged group delta, nested ``route()``.
        """
        if self._routing:
            raise DeltaStateError("DeltaGroup.route() blocks cannot be nested.")
        if isinstance(names, str) or not isinstance(names, Sequence) or len(names) == 0:
            raise DeltaError(f"route() needs a non-empty list with one delta name (or None) per sample, got {names!r}.")
        if isinstance(gather_cache_mb, bool) or not isinstance(gather_cache_mb, (int, float)) or not (
            gather_cache_mb >= 0
        ):
            raise DeltaError(
                f"route(): gather_cache_mb must be a number of MiB >= 0 (0 disables keeping gathered factors), "
                f"got {gather_cache_mb!r}."
            )
        unknown = sorted({n for n in names if n is not None and n not in self._deltas}, key=str)
        if unknown:
            raise DeltaError(f"route(): the group has no delta named {unknown}; it has {self.names}.")
        if self.backbone_model.training:
            raise DeltaStateError(
                "Per-sample routing is for inference: the model is in training mode. Call model.eval() first."
            )
        merged = [n for n, d in self._deltas.items() if d.state == MERGED]
        if merged:
            raise DeltaStateError(
                f"Cannot route while group delta(s) {merged} are merged into the weights (they would apply to every "
                f"sample); unmerge() them first."
            )
        if self._routers is None:
            self._routers = self._build_routers()
        used = {n for n in names if n is not None}
        unroutable = sorted(used - set(self._routable))
        if unroutable:
            kinds = sorted({type(self._deltas[n]).__name__ for n in unroutable})
            raise DeltaError(
                f"route(): delta(s) {unroutable} ({', '.join(kinds)}) do not support per-sample routing (supported: "
                f"LoRA, BitFit, Adapter, ParallelAdapter, LowRankAdapter, Compacter). Serve them with switch()."
            )

        active: list[SiteRouter] = []
        budget = _GatherBudget(gather_cache_mb) if gather_cache_mb > 0 else None
        by_members: dict[tuple[str, ...], torch.Tensor | None] = {}  # most modules hold the same deltas
        for router in self._routers:
            members = tuple(d.child_name for d in router.deltas)
            if members not in by_members:
                slot_of = {n: k for k, n in enumerate(members)}
                slots = [slot_of.get(n, router.zero_slot) for n in names]  # type: ignore[arg-type]
                hit = any(k != router.zero_slot for k in slots)
                by_members[members] = torch.tensor(slots, dtype=torch.long) if hit else None
            routed = by_members[members]
            if routed is not None:
                router._reset()
                router.sync_params()
                router.slots = routed
                router._budget = budget
                active.append(router)

        reattach = [d for d in self._deltas.values() if d.state == ATTACHED]
        for delta in reattach:
            delta.detach()
        try:
            self._check_outside_order(active)
        except DeltaStateError:
            for delta in sorted(reattach, key=lambda d: d._order_key):
                delta.attach()
            raise
        installed: list[tuple[SiteRouter, tuple[int, int]]] = []
        self._routing = True
        try:
            for router in active:
                key = (min(d._order_key for d in router.deltas), id(router))
                if router.source is not None:
                    add_hook(router.source, key, router.capture_input, pre=True)
                add_hook(router.host, key, router.forward_hook)
                installed.append((router, key))
            yield self
        finally:
            for router, key in installed:
                remove_hook(router.host, key)
                if router.source is not None:
                    remove_hook(router.source, key, pre=True)
                router._reset()
            self._routing = False
            for delta in sorted(reattach, key=lambda d: d._order_key):
                delta.attach()

