"""Per-sample routing of one kind of site: the base class a method subclasses to opt in, and the slot table.

A per-site module opts in with a ``router`` class attribute naming a :class:`SiteRouter` subclass (``LoraRouter`` in
deltas/lora.py, ...). :class:`deltakit.serving.DeltaGroup` keeps a :class:`RouterTable`: one router per modified
module and kind of delta, and one *slot* per routable delta, the same slot on every module (so one row -> slot
tensor serves every router of a batch). A delta's task heads are routed too, by the router class its
``head_routes()`` names (``HeadRouter`` in heads.py: each row runs its own delta's copy of the head). The table
changes one slot at a time when a delta comes or goes (a store's active set turning over), never rebuilding the
other slots. A router hooks in while a ``route()`` block uses it.
This module knows nothing of groups: it reads which rows go where from the per-thread state a group hands it
(``_local``), so methods import this, never :mod:`deltakit.serving`.

Two ways to apply a router (see :meth:`SiteRouter.forward_hook`): *gather* copies each row's factors out of a
stack of all slots and runs batched matmuls (one call for all rows; every row pays for the widest delta), and
*segment* groups the rows by delta and applies each delta's own factors to its rows (one pair of GEMMs per
delta present: no copy of factors, no padding). The automatic choice compares the two costs: on a call that
gathers afresh (:data:`SEGMENT_COST`), and on a later call of a block that keeps the gathered factors, where gather
no longer copies (:data:`KEPT_SEGMENT_COST`).
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Hashable
from typing import Any

import torch
from torch import nn

from .errors import DeltaError, DeltaStateError
from .site import DeltaSite, factory_kwargs

__all__ = ["SiteRouter", "RouterTable", "PATHS", "SEGMENT_COST", "KEPT_SEGMENT_COST"]

#: Routing paths a ``route()`` block may ask for.
PATHS = ("auto", "gather", "segment")
#: The cost of one segment (a delta's pair of small GEMMs and their slicing, Python and dispatch included), in
#: factor elements the gather path would copy instead. ``auto`` takes the segmented path when
#: ``segments * SEGMENT_COST <= routed rows * elements of one slot``. Measured on the 2-core development machine
#: (docs/serving.md, "Gather or segment"): one segment (per module) cost about 19 us, gathering one float32 element
#: about 0.8 ns, so one segment costs what gathering 22-25k elements does.
SEGMENT_COST = 25_000
#: The same trade on a *later* call of a ``route()`` block (the router called before in the block with as many rows,
#: as ``generate()``'s decoding steps are) whose gathered factors are kept, or will be from this call on (the block's
#: ``gather_cache_mb`` has room for them; see :meth:`SiteRouter.gather`). Gather then copies nothing: both paths
#: only read factors, gather every row's padded slot (rows routed to no delta too), segment each present delta's
#: own factors once, plus a fixed cost per segment; gather's own fixed cost (its batched matmuls, the stack's
#: freshness check) is about one segment's, which rows not sorted by delta spend again on the sort and scatter.
#: ``auto`` segments when ``(segments - 1 if the rows are sorted else segments) * KEPT_SEGMENT_COST <= rows *
#: elements of one slot - elements of the present deltas``. Measured on the 2-core development machine with
#: benchmarks/routing_crossover.py's cells (decode step, third call of a block, one thread, 9-11 interleaved rounds,
#: medians; hidden 256/1024/4096, r=8, r=64, mixed 8-64, 1-32 distinct deltas in 8 or 32 rows): a least-squares fit
#: of segment minus kept-gather time gives 12-14 us per segment (per module), 0.26-0.29 ns per factor element read
#: (so 48k elements per segment) and gather 11-18 us slower at equal work (one segment); sorting 32 shuffled rows
#: cost the segmented path 10-30 us more. Over the 124 cells (sorted rows), 35k takes a path within 1.05x of the
#: faster one in every cell, where 30k or 40k (and any constant without the first segment's discount) miss by
#: 1.2x somewhere. Larger than SEGMENT_COST: reading an element costs less than copying it.
KEPT_SEGMENT_COST = 35_000


class _RouterCall:
    """One router's state inside one route() block (so inside one thread)."""

    __slots__ = ("slots", "expanded", "captured", "gathered", "segments", "path", "seen", "repeat", "decided")

    def __init__(self, slots: torch.Tensor, path: str = "auto") -> None:
        self.slots = slots
        self.path = path
        self.expanded: dict[tuple[int, torch.device | None], torch.Tensor] = {}
        self.captured: torch.Tensor | None = None
        # Gathered per-row factors kept between forward calls of the block (see SiteRouter.gather()).
        self.gathered: dict[str, tuple[torch.Tensor, torch.Tensor, bool, torch.Tensor | None]] = {}
        # Row count -> the rows' segments (see SiteRouter.segments()).
        self.segments: dict[int, _Segments] = {}
        # Row counts this router was called with in the block, and whether the current call is a repeat of one (a
        # later decoding step): what lets gathered factors be kept (SiteRouter.gather()) and counted (_segmented()).
        self.seen: set[int] = set()
        self.repeat = False
        # Row count -> whether ``auto`` segments its later calls: decided once, on the first repeat (the kept
        # factors it counts on are then kept for the block), so decoding steps pay a dict lookup, not the rule.
        self.decided: dict[int, bool] = {}


