"""BitFit: Ben Zaken et al. 2022, "BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based Masked
Language-models" (arXiv:2106.10199).

``h = f(x) + b`` with a trainable delta bias ``b`` (zero at init) on the *output* of each modified Linear,
Conv1D, LayerNorm or RMSNorm-like module, where it is added along the last dimension, and of each
``nn.Conv1d/2d/3d`` or ``nn.GroupNorm``, whose outputs are channels-first (``N, C, ...``): there ``b`` holds one
value per channel, added at every position, as the host's own bias is. A separate delta bias (rather than training
the host's own bias) works on hosts without a bias (Llama's projections, RMSNorm, CLIP's patch embedding),
detaches exactly and saves only the delta. Merging adds ``b`` to the host's existing bias.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..base import DeltaBase
from ..config import DeltaConfig
from ..errors import DeltaError, DeltaStateError, UnsupportedModuleError
from ..routing import SiteRouter
from ..site import Composition, DeltaSite, factory_kwargs
from ..structures import channels_first_width, conv_geometry, linear_dims, norm_shape


@dataclass
class BitFitConfig(DeltaConfig):
    """BitFit settings; the method has no hyper-parameters of its own."""

    delta_type: ClassVar[str] = "bitfit"


class BitFitRouter(SiteRouter):
    """Per-row BitFit on one host: row ``j`` gets the bias of its delta (the last, zero slot: none)."""

    def build(self) -> dict[str, torch.Tensor]:
        biases = [s.bias for s in self.sites]  # type: ignore[attr-defined]
        return {"bias": torch.stack([*biases, torch.zeros_like(biases[0])])}

    def apply(self, stack: dict[str, torch.Tensor], slots: torch.Tensor, args: tuple[Any, ...],
              kwargs: dict[str, Any], output: torch.Tensor) -> torch.Tensor:
        bias = self.gather(stack, "bias", slots)
        site: BitFitSite = self.sites[0]  # type: ignore[assignment]
        if site.channels_first is None:  # along the last dimension(s)
            extra = output.dim() - bias.dim()
            return output + bias.view(bias.shape[0], *([1] * extra), *bias.shape[1:])
        trailing = site.trailing_dims(output)
        if output.dim() != trailing + 2:
            raise DeltaError(
                f"DeltaGroup.route() cannot route {self.host_name!r}: its output of shape {tuple(output.shape)} is "
                f"unbatched, and routing needs the batch on dim 0 (channels on dim 1). Add a batch dimension."
            )
        return output + bias.view(*bias.shape, *([1] * trailing))


class BitFitSite(DeltaSite):
    """The delta bias of one host: ``out + b`` (mergeable into the host's bias)."""

    composition = Composition.ADDS_INPUT_FUNCTION
    router = BitFitRouter

    def __init__(self, shape: tuple[int, ...], channels_first: int | None = None, **factory: Any) -> None:
        """``channels_first``: ``None`` adds ``b`` along the last dimension(s); ``k`` > 0: the output is
        ``(..., C, *k spatial dims)`` and ``b`` (C) goes on the channels (a ConvNd: its spatial dimensions, so an
        unbatched input works too); ``0``: the output is ``(N, C, ...)`` with any number of trailing dimensions
        (GroupNorm)."""
        super().__init__()
        self.channels_first = channels_first
        self.bias = nn.Parameter(torch.zeros(shape, **factory))

    def trailing_dims(self, output: torch.Tensor) -> int:
        """How many dimensions follow the channels in ``output`` (channels-first hosts)."""
        return self.channels_first if self.channels_first else output.dim() - 2  # type: ignore[return-value]

    def forward_hook(self, host: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: torch.Tensor) -> torch.Tensor:
        if self.channels_first is None:
            return output + self.bias
        return output + self.bias.view(-1, *([1] * self.trailing_dims(output)))

    def merge_deltas(self, host: nn.Module) -> dict[str, torch.Tensor]:
        if getattr(host, "bias", None) is None:
            raise DeltaStateError(
                f"Cannot merge BitFit into a {type(host).__name__} without a bias: there is no host bias to fold the "
                f"delta bias into. Keep this delta unmerged (attached)."
            )
        return {"bias": self.bias.detach()}


class BitFitModel(DeltaBase):
    """BitFit: a trainable bias added after each modified module (per channel on convolutions and GroupNorm).

    Default positions: every attention and feed-forward projection and every layer norm of the transformer layers
    (roles ``attn.q/k/v/o``, ``ff.w1/gate/w2``, ``attn.norm``, ``ff.norm``).
    """

    delta_type: ClassVar[str] = "bitfit"
    config_class = BitFitConfig
    default_modified_modules: ClassVar[tuple[str, ...]] = (
        "attn.q", "attn.k", "attn.v", "attn.o", "ff.w1", "ff.gate", "ff.w2", "attn.norm", "ff.norm",
    )

    def build_site(self, name: str, host: nn.Module) -> DeltaSite:
        channels = channels_first_width(host)
        if channels is not None:
            geometry = conv_geometry(host)
            return BitFitSite((channels,), geometry.dims if geometry is not None else 0, **factory_kwargs(host))
        dims = linear_dims(host)
        shape = (dims[1],) if dims is not None else norm_shape(host)
        if shape is None:
            raise UnsupportedModuleError(
                f"BitFit cannot modify {name!r} of type {type(host).__name__}: it supports nn.Linear, transformers "
                f"Conv1D, LayerNorm and RMSNorm-like modules, nn.Conv1d/2d/3d and nn.GroupNorm. Point "
                f"modified_modules at those."
            )
        return BitFitSite(shape, **factory_kwargs(host))
