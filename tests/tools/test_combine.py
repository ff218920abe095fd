"""Combining LoRA deltas (deltakit.combine): the same results as PEFT's add_weighted_adapter for every method, exact
concatenation, SVD truncation, an ordinary delta as the result (attach, save/load, DeltaGroup), deterministic DARE,
clear errors that change nothing."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from deltakit import AutoDeltaModel, BitFitModel, DeltaError, DeltaGroup, LoraModel, combine_loras
from deltakit.combine import COMBINATION_METHODS
from deltakit.errors import DeltaConfigError
from deltakit.integrations.peft import export_to_peft
from deltakit.structures import tiny_model
from tests.helpers import assert_state_equal, hook_counts, perturb, snapshot
from tests.tolerances import assert_same_function, tolerance

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

ROLES = {
    "bert": ["attn.q", "attn.v", "embed"],
    "gpt2": ["attn.q", "ff.w1", "embed"],  # Conv1D hosts
    "llama": ["attn.q", "attn.v", "ff.w2", "embed"],
}
ALPHAS = (8, 4, 2)  # three sources with different scalings (2, 1 and 0.5 at rank 4)
# PEFT rounds the weights, and for the factor methods sqrt(|weight * scaling|), to float32 even for float64 factors;
# the comparisons run in float64, so the weights are chosen to make all of them exact: |w s| = 0.25, 0.5625, 0.25.
WEIGHTS = [0.125, -0.5625, 0.5]


@pytest.fixture(autouse=True)
def _quiet() -> None:
    warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*save_embedding_layers.*")


def ids(seed: int = 5) -> torch.Tensor:
    return torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(seed))


def hidden(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids()).last_hidden_state


def sources(
    arch: str, ranks: tuple[int, ...] = (4, 4, 4), dtype: torch.dtype = torch.float32
) -> tuple[nn.Module, list[LoraModel]]:
    """A tiny model with LoRA deltas named s0, s1, ... holding random factors."""
    model = tiny_model(arch).to(dtype)
    deltas = []
    for i, (r, alpha) in enumerate(zip(ranks, ALPHAS)):
        delta = LoraModel(model, modified_modules=ROLES[arch], lora_r=r, lora_alpha=alpha, name=f"s{i}")
        perturb(delta, seed=10 + i, scale=0.3)
        deltas.append(delta)
    return model, deltas


class Setup:
    """deltakit sources and the same adapters loaded into PEFT (through export_to_peft), shared by a module's tests.

    In float64: the SVD methods' results move with the spectral gap of the truncated update, which random test
    factors do not control; in float64 the rounding bound stays far below the effect of any mistake."""

    def __init__(self, arch: str, root: Path) -> None:
        self.arch = arch
        self.model, self.deltas = sources(arch, dtype=torch.float64)
        for i, delta in enumerate(self.deltas):
            export_to_peft(delta, root / f"s{i}")
        base = tiny_model(arch).double()
        self.peft = peft.PeftModel.from_pretrained(base, root / "s0", adapter_name="s0").eval()
        for i in range(1, len(self.deltas)):
            self.peft.load_adapter(root / f"s{i}", adapter_name=f"s{i}")
        self.names = [f"s{i}" for i in range(len(self.deltas))]

    def peft_factors(self, adapter: str, site: str) -> tuple[torch.Tensor, torch.Tensor]:
        layer = self.peft.base_model.model.get_submodule(site)
        if adapter in layer.lora_A:
            return layer.lora_A[adapter].weight.detach(), layer.lora_B[adapter].weight.detach()
        return layer.lora_embedding_A[adapter].detach(), layer.lora_embedding_B[adapter].detach()


@pytest.fixture(scope="module", params=list(ROLES))
def setup(request, tmp_path_factory) -> Setup:
    return Setup(request.param, tmp_path_factory.mktemp(request.param))


def options(method: str) -> dict:
    """Our keyword arguments for ``method`` (the PEFT spelling differs only for the rank)."""
    kw: dict = {}
    if method.endswith("svd"):
        kw["rank"] = 3
    if method not in ("cat", "linear", "svd"):
        kw["density"] = 0.5
    if "ties" in method:
        kw["majority_sign_method"] = "frequency" if method.startswith("dare") else "total"
    return kw


def peft_combine(setup: Setup, method: str, name: str) -> torch.Generator | None:
    """PEFT's add_weighted_adapter for ``method``; for DARE, returns a generator in the state PEFT's draws started from.

    PEFT draws DARE's masks from torch's global generator after creating the new adapter (whose initialisation
    draws too): a first call with a method that draws nothing, from the same seed, gives that state."""
    kw = {("svd_rank" if k == "rank" else k): v for k, v in options(method).items()}
    generator = None
    if method.startswith("dare"):
        torch.manual_seed(1234)
        probe = "svd" if method.endswith("svd") else "linear"
        setup.peft.add_weighted_adapter(setup.names, WEIGHTS, f"probe_{name}", combination_type=probe,
                                        **({"svd_rank": 3} if probe == "svd" else {}))
        generator = torch.Generator()
        generator.set_state(torch.get_rng_state())
        torch.manual_seed(1234)
    setup.peft.add_weighted_adapter(setup.names, WEIGHTS, name, combination_type=method, **kw)
    return generator


def svd_bound(full: torch.Tensor, rank: int) -> float:
    """Two computations of the rank-``rank`` SVD truncation of ``full`` may differ by this much, entry-wise.

    Each computes the truncation of ``full + E`` exactly, with ``||E|| ~ gamma_n ||full||`` (``n`` the larger side:
    forming the sum and the backward-stable SVD). Wedin's theorem turns ``E`` into a rotation of the kept singular
    subspaces by ``||E|| / gap`` (``gap = sigma_k - sigma_{k+1}``), which moves the product by up to
    ``2 sigma_1 ||E|| / gap``: the magnitude below is ``sigma_1 (1 + 2 sigma_1 / gap)``, a few operations deep.
    """
    sigma = torch.linalg.svdvals(full.double())
    if rank >= sigma.numel() or sigma[rank] == 0:
        magnitude = sigma[0].item()
    else:
        gap = (sigma[rank - 1] - sigma[rank]).item()
        magnitude = sigma[0].item() * (1 + 2 * sigma[0].item() / gap)
    return tolerance(full.dtype, depth=4, reduction=max(full.shape), magnitude=magnitude)


@pytest.mark.parametrize("method", COMBINATION_METHODS)
def test_same_result_as_peft(setup: Setup, method: str) -> None:
    name = f"m_{method}"
    generator = peft_combine(setup, method, name)
    replay = None
    if generator is not None:  # the same draws again, for the full-rank reference below
        replay = torch.Generator()
        replay.set_state(generator.get_state())
    combined = combine_loras(setup.deltas, WEIGHTS, method=method, seed=generator, name="m", **options(method))
    r = {"cat": 12}.get(method, 3 if method.endswith("svd") else 4)
    assert combined.config.lora_r == r and combined.config.lora_alpha == r and combined.state == "detached"
    if method.endswith("svd"):
        # The factors of an SVD are unique up to signs: compare the products, with a bound from the spectral gap.
        kw = {**options(method), "rank": 64}
        full = combine_loras(setup.deltas, WEIGHTS, method=method, seed=replay, name="full", **kw)
    for slot, site in enumerate(combined.sites):
        a, b = site.module.lora_A.detach(), site.module.lora_B.detach()
        their_a, their_b = setup.peft_factors(name, site.name)
        if method.endswith("svd"):
            reference = full.sites[slot].module
            exact = (reference.lora_B @ reference.lora_A).detach()
            bound = svd_bound(exact, 3)
            diff = (b @ a - their_b @ their_a).abs().max().item()
            assert diff <= bound, (site.name, diff, bound)
        else:
            # The same arithmetic on each factor entry: a sum over the sources of terms up to this size.
            scale = max(t.abs().max().item() for t in (a, b, their_a, their_b)) * len(setup.deltas)
            assert_same_function(a, their_a, depth=3, reduction=len(setup.deltas), scale=scale, note=site.name)
            assert_same_function(b, their_b, depth=3, reduction=len(setup.deltas), scale=scale, note=site.name)
    # The combined delta computes what PEFT's combined adapter computes.
    for delta in setup.deltas:
        delta.detach()
    combined.attach()
    try:
        ours = hidden(setup.model)
    finally:
        combined.detach()
        for delta in setup.deltas:
            delta.attach()
    setup.peft.set_adapter(name)
    theirs = hidden(setup.peft)
    assert_same_function(ours, theirs, depth=2 * 33, reduction=128)


def test_cat_is_exactly_the_weighted_sum() -> None:
    model, deltas = sources("llama", ranks=(2, 4, 3))  # different ranks: cat and svd accept them
    combined = combine_loras(deltas, WEIGHTS, method="cat")
    assert combined.config.lora_r == 9
    for slot, site in enumerate(combined.sites):
        expected = sum(w * d.sites[slot].module.merge_deltas(site.host)["weight"] for w, d in zip(WEIGHTS, deltas))
        terms = max(abs(w) * d.sites[slot].module.merge_deltas(site.host)["weight"].abs().max().item()
                    for w, d in zip(WEIGHTS, deltas))
        assert_same_function(site.module.merge_deltas(site.host)["weight"], expected, depth=2, reduction=9,
                             scale=terms * len(deltas))
    # Weights of one: the combined delta alone computes what the sources compute together.
    together = hidden(model)
    for delta in deltas:
        delta.detach()
    ones = combine_loras(deltas, [1.0, 1.0, 1.0], method="cat").attach()
    assert_same_function(hidden(model), together, model=model)
    assert not torch.allclose(hidden(model), hidden(tiny_model("llama")))
    ones.detach()


def test_rslora_sources_combine_to_the_exact_sum() -> None:
    """Sources with rsLoRA scaling (alpha / sqrt(r)) combine at their own scale, and the result (scaling 1) is not
    rsLoRA. PEFT 0.21 copies use_rslora into the combined adapter, which then applies sqrt(new rank) on top (its
    "cat" of two rank-4 rsLoRA adapters is sqrt(8) = 2.83 times the sum)."""
    model = tiny_model("bert")
    deltas = []
    for i in range(2):
        delta = LoraModel(model, modified_modules=["attn.q"], lora_r=4, lora_alpha=8, use_rslora=True, name=f"r{i}")
        perturb(delta, seed=20 + i, scale=0.3)
        deltas.append(delta)
    combined = combine_loras(deltas, [1.0, -0.5], method="cat")
    assert combined.config.use_rslora is False and combined.sites[0].module.scaling == 1.0
    for slot, site in enumerate(combined.sites):
        parts = [w * d.sites[slot].module.merge_deltas(site.host)["weight"] for w, d in zip([1.0, -0.5], deltas)]
        assert deltas[0].sites[slot].module.scaling == pytest.approx(8 / 2)  # alpha / sqrt(r)
        assert_same_function(site.module.merge_deltas(site.host)["weight"], sum(parts), depth=2, reduction=8,
                             scale=2 * max(p.abs().max().item() for p in parts))


def test_svd_is_the_best_rank_k_approximation() -> None:
    """One delta through "svd" is compressed (PEFT would fall back to "linear"): the error of the rank-k result is
    what Eckart-Young says is the least possible, and a rank at least the source's reproduces it."""
    _, (delta,) = sources("bert", ranks=(8,))
    compressed = combine_loras([delta], [1.0], method="svd", rank=3)
    kept = combine_loras([delta], [1.0], method="svd", rank=8)
    for slot, site in enumerate(compressed.sites):
        update = delta.sites[slot].module.merge_deltas(site.host)["weight"].detach()
        ours = site.module.merge_deltas(site.host)["weight"].detach()
        sigma = torch.linalg.svdvals(update.double())
        least = sigma[3:].square().sum().sqrt().item()
        assert (update - ours).double().norm().item() == pytest.approx(least, rel=1e-4, abs=1e-6)
        assert (update - ours).double().norm().item() < 0.99 * sigma[2:].square().sum().sqrt().item()
        full = kept.sites[slot].module.merge_deltas(site.host)["weight"].detach()
        assert_same_function(full, update, depth=4, reduction=max(update.shape), scale=sigma[0].item())


