"""The suite's rounding bound (tests/tolerances.py) is wide enough for any machine and narrow enough to catch bugs.

A machine's own rounding error for a computation is measured here as the difference between the fp32 run and the
fp64 run of the same model: another CPU's fp32 result lies within about that distance of the exact value too, so two
machines (or two implementations) differ by at most about twice that. The bound must cover it with room to spare,
and must still flag a change of one delta parameter that any real bug would exceed.
"""

from __future__ import annotations

import pytest
import torch

from deltakit import LoraModel

from tests.helpers import ARCHS, perturb
from tests.tolerances import computation_size, tolerance

#: How far below the bound a machine's own rounding error must stay: two machines can sit on opposite sides of the
#: exact value (factor 2), and that difference must still use at most half the bound.
HEADROOM = 4


def _outputs_and_grads(
    arch_name: str, dtype: torch.dtype, scale_b: float = 1.0
) -> tuple[list[torch.Tensor], torch.nn.Module]:
    arch = ARCHS[arch_name]
    model = arch.build().to(dtype)
    delta = LoraModel(model, modified_modules=["attn.q", "attn.v"], lora_r=4)
    perturb(delta, scale=0.3)
    with torch.no_grad():
        delta.sites[0].module.lora_B.mul_(scale_b)
    out = arch.run(model)
    (out * torch.linspace(-1, 1, out.numel(), dtype=dtype).view(out.shape)).sum().backward()
    return [out.detach(), *(p.grad for p in delta.parameters())], model


@pytest.mark.parametrize("arch_name", list(ARCHS))
def test_tolerance_covers_a_real_change_of_summation_order(arch_name: str) -> None:
    single, model = _outputs_and_grads(arch_name, torch.float32)
    double, _ = _outputs_and_grads(arch_name, torch.float64)
    tokens = sum(v.numel() for v in ARCHS[arch_name].inputs().values())
    depth, reduction = computation_size(model, tokens=tokens)
    for lo, hi in zip(single, double):
        own_error = (lo.double() - hi).abs().max().item()
        bound = tolerance(torch.float32, depth=depth, reduction=reduction, magnitude=hi.abs().max().item())
        assert own_error * HEADROOM <= bound, (own_error, bound)


@pytest.mark.parametrize("arch_name", list(ARCHS))
def test_tolerance_flags_a_small_change_of_one_delta_parameter(arch_name: str) -> None:
    (base, *_), model = _outputs_and_grads(arch_name, torch.float32)
    (changed, *_), _ = _outputs_and_grads(arch_name, torch.float32, scale_b=1.1)  # one site's B moved by 10%
    depth, reduction = computation_size(model)
    bound = tolerance(torch.float32, depth=depth, reduction=reduction, magnitude=base.abs().max().item())
    assert (changed - base).abs().max().item() > bound
