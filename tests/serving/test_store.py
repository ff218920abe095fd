"""A DeltaGroup over a store: deltas registered by checkpoint directory, at most ``max_active`` materialised."""

from __future__ import annotations

import gc
import json
import pathlib
import threading
import weakref
from typing import Any

import pytest
import torch
from torch import nn

from deltakit import BitFitModel, CheckpointError, DeltaError, DeltaGroup, LoraModel
from deltakit.checkpoint import WEIGHTS_NAME

from tests.helpers import ARCHS, hook_counts, perturb, snapshot, assert_state_equal
from tests.tolerances import assert_same_function
from tests.serving.test_serving import batch_for, rows

RANKS = (2, 4, 8, 16)


def save_deltas(model: nn.Module, root: pathlib.Path, count: int) -> dict[str, pathlib.Path]:
    """``count`` perturbed LoRA checkpoints of mixed ranks on ``model`` (the model is left unchanged)."""
    paths = {}
    for i in range(count):
        delta = LoraModel(model, lora_r=RANKS[i % len(RANKS)], name=f"d{i}")
        perturb(delta, seed=10 + i, scale=0.3)
        paths[f"d{i}"] = root / f"d{i}"
        delta.save_finetuned(paths[f"d{i}"])
        delta.detach()
    return paths


def reference(model: nn.Module, paths: dict[str, pathlib.Path], batch: dict[str, torch.Tensor],
              names: list[Any]) -> list[torch.Tensor]:
    """Each row with its delta loaded alone (a plain group, one load per row)."""
    out = []
    for i, name in enumerate(names):
        group = DeltaGroup(model)
        if name is not None:
            group.load(name, paths[name], attach=True)
        with torch.no_grad():
            out.append(model(**rows(batch, i)).logits[0])
        if name is not None:
            group.remove(name)
    return out


@pytest.fixture
def setup(tmp_path: pathlib.Path) -> tuple[nn.Module, dict[str, pathlib.Path]]:
    model = ARCHS["llama"].build().eval()
    return model, save_deltas(model, tmp_path, 6)


def test_register_reads_no_tensors_and_route_loads_on_a_miss(setup: Any) -> None:
    model, paths = setup
    state, hooks = snapshot(model), hook_counts(model)
    group = DeltaGroup(model, max_active=3)
    for name, path in paths.items():
        entry = group.register(name, path)
        assert entry.delta_type == "lora" and entry.nbytes > 0
    assert group.resident == [] and len(group) == 6 and "d5" in group
    assert_state_equal(model, state)
    assert hook_counts(model) == hooks
    with pytest.raises(DeltaError, match="registered but not materialised"):
        group["d0"]
    names = ["d0", None, "d1", "d0"]
    batch = batch_for(ARCHS["llama"], len(names))
    with torch.no_grad(), group.route(names):
        routed = model(**batch).logits
    assert sorted(group.resident) == ["d0", "d1"]
    assert group.store_stats["misses"] == 2
    for i, ref in enumerate(reference(model, paths, batch, names)):
        assert_same_function(routed[i], ref, model=model)
    assert hook_counts(model) == hooks


def test_least_recently_used_are_dropped_and_results_stay_right(setup: Any) -> None:
    model, paths = setup
    group = DeltaGroup(model, max_active=2)
    for name, path in paths.items():
        group.register(name, path)
    batch = batch_for(ARCHS["llama"], 2)
    for pair in (["d0", "d1"], ["d2", "d0"], ["d3", "d0"], ["d1", "d3"]):
        with torch.no_grad(), group.route(pair):
            out = model(**batch).logits
        assert set(group.resident) == set(pair)  # the pair is always resident
        for got, ref in zip(out, reference(model, paths, batch, pair)):
            assert_same_function(got, ref, model=model)
    # d0 was the most recently used before d1/d3: the LRU order decided what stayed.
    assert group.store_stats["evictions"] == 3 and group.store_stats["misses"] == 5
    assert group.store_stats["hits"] == 3


