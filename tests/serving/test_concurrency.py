"""Serving from several threads (issue 10, section 5): never a silently wrong answer.

The contract (docs/serving.md, "Concurrency"):

* every thread may hold its own ``route()`` block on one group; each block's rows use its own names, whatever the
  other threads route;
* ``switch()`` (and ``add`` / ``load`` / ``remove`` / ``refresh``) waits for the forwards already running on the
  backbone and for the other threads' ``route()`` blocks, and holds new ones back while it works: a forward sees
  the old or the new delta, never a mix;
* a forward with no block of its own, while other threads route a group whose switched deltas were taken off for
  routing, is refused with ``DeltaStateError``; with nothing switched in, it runs on the backbone as it would anyway;
* nothing is left attached by a failure: a block that ends in an exception removes its hooks.

Every loop is bounded in time (about a second on two cores) and counts what it checked; ``FIGURES`` collects the
counts (run with ``-s`` to see them).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from deltakit import (
    AdapterModel,
    BitFitModel,
    DeltaError,
    DeltaGroup,
    DeltaStateError,
    LoraModel,
    ParallelAdapterModel,
)
from deltakit.hooks import hook_keys

from tests.helpers import ARCHS, VOCAB, perturb
from tests.tolerances import tolerance, computation_size

FIGURES: dict[str, dict[str, int]] = {}
SECONDS = 1.0  # per concurrent loop


def _batch(n: int, seed: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (n, 6), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _hook_tables(model: nn.Module) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    """Every forward (pre-)hook of every module, by the hook's type name (compared with the bare model's)."""
    return {
        n: (tuple(type(h).__name__ for h in m._forward_hooks.values()),
            tuple(type(h).__name__ for h in m._forward_pre_hooks.values()))
        for n, m in model.named_modules()
    }


def _serving_group(model: nn.Module, methods: dict[str, Callable[[nn.Module, str], Any]]) -> DeltaGroup:
    group = DeltaGroup(model)
    for i, (name, make) in enumerate(methods.items()):
        delta = make(model, name)
        perturb(delta, seed=10 + i, scale=0.5)
        group.add(delta.detach())
    return group


MIXED: dict[str, Callable[[nn.Module, str], Any]] = {
    "a": lambda m, n: LoraModel(m, name=n, lora_r=4),
    "b": lambda m, n: AdapterModel(m, name=n, bottleneck_dim=4),
    "c": lambda m, n: LoraModel(m, name=n, lora_r=2, modified_modules=["query", "key", "value", "dense"]),
    "d": lambda m, n: BitFitModel(m, name=n),
}


def PARALLEL(m: nn.Module, n: str) -> Any:  # a factory, like the lambdas above
    return ParallelAdapterModel(m, name=n, bottleneck_dim=4)


def _references(group: DeltaGroup, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[Any, torch.Tensor]:
    """The whole batch run with each delta alone (switched in), and with none."""
    refs = {}
    with torch.no_grad():
        for name in [None, *group.names]:
            group.switch(name)
            refs[name] = model(**batch).logits
    group.switch(None)
    return refs


class _Checker:
    """Compares outputs with references under the rounding bound of two different computations."""

    def __init__(self, model: nn.Module, refs: dict[Any, torch.Tensor]) -> None:
        depth, reduction = computation_size(model)
        scale = max(r.abs().max().item() for r in refs.values())
        self.atol = tolerance(torch.float32, depth=depth, reduction=reduction, magnitude=scale)
        self.refs = refs
        # The references differ from each other far beyond the bound, so "close to one" names it.
        names = list(refs)
        for i, x in enumerate(names):
            for y in names[i + 1:]:
                assert (refs[x] - refs[y]).abs().max().item() > 100 * self.atol, (x, y)

    def row_ok(self, out: torch.Tensor, name: Any, row: int) -> bool:
        return (out - self.refs[name][row]).abs().max().item() <= self.atol

    def which(self, out: torch.Tensor) -> list[Any]:
        return [n for n, r in self.refs.items() if (out - r).abs().max().item() <= self.atol]


def _run_threads(n: int, body: Callable[[int], None]) -> list[BaseException]:
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            body(i)
        except BaseException as exc:  # reported by the test, never swallowed
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a thread hung (deadlock?)"
    return errors


def _record(name: str, **counts: int) -> None:
    FIGURES[name] = counts
    print(f"\n[concurrency] {name}: " + ", ".join(f"{k}={v:,}" for k, v in counts.items()))


# ---------------------------------------------------------------------------------------------------- route()
@pytest.mark.parametrize("switched", [None, "a"])
def test_concurrent_route_blocks_each_get_their_own_rows(switched: Any) -> None:
    arch = ARCHS["bert"]
    model = arch.build().eval()
    bare_tables = _hook_tables(model)
    group = _serving_group(model, MIXED)
    batch = _batch(4)
    refs = _references(group, model, batch)
    check = _Checker(model, refs)
    group.switch(switched)
    with torch.no_grad():
        before = model(**batch).logits
    counts = {"calls": 0, "rows": 0, "wrong": 0}
    lock = threading.Lock()
    deadline = time.monotonic() + SECONDS
    choices = [None, *group.names]

    def body(i: int) -> None:
        rng = random.Random(i)
        while time.monotonic() < deadline:
            names = [rng.choice(choices) for _ in range(4)]
            with torch.no_grad(), group.route(names):
                outs = [model(**batch).logits for _ in range(rng.randint(1, 3))]  # several calls per block
            wrong = sum(not check.row_ok(out[r], names[r], r) for out in outs for r in range(4))
            with lock:
                counts["calls"] += len(outs)
                counts["rows"] += 4 * len(outs)
                counts["wrong"] += wrong

    errors = _run_threads(6, body)
    _record(f"6 threads x route() blocks, switched={switched}", **counts)
    assert not errors, errors[:3]
    assert counts["wrong"] == 0 and counts["calls"] > 12
    assert group.active == ([] if switched is None else [switched])
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, before)
    group.switch(None)
    assert _hook_tables(model) == bare_tables


def test_route_block_state_belongs_to_its_thread() -> None:
    """Two threads interleave their blocks step by step: each keeps its own rows and kept factors."""
    model = ARCHS["llama"].build().eval()
    group = _serving_group(model, {"a": MIXED["a"], "b": MIXED["b"]})
    batch = {k: v[:2] for k, v in _batch(2).items()}
    refs = _references(group, model, batch)
    check = _Checker(model, refs)
    step = [threading.Barrier(2) for _ in range(4)]
    outs: dict[int, list[torch.Tensor]] = {0: [], 1: []}

    def body(i: int) -> None:
        names = ["a", "b"] if i == 0 else ["b", None]
        with torch.no_grad(), group.route(names):
            for barrier in step:
                barrier.wait()
                outs[i].append(model(**batch).logits)
        with pytest.raises(DeltaStateError, match="nested"):  # nesting is still refused within one thread
            with group.route(names), group.route(names):
                pass

    assert _run_threads(2, body) == []
    for out in outs[0]:
        assert check.row_ok(out[0], "a", 0) and check.row_ok(out[1], "b", 1)
    for out in outs[1]:
        assert check.row_ok(out[0], "b", 0) and check.row_ok(out[1], None, 1)


def test_plain_forward_while_another_thread_routes() -> None:
    """With a delta switched in, a forward with no block of its own is refused while another thread routes (the
    switched delta is off for routing); with nothing switched in it runs on the backbone."""
    model = ARCHS["bert"].build().eval()
    group = _serving_group(model, {"a": MIXED["a"], "b": MIXED["b"]})
    batch = _batch(2)
    refs = _references(group, model, batch)
    inside, leave = threading.Event(), threading.Event()

    def router(_: int) -> None:
        with torch.no_grad(), group.route(["b", "b"]):
            inside.set()
            leave.wait(30)

    for switched in (None, "a"):
        group.switch(switched)
        inside.clear(), leave.clear()
        thread = threading.Thread(target=router, args=(0,))
        thread.start()
        inside.wait(30)
        try:
            with torch.no_grad():
                if switched is None:
                    assert torch.equal(model(**batch).logits, refs[None])
                else:
                    with pytest.raises(DeltaStateError, match="route\\(\\) block.*another thread"):
                        model(**batch)
        finally:
            leave.set()
            thread.join()
        with torch.no_grad():  # and afterwards everything is back
            assert torch.equal(model(**batch).logits, refs[switched])
    group.switch(None)


# ---------------------------------------------------------------------------------------------------- switch()
def test_switch_never_changes_deltas_under_a_running_forward() -> None:
    arch = ARCHS["bert"]
    model = arch.build().eval()
    bare_tables = _hook_tables(model)
    group = _serving_group(model, {"a": MIXED["a"], "b": MIXED["b"], "c": MIXED["c"], "p": PARALLEL})
    batch = _batch(2)
    refs = _references(group, model, batch)
    check = _Checker(model, refs)
    counts = {"switches": 0, "forwards": 0, "wrong": 0}
    lock = threading.Lock()
    deadline = time.monotonic() + SECONDS
    cycle = [None, "a", "b", "p", "c", "a"]

    def body(i: int) -> None:
        if i == 0:
            k = 0
            while time.monotonic() < deadline:
                group.switch(cycle[k % len(cycle)])
                k += 1
            with lock:
                counts["switches"] += k
            return
        while time.monotonic() < deadline:
            with torch.no_grad():
                out = model(**batch).logits
            with lock:
                counts["forwards"] += 1
                counts["wrong"] += len(check.which(out)) != 1

    errors = _run_threads(4, body)
    _record("1 thread switch() x 3 threads forward", **counts)
    assert not errors, errors[:3]
    assert counts["wrong"] == 0 and counts["switches"] > 10 and counts["forwards"] > 10
    group.switch(None)
    assert _hook_tables(model) == bare_tables


def test_concurrent_forwards_with_a_parallel_adapter_attached() -> None:
    """A parallel adapter captures its input module's input for its output module: per thread."""
    model = ARCHS["bert"].build().eval()
    group = _serving_group(model, {"p": PARALLEL})
    batch = _batch(2)
    refs = _references(group, model, batch)
    group.switch("p")
    counts = {"forwards": 0, "wrong": 0}
    lock = threading.Lock()
    deadline = time.monotonic() + SECONDS

    def body(i: int) -> None:
        while time.monotonic() < deadline:
            with torch.no_grad():
                out = model(**batch).logits
            with lock:
                counts["forwards"] += 1
                counts["wrong"] += not torch.equal(out, refs["p"])  # the same computation as the reference

    errors = _run_threads(3, body)
    _record("3 threads forward, parallel adapter attached", **counts)
    assert not errors, errors[:3]
    assert counts["wrong"] == 0 and counts["forwards"] > 10


