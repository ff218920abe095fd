"""Per-sample routing (DeltaGroup.route): mixed batches in forward and generate(), caching, errors."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from deltakit import (
    AdapterModel,
    BitFitModel,
    CompacterModel,
    DeltaError,
    DeltaGroup,
    DeltaStateError,
    LoraModel,
    LowRankAdapterModel,
    ParallelAdapterModel,
)
from deltakit.base import DeltaBase
from deltakit.config import DeltaConfig
from deltakit.hooks import DeltaSite
from deltakit.site import Composition

from tests.tolerances import assert_same_function, assert_same_gradients
from tests.helpers import ARCHS, VOCAB, Arch, assert_state_equal, hook_counts, perturb, snapshot, tiny_bert


# One factory per method: (model, name, variant) -> delta. ``variant`` changes hyper-parameters, so one stack
# mixes ranks / bottleneck widths.
METHODS: dict[str, Callable[[nn.Module, str, int], DeltaBase]] = {
    "lora": lambda m, n, v: LoraModel(m, name=n, lora_r=4 + 4 * v),
    "lora_all": lambda m, n, v: LoraModel(
        m, name=n, lora_r=2 + v, modified_modules=["attn.q", "attn.k", "attn.v", "attn.o", "ff.w1", "ff.w2"]
    ),
    "bitfit": lambda m, n, v: BitFitModel(m, name=n),
    "adapter": lambda m, n, v: AdapterModel(m, name=n, bottleneck_dim=4 + 2 * v),
    "parallel_adapter": lambda m, n, v: ParallelAdapterModel(m, name=n, bottleneck_dim=6 - v),
    "low_rank_adapter": lambda m, n, v: LowRankAdapterModel(
        m, name=n, reduction_factor=4 * (1 + v), low_rank_rank=1 + v
    ),
    "compacter": lambda m, n, v: CompacterModel(m, name=n, reduction_factor=4, hypercomplex_division=2),
}


def make_group(model: nn.Module, specs: list[tuple[str, str]], scale: float = 0.3) -> DeltaGroup:
    """A group of perturbed (non-identity), detached deltas: ``specs`` = [(name, method), ...]."""
    group = DeltaGroup(model)
    for i, (name, method) in enumerate(specs):
        delta = METHODS[method](model, name, i % 2)
        perturb(delta, seed=100 + i, scale=scale)
        delta.detach()
        group.add(delta)
    return group


def batch_for(arch: Arch, n: int, seed: int = 7, length: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (n, length), generator=g)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if arch.encoder_decoder:
        out["decoder_input_ids"] = torch.randint(2, VOCAB, (n, 5), generator=g)
    return out


def rows(batch: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    return {k: v[i : i + 1] for k, v in batch.items()}


def routed_paths(group: DeltaGroup) -> dict[str, int]:
    """Routed calls so far by path (gather / segment), over every router of the group."""
    return {k: sum(r.calls[k] for r in group._routers or []) for k in ("gather", "segment")}


def alone_logits(
    group: DeltaGroup, model: nn.Module, batch: dict[str, torch.Tensor], names: list[Any]
) -> list[torch.Tensor]:
    """Each sample run on its own with its delta switched in (the reference routing must match)."""
    out = []
    for i, name in enumerate(names):
        group.switch(name)
        with torch.no_grad():
            out.append(model(**rows(batch, i)).logits[0])
    group.switch(None)
    return out


@pytest.mark.parametrize("method", list(METHODS))
def test_route_matches_each_sample_alone(arch: Arch, method: str) -> None:
    model = arch.build()
    group = make_group(model, [("t0", method), ("t1", method), ("t2", method)])
    names = ["t1", None, "t0", "t2", "t1", None]
    batch = batch_for(arch, len(names))
    with torch.no_grad(), group.route(names):
        mixed = model(**batch).logits
    refs = alone_logits(group, model, batch, names)
    for i, ref in enumerate(refs):
        assert_same_function(mixed[i], ref, model=model)
    # Row 0 really uses its own delta: its input through another delta, or none, gives other logits.
    first_row = {k: v[[0, 0, 0]] for k, v in batch.items()}
    for other in alone_logits(group, model, first_row, [None, "t0", "t2"]):
        assert not torch.allclose(mixed[0], other, atol=1e-4)


def test_route_mixes_every_method_in_one_batch(arch: Arch) -> None:
    model = arch.build()
    specs = [(f"d_{m}", m) for m in METHODS]
    group = make_group(model, specs)
    names = [n for n, _ in specs] + [None]
    batch = batch_for(arch, len(names))
    with torch.inference_mode(), group.route(names):
        mixed = model(**batch).logits
    refs = alone_logits(group, model, batch, names)
    for i, ref in enumerate(refs):
        assert_same_function(mixed[i], ref, model=model)
    base = refs[-1]
    assert all(not torch.allclose(r, base, atol=1e-4) for r in refs[:-1])  # every delta is active in its row


def test_route_lora_on_embeddings() -> None:
    arch = ARCHS["llama"]
    model = arch.build()
    group = DeltaGroup(model)
    for i, r in enumerate((2, 5)):
        delta = LoraModel(model, name=f"e{i}", lora_r=r, modified_modules=["embed_tokens", "attn.q"])
        perturb(delta, seed=i)
        group.add(delta.detach())
    names = ["e1", None, "e0", "e1"]
    batch = batch_for(arch, len(names))
    with torch.no_grad(), group.route(names):
        mixed = model(**batch).logits
    for i, ref in enumerate(alone_logits(group, model, batch, names)):
        assert_same_function(mixed[i], ref, model=model)


GENERATE_KW = {
    "greedy": {"num_beams": 1},
    "beam": {"num_beams": 3},
    "beam_return_2": {"num_beams": 3, "num_return_sequences": 2},
}


@pytest.mark.parametrize("mode", list(GENERATE_KW))
@pytest.mark.parametrize("arch_name", ["gpt2", "llama", "t5"])
def test_route_generate(arch_name: str, mode: str) -> None:
    arch = ARCHS[arch_name]
    model = arch.build()
    group = make_group(model, [("a", "lora"), ("b", "bitfit"), ("c", "adapter"), ("d", "parallel_adapter")], scale=1.0)
    names = ["a", None, "b", "c", "d"]
    ids = batch_for(arch, len(names), seed=11, length=6)["input_ids"]
    kw = dict(
        max_new_tokens=5, min_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True,
        pad_token_id=0, **GENERATE_KW[mode],
    )
    k = kw.get("num_return_sequences", 1)
    with torch.no_grad(), group.route(names):
        mixed = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
    distinct = set()
    for i, name in enumerate(names):
        group.switch(name)
        with torch.no_grad():
            alone = model.generate(input_ids=ids[i : i + 1], attention_mask=torch.ones_like(ids[i : i + 1]), **kw)
        assert torch.equal(mixed.sequences[i * k : (i + 1) * k], alone.sequences), (name, mode)
        if kw["num_beams"] > 1:
            assert_same_function(mixed.sequences_scores[i * k : (i + 1) * k], alone.sequences_scores, model=model)
        else:
            for step_mixed, step_alone in zip(mixed.scores, alone.scores):
                assert_same_function(step_mixed[i], step_alone[0], model=model)
        distinct.add(tuple(alone.scores[0][0].argsort()[-3:].tolist()))
    group.switch(None)
    assert len(distinct) > 1  # the deltas change what is generated


def test_route_restores_attached_deltas_and_leaves_no_hooks() -> None:
    arch = ARCHS["bert"]
    model = arch.build()
    bare_hooks = hook_counts(model)
    group = make_group(model, [("a", "lora"), ("b", "adapter")])
    with torch.no_grad():
        bare = arch.run(model)
        group.switch("a")
        with_a = arch.run(model)
        keys = list(model.state_dict())
        with group.route(["b", None]):
            assert group["a"].state == "detached"  # each sample sees only its own delta
            assert "encoder.layer.0.attention.self.query.a.lora_A" not in model.state_dict()
        assert group.active == ["a"]
        assert list(model.state_dict()) == keys
        assert torch.equal(arch.run(model), with_a)
        group.switch(None)
    assert hook_counts(model) == bare_hooks
    with torch.no_grad():
        assert torch.equal(arch.run(model), bare)


def test_route_all_none_is_the_backbone() -> None:
    arch = ARCHS["gpt2"]
    model = arch.build()
    with torch.no_grad():
        bare = arch.run(model)
    group = make_group(model, [("a", "lora"), ("b", "bitfit")])
    group.switch("a")
    with torch.no_grad(), group.route([None, None]):
        assert torch.equal(arch.run(model), bare)


def test_route_stacks_are_cached_and_follow_parameter_changes() -> None:
    arch = ARCHS["llama"]
    model = arch.build()
    group = make_group(model, [("a", "lora"), ("b", "lora")])
    names = ["a", "b"]
    batch = batch_for(arch, 2)
    with torch.no_grad(), group.route(names):
        first = model(**batch).logits
        routers = list(group._routers or [])
        stacks = [r._stack for r in routers]
        again = model(**batch).logits
        assert all(r._stack is s for r, s in zip(routers, stacks))  # reused, not rebuilt
    assert torch.equal(first, again)

    perturb(group["b"], seed=999)  # an in-place change (like an optimizer step) while detached
    with torch.no_grad(), group.route(names):
        changed = model(**batch).logits
    torch.testing.assert_close(changed[0], first[0], atol=0, rtol=0)
    assert not torch.allclose(changed[1], first[1], atol=1e-4)
    ref = alone_logits(group, model, batch, names)
    assert_same_function(changed[1], ref[1], model=model)

    group.remove("a")  # membership change: routers rebuilt
    with torch.no_grad(), group.route(["b", None]):
        after = model(**batch).logits
    assert_same_function(after[0], alone_logits(group, model, batch, ["b", None])[0], model=model)


def _kept(group: DeltaGroup) -> int:
    """Bytes of gathered factors this thread's route() block keeps right now (0 outside a block)."""
    call = group._serving.local.call
    if call is None:
        return 0
    return sum(e[3].nbytes for state in call.states.values() for e in state.gathered.values() if e[3] is not None)


