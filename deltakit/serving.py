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
import functools
import os
import sys
import threading
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .base import ATTACHED, DETACHED, MERGED, DeltaBase
from .errors import DeltaError, DeltaStateError
from .hooks import _Dispatch, add_hook, hook_keys, remove_hook
from .routing import _NO_CALLS, SiteRouter, _RouterCall, _ThreadState  # noqa: F401 - SiteRouter re-exported
from .site import Composition, DeltaSite

__all__ = ["DeltaGroup", "SiteRouter"]


class _RouteCall:
    """One open route() block: its routers' states and its gather budget."""

    def __init__(self, states: dict[SiteRouter, _RouterCall], budget: _GatherBudget | None) -> None:
        self.states = states
        self.budget = budget


class _HeldBlocks(threading.local):
    """Route blocks the current thread holds over all groups (a thread holding one never waits behind a pending
    writer of another group, which could otherwise wait for it in turn)."""

    count = 0


_HELD = _HeldBlocks()


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
    return (type(site).router, site.routing_key())


_CALL_IMPL = nn.Module._call_impl.__code__


def _outermost_call(frame: Any) -> Any:
    """The outermost ``nn.Module`` call running in the stack that ends at ``frame`` (its frame), or ``None``.

    Only frame identities and code objects are read: a frame's ``f_locals`` must never be read from another thread
    (before Python 3.13 that can write into the frame while its thread runs it: seen here as a local variable of
    the other thread turning into an int)."""
    outermost = None
    while frame is not None:
        if frame.f_code is _CALL_IMPL:
            outermost = frame
        frame = frame.f_back
    return outermost


def _still_running(frame: Any, target: Any) -> bool:
    """Whether the frame object ``target`` is still in the stack that ends at ``frame``."""
    while frame is not None:
        if frame is target:
            return True
        frame = frame.f_back
    return False


def _calls_in(frame: Any, modules: set[int]) -> int:
    """How many calls of the modules ``modules`` (ids) are running in the stack that ends at ``frame``: the
    calling thread's own stack only (see :func:`_outermost_call`)."""
    count = 0
    while frame is not None:
        if frame.f_code is _CALL_IMPL and id(frame.f_locals.get("self")) in modules:
            count += 1
        frame = frame.f_back
    return count


def _dispatchers(module: nn.Module) -> set[int]:
    """The deltakit pre-hook dispatchers on ``module`` (ids)."""
    return {id(h) for h in module._forward_pre_hooks.values() if isinstance(h, _Dispatch)}


def _entry_modules(model: nn.Module) -> list[nn.Module]:
    """The modules a forward of ``model`` starts at: the model, and for encoder-decoder models the encoder, which
    ``generate()`` calls on its own (duck-typed ``get_encoder()``)."""
    entries = [model]
    get_encoder = getattr(model, "get_encoder", None)
    if callable(get_encoder):
        try:
            encoder = get_encoder()
        except Exception:  # a model whose get_encoder() does not apply to it has no separate entry point
            encoder = None
        if isinstance(encoder, nn.Module) and encoder is not model:
            entries.append(encoder)
    return entries


