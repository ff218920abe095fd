"""The forward gate of a :class:`~deltakit.serving.DeltaGroup`: who may change the group's deltas, and when
forwards of the backbone may run.

Why it exists: a group's deltas are changed by ``switch()``, ``add()``, ``load()``, ``remove()`` and the first
``route()`` block (which takes the switched deltas off), from any thread, while other threads run forwards of the
same backbone or hold ``route()`` blocks. Without a gate a forward could run half with the old deltas and half with
the new ones, or silently without deltas taken off for routing. :class:`ServingGate` makes each change exclusive
(one writer, no block open, no forward that started before it still running) and holds forwards back meanwhile,
with a forward pre-hook that is on the backbone only while a change is under way or routing is strict, so a
backbone between changes runs with no cost from it.

It finds running forwards by walking thread stacks (frame identities and code objects only, see
:func:`_outermost_call`), which is the one delicate part of serving and the reason it has its own module:
:mod:`deltakit.serving` keeps what a group is (names, store, routing) and calls in here for exclusivity.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from torch import nn

from .errors import DeltaStateError
from .hooks import Dispatch

if TYPE_CHECKING:
    from .base import DeltaBase

__all__ = ["HELD_BLOCKS", "HeldBlocks", "ServingGate"]


class HeldBlocks(threading.local):
    """Route blocks the current thread holds over all groups (a thread holding one never waits behind a pending
    writer of another group, which could otherwise wait for it in turn)."""

    count = 0


HELD_BLOCKS = HeldBlocks()


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
    return {id(h) for h in module._forward_pre_hooks.values() if isinstance(h, Dispatch)}


def _entry_modules(model: nn.Module) -> list[nn.Module]:
    """The modules a forward of ``model`` starts at: the model, and for encoder-decoder models the encoder, which
    ``generate()`` calls on its own (duck-typed ``get_encoder()``)."""
    entries = [model]
    get_encoder = getattr(model, "get_encoder", None)
    if callable(get_encoder):
        try:
            encoder = get_encoder()
        except Exception:  # noqa: BLE001 - a model whose get_encoder() does not apply to it has no separate entry point
            encoder = None
        if isinstance(encoder, nn.Module) and encoder is not model:
            entries.append(encoder)
    return entries


class ServingGate:
    """A group's concurrency control: who may change its deltas, and when forwards of the backbone may run.

    * A *writer* (``switch``, ``add``, ``load``, ``remove``, and the first ``route()`` block when it must take the
      switched deltas off) waits until no ``route()`` block of the group is open, then puts a *gate* (a forward
      pre-hook) on the backbone's entry modules, waits until no forward that started before the gate is still
      running (found in the threads' stacks), does its work and takes the gate away. Forwards that reach the gate
      meanwhile wait for it. So a forward sees the group's deltas as they were before or after, never a mix, and
      between writes the backbone carries no deltakit hook of the group at all (nothing to slow a forward down).
    * ``route()`` blocks: any number, one per thread; their rows belong to the thread (``local.call``).
      While blocks are open and the group's switched deltas are off for routing (*strict* routing), the gate stays
      and refuses forwards of threads without a block (they would silently miss those deltas).

    Args:
        backbone: The group's model (the gate goes on its entry modules).
        local: The group's per-thread state (``local.call``: the thread's open block), shared with its routers.
    """

    def __init__(self, backbone: nn.Module, local: threading.local) -> None:
        self.backbone = backbone
        self.cond = threading.Condition()
        self.local: Any = local  # Any: a threading.local whose ``call`` the group sets and its routers read
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

    def close_gate(self) -> None:
        """Take the gate off the entry modules (the group calls it when the last strict block closes)."""
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

    # -------------------------------------------------------------- blocks
    def wait_to_open(self) -> None:
        """Wait (holding :attr:`cond`) until a ``route()`` block may open: no writer works, and none waits unless
        this thread already holds a block of some group (the writer may be waiting for that one: see
        :class:`HeldBlocks`)."""
        if self.writer is not None or (self.pending and not HELD_BLOCKS.count):
            self.check_caller("open a route() block")  # waiting from inside a forward would deadlock
        while self.writer is not None or (self.pending and not HELD_BLOCKS.count):
            self.cond.wait()

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
                self.close_gate()
            self.cond.notify_all()