class _Segments:
    """The rows of one call grouped by slot: a permutation that sorts them (``None``: already sorted) and, per slot
    present in the router, the ``[start, stop)`` range of its rows in sorted order."""

    __slots__ = ("order", "ranges", "routed", "elems")

    def __init__(self, order: torch.Tensor | None, ranges: list[tuple[int, int, int]], routed: int,
                 elems: int) -> None:
        self.order = order
        self.ranges = ranges  # (slot, start, stop)
        self.routed = routed  # rows that go through one of this router's deltas
        self.elems = elems  # factor elements of the deltas present (what the segmented path reads)


class _ThreadState(threading.local):
    """What the current thread holds on one group: its open route() block, if any."""

    call: Any = None  # the open block (deltakit.serving._RouteCall) or None


_NO_CALLS = _ThreadState()  # a router not (yet) given a group's state sees no block


class SiteRouter:
    """Applies, on one host module, the per-site modules of several deltas of one kind, each row with its own.

    Subclasses implement :meth:`build` (stack the sites' factors, each zero-padded *at the end* of any dimension
    that differs between sites, with a last all-zero slot) and :meth:`apply` (the routed forward hook given the
    stack and each row's slot), and may override :meth:`apply_segment` (one delta on a run of rows; the default
    calls the site's own forward hook). A router is created by :class:`~deltakit.serving.DeltaGroup`; while some
    thread's :meth:`~deltakit.serving.DeltaGroup.route` block uses it, its :meth:`forward_hook` sits in the host's
    deltakit hook. Which rows go where belongs to the block, so to the thread that opened it: in a thread with no
    block that uses this router the hook changes nothing.

    Slots: entry ``i`` sits in slot ``slots[i]`` of a stack of ``capacity + 1`` slots; the last one
    (:attr:`zero_slot`) and every slot holding no entry are all zero. :meth:`put` and :meth:`clear` change one slot
    of a built stack in place.

    Args:
        host: The modified module.
        host_name: Its full name in the backbone (for error messages).
        entries: ``(delta, per-site module)`` pairs.
        slots: Each entry's slot (default: ``0, 1, ...``).
        capacity: Number of slots (default: the number of entries).
    """

    #: Set by routers that read another module's input (a parallel adapter); :meth:`capture_input` is hooked there.
    source: nn.Module | None = None

    def __init__(
        self, host: nn.Module, host_name: str, entries: list[tuple[Any, DeltaSite]], slots: list[int] | None = None,
        capacity: int | None = None,
    ) -> None:
        self.host = host
        self.host_name = host_name
        self.deltas = [d for d, _ in entries]
        self.sites = [s for _, s in entries]
        self.slot_ids = list(range(len(entries))) if slots is None else list(slots)
        self.capacity = len(entries) if capacity is None else capacity
        if len(self.slot_ids) != len(entries) or any(not 0 <= k < self.capacity for k in self.slot_ids):
            raise DeltaError(f"SiteRouter on {host_name!r}: slots {self.slot_ids} do not fit {self.capacity} slots.")
        # (stamp, stack) as one attribute, so a thread never pairs one thread's stack with another's stamp.
        self._cache: tuple[Any, dict[str, torch.Tensor]] | None = None
        self._local: _ThreadState = _NO_CALLS  # the group's per-thread state (set by DeltaGroup)
        self._users = 0  # open blocks routing rows through this router (hooks installed while > 0)
        self.calls = {"gather": 0, "segment": 0}  # routed calls by path (diagnostics, tests, benchmarks)
        self._track()

    @property
    def zero_slot(self) -> int:
        """The all-zero slot (rows routed to no delta of this router)."""
        return self.capacity

    @staticmethod
    def _entry_sources(delta: Any, site: DeltaSite) -> list[tuple[nn.Module, str]]:
        """Where each parameter of one entry lives ((module, name)), each once: its site's, and its delta's shared
        ones. (Two entries are two deltas, which never share a parameter object.)"""
        owners = [site, *([delta.shared] if getattr(delta, "shared", None) is not None else [])]
        sources: list[tuple[nn.Module, str]] = []
        seen: set[int] = set()
        for owner in owners:
            for module in owner.modules():
                for pname, p in module._parameters.items():
                    if p is not None and id(p) not in seen:
                        seen.add(id(p))
                        sources.append((module, pname))
        return sources

    def _track(self, rescan: bool = True) -> None:
        """Record where each parameter lives ((module, name)), so that a parameter object replaced by another
        (e.g. load_state_dict(..., assign=True)) is noticed, not only in-place changes of the old one.

        Each entry's part is computed once, when it comes (``rescan=False``: only entries appended since are
        walked; a removed entry's part is deleted with it): a store turning its active set over puts and clears one
        entry at a time, and walking every entry's modules at each of those made a miss cost O(active set) on every
        modified module."""
        if rescan:
            self._parts: list[list[tuple[nn.Module, str]]] = []
            self._elems: list[int] = []
        for delta, site in zip(self.deltas[len(self._parts):], self.sites[len(self._parts):]):
            self._parts.append(self._entry_sources(delta, site))
            self._elems.append(sum(p.numel() for p in site.parameters()))
        sources = [source for part in self._parts for source in part]
        self._sources = sources
        self.params = self._current_params()
        self._ids = list(map(id, self.params))
        self._site_at = dict(zip(self.slot_ids, self.sites))
        self._elems_at = dict(zip(self.slot_ids, self._elems))
        # Elements one slot holds (the widest site's): what the gather path copies per row.
        self.slot_elems = max(self._elems, default=0)

    # -------------------------------------------------------------- stacks
    def build(self) -> dict[str, torch.Tensor]:
        """Stack the sites' factors (entry ``k`` = ``self.sites[k]``, last slot all zero)."""
        raise NotImplementedError

    def apply(
        self, stack: dict[str, torch.Tensor], slots: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any],
        output: Any,
    ) -> Any:
        """The host's new output, row ``j`` computed with slot ``slots[j]``."""
        raise NotImplementedError

    def apply_segment(self, site: DeltaSite, x: torch.Tensor, output: torch.Tensor) -> None:
        """Apply ``site`` alone to a run of rows: ``x`` their input, ``output`` (contiguous, updated in place) the
        host's output for them. The default runs the site's own forward hook; a method with a faster form for
        this (LoRA: two GEMMs, no shared-input bookkeeping) overrides it."""
        result = site.forward_hook(self.host, (x,), {}, output)
        if not (result.data_ptr() == output.data_ptr() and result.shape == output.shape):
            output.copy_(result)

    def _target(self) -> dict[str, Any]:
        return factory_kwargs(self.host)

    def _current_params(self) -> list[torch.Tensor]:
        return [module._parameters[pname] for module, pname in self._sources]

    @property
    def _stack(self) -> dict[str, torch.Tensor] | None:
        """The cached stack (``None`` before the first routed call or after a change)."""
        cache = self._cache
        return None if cache is None else cache[1]

    def sync_params(self) -> None:
        """Follow parameter objects replaced since the last block (``load_state_dict(..., assign=True)``): the
        stack is rebuilt from the new ones."""
        current = self._current_params()
        ids = list(map(id, current))
        if ids != self._ids:
            self.params, self._ids = current, ids  # holding the new objects keeps the ids unique
            self._cache = None

    def _stamp(self) -> Any:
        params = self.params
        host_param = next((p for p in self.host._parameters.values() if p is not None), None)
        return (
            [p._version for p in params],
            [p.data_ptr() for p in params[:1]],
            None if host_param is None else (host_param.dtype, host_param.device),
        )

    def _dense(self, deltas: list[Any], sites: list[DeltaSite]) -> dict[str, torch.Tensor]:
        """:meth:`build` for the given entries only (a shallow copy of this router runs it)."""
        if deltas is self.deltas:
            return self.build()
        view = copy.copy(self)
        view.deltas, view.sites = deltas, sites
        return view.build()

    def _in_slots(self, dense: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The dense stack (one slot per entry, then zero) laid out in :attr:`slot_ids` over ``capacity + 1``."""
        n = len(self.sites)
        if self.slot_ids == list(range(n)) and self.capacity == n:
            return dense
        index = torch.tensor(self.slot_ids, dtype=torch.long, device=next(iter(dense.values())).device)
        out = {}
        for key, value in dense.items():
            full = value.new_zeros((self.capacity + 1, *value.shape[1:]))
            out[key] = full.index_copy(0, index, value[:n])
        return out

    def stack(self) -> dict[str, torch.Tensor]:
        """The stacked factors, rebuilt when a parameter changed (version counter, storage, device or dtype).

        With autograd on and a trainable delta parameter, the stack is built differentiably at every call (so
        gradients reach the deltas) and not cached. Threads share the cache: two may build the same stack at
        once, and each uses a whole one.
        """
        params = self.params  # current objects: sync_params() runs when a route() block opens
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return {k: v.to(**self._target()) for k, v in self._in_slots(self.build()).items()}
        stamp = self._stamp()
        cache = self._cache
        if cache is not None and cache[0] == stamp:
            return cache[1]
        # Plain tensors (not inference tensors), so they can serve inside and outside inference_mode.
        with torch.inference_mode(False), torch.no_grad():
            stack = {k: v.to(**self._target()).contiguous() for k, v in self._in_slots(self.build()).items()}
        self._cache = (stamp, stack)
        return stack

    # -------------------------------------------------------------- one slot at a time (no block is open)
    def put(self, slot: int, delta: Any, site: DeltaSite) -> None:
        """Put ``(delta, site)`` in the free ``slot``; a built stack gets its factors written into that slot only
        (rebuilt instead when they are wider than the stack's)."""
        if slot in self._site_at or not 0 <= slot < self.capacity:
            raise DeltaError(f"SiteRouter on {self.host_name!r}: slot {slot} is taken or out of range.")
        fresh = self._cache is not None and self._cache[0] == self._stamp()
        self.deltas.append(delta)
        self.sites.append(site)
        self.slot_ids.append(slot)
        self._track(rescan=False)
        if not fresh:
            self._cache = None
            return
        stack = self._cache[1]  # type: ignore[index]
        with torch.inference_mode(False), torch.no_grad():
            one = {k: v.to(**self._target()) for k, v in self._dense([delta], [site]).items()}
            if set(one) != set(stack) or any(
                v.dim() != stack[k].dim() or any(a > b for a, b in zip(v.shape[1:], stack[k].shape[1:]))
                for k, v in one.items()
            ):
                self._cache = None  # a wider delta than the stack was built for: rebuilt on next use
                return
            for key, value in one.items():
                target = stack[key][slot]
                target.zero_()
                target[tuple(slice(0, s) for s in value.shape[1:])].copy_(value[0])
        self._cache = (self._stamp(), stack)

    def clear(self, slot: int) -> None:
        """Take the entry out of ``slot``; a built stack gets that slot zeroed."""
        i = self.slot_ids.index(slot)
        fresh = self._cache is not None and self._cache[0] == self._stamp()
        del self.deltas[i], self.sites[i], self.slot_ids[i], self._parts[i], self._elems[i]
        self._track(rescan=False)
        if not fresh:
            self._cache = None
            return
        stack = self._cache[1]  # type: ignore[index]
        with torch.inference_mode(False), torch.no_grad():
            for value in stack.values():
                value[slot].zero_()
        self._cache = (self._stamp(), stack)

    def resize(self, capacity: int) -> None:
        """Change the number of slots (the stack is rebuilt on next use)."""
        self.capacity = capacity
        self._cache = None

    # -------------------------------------------------------------- rows (state of the calling thread's block)
    def _state(self) -> _RouterCall | None:
        call = self._local.call
        return None if call is None else call.states.get(self)

    def rows(self, n: int, device: torch.device | None = None) -> torch.Tensor:
        """Each of ``n`` rows' slot (on ``device``) in the calling thread's block: ``n`` is the batch size, or ``k``
        times it (each sample repeated ``k`` times in a row, as ``generate()`` expands for ``num_beams`` /
        ``num_return_sequences``)."""
        state = self._state()
        if state is None:
            raise DeltaStateError(f"No route() block of this thread routes rows through {self.host_name!r}.")
        key = (n, device)
        cached = state.expanded.get(key)
        if cached is not None:
            return cached
        slots = state.slots
        batch = slots.shape[0]
        if n % batch:
            raise DeltaError(
                f"DeltaGroup.route() was given {batch} names, but {self.host_name!r} received a batch of {n} "
                f"rows (not a multiple of {batch}). Pass one name per sample of the batch, with the batch on dim 0."
            )
        expanded = slots if n == batch else slots.repeat_interleave(n // batch)
        expanded = state.expanded[key] = expanded.to(device) if device is not None else expanded
        return expanded

    def segments(self, state: _RouterCall, n: int) -> _Segments:
        """The ``n`` rows grouped by slot (cached for the block: ``generate()`` calls again with the same rows)."""
        found = state.segments.get(n)
        if found is not None:
            return found
        slots = self.rows(n)
        values = slots.tolist()
        mine = self._site_at
        ordered = all(a <= b for a, b in zip(values, values[1:]))
        order = None if ordered else torch.argsort(slots, stable=True)
        sorted_values = values if ordered else sorted(values)
        ranges, start = [], 0
        for i in range(1, n + 1):
            if i == n or sorted_values[i] != sorted_values[start]:
                if sorted_values[start] in mine:
                    ranges.append((sorted_values[start], start, i))
                start = i
        found = state.segments[n] = _Segments(
            order, ranges, sum(b - a for _, a, b in ranges), sum(self._elems_at[slot] for slot, _, _ in ranges))
        return found

    def gather(self, stack: dict[str, torch.Tensor], key: str, slots: torch.Tensor) -> torch.Tensor:
        """``stack[key][slots]``: each row's factors, copied out of the stack.

        ``generate()`` calls the model once per token with the same rows, so inside one :meth:`DeltaGroup.route`
        block the copy is kept from the second call on (the second identical gather, or the first gather of a
        call that repeats an earlier one with as many rows, which the segmented path served: same stack tensor,
        same slots, same inference mode) while the block's ``gather_cache_mb`` allows; a single forward pass keeps
        nothing. A rebuilt stack (changed parameters) is a new tensor and is gathered afresh.
        """
        source = stack[key]
        call, state = self._local.call, self._state()
        budget = None if call is None else call.budget
        if state is None or budget is None:
            return source.index_select(0, slots)
        inference = torch.is_inference_mode_enabled()
        entry = state.gathered.get(key)
        same = entry is not None and entry[0] is source and entry[1] is slots and entry[2] == inference
        if same and entry[3] is not None:  # type: ignore[index]
            return entry[3]  # type: ignore[index]
        gathered = source.index_select(0, slots)
        if source.requires_grad:
            return gathered
        if entry is not None and entry[3] is not None:
            # The kept copy (other rows, a rebuilt stack, the other inference mode) is replaced below and freed:
            # its bytes go back to the block's budget, or a block alternating row counts would run out of budget
            # while keeping next to nothing.
            budget.give(entry[3].nbytes)
        if (same or state.repeat) and budget.take(gathered.nbytes):
            state.gathered[key] = (source, slots, inference, gathered)
        elif not same:
            state.gathered[key] = (source, slots, inference, None)  # seen once: keep it if it comes again
        return gathered

    def _keeps_gathered(self, state: _RouterCall, n: int) -> bool:
        """Whether a gather of ``n`` rows at this call copies nothing, or copies for the last time: each gathered
        factor is kept already, or the block's budget has room to keep them (from this call on, see
        :meth:`gather`; the second decoding step then pays the copy once for all later ones, where waiting for the
        copy to be kept before counting it would need a gather that ``auto`` may never run)."""
        kept = [entry[3] for entry in state.gathered.values()]
        if kept and all(k is not None and k.shape[0] == n for k in kept):
            return True
        call = self._local.call
        budget = None if call is None else call.budget
        if budget is None or not self.params:
            return False
        itemsize = self._target().get("dtype", self.params[0].dtype).itemsize
        return n * self.slot_elems * itemsize <= budget.left

    def _check_mode(self, module: nn.Module) -> None:
        if module.training:
            raise DeltaStateError(
                f"Per-sample routing is for inference: {self.host_name!r} is in training mode. Call model.eval() "
                f"(train each delta on its own, attached with DeltaGroup.switch())."
            )

    def _segmented(self, state: _RouterCall, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> bool:
        """Whether this call takes the segmented path (see the module docstring and :data:`SEGMENT_COST`)."""
        if state.path == "gather" or self.source is not None or torch.is_grad_enabled():
            return False  # segments write the output in place: no autograd; a captured input is gather-only
        first = args[0] if args else (next(iter(kwargs.values())) if kwargs else None)
        if not isinstance(output, torch.Tensor) or not isinstance(first, torch.Tensor) or output.dim() < 2:
            return False
        if first.shape[0] != output.shape[0]:
            return False
        if state.path == "segment":
            return True
        n = output.shape[0]
        if not state.repeat:
            plan = self.segments(state, n)
            return len(plan.ranges) * SEGMENT_COST <= plan.routed * self.slot_elems
        decided = state.decided.get(n)
        if decided is None:
            plan = self.segments(state, n)
            if self._keeps_gathered(state, n):
                # Kept factors: gather reads every row's padded slot (rows to no delta too), segment its deltas once;
                # sorted rows spare the segmented path the one segment's worth gather costs beyond its reads.
                extra = len(plan.ranges) - (plan.order is None)
                decided = extra * KEPT_SEGMENT_COST <= n * self.slot_elems - plan.elems
            else:
                decided = len(plan.ranges) * SEGMENT_COST <= plan.routed * self.slot_elems
            state.decided[n] = decided
        return decided

    def apply_segments(self, state: _RouterCall, args: tuple[Any, ...], kwargs: dict[str, Any],
                       output: torch.Tensor) -> torch.Tensor:
        """The segmented path: rows sorted by slot (no copy when they already are), one :meth:`apply_segment` per
        delta present, results put back in the rows' order."""
        x = args[0] if args else next(iter(kwargs.values()))
        plan = self.segments(state, output.shape[0])
        if not plan.ranges:
            return output
        order = plan.order
        if order is None and output.is_contiguous():
            xs, out = x, output
        else:
            if order is None:
                order = torch.arange(output.shape[0])
            order = order.to(output.device)
            xs, out = x.index_select(0, order), output.index_select(0, order)
        for slot, start, stop in plan.ranges:
            self.apply_segment(self._site_at[slot], xs[start:stop], out[start:stop])
        if out is output:
            return output
        if output.is_inference() == out.is_inference() and not output.requires_grad:
            output.index_copy_(0, order, out)
            return output
        return output.index_copy(0, order, out)

    def forward_hook(self, host: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        """The routed forward hook (installed by :meth:`DeltaGroup.route`); the identity in a thread whose block
        does not use this router (or that has no block)."""
        state = self._state()
        if state is None:
            return output
        self._check_mode(host)
        first = state.captured if self.source is not None else (args[0] if args else next(iter(kwargs.values())))
        n = first.shape[0] if isinstance(first, torch.Tensor) else None
        state.repeat = n in state.seen
        state.seen.add(n)  # type: ignore[arg-type]
        if self._segmented(state, args, kwargs, output):
            self.calls["segment"] += 1
            return self.apply_segments(state, args, kwargs, output)
        self.calls["gather"] += 1
        stack = self.stack()
        slots = self.rows(first.shape[0], next(iter(stack.values())).device)
        return self.apply(stack, slots, args, kwargs, output)

    def capture_input(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
        """Forward pre-hook on :attr:`source`: remember its input (for this thread's block) for
        :meth:`forward_hook`."""
        state = self._state()
        if state is not None:
            state.captured = args[0] if args else next(iter(kwargs.values()))
        return args, kwargs

    def take_captured(self) -> torch.Tensor:
        """The input :meth:`capture_input` remembered for this thread's current forward (and forget it)."""
        state = self._state()
        assert state is not None and state.captured is not None, "capture_input did not run before the host"
        x, state.captured = state.captured, None
        return x


def _router_key(site: DeltaSite) -> Hashable:
    return (type(site).router, site.routing_key())


def _routes(delta: Any) -> list[tuple[tuple[int, Hashable], nn.Module, str, type, nn.Module]]:
    """Every part of ``delta`` a router applies: ``(table key, host, host name, router class, module)`` for each
    site, then for each task head it carries (``head_routes()``: the original module, the copy; a delta object
    without the method, such as a composite, has none)."""
    routes = [
        ((id(site.host), _router_key(site.module)), site.host, site.name, type(site.module).router, site.module)
        for site in delta.sites
    ]
    for original, name, router_cls, copy_ in getattr(delta, "head_routes", list)():
        routes.append(((id(original), (router_cls, "head")), original, name, router_cls, copy_))
    return routes


class RouterTable:
    """A group's routers and slots.

    Every routable delta gets one slot, the same on every module; a module's router holds the deltas with a site
    there (its other slots stay zero). Adding or removing a delta touches only its slot, on the routers of its own
    modules (:meth:`SiteRouter.put` / :meth:`SiteRouter.clear`); the number of slots doubles when full (stacks are
    then rebuilt on next use), and freed slots are reused lowest first.

    Args:
        local: The group's per-thread state, handed to every router.
    """

    def __init__(self, local: _ThreadState) -> None:
        self.local = local
        self.routers: dict[tuple[int, Hashable], SiteRouter] = {}
        self.slot_of: dict[str, int] = {}
        self.capacity = 0
        self._free: list[int] = []

    @staticmethod
    def routable(delta: Any) -> bool:
        """Whether every site of ``delta`` has a router (its task heads, if any, always have one: each row runs
        its own delta's copy). A delta with neither sites nor heads (a composite) is not routable."""
        heads = getattr(delta, "head_routes", list)()
        if not delta.sites and not heads:
            return False
        return all(type(s.module).router is not None for s in delta.sites)

    def reserve(self, count: int) -> None:
        """Make room for ``count`` deltas in all (before adding many at once)."""
        if count > self.capacity:
            self._grow(count)

    def _grow(self, at_least: int) -> None:
        new = max(4, self.capacity)
        while new < at_least:
            new *= 2
        self._free = sorted([*self._free, *range(self.capacity, new)])
        self.capacity = new
        for router in self.routers.values():
            router.resize(new)

    def add(self, name: str, delta: Any) -> None:
        """Give ``delta`` a slot and put its sites in their modules' routers (nothing for an unroutable one)."""
        if not self.routable(delta) or name in self.slot_of:
            return
        if not self._free:
            self._grow(self.capacity * 2)
        slot = self._free.pop(0)
        self.slot_of[name] = slot
        for key, host, host_name, router_cls, module in _routes(delta):
            router = self.routers.get(key)
            if router is None:
                router = router_cls(host, host_name, [(delta, module)], [slot], self.capacity)
                router._local = self.local
                self.routers[key] = router
            else:
                router.put(slot, delta, module)

    def remove(self, name: str, delta: Any) -> None:
        """Free ``delta``'s slot (zeroed in its routers; a router left empty is dropped)."""
        slot = self.slot_of.pop(name, None)
        if slot is None:
            return
        for key, *_ in _routes(delta):
            router = self.routers[key]
            router.clear(slot)
            if not router.sites:
                del self.routers[key]
        self._free = sorted([*self._free, slot])

    def plan(self, names: list[str | None], path: str) -> dict[SiteRouter, _RouterCall]:
        """Each router some row goes through, with the rows' slots (one tensor shared by all of them)."""
        zero = self.capacity
        slots = [zero if n is None else self.slot_of[n] for n in names]
        used = set(slots)
        used.discard(zero)
        if not used:
            return {}
        tensor = torch.tensor(slots, dtype=torch.long)
        return {r: _RouterCall(tensor, path) for r in self.routers.values() if not used.isdisjoint(r._site_at)}
