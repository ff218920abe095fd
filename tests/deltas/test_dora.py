"""DoRA: the math and gradients against PEFT's, the norm (expanded form, caches, cancellation), merge, per-sample
routing of several DoRA deltas, and what is refused. The DESIGN §4 contract runs in tests/core/test_contract.py."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deltakit import DeltaGroup, DeltaStateError, DoraModel, UnsupportedModuleError
from deltakit.deltas.dora import DoraSite
from deltakit.integrations.peft import from_peft
from deltakit.structures import is_conv1d

from tests.helpers import ARCHS, VOCAB, assert_state_equal, hook_counts, perturb, snapshot
from tests.tolerances import assert_same_function, assert_same_gradients

peft = pytest.importorskip("peft")

ROLES = {"bert": ["attn.q", "attn.v", "ff.w2"], "gpt2": ["attn.q", "ff.w1"], "llama": ["attn.q", "attn.v", "ff.gate"]}
PEFT_TARGETS = {"bert": ["query", "value", "output.dense"], "gpt2": ["c_attn", "c_fc"], "llama": ["q_proj", "v_proj", "gate_proj"]}


def weight_rows(site: Any) -> torch.Tensor:
    w = site.host.weight.detach()
    return w.t() if is_conv1d(site.host) else w


def reference(site: Any, x: torch.Tensor) -> torch.Tensor:
    """The host output with DoRA, written from the paper's formula: ``m (W + s B A) / ||W + s B A|| x + b``."""
    module = site.module
    rows = weight_rows(site)
    direction = rows + module.scaling * (module.lora_B @ module.lora_A).detach()
    merged = (module.magnitude.detach() / torch.linalg.norm(direction, dim=1))[:, None] * direction
    return F.linear(x, merged, getattr(site.host, "bias", None))


def peft_dora(arch_name: str, tmp_path, seed: int = 3, **options: Any) -> nn.Module:
    """A PEFT DoRA model on the tiny ``arch_name`` with random factors and magnitudes (saved to ``tmp_path``)."""
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=PEFT_TARGETS[arch_name], use_dora=True, **options)
    model = peft.get_peft_model(ARCHS[arch_name].build(), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.2 * (torch.rand(param.shape, generator=g) * 2 - 1))
            elif "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.3)
    model.save_pretrained(tmp_path)
    return model


def peft_gradients(model: nn.Module) -> dict[str, torch.Tensor]:
    names = {"lora_A.default.weight": "lora_A", "lora_B.default.weight": "lora_B",
             "lora_magnitude_vector.default.weight": "magnitude"}
    out = {}
    for name, param in model.named_parameters():
        for suffix, ours in names.items():
            if name.endswith(suffix):
                site = name[len("base_model.model."):-len(suffix) - 1]
                out[f"{site}.{ours}"] = param.grad
    return out


def our_gradients(delta: DoraModel) -> dict[str, torch.Tensor]:
    return {f"{s.name}.{p}": getattr(s.module, p).grad for s in delta.sites for p in ("lora_A", "lora_B", "magnitude")}


# ------------------------------------------------------------------------------------------------ against PEFT
@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("arch_name", list(ROLES))
def test_outputs_and_gradients_equal_peft_dora(arch_name: str, rslora: bool, tmp_path) -> None:
    arch = ARCHS[arch_name]
    theirs = peft_dora(arch_name, tmp_path, use_rslora=rslora)
    model = arch.build()
    delta = from_peft(tmp_path, model)
    delta.freeze_module(exclude=["deltas"])
    theirs.eval()  # (no dropout anywhere: deterministic; gradients flow in eval mode too)
    ours_out, their_out = arch.run(model), arch.run(theirs)
    assert_same_function(ours_out, their_out, model=model)
    ours_out.pow(2).mean().backward()
    their_out.pow(2).mean().backward()
    tokens = ours_out.shape[0] * ours_out.shape[1]
    assert_same_gradients(our_gradients(delta), peft_gradients(theirs), model=model, tokens=tokens)


