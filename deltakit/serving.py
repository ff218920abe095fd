"""Multi-task serving: many named deltas on one backbone, fast switching, and per-sample routing.

A :class:`DeltaGroup` is a plain object the user holds: it maps names to delta objects built on one backbone. It
puts nothing on the model, so the model's ``state_dict``, copies and wrappers are unaffected, and dropping the
group drops its deltas (see docs/serving.md for the reasons).

* :meth:`DeltaGroup.switch` makes one delta the active one: a detach plus an attach, which move existing modules
  and hook entries around (no allocation, no copy of weights, O(sites) Python work).
* :meth:`DeltaGroup.route` runs one batch in which row ``i`` uses delta ``names[i]``. On every modified module one
  :class:`SiteRouter` per kind of delta applies each row's delta: by gathering each row's factors from a stack of
  all the group's deltas there (batched matmuls, one pass for all deltas) or by segments (rows grouped by delta,
  each delta's own factors on its rows), whichever the batch's composition makes cheaper (deltakit.routing). The
  per-method routers live next to their methods (``LoraRouter`` in deltas/lora.py, ...); a per-site module opts in
  with a ``router`` class attribute. Task heads the deltas carry are routed by ``HeadRouter`` (deltakit.heads):
  each row runs its own delta's copy, all rows' heads having one shape.
* :meth:`DeltaGroup.register` adds a delta by checkpoint directory without loading it (deltakit.store): with
  ``max_active`` the group keeps at most that many deltas materialised, loads a registered one on a miss of
  ``switch`` / ``route`` and drops the least recently used, changing one routing slot per delta.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .base import ATTACHED, DETACHED, MERGED, DeltaBase
from .errors import DeltaError, DeltaStateError
from .heads import DeltaHeads, HeadRouter, check_routed_heads
from .hooks import add_hook, hook_keys, remove_hook
from .routing import PATHS, RouterTable, SiteRouter, _RouterCall, _ThreadState
from .serving_gate import HELD_BLOCKS, ServingGate
from .site import Composition, DeltaSite, is_inside
from .store import DeltaStore, StoredDelta, read_stored

__all__ = ["DeltaGroup", "SiteRouter"]


class _RouteCall:
    """One open route() block: its routers' states and its gather budget."""

    def __init__(self, states: dict[SiteRouter, _RouterCall], budget: _GatherBudget | None) -> None:
        self.states = states
        self.budget = budget


class _GatherBudget:
    """Bytes one route() block may still spend on kept gathered factors (shared by its routers)."""

    def __init__(self, megabytes: float) -> None:
        self.left = float(megabytes) * 2**20  # float: inf means no limit

    def take(self, nbytes: int) -> bool:
        if nbytes > self.left:
            return False
        self.left -= nbytes
        return True

    def give(self, nbytes: int) -> None:
        """Return the bytes of a kept copy that is dropped."""
        self.left += nbytes


