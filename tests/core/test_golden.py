"""Every method computes what it computed when tests/data/golden.safetensors was written (see tests/golden.py)."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from tests.golden import GOLDEN_ARCHS, GOLDEN_FILE, GOLDEN_METHODS, golden_case
from tests.tolerances import assert_same_function, assert_same_gradients

GOLDEN = load_file(str(GOLDEN_FILE))


def test_the_golden_file_covers_every_case() -> None:
    cases = {"/".join(key.split("/")[:2]) for key in GOLDEN}
    assert cases == {f"{m}/{a}" for m in GOLDEN_METHODS for a in GOLDEN_ARCHS}


@pytest.mark.parametrize("arch_name", GOLDEN_ARCHS)
@pytest.mark.parametrize("method", list(GOLDEN_METHODS))
def test_outputs_and_gradients_equal_the_recorded_ones(method: str, arch_name: str) -> None:
    values, model = golden_case(method, arch_name)
    prefix = f"{method}/{arch_name}/"
    recorded = {key[len(prefix):]: value for key, value in GOLDEN.items() if key.startswith(prefix)}
    assert recorded.keys() == values.keys(), "the delta's parameters changed names"
    # recorded on another machine, maybe: equal to rounding (on the machine that wrote it, bit for bit)
    assert_same_function(values["out"], recorded["out"], model=model)
    grads = [key for key in values if key.startswith("grad/")]
    tokens = values["out"].shape[0] * values["out"].shape[1] if values["out"].dim() > 1 else 1
    assert_same_gradients([values[k] for k in grads], [recorded[k] for k in grads], model=model, tokens=tokens)
