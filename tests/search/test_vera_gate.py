"""VeRA as a structure-search candidate: its frozen projections are shared by every site, its vectors are per site,
so a gate on one site scales that site's update only (gate 1: the ungated VeRA bit for bit, gate 0: the backbone),
a candidate costs its own vectors (``r + out``), and the search leaves nothing behind."""

from __future__ import annotations

import pytest
import torch

from deltakit import DeltaConfigError, UnsupportedModuleError
from deltakit.search import CandidateSet, StructureSearch, list_candidates
from tests.helpers import assert_state_equal, hook_counts, perturb, snapshot, tiny_bert
from tests.tolerances import assert_same_function

R = 8
VERA = CandidateSet("vera", ["attn.q", "attn.v", "ff.w1"], {"vera_r": R})
X = torch.randint(0, 100, (3, 6), generator=torch.Generator().manual_seed(0))


def loss_of(model):
    return lambda step: model(input_ids=X).logits.pow(2).mean() + model(input_ids=X.flip(0)).logits[:, 0].mean()


def perturbed_search(model, sets=(VERA,), budget=200):
    search = StructureSearch(model, list(sets), budget=budget, seed=0)
    for delta in search.deltas:
        perturb(delta, scale=0.3)  # not the identity any more
    return search


def ungated(search):
    """Detach the gates and attach the very same VeRA sites (and projections) directly."""
    search.detach()
    (gated,) = search.deltas
    return gated.inner.attach()


def test_a_vera_candidate_costs_its_own_vectors() -> None:
    """r (d) + out (b) per site; the shared projections are buffers regenerated from the seed: not counted."""
    h = 32
    sizes = {c.module.split("encoder.layer.")[1]: c.size for c in list_candidates(tiny_bert(), [VERA])}
    assert len(sizes) == 2 * 3
    assert sizes["0.attention.self.query"] == sizes["1.attention.self.value"] == R + h
    assert sizes["0.intermediate.dense"] == R + 2 * h


def test_gates_at_1_equal_the_ungated_vera_exactly() -> None:
    model = tiny_bert()
    search = perturbed_search(model)
    search.fix_gates(1.0)
    gated = model(input_ids=X).logits
    ungated(search)
    assert torch.equal(gated, model(input_ids=X).logits)


def test_gates_at_0_equal_the_backbone_exactly() -> None:
    model = tiny_bert()
    base = model(input_ids=X).logits
    search = perturbed_search(model)
    search.fix_gates(0.0)
    assert torch.equal(model(input_ids=X).logits, base)


@pytest.mark.parametrize("index", [0, 4])
def test_one_open_gate_is_that_site_alone(index: int) -> None:
    """Only site ``index``'s gate open: exactly VeRA with every other site's ``b`` at zero (no update there), the
    same shared projections: closing the other gates takes nothing away from this site."""
    model = tiny_bert()
    search = perturbed_search(model)
    gates = torch.zeros(len(search.candidates))
    gates[index] = 1.0
    search.fix_gates(gates)
    gated = model(input_ids=X).logits
    delta = ungated(search)
    with torch.no_grad():
        for k, site in enumerate(delta.sites):
            if k != index:
                site.module.lambda_b.zero_()
    assert torch.equal(gated, model(input_ids=X).logits)


def test_a_half_open_gate_halves_that_site_s_update() -> None:
    """lerp(out, out + u, z) = out + z u: the same as halving that site's ``b`` (another computation)."""
    model = tiny_bert()
    search = perturbed_search(model)
    gates = torch.zeros(len(search.candidates))
    gates[1] = 0.5
    search.fix_gates(gates)
    gated = model(input_ids=X).logits
    delta = ungated(search)
    with torch.no_grad():
        for k, site in enumerate(delta.sites):
            site.module.lambda_b.mul_(0.5 if k == 1 else 0.0)  # halving is exact in binary floating point
    assert_same_function(gated, model(input_ids=X).logits, model=model, tokens=X.numel())


def test_the_search_trains_the_vectors_never_the_projections_and_detaches_exactly() -> None:
    model = tiny_bert()
    state, hooks, names = snapshot(model), hook_counts(model), [n for n, _ in model.named_modules()]
    base = model(input_ids=X).logits
    search = StructureSearch(model, [VERA, CandidateSet("lora", ["attn.k"], {"lora_r": 1})], budget=150, seed=0)
    (vera, _) = search.deltas
    projections = vera.inner.shared
    before = (projections.vera_A.clone(), projections.vera_B.clone())
    assert not any("vera_A" in k or "vera_B" in k for k in model.state_dict())  # non-persistent buffers
    # What the optimizer trains is exactly what the budget counts: the vectors, never the projections.
    assert sum(p.numel() for p in search.delta_parameters()) == sum(c.size for c in search.candidates)
    search.fit(loss_of(model), steps=3, open_steps=1)
    assert all(site.module.inner.lambda_b.abs().sum() > 0 for site in vera.sites)
    assert torch.equal(projections.vera_A, before[0]) and torch.equal(projections.vera_B, before[1])
    assert search.select().num_parameters <= 150
    search.detach()
    assert_state_equal(model, state)
    assert hook_counts(model) == hooks and [n for n, _ in model.named_modules()] == names
    assert torch.equal(model(input_ids=X).logits, base)


