"""The gates of a structure search: probabilities under a parameter budget, binary-concrete samples, and the
wrapper that scales one candidate delta's contribution by its gate.

S3Delta (Hu et al., NeurIPS 2022, "Sparse Structure Search for Delta Tuning"): candidate ``i`` (a delta of some
type at some position, ``n_i`` parameters) has a logit ``alpha_i`` and the probability

    p_i = sigmoid((alpha_i - b) / beta),   b such that  sum_i p_i n_i = budget,

so the *expected* size of the structure is the budget at every step, whatever the logits. Training draws relaxed
binary gates ``z_i = sigmoid((logit(p_i) + log u - log(1 - u)) / tau)`` (``u`` uniform, the binary concrete of
Maddison et al. 2017) and runs the model with every candidate's contribution scaled by its gate.

The gate wraps a candidate's site from outside (:class:`GatedSite`): the method's own hook computes the host
output *with* the delta, and the gated output is ``lerp(out, with_delta, z)``. ``torch.lerp`` returns its end
point exactly when ``z == 1`` and its start exactly when ``z == 0``, so a model with every gate fixed at 1 computes
bit for bit what the ungated deltas compute, and the methods' code is untouched.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn

from ..base import DeltaBase
from ..config import DeltaConfig
from ..errors import DeltaConfigError, DeltaError, UnsupportedModuleError
from ..site import Composition, DeltaSite, SharedParameters

#: Bisection stops once the expected size is this close to the budget (in parameters), or after MAX_BISECTION
#: halvings of the interval (float64 runs out of distinct midpoints long before).
BISECTION_TOLERANCE = 1e-9
MAX_BISECTION = 200


def expected_size(alpha: torch.Tensor, sizes: torch.Tensor, shift: float, beta: float) -> float:
    """``sum_i sigmoid((alpha_i - shift) / beta) * n_i`` in float64."""
    probs = torch.sigmoid((alpha.detach().double() - shift) / beta)
    return float((probs * sizes.double()).sum())


def solve_shift(alpha: torch.Tensor, sizes: torch.Tensor, budget: float, beta: float) -> float:
    """The shift ``b`` with ``sum_i sigmoid((alpha_i - b) / beta) n_i == budget``, found by bisection.

    The expected size falls strictly and continuously as ``b`` grows, from the total size (``b -> -inf``) to 0, so
    for ``0 < budget < sum_i n_i`` there is exactly one root. Computed in float64 without gradients: the shift is a
    normalisation, the logits learn only relative to each other.

    Args:
        alpha: The logits, one per candidate.
        sizes: Parameters of each candidate (positive).
        budget: The expected size wanted, strictly between 0 and the total size.
        beta: The temperature of the probabilities (positive).

    Raises:
        DeltaConfigError: The budget lies outside ``(0, total size)`` or ``beta`` is not positive.
    """
    total = float(sizes.double().sum())
    if not 0 < budget < total:
        raise DeltaConfigError(f"The budget {budget:,} must lie strictly between 0 and the candidates' total size "
                               f"{total:,.0f} for the gate shift to exist.")
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise DeltaConfigError(f"beta must be a positive finite number, got {beta!r}.")
    values = alpha.detach().double()
    # sigmoid(+-40) is 1 or 0 to float64 precision: the expected size is the total below lo and 0 above hi.
    lo = float(values.min()) - 40 * beta
    hi = float(values.max()) + 40 * beta
    for _ in range(MAX_BISECTION):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        size = expected_size(values, sizes, mid, beta)
        if abs(size - budget) <= BISECTION_TOLERANCE:
            return mid
        if size > budget:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def concrete_sample(logits: torch.Tensor, tau: float, generator: torch.Generator) -> torch.Tensor:
    """Relaxed binary gates ``sigmoid((logits + log u - log(1 - u)) / tau)`` (differentiable in ``logits``)."""
    u = torch.rand(logits.shape, generator=generator, dtype=torch.float64).clamp_(1e-6, 1 - 1e-6)
    noise = (torch.log(u) - torch.log1p(-u)).to(logits.dtype)
    return torch.sigmoid((logits + noise) / tau)


def same_layout_copy(output: torch.Tensor) -> torch.Tensor:
    """A copy of ``output`` laid out like it: a plain reshaping view of a fresh 2-D result (what a Linear returns
    for 3-D input) stays such a view of a copied base. Methods may pick their kernels by layout (LoRA updates that
    base in place), so the gated hook then runs the very operations the ungated one runs."""
    base = output._base if output._is_view() else None
    if (
        base is not None
        and output.is_contiguous()
        and base.is_contiguous()
        and base.numel() == output.numel()
        and output.storage_offset() == base.storage_offset()
    ):
        return base.clone().view(output.shape)
    return output.clone()


class GateBank:
    """The current gate value of every candidate, read by the :class:`GatedSite` wrappers during a forward.

    A plain object (not a module): the values are set by the search before each forward and carry the gradient
    to the logits; they are not parameters of any host.
    """

    def __init__(self, count: int) -> None:
        self.values: torch.Tensor = torch.ones(count)

    def set(self, values: torch.Tensor) -> None:
        """Use ``values`` (one per candidate) in the next forwards."""
        if values.shape != self.values.shape:
            raise DeltaError(f"Gate values must have shape {tuple(self.values.shape)}, got {tuple(values.shape)}.")
        self.values = values


class GatedSite(DeltaSite):
    """One candidate's site wrapped by its gate: ``lerp(out, inner(out), z)`` (the inner site is a child)."""

    composition = Composition.TRANSFORMS_OUTPUT

    def __init__(self, inner: DeltaSite, index: int, bank: GateBank) -> None:
        super().__init__()
        self.inner = inner
        self.index = index
        self.bank = bank

    def forward_hook(self, host: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        if not isinstance(output, torch.Tensor):
            raise DeltaError(f"A gated candidate needs a host returning one tensor, got {type(output).__name__}.")
        # The inner hook may update its argument in place (deltakit/site.py): give it a copy, keep the original.
        changed = self.inner.forward_hook(host, args, kwargs, same_layout_copy(output))
        gate = self.bank.values[self.index].to(device=output.device, dtype=output.dtype)
        return torch.lerp(output, changed, gate)


def shared_parameter_count(delta: DeltaBase) -> int:
    """Scalars in the parameters ``delta`` shares between its sites (0 without any, or when the shared module holds
    only buffers, like VeRA's frozen projections)."""
    return 0 if delta.shared is None else sum(p.numel() for p in delta.shared.parameters())


def check_gateable(delta: DeltaBase) -> None:
    """Refuse a candidate method whose sites cannot be scaled by a gate (before anything is attached)."""
    where = f"{type(delta).__name__} (delta type {delta.delta_type!r})"
    # Shared *trainable* parameters (Compacter's rules) belong to no one site: a site's size would not be its own,
    # and closing its gate would not take its share out of the structure. Shared frozen state (VeRA's random
    # projections, buffers regenerated from a seed) is neither trained nor counted: a gate on one site scales that
    # site's update, computed from the site's own vectors, and nothing else.
    if shared_parameter_count(delta) > 0:
        raise UnsupportedModuleError(
            f"{where} shares trainable parameters between its sites (like Compacter's rules), so one site's size and "
            f"gate are not its own; use a method with per-site parameters as a search candidate (frozen shared "
            f"state, like VeRA's projections, is fine)."
        )
    for site in delta.sites:
        cls = type(site.module)
        if cls.composition is Composition.REWRITES_CALL or cls.forward_hook is None:
            raise UnsupportedModuleError(
                f"{where} rewrites its host's call at {site.name!r} (a prefix or prompt): a gate scales a site's "
                f"output, so such methods cannot be search candidates."
            )
        if cls.input_source is not None or site.module.hook_module is not None:
            raise UnsupportedModuleError(
                f"{where} reads another module's input or acts on another module at {site.name!r} (a parallel "
                f"adapter): a gate wraps one host's output only; use a per-host method as a search candidate."
            )


class GatedDelta(DeltaBase, register_type=False):
    """The gated version of one (detached, never attached) inner delta: one :class:`GatedSite` per inner site.

    Built by :class:`~deltakit.search.StructureSearch`; not a method of its own (not registered, never saved).
    """

    delta_type: ClassVar[str] = "structure_gate"

    def __init__(self, inner: DeltaBase, first_index: int, bank: GateBank, name: str) -> None:
        """Wrap ``inner``'s sites (gate ``first_index + k`` for its site ``k``) and attach the wrappers.

        Args:
            inner: A detached delta (built with :meth:`DeltaBase.build_detached`, never attached); its site modules
                become children of the gated sites.
            first_index: The gate of ``inner``'s first site in ``bank``.
            bank: Where the gate values are read.
            name: The child-module name of the gated sites (unique among the search's gated deltas).
        """
        check_gateable(inner)
        self.inner = inner
        self._wrap = {site.name: GatedSite(site.module, first_index + k, bank) for k, site in enumerate(inner.sites)}
        super().__init__(inner.backbone_model, DeltaConfig(modified_modules=list(self._wrap)), name=name)

    def match_sites(self) -> list[tuple[str, nn.Module]]:
        """The inner delta's hosts (already resolved and checked when it was built)."""
        return [(site.name, site.host) for site in self.inner.sites]

    def build_shared(self, matches: list[tuple[str, nn.Module]]) -> SharedParameters | None:
        """The inner delta's frozen shared state (VeRA's projections), registered on the backbone root while the
        search is attached, so that ``model.to(...)`` / ``.half()`` move it with the sites that read it."""
        return self.inner.shared

    def build_site(self, name: str, host: nn.Module) -> DeltaSite:
        return self._wrap[name]
