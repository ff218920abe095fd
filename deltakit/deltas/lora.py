"""LoRA: Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models" (arXiv:2106.09685).

``h = W x + (alpha / r) * B A dropout(x)`` with ``A`` (r x in) Kaiming-uniform and ``B`` (out x r) zero, so a fresh
LoRA is the identity. Hooks the *output* of ``nn.Linear``, transformers' ``Conv1D`` (GPT-2), ``nn.Embedding`` and
``nn.Conv1d/2d/3d`` hosts; merging folds ``(alpha / r) * B A`` into the host weight.

On a convolution ``A`` is a convolution with the host's kernel, stride, padding (and padding mode) and dilation
producing ``r`` channels, and ``B`` a 1x1 convolution back to the host's channels (PEFT's layout: ``lora_A``
``(r, in, *kernel)``, ``lora_B`` ``(out, r / groups, 1, ...)``). A grouped host (``groups > 1``) gets a grouped
``B`` and a full ``A``, as in PEFT: that update reads every input channel, so it cannot be folded into the grouped
weight and merging it is refused.

rsLoRA (Kalajdzievski 2023, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA", arXiv:2312.03732) is
the option ``use_rslora=True``: the scale becomes ``alpha / sqrt(r)``, which keeps the update's size stable as the
rank grows.
"""

from __future__ import annotations

import copy
import math
import numbers
import weakref
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..base import DeltaBase
from ..config import (
    MAX_SCALE, DeltaConfig, check_bool, check_bounded_by, check_finite_number, check_positive_int, check_probability,
)
from ..errors import DeltaError, DeltaStateError, UnsupportedModuleError
from ..quantization import refuse_quantized_merge
from ..routing import SiteRouter
from ..site import Composition, DeltaSite, factory_kwargs
from ..structures import ConvGeometry, conv_geometry, is_conv1d, is_convolution, linear_dims
from .common import first_input


@dataclass
class LowRankConfig(DeltaConfig):
    """The settings of a low-rank update ``s B A`` (shared by LoRA and DoRA's direction).

    Args:
        lora_r: Rank of the update.
        lora_alpha: Scale numerator; the update is multiplied by ``lora_alpha / lora_r``.
        lora_dropout: Dropout probability on the LoRA branch's input (training mode only).
        use_rslora: rsLoRA: scale the update by ``lora_alpha / sqrt(lora_r)`` instead of ``lora_alpha / lora_r``.
    """

    lora_r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    use_rslora: bool = False

    @property
    def scaling(self) -> float:
        """The factor the update ``B A x`` is multiplied by: ``lora_alpha / lora_r`` (rsLoRA: ``/ sqrt(lora_r)``)."""
        return lora_scaling(self.lora_alpha, self.lora_r, self.use_rslora)

    def validate(self) -> None:
        # lora_r is bounded again per host at plan time (rank <= min(in, out)), before anything is allocated.
        check_positive_int(self, "lora_r")
        check_probability(self, "lora_dropout")
        check_bool(self, "use_rslora")
        # 0 makes the delta a no-op, a negative one flips it: both are mistakes; beyond MAX_SCALE a forward overflows.
        check_finite_number(
            self, "lora_alpha", positive=True, high=MAX_SCALE,
            hint="The update is scaled by lora_alpha / lora_r; lora_alpha must be > 0. A common choice is twice lora_r.",
        )


@dataclass
class LoraConfig(LowRankConfig):
    """LoRA settings (see :class:`LowRankConfig` for the fields)."""

    delta_type: ClassVar[str] = "lora"


def lora_scaling(alpha: float, r: int, rslora: bool) -> float:
    """``alpha / r``, or rsLoRA's ``alpha / sqrt(r)`` (the same float PEFT computes, so imported adapters agree)."""
    return alpha / math.sqrt(r) if rslora else alpha / r