def test_model_to_moves_the_projections_during_the_search() -> None:
    """The gated delta registers VeRA's shared projections on the backbone root while the search is attached."""
    model = tiny_bert()
    search = perturbed_search(model)
    projections = search.deltas[0].inner.shared
    assert any(m is projections for m in model.modules())
    model.double()
    assert projections.vera_A.dtype == projections.vera_B.dtype == torch.float64
    search.fix_gates(1.0)
    assert model(input_ids=X).logits.dtype == torch.float64
    search.detach()
    assert not any(m is projections for m in model.modules())


def test_a_selected_vera_structure_builds_with_the_searched_size() -> None:
    model = tiny_bert()
    search = StructureSearch(model, [VERA, CandidateSet("bitfit", ["attn.norm"])], budget=200, seed=0)
    search.fit(loss_of(model), steps=2)
    structure = search.select()
    search.detach()
    assert "vera" in {c.method for c in search.candidates}
    fresh = tiny_bert()
    base = fresh(input_ids=X).logits
    delta = structure.build(fresh)
    assert delta.num_delta_parameters() == structure.num_parameters <= 200
    assert torch.equal(fresh(input_ids=X).logits, base)  # a fresh VeRA is the identity
    delta.detach()


@pytest.mark.parametrize(
    ("candidates", "error", "match"),
    [
        ([CandidateSet("vera", ["attn.q"], {"vera_r": 0})], DeltaConfigError, "vera_r"),
        ([CandidateSet("vera", ["attn.q"], {"vera_r": 10**4})], DeltaConfigError, "vera_r"),
        ([CandidateSet("vera", ["attn.norm"], {"vera_r": 4})], UnsupportedModuleError, "LayerNorm"),
        ([CandidateSet("compacter", ["attn.o"], {"reduction_factor": 8})], UnsupportedModuleError,
         "shares trainable parameters"),
    ],
)
def test_bad_vera_candidates_are_refused_before_anything_changes(candidates, error, match) -> None:
    model = tiny_bert()
    state, hooks, names = snapshot(model), hook_counts(model), [n for n, _ in model.named_modules()]
    with pytest.raises(error, match=match):
        StructureSearch(model, candidates, 100)
    assert_state_equal(model, state)
    assert hook_counts(model) == hooks and [n for n, _ in model.named_modules()] == names


def test_a_candidate_set_trains_at_its_own_learning_rate() -> None:
    """VeRA wants rates ~100x LoRA's: a set's ``lr`` is its deltas' peak rate in fit. Each Adam step moves an entry
    by about the rate (the first by exactly it where the gradient is well above eps), so two steps move the
    largest entry by between one and about two rates."""
    model = tiny_bert()
    sets = [CandidateSet("vera", ["attn.q"], {"vera_r": R}, lr=0.1), CandidateSet("lora", ["attn.k"], {"lora_r": 1})]
    search = StructureSearch(model, sets, budget=100, seed=0)
    for delta in search.deltas:
        perturb(delta, scale=0.3)
    before = [[p.detach().clone() for p in d.parameters()] for d in search.deltas]
    search.fit(loss_of(model), steps=2, lr=1e-3, open_steps=1)  # the open step: every gate 1, every delta trained
    moved = [max(float((p.detach() - b).abs().max()) for p, b in zip(d.parameters(), old))
             for d, old in zip(search.deltas, before)]
    assert 0.1 * 0.99 <= moved[0] <= 0.1 * 2.5
    assert 1e-3 * 0.99 <= moved[1] <= 1e-3 * 2.5


@pytest.mark.parametrize("lr", [0, -1e-3, float("nan"), "1e-3", True])
def test_a_bad_candidate_learning_rate_is_refused(lr) -> None:
    model = tiny_bert()
    state = snapshot(model)
    with pytest.raises(DeltaConfigError, match=r"candidates\[0\]\.lr"):
        StructureSearch(model, [CandidateSet("vera", ["attn.q"], {"vera_r": R}, lr=lr)], 50)
    assert_state_equal(model, state)