def test_training_with_dropout_computes_what_peft_computes(tmp_path) -> None:
    # PEFT rescales W drop(x) rather than W x while training with dropout; deltakit follows it (same masks when the
    # random stream is consumed in the same order: the tiny Llama has no dropout of its own).
    arch = ARCHS["llama"]
    theirs = peft_dora("llama", tmp_path, lora_dropout=0.3)
    model = arch.build()
    delta = from_peft(tmp_path, model)
    delta.freeze_module(exclude=["deltas"])
    model.train()
    theirs.train()
    torch.manual_seed(11)
    ours_out = arch.run(model)
    torch.manual_seed(11)
    their_out = arch.run(theirs)
    assert_same_function(ours_out, their_out, model=model)
    model.eval()
    assert not torch.allclose(arch.run(model), ours_out)  # the dropout path was taken
    ours_out.pow(2).mean().backward()
    their_out.pow(2).mean().backward()
    assert_same_gradients(our_gradients(delta), peft_gradients(theirs), model=model, tokens=14)


# ------------------------------------------------------------------------------------------------ the norm
@pytest.mark.parametrize("arch_name", ["bert", "gpt2"])
def test_hook_equals_the_formula_with_bias_unscaled(arch_name: str) -> None:
    model = ARCHS[arch_name].build()
    delta = DoraModel(model, modified_modules=ROLES[arch_name], lora_r=3, lora_alpha=5)
    perturb(delta, scale=0.3)
    x = torch.randn(2, 5, delta.sites[0].module.lora_A.shape[1])
    for site in delta.sites:
        x = torch.randn(2, 5, site.module.lora_A.shape[1])
        with torch.no_grad():
            assert_same_function(site.host(x), reference(site, x), depth=4, reduction=x.shape[-1])


def test_expanded_norm_equals_the_direct_norm_and_recovers_from_cancellation() -> None:
    model = ARCHS["bert"].build()
    delta = DoraModel(model, modified_modules=["attn.q"], lora_r=4)
    site = delta.sites[0]
    module = site.module
    perturb(delta, scale=0.3)
    rows = weight_rows(site)

    def direct() -> torch.Tensor:
        return torch.linalg.norm(rows.double() + module.scaling * (module.lora_B @ module.lora_A).detach().double(), dim=1)

    assert_same_function(module.weight_norm(site.host), direct().float(), depth=4, reduction=rows.shape[1])
    # Make s B A cancel W almost entirely in the first rows: W's rows are projected onto the span of A's rows, and
    # B = -W A^T (A A^T)^-1 / s there, so s B A = -W; a small remainder is left.
    with torch.no_grad():
        a = module.lora_A.double()
        gram_inv = torch.linalg.inv(a @ a.t())
        site.host.weight[:4] = (site.host.weight[:4].double() @ (a.t() @ gram_inv @ a)).float()
        rows = weight_rows(site)
        module.lora_B[:4] = (-(rows[:4].double() @ a.t()) @ gram_inv / module.scaling).float() + 1e-5
    truth = direct()
    assert (truth[:4] < 1e-2 * rows[:4].double().norm(dim=1)).all()  # the case really cancels

    def error(norm: torch.Tensor) -> float:
        return ((norm.double() - truth).abs() / truth)[:4].max().item()

    s, b, a = module.scaling, module.lora_B.detach(), module.lora_A.detach()
    expanded = rows.pow(2).sum(1) + 2 * s * (b * (rows @ a.t())).sum(1) + s * s * ((b @ (a @ a.t())) * b).sum(1)
    plain = torch.linalg.norm(rows + s * (b @ a), dim=1)  # what PEFT computes, in float32
    ours = module.weight_norm(site.host)
    assert error(expanded.clamp(min=0).sqrt()) > 100 * error(plain)  # the expansion alone would lose the rows
    assert error(ours) <= 2 * error(plain) + 1e-6  # the recomputed rows are as good as the direct computation


