"""(IA)^3: Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning" (arXiv:2205.05638).

``k <- l_k * k``, ``v <- l_v * v`` and ``h_ff <- W_2 (l_ff * x) + b_2``: learned vectors, ones at init (so a fresh
delta is the identity), rescale the *output* of the key and value projections and the *input* of the feed-forward
output projection. Default positions: roles ``attn.k``, ``attn.v`` (scaled outputs) and ``ff.w2`` (scaled input) on
every architecture deltakit maps. On a projection fusing queries, keys and values (GPT-2's ``c_attn``) only the key
and value parts of the output are scaled (``fused_qkv="kv"``, the paper's method; PEFT scales the whole output,
``fused_qkv="all"``). Hosts: ``nn.Linear`` and transformers' ``Conv1D``. Merging folds the vector into the weight
(``W <- diag(l) W``, ``b <- l b`` for an output site; ``W <- W diag(l)`` for an input site).

How the two kinds of site compose (deltakit/site.py):

* an output site computes ``l * out``: it reads the host output, so it declares ``TRANSFORMS_OUTPUT``;
* an input site rewrites the host's input with a forward pre-hook (``x <- l * x``), so every other delta on the
  same host reads the scaled input too: it declares ``REWRITES_CALL`` and is mergeable (``W (l x) = (W diag(l))
  x``). The core merges such a site only when no other delta is on its host, and attaches no delta on a host where
  one is merged (either would read the unscaled input).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..addressing import find_modules
from ..base import DeltaBase
from ..config import DeltaConfig, check_choice, check_str_list
from ..errors import DeltaConfigError, DeltaStateError, ModuleMatchError, UnsupportedModuleError
from ..quantization import refuse_quantized_merge
from ..routing import SiteRouter
from ..site import Composition, DeltaSite, factory_kwargs
from ..structures import detect_model_type, find_config, is_conv1d, linear_dims
from .common import first_input

__all__ = [
    "IA3Config", "IA3InputRouter", "IA3InputSite", "IA3Model", "IA3Router", "IA3Site", "scale_backward", "scale_features",
]

FUSED_QKV_CHOICES = ("kv", "all")


@dataclass
class IA3Config(DeltaConfig):
    """(IA)^3 settings.

    Args:
        feedforward_modules: Patterns (same forms as ``modified_modules``) of the modified modules whose *input* is
            scaled, the feed-forward output projections; every other modified module has its output scaled.
            ``None``: the modules of role ``ff.w2``. Each pattern must match at least one modified module.
        fused_qkv: On a projection that fuses queries, keys and values (GPT-2's ``c_attn``): ``"kv"`` scales only
            the key and value parts of its output (the paper), ``"all"`` the whole output (what PEFT does).
    """

    delta_type: ClassVar[str] = "ia3"

    feedforward_modules: list[str] | None = None
    fused_qkv: str = "kv"

    def validate(self) -> None:
        self.feedforward_modules = check_str_list(self, "feedforward_modules")
        check_choice(self, "fused_qkv", FUSED_QKV_CHOICES)


# ------------------------------------------------------------------------------------------------ scaling
#: Elements per block of the backward pass: one block of ``grad`` is read once for both of its uses (``x``'s
#: gradient and ``l``'s) while it is in cache, and no activation-sized temporary is allocated. Measured on the
#: development machine (one thread, 8 rotating tensors so that each starts out of cache): on a 2048 x 1536 float32
#: activation 3.7 ms against 4.0 ms for ``grad * l`` then a sum over blocks of 128 rows, and 2.2 ms against 2.5 ms
#: on 1024 x 2048; equal on narrower activations. (``(grad * x).sum(0)`` allocates a third activation: 2.7 ms.)
BLOCK_ELEMENTS = 1 << 16


def block_rows(width: int) -> int:
    """Rows per block of the backward pass for features of ``width`` (see :data:`BLOCK_ELEMENTS`)."""
    return max(1, BLOCK_ELEMENTS // max(width, 1))


def scale_backward(grad: torch.Tensor, x: torch.Tensor | None, scale: torch.Tensor,
                    need_x: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``grad * scale`` (if ``need_x``) and ``(grad * x)`` summed over every dimension but the last (if ``x`` is
    given), block by block in one pass over ``grad``.

    The sum runs in float32 at least: in a half-precision dtype, partial sums over many rows would lose a bit at
    each addition (a 5% error on 65k rows in bfloat16); only the result is rounded to ``scale``'s dtype.
    """
    width = grad.shape[-1]
    g2 = grad.reshape(-1, width)
    grad_x = torch.empty_like(g2) if need_x else None
    if x is None:
        return (torch.mul(g2, scale, out=grad_x).view(grad.shape) if need_x else None), None
    x2 = x.reshape(-1, width)
    rows = block_rows(width)
    acc = torch.zeros(min(rows, g2.shape[0]), width, device=g2.device,
                      dtype=torch.promote_types(torch.promote_types(g2.dtype, x2.dtype), torch.float32))
    for start in range(0, g2.shape[0], rows):
        block = g2[start : start + rows]
        if grad_x is not None:
            torch.mul(block, scale, out=grad_x[start : start + rows])
        acc[: block.shape[0]].addcmul_(block, x2[start : start + rows])
    return (None if grad_x is None else grad_x.view(grad.shape)), acc.sum(0).to(scale.dtype)


class _ScaleFeatures(torch.autograd.Function):
    """``x * scale`` over the last dimension, with a one-pass blocked backward (:func:`scale_backward`)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, scale)
        return x * scale

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        x, scale = ctx.saved_tensors
        return scale_backward(grad, x if ctx.needs_input_grad[1] else None, scale, ctx.needs_input_grad[0])


def scale_features(x: torch.Tensor, scale: torch.Tensor, *, in_place: bool) -> torch.Tensor:
    """``x * scale`` (``scale`` over the last dimension, same dtype as ``x``).

    With autograd, ``scale``'s gradient needs the unscaled ``x``, so the result is a new tensor (through
    :class:`_ScaleFeatures`). Without it, ``in_place`` (for an ``x`` that nobody else reads) scales ``x`` itself.
    """
    if torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad):
        if torch.compiler.is_compiling():  # the compiler fuses the plain form better than it traces the Function
            return x * scale
        return _ScaleFeatures.apply(x, scale)
    return x.mul_(scale) if in_place else x * scale


# ------------------------------------------------------------------------------------------------ routing
def _stack_gains(sites: list[Any]) -> dict[str, torch.Tensor]:
    """``l - 1`` of every site (full width), plus the all-zero slot: a zero gain leaves a row unchanged."""
    gains = [s.full_scale() - 1 for s in sites]
    return {"gain": torch.stack([*gains, torch.zeros_like(gains[0])])}


def _rows(gain: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``1 + gain`` (``n x width``) shaped to broadcast over the rows of ``like`` (``n x ... x width``)."""
    return (1 + gain).to(like.dtype).view(gain.shape[0], *([1] * (like.dim() - 2)), gain.shape[1])