def test_switch_over_the_store_and_back(setup: Any) -> None:
    model, paths = setup
    group = DeltaGroup(model, max_active=1)
    for name, path in paths.items():
        group.register(name, path)
    batch = batch_for(ARCHS["llama"], 1)
    with torch.no_grad():
        bare = model(**batch).logits
        group.switch("d2")
        first = model(**batch).logits
        group.switch("d3")  # d2 dropped: max_active=1
        assert group.resident == ["d3"] and group.active == ["d3"]
        group.switch("d2")  # loaded again from its checkpoint: the same function
        again = model(**batch).logits
        group.switch(None)
        assert torch.equal(model(**batch).logits, bare)
    assert torch.equal(first, again)


def test_a_route_naming_more_deltas_than_max_active_is_refused_and_changes_nothing(setup: Any) -> None:
    model, paths = setup
    group = DeltaGroup(model, max_active=2)
    for name, path in paths.items():
        group.register(name, path)
    group.switch("d0")
    hooks, resident = hook_counts(model), group.resident
    with pytest.raises(DeltaError, match=r"needs 3 deltas materialised at once .* max_active=2"):
        with group.route(["d1", "d2"]):  # + d0 switched in
            pass
    assert hook_counts(model) == hooks and group.resident == resident and group.active == ["d0"]
    group.switch(None)
    with pytest.raises(DeltaError, match="at most 2 distinct"):
        with group.route(["d1", "d2", "d3"]):
            pass
    assert group.resident == resident


def test_pinned_deltas_count_against_max_active(setup: Any, tmp_path: pathlib.Path) -> None:
    model, paths = setup
    group = DeltaGroup(model, max_active=2)
    group.load("p0", paths["d0"])
    pinned = BitFitModel(model, name="p1")
    pinned.detach()
    group.add(pinned)
    group.register("d1", paths["d1"])
    with pytest.raises(DeltaError, match="Cannot pin 'p2'"):
        group.load("p2", paths["d2"])
    with pytest.raises(DeltaError, match="max_active=2"):
        group.switch("d1")
    assert group.resident == ["p0", "p1"] and group.active == []


def test_evicted_deltas_are_freed(setup: Any) -> None:
    model, paths = setup
    group = DeltaGroup(model, max_active=2)
    for name, path in paths.items():
        group.register(name, path)
    refs = []
    for name in paths:
        with torch.no_grad(), group.route([name]):
            refs.append(weakref.ref(group[name]))
    gc.collect()
    alive = [r for r in refs if r() is not None]
    assert len(alive) == 2  # only the active set stays in memory
    assert sum(len(r.sites) for r in (group._routers or [])) == 2 * len(group["d5"].sites)


def test_a_miss_replaces_one_slot_of_the_built_stacks(setup: Any) -> None:
    model, paths = setup
    group = DeltaGroup(model, max_active=3)
    for name, path in paths.items():
        group.register(name, path)
    batch = batch_for(ARCHS["llama"], 3)
    with torch.no_grad(), group.route(["d0", "d1", "d2"], path="gather"):
        model(**batch)
    routers = list(group._routers or [])
    stacks = [{k: v.clone() for k, v in (r._stack or {}).items()} for r in routers]
    objects = [r._stack for r in routers]
    slot_d1, slot_d0 = group._table.slot_of["d1"], group._table.slot_of["d0"]
    with torch.no_grad(), group.route(["d1", "d4"], path="gather"):  # d4 replaces d0 (least recently used)
        out = model(**batch_for(ARCHS["llama"], 2))
    assert "d0" not in group.resident
    slot_d4 = group._table.slot_of["d4"]
    for router, before, obj in zip(group._routers or [], stacks, objects):
        assert router._stack is obj  # updated in place, not rebuilt
        for key, value in before.items():
            keep = [k for k in range(value.shape[0]) if k not in (slot_d4, slot_d0)]
            assert torch.equal(router._stack[key][keep], value[keep])  # the other slots untouched
            assert not router._stack[key][slot_d0].any()  # the dropped delta's slot zeroed
        assert router._stack["A_T"][slot_d1].abs().sum() > 0
    ref = reference(model, paths, batch_for(ARCHS["llama"], 2), ["d1", "d4"])
    for i in range(2):
        assert_same_function(out.logits[i], ref[i], model=model)


