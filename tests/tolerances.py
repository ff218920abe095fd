"""Tolerances for comparing two *different* computations of the same function (the suite's one rule).

Bit-exactness (``torch.equal``) is a property of running the same operations twice: detach/attach, save/load,
switching back and forth. Two different computations (deltakit vs PEFT, a fused vs a separate projection, a routed
batch vs one delta at a time, ``no_grad`` vs ``inference_mode``) call other kernels or sum in another order; on
another CPU (Intel or AMD, AVX2 or AVX-512) or another transformers release the rounding differs. Their results are
compared with a tolerance derived from the dtype and the size of the computation, never with one tuned to pass on
the machine a test was written on.

The bound: a length-``K`` dot product computed in floating point is off by at most ``gamma_K = K u / (1 - K u)``
times the sum of the absolute products (``u`` the unit roundoff of the dtype; Higham, *Accuracy and Stability of
Numerical Algorithms*, 2nd ed., section 3.1). Two implementations may each be off by that much, in opposite
directions, and to first order the errors of ``depth`` operations in sequence add up. The scale of the products is
taken as the largest magnitude of the expected tensor. This worst-case bound sits two to three orders of magnitude
above the differences measured between fp32 and fp64 runs of the tiny test models (see
``test_tolerance_covers_a_real_change_of_summation_order``), and still two orders below the effect of any delta the
tests perturb, so it separates rounding from a real bug on any machine.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


def computation_size(model: nn.Module, *, tokens: int = 1) -> tuple[int, int]:
    """``(depth, reduction)`` of a model's forward and backward pass, as used by :func:`tolerance`.

    ``depth`` counts the matmul modules (each may lie on the path of an output; counting parallel ones too only
    widens the bound) twice, for the backward pass; ``reduction`` is the longest dot product: the widest input
    feature dimension, or the number of ``tokens`` a weight gradient sums over.
    """
    widths = [
        m.in_features if isinstance(m, nn.Linear) else m.weight.shape[0]
        for m in model.modules()
        if isinstance(m, (nn.Linear, Conv1D))
    ]
    return 2 * max(len(widths), 1), max([tokens, *widths])


def tolerance(dtype: torch.dtype, *, depth: int, reduction: int, magnitude: float) -> float:
    """The absolute difference two correct computations of this size may show (see the module docstring)."""
    u = torch.finfo(dtype).eps / 2
    gamma = reduction * u / (1 - reduction * u)
    return 2 * depth * gamma * max(magnitude, torch.finfo(dtype).tiny)


def assert_same_function(
    actual: torch.Tensor, expected: torch.Tensor, *, model: nn.Module | None = None, depth: int | None = None,
    reduction: int | None = None, tokens: int = 1, scale: float | None = None, note: str = "",
) -> None:
    """Assert that two different computations of one function agree to rounding.

    Give the ``model`` whose forward (and backward) produced the values, or ``depth`` and ``reduction`` directly.
    ``scale`` is the size of the terms summed (default: the largest magnitude of ``expected``); a value that cancels
    to almost nothing (a gradient summed over tokens) keeps the rounding of its terms, so pass their scale then
    (:func:`assert_same_gradients` does).
    """
    if model is not None:
        depth_m, reduction_m = computation_size(model, tokens=tokens)
        depth, reduction = depth or depth_m, reduction or reduction_m
    if depth is None or reduction is None:
        raise ValueError("assert_same_function needs a model, or depth and reduction")
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    actual, expected = actual.detach(), expected.detach()
    if not expected.is_floating_point():  # integers (token ids, labels) do not round: they must be equal
        assert torch.equal(actual, expected), f"{note + ': ' if note else ''}the integer tensors differ"
        return
    # Non-finite entries (a -inf logit masked out by generate(), say) are not rounding: they must agree exactly.
    finite = torch.isfinite(expected)
    assert torch.equal(finite, torch.isfinite(actual)) and torch.equal(actual[~finite], expected[~finite]), (
        f"{note + ': ' if note else ''}the non-finite entries differ"
    )
    actual, expected = actual[finite], expected[finite]
    magnitude = scale if scale is not None else expected.abs().max().item() if expected.numel() else 0.0
    atol = tolerance(expected.dtype, depth=depth, reduction=reduction, magnitude=magnitude)
    diff = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert diff <= atol, (
        f"{note + ': ' if note else ''}max difference {diff:.3g} exceeds the rounding bound {atol:.3g} for "
        f"{expected.dtype}, depth {depth}, reduction {reduction}, magnitude {magnitude:.3g}"
    )


def assert_same_gradients(
    actual: list[torch.Tensor] | dict[str, torch.Tensor], expected: list[torch.Tensor] | dict[str, torch.Tensor],
    *, model: nn.Module, tokens: int,
) -> None:
    """:func:`assert_same_function` for the gradients of one backward pass, compared as a whole: one parameter's
    gradient may cancel to almost nothing while its terms are as large as the others', so the scale is the largest
    gradient entry of the pass."""
    if isinstance(actual, dict):
        assert isinstance(expected, dict) and actual.keys() == expected.keys()
        names = list(expected)
        actual, expected = [actual[n] for n in names], [expected[n] for n in names]
    assert len(actual) == len(expected) and expected
    scale = max(e.detach().abs().max().item() for e in expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert_same_function(a, e, model=model, tokens=tokens, scale=scale, note=f"gradient {i}")
