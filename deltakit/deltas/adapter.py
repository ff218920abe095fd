"""Adapter: Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP" (arXiv:1902.00751).

``h <- h + up(act(down(h)))`` with a bottleneck of ``bottleneck_dim``, applied to the *output* of each modified
module (default: the attention output projection and the FFN output projection of every layer, roles ``attn.o``
and ``ff.w2``). ``up`` starts at zero, so a fresh adapter is the identity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..base import DeltaBase
from ..config import DeltaConfig, check_bounded_by, check_positive_int
from ..site import Composition, DeltaSite, factory_kwargs
from .common import ACTIVATIONS, BottleneckRouter, check_activation, check_width, map_hidden, output_dim


@dataclass
class AdapterConfig(DeltaConfig):
    """Adapter settings.

    Args:
        bottleneck_dim: Width of the bottleneck.
        non_linearity: ``"gelu_new"`` (default), ``"gelu"``, ``"relu"``, ``"silu"``, ``"tanh"``, ...
    """

    delta_type: ClassVar[str] = "adapter"

    bottleneck_dim: int = 24
    non_linearity: str = "gelu_new"

    def validate(self) -> None:
        check_positive_int(self, "bottleneck_dim")  # and <= the host's width, checked per host at plan time
        check_activation(self.non_linearity, "AdapterConfig")


class AdapterSite(DeltaSite):
    """A bottleneck MLP added residually to its host's output: ``h + up(act(down(h)))`` reads the output."""

    composition = Composition.TRANSFORMS_OUTPUT
    router = BottleneckRouter

    def __init__(self, dim: int, bottleneck: int, non_linearity: str, **factory: Any) -> None:
        super().__init__()
        self.non_linearity = non_linearity
        self.down = nn.Linear(dim, bottleneck, **factory)
        self.up = nn.Linear(bottleneck, dim, **factory)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def adapt(self, hidden: torch.Tensor) -> torch.Tensor:
        check_width(hidden, self.up.out_features, self.__dict__.get("where", "?"), "Adapter")
        return hidden + self.up(ACTIVATIONS[self.non_linearity](self.down(hidden)))

    def forward_hook(self, host: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        return map_hidden(output, self.adapt)

    def routing_key(self) -> tuple[str]:
        """Sites routed together share the activation."""
        return (self.non_linearity,)

    def bottleneck_factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(W_down (in x b), b_down, W_up (b x out), b_up)`` for :class:`BottleneckRouter`."""
        return self.down.weight.t(), self.down.bias, self.up.weight.t(), self.up.bias


class AdapterModel(DeltaBase):
    """Sequential bottleneck adapters (Houlsby et al. 2019) on the output of each modified module (default
    ``["attn.o", "ff.w2"]``)."""

    delta_type: ClassVar[str] = "adapter"
    config_class = AdapterConfig
    default_modified_modules: ClassVar[tuple[str, ...]] = ("attn.o", "ff.w2")


    def build_site(self, name: str, host: nn.Module) -> DeltaSite:
        cfg: AdapterConfig = self.config  # type: ignore[assignment]
        dim = output_dim(name, host, self.backbone_model, "Adapter")
        width = f"output width {dim}"
        check_bounded_by(cfg, "bottleneck_dim", cfg.bottleneck_dim, dim, name, width, "its output width")
        site = AdapterSite(dim, cfg.bottleneck_dim, cfg.non_linearity, **factory_kwargs(host))
        site.where = name  # a plain attribute, for error messages
        return site