def test_switch_inside_a_block_or_forward_is_refused_not_a_deadlock() -> None:
    model = ARCHS["bert"].build().eval()
    group = _serving_group(model, {"a": MIXED["a"], "b": MIXED["b"]})
    batch = _batch(2)
    seen: list[BaseException] = []

    def hook(module: nn.Module, args: Any, out: Any) -> None:
        try:
            group.switch("b")
        except DeltaStateError as exc:
            seen.append(exc)

    group.switch("a")
    handle = model.bert.encoder.layer[0].register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        handle.remove()
    assert len(seen) == 1 and "inside a forward" in str(seen[0])
    assert group.active == ["a"]


# ---------------------------------------------------------------------------------------------------- two groups
def test_two_groups_on_one_backbone_routed_from_two_threads() -> None:
    arch = ARCHS["bert"]
    model = arch.build().eval()
    bare_tables = _hook_tables(model)
    with torch.no_grad():
        bare = model(**_batch(2)).logits
    g1 = _serving_group(model, {"a1": MIXED["a"], "b1": MIXED["d"]})
    g2 = _serving_group(model, {"a2": MIXED["b"], "b2": MIXED["c"]})
    batch = _batch(2)
    refs1, refs2 = _references(g1, model, batch), _references(g2, model, batch)
    check1, check2 = _Checker(model, refs1), _Checker(model, refs2)
    counts = {"calls": 0, "rows": 0, "wrong": 0}
    lock = threading.Lock()
    deadline = time.monotonic() + SECONDS

    def body(i: int) -> None:
        group, check = (g1, check1) if i % 2 == 0 else (g2, check2)
        rng = random.Random(i)
        choices = [None, *group.names]
        while time.monotonic() < deadline:
            names = [rng.choice(choices) for _ in range(2)]
            with torch.no_grad(), group.route(names):
                out = model(**batch).logits
            with lock:
                counts["calls"] += 1
                counts["rows"] += 2
                counts["wrong"] += sum(not check.row_ok(out[r], names[r], r) for r in range(2))

    errors = _run_threads(4, body)
    _record("2 groups x 2 threads each, route()", **counts)
    assert not errors, errors[:3]
    assert counts["wrong"] == 0 and counts["calls"] > 8
    assert _hook_tables(model) == bare_tables
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, bare)


