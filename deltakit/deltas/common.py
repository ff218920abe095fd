"""Helpers shared by the adapter-family methods: activations, host output sizes, tuple outputs."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DeltaConfigError, UnsupportedModuleError
from ..serving import SiteRouter
from ..structures import find_config, linear_dims, norm_shape

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
    "identity": lambda x: x,
}


def check_activation(name: str, owner: str) -> None:
    """Raise a :class:`DeltaConfigError` naming the valid choices if ``name`` is not a known activation."""
    if name not in ACTIVATIONS:
        raise DeltaConfigError(f"{owner}.non_linearity {name!r} is unknown; choose one of {sorted(ACTIVATIONS)}.")


def output_dim(name: str, host: nn.Module, backbone: nn.Module, method: str) -> int:
    """The size of the last dimension of ``host``'s output, read from its attributes.

    Linear / Conv1D: ``out_features``; LayerNorm / RMSNorm-like: the normalized size; any other module: the
    backbone config's ``hidden_size`` (blocks such as BERT's ``attention.output`` return hidden states).
    """
    dims = linear_dims(host)
    if dims is not None:
        return dims[1]
    shape = norm_shape(host)
    if shape is not None:
        return int(math.prod(shape))
    config = find_config(backbone)
    hidden = getattr(config, "hidden_size", None) if config is not None else None
    if isinstance(hidden, int):
        return hidden
    raise UnsupportedModuleError(
        f"{method} cannot tell the output size of {name!r} ({type(host).__name__}): it is not a Linear, Conv1D or "
        f"norm layer and the backbone has no config with hidden_size. Point modified_modules at a Linear layer."
    )


def map_hidden(output: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``fn`` to a module output: a tensor, or the first element of a tuple (hidden states first)."""
    if isinstance(output, torch.Tensor):
        return fn(output)
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return (fn(output[0]), *output[1:])
    raise UnsupportedModuleError(
        f"Cannot apply a delta to a module output of type {type(output).__name__}; expected a tensor or a tuple "
        f"starting with one."
    )


def first_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    """The first positional (or, failing that, keyword) argument of a forward call."""
    return args[0] if args else next(iter(kwargs.values()))


def glorot_(tensor: torch.Tensor, kind: str) -> None:
    """Glorot (Xavier) initialisation, ``kind`` is ``"glorot-uniform"`` or ``"glorot-normal"``."""
    if kind == "glorot-uniform":
        nn.init.xavier_uniform_(tensor)
    elif kind == "glorot-normal":
        nn.init.xavier_normal_(tensor)
    else:
        raise DeltaConfigError(f"Unknown weight init {kind!r}; use 'glorot-uniform' or 'glorot-normal'.")


def _pad(t: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    if t.shape[dim] == size:
        return t
    shape = list(t.shape)
    shape[dim] = size - t.shape[dim]
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


class BottleneckRouter(SiteRouter):
    """Per-row bottleneck adapters on one host (Adapter, LowRankAdapter, Compacter; ParallelAdapter subclasses it).

    Each site gives dense factors ``(W_down (in x b), b_down, W_up (b x out), b_up)`` through
    ``bottleneck_factors()``; bottlenecks are zero-padded to the widest (a padded unit reads 0 and writes 0) and a
    last all-zero slot adds nothing. Row ``j`` gets ``act(x_j @ W_down[s_j] + b_down[s_j]) @ W_up[s_j] + b_up[s_j]``
    via two ``baddbmm``. Sites stacked together share their activation (part of ``routing_key()``).
    """

    def build(self) -> dict[str, torch.Tensor]:
        factors = [s.bottleneck_factors() for s in self.sites]  # type: ignore[attr-defined]
        width = max(f[0].shape[1] for f in factors)
        w_down = [_pad(f[0], width, 1) for f in factors]
        b_down = [_pad(f[1], width, 0) for f in factors]
        w_up = [_pad(f[2], width, 0) for f in factors]
        b_up = [f[3] for f in factors]
        stacks = {"w_down": w_down, "b_down": b_down, "w_up": w_up, "b_up": b_up}
        return {k: torch.stack([*v, torch.zeros_like(v[0])]) for k, v in stacks.items()}

    def update(self, stack: dict[str, torch.Tensor], slots: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The adapters' values for the rows of ``x`` (``N x ... x in``), shaped ``N x ... x out``."""
        w_down = self.gather(stack, "w_down", slots)
        x3 = x.reshape(x.shape[0], -1, x.shape[-1]).to(w_down.dtype)
        z = torch.baddbmm(self.gather(stack, "b_down", slots).unsqueeze(1), x3, w_down)
        z = ACTIVATIONS[self.sites[0].non_linearity](z)  # type: ignore[attr-defined]
        up = torch.baddbmm(self.gather(stack, "b_up", slots).unsqueeze(1), z, self.gather(stack, "w_up", slots))
        return up.view(*x.shape[:-1], up.shape[-1])

    def apply(self, stack: dict[str, torch.Tensor], slots: torch.Tensor, args: tuple[Any, ...],
              kwargs: dict[str, Any], output: Any) -> Any:
        return map_hidden(output, lambda h: h + self.update(stack, slots, h).to(h.dtype))
