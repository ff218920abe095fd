"""Helpers shared by the adapter-family methods: activations, host output sizes, tuple outputs."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DeltaConfigError, DeltaError, UnsupportedModuleError
from ..site import DeltaSite
from ..routing import SiteRouter
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
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise DeltaConfigError(f"{owner}.non_linearity {name!r} is unknown; choose one of {sorted(ACTIVATIONS)}.")


def _width_of_leaf(module: nn.Module, side: int) -> int | None:
    """The input (``side=0``) or output (``side=1``) feature width of a Linear / Conv1D / norm module, else None."""
    dims = linear_dims(module)
    if dims is not None:
        return dims[side]
    shape = norm_shape(module)
    return int(math.prod(shape)) if shape is not None else None


def _refuse_unsized(name: str, host: nn.Module, method: str, why: str) -> UnsupportedModuleError:
    return UnsupportedModuleError(
        f"{method} cannot modify {name!r} ({type(host).__name__}): {why} Adapters act on the last dimension of a "
        f"module's output; point modified_modules at a Linear layer (or a block returning hidden states) instead."
    )


def _feature_width(name: str, host: nn.Module, backbone: nn.Module, method: str, side: int) -> int:
    if isinstance(host, nn.modules.conv._ConvNd):
        raise _refuse_unsized(
            name, host, method,
            f"a convolution's {'input' if side == 0 else 'output'} is channels-first (N, C, ...), so its last "
            f"dimension is a spatial one, not the {host.in_channels if side == 0 else host.out_channels} channels.",
        )
    if isinstance(host, nn.GroupNorm):
        raise _refuse_unsized(
            name, host, method,
            f"a GroupNorm's input and output are channels-first (N, C, ...), so their last dimension is a spatial "
            f"one, not the {host.num_channels} channels.",
        )
    if isinstance(host, nn.Embedding):
        if side == 0:
            raise _refuse_unsized(name, host, method, "its input is token ids, not features.")
        return host.embedding_dim
    width = _width_of_leaf(host, side)
    if width is not None:
        return width
    # A block (BertIntermediate, T5LayerFF, a decoder layer): its output comes from its last Linear (its input goes
    # to its first), in registration order; failing a Linear, a norm layer; failing both, the model's hidden size.
    # Modules inside deltakit's own per-site modules are not the host's.
    leaves = [m for m in _own_modules(host) if linear_dims(m) is not None]
    if not leaves:
        leaves = [m for m in _own_modules(host) if norm_shape(m) is not None]
    if leaves:
        return int(_width_of_leaf(leaves[0 if side == 0 else -1], side))  # type: ignore[arg-type]
    config = find_config(backbone)
    hidden = getattr(config, "hidden_size", None) if config is not None else None
    if isinstance(hidden, int):
        return hidden
    raise UnsupportedModuleError(
        f"{method} cannot tell the {'input' if side == 0 else 'output'} size of {name!r} ({type(host).__name__}): it "
        f"is not a Linear, Conv1D or norm layer, holds none, and the backbone has no config with hidden_size. Point "
        f"modified_modules at a Linear layer."
    )


def _own_modules(host: nn.Module) -> list[nn.Module]:
    """``host``'s descendants in registration order, without deltakit's per-site modules and their insides."""
    out: list[nn.Module] = []

    def walk(module: nn.Module) -> None:
        for child in module.children():
            if isinstance(child, DeltaSite):
                continue
            out.append(child)
            walk(child)

    walk(host)
    return out


def output_dim(name: str, host: nn.Module, backbone: nn.Module, method: str) -> int:
    """The size of the last dimension of ``host``'s output, read from its attributes (no forward pass).

    Linear / Conv1D: ``out_features``; LayerNorm / RMSNorm-like: the normalized size; Embedding: ``embedding_dim``;
    a block: its last Linear's ``out_features`` (BERT's ``intermediate``: the intermediate size), else its last
    norm's size, else the backbone config's ``hidden_size``. Convolutions are refused: their output's last
    dimension is spatial.

    Raises:
        UnsupportedModuleError: the size cannot be told, or the host is a convolution.
    """
    return _feature_width(name, host, backbone, method, 1)


def input_dim(name: str, host: nn.Module, backbone: nn.Module, method: str) -> int:
    """The size of the last dimension of ``host``'s (first) input, like :func:`output_dim` (a block: its first
    Linear's ``in_features``). Embeddings (token ids) and convolutions are refused."""
    return _feature_width(name, host, backbone, method, 0)


def check_width(hidden: torch.Tensor, expected: int, where: str, method: str) -> None:
    """Raise a clear error when a host's output is not as wide as the adapter built for it (a block whose output
    does not come from the module its width was read from)."""
    if hidden.shape[-1] != expected:
        raise DeltaError(
            f"{method} on {where!r} was built for outputs {expected} wide (read from the module's layers), but the "
            f"module returned a tensor of shape {tuple(hidden.shape)}. Point modified_modules at the Linear layer "
            f"that produces this output, and detach this delta."
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
        def add(h: torch.Tensor) -> torch.Tensor:
            # the same clear error as the unrouted hook when the host's output is not what its layers said
            check_width(h, stack["w_down"].shape[1], self.host_name, f"routed {type(self.sites[0]).__name__}")
            return h + self.update(stack, slots, h).to(h.dtype)

        return map_hidden(output, add)