def test_svd_clamp_bounds_the_factors_at_the_quantile() -> None:
    """svd_clamp=q clamps both factors to [-h, h], h the q-quantile of their joint entries (PEFT's definition; which
    entries it cuts depends on the SVD's signs, so it is checked as a property rather than against PEFT)."""
    _, deltas = sources("bert")
    plain = combine_loras(deltas, WEIGHTS, method="svd", rank=3)
    for q in (1.0, 0.9):
        clamped = combine_loras(deltas, WEIGHTS, method="svd", rank=3, svd_clamp=q)
        for ours, reference in zip(clamped.sites, plain.sites):
            a, b = reference.module.lora_A.detach(), reference.module.lora_B.detach()
            high = torch.quantile(torch.cat([b.flatten(), a.flatten()]), q)
            assert torch.equal(ours.module.lora_A, a.clamp(-high, high))
            assert torch.equal(ours.module.lora_B, b.clamp(-high, high))
    assert any(not torch.equal(p, q) for p, q in zip(clamped.parameters(), plain.parameters()))  # q = 0.9 cuts


def test_the_result_is_an_ordinary_delta(tmp_path) -> None:
    model, deltas = sources("llama")
    combined = combine_loras(deltas, WEIGHTS, method="svd", rank=4, name="m")
    base = hidden(tiny_model("llama"))
    for delta in deltas:
        delta.detach()
    assert torch.equal(hidden(model), base)  # built detached: nothing changed yet
    combined.attach()
    attached = hidden(model)
    assert not torch.allclose(attached, base)
    combined.detach()
    assert torch.equal(hidden(model), base)
    combined.attach()
    assert torch.equal(hidden(model), attached)

    combined.save_finetuned(tmp_path / "m")
    for loader in (LoraModel.from_finetuned, AutoDeltaModel.from_finetuned):
        fresh = tiny_model("llama")
        loaded = loader(tmp_path / "m", backbone_model=fresh)
        assert loaded.config.lora_r == 4 and torch.equal(hidden(fresh), attached)

    combined.detach()
    group = DeltaGroup(model)
    for delta in [*deltas, combined]:
        group.add(delta)
    singles = {}
    for name in ("s1", "m"):
        group.switch(name)
        singles[name] = hidden(model)
    group.switch(None)
    with group.route(["s1", "m"]):
        routed = hidden(model)
    for row, name in enumerate(("s1", "m")):
        assert_same_function(routed[row], singles[name][row], model=model)


