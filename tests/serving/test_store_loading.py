"""How a store materialises a registered delta on a miss: the one-read loader, its checks, and what it frees."""

from __future__ import annotations

import gc
import json
import pathlib
import weakref
from typing import Any

import pytest
import torch
from torch import nn

from deltakit import CheckpointError, DeltaGroup, LoraModel
from deltakit.checkpoint import CONFIG_NAME, WEIGHTS_NAME, load_delta
from deltakit.store import load_into, read_stored
from tests.helpers import ARCHS, assert_state_equal, hook_counts, perturb, snapshot
from tests.serving.test_serving import batch_for
from tests.serving.test_store import reference, save_deltas
from tests.tolerances import assert_same_function


@pytest.fixture
def setup(tmp_path: pathlib.Path) -> tuple[nn.Module, dict[str, pathlib.Path]]:
    model = ARCHS["llama"].build().eval()
    return model, save_deltas(model, tmp_path, 6)


def _hosts(model: nn.Module, path: pathlib.Path) -> list[tuple[str, nn.Module]]:
    delta = load_delta(path, model, name="probe")
    delta.detach()
    return [(s.name, s.host) for s in delta.sites]


def test_the_one_read_loader_gives_exactly_what_the_checkpoint_loader_gives(setup: Any) -> None:
    model, paths = setup
    hosts = _hosts(model, paths["d0"])
    state, hooks = snapshot(model), hook_counts(model)
    for name in ("d1", "d2", "d3"):  # ranks 4, 8, 16
        fast = load_into(read_stored(name, paths[name]), model, hosts)
        full = load_delta(paths[name], model, name=f"{name}_full")
        full.detach()
        assert fast.state == "detached" and fast.child_name == name
        a, b = fast.delta_state_dict(), full.delta_state_dict()
        assert list(a) == list(b)
        for key in a:
            assert torch.equal(a[key], b[key]) and a[key].dtype == b[key].dtype
        assert [p.requires_grad for p in fast.parameters()] == [p.requires_grad for p in full.parameters()]
    assert_state_equal(model, state)  # building detached touches nothing
    assert hook_counts(model) == hooks


def test_a_store_miss_after_the_first_uses_the_learnt_hosts_and_routes_right(setup: Any) -> None:
    model, paths = setup
    group = DeltaGroup(model, max_active=6)
    for name, path in paths.items():
        group.register(name, path)
    names = ["d0", "d1", None, "d2", "d0"]
    batch = batch_for(ARCHS["llama"], len(names))
    with torch.no_grad(), group.route(names):
        routed = model(**batch).logits
    entry = group._store.entries["d1"]
    assert [n for n, _ in group._store.hosts[entry.site_names]] == [s.name for s in group["d1"].sites]
    for i, ref in enumerate(reference(model, paths, batch, names)):
        assert_same_function(routed[i], ref, model=model)


def test_evicted_deltas_are_freed_at_once_without_the_cycle_collector(setup: Any) -> None:
    """Deltas that went through attach() kept a reference cycle (LoRA's shared-input group), so dropped ones
    stayed in memory until Python's cycle collector ran: peak RSS grew with every miss."""
    model, paths = setup
    group = DeltaGroup(model, max_active=1)
    for name, path in paths.items():
        group.register(name, path)
    with torch.no_grad(), group.route(["d0"]):
        pass  # the first miss of this site list takes the full loader
    gc.collect()
    refs = []
    gc.disable()
    try:
        for name in ["d1", "d2", "d3", "d4"]:
            with torch.no_grad(), group.route([name]):
                refs.append(weakref.ref(group[name].sites[0].module))
        assert [r() is not None for r in refs] == [False, False, False, True]
    finally:
        gc.enable()


def test_nonfinite_values_are_refused_on_the_one_read_path_unless_allowed(setup: Any, tmp_path: pathlib.Path) -> None:
    model, paths = setup
    bad = LoraModel(model, lora_r=4, name="bad")
    perturb(bad, seed=3)
    with torch.no_grad():
        bad.sites[1].module.lora_B[0, 0] = float("inf")
    bad.save_finetuned(tmp_path / "bad")
    bad.detach()
    group = DeltaGroup(model, max_active=3)
    group.register("d0", paths["d0"])
    group.register("bad", tmp_path / "bad")
    with torch.no_grad(), group.route(["d0"]):
        pass
    state = snapshot(model)
    with pytest.raises(CheckpointError, match="NaN or infinite"), torch.no_grad(), group.route(["bad"]):
        pass
    assert group.resident == ["d0"]
    assert_state_equal(model, state)
    allowed = DeltaGroup(model, max_active=3)
    allowed.register("d0", paths["d0"])
    allowed.register("bad", tmp_path / "bad", allow_nonfinite=True)
    with torch.no_grad(), allowed.route(["d0"]), torch.no_grad():
        pass
    with torch.no_grad(), allowed.route(["bad"]):
        pass
    assert allowed["bad"].sites[1].module.lora_B[0, 0].item() == float("inf")


def test_a_header_that_does_not_fit_the_built_delta_is_refused(setup: Any) -> None:
    """The config says rank 8 but the weights file holds rank-4 tensors (both files valid on their own)."""
    model, paths = setup
    group = DeltaGroup(model, max_active=3)
    group.register("d0", paths["d0"])
    group.register("d2", paths["d2"])  # rank 8
    with torch.no_grad(), group.route(["d0"]):
        pass
    (paths["d2"] / WEIGHTS_NAME).write_bytes((paths["d1"] / WEIGHTS_NAME).read_bytes())  # rank 4's tensors
    with pytest.raises(CheckpointError, match="Shape mismatch"), torch.no_grad(), group.route(["d2"]):
        pass
    assert group.resident == ["d0"]


def test_a_config_changed_since_registration_goes_through_the_full_loader(setup: Any) -> None:
    """A checkpoint saved again with other sites after register(): the learnt hosts do not apply; the full
    loader validates and loads the new one."""
    model, paths = setup
    group = DeltaGroup(model, max_active=3)
    group.register("d0", paths["d0"])
    group.register("d1", paths["d1"])
    with torch.no_grad(), group.route(["d0"]):
        pass
    other = LoraModel(model, lora_r=4, modified_modules=["q_proj"], name="d1")
    perturb(other, seed=5)
    other.save_finetuned(paths["d1"])
    other.detach()
    with torch.no_grad(), group.route(["d1"]):
        pass
    assert [s.name for s in group["d1"].sites] == [s.name for s in other.sites]
    assert json.loads((paths["d1"] / CONFIG_NAME).read_text())["delta_type"] == "lora"
    for (k, a), b in zip(group["d1"].delta_state_dict().items(), other.delta_state_dict().values()):
        assert torch.equal(a, b), k


def test_a_router_turning_its_entries_over_tracks_the_same_parameters_as_a_fresh_scan(setup: Any) -> None:
    model, paths = setup
    group = DeltaGroup(model, max_active=2)
    for name, path in paths.items():
        group.register(name, path)
    for name in ["d0", "d1", "d2", "d0", "d3", "d4", "d5", "d1"]:
        with torch.no_grad(), group.route([name]):
            pass
    for router in group._routers or []:
        incremental = (list(router._sources), [id(p) for p in router.params], router.slot_elems)
        router._track()
        assert incremental == (list(router._sources), [id(p) for p in router.params], router.slot_elems)
        assert set(map(id, router.params)) == {id(p) for s in router.sites for p in s.parameters()}
