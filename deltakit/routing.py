"""Per-sample routing of one kind of site: the base class a method subclasses to opt in.

A per-site module opts in with a ``router`` class attribute naming a :class:`SiteRouter` subclass (``LoraRouter`` in
deltas/lora.py, ...). :class:`deltakit.serving.DeltaGroup` creates one router per modified module and kind of delta,
and hooks it while a ``route()`` block uses it. This module knows nothing of groups: it reads which rows go where
from the per-thread state a group hands it (``_local``), so methods import this, never :mod:`deltakit.serving`.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from torch import nn

from .errors import DeltaError, DeltaStateError
from .site import DeltaSite, factory_kwargs

__all__ = ["SiteRouter"]


class _RouterCall:
    """One router's state inside one route() block (so inside one thread)."""

    __slots__ = ("slots", "expanded", "captured", "gathered")

    def __init__(self, slots: torch.Tensor) -> None:
        self.slots = slots
        self.expanded: dict[tuple[int, torch.device | None], torch.Tensor] = {}
        self.captured: torch.Tensor | None = None
        # Gathered per-row factors kept between forward calls of the block (see SiteRouter.gather()).
        self.gathered: dict[str, tuple[torch.Tensor, torch.Tensor, bool, torch.Tensor | None]] = {}


class _ThreadState(threading.local):
    """What the current thread holds on one group: its open route() block, if any."""

    call: Any = None  # the open block (deltakit.serving._RouteCall) or None


_NO_CALLS = _ThreadState()  # a router not (yet) given a group's state sees no block


class SiteRouter:
    """Applies, on one host module, the per-site modules of several deltas of one kind, each row with its own.

    Subclasses implement :meth:`build` (stack the sites' factors, with a last all-zero slot) and :meth:`apply`
    (the routed forward hook given the stack and each row's slot). A router is created by :class:`~deltakit.serving.DeltaGroup`;
    while some thread's :meth:`~deltakit.serving.DeltaGroup.route` block uses it, its :meth:`forward_hook` sits in the host's deltakit
    hook. Which rows go where belongs to the block, so to the thread that opened it: in a thread with no block that
    uses this router the hook changes nothing.

    Args:
        host: The modified module.
        host_name: Its full name in the backbone (for error messages).
        entries: ``(delta, per-site module)`` pairs, in slot order.
    """

    #: Set by routers that read another module's input (a parallel adapter); :meth:`capture_input` is hooked there.
    source: nn.Module | None = None

    def __init__(self, host: nn.Module, host_name: str, entries: list[tuple[Any, DeltaSite]]) -> None:
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
        # (stamp, stack) as one attribute, so a thread never pairs one thread's stack with another's stamp.
        self._cache: tuple[Any, dict[str, torch.Tensor]] | None = None
        self._local: _ThreadState = _NO_CALLS  # the group's per-thread state (set by DeltaGroup)
        self._users = 0  # open blocks routing rows through this router (hooks installed while > 0)

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

    def stack(self) -> dict[str, torch.Tensor]:
        """The stacked factors, rebuilt when a parameter changed (version counter, storage, device or dtype).

        With autograd on and a trainable delta parameter, the stack is built differentiably at every call (so
        gradients reach the deltas) and not cached. Threads share the cache: two may build the same stack at
        once, and each uses a whole one.
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
        cache = self._cache
        if cache is not None and cache[0] == stamp:
            return cache[1]
        # Plain tensors (not inference tensors), so they can serve inside and outside inference_mode.
        with torch.inference_mode(False), torch.no_grad():
            stack = {k: v.to(**self._target()).contiguous() for k, v in self.build().items()}
        self._cache = (stamp, stack)
        return stack

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

    def gather(self, stack: dict[str, torch.Tensor], key: str, slots: torch.Tensor) -> torch.Tensor:
        """``stack[key][slots]``: each row's factors, copied out of the stack.

        ``generate()`` calls the model once per token with the same rows, so inside one :meth:`DeltaGroup.route`
        block the copy is kept from the second identical call on (same stack tensor, same slots, same inference
        mode) while the block's ``gather_cache_mb`` allows; a single forward pass keeps nothing. A rebuilt stack
        (changed parameters) is a new tensor and is gathered afresh.
        """
        source = stack[key]
        call, state = self._local.call, self._state()
        budget = None if call is None else call.budget
        if state is None or budget is None:
            return source.index_select(0, slots)
        inference = torch.is_inference_mode_enabled()
        entry = state.gathered.get(key)
        if entry is not None and entry[0] is source and entry[1] is slots and entry[2] == inference:
            if entry[3] is not None:
                return entry[3]
            gathered = source.index_select(0, slots)
            if budget.take(gathered.nbytes):
                state.gathered[key] = (source, slots, inference, gathered)
            return gathered
        gathered = source.index_select(0, slots)
        if not source.requires_grad:
            state.gathered[key] = (source, slots, inference, None)  # seen once: keep it if it comes again
        return gathered

    def _check_mode(self, module: nn.Module) -> None:
        if module.training:
            raise DeltaStateError(
                f"Per-sample routing is for inference: {self.host_name!r} is in training mode. Call model.eval() "
                f"(train each delta on its own, attached with DeltaGroup.switch())."
            )

    def forward_hook(self, host: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        """The routed forward hook (installed by :meth:`DeltaGroup.route`); the identity in a thread whose block
        does not use this router (or that has no block)."""
        state = self._state()
        if state is None:
            return output
        self._check_mode(host)
        first = state.captured if self.source is not None else (args[0] if args else next(iter(kwargs.values())))
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
