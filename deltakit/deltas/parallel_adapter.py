"""Parallel adapter: He et al. 2022, "Towards a Unified View of Parameter-Efficient Transfer Learning"
(arXiv:2110.04366).

``h_out <- h_out + scaled * up(act(down(x_in)))``: the adapter reads the *input* ``x_in`` of one module (captured
by a forward pre-hook) and adds to the *output* of the same or a later module (a forward hook). Default: across
each feed-forward block, from the input of ``ff.w1`` to the output of ``ff.w2``. ``up`` starts at zero: identity at
init.
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..addressing import find_modules
from ..base import DeltaBase
from ..config import MAX_SCALE, DeltaConfig, check_bounded_by, check_finite_number, check_positive_int, check_str_list
from ..errors import DeltaError, ModuleMatchError
from ..site import Composition, DeltaSite, factory_kwargs
from .common import (
    ACTIVATIONS, BottleneckRouter, check_activation, check_width, first_input, input_dim, map_hidden, output_dim,
)


@dataclass
class ParallelAdapterConfig(DeltaConfig):
    """Parallel adapter settings.

    Args:
        bottleneck_dim: Width of the bottleneck.
        non_linearity: Activation (default ``"gelu_new"``).
        scaled: Factor on the adapter's value.
        input_modules: Where each adapter reads its input. ``None`` with explicit ``modified_modules``: the input of
            the same module; with default positions: ``["ff.w1"]`` (spanning the FFN block). Each modified module is
            paired with the input module sharing the longest dotted name prefix (its own layer).
    """

    delta_type: ClassVar[str] = "parallel_adapter"

    bottleneck_dim: int = 24
    non_linearity: str = "gelu_new"
    scaled: float = 1.0
    input_modules: list[str] | None = None

    def validate(self) -> None:
        check_positive_int(self, "bottleneck_dim")
        check_activation(self.non_linearity, "ParallelAdapterConfig")
        check_finite_number(
            self, "scaled", low=-MAX_SCALE, high=MAX_SCALE, nonzero=True,
            hint="It multiplies the adapter's value (He et al. use 1 to 4); 0 would switch the adapter off.",
        )
        self.input_modules = check_str_list(self, "input_modules")


class ParallelAdapterRouter(BottleneckRouter):
    """Per-row parallel adapters: reads the input captured on the sites' common source module."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.source = self.sites[0].input_source  # type: ignore[attr-defined]  # shared: part of routing_key()

    def apply(self, stack: dict[str, torch.Tensor], slots: torch.Tensor, args: tuple[Any, ...],
              kwargs: dict[str, Any], output: Any) -> Any:
        update = self.update(stack, slots, self.take_captured())  # captured by this thread's block
        return map_hidden(output, lambda h: h + update.to(h.dtype))


