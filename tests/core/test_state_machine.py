"""A hypothesis state machine over the whole delta lifecycle (issue 10, section 7).

Random sequences of create / attach / detach / merge (exact and inexact) / unmerge / freeze_module / save / load and
the serving operations ``DeltaGroup.add/remove/switch/route`` run on a tiny BERT and a tiny Llama with LoRA, BitFit,
Adapter, LowRankAdapter, Compacter and ParallelAdapter deltas, several of them on the same modules. After every step:

* each delta's ``state`` is the one the lifecycle graph predicts (the machine tracks it itself);
* every host carries exactly the dispatcher entries of its attached deltas, in creation order;
* the output equals that of an *oracle*: a second copy of the backbone holding a twin of every delta (same
  parameters) that is only ever attached and detached. With only hooked deltas both run the same operations, so
  the outputs must be bit-for-bit equal; with merged deltas (or after an inexact unmerge) they are two different
  computations, compared with the rounding bound of :mod:`tests.tolerances`;
* with nothing merged, the backbone's own tensors are bit-for-bit the original ones (exact unmerge is exact).

Every operation either succeeds (and the checks above hold) or is refused with a :class:`~deltakit.DeltaError`
subclass and changes nothing: not the tensors, not the order of ``model.parameters()``, not the dispatcher order on
any host, not any delta's state, not the output. Any other exception is a failure. Operations the README promises
(detach an attached delta, unmerge the last merge on a module, merge the first delta on its modules, attach when
nothing is merged) must not be refused, and illegal transitions must be. ``detach_all_and_check`` (a rule, and the
teardown of every run) takes everything off and compares the model with a freshly built one: state_dict keys and
values, module tree, every hook table of every module, output. ``save_and_load_fresh`` loads a saved delta into a
fresh backbone and compares with the oracle bit-for-bit.

The default run is derandomized (the same examples on every machine); ``DELTAKIT_STRESS=1`` runs a larger, random
exploration (``test_lifecycle_state_machine_stress``, marked slow).
"""

from __future__ import annotations

import copy
import itertools
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from torch import nn

from deltakit import (
    AdapterModel,
    AutoDeltaModel,
    BitFitModel,
    CompacterModel,
    DeltaBase,
    DeltaError,
    DeltaGroup,
    LoraModel,
    LowRankAdapterModel,
    ParallelAdapterModel,
)
from deltakit.base import _member
from deltakit.hooks import hook_keys

from tests.helpers import VOCAB, tiny_bert, tiny_llama
from tests.tolerances import assert_same_function

STRESS = os.environ.get("DELTAKIT_STRESS", "") not in ("", "0")

# (method class, constructor arguments, candidate site lists). Role names resolve on both architectures; the site
# lists overlap on purpose (attn.o carries LoRA, BitFit and the adapter family) so that ordering rules are exercised.
METHODS: dict[str, tuple[type[DeltaBase], dict[str, Any], list[list[str] | None]]] = {
    "lora": (
        LoraModel, {"lora_r": 4, "lora_alpha": 8}, [["attn.q"], ["attn.o"], ["attn.q", "attn.o"], ["attn.v", "ff.w2"]]
    ),
    "bitfit": (BitFitModel, {}, [["attn.o"], ["attn.o", "ff.norm"], ["ff.w2"]]),
    "adapter": (AdapterModel, {"bottleneck_dim": 4}, [["attn.o"], ["ff.w2"], ["attn.o", "ff.w2"]]),
    "low_rank_adapter": (LowRankAdapterModel, {"reduction_factor": 8}, [["attn.o"], ["ff.w2"]]),
    "compacter": (CompacterModel, {"reduction_factor": 4, "hypercomplex_division": 4}, [["attn.o"], ["ff.w2"]]),
    "parallel_adapter": (ParallelAdapterModel, {"bottleneck_dim": 4}, [None]),  # ff.w1 input -> ff.w2 output
}
MERGEABLE = {"lora", "bitfit"}
ARCH_BUILD: dict[str, tuple[Callable[[], nn.Module], str]] = {
    "bert": (tiny_bert, "classifier"),
    "llama": (tiny_llama, "lm_head"),
}
MAX_DELTAS = 6
# Size of |W| + |delta| bounding the rounding of an inexact unmerge ((W + d) - d): the perturbed factors are
# randn * 0.2, so merged updates stay well below 1.
_DRIFT_SCALE = 8.0
BATCH = 3

