"""Low-rank adapter: Mahabadi et al. 2021, "Compacter: Efficient Low-Rank Hypercomplex Adapter Layers"
(arXiv:2106.04647), the "Low-rank adapter" baseline.

An adapter ``h <- h + up(act(down(h)))`` whose down and up weights are rank-``low_rank_rank`` products
``W = W_left @ W_right``; the bottleneck is ``hidden // reduction_factor``. Hooks the output of each modified
module (default ``attn.o`` and ``ff.w2``). The up projection's right factor and bias start at zero: identity at init.
Computed as ``(x @ W_left) @ W_right`` so the full matrix is never formed, for any rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..base import DeltaBase
from ..config import DeltaConfig, check_bounded_by, check_choice, check_positive_int
from ..errors import UnsupportedModuleError
from ..site import Composition, DeltaSite, factory_kwargs
from .common import ACTIVATIONS, BottleneckRouter, check_activation, check_width, glorot_, map_hidden, output_dim


@dataclass
class LowRankAdapterConfig(DeltaConfig):
    """Low-rank adapter settings.

    Args:
        reduction_factor: Bottleneck width is ``hidden // reduction_factor``.
        non_linearity: Activation between the projections (default ``"gelu_new"``).
        low_rank_w_init: ``"glorot-uniform"`` or ``"glorot-normal"``.
        low_rank_rank: Rank of each projection's factorisation (any positive integer).
    """

    delta_type: ClassVar[str] = "low_rank_adapter"

    reduction_factor: int = 32
    non_linearity: str = "gelu_new"
    low_rank_w_init: str = "glorot-uniform"
    low_rank_rank: int = 1

    def validate(self) -> None:
        check_positive_int(self, "reduction_factor")
        check_positive_int(self, "low_rank_rank")
        check_activation(self.non_linearity, "LowRankAdapterConfig")
        check_choice(self, "low_rank_w_init", ("glorot-uniform", "glorot-normal"))


class LowRankLinear(nn.Module):
    """``y = (x @ W_left) @ W_right + b`` with ``W_left`` (in x rank) and ``W_right`` (rank x out)."""

    def __init__(self, in_features: int, out_features: int, rank: int, w_init: str, zero: bool, **factory: Any) -> None:
        super().__init__()
        self.W_left = nn.Parameter(torch.empty(in_features, rank, **factory))
        self.W_right = nn.Parameter(torch.empty(rank, out_features, **factory))
        self.b = nn.Parameter(torch.zeros(out_features, **factory))
        glorot_(self.W_left, w_init)
        if zero:
            nn.init.zeros_(self.W_right)
        else:
            glorot_(self.W_right, w_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.b, (x.reshape(-1, x.shape[-1]) @ self.W_left), self.W_right).view(
            *x.shape[:-1], self.W_right.shape[1]
        )


class LowRankAdapterSite(DeltaSite):
    """A low-rank bottleneck adapter on one host (reads and transforms its output)."""

    composition = Composition.TRANSFORMS_OUTPUT
    router = BottleneckRouter

    def __init__(self, dim: int, bottleneck: int, cfg: LowRankAdapterConfig, **factory: Any) -> None:
        super().__init__()
        self.non_linearity = cfg.non_linearity
        rank, init = cfg.low_rank_rank, cfg.low_rank_w_init
        self.down_sampler = LowRankLinear(dim, bottleneck, rank, init, zero=False, **factory)
        self.up_sampler = LowRankLinear(bottleneck, dim, rank, init, zero=True, **factory)

    def adapt(self, hidden: torch.Tensor) -> torch.Tensor:
        check_width(hidden, self.up_sampler.b.shape[0], self.__dict__.get("where", "?"), "LowRankAdapter")
        return hidden + self.up_sampler(ACTIVATIONS[self.non_linearity](self.down_sampler(hidden)))

    def forward_hook(self, host: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        return map_hidden(output, self.adapt)

    def routing_key(self) -> tuple[str]:
        """Sites routed together share the activation."""
        return (self.non_linearity,)

    def bottleneck_factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Dense ``(W_down (in x b), b_down, W_up (b x out), b_up)`` for :class:`BottleneckRouter`."""
        down, up = self.down_sampler, self.up_sampler
        return down.W_left @ down.W_right, down.b, up.W_left @ up.W_right, up.b


class LowRankAdapterModel(DeltaBase):
    """Adapters with low-rank down/up projections on the output of each modified module (default
    ``["attn.o", "ff.w2"]``)."""

    delta_type: ClassVar[str] = "low_rank_adapter"
    config_class = LowRankAdapterConfig
    default_modified_modules: ClassVar[tuple[str, ...]] = ("attn.o", "ff.w2")


    def build_site(self, name: str, host: nn.Module) -> DeltaSite:
        cfg: LowRankAdapterConfig = self.config  # type: ignore[assignment]
        dim = output_dim(name, host, self.backbone_model, "LowRankAdapter")
        bottleneck = dim // cfg.reduction_factor
        if bottleneck < 1:
            raise UnsupportedModuleError(
                f"LowRankAdapter on {name!r}: hidden size {dim} // reduction_factor {cfg.reduction_factor} is 0; "
                f"use a smaller reduction_factor."
            )
        check_bounded_by(
            cfg, "low_rank_rank", cfg.low_rank_rank, dim, name, f"output width {dim}, bottleneck {bottleneck}",
            "the output width (the wider side of each factorised projection)",
        )
        site = LowRankAdapterSite(dim, bottleneck, cfg, **factory_kwargs(host))
        site.where = name  # a plain attribute, for error messages
        return site