def test_norm_caches_follow_every_change_and_survive_inference_mode() -> None:
    model = ARCHS["bert"].build()
    delta = DoraModel(model, modified_modules=["attn.q"], lora_r=4)
    perturb(delta, scale=0.3)
    site = delta.sites[0]
    x = torch.randn(2, 5, 32)

    def check() -> None:
        with torch.no_grad():
            assert_same_function(site.host(x), reference(site, x), depth=4, reduction=32)

    check()
    with torch.no_grad():
        site.module.lora_B.add_(0.5)  # an optimizer step
    check()
    with torch.no_grad():
        site.host.weight.mul_(1.5)  # the host weight changed in place: ||W||^2 is recomputed
    check()
    with torch.inference_mode():  # tensors made here are not cached for later autograd use
        site.host(x)
    site.host(x).sum().backward()
    assert site.module.magnitude.grad is not None and site.module.lora_A.grad is not None


def test_norm_is_detached_from_the_gradient() -> None:
    # d out / d A goes through s B A x only (the paper's section 4.3): compare with the formula whose norm is a
    # constant, computed by autograd
    model = ARCHS["llama"].build()
    delta = DoraModel(model, modified_modules=["attn.q"], lora_r=2)
    perturb(delta, scale=0.3)
    site = delta.sites[0]
    module = site.module
    x = torch.randn(3, 4, 32)
    site.host(x).pow(2).sum().backward()
    ours = [module.lora_A.grad.clone(), module.lora_B.grad.clone(), module.magnitude.grad.clone()]
    for p in module.parameters():
        p.grad = None
    rows = weight_rows(site)
    norm = torch.linalg.norm(rows + module.scaling * (module.lora_B @ module.lora_A).detach(), dim=1)
    direction = rows + module.scaling * module.lora_B @ module.lora_A
    F.linear(x, (module.magnitude / norm)[:, None] * direction).pow(2).sum().backward()
    expected = [module.lora_A.grad, module.lora_B.grad, module.magnitude.grad]
    assert_same_gradients(ours, expected, model=site.host, tokens=12)


def test_fresh_dora_is_exactly_the_identity_in_bfloat16() -> None:
    arch = ARCHS["gpt2"]
    model = arch.build().to(torch.bfloat16)
    base = arch.run(model)
    DoraModel(model, modified_modules=["attn.q", "ff.w1"])
    assert torch.equal(arch.run(model), base)


# ------------------------------------------------------------------------------------------------ merge
@pytest.mark.parametrize("arch_name", list(ROLES))
def test_merge_writes_the_new_weight_and_unmerge_restores_it_exactly(arch_name: str) -> None:
    arch = ARCHS[arch_name]
    model = arch.build()
    delta = DoraModel(model, modified_modules=ROLES[arch_name], lora_r=4)
    perturb(delta, scale=0.2)
    attached = arch.run(model)
    weights = snapshot(model)
    expected = {}
    for site in delta.sites:
        module = site.module
        direction = weight_rows(site) + module.scaling * (module.lora_B @ module.lora_A).detach()
        merged = (module.magnitude.detach() / torch.linalg.norm(direction, dim=1))[:, None] * direction
        expected[site.name] = merged.t() if is_conv1d(site.host) else merged
    delta.merge()
    for site in delta.sites:
        assert_same_function(site.host.weight.detach(), expected[site.name], depth=4, reduction=32)
    assert_same_function(arch.run(model), attached, model=model)
    delta.unmerge()
    assert_state_equal(model, weights)
    assert torch.equal(arch.run(model), attached)


def test_inexact_merge_is_refused_and_changes_nothing() -> None:
    arch = ARCHS["bert"]
    model = arch.build()
    delta = DoraModel(model, lora_r=4)
    perturb(delta, scale=0.2)
    attached, weights = arch.run(model), snapshot(model)
    with pytest.raises(DeltaStateError, match="exact_unmerge=False.*depends on W"):
        delta.merge(exact_unmerge=False)
    assert delta.state == "attached"
    assert_state_equal(model, weights)
    assert torch.equal(arch.run(model), attached)