#: What the runs did, over all examples of the session (printed by the tests; see the issue's closing figures).
STATS: Counter[str] = Counter()


def _inputs(arch: str) -> dict[str, torch.Tensor]:
    ids = torch.randint(2, VOCAB, (BATCH, 6), generator=torch.Generator().manual_seed(7))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _run(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


_HOOK_TABLES = (
    "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
    "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
)


def _hook_tables(model: nn.Module) -> dict[str, tuple[tuple[str, ...], ...]]:
    """Every hook table of every module, as the hook callables' type names (ids differ between two models)."""
    return {
        name: tuple(tuple(type(h).__qualname__ for h in getattr(m, t).values()) for t in _HOOK_TABLES)
        for name, m in model.named_modules()
    }


def _assert_backbone_tensor(actual: torch.Tensor, original: torch.Tensor, drift: int, where: str) -> None:
    """Bit-for-bit the original, or, after ``drift`` inexact unmerges, within their rounding (floating tensors)."""
    if drift and original.is_floating_point():
        assert_same_function(actual, original, depth=drift, reduction=1, scale=_DRIFT_SCALE, note=where)
    else:
        assert torch.equal(actual, original), f"{where}: not the original tensor (an unmerge was not exact?)"


@dataclass
class Tracked:
    """One delta of the model under test, what the machine expects of it, and its twin on the oracle backbone."""

    delta: DeltaBase
    twin: DeltaBase
    method: str
    state: str = "attached"
    merge_seq: int = 0  # when it was merged (to know the reverse order)
    exact: bool = True
    in_group: bool = False


@dataclass
class Snapshot:
    state: dict[str, torch.Tensor]
    params: list[int]
    grads: list[bool]
    dispatch: dict[str, tuple[list[Any], list[Any]]]
    hooks: dict[str, Any]
    modules: list[str]
    states: list[str]
    group: tuple[list[str], list[str]]
    output: torch.Tensor


class LifecycleMachine(RuleBasedStateMachine):
    """The state machine; subclasses set :attr:`ARCH`."""

    ARCH = "bert"

    def __init__(self) -> None:
        super().__init__()
        build, self.head = ARCH_BUILD[self.ARCH]
        self.pristine = build()
        self.model = build()
        self.oracle = build()
        self.inputs = _inputs(self.ARCH)
        self.original_output = _run(self.pristine, self.inputs)
        self.original_state = {k: v.clone() for k, v in self.pristine.state_dict().items()}
        self.original_tensors = dict(itertools.chain(self.pristine.named_parameters(), self.pristine.named_buffers()))
        self.group = DeltaGroup(self.model)
        self.tracked: list[Tracked] = []
        self.checkpoints: list[tuple[str, int, bool]] = []  # (path, index of the saved delta, holds backbone tensors)
        self.tmp = tempfile.mkdtemp(prefix="deltakit-sm-")
        self.merge_counter = itertools.count(1)
        self.names = itertools.count()
        self.drift = 0  # inexact unmerges so far: the backbone is then equal to the original only up to rounding
        self.oracle_memo: dict[frozenset[int], torch.Tensor] = {}
        self.exact_memo: dict[tuple[Any, ...], torch.Tensor] = {}
        self.order_memo: dict[frozenset[int], tuple[list[int], list[str]]] = {}
        STATS["examples"] += 1

    # ------------------------------------------------------------------ helpers
    def _active(self) -> frozenset[int]:
        return frozenset(i for i, t in enumerate(self.tracked) if t.state != "detached")

    def _expected(self, active: frozenset[int]) -> torch.Tensor:
        """The output with exactly the deltas ``active`` applied, from the oracle (hooks only)."""
        if active not in self.oracle_memo:
            for i, t in enumerate(self.tracked):
                if i in active and t.twin.state == "detached":
                    t.twin.attach()
                elif i not in active and t.twin.state == "attached":
                    t.twin.detach()
            self.oracle_memo[active] = _run(self.oracle, self.inputs)
        return self.oracle_memo[active]

    def _snapshot(self) -> Snapshot:
        return Snapshot(
            state={k: v.detach().clone() for k, v in self.model.state_dict().items()},
            params=[id(p) for p in self.model.parameters()],
            grads=[p.requires_grad for p in self.model.parameters()],
            dispatch={n: (hook_keys(m), hook_keys(m, pre=True)) for n, m in self.model.named_modules()},
            hooks=_hook_tables(self.model),
            modules=[n for n, _ in self.model.named_modules()],
            states=[t.delta.state for t in self.tracked],
            group=(self.group.names, self.group.active),
            output=_run(self.model, self.inputs),
        )

    def _assert_unchanged(self, before: Snapshot, what: str) -> None:
        after = self._snapshot()
        assert after.states == before.states, f"refused {what} changed delta states: {before.states} -> {after.states}"
        assert after.modules == before.modules, f"refused {what} changed the module tree"
        assert after.dispatch == before.dispatch, f"refused {what} changed the dispatcher order on a host"
        assert after.hooks == before.hooks, f"refused {what} changed a hook table"
        assert after.params == before.params, f"refused {what} changed the order of model.parameters()"
        assert after.grads == before.grads, f"refused {what} changed requires_grad flags"
        assert list(after.state) == list(before.state), f"refused {what} changed the state_dict keys"
        for key, value in before.state.items():
            assert torch.equal(after.state[key], value), f"refused {what} changed {key}"
        assert after.group == before.group, f"refused {what} changed the group"
        assert torch.equal(after.output, before.output), f"refused {what} changed the output"

    def _attempt(self, what: str, fn: Callable[[], Any], *, must: bool | None = None) -> tuple[bool, Any]:
        """Run an operation. ``must=True``: it must succeed; ``False``: it must be refused; ``None``: either.

        A refusal must be a DeltaError and change nothing; any other exception propagates (a failure).
        """
        STATS[f"tried {what}"] += 1
        STATS["steps"] += 1
        before = self._snapshot()
        try:
            result = fn()
        except DeltaError as exc:
            STATS[f"refused {what}"] += 1
            assert must is not True, f"{what} was refused although the lifecycle allows it: {exc}"
            self._assert_unchanged(before, what)
            return False, exc
        assert must is not False, f"{what} succeeded although the lifecycle forbids it"
        return True, result

    def _hosts(self, t: Tracked) -> set[int]:
        return {id(s.host) for s in t.delta.sites}

    def _sharing(self, t: Tracked, states: tuple[str, ...]) -> list[Tracked]:
        return [o for o in self.tracked if o is not t and o.state in states and self._hosts(o) & self._hosts(t)]

    def _name_clash(self, t: Tracked) -> bool:
        return any(o is not t and o.state != "detached" and o.delta.name == t.delta.name for o in self.tracked)

    def _add_twin(self, delta: DeltaBase, method: str) -> Tracked:
        twin = type(delta).from_config(copy.deepcopy(delta.config), self.oracle, name=f"twin{len(self.tracked)}")
        own, theirs = list(delta.parameters()), list(twin.parameters())
        assert [p.shape for p in own] == [p.shape for p in theirs]
        with torch.no_grad():
            for mine, other in zip(own, theirs):
                other.copy_(mine)
        twin.detach()
        self.oracle_memo.clear()
        t = Tracked(delta, twin, method)
        self.tracked.append(t)
        return t

    # ------------------------------------------------------------------ rules: lifecycle
    @initialize(first=st.sampled_from(sorted(METHODS)), second=st.sampled_from(sorted(METHODS)), grouped=st.booleans())
    def two_deltas(self, first: str, second: str, grouped: bool) -> None:
        """Every run starts with two deltas (often on the same modules), so that short runs meet ordering rules."""
        self.create(first, 1, True, 0)
        self.create(second, 0, True, 1)
        if grouped:
            for i in range(len(self.tracked)):
                self.group_add(i)

    @precondition(lambda self: len(self.tracked) < MAX_DELTAS)
    @rule(method=st.sampled_from(sorted(METHODS)), which=st.integers(0, 3), named=st.booleans(), seed=st.integers(0, 9))
    def create(self, method: str, which: int, named: bool, seed: int) -> None:
        cls, kwargs, site_lists = METHODS[method]
        sites = site_lists[which % len(site_lists)]
        name = f"d{next(self.names)}" if named else None  # unnamed: the default child name, which may clash
        ok, delta = self._attempt("create", lambda: cls(self.model, modified_modules=sites, name=name, **kwargs))
        if not ok:
            return
        assert delta.state == "attached"
        # A fresh delta is the identity (checked by the output invariant); give it an effect.
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in delta.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        self._add_twin(delta, method)

    @precondition(lambda self: self.tracked)
    @rule(i=st.integers(0, MAX_DELTAS - 1))
    def attach(self, i: int) -> None:
        t = self.tracked[i % len(self.tracked)]
        must = None
        if t.state != "detached":
            must = False
        elif not any(o.state == "merged" for o in self.tracked) and not self._name_clash(t):
            must = True
        ok, _ = self._attempt("attach", t.delta.attach, must=must)
        if ok:
            t.state = "attached"

    @precondition(lambda self: self.tracked)
    @rule(i=st.integers(0, MAX_DELTAS - 1))
    def detach(self, i: int) -> None:
        t = self.tracked[i % len(self.tracked)]
        ok, _ = self._attempt("detach", t.delta.detach, must=t.state == "attached")
        if ok:
            t.state = "detached"

    @precondition(lambda self: self.tracked)
    @rule(i=st.integers(0, MAX_DELTAS - 1), exact=st.booleans())
    def merge(self, i: int, exact: bool) -> None:
        t = self.tracked[i % len(self.tracked)]
        must = None
        if t.state != "attached" or t.method not in MERGEABLE:
            must = False
        elif (t.method == "lora" or self.ARCH == "bert") and not any(
            o.delta._order_key < t.delta._order_key for o in self._sharing(t, ("attached",))
        ):
            must = True  # first hooked delta on each of its modules, and every host has the tensor it merges into
        ok, _ = self._attempt(f"merge(exact_unmerge={exact})", lambda: t.delta.merge(exact_unmerge=exact), must=must)
        if ok:
            t.state, t.exact, t.merge_seq = "merged", exact, next(self.merge_counter)

    @precondition(lambda self: self.tracked)
    @rule(i=st.integers(0, MAX_DELTAS - 1))
    def unmerge(self, i: int) -> None:
        t = self.tracked[i % len(self.tracked)]
        must = None
        if t.state != "merged":
            must = False
        elif all(o.merge_seq < t.merge_seq for o in self._sharing(t, ("merged",))):
            must = True  # "Stacked merges unmerge in reverse order" (README)
        ok, _ = self._attempt("unmerge", t.delta.unmerge, must=must)
        if ok:
            t.state = "attached"
            if not t.exact:
                self.drift += 1
                self.exact_memo.clear()

    @precondition(lambda self: self.tracked)
    @rule(i=st.integers(0, MAX_DELTAS - 1), variant=st.integers(0, 4), set_state_dict=st.booleans())
    def freeze_module(self, i: int, variant: int, set_state_dict: bool) -> None:
        t = self.tracked[i % len(self.tracked)]
        other = self.tracked[(i + 1) % len(self.tracked)].delta
        exclude = [None, ["deltas"], ["deltas", self.head], [other], ["deltas", "no_such_module_xyz"]][variant]
        ok, _ = self._attempt(
            "freeze_module",
            lambda: t.delta.freeze_module(exclude=exclude, set_state_dict=set_state_dict),
            must=False if variant == 4 else True,
        )
        if not ok:
            return
        keep: set[int] = set()
        for entry in exclude or ["deltas"]:
            if entry == "deltas":
                keep |= {id(p) for p in t.delta.parameters()}
            elif isinstance(entry, DeltaBase):
                keep |= {id(p) for p in entry.parameters()}
            else:
                keep |= {id(p) for p in self.model.get_submodule(entry).parameters()}
        for name, p in self.model.named_parameters():
            assert p.requires_grad == (id(p) in keep), f"freeze_module: {name}.requires_grad is {p.requires_grad}"

    # ------------------------------------------------------------------ rules: serving
    @precondition(lambda self: self.tracked)
    @rule(i=st.integers(0, MAX_DELTAS - 1))
    def group_add(self, i: int) -> None:
        t = self.tracked[i % len(self.tracked)]
        clash = t.in_group or t.delta.name in self.group
        ok, _ = self._attempt("group.add", lambda: self.group.add(t.delta), must=not clash)
        if ok:
            t.in_group = True

    @precondition(lambda self: any(t.in_group for t in self.tracked))
    @rule(i=st.integers(0, MAX_DELTAS - 1))
    def group_remove(self, i: int) -> None:
        members = [t for t in self.tracked if t.in_group]
        t = members[i % len(members)]
        ok, _ = self._attempt("group.remove", lambda: self.group.remove(t.delta.name), must=t.state != "merged")
        if ok:
            t.in_group = False
            t.state = "detached"

    @rule(i=st.integers(-1, MAX_DELTAS - 1))
    def switch(self, i: int) -> None:
        members = [t for t in self.tracked if t.in_group]
        target = members[i % len(members)] if members and i >= 0 else None
        name = target.delta.name if target is not None else None
        must = None
        if not any(t.state == "merged" for t in self.tracked) and (target is None or not self._name_clash(target)):
            must = True
        ok, _ = self._attempt("switch", lambda: self.group.switch(name), must=must)
        if not ok:
            return
        for t in members:
            if t is target:
                t.state = "merged" if t.state == "merged" else "attached"
            elif t.state == "attached":
                t.state = "detached"

    @rule(picks=st.lists(st.integers(-1, MAX_DELTAS - 1), min_size=BATCH, max_size=BATCH))
    def route(self, picks: list[int]) -> None:
        members = [t for t in self.tracked if t.in_group]
        rows = [members[k % len(members)] if members and k >= 0 else None for k in picks]
        names = [t.delta.name if t is not None else None for t in rows]
        out: list[torch.Tensor] = []

        def run() -> None:
            with self.group.route(names):
                out.append(_run(self.model, self.inputs))

        calm = not any(t.state == "merged" for t in self.tracked) and all(
            t.in_group or t.state == "detached" for t in self.tracked
        )
        before = self._snapshot()
        ok, _ = self._attempt("route", run, must=True if calm else None)
        if not ok:
            return
        after = self._snapshot()
        # route() detaches the group's deltas for the block and re-attaches them: afterwards all is as before.
        assert after.states == before.states and after.dispatch == before.dispatch and after.hooks == before.hooks
        assert torch.equal(after.output, before.output)
        outside = frozenset(i for i, t in enumerate(self.tracked) if t.state != "detached" and not t.in_group)
        for r, t in enumerate(rows):
            active = outside | ({self.tracked.index(t)} if t is not None else set())
            expected = self._expected(active)[r]
            assert_same_function(out[0][r], expected, model=self.model, note=f"route row {r} ({names[r]})")

    # ------------------------------------------------------------------ rules: checkpoints
    @precondition(lambda self: self.tracked)
    @rule(i=st.integers(0, MAX_DELTAS - 1))
    def save_and_load_fresh(self, i: int) -> None:
        index = i % len(self.tracked)
        t = self.tracked[index]
        path = os.path.join(self.tmp, f"ckpt{len(self.checkpoints)}")
        ok, _ = self._attempt("save", lambda: t.delta.save_finetuned(path), must=True)
        if not ok:
            return
        self.checkpoints.append((path, index, bool(t.delta.unfrozen_parameter_names)))
        fresh = copy.deepcopy(self.pristine)
        loaded = AutoDeltaModel.from_finetuned(path, fresh)
        STATS["loaded into a fresh backbone"] += 1
        for (n, a), (_, b) in zip(t.delta.named_parameters(), loaded.named_parameters()):
            assert torch.equal(a, b), f"load changed {n}"
        assert torch.equal(_run(fresh, self.inputs), self._expected(frozenset({index}))), "save/load is not exact"

    @precondition(lambda self: self.checkpoints and len(self.tracked) < MAX_DELTAS)
    @rule(k=st.integers(0, 20), via_group=st.booleans())
    def load(self, k: int, via_group: bool) -> None:
        path, source, backbone_tensors = self.checkpoints[k % len(self.checkpoints)]
        name = f"l{next(self.names)}"
        if via_group:
            ok, delta = self._attempt(
                "group.load", lambda: self.group.load(name, path), must=not backbone_tensors
            )
        else:
            ok, delta = self._attempt(
                "load", lambda: AutoDeltaModel.from_finetuned(path, self.model, name=name), must=True
            )
        if not ok:
            return
        for a, b in zip(self.tracked[source].delta.parameters(), delta.parameters()):
            assert torch.equal(a, b), "a loaded delta differs from the saved one"
        t = self._add_twin(delta, self.tracked[source].method)
        t.state, t.in_group = delta.state, via_group
        assert t.state == ("detached" if via_group else "attached")

    # ------------------------------------------------------------------ detaching everything
    @rule()
    def detach_all_and_check(self) -> None:
        """Unmerge in reverse merge order, detach everything, and compare with a freshly built backbone."""
        for t in sorted((t for t in self.tracked if t.state == "merged"), key=lambda t: -t.merge_seq):
            ok, _ = self._attempt("unmerge", t.delta.unmerge, must=True)
            t.state = "attached"
            if not t.exact:
                self.drift += 1
        for t in self.tracked:
            if t.state == "attached":
                self._attempt("detach", t.delta.detach, must=True)
                t.state = "detached"
        self.exact_memo.clear()
        STATS["detach-all checks"] += 1
        assert [n for n, _ in self.model.named_modules()] == [n for n, _ in self.pristine.named_modules()]
        assert _hook_tables(self.model) == _hook_tables(self.pristine), "hooks left after detaching everything"
        state = self.model.state_dict()
        assert list(state) == list(self.original_state), "state_dict keys differ from the original"
        assert [n for n, _ in self.model.named_parameters()] == [n for n, _ in self.pristine.named_parameters()]
        for key, value in self.original_state.items():
            _assert_backbone_tensor(state[key], value, self.drift, f"{key} after detaching everything")
        output = _run(self.model, self.inputs)
        if self.drift:
            assert_same_function(output, self.original_output, model=self.model)
        else:
            assert torch.equal(output, self.original_output), "outputs differ from the original backbone's"

    def teardown(self) -> None:
        try:
            self.detach_all_and_check()
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)

    # ------------------------------------------------------------------ invariants
    @invariant()
    def states_agree(self) -> None:
        for i, t in enumerate(self.tracked):
            assert t.delta.state == t.state, (
                f"delta {i} ({t.method} {t.delta.name!r}) is {t.delta.state}, expected {t.state}"
            )
        assert sorted(self.group.names) == sorted(t.delta.name for t in self.tracked if t.in_group)

    @invariant()
    def dispatchers_hold_exactly_the_attached_deltas(self) -> None:
        post: dict[int, list[Any]] = {}
        pre: dict[int, list[Any]] = {}
        for t in self.tracked:
            if t.state != "attached":
                continue
            for site in t.delta.sites:
                key = t.delta._hook_key(site)
                if _member(site.module, "forward_hook") is not None:
                    post.setdefault(id(site.host), []).append(key)
                if _member(site.module, "forward_pre_hook") is not None:
                    pre.setdefault(id(site.host), []).append(key)
                source = _member(site.module, "input_source")
                if source is not None:
                    pre.setdefault(id(source), []).append(key)
        for name, module in self.model.named_modules():
            assert hook_keys(module) == sorted(post.get(id(module), [])), f"forward dispatcher of {name!r}"
            assert hook_keys(module, pre=True) == sorted(pre.get(id(module), [])), f"pre dispatcher of {name!r}"

    @invariant()
    def parameter_order_depends_only_on_the_active_deltas(self) -> None:
        """An optimizer state loaded by position must land on the same tensors: the order of ``model.parameters()``
        (and of the module tree) is a function of which deltas are on the model, whatever the history."""
        key = self._active()
        order = ([id(p) for p in self.model.parameters()], [n for n, _ in self.model.named_modules()])
        seen = self.order_memo.setdefault(key, order)
        assert order[0] == seen[0], "model.parameters() order differs from an earlier visit of the same deltas"
        assert order[1] == seen[1], "module tree order differs from an earlier visit of the same deltas"

    @invariant()
    def output_matches_the_oracle(self) -> None:
        output = _run(self.model, self.inputs)
        expected = self._expected(self._active())
        merged = tuple(sorted((t.merge_seq, i, t.exact) for i, t in enumerate(self.tracked) if t.state == "merged"))
        if not merged and not self.drift:
            assert torch.equal(output, expected), "hooked deltas: output differs from the oracle's"
        else:
            assert_same_function(output, expected, model=self.model, note="merged deltas vs the oracle")
            # The same configuration reached again runs the same operations: bit-for-bit.
            key = (self._active(), merged)
            if key in self.exact_memo:
                assert torch.equal(output, self.exact_memo[key]), "same merged configuration, different output"
            self.exact_memo[key] = output

    @invariant()
    def backbone_is_original_when_nothing_is_merged(self) -> None:
        if any(t.state == "merged" for t in self.tracked):
            return
        tensors = dict(itertools.chain(self.model.named_parameters(), self.model.named_buffers()))
        for name, value in self.original_tensors.items():
            _assert_backbone_tensor(tensors[name].detach(), value, self.drift, f"{name} with nothing merged")


