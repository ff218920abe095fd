"""deltakit.search.gates: the shift meets the budget, samples are deterministic, and a gate scales a candidate's
contribution exactly at its ends (0: the host alone, 1: the method's own output)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deltakit import DeltaConfigError, LoraModel
from deltakit.search import GateBank, concrete_sample, expected_size, solve_shift
from tests.helpers import perturb, tiny_bert


@settings(max_examples=200, deadline=None)
@given(
    alpha=st.lists(st.floats(-10, 10), min_size=1, max_size=40),
    sizes=st.lists(st.integers(1, 100_000), min_size=40, max_size=40),
    fraction=st.floats(0.001, 0.999),
    beta=st.floats(0.1, 10.0),
)
def test_bisection_meets_the_expected_budget_to_1e_6(alpha, sizes, fraction, beta) -> None:
    alpha_t = torch.tensor(alpha)
    sizes_t = torch.tensor(sizes[: len(alpha)], dtype=torch.float64)
    total = float(sizes_t.sum())
    budget = fraction * total
    shift = solve_shift(alpha_t, sizes_t, budget, beta)
    assert abs(expected_size(alpha_t, sizes_t, shift, beta) - budget) <= 1e-6


def test_the_shift_follows_the_logits() -> None:
    """Raising every logit by c raises the shift by c: only the logits' differences matter."""
    alpha = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)
    sizes = torch.tensor([10.0, 20.0, 30.0])
    assert solve_shift(alpha + 5, sizes, 25.0, 1.0) == pytest.approx(solve_shift(alpha, sizes, 25.0, 1.0) + 5, abs=1e-9)


@pytest.mark.parametrize("budget", [0, -1, 60, 61])
def test_a_budget_outside_the_open_range_is_refused(budget) -> None:
    with pytest.raises(DeltaConfigError, match="strictly between 0"):
        solve_shift(torch.zeros(3), torch.tensor([10.0, 20.0, 30.0]), budget, 1.0)


def test_concrete_samples_are_deterministic_and_differentiable() -> None:
    logits = torch.tensor([0.0, 2.0, -2.0], requires_grad=True)
    a = concrete_sample(logits, 0.5, torch.Generator().manual_seed(3))
    b = concrete_sample(logits, 0.5, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and ((a > 0) & (a < 1)).all()
    a.sum().backward()
    assert logits.grad is not None and (logits.grad != 0).all()


def test_lerp_returns_its_ends_exactly() -> None:
    """The property the gate relies on (gates at 1 = the ungated delta bit for bit; at 0 = the host alone)."""
    g = torch.Generator().manual_seed(0)
    start, end = torch.randn(4, 7, generator=g) * 3, torch.randn(4, 7, generator=g) * 1e-3
    assert torch.equal(torch.lerp(start, end, torch.tensor(1.0)), end)
    assert torch.equal(torch.lerp(start, end, torch.tensor(0.0)), start)


def test_gate_bank_refuses_a_wrong_shape() -> None:
    bank = GateBank(3)
    with pytest.raises(Exception, match="shape"):
        bank.set(torch.ones(4))


def test_lora_is_unchanged_by_the_search_package() -> None:
    """Importing deltakit.search patches nothing: a plain LoRA computes what it computed."""
    model = tiny_bert()
    x = torch.randint(0, 100, (2, 5), generator=torch.Generator().manual_seed(0))
    delta = LoraModel(model, modified_modules=["query"], lora_r=2)
    perturb(delta)
    before = model(input_ids=x).logits
    import deltakit.search  # noqa: F401

    assert torch.equal(model(input_ids=x).logits, before)
