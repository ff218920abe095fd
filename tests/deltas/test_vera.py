"""VeRA (deltakit/deltas/vera.py): the formula, the shared projections (regenerated bit for bit, or saved),
merging, routing, switching and PEFT interop. The generic lifecycle runs in tests/core/test_contract.py."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deltakit import (
    AutoDeltaModel, CheckpointError, DeltaConfigError, DeltaGroup, UnsupportedModuleError, VeraModel,
)
from deltakit.checkpoint import WEIGHTS_NAME, read_weights
from deltakit.deltas.vera import random_projections
from deltakit.integrations.peft import PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME, export_to_peft, from_peft
from deltakit.structures import tiny_model

from tests.helpers import ARCHS, REPO_ROOT, Arch, assert_state_equal, hook_counts, perturb, snapshot
from tests.tolerances import assert_same_function


def test_fresh_delta_is_the_identity_with_shared_projections(arch: Arch) -> None:
    model = arch.build()
    base = arch.run(model)
    delta = VeraModel(model, vera_r=8, d_initial=0.3)
    assert torch.equal(arch.run(model), base)
    shared = delta.shared
    widest_in = max(s.module.in_features for s in delta.sites)
    widest_out = max(s.module.out_features for s in delta.sites)
    assert shared.vera_A.shape == (8, widest_in) and shared.vera_B.shape == (widest_out, 8)
    for site in delta.sites:
        assert torch.equal(site.module.lambda_b, torch.zeros_like(site.module.lambda_b))
        assert torch.equal(site.module.lambda_d, torch.full((8,), 0.3))
        assert site.module.projections() is shared
    # the projections are not trained and not part of the model's or the delta's state
    assert {n for n, _ in delta.named_parameters()} == {
        f"{s.name}.vera.{p}" for s in delta.sites for p in ("lambda_d", "lambda_b")
    }
    assert not any("vera_A" in k for k in model.state_dict())


def test_the_update_is_b_times_B_of_d_times_A_x() -> None:
    model = ARCHS["llama"].build()
    delta = VeraModel(model, modified_modules=["q_proj", "down_proj"], vera_r=6)
    perturb(delta, scale=0.3)
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(2))
    host = model.model.layers[0].mlp.down_proj  # in 64, out 32: slices of A (6 x 64) and B (64 x 6)
    site = next(s.module for s in delta.sites if s.host is host)
    a, b = delta.shared.vera_A[:, :64], delta.shared.vera_B[:32, :]
    with torch.no_grad():
        expected = F.linear(x, host.weight) + site.lambda_b * F.linear(site.lambda_d * F.linear(x, a), b)
        assert_same_function(host(x), expected, model=model)


def test_projections_regenerate_bit_for_bit_in_another_process() -> None:
    a, b = random_projections(16, 48, 40, seed=1234)
    digest = hashlib.sha256(a.numpy().tobytes() + b.numpy().tobytes()).hexdigest()
    code = (
        "import hashlib; from deltakit.deltas.vera import random_projections as r; a, b = r(16, 48, 40, seed=1234); "
        "print(hashlib.sha256(a.numpy().tobytes() + b.numpy().tobytes()).hexdigest())"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, check=True)
    assert other.stdout.strip() == digest
    assert not torch.equal(random_projections(16, 48, 40, seed=1235)[0], a)


@pytest.mark.parametrize("saved", [False, True])
def test_checkpoint_holds_the_vectors_and_the_projections_only_when_asked(saved: bool, tmp_path) -> None:
    arch = ARCHS["gpt2"]
    model = arch.build()
    delta = VeraModel(model, vera_r=8, projection_seed=5, save_projection=saved)
    perturb(delta, scale=0.3)
    attached = arch.run(model)
    delta.save_finetuned(tmp_path)
    stored = read_weights(tmp_path / WEIGHTS_NAME)
    vectors = {f"{s.name}.vera.{p}" for s in delta.sites for p in ("lambda_d", "lambda_b")}
    assert set(stored) == (vectors | {"vera_shared.vera_A", "vera_shared.vera_B"} if saved else vectors)
    fresh = arch.build()
    loaded = AutoDeltaModel.from_finetuned(tmp_path, backbone_model=fresh)
    assert isinstance(loaded, VeraModel) and loaded.config == delta.config
    assert torch.equal(loaded.shared.vera_A, delta.shared.vera_A)
    assert torch.equal(arch.run(fresh), attached)


def test_saved_projections_are_loaded_not_regenerated(tmp_path) -> None:
    arch = ARCHS["bert"]
    model = arch.build()
    delta = VeraModel(model, vera_r=4, save_projection=True)
    perturb(delta, scale=0.3)
    with torch.no_grad():
        delta.shared.vera_A.mul_(2)  # no longer what the seed gives
    attached = arch.run(model)
    delta.save_finetuned(tmp_path)
    fresh = arch.build()
    AutoDeltaModel.from_finetuned(tmp_path, backbone_model=fresh)
    assert torch.equal(arch.run(fresh), attached)


def test_model_to_moves_the_shared_projections() -> None:
    arch = ARCHS["t5"]
    model = arch.build()
    delta = VeraModel(model, vera_r=4)
    perturb(delta, scale=0.3)
    model.to(torch.float64)
    assert delta.shared.vera_A.dtype == delta.shared.vera_B.dtype == torch.float64
    assert arch.run(model).dtype == torch.float64
    delta.detach()
    model.to(torch.float32)
    delta.attach()
    assert delta.shared.vera_A.dtype == torch.float32


def test_merge_and_unmerge_both_ways(arch: Arch) -> None:
    model = arch.build()
    delta = VeraModel(model, vera_r=8)
    perturb(delta, scale=0.3)
    attached, weights = arch.run(model), snapshot(model)
    for exact in (True, False):
        delta.merge(exact_unmerge=exact)
        assert_same_function(arch.run(model), attached, model=model)
        delta.unmerge()
        if exact:
            assert_state_equal(model, weights)
    assert_same_function(arch.run(model), attached, model=model)


def test_training_updates_the_vectors_never_the_projections() -> None:
    arch = ARCHS["llama"]
    model = arch.build().train()
    delta = VeraModel(model, vera_r=8, vera_dropout=0.1)
    delta.freeze_module(exclude=["deltas"])
    projections = delta.shared.vera_A.clone(), delta.shared.vera_B.clone()
    optimizer = torch.optim.SGD(delta.parameters(), lr=0.5)
    for _ in range(2):  # b starts at zero: d gets a gradient from the second step on
        optimizer.zero_grad()
        arch.run(model).float().pow(2).mean().backward()
        optimizer.step()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in delta.parameters())
    assert torch.equal(delta.shared.vera_A, projections[0]) and torch.equal(delta.shared.vera_B, projections[1])


# ------------------------------------------------------------------------------------------------ serving
def _group(model: nn.Module) -> DeltaGroup:
    group = DeltaGroup(model)
    for i, (r, seed) in enumerate(((4, 0), (8, 1), (6, 0))):
        delta = VeraModel(model, name=f"v{i}", vera_r=r, projection_seed=seed)
        perturb(delta, seed=20 + i, scale=0.3)
        group.add(delta.detach())
    return group


@pytest.mark.parametrize("path", ["gather", "segment"])
def test_routed_batch_equals_each_row_alone(arch: Arch, path: str) -> None:
    model = arch.build()
    group = _group(model)
    rows = ["v1", None, "v0", "v2", "v1"]
    batch = {k: v.repeat(3, 1)[: len(rows)] for k, v in arch.inputs().items()}
    with torch.no_grad(), group.route(rows, path=path):
        mixed = arch.run(model, batch)
    for i, name in enumerate(rows):
        group.switch(name)
        with torch.no_grad():
            alone = arch.run(model, {k: v[i : i + 1] for k, v in batch.items()})
        assert_same_function(mixed[i], alone[0], model=model)
    group.switch(None)


def test_switching_back_and_forth_is_exact() -> None:
    arch = ARCHS["bert"]
    model = arch.build()
    group = _group(model)
    outputs = {}
    for name in ("v0", "v1", None):
        group.switch(name)
        outputs[name] = arch.run(model)
    assert not torch.equal(outputs["v0"], outputs["v1"])
    for name in ("v1", "v0", None, "v0"):
        group.switch(name)
        assert torch.equal(arch.run(model), outputs[name])


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_settings_and_hosts_are_clear_errors_and_change_nothing() -> None:
    model = ARCHS["bert"].build()
    state, hooks = snapshot(model), hook_counts(model)
    for kwargs, error, match in [
        ({"vera_r": 0}, DeltaConfigError, "vera_r"),
        ({"vera_r": 10**4}, DeltaConfigError, r"vera_r=10,000 is larger"),
        ({"projection_seed": -1}, DeltaConfigError, "projection_seed"),
        ({"save_projection": "yes"}, DeltaConfigError, "save_projection"),
        ({"d_initial": float("nan")}, DeltaConfigError, "d_initial"),
        ({"vera_dropout": 1.0}, DeltaConfigError, "vera_dropout"),
        ({"modified_modules": ["word_embeddings"]}, UnsupportedModuleError, "word_embeddings.*Embedding"),
    ]:
        with pytest.raises(error, match=match):
            VeraModel(model, **{"vera_r": 4, **kwargs})
    assert_state_equal(model, state)
    assert hook_counts(model) == hooks and not hasattr(model, "vera_shared")


# ------------------------------------------------------------------------------------------------ PEFT
peft = pytest.importorskip("peft")

PEFT_ARCHS = ("bert", "gpt2", "llama")


@pytest.fixture(autouse=True)
def _quiet() -> None:
    warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
    warnings.filterwarnings("ignore", message=".*vera_A and vera_B.*")
    warnings.filterwarnings("ignore", category=FutureWarning)


def _hidden(model: nn.Module) -> torch.Tensor:
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _same_as_peft(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert_same_function(ours, theirs, depth=2 * 33, reduction=128)  # bound of the largest tiny model compared


def test_projections_are_peft_s_for_the_same_seed() -> None:
    theirs = peft.get_peft_model(tiny_model("bert"), peft.VeraConfig(r=8, projection_prng_key=11,
                                                                      target_modules=["query", "intermediate.dense"]))
    ours = VeraModel(tiny_model("bert"), vera_r=8, projection_seed=11, modified_modules=["query", "intermediate.dense"])
    assert torch.equal(ours.shared.vera_A, theirs.base_model.vera_A["default"])
    assert torch.equal(ours.shared.vera_B, theirs.base_model.vera_B["default"])


@pytest.mark.parametrize("arch", PEFT_ARCHS)
@pytest.mark.parametrize("saved", [False, True])
def test_export_loads_in_peft_with_the_same_outputs(arch: str, saved: bool, tmp_path) -> None:
    model = tiny_model(arch)
    delta = VeraModel(model, vera_r=8, projection_seed=3, save_projection=saved,
                      modified_modules=["attn.q", "attn.v", "ff.w2"])
    perturb(delta, scale=0.3)
    ours = _hidden(model)
    export_to_peft(delta, tmp_path)
    config = json.loads((tmp_path / PEFT_CONFIG_NAME).read_text())
    assert config["peft_type"] == "VERA" and config["save_projection"] is saved and config["projection_prng_key"] == 3
    assert ("base_model.vera_A" in read_weights(tmp_path / PEFT_WEIGHTS_NAME)) is saved
    theirs = peft.PeftModel.from_pretrained(tiny_model(arch), tmp_path).eval()
    _same_as_peft(_hidden(theirs), ours)
    assert not torch.allclose(_hidden(tiny_model(arch)), ours)


@pytest.mark.parametrize("arch", PEFT_ARCHS)
@pytest.mark.parametrize("saved", [False, True])
def test_peft_adapter_imports_with_the_same_outputs_and_exports_back(arch: str, saved: bool, tmp_path) -> None:
    targets = {"bert": ["query", "value", "output.dense"], "gpt2": ["c_attn", "c_proj"], "llama": ["q_proj", "down_proj"]}
    config = peft.VeraConfig(r=8, projection_prng_key=7, save_projection=saved, target_modules=targets[arch])
    theirs_model = peft.get_peft_model(tiny_model(arch), config)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in theirs_model.named_parameters():
            if "vera_lambda" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    theirs_model.eval().save_pretrained(tmp_path / "peft")
    theirs = _hidden(theirs_model)
    model = tiny_model(arch)
    delta = from_peft(tmp_path / "peft", model)
    assert isinstance(delta, VeraModel) and delta.config.save_projection is saved
    assert delta.config.vera_r == 8 and delta.config.projection_seed == 7
    _same_as_peft(_hidden(model), theirs)
    export_to_peft(delta, tmp_path / "again")
    again = read_weights(tmp_path / "again" / PEFT_WEIGHTS_NAME)
    original = read_weights(tmp_path / "peft" / PEFT_WEIGHTS_NAME)
    assert again.keys() == original.keys() and all(torch.equal(again[k], original[k]) for k in original)


def test_peft_files_that_do_not_fit_are_refused_and_change_nothing(tmp_path) -> None:
    config = peft.VeraConfig(r=4, target_modules=["query", "value"])
    peft.get_peft_model(tiny_model("bert"), config).save_pretrained(tmp_path)
    model = tiny_model("bert")
    state = snapshot(model)
    config_file, weights_file = tmp_path / PEFT_CONFIG_NAME, tmp_path / PEFT_WEIGHTS_NAME
    original = json.loads(config_file.read_text())
    for change, match in [
        ({"bias": "all"}, "bias='all'"),
        ({"r": 0}, "invalid rank"),
        ({"projection_prng_key": -3}, "projection_prng_key"),
        ({"brand_new_option": 1}, "brand_new_option"),
    ]:
        config_file.write_text(json.dumps({**original, **change}))
        with pytest.raises(CheckpointError, match=match):
            from_peft(tmp_path, model)
    config_file.write_text(json.dumps(original))
    tensors = read_weights(weights_file)
    from safetensors.torch import save_file

    save_file({**tensors, "base_model.vera_A": torch.zeros(4, 7)}, str(weights_file))
    with pytest.raises(CheckpointError, match=r"vera_A shaped \(4, 7\)"):
        from_peft(tmp_path, model)
    save_file({k: v for k, v in tensors.items() if "vera_A" not in k}, str(weights_file))
    with pytest.raises(CheckpointError, match="lacks the shared projections"):
        from_peft(tmp_path, model)
    assert_state_equal(model, state)
    assert not hasattr(model, "vera_shared")
