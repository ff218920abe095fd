"""Compacter: Mahabadi et al. 2021, "Compacter: Efficient Low-Rank Hypercomplex Adapter Layers"
(arXiv:2106.04647).

An adapter ``h <- h + up(act(down(h)))`` whose projections are parameterized hypercomplex multiplication (PHM)
layers: ``W = sum_i A_i (x) B_i`` (Kronecker products, ``i = 1..n``, ``n = hypercomplex_division``). ``B_i`` is a
rank-``phm_rank`` product ``s_i t_i`` when ``factorized_phm``; the "slow" rules ``A_i`` are shared by every PHM layer
of the model when ``shared_phm_rule`` (the paper's Compacter; stored and saved once). Hooks the output of each
modified module: default ``attn.o`` and ``ff.w2``; Compacter++ is ``modified_modules=["ff.w2"]`` (after the FFN only).
The up projection's ``t_i`` (or ``B_i``) and bias start at zero: identity at init.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..base import DeltaBase
from ..config import DeltaConfig, check_bool, check_bounded_by, check_choice, check_finite_number, check_positive_int
from ..errors import UnsupportedModuleError
from ..site import Composition, DeltaSite, SharedParameters, factory_kwargs
from .common import ACTIVATIONS, BottleneckRouter, check_activation, check_width, map_hidden, output_dim


@dataclass
class CompacterConfig(DeltaConfig):
    """Compacter settings (names as in OpenDelta).

    Args:
        reduction_factor: Bottleneck width is ``hidden // reduction_factor``.
        non_linearity: Activation (default ``"gelu_new"``).
        hypercomplex_division: ``n``, the number of Kronecker summands; must divide the hidden size and the
            bottleneck.
        phm_rank: Rank of each ``B_i = s_i t_i`` when ``factorized_phm``.
        factorized_phm: Low-rank ``B_i`` (Compacter) instead of full ``B_i`` (PHM adapter).
        shared_phm_rule: One set of rules ``A_i`` for every PHM layer of the model (saved once).
        factorized_phm_rule: Rank-1 rules ``A_i = left_i right_i``.
        phm_init_range: Standard deviation of the rules' normal init.
        phm_c_init: ``"normal"`` or ``"uniform"`` init of the rules.
        use_bias_up_sampler: Bias on the up projection.
        use_bias_down_sampler: Bias on the down projection.
    """

    delta_type: ClassVar[str] = "compacter"

    reduction_factor: int = 16
    non_linearity: str = "gelu_new"
    hypercomplex_division: int = 4
    phm_rank: int = 1
    factorized_phm: bool = True
    shared_phm_rule: bool = True
    factorized_phm_rule: bool = False
    phm_init_range: float = 1e-4
    phm_c_init: str = "normal"
    use_bias_up_sampler: bool = True
    use_bias_down_sampler: bool = True

    def validate(self) -> None:
        for name in ("reduction_factor", "hypercomplex_division", "phm_rank"):
            check_positive_int(self, name)
        check_activation(self.non_linearity, "CompacterConfig")
        check_choice(self, "phm_c_init", ("normal", "uniform"))
        # a standard deviation: beyond 1 the rules' products explode (the paper uses 1e-4 .. 1e-2)
        check_finite_number(self, "phm_init_range", positive=True, high=1.0)
        for name in ("factorized_phm", "shared_phm_rule", "factorized_phm_rule", "use_bias_up_sampler",
                     "use_bias_down_sampler"):
            check_bool(self, name)


class PHMRule(nn.Module):
    """The ``n`` rule matrices ``A_i`` (n x n), full or factorized as ``left_i @ right_i`` (rank 1)."""

    def __init__(self, n: int, factorized: bool, c_init: str, init_range: float, **factory: Any) -> None:
        super().__init__()
        self.factorized = factorized
        shapes = [(n, n, 1), (n, 1, n)] if factorized else [(n, n, n)]
        params = [nn.Parameter(torch.empty(shape, **factory)) for shape in shapes]
        for p in params:
            if c_init == "normal":
                nn.init.normal_(p, std=init_range)
            else:
                nn.init.uniform_(p, -1.0, 1.0)
        if factorized:
            self.phm_rule_left, self.phm_rule_right = params
        else:
            self.phm_rule = params[0]

    def forward(self) -> torch.Tensor:
        if self.factorized:
            return self.phm_rule_left @ self.phm_rule_right
        return self.phm_rule


class PHMLinear(nn.Module):
    """``y = x @ (sum_i A_i (x) B_i) + b``: a PHM layer mapping ``in_features`` to ``out_features``."""

    def __init__(
        self, in_features: int, out_features: int, cfg: CompacterConfig, shared_rule: PHMRule | None, zero: bool,
        bias: bool, **factory: Any,
    ) -> None:
        super().__init__()
        n, rank = cfg.hypercomplex_division, cfg.phm_rank
        self.n, self.in_features, self.out_features = n, in_features, out_features
        p, q = in_features // n, out_features // n
        self.factorized = cfg.factorized_phm
        if self.factorized:
            self.W_left = nn.Parameter(torch.empty(n, p, rank, **factory))
            self.W_right = nn.Parameter(torch.empty(n, rank, q, **factory))
            nn.init.xavier_normal_(self.W_left)
            nn.init.zeros_(self.W_right) if zero else nn.init.xavier_normal_(self.W_right)
        else:
            self.W = nn.Parameter(torch.empty(n, p, q, **factory))
            nn.init.zeros_(self.W) if zero else nn.init.xavier_normal_(self.W)
        self.b = nn.Parameter(torch.zeros(out_features, **factory)) if bias else None
        if shared_rule is None:
            self.rule = PHMRule(n, cfg.factorized_phm_rule, cfg.phm_c_init, cfg.phm_init_range, **factory)
            self._shared_rule: tuple[PHMRule, ...] = ()
        else:
            self._shared_rule = (shared_rule,)  # referenced, not registered: stored once, on the backbone root

    def weight(self) -> torch.Tensor:
        rule = self._shared_rule[0]() if self._shared_rule else self.rule()
        blocks = self.W_left @ self.W_right if self.factorized else self.W
        # kron(A_i, B_i)[a*p + c, b*q + d] = A_i[a, b] * B_i[c, d], summed over i.
        return torch.einsum("iab,icd->acbd", rule, blocks).reshape(self.in_features, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        out = torch.addmm(self.b, flat, self.weight()) if self.b is not None else flat @ self.weight()
        return out.view(*x.shape[:-1], self.out_features)


class CompacterShared(SharedParameters):
    """The PHM rules shared by every Compacter layer of one delta."""

    def __init__(self, rule: PHMRule) -> None:
        super().__init__()
        self.rule = rule


class CompacterSite(DeltaSite):
    """A Compacter adapter (two PHM layers) on one host (reads and transforms its output)."""

    composition = Composition.TRANSFORMS_OUTPUT
    router = BottleneckRouter

    def __init__(self, dim: int, bottleneck: int, cfg: CompacterConfig, shared: PHMRule | None, **factory: Any) -> None:
        super().__init__()
        self.non_linearity = cfg.non_linearity
        self.down_sampler = PHMLinear(dim, bottleneck, cfg, shared, zero=False, bias=cfg.use_bias_down_sampler, **factory)
        self.up_sampler = PHMLinear(bottleneck, dim, cfg, shared, zero=True, bias=cfg.use_bias_up_sampler, **factory)

    def adapt(self, hidden: torch.Tensor) -> torch.Tensor:
        check_width(hidden, self.up_sampler.out_features, self.__dict__.get("where", "?"), "Compacter")
        return hidden + self.up_sampler(ACTIVATIONS[self.non_linearity](self.down_sampler(hidden)))

    def forward_hook(self, host: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        return map_hidden(output, self.adapt)

    def routing_key(self) -> tuple[str]:
        """Sites routed together share the activation."""
        return (self.non_linearity,)

    def bottleneck_factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Dense ``(W_down (in x b), b_down, W_up (b x out), b_up)`` (the PHM weights formed) for
        :class:`BottleneckRouter`."""
        down, up = self.down_sampler, self.up_sampler
        w_down, w_up = down.weight(), up.weight()
        b_down = down.b if down.b is not None else w_down.new_zeros(w_down.shape[1])
        b_up = up.b if up.b is not None else w_up.new_zeros(w_up.shape[1])
        return w_down, b_down, w_up, b_up