class _AddLowRankInPlace(torch.autograd.Function):
    """``output += scaling * projected @ lora_B.T`` in place, for an output that is not a view.

    A custom function (rather than ``addmm_`` under autograd) avoids autograd's bookkeeping for in-place writes and
    lets the backward pass pick the fast GEMM layouts: the output's gradient passes through untouched, the scale is
    folded into the tiny ``lora_B``, and ``lora_B``'s gradient is computed as ``(projected^T g)^T``.
    """

    @staticmethod
    def forward(ctx: Any, output: torch.Tensor, projected: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
        output.view(-1, output.shape[-1]).addmm_(projected.reshape(-1, projected.shape[-1]), lora_B.t(), alpha=scaling)
        ctx.mark_dirty(output)
        ctx.save_for_backward(projected, lora_B)
        ctx.scaling = scaling
        return output

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        projected, lora_B = ctx.saved_tensors
        grad2d = grad.reshape(-1, grad.shape[-1])
        grad_projected = grad_B = None
        if ctx.needs_input_grad[1]:
            grad_projected = (grad2d @ (lora_B * ctx.scaling)).view(projected.shape)
        if ctx.needs_input_grad[2]:
            grad_B = (projected.reshape(-1, projected.shape[-1]).t() @ grad2d).t().mul_(ctx.scaling)
        return grad, grad_projected, grad_B, None


def add_low_rank(output: torch.Tensor, projected: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """``output + scaling * projected @ lora_B.T``, as cheaply as the situation allows.

    The host's output is a fresh tensor that nothing else holds (the dispatcher hands over a copy when a user hook
    ran before ours) and that its own backward does not need, so it can be updated in place: one GEMM accumulating
    into it, no output-sized temporary, no separate add or scale kernel. Without autograd this is a plain
    ``addmm_``; with autograd it goes through :class:`_AddLowRankInPlace`, applied to the 2-D result itself when the
    output is a reshaping view of one (a Linear with bias), since autograd's tracking of in-place writes through
    views costs more than the update. Other views get an out-of-place ``addmm``.
    Mixed dtypes (autocast) take the plain formula, and so does code traced by ``torch.compile``: the compiler
    fuses it as well itself, and the view and in-place bookkeeping above would only break the graph.
    """
    if (
        output.dtype != projected.dtype
        or output.dtype != lora_B.dtype
        or not output.is_contiguous()
        or torch.compiler.is_compiling()
    ):
        return output + (F.linear(projected, lora_B) * scaling).to(output.dtype)
    flat = projected.reshape(-1, projected.shape[-1])
    if not torch.is_grad_enabled() or not (output.requires_grad or projected.requires_grad or lora_B.requires_grad):
        output.view(-1, output.shape[-1]).addmm_(flat, lora_B.t(), alpha=scaling)
        return output
    if output._is_view():
        base = output._base
        if base is not None and base.is_contiguous() and base.numel() == output.numel() and base.dim() == 2:
            # A Linear (or Conv1D) with bias returns a reshaping view of its fresh 2-D addmm result: update that
            # result in place and return the same view of it.
            return _AddLowRankInPlace.apply(base, flat, lora_B, scaling).view(output.shape)
        return torch.addmm(output.view(-1, output.shape[-1]), flat, lora_B.t(), alpha=scaling).view(output.shape)
    return _AddLowRankInPlace.apply(output, projected, lora_B, scaling)


def _pad_rank(t: torch.Tensor, r: int, dim: int) -> torch.Tensor:
    """Zero-pad the rank dimension ``dim`` of ``t`` to ``r`` (zero rows of A / columns of B add nothing)."""
    if t.shape[dim] == r:
        return t
    shape = list(t.shape)
    shape[dim] = r - t.shape[dim]
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def stack_lora(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack ``(A^T (in x r), scaling * B^T (r x out))`` pairs, ranks padded to the largest, plus a zero slot."""
    r = max(a.shape[1] for a, _ in pairs)
    a_t = [_pad_rank(a, r, 1) for a, _ in pairs]
    b_t = [_pad_rank(b, r, 0) for _, b in pairs]
    a_t.append(torch.zeros_like(a_t[0]))
    b_t.append(torch.zeros_like(b_t[0]))
    return {"A_T": torch.stack(a_t), "B_T": torch.stack(b_t)}


def add_routed(output: torch.Tensor, projected: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """``output + projected @ b_t`` row by row (``projected``: N x T x r, ``b_t``: N x r x out), in place when
    nothing needs the old output for autograd."""
    n = projected.shape[0]
    if b_t.dtype != output.dtype:
        return output + torch.bmm(projected, b_t).to(output.dtype).view(output.shape)
    tracked = torch.is_grad_enabled() and (output.requires_grad or b_t.requires_grad or projected.requires_grad)
    if output.is_contiguous() and not tracked:
        output.view(n, -1, output.shape[-1]).baddbmm_(projected, b_t)
        return output
    return torch.baddbmm(output.reshape(n, -1, output.shape[-1]), projected, b_t).view(output.shape)


class LoraRouter(SiteRouter):
    """Per-row LoRA on one Linear / Conv1D host: ``out[j] += x[j] @ A_T[s_j] @ B_T[s_j]`` with batched matmuls."""

    def build(self) -> dict[str, torch.Tensor]:
        return stack_lora([(s.lora_A.t(), (s.lora_B * s.scaling).t()) for s in self.sites])  # type: ignore[operator]

    def apply(self, stack: dict[str, torch.Tensor], slots: torch.Tensor, args: tuple[Any, ...],
              kwargs: dict[str, Any], output: torch.Tensor) -> torch.Tensor:
        x = first_input(args, kwargs)
        a_t = self.gather(stack, "A_T", slots)
        b_t = self.gather(stack, "B_T", slots)
        projected = torch.bmm(x.reshape(x.shape[0], -1, x.shape[-1]).to(a_t.dtype), a_t)
        return add_routed(output, projected, b_t)

    def apply_segment(self, site: DeltaSite, x: torch.Tensor, output: torch.Tensor) -> None:
        """One delta on a run of rows (the segmented path): its own rank, no padding, ``output`` updated in place."""
        flat = x.reshape(-1, x.shape[-1]).to(site.lora_A.dtype)
        projected = F.linear(flat, site.lora_A)  # type: ignore[arg-type]
        out2d = output.view(-1, output.shape[-1])
        if out2d.dtype == site.lora_B.dtype:
            out2d.addmm_(projected, site.lora_B.t(), alpha=site.scaling)  # type: ignore[union-attr, arg-type]
        else:
            out2d.add_((projected @ site.lora_B.t() * site.scaling).to(out2d.dtype))  # type: ignore[union-attr]


class LoraEmbeddingRouter(SiteRouter):
    """Per-row LoRA on one Embedding host: row ``j``'s tokens look up ``A_T[s_j]``, then ``@ B_T[s_j]``."""

    def build(self) -> dict[str, torch.Tensor]:
        return stack_lora([(s.lora_A.t(), (s.lora_B * s.scaling).t()) for s in self.sites])  # type: ignore[operator]

    def apply(self, stack: dict[str, torch.Tensor], slots: torch.Tensor, args: tuple[Any, ...],
              kwargs: dict[str, Any], output: torch.Tensor) -> torch.Tensor:
        ids = first_input(args, kwargs)
        flat = ids.reshape(ids.shape[0], -1)
        rows = stack["A_T"][slots.unsqueeze(1), flat]  # N x T x r
        scale = embedding_scale(self.host)  # a scaled embedding scales the update too (see LoraEmbeddingSite)
        if scale is not None:
            rows = rows * (scale.to(self.host.weight.dtype).to(rows.dtype) if isinstance(scale, torch.Tensor) else scale)
        return add_routed(output, rows, self.gather(stack, "B_T", slots))


class SharedInputGroup:
    """LoRA sites of one delta whose hosts are siblings reading the same input (q, k, v of an attention block).

    Their ``A`` projections read the same activation ``x``; computing them as one GEMM over the concatenated
    ``A``s reads ``x`` once instead of once per site, and in the backward pass produces one gradient for ``x``
    (one accumulation) and one thin GEMM for the ``A`` gradients. On a CPU these thin GEMMs are bound by reading and
    writing the activation, not by arithmetic, so this is where LoRA's training-step cost goes.

    Bookkeeping follows one forward pass: the members called so far in the pass are remembered, and the pass ends
    when every member was called or one is called again. The first member called with some ``x`` computes one GEMM
    for itself and the members still to come in the pass and leaves it *pending*; a later member uses its slice
    only if it receives the very tensor the pending GEMM read, unmodified (same object, same in-place version), its
    ``A`` unchanged since, and it was part of that GEMM; otherwise it starts a new pending GEMM for itself and the
    members still to come (cross-attention: q reads the decoder, k and v share the encoder states), or computes
    its own projection when it is the last one. A pending GEMM never outlives its pass, so a projection is never
    reused from an earlier forward (whose graph may be gone), whatever order the model calls its modules in.
    A member's arithmetic depends only on the model's call order, so repeated passes and detach / attach are
    bit-for-bit.
    """

    def __init__(self, sites: list[LoraSite]) -> None:
        # Weak: every member holds the group (its ``shared_input``); strong references both ways would be a cycle
        # that keeps a dropped delta in memory until the cycle collector runs (a serving store drops many).
        self._members = [weakref.ref(site) for site in sites]
        self.called: set[int] = set()  # members called in the current pass
        # (x, x's version, fused projection, {member: (start, stop)}, the members' A versions)
        self.pending: tuple[torch.Tensor, int, torch.Tensor, dict[int, tuple[int, int]], tuple[int, ...]] | None
        self.pending = None
        self.shared_calls = 0  # calls served from another member's GEMM (diagnostics, tests)

    @property
    def sites(self) -> list[LoraSite]:
        return [ref() for ref in self._members]  # type: ignore[misc]

    def __deepcopy__(self, memo: dict[int, Any]) -> SharedInputGroup:
        # copy.deepcopy would keep weak references to the original members: link the copies instead.
        new = SharedInputGroup.__new__(SharedInputGroup)
        memo[id(self)] = new
        new.__init__([copy.deepcopy(site, memo) for site in self.sites])  # type: ignore[misc]
        return new

    def __getstate__(self) -> dict[str, Any]:
        return {"sites": self.sites}  # a fresh pass after unpickling; weak references cannot be pickled

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["sites"])  # type: ignore[misc]

    def reset(self) -> None:
        """Forget the current pass (on attach / detach)."""
        self.called = set()
        self.pending = None

    def projection(self, site: LoraSite, x: torch.Tensor) -> torch.Tensor:
        """``x @ site.lora_A^T``, shared with the group where the inputs allow."""
        if x.is_inference():
            # Inference-mode tensors keep no version counter, so an in-place change between two members' calls
            # could not be detected: no sharing for them.
            return F.linear(x, site.lora_A)
        index = next(i for i, member in enumerate(self.sites) if member is site)  # (ids would not survive copies)
        if index in self.called:  # called again: a new forward pass
            self.reset()
        self.called.add(index)
        pending = self.pending
        if (
            pending is not None
            and pending[0] is x
            and pending[1] == x._version
            and index in pending[3]
            and pending[4] == tuple(member.lora_A._version for member in self.sites)
        ):
            start, stop = pending[3][index]
            projected = pending[2][..., start:stop]
            self.shared_calls += 1
        else:
            members = [index] + [i for i in range(len(self.sites)) if i not in self.called]
            if len(members) == 1:
                projected = F.linear(x, site.lora_A)
                self.pending = None
            else:
                members.sort()
                slices, offset = {}, 0
                for i in members:
                    rank = self.sites[i].lora_A.shape[0]
                    slices[i] = (offset, offset + rank)
                    offset += rank
                fused = F.linear(x, torch.cat([self.sites[i].lora_A for i in members]))
                versions = tuple(member.lora_A._version for member in self.sites)
                self.pending = (x, x._version, fused, slices, versions)
                projected = fused[..., slices[index][0] : slices[index][1]]
        if len(self.called) == len(self.sites):
            self.reset()  # the pass is complete: keep nothing alive
        return projected


class LoraSite(DeltaSite):
    """The low-rank pair ``lora_A`` / ``lora_B`` of one Linear or Conv1D host: ``out + s B A x``, mergeable."""

    composition = Composition.ADDS_INPUT_FUNCTION
    router = LoraRouter

    def __init__(
        self, in_features: int, out_features: int, r: int, scaling: float, dropout: float, transposed: bool,
        **factory: Any,
    ) -> None:
        super().__init__()
        self.scaling = scaling
        self.transposed = transposed  # Conv1D stores its weight as (in, out)
        self.lora_A = nn.Parameter(torch.empty(r, in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None

    def forward_hook(self, host: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: torch.Tensor) -> torch.Tensor:
        x = first_input(args, kwargs)
        if self.dropout is not None:
            x = self.dropout(x)
        group = self.__dict__.get("shared_input")
        if group is not None and not torch.compiler.is_compiling():
            projected = group.projection(self, x)
        else:
            projected = F.linear(x, self.lora_A)
        return add_low_rank(output, projected, self.lora_B, self.scaling)

    def merge_deltas(self, host: nn.Module) -> dict[str, torch.Tensor]:
        refuse_quantized_merge(host, "a LoRA")
        delta = (self.lora_B @ self.lora_A) * self.scaling
        return {"weight": delta.T if self.transposed else delta}


# ------------------------------------------------------------------------------------------------ convolutions
_CONV_FUNCTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_PLAIN_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def conv_like_host(x: torch.Tensor, weight: torch.Tensor, geometry: ConvGeometry, groups: int = 1) -> torch.Tensor:
    """``weight`` applied to ``x`` as the host applies its own: same stride, padding (mode) and dilation."""
    conv = _CONV_FUNCTIONS[geometry.dims]
    if geometry.pre_pad is not None:  # reflect / replicate / circular: pad first, as nn.ConvNd does
        x = F.pad(x, geometry.pre_pad, mode=geometry.padding_mode)
        return conv(x, weight, None, geometry.stride, 0, geometry.dilation, groups)
    return conv(x, weight, None, geometry.stride, geometry.padding, geometry.dilation, groups)


def _dense_up(site: LoraConvSite) -> torch.Tensor:
    """``scaling * B`` as a dense ``out x r`` matrix (a grouped ``B`` becomes block diagonal)."""
    b = site.lora_B.flatten(1) * site.scaling
    groups = site.geometry.groups
    if groups == 1:
        return b
    rows = b.shape[0] // groups
    return torch.block_diag(*(b[g * rows : (g + 1) * rows] for g in range(groups)))


class LoraConvRouter(SiteRouter):
    """Per-row LoRA on one convolution: row ``j`` runs ``A[s_j]`` and then ``B[s_j]``.

    ``A``: the rows' kernels gathered and stacked along the output channels, applied in one grouped convolution
    over the batch folded into the channels (``groups = N``), so each row meets only its own kernels. ``B``: a
    1x1 convolution is a matmul over channels, so one ``bmm`` of the rows' ``out x r`` matrices (grouped ``B``
    made block diagonal) with the flattened positions.
    """

    def build(self) -> dict[str, torch.Tensor]:
        r = max(s.lora_A.shape[0] for s in self.sites)  # type: ignore[union-attr]
        a = [_pad_rank(s.lora_A, r, 0) for s in self.sites]  # type: ignore[arg-type]
        b = [_pad_rank(_dense_up(s), r, 1) for s in self.sites]  # type: ignore[arg-type]
        return {"A": torch.stack([*a, torch.zeros_like(a[0])]), "B": torch.stack([*b, torch.zeros_like(b[0])])}

    def apply(self, stack: dict[str, torch.Tensor], slots: torch.Tensor, args: tuple[Any, ...],
              kwargs: dict[str, Any], output: torch.Tensor) -> torch.Tensor:
        x = first_input(args, kwargs)
        geometry: ConvGeometry = self.sites[0].geometry  # type: ignore[assignment]
        if x.dim() != geometry.dims + 2:
            raise DeltaError(
                f"DeltaGroup.route() cannot route the convolution {self.host_name!r}: it received an unbatched input "
                f"of shape {tuple(x.shape)}, and routing needs the batch on dim 0 ({geometry.dims + 2}-d input). "
                f"Add a batch dimension (x.unsqueeze(0))."
            )
        a = self.gather(stack, "A", slots)  # N x r x C x kernel
        b = self.gather(stack, "B", slots)  # N x out x r
        n, r = a.shape[0], a.shape[1]
        folded = x.to(a.dtype).reshape(1, n * x.shape[1], *x.shape[2:])
        projected = conv_like_host(folded, a.reshape(n * r, *a.shape[2:]), geometry, groups=n)
        update = torch.bmm(b, projected.reshape(n, r, -1)).view(output.shape)
        tracked = torch.is_grad_enabled() and (update.requires_grad or output.requires_grad)
        if update.dtype == output.dtype and not tracked:
            return output.add_(update)
        return output + update.to(output.dtype)


class LoraConvSite(DeltaSite):
    """LoRA of an ``nn.Conv1d/2d/3d``: ``out + s B(A(x))`` with ``A`` a convolution like the host's producing ``r``
    channels and ``B`` a 1x1 convolution (grouped like the host); mergeable unless the host is grouped."""

    composition = Composition.ADDS_INPUT_FUNCTION
    router = LoraConvRouter

    def __init__(self, geometry: ConvGeometry, r: int, scaling: float, dropout: float, **factory: Any) -> None:
        super().__init__()
        self.geometry = geometry  # a frozen dataclass: not a submodule, not saved (rebuilt from the host)
        self.scaling = scaling
        ones = (1,) * geometry.dims
        self.lora_A = nn.Parameter(torch.empty(r, geometry.in_channels, *geometry.kernel_size, **factory))
        self.lora_B = nn.Parameter(torch.zeros(geometry.out_channels, r // geometry.groups, *ones, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # fan-in: in_channels * prod(kernel), as PEFT's
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None

    def update(self, x: torch.Tensor) -> torch.Tensor:
        """``B(A(x))`` without the scale, in the factors' dtype."""
        if x.dtype != self.lora_A.dtype:
            x = x.to(self.lora_A.dtype)
        if self.dropout is not None:
            x = self.dropout(x)
        projected = conv_like_host(x, self.lora_A, self.geometry)
        return _CONV_FUNCTIONS[self.geometry.dims](projected, self.lora_B, None, 1, 0, 1, self.geometry.groups)

    def forward_hook(self, host: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: torch.Tensor) -> torch.Tensor:
        update = self.update(first_input(args, kwargs))
        in_place = type(host) in _PLAIN_CONVS or not (torch.is_grad_enabled() and output.requires_grad)
        if update.dtype != output.dtype or not in_place or torch.compiler.is_compiling():
            return output + (update * self.scaling).to(output.dtype)
        # The host's output is fresh and a convolution's backward does not read it (a subclass's forward might
        # end in an op whose backward does, hence the type check): accumulate in place, no second output-sized
        # tensor (feature maps are the large tensors of a vision model).
        return output.add_(update, alpha=self.scaling)

    def merge_deltas(self, host: nn.Module) -> dict[str, torch.Tensor]:
        geometry = self.geometry
        if geometry.groups > 1:
            raise DeltaStateError(
                f"Cannot merge a LoRA into the grouped convolution {geometry.describe()}: its A reads all "
                f"{geometry.in_channels} input channels while each group of the host's weight reads only "
                f"{geometry.in_channels // geometry.groups}, so no weight of the host's shape computes the update "
                f"(PEFT refuses this merge too). Keep this delta attached, or leave grouped convolutions out of "
                f"modified_modules."
            )
        a, b = self.lora_A.detach(), self.lora_B.detach()
        # B is 1x1: B(A(x)) is one convolution with kernel B @ A (over the rank), same stride / padding / dilation.
        delta = (b.flatten(1) @ a.flatten(1)).view(host.weight.shape) * self.scaling
        return {"weight": delta}


def embedding_scale(host: nn.Module) -> float | torch.Tensor | None:
    """The factor a *scaled* word embedding multiplies its lookup by inside its forward, or ``None``.

    transformers' scaled embeddings (Gemma, Gemma 3, BART/mBART/M2M100/NLLB with ``scale_embedding``) compute
    ``E[x] * embed_scale``, with ``embed_scale`` a Python number or a one-element buffer. The attribute is probed,
    not the class name, so any embedding following that convention is covered; a 1 (no scaling) gives ``None``.

    Raises:
        UnsupportedModuleError: ``embed_scale`` is neither a number nor a one-element tensor.
    """
    if "embed_scale" not in host.__dict__ and "embed_scale" not in host._buffers and not hasattr(type(host), "embed_scale"):
        return None
    scale = getattr(host, "embed_scale")
    if scale is None:
        return None
    if isinstance(scale, numbers.Real) and not isinstance(scale, bool):
        return None if scale == 1 else float(scale)
    if isinstance(scale, torch.Tensor) and scale.numel() == 1:
        return scale
    raise UnsupportedModuleError(
        f"LoRA cannot modify a {type(host).__name__} whose embed_scale is {scale!r:.60}: it needs a number or a "
        f"one-element tensor to scale its update like the embedding's own output."
    )


class LoraEmbeddingSite(DeltaSite):
    """LoRA of an ``nn.Embedding``: ``E[x] + (alpha / r) * A[:, x]^T B^T``.

    ``A`` (r x num_embeddings) is drawn from N(0, 1) rather than Kaiming-uniform: an embedding's "fan-in" is the
    vocabulary size, which would make ``A`` tiny and ``B`` learn very slowly. ``B`` is zero, as for linear hosts.

    On a scaled word embedding (``E[x] * embed_scale``, see :func:`embedding_scale`) the update is scaled the same
    way, ``(E[x] + (alpha / r) * A[:, x]^T B^T) * embed_scale``: that is what merging ``(alpha / r) * (B A)^T`` into
    ``E`` computes, and what PEFT computes, so merged, attached and PEFT-converted outputs agree.
    """

    composition = Composition.ADDS_INPUT_FUNCTION
    router = LoraEmbeddingRouter

    def __init__(self, host: nn.Embedding, r: int, scaling: float, dropout: float, **factory: Any) -> None:
        super().__init__()
        self.scaling = scaling
        self.padding_idx = host.padding_idx
        # Probed once (a scaled embedding keeps being one); the scale's value is read at each call.
        self.host_scaled = embedding_scale(host) is not None
        self.lora_A = nn.Parameter(torch.empty(r, host.num_embeddings, **factory))
        self.lora_B = nn.Parameter(torch.zeros(host.embedding_dim, r, **factory))
        nn.init.normal_(self.lora_A)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None

    def forward_hook(self, host: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: torch.Tensor) -> torch.Tensor:
        if host.num_embeddings != self.lora_A.shape[1]:
            raise DeltaStateError(
                f"This LoRA was built for an embedding of {self.lora_A.shape[1]} rows, but the module now has "
                f"{host.num_embeddings} (resize_token_embeddings() after creating the delta?). Create the delta after "
                f"resizing, or resize back."
            )
        rows = F.embedding(first_input(args, kwargs), self.lora_A.T, padding_idx=self.padding_idx)
        if self.dropout is not None:
            rows = self.dropout(rows)
        scaling = self.scaling
        if self.host_scaled:
            scale = embedding_scale(host)
            if isinstance(scale, torch.Tensor):  # in the dtype the host multiplies with (Gemma: its weight's)
                rows = rows * scale.to(host.weight.dtype).to(rows.dtype)
            elif scale is not None:
                scaling = scaling * scale
        return add_low_rank(output, rows, self.lora_B, scaling)

    def merge_deltas(self, host: nn.Module) -> dict[str, torch.Tensor]:
        return {"weight": (self.lora_B @ self.lora_A).T * self.scaling}


class LoraModel(DeltaBase):
    """Low-rank adaptation of Linear, Conv1D, Embedding and convolution (``nn.Conv1d/2d/3d``) modules.

    Example:
        >>> delta = LoraModel(backbone_model=model, modified_modules=["query", "value"], lora_r=8, lora_alpha=16)
        >>> delta.freeze_module(exclude=["deltas", "classifier"])

    Default positions: ``["attn.q", "attn.v"]`` (query and value projections).
    """

    delta_type: ClassVar[str] = "lora"
    config_class = LoraConfig
    default_modified_modules: ClassVar[tuple[str, ...]] = ("attn.q", "attn.v")
    constructor_fields = (
        "lora_r", "lora_alpha", "lora_dropout", "use_rslora", "modified_modules", "exclude_modules",
        "unfrozen_modules",
    )


    def on_attach(self) -> None:
        if not self.__dict__.get("_inputs_linked"):  # once, on the first attach: the sites are all built by then
            self._group_shared_inputs()
            self._inputs_linked = True
        self._reset_shared_inputs()

    def on_detach(self) -> None:
        self._reset_shared_inputs()

    def _reset_shared_inputs(self) -> None:
        for site in self.sites:
            group = site.module.__dict__.get("shared_input")
            if group is not None:
                group.reset()

    def _group_shared_inputs(self) -> None:
        """Link sibling Linear/Conv1D sites of equal input size and dtype (see :class:`SharedInputGroup`)."""
        groups: dict[tuple[Any, ...], list[LoraSite]] = {}
        for site in self.sites:
            module = site.module
            if not isinstance(module, LoraSite) or module.dropout is not None:
                continue
            parent = site.name.rpartition(".")[0]
            key = (parent, module.lora_A.shape[1], module.lora_A.dtype, module.lora_A.device)
            groups.setdefault(key, []).append(module)
        for members in groups.values():
            if len(members) > 1:
                shared = SharedInputGroup(members)
                for member in members:
                    member.__dict__["shared_input"] = shared  # a plain attribute: not a submodule, not saved

    def build_site(self, name: str, host: nn.Module) -> DeltaSite:
        cfg: LoraConfig = self.config  # type: ignore[assignment]
        factory = factory_kwargs(host)
        if isinstance(host, nn.Embedding):
            if host.max_norm is not None:
                raise UnsupportedModuleError(
                    f"LoRA cannot modify {name!r}: nn.Embedding with max_norm renormalises its weight in place."
                )
            check_bounded_by(
                cfg, "lora_r", cfg.lora_r, host.embedding_dim, name,
                f"Embedding({host.num_embeddings}, {host.embedding_dim})", "embedding_dim",
            )
            return LoraEmbeddingSite(host, cfg.lora_r, cfg.scaling, cfg.lora_dropout, **factory)
        if is_convolution(host):
            return self._build_conv_site(name, host)
        dims = linear_dims(host)
        if dims is None:
            raise UnsupportedModuleError(
                f"LoRA cannot modify {name!r} of type {type(host).__name__}: it supports nn.Linear, transformers "
                f"Conv1D, nn.Embedding and nn.Conv1d/2d/3d. Point modified_modules at the linear layers inside it."
            )
        # B A has rank <= min(in, out) whatever r is. A rank up to the wider side is accepted (PEFT recipes put r=8 on
        # a 2-label head); beyond it r only costs memory, and 2**40 would ask for terabytes.
        check_bounded_by(
            cfg, "lora_r", cfg.lora_r, max(dims), name, f"{type(host).__name__} in={dims[0]}, out={dims[1]}",
            "max(in_features, out_features)",
        )
        return LoraSite(*dims, cfg.lora_r, cfg.scaling, cfg.lora_dropout, transposed=is_conv1d(host), **factory)

    def _build_conv_site(self, name: str, host: nn.Module) -> DeltaSite:
        """The site of an ``nn.Conv1d/2d/3d`` host, after checking the host and the rank against it."""
        cfg: LoraConfig = self.config  # type: ignore[assignment]
        geometry = conv_geometry(host)
        if geometry is None:
            kind = type(host).__name__
            why = (
                "it has not run yet, so its in_channels are unknown. Run one forward pass before creating the delta"
                if isinstance(getattr(host, "weight", None), nn.parameter.UninitializedParameter)
                else "transposed convolutions are not supported (a LoRA of one would need its own layout, and PEFT "
                "has none). Point modified_modules at nn.Conv1d/2d/3d or Linear layers"
            )
            raise UnsupportedModuleError(f"LoRA cannot modify {name!r} ({kind}): {why}.")
        if cfg.lora_r % geometry.groups:
            raise UnsupportedModuleError(
                f"LoRA cannot modify {name!r} ({geometry.describe()}) with lora_r={cfg.lora_r}: on a grouped "
                f"convolution B is grouped like the host, so the rank must be a multiple of groups={geometry.groups} "
                f"(as in PEFT). Choose lora_r as a multiple of {geometry.groups}, or leave {name!r} out."
            )
        # B A (r x in*kernel, out x r) has rank <= min(in * kernel, out); as for Linear, up to the wider side.
        check_bounded_by(
            cfg, "lora_r", cfg.lora_r, max(geometry.fan_in, geometry.out_channels), name, geometry.describe(),
            "max(in_channels * prod(kernel_size), out_channels)",
        )
        return LoraConvSite(geometry, cfg.lora_r, cfg.scaling, cfg.lora_dropout, **factory_kwargs(host))