# ------------------------------------------------------------------------------------------------ routing
def dora_group(model: nn.Module, roles: list[str]) -> DeltaGroup:
    group = DeltaGroup(model)
    for i, (r, rslora) in enumerate([(2, False), (4, True), (8, False)]):
        delta = DoraModel(model, modified_modules=roles, lora_r=r, use_rslora=rslora, name="abc"[i])
        perturb(delta, seed=20 + i, scale=0.3)
        with torch.no_grad():
            for site in delta.sites:  # magnitudes near the row norms, as trained ones are
                site.module.magnitude.copy_(site.module.weight_norm(site.host) * (1 + 0.1 * i))
        delta.detach()
        group.add(delta)
    return group


def batch(n: int, seed: int = 4) -> dict[str, torch.Tensor]:
    ids = torch.randint(2, VOCAB, (n, 6), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def alone(group: DeltaGroup, model: nn.Module, inputs: dict[str, torch.Tensor], names: list[Any]) -> list[torch.Tensor]:
    out = []
    for i, name in enumerate(names):
        group.switch(name)
        with torch.no_grad():
            out.append(model(**{k: v[i : i + 1] for k, v in inputs.items()}).logits[0])
    group.switch(None)
    return out


@pytest.mark.parametrize("path", ["gather", "segment"])
@pytest.mark.parametrize("arch_name", list(ROLES))
def test_a_mixed_batch_of_dora_deltas_equals_each_row_alone(arch_name: str, path: str) -> None:
    model = ARCHS[arch_name].build()
    group = dora_group(model, ROLES[arch_name])
    names = ["b", None, "a", "c", "a", "b"]
    inputs = batch(len(names))
    with torch.inference_mode(), group.route(names, path=path):
        routed = model(**inputs).logits
    calls = [r.calls[path] for r in group._routers or []]
    assert calls and all(c > 0 for c in calls)
    for i, ref in enumerate(alone(group, model, inputs, names)):
        assert_same_function(routed[i], ref, model=model)


def test_routed_dora_follows_a_host_weight_changed_between_blocks() -> None:
    model = ARCHS["llama"].build()
    group = dora_group(model, ["attn.q"])
    names = ["a", "c"]
    inputs = batch(2)
    with torch.no_grad(), group.route(names, path="gather"):
        model(**inputs)
    host = model.get_submodule(group["a"].sites[0].name)
    with torch.no_grad():
        host.weight.add_(torch.randn(host.weight.shape, generator=torch.Generator().manual_seed(0)) * 0.1)
    with torch.no_grad(), group.route(names, path="gather"):
        routed = model(**inputs).logits
    for i, ref in enumerate(alone(group, model, inputs, names)):
        assert_same_function(routed[i], ref, model=model)


# ------------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize(("modules", "match"), [(["embed"], "DoRA on embeddings is not implemented"),
                                                 (["attn.norm"], "supports nn.Linear and transformers Conv1D")])
def test_unsupported_hosts_are_refused_and_change_nothing(modules: list[str], match: str) -> None:
    model = ARCHS["bert"].build()
    state, hooks = snapshot(model), hook_counts(model)
    with pytest.raises(UnsupportedModuleError, match=match):
        DoraModel(model, modified_modules=modules)
    assert_state_equal(model, state)
    assert hook_counts(model) == hooks


def test_sites_are_dora_sites_that_transform_the_output() -> None:
    from deltakit.site import Composition

    delta = DoraModel(ARCHS["gpt2"].build(), lora_r=2)
    assert all(isinstance(s.module, DoraSite) for s in delta.sites)
    assert DoraSite.composition is Composition.TRANSFORMS_OUTPUT
    assert sorted(n for n, _ in delta.sites[0].module.named_parameters()) == ["lora_A", "lora_B", "magnitude"]