@pytest.mark.parametrize("inference", [False, True])
def test_route_keeps_gathered_factors_from_the_second_call_within_the_budget(inference: bool) -> None:
    arch = ARCHS["llama"]
    model = arch.build()
    group = make_group(
        model, [("a", "lora_all"), ("b", "bitfit"), ("c", "adapter"), ("d", "compacter"), ("e", "lora")]
    )
    names = ["a", "b", None, "c", "d", "e"]
    batch = batch_for(arch, len(names))
    context = torch.inference_mode if inference else torch.no_grad
    with context():
        with group.route(names, gather_cache_mb=0):
            reference = [model(**batch).logits for _ in range(3)]
            assert _kept(group) == 0
        with group.route(names):
            first = model(**batch).logits
            assert _kept(group) == 0  # one forward pass keeps nothing
            second = model(**batch).logits
            kept = _kept(group)
            assert kept > 0
            index_select = torch.Tensor.index_select
            calls = []
            try:
                torch.Tensor.index_select = lambda *a, **k: calls.append(1) or index_select(*a, **k)  # type: ignore
                third = model(**batch).logits
            finally:
                torch.Tensor.index_select = index_select  # type: ignore[method-assign]
            assert calls == []  # everything came from the kept copies
        assert _kept(group) == 0  # freed on exit
        with group.route(names, gather_cache_mb=kept / 2**20 / 3):
            model(**batch)
            model(**batch)
            assert 0 < _kept(group) <= kept / 3  # the budget caps what is kept
    for out in (first, second, third):
        assert torch.equal(out, reference[0])