def _machine(arch: str) -> type[LifecycleMachine]:
    return type(f"LifecycleMachine_{arch}", (LifecycleMachine,), {"ARCH": arch})


def _report(arch: str) -> None:
    refused = sum(v for k, v in STATS.items() if k.startswith("refused"))
    tried = sum(v for k, v in STATS.items() if k.startswith("tried"))
    print(f"\n[{arch}] examples {STATS['examples']}, operations {tried}, refused {refused}; " + ", ".join(
        f"{k} {v}" for k, v in sorted(STATS.items()) if k.startswith(("tried", "refused", "loaded", "detach-all"))
    ))


DEFAULT = settings(
    max_examples=12, stateful_step_count=25, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.mark.parametrize("arch", sorted(ARCH_BUILD))
def test_lifecycle_state_machine(arch: str) -> None:
    STATS.clear()
    run_state_machine_as_test(_machine(arch), settings=DEFAULT)
    _report(arch)


@pytest.mark.slow
@pytest.mark.skipif(not STRESS, reason="set DELTAKIT_STRESS=1 for the long random exploration")
@pytest.mark.parametrize("arch", sorted(ARCH_BUILD))
def test_lifecycle_state_machine_stress(arch: str) -> None:
    STATS.clear()
    stress = settings(
        max_examples=int(os.environ.get("DELTAKIT_STRESS_EXAMPLES", "400")), stateful_step_count=60, deadline=None,
        database=None, suppress_health_check=[HealthCheck.too_slow],
    )
    run_state_machine_as_test(_machine(arch), settings=stress)
    _report(arch)