def _writer(action: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Run a :class:`DeltaGroup` method as the group's only writer (:meth:`ServingGate.exclusive
    <deltakit.serving_gate.ServingGate.exclusive>`)."""

    def wrap(method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def run(self: DeltaGroup, *args: Any, **kwargs: Any) -> Any:
            with self._serving.exclusive(action):
                return method(self, *args, **kwargs)

        return run

    return wrap


class DeltaGroup:
    """Named deltas on one backbone: look-up by name, fast switching, per-sample routing, a store of many.

    Example:
        >>> group = DeltaGroup(model)
        >>> group.load("sentiment", "ckpt/sentiment")
        >>> group.load("topic", "ckpt/topic")
        >>> group.switch("topic")                  # only "topic" is active
        >>> with torch.inference_mode(), group.route(["sentiment", None, "topic"]):
        ...     logits = model(**batch).logits      # row i uses names[i] (and its head); None: the backbone alone

        >>> store = DeltaGroup(model, max_active=64)
        >>> for name, path in checkpoints.items():
        ...     store.register(name, path)         # reads the small config and header only
        >>> with torch.inference_mode(), store.route(names):   # misses loaded, least recently used dropped
        ...     logits = model(**batch).logits

    Args:
        backbone_model: The model every delta of the group is built on.
        max_active: Most deltas kept materialised at once (``None``: no bound). Deltas given by :meth:`add` or
            :meth:`load` are pinned (always materialised, counted); registered ones come and go.
    """

    def __init__(self, backbone_model: nn.Module, *, max_active: int | None = None) -> None:
        if not isinstance(backbone_model, nn.Module):
            raise DeltaError(f"DeltaGroup needs the backbone nn.Module, got {type(backbone_model).__name__}.")
        self.backbone_model = backbone_model
        self._deltas: dict[str, DeltaBase] = {}
        self._store = DeltaStore(max_active)
        self._table: RouterTable | None = None
        self._serving = ServingGate(backbone_model, _ThreadState())

    # -------------------------------------------------------------- membership

    def _check_new_name(self, name: Any) -> None:
        if not isinstance(name, str) or not name.isidentifier():
            raise DeltaError(f"Delta name {name!r} must be a Python identifier (it becomes a child module name).")
        if name in self._deltas or name in self._store:
            raise DeltaError(f"The group already has a delta named {name!r}; remove() it first or choose another name.")

    @property
    def max_active(self) -> int | None:
        """Most deltas kept materialised at once (``None``: no bound)."""
        return self._store.max_active

    @property
    def _routers(self) -> list[SiteRouter] | None:
        """The routers (``None`` before the first ``route()``)."""
        return None if self._table is None else list(self._table.routers.values())

    def _pinned(self) -> list[str]:
        return [n for n in self._deltas if n not in self._store]

    def _check_room_for_pinned(self, name: str) -> None:
        limit = self._store.max_active
        if limit is not None and len(self._pinned()) + 1 > limit:
            raise DeltaError(
                f"Cannot pin {name!r}: the group keeps at most max_active={limit} deltas materialised and "
                f"{len(self._pinned())} are pinned by add()/load() already. register() it instead (loaded on use), "
                f"remove() a pinned delta, or create the group with a larger max_active."
            )

    def _adopt(self, name: str, delta: DeltaBase) -> None:
        """Take a materialised delta into the group (and into the routing table, one slot)."""
        self._deltas[name] = delta
        if self._table is not None:
            self._table.add(name, delta)

    def _drop(self, name: str) -> DeltaBase:
        """Forget a materialised delta (its routing slot is freed)."""
        delta = self._deltas.pop(name)
        if self._table is not None:
            self._table.remove(name, delta)
        return delta

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
        self._check_room_for_pinned(delta.child_name)
        self._adopt(delta.child_name, delta)
        self._evict_over(keep={delta.child_name})
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
        """Load a checkpoint written by ``save_finetuned`` onto the backbone under ``name`` and add it (pinned).

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
            DeltaError: The name is taken, the group is full of pinned deltas (``max_active``), or the checkpoint
                carries backbone tensors (e.g. a classifier head kept trainable): on a shared backbone they would
                overwrite each other's.
        """
        self._check_new_name(name)
        self._check_room_for_pinned(name)
        delta = self._load_delta(name, path, check_backbone=check_backbone, allow_nonfinite=allow_nonfinite)
        if attach:
            delta.attach()
        self._adopt(name, delta)
        self._evict_over(keep={name})
        return delta

    def _load_delta(self, name: str, path: str | os.PathLike[str], **options: bool) -> DeltaBase:
        """The checkpoint at ``path`` loaded (fully validated) onto the backbone as ``name``, left detached."""
        from .checkpoint import load_delta

        def no_backbone_tensors(meta: dict[str, Any]) -> None:
            # Checked on the config read together with the weights (one consistent read of the directory).
            if meta["backbone_tensors"]:
                raise DeltaError(
                    f"The checkpoint {os.fspath(path)!r} also holds backbone tensors {meta['backbone_tensors'][:3]}: "
                    f"deltas sharing one backbone would overwrite each other's copies. Keep task-specific weights in "
                    f"the delta (e.g. LoRA on the 'classifier' Linear) or load it with AutoDeltaModel.from_finetuned "
                    f"on its own backbone."
                )

        delta = load_delta(path, self.backbone_model, name=name, check_meta=no_backbone_tensors, **options)
        delta.detach()
        return delta

    def register(
        self, name: str, path: str | os.PathLike[str], *, check_backbone: bool = True, allow_nonfinite: bool = False,
    ) -> StoredDelta:
        """Add a delta by checkpoint directory without loading it: materialised when :meth:`switch` or
        :meth:`route` first needs it, dropped again when it is the least recently used of more than
        ``max_active``.

        Reads and validates only the small parts of the checkpoint (``delta_config.json`` and the weights file's
        header; see deltakit.store); a miss loads it with every check of :meth:`load` (SHA-256, backbone
        fingerprint, finiteness). Does not touch the model, so it does not wait for forwards.

        Args:
            name: Group name (a Python identifier; the child-module name once materialised).
            path: The checkpoint directory (written by ``save_finetuned``).
            check_backbone: See :meth:`DeltaBase.from_finetuned` (applied when it is loaded).
            allow_nonfinite: Load tensors holding NaN or infinite values (refused by default).

        Returns:
            What was recorded (type, hyper-parameters, size).

        Raises:
            CheckpointError: The config or the header is invalid (nothing recorded).
            DeltaError: The name is taken or not an identifier, or the checkpoint carries backbone tensors.
        """
        for flag, value in (("check_backbone", check_backbone), ("allow_nonfinite", allow_nonfinite)):
            if not isinstance(value, bool):
                raise DeltaError(f"register({flag}=...) must be True or False, got {value!r}.")
        if not isinstance(path, (str, os.PathLike)):
            raise DeltaError(f"register(path=...) must be a directory path (str or os.PathLike), got {path!r:.80}.")
        with self._serving.cond:
            self._check_new_name(name)
        # The files are read outside the lock (routing goes on meanwhile); the name is checked again when recorded.
        entry = read_stored(name, path, check_backbone=check_backbone, allow_nonfinite=allow_nonfinite)
        with self._serving.cond:
            self._check_new_name(name)
            self._store.entries[name] = entry
        return entry

    @property
    def resident(self) -> list[str]:
        """Names of the materialised deltas (pinned ones, then registered ones from least to most recently used)."""
        return [*self._pinned(), *self._store.lru]

    @property
    def store_stats(self) -> dict[str, float]:
        """Hits, misses, evictions and seconds spent loading registered deltas since the group was created."""
        return dict(self._store.stats)

    # -------------------------------------------------------------- the active set (writes only)
    def _materialise(self, names: set[str], keep: set[str]) -> None:
        """Load the registered ``names`` that are not materialised, then drop the least recently used beyond
        ``max_active`` (never one of ``keep``, attached, merged or pinned). Loads before it drops: a checkpoint
        that fails its checks raises with the materialised set unchanged but for the misses loaded before it."""
        for name in sorted(names - self._deltas.keys()):
            entry = self._store.entries[name]
            # route() is usually opened inside torch.inference_mode(): parameters made there would be inference
            # tensors (no version counter, unusable outside it), so a miss loads outside it.
            with torch.inference_mode(False):
                delta = self._store.materialise(
                    name, self.backbone_model, lambda e: self._load_delta(e.name, e.path, **e.load_options)
                )
            self._adopt(entry.name, delta)
            self._evict_over(keep)

    def _evict_over(self, keep: set[str]) -> None:
        limit = self._store.max_active
        if limit is None or len(self._deltas) <= limit:
            return

        def evictable(name: str) -> bool:
            return name not in keep and self._deltas[name].state == DETACHED

        for name in self._store.victims(len(self._deltas) - limit, evictable):
            self._drop(name)
            self._store.evicted(name)

    def _check_fits(self, used: set[str], action: str, *, count_attached: bool = True) -> None:
        """Refuse a request that needs more deltas materialised at once than ``max_active`` allows."""
        limit = self._store.max_active
        if limit is None:
            return
        attached = {n for n, d in self._deltas.items() if d.state != DETACHED} if count_attached else set()
        needed = used | set(self._pinned()) | attached
        if len(needed) > limit:
            raise DeltaError(
                f"{action} needs {len(needed)} deltas materialised at once ({len(used)} named, "
                f"{len(needed) - len(used)} pinned or switched in), more than max_active={limit}. Split the batch so "
                f"that each route() names at most {limit - len(needed - used)} distinct deltas (the example server "
                f"does this), or create the group with a larger max_active."
            )

    @_writer("remove() a delta")
    def remove(self, name: str) -> DeltaBase | None:
        """Detach (if attached) and forget the delta ``name``; returns it (``None`` for a registered delta that
        was not materialised). A merged delta must be unmerged first."""
        if name in self._store and name not in self._deltas:
            self._store.forget(name)  # registered, not materialised: nothing on the model
            return None
        delta = self[name]
        if delta.state == MERGED:
            raise DeltaStateError(
                f"Cannot remove {delta._describe()} from the group: it is merged; unmerge() it first."
            )
        if delta.state == ATTACHED:
            delta.detach()
        self._drop(name)
        self._store.forget(name)
        return delta

    def __getitem__(self, name: str) -> DeltaBase:
        delta = self._deltas.get(name) if isinstance(name, str) else None
        if delta is None:
            if isinstance(name, str) and name in self._store:
                raise DeltaError(
                    f"The group's delta {name!r} is registered but not materialised now (max_active="
                    f"{self.max_active}); switch() or route() loads it."
                )
            raise DeltaError(f"The group has no delta named {name!r}; it has {self._names_for_errors()}.")
        return delta

    def _names_for_errors(self) -> str:
        names = self.names
        return repr(names) if len(names) <= 20 else f"{len(names)} deltas, e.g. {names[:5]}"

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (name in self._deltas or name in self._store)

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    @property
    def names(self) -> list[str]:
        """The deltas' names: pinned ones in the order they were added, then registered ones in theirs."""
        return [*self._pinned(), *self._store.entries]

    @property
    def active(self) -> list[str]:
        """Names of the group's deltas that currently change the model (attached or merged)."""
        return [n for n, d in self._deltas.items() if d.state != DETACHED]

    def __repr__(self) -> str:
        stored = f", registered={len(self._store)}, max_active={self.max_active}" if len(self._store) else ""
        return f"DeltaGroup({type(self.backbone_model).__name__}, deltas={self._names_for_errors()}, " \
               f"active={self.active}{stored})"

    # -------------------------------------------------------------- switching
    @_writer("switch()")
    def switch(self, name: str | None) -> DeltaBase | None:
        """Make ``name`` the only active delta of the group (``None``: the bare backbone).

        Detaches the group's other attached deltas and attaches ``name``: existing modules and hook entries are
        moved, nothing is allocated or copied. A registered delta that is not materialised is loaded first (a
        miss), and the least recently used beyond ``max_active`` dropped. Deltas outside the group are left as
        they are.

        Thread-safe: waits for the forwards already running on the backbone and for other threads' ``route()``
        blocks; forwards that start meanwhile wait for the switch. A refused switch changes nothing.

        Returns:
            The now active delta, or ``None``.

        Raises:
            DeltaError: ``name`` is not a name of the group (or ``None``).
            CheckpointError: the registered checkpoint fails its checks on loading (nothing switched).
            DeltaStateError: a group delta is merged, the target cannot be attached (nothing changed), or the call
                comes from inside a ``route()`` block or a forward of the backbone.
        """
        if name is not None and not isinstance(name, str):
            raise DeltaError(
                f"switch() needs a delta name (str) or None, got {type(name).__name__} {name!r}; the group has "
                f"{self._names_for_errors()}."
            )
        if name is not None and name not in self:
            raise DeltaError(f"The group has no delta named {name!r}; it has {self._names_for_errors()}.")
        merged = [n for n, d in self._deltas.items() if d.state == MERGED and n != name]
        if merged:
            raise DeltaStateError(
                f"Cannot switch to {name!r}: group delta(s) {merged} are merged into the weights; unmerge() them first."
            )
        if name is not None and name not in self._deltas:
            self._check_fits({name}, "switch()", count_attached=False)
            self._materialise({name}, keep={name})
        target = None if name is None else self[name]
        if name is not None:
            self._store.used([name])
        # Attach the target first: if it is refused, nothing was touched (not even the order of anything).
        if target is not None and target.state == DETACHED:
            target.attach()
        for delta in self._deltas.values():
            if delta is not target and delta._state == ATTACHED:
                delta.detach()
        self._evict_over(keep=set() if name is None else {name})
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
    def _ensure_table(self) -> RouterTable:
        if self._table is None:
            table = RouterTable(self._serving.local)
            table.reserve(sum(RouterTable.routable(d) for d in self._deltas.values()))
            for name, delta in self._deltas.items():
                table.add(name, delta)
            self._table = table
        return self._table

    def _check_outside(self, active: list[SiteRouter]) -> None:
        """Refuse a block that attached deltas outside the group would silently disturb (before anything changes)."""
        self._check_outside_order(active)
        self._check_outside_heads(active)

    def _check_outside_heads(self, active: list[SiteRouter]) -> None:
        """A head router replaces its module's output row by row; an attached delta outside the group with its own
        copy of that module (or of a module holding it) replaces the output too, for every row, and whichever hook
        runs last decides, silently. Modules the block routes no head on are left to the outside copy."""
        routed = [router.host_name for router in active if isinstance(router, HeadRouter)]
        for head in routed:
            # An outside delta's copies hang on its own backbone root, which holds the head: one of its ancestors.
            parts = head.split(".")
            for depth in range(len(parts)):
                prefix = ".".join(parts[:depth])
                holder = self.backbone_model.get_submodule(prefix)
                for child_name, child in holder._modules.items():
                    if isinstance(child, DeltaHeads) and not self._owns(child):
                        self._refuse_outside_head(head, prefix, child_name, child)

    def _owns(self, heads: DeltaHeads) -> bool:
        """Whether ``heads`` are the head copies of one of the group's deltas, or of a member of one: a switched
        composite's members hold their own copies, and the block takes the composite off like any switched delta."""
        pending = list(self._deltas.values())
        while pending:
            delta = pending.pop()
            if heads is delta.head_container:
                return True
            pending.extend(getattr(delta, "members", ()))
        return False

    @staticmethod
    def _refuse_outside_head(head: str, prefix: str, child_name: str, heads: DeltaHeads) -> None:
        """Raise if the outside delta whose copies are ``heads`` (registered as ``prefix.child_name``) copies the
        routed module ``head`` or a module holding it."""
        for name in heads.names:
            copied = f"{prefix}.{name}" if prefix else name
            if not is_inside(head, {copied}):
                continue
            owner = child_name.removesuffix("_heads")
            holding = "" if copied == head else f", which holds the routed head {head!r}"
            raise DeltaStateError(
                f"route(): the delta {owner!r} outside the group is attached with its own copy of {copied!r} "
                f"(modules_to_save){holding}, and this block routes a task head there per row: its copy would "
                f"replace the output of every row, so which head a row got would depend on hook order, silently. "
                f"Detach it (delta.detach()) or add it to the group (group.add(delta))."
            )

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
            # A head router's "sites" are plain copies of a module (no composition): they keep their place.
            if not all(getattr(type(m), "composition", None) is Composition.ADDS_INPUT_FUNCTION for m in modules):
                raise DeltaStateError(
                    f"route(): on {router.host_name!r} a delta outside the group is attached and was created between "
                    f"group deltas, so routing (which applies the group's deltas at one place) would change the "
                    f"order for some rows. Detach it, or add it to the group."
                )

    @staticmethod
    def _check_names(names: Any, gather_cache_mb: Any, path: Any) -> None:
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
        if not isinstance(path, str) or path not in PATHS:
            raise DeltaError(f"route(): path must be one of {list(PATHS)}, got {path!r}.")

    def _check_route_state(self, names: Sequence[str | None]) -> None:
        """Everything about the group that can refuse a block (checked before anything changes)."""
        unknown = sorted({n for n in names if n is not None and n not in self})
        if unknown:
            raise DeltaError(f"route(): the group has no delta named {unknown}; it has {self._names_for_errors()}.")
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
        used = {n for n in names if n is not None}
        self._check_fits(used, "route()")
        table = self._ensure_table()
        # A registered delta's method (and heads) are known once it is materialised (checked again after loading).
        unroutable = sorted(n for n in used if n in self._deltas and n not in table.slot_of)
        if unroutable:
            kinds = sorted({type(self._deltas[n]).__name__ for n in unroutable})
            raise DeltaError(
                f"route(): delta(s) {unroutable} ({', '.join(kinds)}) do not support per-sample routing (supported: "
                f"LoRA, DoRA, (IA)^3, VeRA, BitFit, Adapter, ParallelAdapter, LowRankAdapter, Compacter). Serve them "
                f"with switch()."
            )
        self._check_head_shapes(names)

    def _check_head_shapes(self, names: Sequence[str | None]) -> None:
        """Refuse a batch whose rows would run task heads of different shapes on one module (a 6-label copy and
        the backbone's 2-label head: their outputs cannot be one tensor), before anything runs. Rows of a delta
        without a copy of the module, and ``None`` rows, run the backbone's original. Registered deltas not yet
        materialised are checked once loaded."""
        rows = list(dict.fromkeys(n for n in names if n is None or n in self._deltas))  # each kind of row once
        routes = {n: getattr(self._deltas[n], "head_routes", list)() for n in rows if n is not None}
        copies = {n: {name: copy_ for _, name, _, copy_ in own} for n, own in routes.items()}
        originals = {name: original for own in routes.values() for original, name, _, _ in own}
        uses: dict[str, list[tuple[str, nn.Module]]] = {}
        for head, original in originals.items():
            uses[head] = []
            for n in rows:
                own = copies.get(n, {}).get(head) if n is not None else None
                if own is not None:
                    uses[head].append((repr(n), own))
                elif n is None:
                    uses[head].append(("None (the backbone's own head)", original))
                else:
                    uses[head].append((f"{n!r} (no copy of its own: the backbone's head)", original))
        check_routed_heads(uses)

    def _plan_call(self, names: Sequence[str | None], gather_cache_mb: float, path: str) -> _RouteCall:
        """This block's routers (those some row goes through) with each row's slot."""
        states = self._ensure_table().plan(list(names), path)
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
    def route(
        self, names: Sequence[str | None], *, gather_cache_mb: float = 256, path: str = "auto",
    ) -> Iterator[DeltaGroup]:
        """Per-sample routing: inside the block, row ``i`` of each batch runs with delta ``names[i]``.

        ``None`` routes a row to the bare backbone. Works in ``forward`` and in ``generate()`` (greedy, beam search,
        sampling): a module that sees ``k * len(names)`` rows routes row ``j`` to ``names[j // k]``. While a
        block is open the group's attached deltas are detached (each row sees only its own delta) and they are
        re-attached when the last block closes. Inference only (eval mode).

        Task heads a delta carries (``modules_to_save``) are routed too: each row runs its own delta's copy of the
        head, and rows of deltas without a copy of that module, and ``None`` rows, run the backbone's own. Their
        outputs form one tensor, so the heads the rows of one batch use must have the same shapes (two 6-label
        copies on a backbone built with 2 labels route together and give 6 columns; a 6-label copy next to a
        2-label head is refused before anything runs: route those rows in separate blocks). A delta outside the
        group that is attached with its own copy of a head applies that copy to every row, like any outside delta,
        as long as the block routes no head there (no row's delta has a copy of that module or of one inside it);
        a block that would route a head there is refused (both would replace the rows' output): detach the
        outside delta or add it to the group.

        Registered deltas that are not materialised are loaded when the block opens (a write: it waits for other
        threads' blocks to close), and the least recently used beyond ``max_active`` are dropped; a batch that
        names more distinct deltas than ``max_active`` leaves room for is refused (split it).

        Threads: each thread may hold its own block on the group at the same time; the rows belong to the block,
        so to the thread that opened it (forwards of that thread use them; other threads' forwards do not).
        A forward in a thread without a block, while the group's switched deltas are off for routing, is refused
        with :class:`DeltaStateError` (with nothing switched in, it runs on the backbone unchanged). Nothing stays
        hooked after the last block closes, whatever exception ended it.

        Each modified module applies its rows' deltas by *gather* (each row's factors copied from a stack of all
        slots, batched matmuls) or by *segment* (rows grouped by delta, each delta's own factors: no copy, no rank
        padding); ``path="auto"`` picks per module and call from the batch's composition (see docs/serving.md).
        On the gather path, from the second forward call with the same rows on (``generate()``'s decoding steps)
        the gathered factors are kept for the rest of the block, up to ``gather_cache_mb`` in all.

        Args:
            names: One delta name (or ``None``) per sample of the batch.
            gather_cache_mb: Memory (MiB) the block may use to keep gathered factors between forward calls;
                ``0`` gathers at every call. Freed when the block exits.
            path: ``"auto"``, ``"gather"`` or ``"segment"`` (the segmented path needs autograd off; with
                gradients on every call gathers).

        Raises:
            DeltaError: unknown name, a name that is not a str, a delta of a method without routing support, a
                batch of the wrong size, a negative ``gather_cache_mb``, an unknown ``path``, more distinct
                deltas than ``max_active``, rows using task heads of different shapes on one module (named with
                the rows and shapes), a task head whose output rows cannot be put back into one tensor.
            CheckpointError: a registered checkpoint fails its checks when loaded.
            DeltaStateError: training mode, a merged group delta, nested ``route()`` in one thread, a block opened
                inside a forward of the backbone while a writer waits, an attached delta outside the group whose
                hooks on a routed module would run on the wrong side of group deltas or replace a routed head.
        """
        serving = self._serving
        if serving.local.call is not None:
            raise DeltaStateError("DeltaGroup.route() blocks cannot be nested.")
        self._check_names(names, gather_cache_mb, path)
        call = self._open(names, float(gather_cache_mb), path)
        HELD_BLOCKS.count += 1
        try:
            yield self
        finally:
            HELD_BLOCKS.count -= 1
            self._close(call)

    def _open(self, names: Sequence[str | None], gather_cache_mb: float, path: str) -> _RouteCall:
        serving = self._serving
        used = {n for n in names if n is not None}
        with serving.cond:
            serving.wait_to_open()
            self._check_route_state(names)
            attached = [d for d in self._deltas.values() if d.state == ATTACHED]
            misses = used - self._deltas.keys()
            if not misses and (serving.blocks or not attached):
                call = self._plan_call(names, gather_cache_mb, path)
                self._check_outside(list(call.states))
                self._store.used(used)
                self._enter(call)
                return call
        # A write: load the misses and/or take the switched deltas off (the first block), then enter while still
        # the writer, so no other write can drop what this block needs.
        with serving.exclusive("open a route() block"):
            self._check_route_state(names)
            self._materialise(misses, keep=used)
            self._check_route_state(names)
            call = self._plan_call(names, gather_cache_mb, path)
            self._check_outside(list(call.states))
            self._store.used(used - misses)
            attached = [d for d in self._deltas.values() if d.state == ATTACHED]
            with serving.cond:
                for delta in attached:
                    delta.detach()
                if attached:
                    serving.reattach, serving.strict = attached, True
                self._enter(call)
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
                            serving.close_gate()
                serving.cond.notify_all()