class CompacterModel(DeltaBase):
    """Compacter adapters (Mahabadi et al. 2021); see the module docstring. Default positions
    ``["attn.o", "ff.w2"]``; ``modified_modules=["ff.w2"]`` is Compacter++."""

    delta_type: ClassVar[str] = "compacter"
    config_class = CompacterConfig
    default_modified_modules: ClassVar[tuple[str, ...]] = ("attn.o", "ff.w2")


    def plan(self, matches: list[tuple[str, nn.Module]]) -> None:
        for name, host in matches:  # every site's sizes are checked before the shared rules are allocated
            self._site_sizes(name, host)

    def build_shared(self, matches: list[tuple[str, nn.Module]]) -> SharedParameters | None:
        cfg: CompacterConfig = self.config  # type: ignore[assignment]
        if not cfg.shared_phm_rule or not matches:
            return None
        factory = factory_kwargs(matches[0][1])
        rule = PHMRule(cfg.hypercomplex_division, cfg.factorized_phm_rule, cfg.phm_c_init, cfg.phm_init_range, **factory)
        return CompacterShared(rule)

    def _site_sizes(self, name: str, host: nn.Module) -> tuple[int, int]:
        """``(width, bottleneck)`` of the site on ``host``, checked against the config (nothing is allocated)."""
        cfg: CompacterConfig = self.config  # type: ignore[assignment]
        n = cfg.hypercomplex_division
        dim = output_dim(name, host, self.backbone_model, "Compacter")
        bottleneck = dim // cfg.reduction_factor
        if dim % n or bottleneck < 1 or bottleneck % n:
            raise UnsupportedModuleError(
                f"Compacter on {name!r}: hidden size {dim} and bottleneck {bottleneck} (= {dim} // reduction_factor "
                f"{cfg.reduction_factor}) must both be positive multiples of hypercomplex_division {n}. Choose "
                f"another hypercomplex_division or reduction_factor."
            )
        # B_i = s_i t_i with s_i (p x rank), t_i (rank x q): a rank above min(p, q) adds nothing; one up to the
        # wider side is accepted, beyond it only memory would grow.
        check_bounded_by(
            cfg, "phm_rank", cfg.phm_rank, dim // n, name, f"output width {dim}, bottleneck {bottleneck}",
            "output width // hypercomplex_division (the wider side of each Kronecker factor)",
        )
        return dim, bottleneck

    def build_site(self, name: str, host: nn.Module) -> DeltaSite:
        cfg: CompacterConfig = self.config  # type: ignore[assignment]
        dim, bottleneck = self._site_sizes(name, host)
        shared = self.shared.rule if self.shared is not None else None  # type: ignore[union-attr]
        site = CompacterSite(dim, bottleneck, cfg, shared, **factory_kwargs(host))
        site.where = name  # a plain attribute, for error messages
        return site