def test_registration_errors_are_clear_and_record_nothing(setup: Any, tmp_path: pathlib.Path) -> None:
    model, paths = setup
    group = DeltaGroup(model, max_active=2)
    with pytest.raises(CheckpointError, match="No delta checkpoint directory"):
        group.register("x", tmp_path / "missing")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "delta_config.json").write_bytes((paths["d0"] / "delta_config.json").read_bytes())
    (broken / WEIGHTS_NAME).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(CheckpointError, match="header"):
        group.register("x", broken)
    edited = tmp_path / "edited"
    edited.mkdir()
    meta = json.loads((paths["d0"] / "delta_config.json").read_text())
    meta["config"]["lora_r"] = -1
    (edited / "delta_config.json").write_text(json.dumps(meta))
    (edited / WEIGHTS_NAME).write_bytes((paths["d0"] / WEIGHTS_NAME).read_bytes())
    with pytest.raises(CheckpointError, match="lora_r"):
        group.register("x", edited)
    group.register("ok", paths["d0"])
    with pytest.raises(DeltaError, match="already has a delta named 'ok'"):
        group.register("ok", paths["d1"])
    with pytest.raises(DeltaError, match="identifier"):
        group.register("not-a-name", paths["d1"])
    with pytest.raises(DeltaError, match="check_backbone"):
        group.register("y", paths["d1"], check_backbone="yes")  # type: ignore[arg-type]
    for bad in (0, -1, 2.5, True):
        with pytest.raises(DeltaError, match="max_active must be a positive int"):
            DeltaGroup(model, max_active=bad)  # type: ignore[arg-type]
    assert group.names == ["ok"]


def test_a_checkpoint_corrupted_after_registration_fails_on_the_miss_and_changes_nothing(setup: Any) -> None:
    model, paths = setup
    group = DeltaGroup(model, max_active=2)
    group.register("d0", paths["d0"])
    group.register("d1", paths["d1"])
    with torch.no_grad(), group.route(["d0"]):
        pass
    data = bytearray((paths["d1"] / WEIGHTS_NAME).read_bytes())
    data[-1] ^= 0xFF  # the header still validates; the SHA-256 does not
    (paths["d1"] / WEIGHTS_NAME).write_bytes(bytes(data))
    hooks, state = hook_counts(model), snapshot(model)
    with pytest.raises(CheckpointError, match="SHA-256"):
        with group.route(["d0", "d1"]):
            pass
    assert group.resident == ["d0"] and hook_counts(model) == hooks
    assert_state_equal(model, state)


def test_remove_a_registered_delta(setup: Any) -> None:
    model, paths = setup
    group = DeltaGroup(model, max_active=2)
    group.register("d0", paths["d0"])
    group.register("d1", paths["d1"])
    group.switch("d1")
    assert group.remove("d0") is None  # never materialised
    assert group.remove("d1") is not None and group.names == [] and group.active == []


def test_concurrent_routes_with_misses(setup: Any) -> None:
    model, paths = setup
    group = DeltaGroup(model, max_active=2)
    for name, path in paths.items():
        group.register(name, path)
    batch = batch_for(ARCHS["llama"], 2)
    expected = {}
    for pair in (("d0", "d1"), ("d2", "d3"), ("d4", "d5")):
        expected[pair] = reference(model, paths, batch, list(pair))
    errors: list[BaseException] = []

    def worker(pair: tuple[str, str]) -> None:
        try:
            for _ in range(3):
                with torch.no_grad(), group.route(list(pair)):
                    out = model(**batch).logits
                for i in range(2):
                    assert_same_function(out[i], expected[pair][i], model=model)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(pair,)) for pair in expected]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert len(group.resident) <= 2


def test_a_miss_inside_inference_mode_loads_ordinary_parameters(setup: Any) -> None:
    model, paths = setup
    group = DeltaGroup(model, max_active=2)
    for name, path in paths.items():
        group.register(name, path)
    batch = batch_for(ARCHS["llama"], 2)
    for pair in (["d0", "d1"], ["d2", "d1"]):
        with torch.inference_mode(), group.route(pair):  # the usual serving context
            out = model(**batch).logits
        for got, ref in zip(out, reference(model, paths, batch, pair)):
            assert_same_function(got, ref, model=model)
    assert not any(p.is_inference() for p in group["d2"].parameters())
    group.switch("d2")  # usable outside inference mode too
    with torch.no_grad():
        model(**batch)
