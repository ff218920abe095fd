"""DoRA: Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation" (arXiv:2402.09353).

``h = m * (W + s B A) x / ||W + s B A||_row + b``: the weight is split into a trainable magnitude ``m`` (one number
per output feature, initialised to the row norms of ``W``, so a fresh DoRA is the identity) and a direction that a
LoRA pair ``B A`` (scale ``s = alpha / r``, rsLoRA ``alpha / sqrt(r)``) adapts. The norm is taken per output feature
(``||.||_row`` of the ``(out, in)`` matrix, the paper's column norm of ``W^T``) and treated as a constant in the
backward pass (paper, section 4.3; PEFT does the same), so gradients reach ``m``, ``A`` and ``B`` but not through
the norm. The host's bias is added unscaled. Hooks the *output* of ``nn.Linear`` and transformers' ``Conv1D``:
``m / n * (out - b + s B A x) + b``, so it transforms the output (order matters); merging writes ``W'`` into the
host weight.

The norm is the method's cost: ``||W + s B A||^2`` needs all of ``W`` at every step. It is computed per row as
``||W||^2 + 2 s <W, B A> + s^2 ||B A||^2`` = ``wsq + 2 s rowsum(B * (W A^T)) + s^2 rowsum((B (A A^T)) * B)``:
one thin GEMM ``W A^T`` (``out x r``) instead of forming the ``out x in`` matrix ``W + s B A``; ``||W||^2`` is kept
while ``W`` is unchanged (it is frozen); and the whole norm is kept while ``W``, ``A`` and ``B`` are unchanged
(inference, generation, gradient-checkpointing recomputation). Rows where the expansion cancels (``W + s B A`` much
shorter than its terms) are recomputed directly, so the result keeps its accuracy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..base import DeltaBase
from ..config import check_bounded_by
from ..errors import DeltaStateError, UnsupportedModuleError
from ..quantization import dequantize, is_quantized, refuse_quantized_merge
from ..routing import SiteRouter
from ..site import Composition, DeltaSite, factory_kwargs
from ..structures import is_conv1d, linear_dims
from .common import first_input
from .lora import LowRankConfig, add_low_rank, stack_lora

__all__ = ["DoraConfig", "DoraModel", "DoraRouter", "DoraSite", "row_norms_squared"]

#: A row whose expanded squared norm is below this share of the sum of its terms' sizes has lost more than 4 bits
#: to cancellation; it is recomputed from ``W + s B A`` directly.
CANCELLATION = 1.0 / 16


@dataclass
class DoraConfig(LowRankConfig):
    """DoRA settings: the direction's low-rank update (see :class:`~deltakit.deltas.lora.LowRankConfig`); the
    magnitude has no setting (it starts at the host weight's row norms)."""

    delta_type: ClassVar[str] = "dora"


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the norms are accumulated in: float32, or the weight's own when it is wider (float64)."""
    return torch.promote_types(dtype, torch.float32)


def row_norms_squared(rows: torch.Tensor) -> torch.Tensor:
    """``||W_i||^2`` for each row of ``rows`` (``out x in``), in :func:`accumulation_dtype`.

    Both the magnitude's initial value and the forward pass take their norms from this function, so a fresh DoRA
    divides a number by itself: exactly the identity.
    """
    return torch.linalg.vector_norm(rows, dim=1, dtype=accumulation_dtype(rows.dtype)).square()


def _values_key(*tensors: torch.Tensor) -> tuple[Any, ...] | None:
    """What identifies the current values of ``tensors`` (object, in-place version, storage, dtype, device), or
    ``None`` when one of them keeps no version counter (an inference tensor): then nothing is cached."""
    if any(t.is_inference() for t in tensors):
        return None
    return tuple((id(t), t._version, t.data_ptr(), t.dtype, t.device) for t in tensors)


class DoraRouter(SiteRouter):
    """Per-row DoRA on one Linear / Conv1D host.

    Row ``j`` with delta ``k``: ``out + g_k * (out - b) + x A_k^T (f_k s_k B_k)^T`` with ``f_k = m_k / n_k`` and
    ``g_k = f_k - 1``, which is ``f_k (W x + s_k B_k A_k x) + b``. The stack holds ``A^T``, ``(f s B)^T`` and ``g``;
    the all-zero slot leaves a row unchanged.
    """

    def build(self) -> dict[str, torch.Tensor]:
        pairs, gains = [], []
        for site in self.sites:
            factor = site.factor(self.host)  # type: ignore[attr-defined]
            pairs.append((site.lora_A.t(), (site.lora_B * (factor * site.scaling)[:, None]).t()))  # type: ignore[attr-defined]
            gains.append(factor - 1)
        stack = stack_lora(pairs)
        stack["gain"] = torch.stack([*gains, torch.zeros_like(gains[0])])
        return stack

    def _stamp(self) -> Any:
        # The stacked factors depend on the host weight (through the norm), not only on the deltas' parameters.
        weight = self.host.weight
        return (super()._stamp(), _values_key(weight) or id(weight))

    def apply(self, stack: dict[str, torch.Tensor], slots: torch.Tensor, args: tuple[Any, ...],
              kwargs: dict[str, Any], output: torch.Tensor) -> torch.Tensor:
        x = first_input(args, kwargs)
        n = x.shape[0]
        a_t = self.gather(stack, "A_T", slots)
        b_t = self.gather(stack, "B_T", slots)
        gain = self.gather(stack, "gain", slots).to(output.dtype).unsqueeze(1)  # n x 1 x out
        projected = torch.bmm(x.reshape(n, -1, x.shape[-1]).to(a_t.dtype), a_t)
        bias = getattr(self.host, "bias", None)
        shift = None if bias is None else gain * bias.to(output.dtype)
        tracked = torch.is_grad_enabled() and (output.requires_grad or a_t.requires_grad or gain.requires_grad)
        out3 = output.view(n, -1, output.shape[-1]) if output.is_contiguous() else None
        if out3 is not None and not tracked and b_t.dtype == output.dtype:
            out3.mul_(gain + 1)
            if shift is not None:
                out3.sub_(shift)
            out3.baddbmm_(projected, b_t)
            return output
        scaled = output.reshape(n, -1, output.shape[-1]) * (gain + 1)
        if shift is not None:
            scaled = scaled - shift
        return (scaled + torch.bmm(projected, b_t).to(output.dtype)).view(output.shape)


class DoraSite(DeltaSite):
    """DoRA of one Linear or Conv1D host: magnitude ``magnitude`` (out), direction update ``lora_B @ lora_A``."""

    composition = Composition.TRANSFORMS_OUTPUT
    router = DoraRouter

    def __init__(self, host: nn.Module, r: int, scaling: float, dropout: float, **factory: Any) -> None:
        super().__init__()
        in_features, out_features = linear_dims(host)  # type: ignore[misc]
        self.scaling = scaling
        self.transposed = is_conv1d(host)  # Conv1D stores its weight as (in, out)
        self.lora_A = nn.Parameter(torch.empty(r, in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        with torch.no_grad():
            norms = row_norms_squared(self.weight_rows(host).detach()).sqrt()
        self.magnitude = nn.Parameter(norms.to(**factory))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None

    def weight_rows(self, host: nn.Module) -> torch.Tensor:
        """The host weight as an ``(out, in)`` matrix (a transposed view for Conv1D: no copy).

        A quantized weight (deltakit/quantization.py) is dequantized by its library, afresh at each call rather than
        kept: a float copy of every DoRA host would give back the memory quantizing saved, and the norm's per-row
        ``||W||^2`` is cached anyway (the weight is frozen), leaving one dequantization per training step.
        """
        weight = dequantize(host.weight, host) if is_quantized(host.weight) else host.weight
        return weight.t() if self.transposed else weight

    # ------------------------------------------------------------------ the norm
    def weight_norm(self, host: nn.Module) -> torch.Tensor:
        """``||W + s B A||`` per output feature, without gradient, in the magnitude's dtype (kept while ``W``,
        ``A`` and ``B`` are unchanged)."""
        weight, a, b = host.weight, self.lora_A, self.lora_B
        if torch.compiler.is_compiling():  # no Python-side cache inside a compiled graph
            return self._norm(host).to(self.magnitude.dtype)
        key = _values_key(weight, a, b)
        cached = self.__dict__.get("_norm_cache")
        if key is not None and cached is not None and cached[0] == key:
            return cached[1]
        with torch.inference_mode(False):  # a plain tensor, usable inside and outside inference mode
            norm = self._norm(host).to(self.magnitude.dtype)
        if key is not None:
            self.__dict__["_norm_cache"] = (key, norm)  # a plain attribute: not a buffer, not saved
        return norm

    def _weight_squares(self, host: nn.Module) -> torch.Tensor:
        """``||W_i||^2``, kept while the host weight is unchanged (a frozen backbone: computed once)."""
        weight = host.weight
        key = _values_key(weight)
        cached = self.__dict__.get("_squares_cache")
        if key is not None and cached is not None and cached[0] == key:
            return cached[1]
        squares = row_norms_squared(self.weight_rows(host).detach())
        if key is not None and not torch.compiler.is_compiling():
            self.__dict__["_squares_cache"] = (key, squares)
        return squares

    def _norm(self, host: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            rows = self.weight_rows(host).detach()
            squares = self._weight_squares(host)
            acc, s = squares.dtype, self.scaling
            a, b = self.lora_A.detach(), self.lora_B.detach()
            projected = (rows @ a.to(rows.dtype).t()).to(acc)  # W A^T: out x r, one pass over W
            a, b = a.to(acc), b.to(acc)
            cross = (b * projected).sum(1)  # <W_i, (B A)_i>
            low = ((b @ (a @ a.t())) * b).sum(1)  # ||(B A)_i||^2 from the r x r Gram matrix of A
            total = squares + (2 * s) * cross + (s * s) * low
            size = squares + (2 * abs(s)) * cross.abs() + (s * s) * low
            lost = total <= size * CANCELLATION
            if bool(lost.any()):
                idx = lost.nonzero().squeeze(1)
                direct = rows.index_select(0, idx).to(acc) + s * (b.index_select(0, idx) @ a)
                total = total.index_copy(0, idx, direct.square().sum(1))
            return total.sqrt()

    def factor(self, host: nn.Module) -> torch.Tensor:
        """``m / ||W + s B A||`` per output feature (gradient to ``m`` only)."""
        return self.magnitude / self.weight_norm(host)

    # ------------------------------------------------------------------ the hook
    def forward_hook(self, host: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: torch.Tensor) -> torch.Tensor:
        x = first_input(args, kwargs)
        factor = self.factor(host).to(output.dtype)
        if self.dropout is not None and self.training:
            return self._with_dropout(host, x, output, factor)
        out = add_low_rank(output, F.linear(x, self.lora_A), self.lora_B, self.scaling)  # W x + b + s B A x
        bias = getattr(host, "bias", None)
        tracked = torch.is_grad_enabled() and (out.requires_grad or factor.requires_grad)
        if bias is None:
            return out * factor if tracked else out.mul_(factor)
        shift = bias.to(out.dtype) * (1 - factor)  # the bias is not rescaled: f (out - b) + b = f out + (1 - f) b
        return torch.addcmul(shift, out, factor) if tracked else out.mul_(factor).add_(shift)

    def _with_dropout(self, host: nn.Module, x: torch.Tensor, output: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        """Training with dropout, as PEFT computes it: the rescaling and the update both read the dropped input,
        ``out + (f - 1) W drop(x) + f s B A drop(x)`` (one extra GEMM with ``W``)."""
        dropped = self.dropout(x)  # type: ignore[misc]
        base = F.linear(dropped, self.weight_rows(host))
        low = F.linear(F.linear(dropped, self.lora_A), self.lora_B) * self.scaling
        return output + (factor - 1) * base + factor * low

    def merge_deltas(self, host: nn.Module) -> dict[str, torch.Tensor]:
        refuse_quantized_merge(host, "DoRA")
        rows = self.weight_rows(host).detach()
        factor = (self.magnitude.detach() / self.weight_norm(host)).to(rows.dtype)
        merged = factor[:, None] * (rows + (self.lora_B.detach() @ self.lora_A.detach()).to(rows.dtype) * self.scaling)
        update = merged - rows
        return {"weight": update.t() if self.transposed else update}


class DoraModel(DeltaBase):
    """DoRA: weight-decomposed low-rank adaptation of Linear and Conv1D modules.

    Example:
        >>> delta = DoraModel(backbone_model=model, modified_modules=["query", "value"], lora_r=8, lora_alpha=16)
        >>> delta.freeze_module(exclude=["deltas", "classifier"])

    Default positions: ``["attn.q", "attn.v"]`` (query and value projections). ``merge()`` always keeps a copy of
    the touched weights (``exact_unmerge=False`` is refused: DoRA's merged weight cannot be un-done by subtraction).
    """

    delta_type: ClassVar[str] = "dora"
    config_class = DoraConfig
    default_modified_modules: ClassVar[tuple[str, ...]] = ("attn.q", "attn.v")
    constructor_fields = (
        "lora_r", "lora_alpha", "lora_dropout", "use_rslora", "modified_modules", "exclude_modules",
        "unfrozen_modules",
    )

    def build_site(self, name: str, host: nn.Module) -> DeltaSite:
        cfg: DoraConfig = self.config  # type: ignore[assignment]
        dims = linear_dims(host)
        if dims is None:
            extra = (
                " DoRA on embeddings is not implemented: put a LoraModel on the embedding and a DoraModel on the "
                "linear layers." if isinstance(host, nn.Embedding) else " Point modified_modules at the linear "
                "layers inside it."
            )
            raise UnsupportedModuleError(
                f"DoRA cannot modify {name!r} of type {type(host).__name__}: it supports nn.Linear and transformers "
                f"Conv1D.{extra}"
            )
        weight = getattr(host, "weight", None)
        if not is_quantized(weight) and (not isinstance(weight, torch.Tensor) or not weight.dtype.is_floating_point):
            raise UnsupportedModuleError(
                f"DoRA cannot modify {name!r} ({type(host).__name__}): its weight is "
                f"{getattr(weight, 'dtype', type(weight).__name__)}, and DoRA needs the weight's values in a floating "
                f"dtype for its row norms, and deltakit does not know the library that stored it (it reads torchao, "
                f"bitsandbytes and optimum-quanto weights: deltakit/quantization.py). Use LoraModel on this layer."
            )
        check_bounded_by(
            cfg, "lora_r", cfg.lora_r, max(dims), name, f"{type(host).__name__} in={dims[0]}, out={dims[1]}",
            "max(in_features, out_features)",
        )
        return DoraSite(host, cfg.lora_r, cfg.scaling, cfg.lora_dropout, **factory_kwargs(host))

    def merge(self, exact_unmerge: bool = True, *, safe: bool = True) -> DoraModel:
        """Write ``W' = m (W + s B A) / ||W + s B A||`` into each host weight (see :meth:`DeltaBase.merge`).

        Raises:
            DeltaStateError: ``exact_unmerge=False``: ``W'`` is not ``W`` plus an update computed from the delta
                alone, so subtracting cannot give ``W`` back; the default keeps a copy that :meth:`unmerge`
                restores bit for bit. Also everything :meth:`DeltaBase.merge` refuses. Nothing is changed then.
        """
        if exact_unmerge is False:
            raise DeltaStateError(
                f"Cannot merge {self._describe()} with exact_unmerge=False: DoRA's merged weight "
                f"m * (W + s B A) / ||W + s B A|| depends on W itself, so unmerge could not recover W by subtracting "
                f"an update. Merge with exact_unmerge=True (the default: a copy of the touched weights is kept and "
                f"restored bit for bit)."
            )
        super().merge(exact_unmerge, safe=safe)
        return self