def test_route_kept_factors_follow_parameter_changes_inside_the_block() -> None:
    arch = ARCHS["gpt2"]
    model = arch.build()
    group = make_group(model, [("a", "lora"), ("b", "adapter")])
    names = ["a", "b"]
    batch = batch_for(arch, 2)
    with torch.no_grad(), group.route(names, path="gather"):  # auto may segment later calls (one delta per router)
        model(**batch)
        before = model(**batch).logits
        assert _kept(group) > 0
        perturb(group["a"], seed=5)  # an in-place change while the block is open
        perturb(group["b"], seed=6)
        after = model(**batch).logits
    assert not torch.allclose(after, before, atol=1e-4)
    ref = alone_logits(group, model, batch, names)
    for i in range(2):
        assert_same_function(after[i], ref[i], model=model)


@pytest.mark.parametrize("bad", [-1, "64", True, float("nan"), None])
def test_route_refuses_a_bad_gather_cache_size(bad: Any) -> None:
    arch = ARCHS["bert"]
    model = arch.build()
    group = make_group(model, [("a", "lora")])
    group.switch("a")
    state, hooks = snapshot(model), hook_counts(model)
    with pytest.raises(DeltaError, match="gather_cache_mb must be a number of MiB >= 0"):
        with group.route(["a", None], gather_cache_mb=bad):
            pass
    assert group.active == ["a"]
    assert_state_equal(model, state)
    assert hook_counts(model) == hooks