def test_dare_is_deterministic_for_a_seed_and_leaves_torch_random_state_alone() -> None:
    _, deltas = sources("gpt2")
    state = torch.get_rng_state()
    first = combine_loras(deltas, WEIGHTS, method="dare_ties", density=0.5, seed=3)
    again = combine_loras(deltas, WEIGHTS, method="dare_ties", density=0.5, seed=3)
    other = combine_loras(deltas, WEIGHTS, method="dare_ties", density=0.5, seed=4)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(first.parameters(), again.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(first.parameters(), other.parameters()))
    # density 1 drops nothing: DARE then equals its plain counterpart
    plain = combine_loras(deltas, WEIGHTS, method="ties", density=1.0)
    dense = combine_loras(deltas, WEIGHTS, method="dare_ties", density=1.0)
    assert all(torch.equal(p, q) for p, q in zip(plain.parameters(), dense.parameters()))


def other_modules() -> list[LoraModel]:
    model, deltas = sources("bert", ranks=(4,))
    return [*deltas, LoraModel(model, modified_modules=["attn.q", "attn.k", "embed"], lora_r=4, name="other")]


def other_backbone() -> list[LoraModel]:
    return [sources("bert", ranks=(4,))[1][0], sources("bert", ranks=(4,))[1][0]]