def test_two_groups_one_with_a_switched_delta_refuses_instead_of_mixing() -> None:
    model = ARCHS["bert"].build().eval()
    g1 = _serving_group(model, {"a1": MIXED["a"], "b1": MIXED["d"]})
    g2 = _serving_group(model, {"a2": MIXED["b"]})
    batch = _batch(2)
    refs1 = _references(g1, model, batch)
    g1.switch("a1")  # g2's rows would need a1; while g1 routes, a1 is off: g2's forwards must be refused
    check1 = _Checker(model, refs1)
    counts = {"calls": 0, "refused": 0, "wrong": 0}
    lock = threading.Lock()
    deadline = time.monotonic() + SECONDS

    def body(i: int) -> None:
        while time.monotonic() < deadline:
            if i == 0:
                with torch.no_grad(), g1.route(["b1", "a1"]):
                    out = model(**batch).logits
                ok = check1.row_ok(out[0], "b1", 0) and check1.row_ok(out[1], "a1", 1)
                with lock:
                    counts["calls"] += 1
                    counts["wrong"] += not ok
            else:
                try:
                    with torch.no_grad(), g2.route(["a2", None]):
                        model(**batch)
                except DeltaStateError as exc:
                    assert "another thread" in str(exc)
                    with lock:
                        counts["refused"] += 1
                else:
                    with lock:
                        counts["calls"] += 1  # ran while g1 had no block open: a1 was on, as it must be

    errors = _run_threads(2, body)
    _record("2 groups, one with a switched delta", **counts)
    assert not errors, errors[:3]
    assert counts["wrong"] == 0
    assert g1.active == ["a1"]
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, refs1["a1"])