def test_route_follows_replaced_parameters_and_refresh_after_data_edits() -> None:
    arch = ARCHS["bert"]
    model = arch.build()
    group = make_group(model, [("a", "lora"), ("b", "adapter")])
    names = ["a", "b"]
    batch = batch_for(arch, 2)
    with torch.no_grad(), group.route(names):
        model(**batch)
    # new Parameter objects (load_state_dict(..., assign=True)) while attached
    group.switch("a")
    new = {k: v * 3 for k, v in model.state_dict().items() if ".a." in k}
    model.load_state_dict(new, strict=False, assign=True)
    group.switch(None)
    with torch.no_grad(), group.route(names):
        routed = model(**batch).logits
    ref = alone_logits(group, model, batch, names)
    assert_same_function(routed[0], ref[0], model=model)
    # writes through .data bypass version counters: refresh() makes the next route() see them
    for p in group["b"].parameters():
        p.data.mul_(2.0)
    group.refresh()
    with torch.no_grad(), group.route(names):
        routed = model(**batch).logits
    ref = alone_logits(group, model, batch, names)
    assert_same_function(routed[1], ref[1], model=model)


def test_a_refused_switch_changes_nothing() -> None:
    arch = ARCHS["bert"]
    model = arch.build()
    group = DeltaGroup(model)
    lora = LoraModel(model, name="lo", modified_modules=["attention.output.dense"])
    adapter = AdapterModel(model, name="ad", modified_modules=["attention.output.dense"])
    adapter.detach()
    group.add(lora)
    group.add(adapter)
    outside = LoraModel(model, name="outside", modified_modules=["attention.output.dense"])  # created after ad
    perturb(outside)
    lora.detach()
    outside.merge()  # the adapter must not go under it (LoRA may: it commutes)
    group.switch("lo")
    state, hooks = snapshot(model), hook_counts(model)
    with pytest.raises(DeltaStateError, match="created after it is merged"):
        group.switch("ad")
    assert group.active == ["lo"]
    assert_state_equal(model, state)
    assert hook_counts(model) == hooks


def test_route_gather_cache_without_limit() -> None:
    arch = ARCHS["llama"]
    model = arch.build()
    group = make_group(model, [("a", "lora"), ("b", "adapter")])
    batch = batch_for(arch, 2)
    with torch.no_grad(), group.route(["a", "b"], gather_cache_mb=float("inf"), path="gather"):
        first = model(**batch).logits
        second = model(**batch).logits
        assert _kept(group) > 0
    assert torch.equal(first, second)


def test_route_follows_dtype_change() -> None:
    arch = ARCHS["bert"]
    model = arch.build()
    group = make_group(model, [("a", "lora"), ("b", "adapter")])
    batch = batch_for(arch, 2)
    with torch.no_grad(), group.route(["a", "b"]):
        model(**batch)
    model.to(torch.float64)
    with torch.no_grad(), group.route(["a", "b"]):
        mixed = model(**batch).logits
    assert mixed.dtype == torch.float64
    for i, ref in enumerate(alone_logits(group, model, batch, ["a", "b"])):
        assert_same_function(mixed[i], ref, model=model)


def test_route_gradients_in_eval_mode_match_each_sample_alone() -> None:
    arch = ARCHS["bert"]
    model = arch.build()
    group = make_group(model, [("a", "lora"), ("b", "adapter")])
    names = ["a", "b", "a"]
    batch = batch_for(arch, 3)
    with group.route(names):
        model(**batch).logits.sum().backward()
    routed = {n: [p.grad.clone() for p in group[n].parameters()] for n in ("a", "b")}
    for n in ("a", "b"):
        for p in group[n].parameters():
            p.grad = None
    for i, name in enumerate(names):
        group.switch(name)
        model(**rows(batch, i)).logits.sum().backward()
    group.switch(None)
    for n in ("a", "b"):
        assert all(p.grad is not None and got.abs().sum() > 0 for got, p in zip(routed[n], group[n].parameters()))
        expected = [p.grad for p in group[n].parameters()]
        assert_same_gradients(routed[n], expected, model=model, tokens=batch["input_ids"].numel())


