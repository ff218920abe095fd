"""What kind of host a module is: linear (``nn.Linear`` or transformers' ``Conv1D``), a convolution, a norm, and its
sizes."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn
from torch.nn.parameter import UninitializedParameter

from ..site import DeltaSite


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' ``Conv1D`` (GPT-2's linear layer with a transposed weight)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is a dependency, but keep plain-torch use possible
        return False
    return isinstance(module, Conv1D)


def linear_dims(module: nn.Module) -> tuple[int, int] | None:
    """``(in_features, out_features)`` of an ``nn.Linear`` or a transformers ``Conv1D``, else ``None``."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if is_conv1d(module):
        return int(module.weight.shape[0]), int(module.nf)
    return None


def norm_shape(module: nn.Module) -> tuple[int, ...] | None:
    """The normalized shape of a LayerNorm or an RMSNorm-like module (T5LayerNorm, LlamaRMSNorm, ...), else None.

    RMSNorm-like means: a class whose name ends with ``Norm``, with a 1-d weight parameter and no child modules
    besides deltakit's own per-site modules (a :class:`~deltakit.hooks.DeltaSite` that an attached delta registered
    on the norm does not change what the norm is, so a second delta can still modify it). ``nn.GroupNorm`` is not
    one: its weight scales the channels of a channels-first ``(N, C, ...)`` tensor, not its last dimension (see
    :func:`channels_first_width`).
    """
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        return tuple(module.normalized_shape)
    if isinstance(module, nn.GroupNorm):
        return None
    weight = getattr(module, "weight", None)
    if (
        type(module).__name__.endswith("Norm")
        and isinstance(weight, nn.Parameter)
        and weight.dim() == 1
        and all(isinstance(child, DeltaSite) for child in module.children())
    ):
        return tuple(weight.shape)
    return None


# ------------------------------------------------------------------------------------------------ convolutions
@dataclass(frozen=True)
class ConvGeometry:
    """What a delta on an ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d`` must know of its host, read once at build time.

    A low-rank update of a convolution is itself a convolution with the host's kernel size, stride, padding (and
    padding mode) and dilation, so that it sees the same receptive field and produces the same output grid; that is
    also what makes it foldable into the host's weight.

    Attributes:
        dims: Spatial dimensions (1, 2 or 3).
        in_channels, out_channels, groups: As on the host.
        kernel_size, stride, dilation: Per spatial dimension.
        padding: Per spatial dimension, or ``"same"`` / ``"valid"``; used by the convolution itself when
            ``padding_mode`` is ``"zeros"``.
        padding_mode: ``"zeros"``, ``"reflect"``, ``"replicate"`` or ``"circular"``.
        pre_pad: For a non-zero ``padding_mode``, the ``F.pad`` amounts (last dimension first) applied before a
            convolution without padding, as the host does; ``None`` for ``"zeros"``.
    """

    dims: int
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    groups: int
    padding_mode: str
    pre_pad: tuple[int, ...] | None

    @property
    def fan_in(self) -> int:
        """Inputs one output value reads from: ``in_channels * prod(kernel_size)`` (a low-rank factor's width)."""
        return self.in_channels * math.prod(self.kernel_size)

    def describe(self) -> str:
        """The host as PyTorch prints its main settings (for error messages)."""
        return (
            f"Conv{self.dims}d({self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding!r}, dilation={self.dilation}, groups={self.groups})"
        )


_CONV_TYPES = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}


def is_convolution(module: nn.Module) -> bool:
    """Whether ``module`` is any PyTorch convolution (``nn.Conv*d``, ``nn.ConvTranspose*d``, lazy ones included)."""
    return isinstance(module, nn.modules.conv._ConvNd)


def conv_geometry(module: nn.Module) -> ConvGeometry | None:
    """The :class:`ConvGeometry` of an ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d`` (subclasses included, transposed
    convolutions not: they are a different operator), else ``None``. A lazy convolution must have run once
    (``in_channels`` is unknown before): ``None`` until then."""
    dims = next((d for cls, d in _CONV_TYPES.items() if isinstance(module, cls)), None)
    if dims is None or isinstance(module.weight, UninitializedParameter):
        return None
    padding = module.padding
    pre_pad = None
    if module.padding_mode != "zeros":
        if padding == "valid":
            sides = [(0, 0)] * dims
        elif padding == "same":  # as PyTorch's conv: the odd one of a total d * (k - 1) goes to the right
            totals = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
            sides = [(t // 2, t - t // 2) for t in totals]
        else:
            sides = [(p, p) for p in padding]
        pre_pad = tuple(side for pair in reversed(sides) for side in pair)
    return ConvGeometry(
        dims=dims,
        in_channels=int(module.in_channels),
        out_channels=int(module.out_channels),
        kernel_size=tuple(module.kernel_size),
        stride=tuple(module.stride),
        padding=padding if isinstance(padding, str) else tuple(padding),
        dilation=tuple(module.dilation),
        groups=int(module.groups),
        padding_mode=str(module.padding_mode),
        pre_pad=pre_pad,
    )


def channels_first_width(module: nn.Module) -> int | None:
    """The channel count of a module whose output is channels-first and scaled per channel by its own parameters:
    ``out_channels`` of an ``nn.Conv1d/2d/3d`` (see :func:`conv_geometry`), ``num_channels`` of an ``nn.GroupNorm``;
    else ``None``."""
    geometry = conv_geometry(module)
    if geometry is not None:
        return geometry.out_channels
    if isinstance(module, nn.GroupNorm):
        return int(module.num_channels)
    return None