# ---------------------------------------------------------------------------------------------------- failures
class _Boom(RuntimeError):
    pass


def test_a_failure_inside_blocks_leaves_nothing_attached() -> None:
    arch = ARCHS["bert"]
    model = arch.build().eval()
    bare_tables = _hook_tables(model)
    batch = _batch(2)
    with torch.no_grad():
        bare = model(**batch).logits
    group = _serving_group(model, MIXED)
    fail = threading.local()

    def maybe_raise(module: nn.Module, args: Any, out: Any) -> None:
        if getattr(fail, "now", False):
            raise _Boom("mid-forward")

    user_handle = model.bert.encoder.layer[1].register_forward_hook(maybe_raise)
    counts = {"blocks": 0, "failed": 0}
    lock = threading.Lock()
    deadline = time.monotonic() + SECONDS

    def body(i: int) -> None:
        rng = random.Random(i)
        while time.monotonic() < deadline:
            fail.now = rng.random() < 0.5
            try:
                with torch.no_grad(), group.route([rng.choice(["a", "b", "c", "d"]), None]):
                    model(**batch)
                    if rng.random() < 0.2:
                        model(**{k: v[:1] for k, v in batch.items()})  # a wrong batch: DeltaError
            except (_Boom, DeltaError):
                with lock:
                    counts["failed"] += 1
            with lock:
                counts["blocks"] += 1
        fail.now = False

    errors = _run_threads(4, body)
    user_handle.remove()
    _record("4 threads, blocks failing mid-forward", **counts)
    assert not errors, errors[:3]
    assert counts["failed"] > 0
    assert _hook_tables(model) == bare_tables
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, bare)


