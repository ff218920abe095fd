"""StructureSearch on a tiny BERT: gates at 1 are the ungated deltas bit for bit, detach restores the backbone,
a seed reproduces the search, the selection fits the budget, and bad input changes nothing."""

from __future__ import annotations

import pytest
import torch

from deltakit import CompositeDelta, DeltaConfigError, ModuleMatchError, UnsupportedModuleError
from deltakit.search import CandidateSet, StructureSearch, list_candidates, random_structure
from tests.helpers import assert_state_equal, hook_counts, perturb, snapshot, tiny_bert
from tests.tolerances import assert_same_function

SETS = [
    CandidateSet("lora", ["attn.q", "attn.v", "ff.w1"], {"lora_r": 1}),
    CandidateSet("bitfit", ["attn.q", "attn.norm", "ff.norm"]),
    CandidateSet("adapter", ["attn.o"], {"bottleneck_dim": 2}),
]
X = torch.randint(0, 100, (3, 6), generator=torch.Generator().manual_seed(0))


def loss_of(model):
    return lambda step: model(input_ids=X).logits.pow(2).mean() + model(input_ids=X.flip(0)).logits[:, 0].mean()


def test_candidates_have_their_exact_sizes() -> None:
    found = list_candidates(tiny_bert(), SETS)
    h = 32
    sizes = {(c.method, c.module.rpartition(".")[2]): c.size for c in found}
    assert len(found) == 2 * (3 + 3 + 1)  # two layers
    assert sizes[("lora", "query")] == h + h and sizes[("lora", "dense")] in (h + 2 * h, h + h)
    assert sizes[("bitfit", "query")] == h and sizes[("bitfit", "LayerNorm")] == h
    assert sizes[("adapter", "dense")] == h * 2 + 2 + 2 * h + h


def gated_and_ungated(sets):
    """Logits with every gate fixed at 1, then with the same site modules attached directly (same order)."""
    model = tiny_bert()
    search = StructureSearch(model, sets, budget=300, seed=0)
    for delta in search.deltas:
        perturb(delta, scale=0.3)  # not the identity any more
    search.fix_gates(1.0)
    gated = model(input_ids=X).logits
    search.detach()
    for delta in search.deltas:
        delta.inner.attach()
    return model, gated, model(input_ids=X).logits


def test_all_gates_at_1_equal_the_ungated_deltas_exactly() -> None:
    """The same operations run (no two LoRA sites read one input, so LoRA does not fuse their projections)."""
    sets = [CandidateSet("lora", ["attn.q", "ff.w1"], {"lora_r": 1}), *SETS[1:]]
    _, gated, ungated = gated_and_ungated(sets)
    assert torch.equal(gated, ungated)


def test_all_gates_at_1_equal_the_ungated_deltas_to_rounding() -> None:
    """With LoRA on query and value, the attached LoRA computes both projections of their shared input in one
    matmul (its on_attach link), which the gated sites do not: another computation, compared with tolerances."""
    model, gated, ungated = gated_and_ungated(SETS)
    assert_same_function(gated, ungated, model=model, tokens=X.numel())


def test_all_gates_at_0_equal_the_backbone_exactly() -> None:
    model = tiny_bert()
    base = model(input_ids=X).logits
    search = StructureSearch(model, SETS, budget=300, seed=0)
    for delta in search.deltas:
        perturb(delta, scale=0.3)
    search.fix_gates(0.0)
    assert torch.equal(model(input_ids=X).logits, base)


def test_detach_after_a_search_restores_the_backbone_bit_for_bit() -> None:
    model = tiny_bert()
    state, hooks, names = snapshot(model), hook_counts(model), [n for n, _ in model.named_modules()]
    base = model(input_ids=X).logits
    search = StructureSearch(model, SETS, budget=300, seed=0)
    search.fit(loss_of(model), steps=3, extra_parameters=list(model.classifier.parameters())[:0])
    assert any(p.abs().sum() > 0 for d in search.deltas for p in d.parameters())
    search.detach()
    assert_state_equal(model, state)
    assert hook_counts(model) == hooks and [n for n, _ in model.named_modules()] == names
    assert torch.equal(model(input_ids=X).logits, base)


def run_search(seed: int):
    model = tiny_bert()
    search = StructureSearch(model, SETS, budget=250, seed=seed)
    search.fit(loss_of(model), steps=4, gate_lr=0.5)
    return search, search.probabilities(), search.select()