class IA3Router(SiteRouter):
    """Per-row (IA)^3 output scaling on one host: row ``j`` is multiplied by ``l`` of its delta."""

    def build(self) -> dict[str, torch.Tensor]:
        return _stack_gains(self.sites)

    def apply(self, stack: dict[str, torch.Tensor], slots: torch.Tensor, args: tuple[Any, ...],
              kwargs: dict[str, Any], output: torch.Tensor) -> torch.Tensor:
        scale = _rows(self.gather(stack, "gain", slots), output)
        tracked = torch.is_grad_enabled() and (output.requires_grad or scale.requires_grad)
        return output * scale if tracked else output.mul_(scale)


class IA3InputRouter(SiteRouter):
    """Per-row (IA)^3 input scaling on one host.

    The work happens before the host runs: the router declares the host itself as its :attr:`source`, so its
    :meth:`capture_input` pre-hook (installed by the serving group) rewrites the input row by row; the routed forward
    hook then leaves the output as it is.
    """

    def __init__(self, host: nn.Module, *args: Any, **kwargs: Any) -> None:
        super().__init__(host, *args, **kwargs)
        self.source = host

    def build(self) -> dict[str, torch.Tensor]:
        return _stack_gains(self.sites)

    def apply(self, stack: dict[str, torch.Tensor], slots: torch.Tensor, args: tuple[Any, ...],
              kwargs: dict[str, Any], output: Any) -> Any:
        return output  # the input was scaled in capture_input()

    def forward_hook(self, host: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        return output

    def capture_input(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
        state = self._state()
        if state is None:
            return args, kwargs
        self._check_mode(module)
        self.calls["gather"] += 1
        x = first_input(args, kwargs)
        stack = self.stack()
        slots = self.rows(x.shape[0], stack["gain"].device)
        return _with_first_input(args, kwargs, x * _rows(self.gather(stack, "gain", slots), x))


def _with_first_input(args: tuple[Any, ...], kwargs: dict[str, Any], x: torch.Tensor) -> tuple[Any, ...]:
    """``(args, kwargs)`` with the first input (positional, or failing that the first keyword) replaced by ``x``."""
    if args:
        return (x, *args[1:]), kwargs
    key = next(iter(kwargs))
    return args, {**kwargs, key: x}


# ------------------------------------------------------------------------------------------------ sites
class IA3Site(DeltaSite):
    """Scales the output of one Linear / Conv1D host, ``out <- l * out``; on a fused q/k/v projection only the
    output features listed in ``positions`` (the key and value parts) have an entry of ``l``."""

    composition = Composition.TRANSFORMS_OUTPUT
    router = IA3Router

    def __init__(self, width: int, positions: torch.Tensor | None, transposed: bool, **factory: Any) -> None:
        super().__init__()
        self.width = width
        self.transposed = transposed  # Conv1D stores its weight as (in, out)
        self.scale = nn.Parameter(torch.ones(width if positions is None else positions.numel(), **factory))
        self.positions: torch.Tensor | None
        # Not saved: rebuilt from the host and the config, like the site itself.
        self.register_buffer("positions", positions, persistent=False)

    def full_scale(self) -> torch.Tensor:
        """``l`` over the whole output (ones where this site scales nothing)."""
        if self.positions is None:
            return self.scale
        return self.scale.new_ones(self.width).index_copy(0, self.positions, self.scale)

    def forward_hook(self, host: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: torch.Tensor) -> torch.Tensor:
        # The output is fresh and nobody else holds it (the dispatcher's promise), and a Linear's backward does not
        # need it: without autograd it is scaled in place.
        return scale_features(output, self.full_scale().to(output.dtype), in_place=True)

    def merge_deltas(self, host: nn.Module) -> dict[str, torch.Tensor]:
        refuse_quantized_merge(host, "(IA)^3")
        # l * (W x + b) = (W + (l - 1) W) x + (b + (l - 1) b), W's rows being the output features
        gain = (self.full_scale().detach() - 1).to(host.weight.dtype)
        weight = host.weight.detach()
        out = {"weight": weight * gain if self.transposed else gain[:, None] * weight}
        if getattr(host, "bias", None) is not None:
            out["bias"] = host.bias.detach() * gain
        return out


class IA3InputSite(DeltaSite):
    """Scales the input of one Linear / Conv1D host (the feed-forward output projection), ``x <- l * x``.

    A mergeable call rewrite: the core merges it only alone on its host, and attaches nothing on a host where it is
    merged (deltakit/site.py).
    """

    composition = Composition.REWRITES_CALL
    router = IA3InputRouter

    def __init__(self, width: int, transposed: bool, **factory: Any) -> None:
        super().__init__()
        self.transposed = transposed
        self.scale = nn.Parameter(torch.ones(width, **factory))

    def full_scale(self) -> torch.Tensor:
        """``l`` over the whole input."""
        return self.scale

    def forward_pre_hook(self, host: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
        x = first_input(args, kwargs)
        # A new tensor: the input is another module's output, which its owner (or a residual) may still read.
        return _with_first_input(args, kwargs, scale_features(x, self.scale.to(x.dtype), in_place=False))

    def merge_deltas(self, host: nn.Module) -> dict[str, torch.Tensor]:
        refuse_quantized_merge(host, "(IA)^3")
        # W (l * x) = (W + W diag(l - 1)) x; W's columns are the input features (Conv1D: its rows)
        gain = (self.scale.detach() - 1).to(host.weight.dtype)
        weight = host.weight.detach()
        return {"weight": gain[:, None] * weight if self.transposed else weight * gain}


# ------------------------------------------------------------------------------------------------ fused q/k/v
def _fused_kv_positions(model_type: str | None, config: Any, name: str, host: nn.Module) -> torch.Tensor:
    """Indices of the key and value features in the output of a fused q/k/v projection.

    Raises:
        UnsupportedModuleError: the layout of this architecture's fused projection is unknown, or the sizes do not
            fit it.
    """
    out = linear_dims(host)[1]  # type: ignore[index]
    heads = getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "hidden_size", None)
    head_dim = getattr(config, "head_dim", None) or (hidden // heads if heads and hidden else None)
    positions: torch.Tensor | None = None
    if model_type == "gpt2" and out % 3 == 0:  # [q | k | v], equal parts
        positions = torch.arange(out // 3, out)
    elif model_type == "phi3" and heads and head_dim:  # [q | k | v], keys and values of the kv heads
        kv = getattr(config, "num_key_value_heads", None) or heads
        if out == (heads + 2 * kv) * head_dim:
            positions = torch.arange(heads * head_dim, out)
    elif model_type == "gpt_neox" and heads and head_dim and out == 3 * heads * head_dim:  # per head [q | k | v]
        positions = torch.arange(out).view(heads, 3, head_dim)[:, 1:, :].reshape(-1)
    if positions is None:
        raise UnsupportedModuleError(
            f"(IA)^3 scales keys and values, and {name!r} ({type(host).__name__}, {out} outputs) fuses queries, keys "
            f"and values in a layout deltakit does not know for model_type {model_type!r}. Pass fused_qkv='all' to "
            f"scale its whole output (as PEFT does), or point modified_modules at separate key/value projections."
        )
    return positions


def _role_names(model: nn.Module, role: str) -> set[str]:
    """Names of the modules of ``role`` (empty when the architecture has none or roles cannot be told)."""
    try:
        return {n for n, _ in find_modules(model, [role], skip_types=(DeltaSite,), allow_unmatched_roles=True)}
    except ModuleMatchError:
        return set()


# ------------------------------------------------------------------------------------------------ the method
class IA3Model(DeltaBase):
    """(IA)^3: learned vectors rescaling keys, values and the feed-forward input.

    Example:
        >>> delta = IA3Model(backbone_model=model)  # keys, values and FFN input of every layer
        >>> delta.freeze_module(exclude=["deltas", "classifier"])

    Default positions: ``["attn.k", "attn.v", "ff.w2"]``; the ``ff.w2`` modules have their input scaled (see
    ``feedforward_modules``). ``merge()`` keeps a copy of the touched weights (``exact_unmerge=False`` is refused:
    ``diag(l) W`` cannot be un-done by subtracting an update).
    """

    delta_type: ClassVar[str] = "ia3"
    config_class = IA3Config
    default_modified_modules: ClassVar[tuple[str, ...]] = ("attn.k", "attn.v", "ff.w2")
    constructor_fields = ("modified_modules", "feedforward_modules", "fused_qkv", "exclude_modules", "unfrozen_modules")

    def plan(self, matches: list[tuple[str, nn.Module]]) -> None:
        cfg: IA3Config = self.config  # type: ignore[assignment]
        for name, host in matches:
            if linear_dims(host) is None:
                raise UnsupportedModuleError(
                    f"(IA)^3 cannot modify {name!r} of type {type(host).__name__}: it scales the output or input of "
                    f"nn.Linear and transformers Conv1D modules. Point modified_modules at those."
                )
        names = [n for n, _ in matches]
        self._feedforward = self._feedforward_sites(names)
        self._positions: dict[str, torch.Tensor] = {}
        if cfg.fused_qkv == "kv":
            fused = _role_names(self.backbone_model, "attn.q") & _role_names(self.backbone_model, "attn.k")
            fused &= _role_names(self.backbone_model, "attn.v")
            model_type, config = detect_model_type(self.backbone_model), find_config(self.backbone_model)
            for name, host in matches:
                if name in fused and name not in self._feedforward:
                    self._positions[name] = _fused_kv_positions(model_type, config, name, host)

    def _feedforward_sites(self, names: list[str]) -> set[str]:
        """The sites whose input is scaled: matched by ``feedforward_modules`` (default: role ``ff.w2``)."""
        patterns = self.config.feedforward_modules  # type: ignore[attr-defined]
        if patterns is None:
            return _role_names(self.backbone_model, "ff.w2") & set(names)
        chosen: set[str] = set()
        for pattern in patterns:
            try:
                found = {n for n, _ in find_modules(self.backbone_model, [pattern], what="feedforward_modules",
                                                    skip_types=(DeltaSite,))}
            except ModuleMatchError:
                found = set()
            mine = found & set(names)
            if not mine:
                raise DeltaConfigError(
                    f"IA3Config.feedforward_modules pattern {pattern!r} matches none of the modified modules "
                    f"({len(names)} sites, e.g. {names[:3]}): it names the modules among them whose input is scaled. "
                    f"Add the module to modified_modules, or fix the pattern."
                )
            chosen |= mine
        return chosen

    def build_site(self, name: str, host: nn.Module) -> DeltaSite:
        in_features, out_features = linear_dims(host)  # type: ignore[misc]  # checked in plan()
        factory = factory_kwargs(host)
        if name in self._feedforward:
            return IA3InputSite(in_features, is_conv1d(host), **factory)
        positions = self._positions.get(name)
        device = factory.get("device")
        return IA3Site(out_features, None if positions is None else positions.to(device), is_conv1d(host), **factory)

    def merge(self, exact_unmerge: bool = True, *, safe: bool = True) -> IA3Model:
        """Fold each vector into its host's weight (see :meth:`DeltaBase.merge`).

        Raises:
            DeltaStateError: ``exact_unmerge=False``: the merged weight ``diag(l) W`` is a product, so unmerging by
                subtracting an update computed again from it would not give ``W`` back; the default keeps a copy
                that :meth:`unmerge` restores bit for bit. Also everything :meth:`DeltaBase.merge` refuses, and a
                feed-forward site whose host input another attached delta reads. Nothing is changed then.
        """
        if exact_unmerge is False:
            raise DeltaStateError(
                f"Cannot merge {self._describe()} with exact_unmerge=False: (IA)^3's merged weight diag(l) W depends "
                f"on W itself, so unmerge could not recover W by subtracting an update. Merge with exact_unmerge=True "
                f"(the default: a copy of the touched weights is kept and restored bit for bit)."
            )
        super().merge(exact_unmerge, safe=safe)
        return self