class ParallelAdapterSite(DeltaSite):
    """Captures ``input_source``'s input, adds the adapted value to the host's output (never reads the output)."""

    composition = Composition.ADDS_INPUT_FUNCTION
    router = ParallelAdapterRouter

    def __init__(self, in_dim: int, out_dim: int, cfg: ParallelAdapterConfig, source: nn.Module, **factory: Any) -> None:
        super().__init__()
        self.non_linearity = cfg.non_linearity
        self.scaled = float(cfg.scaled)
        self.down = nn.Linear(in_dim, cfg.bottleneck_dim, **factory)
        self.up = nn.Linear(cfg.bottleneck_dim, out_dim, **factory)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        # A plain attribute holder, so the source module is not registered as a child of this delta module.
        self._source = (source,)
        # The captured input per thread (thread id -> tensor): forwards running in several threads at once each
        # read their own input. A dict, not a threading.local, so the module can still be deep-copied.
        self._captured: dict[int, torch.Tensor] = {}

    @property
    def input_source(self) -> nn.Module:
        return self._source[0]

    def capture_input(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
        self._captured[threading.get_ident()] = first_input(args, kwargs)
        return args, kwargs

    def forward_hook(self, host: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        x = self._captured.pop(threading.get_ident(), None)
        if x is None:
            raise DeltaError(
                "ParallelAdapter: the output module ran before its input module in this forward pass; "
                "input_modules must name a module that runs before (or is) the modified module."
            )
        where = self.__dict__.get("where", "?")
        check_width(x, self.down.in_features, f"{where} (input)", "ParallelAdapter")
        update = self.up(ACTIVATIONS[self.non_linearity](self.down(x)))

        def add(h: torch.Tensor) -> torch.Tensor:
            check_width(h, self.up.out_features, where, "ParallelAdapter")
            return h + self.scaled * update

        return map_hidden(output, add)

    def routing_key(self) -> tuple[Any, ...]:
        """Sites routed together share the activation and the source module."""
        return (self.non_linearity, self.input_source)

    def bottleneck_factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(W_down (in x b), b_down, scaled * W_up (b x out), scaled * b_up)`` for :class:`ParallelAdapterRouter`."""
        return self.down.weight.t(), self.down.bias, self.up.weight.t() * self.scaled, self.up.bias * self.scaled


class ParallelAdapterModel(DeltaBase):
    """Parallel adapters (He et al. 2022); modified modules (default ``["ff.w2"]``) receive the adapter's value."""

    delta_type: ClassVar[str] = "parallel_adapter"
    config_class = ParallelAdapterConfig
    default_modified_modules: ClassVar[tuple[str, ...]] = ("ff.w2",)
    default_input_modules: ClassVar[tuple[str, ...]] = ("ff.w1",)


    def plan(self, matches: list[tuple[str, nn.Module]]) -> None:
        """Resolve ``input_modules`` (the candidate sources; ``None``: each site reads its own host's input)."""
        cfg: ParallelAdapterConfig = self.config  # type: ignore[assignment]
        patterns = cfg.input_modules
        if patterns is None and cfg.modified_modules is None:
            patterns = list(self.default_input_modules)
        self._inputs: list[tuple[str, nn.Module]] | None = None
        if cfg.input_modules is None and cfg.modified_modules is not None:
            self._warn_if_opendelta_pairs(cfg.modified_modules, [name for name, _ in matches])
        if patterns is not None:
            self._inputs = find_modules(
                self.backbone_model, patterns, what="input_modules", skip_types=(DeltaSite,),
                allow_unmatched_roles=cfg.input_modules is None,
            )

    def _warn_if_opendelta_pairs(self, patterns: list[str], names: list[str]) -> None:
        """Warn when ``modified_modules`` reads like OpenDelta's pairs (input module, output module) but no
        ``input_modules`` says so: OpenDelta made one adapter per pair, deltakit makes one per module, silently
        twice the adapters and none across the block. Signs: a pattern listed twice (OpenDelta's ``["attn",
        "attn"]``), or the first and second feed-forward linear of one layer both matched."""
        repeated = sorted({p for p in patterns if patterns.count(p) > 1})
        layers: dict[str, set[str]] = {}
        for role in ("ff.w1", "ff.w2"):
            try:
                found = find_modules(self.backbone_model, [role], what="role", allow_unmatched_roles=True)
            except ModuleMatchError:
                return  # an architecture without these roles: nothing to compare
            for name, _ in found:
                if name in names:
                    layers.setdefault(role, set()).add(name.rpartition(".")[0].rpartition(".")[0])
        spanning = sorted(layers.get("ff.w1", set()) & layers.get("ff.w2", set()))
        if not repeated and not spanning:
            return
        sign = f"lists {repeated} twice" if repeated else f"matches both FFN linears of {spanning[0]!r}"
        warnings.warn(
            f"ParallelAdapterModel: modified_modules={patterns} {sign}. OpenDelta read this list as pairs (one adapter "
            f"from the first module's input to the second's output); deltakit puts one adapter across EACH listed "
            f"module. For one adapter across the block pass modified_modules=['ff.w2'], input_modules=['ff.w1'] (or "
            f"your own names); pass input_modules explicitly to silence this warning.",
            UserWarning,
            stacklevel=4,
        )

    def _source_for(self, name: str, host: nn.Module) -> tuple[str, nn.Module]:
        candidates = self._inputs
        if candidates is None:
            return name, host

        def shared_prefix(other: str) -> int:
            a, b = name.split("."), other.split(".")
            n = 0
            while n < min(len(a), len(b)) and a[n] == b[n]:
                n += 1
            return n

        scored = sorted(((shared_prefix(n), n, m) for n, m in candidates), key=lambda t: -t[0])
        if len(scored) > 1 and scored[0][0] == scored[1][0]:
            raise ModuleMatchError(
                f"ParallelAdapter: the input module for {name!r} is ambiguous: {scored[0][1]!r} and {scored[1][1]!r} "
                f"are equally close. Make input_modules more specific."
            )
        return scored[0][1], scored[0][2]

    def build_site(self, name: str, host: nn.Module) -> DeltaSite:
        cfg: ParallelAdapterConfig = self.config  # type: ignore[assignment]
        source_name, source = self._source_for(name, host)
        in_dim = input_dim(source_name, source, self.backbone_model, "ParallelAdapter")
        out_dim = output_dim(name, host, self.backbone_model, "ParallelAdapter")
        check_bounded_by(
            cfg, "bottleneck_dim", cfg.bottleneck_dim, max(in_dim, out_dim), name,
            f"input width {in_dim} (of {source_name!r}), output width {out_dim}", "the wider of the two widths",
        )
        site = ParallelAdapterSite(in_dim, out_dim, cfg, source, **factory_kwargs(host))
        site.where = name  # a plain attribute, for error messages
        return site