def test_a_seed_reproduces_the_search_and_the_selection() -> None:
    _, probs_a, sel_a = run_search(1)
    search_b, probs_b, sel_b = run_search(1)
    assert torch.equal(probs_a, probs_b)
    assert sel_a == sel_b
    assert abs(search_b.expected_parameters() - 250) <= 1e-6
    assert not torch.equal(run_search(2)[1], probs_a)  # the seed matters (gate samples, initialisation)


def test_the_gates_learn_and_the_selection_fits_the_budget() -> None:
    search, probs, structure = run_search(0)
    assert search.alpha.detach().abs().sum() > 0
    assert structure.num_parameters <= 250 and structure.chosen
    assert probs.min() < probs.max()


def test_the_selected_structure_builds_on_a_fresh_backbone() -> None:
    _, _, structure = run_search(0)
    fresh = tiny_bert()
    base = fresh(input_ids=X).logits
    delta = structure.build(fresh)
    assert isinstance(delta, CompositeDelta) and delta.state == "attached"
    assert delta.num_delta_parameters() == structure.num_parameters <= 250
    assert sorted(delta.modified_modules) == sorted({c.module for c in structure.chosen})
    assert torch.equal(fresh(input_ids=X).logits, base)  # fresh deltas are the identity
    delta.detach()


def test_random_structures_fit_and_depend_on_the_seed() -> None:
    a = random_structure(tiny_bert(), SETS, 400, seed=0)
    assert a.num_parameters <= 400 and a == random_structure(tiny_bert(), SETS, 400, seed=0)
    assert any(random_structure(tiny_bert(), SETS, 400, seed=s).chosen != a.chosen for s in range(1, 5))


@pytest.mark.parametrize(
    ("candidates", "budget", "error", "match"),
    [
        (SETS, 10, DeltaConfigError, "below the smallest candidate"),
        (SETS, 10**6, DeltaConfigError, "covers every candidate"),
        ([], 100, DeltaConfigError, "non-empty list"),
        ([CandidateSet("lora", ["no_such_module"])], 100, ModuleMatchError, "no_such_module"),
        ([CandidateSet("nope", ["query"])], 100, DeltaConfigError, "Unknown candidate method"),
        ([CandidateSet("lora", ["query"], {"lora_r": 0})], 100, DeltaConfigError, "lora_r"),
        ([CandidateSet("lora", ["query"], {"modified_modules": ["x"]})], 100, DeltaConfigError, "without"),
        ([CandidateSet("compacter", ["attn.o"], {"reduction_factor": 8})], 100, UnsupportedModuleError, "shares"),
        ([CandidateSet("prefix", ["attention.self"])], 100, UnsupportedModuleError, "shares|rewrites"),
        ([CandidateSet("lora", ["query"]), CandidateSet("lora", ["attn.q"])], 100, DeltaConfigError, "twice"),
        (SETS, "1k", DeltaConfigError, "budget"),
    ],
)
def test_bad_input_is_refused_before_anything_changes(candidates, budget, error, match) -> None:
    model = tiny_bert()
    state, hooks, names = snapshot(model), hook_counts(model), [n for n, _ in model.named_modules()]
    with pytest.raises(error, match=match):
        StructureSearch(model, candidates, budget)
    assert_state_equal(model, state)
    assert hook_counts(model) == hooks and [n for n, _ in model.named_modules()] == names


def test_search_cannot_fit_after_detach() -> None:
    model = tiny_bert()
    search = StructureSearch(model, SETS, budget=300)
    search.detach()
    with pytest.raises(Exception, match="detached"):
        search.fit(loss_of(model), steps=1)


def test_open_steps_train_the_deltas_with_every_gate_at_1() -> None:
    model = tiny_bert()
    search = StructureSearch(model, SETS, budget=300, seed=0)
    seen = []

    def loss(step):
        seen.append((search.bank.values.clone(), search.alpha.detach().clone()))
        return loss_of(model)(step)

    search.fit(loss, steps=3, open_steps=2)
    assert all(torch.equal(gates, torch.ones_like(gates)) for gates, _ in seen[:2])
    assert torch.equal(seen[2][1], torch.zeros_like(seen[2][1]))  # the open steps left the logits alone
    assert not torch.equal(seen[2][0], torch.ones_like(seen[2][0]))  # then the gates are sampled
    assert search.alpha.detach().abs().sum() > 0
    with pytest.raises(DeltaConfigError, match="open_steps"):
        search.fit(loss, steps=3, open_steps=3)