# ------------------------------------------------------------------ errors


class _ScaleSite(DeltaSite):
    composition = Composition.TRANSFORMS_OUTPUT

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(()))

    def forward_hook(self, host: nn.Module, args: Any, kwargs: Any, output: torch.Tensor) -> torch.Tensor:
        return output * (1 + self.scale)


class _ScaleModel(DeltaBase):
    """A user-defined delta method without routing support (scales the host's output)."""

    def build_site(self, name: str, host: nn.Module) -> DeltaSite:
        return _ScaleSite()


def test_route_errors_change_nothing() -> None:
    arch = ARCHS["bert"]
    model = arch.build()
    group = make_group(model, [("a", "lora"), ("b", "bitfit")])
    group.add(_ScaleModel(model, DeltaConfig(modified_modules=["query"]), name="s").detach())
    group.switch("a")
    state, hooks = snapshot(model), hook_counts(model)
    batch = batch_for(arch, 2)

    def unchanged() -> None:
        assert group.active == ["a"]
        assert_state_equal(model, state)
        assert hook_counts(model) == hooks

    with pytest.raises(DeltaError, match="no delta named \\['zzz'\\]"):
        with group.route(["a", "zzz"]):
            pass
    unchanged()
    with pytest.raises(DeltaError, match="non-empty list"):
        with group.route([]):
            pass
    with pytest.raises(DeltaError, match="non-empty list"):
        with group.route("a"):  # type: ignore[arg-type]
            pass
    with pytest.raises(DeltaError, match="do not support per-sample routing"):
        with group.route(["s", None]):
            pass
    unchanged()
    model.train()
    with pytest.raises(DeltaStateError, match="training mode"):
        with group.route(["a", "b"]):
            pass
    model.eval()
    unchanged()
    with pytest.raises(DeltaError, match="given 3 names.*batch of 2 rows"):
        with torch.no_grad(), group.route(["a", "b", None]):
            model(**batch)
    unchanged()
    with group.route(["a", "b"]):
        with pytest.raises(DeltaStateError, match="nested"):
            with group.route(["a", "b"]):
                pass
        for call in (lambda: group.switch("b"), lambda: group.remove("a"), lambda: group.add(group["b"])):
            with pytest.raises(DeltaStateError, match="inside a DeltaGroup.route"):
                call()
        model.train()  # switched to training inside the block: refused at the forward
        with pytest.raises(DeltaStateError, match="training mode"):
            model(**batch)
        model.eval()
    unchanged()
    group.switch(None)
    group["b"].attach().merge()
    with pytest.raises(DeltaStateError, match="merged"):
        with group.route(["a", None]):
            pass
    group["b"].unmerge().detach()


def test_route_refuses_a_delta_outside_the_group_created_between_group_deltas() -> None:
    arch = ARCHS["llama"]
    model = arch.build()
    group = DeltaGroup(model)
    first = AdapterModel(model, name="a1", modified_modules=["o_proj"])
    outside = LoraModel(model, name="outside", modified_modules=["o_proj"])  # not in the group, stays attached
    second = AdapterModel(model, name="a2", modified_modules=["o_proj"])
    for i, delta in enumerate([first, outside, second]):
        perturb(delta, seed=i, scale=0.5)
    first.detach()
    second.detach()
    group.add(first)
    group.add(second)
    group.switch("a2")
    state, hooks = snapshot(model), hook_counts(model)
    with pytest.raises(DeltaStateError, match="outside the group is attached and was created between group deltas"):
        with torch.no_grad(), group.route(["a2", "a1"]):
            pass
    assert group.active == ["a2"]
    assert_state_equal(model, state)
    assert hook_counts(model) == hooks
    # outside the span of the group's deltas it is fine: one router place serves every row
    outside.detach()
    late = LoraModel(model, name="late", modified_modules=["o_proj"])
    perturb(late, seed=9, scale=0.5)
    names = ["a2", "a1", None]
    batch = batch_for(arch, len(names))
    with torch.no_grad(), group.route(names):
        mixed = model(**batch).logits
    for i, ref in enumerate(alone_logits(group, model, batch, names)):
        assert_same_function(mixed[i], ref, model=model)
    # deltas that only add a function of the host input commute: a LoRA between two group LoRAs is allowed
    late.detach()
    lora_group = DeltaGroup(model)
    l1 = LoraModel(model, name="l1", modified_modules=["o_proj"])
    outside.attach()  # created before l1 and l2: not between them
    mid = LoraModel(model, name="mid", modified_modules=["o_proj"])
    l2 = LoraModel(model, name="l2", modified_modules=["o_proj"])
    for i, delta in enumerate([l1, mid, l2]):
        perturb(delta, seed=20 + i, scale=0.5)
    l1.detach()
    l2.detach()
    lora_group.add(l1)
    lora_group.add(l2)
    with torch.no_grad(), lora_group.route(["l2", "l1", None]):
        mixed = model(**batch).logits
    for i, ref in enumerate(alone_logits(lora_group, model, batch, ["l2", "l1", None])):
        assert_same_function(mixed[i], ref, model=model)