# ---------------------------------------------------------------------------------------------------- refusals
def _order(model: nn.Module) -> tuple[list[int], dict[str, Any], list[str]]:
    return (
        [id(p) for p in model.parameters()],
        {n: (hook_keys(m), hook_keys(m, pre=True)) for n, m in model.named_modules()},
        list(model.state_dict()),
    )


def test_detach_and_attach_keep_the_order_of_parameters() -> None:
    model = ARCHS["bert"].build()
    a = LoraModel(model, name="a", modified_modules=["query"])
    b = BitFitModel(model, name="b", modified_modules=["query"])
    before = _order(model)
    a.detach()
    a.attach()
    assert _order(model) == before
    b.detach(), a.detach()
    b.attach(), a.attach()  # attach order differs from creation order: still the same order
    assert _order(model) == before


def test_a_refused_switch_changes_no_order() -> None:
    model = ARCHS["bert"].build().eval()
    group = DeltaGroup(model)
    lora = LoraModel(model, name="lo", modified_modules=["attention.output.dense"])
    adapter = AdapterModel(model, name="ad", modified_modules=["attention.output.dense"])
    group.add(lora)
    group.add(adapter.detach())
    outside = LoraModel(model, name="outside", modified_modules=["attention.output.dense"])  # created after ad
    perturb(outside)
    lora.detach()
    outside.merge()  # the adapter must not go under it (LoRA may: it commutes)
    extra = BitFitModel(model, name="extra", modified_modules=["attention.output.dense"])
    lora.attach()  # attached again after "extra" was created
    group.add(extra)
    before = _order(model)
    with pytest.raises(DeltaStateError, match="created after it is merged"):
        group.switch("ad")
    assert _order(model) == before and group.active == ["lo", "extra"]


def test_a_refused_route_changes_no_order() -> None:
    model = ARCHS["bert"].build().eval()
    group = DeltaGroup(model)
    first = AdapterModel(model, name="first", modified_modules=["attention.output.dense"])
    AdapterModel(model, name="mid", modified_modules=["attention.output.dense"])  # outside, created between
    last = AdapterModel(model, name="last", modified_modules=["attention.output.dense"])
    group.add(first)
    group.add(last)
    first.detach()
    first.attach()  # attached again after the others
    before = _order(model)
    with pytest.raises(DeltaStateError, match="created between group deltas"):
        with group.route(["first", "last"]):
            pass
    assert _order(model) == before and group.active == ["first", "last"]


# ---------------------------------------------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    "call, match",
    [
        (lambda g: g.switch(["a"]), "switch\\(\\) needs a delta name"),
        (lambda g: g.switch(3), "switch\\(\\) needs a delta name"),
        (lambda g: g.route([["a"], "b"]).__enter__(), "route\\(\\) needs .* got \\['a'\\] at position 0"),
        (lambda g: g.route([{"a": 1}]).__enter__(), "route\\(\\) needs .* at position 0"),
        (lambda g: g.route(["a", 7]).__enter__(), "route\\(\\) needs .* got 7 at position 1"),
        (lambda g: g.route(torch.tensor([1, 2])).__enter__(), "non-empty list"),
        (lambda g: g[["a"]], "no delta named"),
        (lambda g: g.remove(["a"]), "no delta named"),
    ],
)
def test_wrong_argument_types_are_clear_errors(call: Callable[[DeltaGroup], Any], match: str) -> None:
    model = ARCHS["bert"].build().eval()
    group = _serving_group(model, {"a": MIXED["a"], "b": MIXED["b"]})
    group.switch("a")
    before = (_order(model), _hook_tables(model))
    with pytest.raises(DeltaError, match=match):
        call(group)
    assert (_order(model), _hook_tables(model)) == before and group.active == ["a"]
    assert ["a"] not in group
