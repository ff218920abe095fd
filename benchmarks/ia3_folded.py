"""Diagnostic for the (IA)^3 benchmark: what folding each vector into its host's weight would cost.

deltakit's (IA)^3 sites act through hooks around the host's call (deltakit/deltas/ia3.py): an output site scales the
host's output, an input site scales the host's input, each an activation-sized element-wise multiply, and each keeps
one activation for the vector's gradient. A hook cannot change the weight the host multiplies by, so the cheaper
computation below is out of reach of the hook contract: it replaces the host module itself (in a copy of the
backbone used only for timing). Comparing it with the hooked (IA)^3 step says how much of the overhead over a frozen
step belongs to the element-wise passes that only a site able to replace its host's call could avoid.

* output site: ``y = (diag(l) W) x + l * b``; the backward gives ``x``'s gradient from the scaled weight (the GEMM a
  frozen step runs anyway) and ``l``'s from the scaled output it keeps, ``sum_rows(g * y) / l``;
* input site: ``y = (W diag(l)) x + b``; ``x``'s gradient is again one GEMM with the scaled weight, and ``l``'s
  gradient reads the kept input ``x``: ``sum_rows((g W) * x)``, where ``g W`` is that same GEMM's result divided
  by ``l`` — summed first and divided once per feature.

Both divide by ``l``, so this is a measurement device, not a method: it assumes no entry of ``l`` is zero (the
vectors here are ones plus noise).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from deltakit.deltas.ia3 import IA3InputSite, scale_backward


class _OutputFolded(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                scale: torch.Tensor) -> torch.Tensor:
        folded = weight * scale[:, None]
        out = F.linear(x, folded, None if bias is None else bias * scale)
        ctx.save_for_backward(out, folded, scale)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, torch.Tensor]:
        out, folded, scale = ctx.saved_tensors
        _, grad_scaled = scale_backward(grad, out, scale, need_x=False)
        return grad @ folded, None, None, grad_scaled / scale


class _InputFolded(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                scale: torch.Tensor) -> torch.Tensor:
        folded = weight * scale
        ctx.save_for_backward(x, folded, scale)
        return F.linear(x, folded, bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, torch.Tensor]:
        x, folded, scale = ctx.saved_tensors
        grad_x = grad @ folded  # = l * (grad W): x's gradient
        _, summed = scale_backward(grad_x, x, scale, need_x=False)
        return grad_x, None, None, summed / scale


class FoldedIA3Linear(nn.Module):
    """An ``nn.Linear`` host replaced by its (IA)^3-folded computation (timing copies only)."""

    def __init__(self, host: nn.Linear, scale: torch.Tensor, scales_input: bool) -> None:
        super().__init__()
        self.host = host
        self.scales_input = scales_input
        self.scale = nn.Parameter(scale.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fn = _InputFolded if self.scales_input else _OutputFolded
        return fn.apply(x, self.host.weight, self.host.bias, self.scale)


def fold_into_copy(backbone: nn.Module, delta: Any) -> list[nn.Parameter]:
    """Replace, in ``backbone`` (a frozen copy of ``delta``'s backbone made before the delta was attached), every
    host of ``delta``'s sites by a :class:`FoldedIA3Linear` holding the same vector; returns the vectors.

    Raises:
        TypeError: a host is not a plain ``nn.Linear`` (a fused or Conv1D host has no folded twin here).
    """
    backbone.requires_grad_(False)
    params = []
    for site in delta.sites:
        parent_name, _, child = site.name.rpartition(".")
        parent = backbone.get_submodule(parent_name)
        host = getattr(parent, child)
        if type(host) is not nn.Linear or getattr(site.module, "positions", None) is not None:
            raise TypeError(f"{site.name}: the folded diagnostic handles plain nn.Linear hosts only")
        folded = FoldedIA3Linear(host, site.module.scale, isinstance(site.module, IA3InputSite))
        setattr(parent, child, folded)
        params.append(folded.scale)
    return params
