"""Hook plumbing: one dispatcher hook per host module, applying the attached deltas in a stable order.

Several deltas may modify the same host. Each host gets at most one deltakit forward hook (and at most one
forward pre-hook): a :class:`Dispatch` object holding entries ``fn`` ordered by ``(delta order, site)`` keys. A delta keeps its
order key for life, so detaching and re-attaching it puts it back in the same place and the outputs are
bit-for-bit what they were. When the last entry leaves, the hook itself is removed, so a detached model carries
no deltakit hook at all. The dispatcher lives only in the host's hook table: nothing global is patched.

Threads: a forward reads the dispatcher's entries once, as one immutable tuple, so an entry added or removed by
another thread (a ``route()`` block opening or closing) never makes a running forward skip or repeat an entry, and
a dispatcher whose hook was removed while a forward had already looked it up does nothing. Changes to the entries
are serialized by one lock. Whether a running forward should see a change at all is decided above this layer
(:mod:`deltakit.serving`).
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .site import DeltaSite  # noqa: F401 - re-exported: `from deltakit.hooks import DeltaSite` keeps working

ForwardFn = Callable[[nn.Module, tuple[Any, ...], dict[str, Any], Any], Any]
PreFn = Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], tuple[tuple[Any, ...], dict[str, Any]]]

# Entry lists are replaced, never edited in place; this lock keeps two writers (two threads opening route() blocks)
# from losing each other's update.
_EDIT = threading.Lock()


class Dispatch:
    """A forward hook (or pre-hook) that runs the attached delta functions of one host in order."""

    def __init__(self, host: nn.Module, pre: bool) -> None:
        self.pre = pre
        self.keys: tuple[tuple[int, int], ...] = ()
        self.fns: tuple[Any, ...] = ()
        self.removed = False
        # The deltas are part of the host's computation, so their hooks sit innermost: the forward hook first in
        # the host's table (user forward hooks always see the output with the deltas), the pre-hook last (after the
        # user pre-hooks present at attach time). Re-attaching therefore restores the same order.
        if pre:
            self.handle: RemovableHandle = host.register_forward_pre_hook(self, with_kwargs=True)
        else:
            self.handle = host.register_forward_hook(self, with_kwargs=True, prepend=True)

    def __call__(self, module: nn.Module, args: tuple[Any, ...], *rest: Any) -> Any:
        if self.removed:
            # Removed by another thread after this forward looked the hook up (torch may then call it without
            # kwargs): its entries are gone, so it changes nothing.
            return None
        fns = self.fns  # one snapshot for the whole call
        if self.pre:
            kwargs = rest[0]
            for fn in fns:
                args, kwargs = fn(module, args, kwargs)
            return args, kwargs
        kwargs, output = rest
        if not self._first(module) and isinstance(output, torch.Tensor):
            # A hook put before ours (registered later with prepend=True) may have kept a reference to the
            # output: deltas may update the output in place, so give them a copy.
            output = output.clone()
        for fn in fns:
            output = fn(module, args, kwargs, output)
        return output

    def _first(self, module: nn.Module) -> bool:
        try:
            return next(iter(module._forward_hooks.values())) is self
        except (RuntimeError, StopIteration):  # the table changed under us (another thread): play safe, copy
            return False

    def insert(self, key: tuple[int, int], fn: Any) -> None:
        index = bisect.bisect_left(self.keys, key)
        self.fns = (*self.fns[:index], fn, *self.fns[index:])
        self.keys = (*self.keys[:index], key, *self.keys[index:])

    def remove(self, key: tuple[int, int]) -> None:
        index = self.keys.index(key)
        self.fns = (*self.fns[:index], *self.fns[index + 1 :])
        self.keys = (*self.keys[:index], *self.keys[index + 1 :])

    def position(self, key: tuple[int, int]) -> int:
        return self.keys.index(key)


def _find(host: nn.Module, pre: bool) -> Dispatch | None:
    table = host._forward_pre_hooks if pre else host._forward_hooks
    for hook in table.values():
        if isinstance(hook, Dispatch):
            return hook
    return None


def add_hook(host: nn.Module, key: tuple[int, int], fn: Any, *, pre: bool = False) -> None:
    """Insert ``fn`` into the host's deltakit (pre-)hook at the position given by ``key``."""
    with _EDIT:
        dispatch = _find(host, pre) or Dispatch(host, pre)
        dispatch.insert(key, fn)


def remove_hook(host: nn.Module, key: tuple[int, int], *, pre: bool = False) -> None:
    """Remove the entry ``key``; the hook itself goes when its last entry does."""
    with _EDIT:
        dispatch = _find(host, pre)
        if dispatch is None or key not in dispatch.keys:
            return
        dispatch.remove(key)
        if not dispatch.keys:
            dispatch.removed = True  # before the handle goes: a forward that already looked it up skips it
            dispatch.handle.remove()


def hook_keys(host: nn.Module, *, pre: bool = False) -> list[tuple[int, int]]:
    """The order keys of the deltas hooked on ``host``, in application order."""
    dispatch = _find(host, pre)
    return list(dispatch.keys) if dispatch is not None else []
