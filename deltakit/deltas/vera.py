"""VeRA: Kopiczko et al. 2024, "VeRA: Vector-based Random Matrix Adaptation" (arXiv:2310.11454).

``h = W x + b * (B (d * (A x)))``: one pair of frozen random projections ``A`` (``r x in_max``) and ``B``
(``out_max x r``) is shared by every site of the delta, each site using the top-left slices ``A[:, :in]`` and
``B[:out, :]`` that fit its host; only the vectors ``d`` (``r``, every entry ``d_initial`` at init) and ``b``
(``out``, zero at init, so a fresh delta is the identity) are trained, per site. Hooks the *output* of ``nn.Linear``
and transformers' ``Conv1D`` hosts; merging folds ``diag(b) B diag(d) A`` into the host weight.

``A`` and ``B`` are drawn Kaiming-uniform (fan-in) from a CPU ``torch.Generator`` seeded with
``projection_seed``, ``A`` first, in float32, then cast to the hosts' dtype and device: the same seed gives the same
bits in every process, and the same matrices as PEFT's ``projection_prng_key``. By default they are regenerated
when a checkpoint is loaded, so the checkpoint holds only the vectors (non-persistent buffers: not part of any
``state_dict``); ``save_projection=True`` stores them instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..base import DeltaBase
from ..config import (
    MAX_SCALE, DeltaConfig, check_bool, check_bounded_by, check_finite_number, check_int, check_positive_int,
    check_probability,
)
from ..errors import UnsupportedModuleError
from ..quantization import refuse_quantized_merge
from ..routing import SiteRouter
from ..site import Composition, DeltaSite, SharedParameters, factory_kwargs
from ..structures import is_conv1d, linear_dims
from .common import first_input
from .lora import add_low_rank, add_routed, stack_lora

__all__ = ["VeraConfig", "VeraModel", "VeraProjections", "VeraRouter", "VeraSite", "random_projections"]

#: Ranks up to this are accepted on any host, however narrow (PEFT's default rank).
RANK_FLOOR = 256
#: ``torch.Generator.manual_seed`` takes seeds in ``[0, 2**64)``; JSON and PEFT's configs hold them as integers.
MAX_SEED = 2**64 - 1


@dataclass
class VeraConfig(DeltaConfig):
    """VeRA settings.

    Args:
        vera_r: Rank of the shared random projections A (vera_r x in) and B (out x vera_r) (PEFT's ``r``).
        d_initial: Initial value of every entry of the vectors ``d`` (``b`` starts at zero).
        vera_dropout: Dropout probability on the input of the VeRA branch (training mode only).
        projection_seed: Seed the shared projections are drawn from (PEFT's ``projection_prng_key``).
        save_projection: Store A and B in the checkpoint instead of regenerating them from ``projection_seed`` when
            it is loaded (larger files, independent of how torch draws random numbers).
    """

    delta_type: ClassVar[str] = "vera"

    vera_r: int = 256
    d_initial: float = 0.1
    vera_dropout: float = 0.0
    projection_seed: int = 0
    save_projection: bool = False

    def validate(self) -> None:
        # vera_r is bounded again at plan time by the widest host, before anything is allocated.
        check_positive_int(self, "vera_r")
        check_finite_number(self, "d_initial", low=-MAX_SCALE, high=MAX_SCALE)
        check_probability(self, "vera_dropout")
        self.projection_seed = check_int(self, "projection_seed", low=0, high=MAX_SEED)
        check_bool(self, "save_projection")


def random_projections(r: int, in_features: int, out_features: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared projections ``A`` (``r x in_features``) and ``B`` (``out_features x r``), float32 on the CPU.

    One CPU generator seeded with ``seed`` draws ``A``, then ``B``, each Kaiming-uniform over its fan-in (bound
    ``sqrt(6 / fan_in)``): the same bits in every process, and PEFT's matrices for ``projection_prng_key=seed``.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    a = torch.empty(r, in_features)
    b = torch.empty(out_features, r)
    nn.init.kaiming_uniform_(a, a=0, generator=generator)
    nn.init.kaiming_uniform_(b, a=0, generator=generator)
    return a, b


class VeraProjections(SharedParameters):
    """The frozen random projections ``vera_A`` / ``vera_B`` shared by every site of one VeRA delta (buffers:
    never trained; saved only with ``save_projection``)."""

    def __init__(self, r: int, in_features: int, out_features: int, seed: int, saved: bool, **factory: Any) -> None:
        super().__init__()
        a, b = random_projections(r, in_features, out_features, seed)
        self.vera_A: torch.Tensor
        self.vera_B: torch.Tensor
        self.register_buffer("vera_A", a.to(**factory), persistent=saved)
        self.register_buffer("vera_B", b.to(**factory), persistent=saved)


class VeraRouter(SiteRouter):
    """Per-row VeRA on one Linear / Conv1D host: each delta as the low-rank pair ``(diag(d) A, diag(b) B)``,
    stacked like LoRA's factors (ranks zero-padded, a last all-zero slot)."""

    def build(self) -> dict[str, torch.Tensor]:
        pairs = [s.factors() for s in self.sites]  # type: ignore[attr-defined]
        return stack_lora([(a.t(), b.t()) for a, b in pairs])

    def _stamp(self) -> Any:
        # The factors also depend on the shared projections (buffers: replaced when a checkpoint or .to() writes them).
        shared = [s.projections() for s in self.sites]  # type: ignore[attr-defined]
        return (super()._stamp(), [(p.vera_A.data_ptr(), p.vera_A._version, p.vera_B._version) for p in shared])

    def apply(self, stack: dict[str, torch.Tensor], slots: torch.Tensor, args: tuple[Any, ...],
              kwargs: dict[str, Any], output: torch.Tensor) -> torch.Tensor:
        x = first_input(args, kwargs)
        a_t = self.gather(stack, "A_T", slots)
        projected = torch.bmm(x.reshape(x.shape[0], -1, x.shape[-1]).to(a_t.dtype), a_t)
        return add_routed(output, projected, self.gather(stack, "B_T", slots))

    def apply_segment(self, site: DeltaSite, x: torch.Tensor, output: torch.Tensor) -> None:
        """One delta on a run of rows: its own rank, ``output`` updated in place."""
        a, b = site.factors()  # type: ignore[attr-defined]
        projected = F.linear(x.reshape(-1, x.shape[-1]).to(a.dtype), a)
        out2d = output.view(-1, output.shape[-1])
        if out2d.dtype == b.dtype:
            out2d.addmm_(projected, b.t())
        else:
            out2d.add_((projected @ b.t()).to(out2d.dtype))


class VeraSite(DeltaSite):
    """The trainable vectors of one Linear / Conv1D host: ``out + b * (B_s (d * (A_s x)))``, mergeable."""

    composition = Composition.ADDS_INPUT_FUNCTION
    router = VeraRouter

    def __init__(
        self, in_features: int, out_features: int, shared: VeraProjections, d_initial: float, dropout: float,
        transposed: bool, **factory: Any,
    ) -> None:
        super().__init__()
        r = shared.vera_A.shape[0]
        self.in_features, self.out_features = in_features, out_features
        self.transposed = transposed  # Conv1D stores its weight as (in, out)
        self.lambda_d = nn.Parameter(torch.full((r,), float(d_initial), **factory))
        self.lambda_b = nn.Parameter(torch.zeros(out_features, **factory))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self._shared = (shared,)  # referenced, not registered: stored once, on the backbone root

    def projections(self) -> VeraProjections:
        """The delta's shared projections."""
        return self._shared[0]

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(diag(d) A_s, diag(b) B_s)``, ``r x in`` and ``out x r``: VeRA as a low-rank pair.

        Folding the vectors into the slices costs ``r (in + out)`` multiplications, against ``tokens * r (in + out)``
        for the projections themselves, and lets the update run as one fused low-rank GEMM pair.
        """
        shared = self._shared[0]
        d, b = self.lambda_d, self.lambda_b
        a_s = shared.vera_A[:, : self.in_features].to(device=d.device, dtype=d.dtype)
        b_s = shared.vera_B[: self.out_features, :].to(device=b.device, dtype=b.dtype)
        return d[:, None] * a_s, b[:, None] * b_s

    def forward_hook(self, host: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: torch.Tensor) -> torch.Tensor:
        x = first_input(args, kwargs)
        if self.dropout is not None:
            x = self.dropout(x)
        a, b = self.factors()
        return add_low_rank(output, F.linear(x, a), b, 1.0)

    def merge_deltas(self, host: nn.Module) -> dict[str, torch.Tensor]:
        refuse_quantized_merge(host, "a VeRA delta")
        a, b = self.factors()
        delta = b.detach() @ a.detach()
        return {"weight": delta.T if self.transposed else delta}


class VeraModel(DeltaBase):
    """VeRA: shared frozen random projections, trainable scaling vectors per modified Linear / Conv1D module.

    Example:
        >>> delta = VeraModel(backbone_model=model, modified_modules=["query", "value"], vera_r=256)
        >>> delta.freeze_module(exclude=["deltas", "classifier"])

    Default positions: ``["attn.q", "attn.v"]`` (query and value projections). The projections are sized for the
    widest input and output among the sites and regenerated from ``projection_seed`` (``save_projection=True``:
    saved in the checkpoint).
    """

    delta_type: ClassVar[str] = "vera"
    config_class = VeraConfig
    default_modified_modules: ClassVar[tuple[str, ...]] = ("attn.q", "attn.v")
    constructor_fields = (
        "vera_r", "d_initial", "vera_dropout", "projection_seed", "save_projection", "modified_modules",
        "exclude_modules", "unfrozen_modules",
    )

    def plan(self, matches: list[tuple[str, nn.Module]]) -> None:
        cfg: VeraConfig = self.config  # type: ignore[assignment]
        dims = []
        for name, host in matches:
            size = linear_dims(host)
            if size is None:
                raise UnsupportedModuleError(
                    f"VeRA cannot modify {name!r} of type {type(host).__name__}: it supports nn.Linear and transformers "
                    f"Conv1D. Point modified_modules at the linear layers inside it."
                )
            dims.append(size)
        self._in_max = max(d[0] for d in dims)
        self._out_max = max(d[1] for d in dims)
        widest = max(self._in_max, self._out_max)
        # diag(b) B diag(d) A has rank <= min(in, out); VeRA papers use ranks of 256-1024 and random projections
        # wider than the host are harmless, so ranks up to RANK_FLOOR pass anywhere. Beyond that only memory grows.
        check_bounded_by(
            cfg, "vera_r", cfg.vera_r, max(widest, RANK_FLOOR), matches[0][0] if len(matches) == 1 else "the sites",
            f"widest in={self._in_max}, out={self._out_max}", f"max(in_features, out_features, {RANK_FLOOR})",
        )

    def build_shared(self, matches: list[tuple[str, nn.Module]]) -> SharedParameters | None:
        cfg: VeraConfig = self.config  # type: ignore[assignment]
        return VeraProjections(
            cfg.vera_r, self._in_max, self._out_max, cfg.projection_seed, cfg.save_projection,
            **factory_kwargs(matches[0][1]),
        )

    def build_site(self, name: str, host: nn.Module) -> DeltaSite:
        cfg: VeraConfig = self.config  # type: ignore[assignment]
        in_features, out_features = linear_dims(host)  # type: ignore[misc]  # checked in plan()
        return VeraSite(
            in_features, out_features, self.shared, cfg.d_initial, cfg.vera_dropout,  # type: ignore[arg-type]
            is_conv1d(host), **factory_kwargs(host),
        )