def with_extra_parameter() -> list[LoraModel]:
    _, deltas = sources("bert", ranks=(4, 4))
    deltas[1].sites[0].module.magnitude = nn.Parameter(torch.ones(32))  # what a DoRA site would hold
    return deltas


def bitfit_and_lora() -> list:
    model, deltas = sources("bert", ranks=(4,))
    return [deltas[0], BitFitModel(model)]


def two(ranks: tuple[int, ...] = (4, 4)) -> list[LoraModel]:
    return sources("bert", ranks=ranks)[1]


@pytest.mark.parametrize(
    ("make", "call", "error", "match"),
    [
        (two, lambda d: combine_loras([], []), DeltaError, "non-empty list"),
        (two, lambda d: combine_loras(d[0], [1.0]), DeltaError, "non-empty list"),
        (bitfit_and_lora, lambda d: combine_loras(d, [1.0, 1.0]), DeltaError, r"deltas\[1\] is a BitFitModel"),
        (with_extra_parameter, lambda d: combine_loras(d, [1.0, 1.0]), DeltaError, "magnitude"),
        (other_backbone, lambda d: combine_loras(d, [1.0, 1.0]), DeltaError, "one backbone"),
        (other_modules, lambda d: combine_loras(d, [1.0, 1.0]), DeltaError,
         (r"only in deltas\[0\]: \['encoder.layer.0.attention.self.value'.*only in deltas\[1\]: "
          r"\['encoder.layer.0.attention.self.key'")),
        (two, lambda d: combine_loras(d, [1.0, 1.0], method="mean"), DeltaConfigError, "must be one of"),
        (lambda: two((4, 8)), lambda d: combine_loras(d, [1.0, 1.0], method="linear"), DeltaError,
         r"same rank.*ranks \[4, 8\].*method='cat'"),
        (two, lambda d: combine_loras(d, [math.nan, 1.0]), DeltaError, r"weights\[0\] must be a finite number"),
        (two, lambda d: combine_loras(d, [1.0, math.inf]), DeltaError, r"weights\[1\] must be a finite number"),
        (two, lambda d: combine_loras(d, [1.0]), DeltaError, r"one weight per delta \(2\)"),
        (two, lambda d: combine_loras(d, [1.0, True]), DeltaError, r"weights\[1\]"),
        (two, lambda d: combine_loras(d, [1.0, 1.0], method="ties"), DeltaConfigError, "needs density"),
        (two, lambda d: combine_loras(d, [1.0, 1.0], method="dare_linear", density=0), DeltaConfigError,
         "density must be a finite number > 0"),
        (two, lambda d: combine_loras(d, [1.0, 1.0], method="ties", density=1.5), DeltaConfigError, "<= 1"),
        (two, lambda d: combine_loras(d, [1.0, 1.0], method="linear", density=0.5), DeltaConfigError,
         r"density=...\) applies to the TIES"),
        (two, lambda d: combine_loras(d, [1.0, 1.0], method="cat", rank=4), DeltaConfigError,
         "applies to the SVD methods"),
        (two, lambda d: combine_loras(d, [1.0, 1.0], method="svd", rank=0), DeltaConfigError, "rank must be"),
        (two, lambda d: combine_loras(d, [1.0, 1.0], method="ties", density=0.5, majority_sign_method="median"),
         DeltaConfigError, "majority_sign_method"),
        (two, lambda d: combine_loras(d, [1.0, 1.0], method="svd", seed=1), DeltaConfigError, "DARE methods"),
        (lambda: two((40, 40)), lambda d: combine_loras(d, [1.0, 1.0], method="cat"), DeltaConfigError,
         r"rank 80.*method='svd' with a smaller rank"),
    ],
)
def test_bad_inputs_are_clear_errors_and_change_nothing(make, call, error, match) -> None:
    deltas = make()
    models = {id(d.backbone_model): d.backbone_model for d in deltas}
    states = {key: (snapshot(m), hook_counts(m)) for key, m in models.items()}
    factors = [[p.detach().clone() for p in d.parameters()] for d in deltas]
    with pytest.raises(error, match=match):
        call(deltas)
    for key, model in models.items():
        assert_state_equal(model, states[key][0])
        assert hook_counts(model) == states[key][1]
    assert all(torch.equal(p, q) for d, saved in zip(deltas, factors) for p, q in zip(d.parameters(), saved))
    assert all(d.state == "attached" for d in deltas)