class _Serving:
    """A group's concurrency control: who may change its deltas, and when forwards of the backbone may run.

    * A *writer* (``switch``, ``add``, ``load``, ``remove``, and the first ``route()`` block when it must take the
      switched deltas off) waits until no ``route()`` block of the group is open, then puts a *gate* (a forward
      pre-hook) on the backbone's entry modules, waits until no forward that started before the gate is still
      running (found in the threads' stacks), does its work and takes the gate away. Forwards that reach the gate
      meanwhile wait for it. So a forward sees the group's deltas as they were before or after, never a mix, and
      between writes the backbone carries no deltakit hook of the group at all (nothing to slow a forward down).
    * ``route()`` blocks: any number, one per thread; their rows belong to the thread (:class:`_ThreadState`).
      While blocks are open and the group's switched deltas are off for routing (*strict* routing), the gate stays
      and refuses forwards of threads without a block (they would silently miss those deltas).
    """

    def __init__(self, backbone: nn.Module) -> None:
        self.backbone = backbone
        self.cond = threading.Condition()
        self.local = _ThreadState()
        self.writer: int | None = None  # the thread changing the group's deltas now
        self.pending = 0  # writers waiting for the blocks to close
        self.blocks = 0  # open route() blocks, all threads
        self.strict = False
        self.reattach: list[DeltaBase] = []  # switched deltas taken off while blocks are open
        self.parked: set[int] = set()  # threads waiting at the gate
        self.handles: list[Any] = []
        self.entries: set[int] = set()

    # -------------------------------------------------------------- the gate
    def gate(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        """Forward pre-hook on the entry modules while a writer works or routing is strict."""
        if self.local.call is not None:
            return  # this thread routes: its block keeps writers out, and its rows are its own
        me = threading.get_ident()
        with self.cond:
            self._refuse_outside_block()
            if self.writer is None or self.writer == me:
                return
            if _calls_in(sys._getframe(), self.entries) > 1:
                return  # inside a forward that was already running: the writer waits for that one
            before = _dispatchers(module)
            self.parked.add(me)
            try:
                while self.writer is not None:
                    self.cond.wait()
            finally:
                self.parked.discard(me)
                if not self.parked:
                    self.cond.notify_all()  # the next writer lets the parked forwards through first
            self._refuse_outside_block()
            if not _dispatchers(module) <= before:
                # torch looked this module's pre-hooks up before the gate held the call: a deltakit pre-hook added
                # meanwhile (a delta hooking the model's entry, e.g. a soft prompt) would be missed.
                raise DeltaStateError(
                    f"A delta hooking {type(module).__name__}'s input was attached while this forward waited for "
                    f"DeltaGroup.switch() in another thread; it could not apply to this call. Call the model again."
                )

    def _refuse_outside_block(self) -> None:
        if self.strict and self.blocks:
            raise DeltaStateError(
                f"A forward of the backbone ran in a thread with no route() block of this DeltaGroup while a "
                f"route() block of it is open in another thread: the group's switched delta(s) "
                f"{[d.name for d in self.reattach]} are taken off while routing, so this forward would silently run "
                f"without them. Route this thread's batch too (group.route([...])), or run it after the blocks close."
            )

    def _open_gate(self) -> None:
        if not self.handles:
            entries = _entry_modules(self.backbone)
            self.entries = {id(m) for m in entries}
            # First among the pre-hooks: user pre-hooks are part of the forward the gate holds back.
            self.handles = [m.register_forward_pre_hook(self.gate, prepend=True) for m in entries]

    def _close_gate(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _wait_for_forwards(self) -> None:
        """Wait until no other thread runs a forward of the backbone that predates the gate.

        The gate is in place, so every forward of the backbone that starts from now on is held there; the ones that
        may still run are inside a module call that began before. Each other thread's outermost module call of this
        moment is followed until it returns (or its thread parks at the gate). That may include a call of another
        model (waited for too: one call, never a stream of them), and it reads no frame's locals (see
        :func:`_outermost_call`)."""
        me = threading.get_ident()
        with self.cond:
            skip = {me, *self.parked}
        running = {t: _outermost_call(f) for t, f in sys._current_frames().items() if t not in skip}
        running = {t: f for t, f in running.items() if f is not None}
        while running:
            time.sleep(0.0002)
            with self.cond:
                parked = set(self.parked)
            frames = sys._current_frames()
            running = {
                t: f for t, f in running.items() if t not in parked and t in frames and _still_running(frames[t], f)
            }
            del frames

    # -------------------------------------------------------------- writers
    def check_caller(self, action: str) -> None:
        """Refuse a write from inside this thread's route() block or inside a forward of the backbone (it would
        wait for itself, or change deltas under its own forward)."""
        if self.local.call is not None:
            raise DeltaStateError(f"Cannot {action} inside a DeltaGroup.route() block; leave the block first.")
        entries = self.entries or {id(m) for m in _entry_modules(self.backbone)}
        if _calls_in(sys._getframe(), entries):
            raise DeltaStateError(
                f"Cannot {action} inside a forward of the backbone (from a hook or a module's forward): the forward "
                f"would run partly with the old and partly with the new deltas. Do it between forwards."
            )

    @contextlib.contextmanager
    def exclusive(self, action: str) -> Iterator[None]:
        """Run the body as the group's only writer, with no forward of the backbone running (see the class)."""
        self.check_caller(action)
        with self.cond:
            self.pending += 1
            try:
                while self.writer is not None or self.blocks or self.parked:
                    self.cond.wait()
            finally:
                self.pending -= 1
            self.writer = threading.get_ident()
        try:
            self._open_gate()
            self._wait_for_forwards()
            yield
        finally:
            self.release_writer()

    def release_writer(self) -> None:
        """End this thread's write: no writer, the gate down unless routing keeps it, waiting threads woken."""
        with self.cond:
            self.writer = None
            if not self.strict:
                self._close_gate()
            self.cond.notify_all()


def _writer(action: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Run a :class:`DeltaGroup` method as the group's only writer (:meth:`_Serving.exclusive`)."""

    def wrap(method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def run(self: DeltaGroup, *args: Any, **kwargs: Any) -> Any:
            with self._serving.exclusive(action):
                return method(self, *args, **kwargs)

        return run

    return wrap


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
        self._routers: list[SiteRouter] | None = None
        self._routable: list[str] = []
        self._serving = _Serving(backbone_model)

    # -------------------------------------------------------------- membership

    def _check_new_name(self, name: Any) -> None:
        if not isinstance(name, str) or not name.isidentifier():
            raise DeltaError(f"Delta name {name!r} must be a Python identifier (it becomes a child module name).")
        if name in self._deltas:
            raise DeltaError(f"The group already has a delta named {name!r}; remove() it first or choose another name.")

    @_writer("add() a delta")
    def add(self, delta: DeltaBase, name: str | None = None) -> DeltaBase:
        """Adopt a delta built on this group's backbone; its group name is its ``name=`` (child-module name).

        Args:
            delta: The delta object (any state).
            name: If given, must equal ``delta.name`` (a check, since the name is fixed at creation).

        Returns:
            ``delta``.
        """
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

    @_writer("load() a delta")
    def load(
        self,
        name: str,
        path: str | os.PathLike[str],
        *,
        attach: bool = False,
        check_backbone: bool = True,
        allow_nonfinite: bool = False,
    ) -> DeltaBase:
        """Load a checkpoint written by ``save_finetuned`` onto the backbone under ``name`` and add it.

        Args:
            name: Group name and child-module name of the delta.
            path: The checkpoint directory.
            attach: Leave the delta attached (default: detached; use :meth:`switch`).
            check_backbone: See :meth:`DeltaBase.from_finetuned`.
            allow_nonfinite: Load tensors holding NaN or infinite values (refused by default).

        Returns:
            The loaded delta.

        Raises:
            CheckpointError: The checkpoint is invalid (nothing changed).
            DeltaError: The name is taken, or the checkpoint carries backbone tensors (e.g. a classifier head kept
                trainable): on a shared backbone they would overwrite each other's.
        """
        from .checkpoint import load_delta

        self._check_new_name(name)

        def no_backbone_tensors(meta: dict[str, Any]) -> None:
            # Checked on the config read together with the weights (one consistent read of the directory).
            if meta["backbone_tensors"]:
                raise DeltaError(
                    f"The checkpoint {os.fspath(path)!r} also holds backbone tensors {meta['backbone_tensors'][:3]}: "
                    f"deltas sharing one backbone would overwrite each other's copies. Keep task-specific weights in "
                    f"the delta (e.g. LoRA on the 'classifier' Linear) or load it with AutoDeltaModel.from_finetuned "
                    f"on its own backbone."
                )

        delta = load_delta(
            path, self.backbone_model, check_backbone=check_backbone, name=name, allow_nonfinite=allow_nonfinite,
            check_meta=no_backbone_tensors,
        )
        if not attach:
            delta.detach()
        self._deltas[name] = delta
        self._routers = None
        return delta

    @_writer("remove() a delta")
    def remove(self, name: str) -> DeltaBase:
        """Detach (if attached) and forget the delta ``name``; returns it. A merged delta must be unmerged first."""
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
        delta = self._deltas.get(name) if isinstance(name, str) else None
        if delta is None:
            raise DeltaError(f"The group has no delta named {name!r}; it has {self.names}.")
        return delta

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._deltas

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
    @_writer("switch()")
    def switch(self, name: str | None) -> DeltaBase | None:
        """Make ``name`` the only active delta of the group (``None``: the bare backbone).

        Detaches the group's other attached deltas and attaches ``name``: existing modules and hook entries are
        moved, nothing is allocated or copied. Deltas outside the group are left as they are.

        Thread-safe: waits for the forwards already running on the backbone and for other threads' ``route()``
        blocks; forwards that start meanwhile wait for the switch. A refused switch changes nothing.

        Returns:
            The now active delta, or ``None``.

        Raises:
            DeltaError: ``name`` is not a name of the group (or ``None``).
            DeltaStateError: a group delta is merged, the target cannot be attached (nothing changed), or the call
                comes from inside a ``route()`` block or a forward of the backbone.
        """
        if name is not None and not isinstance(name, str):
            raise DeltaError(
                f"switch() needs a delta name (str) or None, got {type(name).__name__} {name!r}; the group has "
                f"{self.names}."
            )
        target = None if name is None else self[name]
        merged = [n for n, d in self._deltas.items() if d.state == MERGED and d is not target]
        if merged:
            raise DeltaStateError(
                f"Cannot switch to {name!r}: group delta(s) {merged} are merged into the weights; unmerge() them first."
            )
        # Attach the target first: if it is refused, nothing was touched (not even the order of anything).
        if target is not None and target.state == DETACHED:
            target.attach()
        for delta in self._deltas.values():
            if delta is not target and delta._state == ATTACHED:
                delta.detach()
        return target

    def refresh(self) -> None:
        """Drop the stacked factors kept for :meth:`route`, so the next routed call rebuilds them.

        Stacks follow parameter changes by themselves (in-place version counters, replaced parameter objects, device
        and dtype moves). Writes through ``param.data`` bypass version counters, as they bypass autograd: after
        such an edit call ``refresh()``.
        """
        with self._serving.cond:
            for router in self._routers or []:
                router.sync_params()
                router._cache = None

    # -------------------------------------------------------------- routing
    def _build_routers(self) -> list[SiteRouter]:
        groups: dict[tuple[int, Hashable], tuple[nn.Module, str, list[tuple[DeltaBase, DeltaSite]]]] = {}
        routable: list[str] = []
        for name, delta in self._deltas.items():
            if not delta.sites or not all(type(s.module).router is not None for s in delta.sites):
                continue
            routable.append(name)
            for site in delta.sites:
                key = (id(site.host), _router_key(site.module))
                groups.setdefault(key, (site.host, site.name, []))[2].append((delta, site.module))
        routers = []
        for (_, (router_cls, _)), (host, host_name, entries) in groups.items():
            router = router_cls(host, host_name, entries)
            router._local = self._serving.local
            routers.append(router)
        self._routable = routable
        return routers

    def _check_outside_order(self, active: list[SiteRouter]) -> None:
        """A router applies all its deltas at one place in the host's order; a delta outside the group attached
        on the same host and created between two of them would run on the wrong side of some (unless all of them
        declare Composition.ADDS_INPUT_FUNCTION: additive sites commute). The group's own deltas are off while routing,
        and other routers act only for the threads that route through them."""
        own = {delta._order_key for delta in self._deltas.values()}
        for router in active:
            keys = [d._order_key for d in router.deltas]
            low, high = min(keys), max(keys)
            candidates = {k[0] for k in hook_keys(router.host) if low < k[0] < high and k[0] not in own}
            if not candidates:
                continue
            # Attached delta modules by their delta's order key (stamped when attached); a hook entry with no
            # such module is a router's (this group's or another group's).
            attached = {
                child.__dict__.get("_deltakit_order"): child
                for child in router.host._modules.values() if isinstance(child, DeltaSite)
            }
            between = candidates & attached.keys()
            if not between:
                continue
            modules = [*router.sites, *(attached[k] for k in sorted(between))]
            if not all(type(m).composition is Composition.ADDS_INPUT_FUNCTION for m in modules):
                raise DeltaStateError(
                    f"route(): on {router.host_name!r} a delta outside the group is attached and was created between "
                    f"group deltas, so routing (which applies the group's deltas at one place) would change the "
                    f"order for some rows. Detach it, or add it to the group."
                )

    @staticmethod
    def _check_names(names: Any, gather_cache_mb: Any) -> None:
        if isinstance(names, str) or not isinstance(names, Sequence) or len(names) == 0:
            raise DeltaError(f"route() needs a non-empty list with one delta name (or None) per sample, got {names!r}.")
        for i, n in enumerate(names):
            if n is not None and not isinstance(n, str):
                raise DeltaError(
                    f"route() needs one delta name (str) or None per sample, got {n!r} at position {i} "
                    f"({type(n).__name__}). Pass a flat list such as ['a', None, 'b']."
                )
        if isinstance(gather_cache_mb, bool) or not isinstance(gather_cache_mb, (int, float)) or not (
            gather_cache_mb >= 0
        ):
            raise DeltaError(
                f"route(): gather_cache_mb must be a number of MiB >= 0 (0 disables keeping gathered factors), "
                f"got {gather_cache_mb!r}."
            )

    def _check_route_state(self, names: Sequence[str | None]) -> None:
        """Everything about the group that can refuse a block (checked before anything changes)."""
        unknown = sorted({n for n in names if n is not None and n not in self._deltas})
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

    def _plan_call(self, names: Sequence[str | None], gather_cache_mb: float) -> _RouteCall:
        """This block's routers (those some row goes through) with each row's slot."""
        states: dict[SiteRouter, _RouterCall] = {}
        by_members: dict[tuple[str, ...], torch.Tensor | None] = {}  # most modules hold the same deltas
        for router in self._routers or []:
            members = tuple(d.child_name for d in router.deltas)
            if members not in by_members:
                slot_of = {n: k for k, n in enumerate(members)}
                slots = [slot_of.get(n, router.zero_slot) for n in names]  # type: ignore[arg-type]
                hit = any(k != router.zero_slot for k in slots)
                by_members[members] = torch.tensor(slots, dtype=torch.long) if hit else None
            routed = by_members[members]
            if routed is not None:
                states[router] = _RouterCall(routed)
        return _RouteCall(states, _GatherBudget(gather_cache_mb) if gather_cache_mb > 0 else None)

    @staticmethod
    def _router_key_of(router: SiteRouter) -> tuple[int, int]:
        return (min(d._order_key for d in router.deltas), id(router))

    def _use_routers(self, call: _RouteCall) -> None:
        """Count this block as a user of its routers; hook the ones nobody used (other threads' forwards pass
        through them unchanged)."""
        for router in call.states:
            router.sync_params()
            if router._users == 0:
                key = self._router_key_of(router)
                if router.source is not None:
                    add_hook(router.source, key, router.capture_input, pre=True)
                add_hook(router.host, key, router.forward_hook)
            router._users += 1

    def _release_routers(self, call: _RouteCall) -> None:
        for router in call.states:
            router._users -= 1
            if router._users == 0:
                key = self._router_key_of(router)
                remove_hook(router.host, key)
                if router.source is not None:
                    remove_hook(router.source, key, pre=True)

    @contextlib.contextmanager
    def route(self, names: Sequence[str | None], *, gather_cache_mb: float = 256) -> Iterator[DeltaGroup]:
        """Per-sample routing: inside the block, row ``i`` of each batch runs with delta ``names[i]``.

        ``None`` routes a row to the bare backbone. Works in ``forward`` and in ``generate()`` (greedy, beam search,
        sampling): a module that sees ``k * len(names)`` rows routes row ``j`` to ``names[j // k]``. While a
        block is open the group's attached deltas are detached (each row sees only its own delta) and they are
        re-attached when the last block closes. Inference only (eval mode).

        Threads: each thread may hold its own block on the group at the same time; the rows belong to the block,
        so to the thread that opened it (forwards of that thread use them; other threads' forwards do not).
        A forward in a thread without a block, while the group's switched deltas are off for routing, is refused
        with :class:`DeltaStateError` (with nothing switched in, it runs on the backbone unchanged). Nothing stays
        hooked after the last block closes, whatever exception ended it.

        Each modified module gathers every row's factors from its stack before its batched matmuls. From the
        second forward call with the same rows on (``generate()``'s decoding steps) the gathered factors are kept
        for the rest of the block, up to ``gather_cache_mb`` in all, which about halves the routing cost of a
        decoding step; a single forward pass keeps nothing.

        Args:
            names: One delta name (or ``None``) per sample of the batch.
            gather_cache_mb: Memory (MiB) the block may use to keep gathered factors between forward calls;
                ``0`` gathers at every call. Freed when the block exits.

        Raises:
            DeltaError: unknown name, a name that is not a str, a delta of a method without routing support, a
                batch of the wrong size, a negative ``gather_cache_mb``.
            DeltaStateError: training mode, a merged group delta, nested ``route()`` in one thread, a block opened
                inside a forward of the backbone while a writer waits.
        """
        serving = self._serving
        if serving.local.call is not None:
            raise DeltaStateError("DeltaGroup.route() blocks cannot be nested.")
        self._check_names(names, gather_cache_mb)
        call = self._open(names, float(gather_cache_mb))
        _HELD.count += 1
        try:
            yield self
        finally:
            _HELD.count -= 1
            self._close(call)

    def _open(self, names: Sequence[str | None], gather_cache_mb: float) -> _RouteCall:
        serving = self._serving
        me = threading.get_ident()
        with serving.cond:
            if serving.writer is not None or (serving.pending and not _HELD.count):
                serving.check_caller("open a route() block")  # waiting from inside a forward would deadlock
            while serving.writer is not None or (serving.pending and not _HELD.count):
                serving.cond.wait()
            self._check_route_state(names)
            call = self._plan_call(names, gather_cache_mb)
            self._check_outside_order(list(call.states))
            attached = [d for d in self._deltas.values() if d.state == ATTACHED]
            if serving.blocks or not attached:
                self._enter(call)
                return call
            serving.writer = me  # the first block takes the switched deltas off: a write
        try:
            serving.check_caller("open a route() block")
            serving._open_gate()
            serving._wait_for_forwards()
            with serving.cond:
                for delta in attached:
                    delta.detach()
                serving.reattach, serving.strict = attached, True
                self._enter(call)
        finally:
            serving.release_writer()
        return call

    def _enter(self, call: _RouteCall) -> None:
        self._use_routers(call)
        self._serving.blocks += 1
        self._serving.local.call = call

    def _close(self, call: _RouteCall) -> None:
        serving = self._serving
        with serving.cond:
            serving.local.call = None
            try:
                self._release_routers(call)
            finally:
                serving.blocks -= 1
                if serving.blocks == 0 and serving.strict:
                    # Forwards without a block were refused while strict, so none runs now: put them back.
                    reattach, serving.reattach, serving.strict = serving.reattach, [], False
                    try:
                        for delta in sorted(reattach, key=lambda d: d._order_key):
                            delta.attach()
                    finally:
                        if serving.writer is None:
                            serving._close_gate()
                serving.cond.notify_all()