# ------------------------------------------------------------------ the example


def test_multitask_serving_example_tiny(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.project.test_examples import load

    example = load("multitask_serving")
    result = example.run(tiny=True, steps=3, n_requests=12, output_dir=str(tmp_path))
    assert result["agree"] is True and result["requests"] == 12
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(example.TASKS)
    assert set(result["throughput"]) == {"switching", "mixed"}
    out = capsys.readouterr().out
    assert "12 mixed requests" in out and "answers agree between the two ways: True" in out
    assert example.main(["--tiny", "--steps", "1", "--requests", "6", "--output-dir", str(tmp_path / "again")]) == 0


def test_multitask_tasks_are_deterministic_and_balanced() -> None:
    from tests.project.test_examples import load

    example = load("multitask_serving")
    tasks = example.make_tasks(3, 300, 60)
    assert tasks == example.make_tasks(3, 300, 60)
    for name, (train, test) in tasks.items():
        assert len(train) == 300 and len(test) == 60
        assert not {t for t, _ in train} & {t for t, _ in test}  # disjoint splits
        labels = {y for _, y in train}
        assert labels == set(range(len(example.LABELS[name])))


@pytest.mark.parametrize("method", ["prefix", "soft_prompt"])
def test_route_refuses_prompt_methods_but_serves_them_by_switching(method: str) -> None:
    from deltakit import PrefixModel, SoftPromptModel

    arch = ARCHS["gpt2"]
    model = arch.build()
    group = make_group(model, [("a", "lora")])
    if method == "prefix":
        prompt = PrefixModel(model, name="p", prefix_token_num=3, embed_dim=16, mid_dim=16)
    else:
        prompt = SoftPromptModel(model, name="p", soft_token_num=3)
    group.add(prompt.detach())
    state, hooks = snapshot(model), hook_counts(model)
    refused = r"\['p'\] \((PrefixModel|SoftPromptModel)\) do not support per-sample routing"
    with pytest.raises(DeltaError, match=refused):
        with group.route(["a", "p"]):
            pass
    assert_state_equal(model, state)
    assert hook_counts(model) == hooks
    with torch.no_grad(), group.route(["a", None]):  # the prompt delta may sit in the group unused
        model(**batch_for(arch, 2))
    group.switch("p")
    assert group.active == ["p"]
    group.switch(None)
    assert hook_counts(model) == hooks


def test_route_runs_a_delta_with_its_own_head_not_the_backbone_head() -> None:
    # Rows routed to a delta that owns a classifier copy used to run the backbone's original head, silently (then
    # such deltas were refused); now each row runs its own delta's copy (tests/serving/test_route_heads.py).
    model = tiny_bert()
    group = DeltaGroup(model)
    plain = LoraModel(model, name="plain", lora_r=2)
    headed = LoraModel(model, name="headed", lora_r=2, modules_to_save=["classifier"])
    perturb(headed, seed=4)
    group.add(plain.detach())
    group.add(headed.detach())
    model.eval()
    ids = torch.randint(0, VOCAB, (2, 5))
    alone = {}
    for name in ("plain", "headed"):
        group.switch(name)
        with torch.no_grad():
            alone[name] = model(ids).logits
    group.switch(None)
    with torch.no_grad(), group.route(["plain", "headed"]):
        routed = model(ids).logits
    assert_same_function(routed[0], alone["plain"][0], model=model)
    assert_same_function(routed[1], alone["headed"][1], model=model)
    with group.route(["plain", None]):  # the others still route
        model(ids)
    group.switch("headed")  # and the headed one serves through switch()
    model(ids)
