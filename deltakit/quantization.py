"""Weight-only quantized backbones (QLoRA-style training): recognising a quantized weight and reading its values.

Deltas train on top of a frozen quantized backbone without any code of their own for it: a quantized linear layer
still is an ``nn.Linear`` (its class, or a subclass of it) with its ``in_features`` / ``out_features``, and its
forward pass computes ``x W^T + b`` from the quantized storage, so the additive and output-transforming deltas
(LoRA, IA3, VeRA, the adapters) hook it like any other. Three libraries are recognised:

* **torchao** (``quantize_(model, Int8WeightOnlyConfig())``, ``IntxWeightOnlyConfig(weight_dtype=torch.int4)``):
  the module keeps its class; its weight becomes a tensor subclass (``Int8Tensor``, ``IntxUnpackedToInt8Tensor``)
  that reports the logical shape and floating dtype and holds integer storage tensors inside.
* **bitsandbytes** (``Linear8bitLt``, ``Linear4bit``): ``nn.Linear`` subclasses whose weight is an ``Int8Params``
  (int8, per-row scales in ``SCB``) or a packed ``Params4bit`` (uint8, shape ``(n, 1)``; the logical shape is in
  its ``quant_state``).
* **optimum-quanto** (``QLinear``, an ``nn.Linear`` subclass): its weight is a ``QTensor`` subclass.

Two things a delta cannot do with a quantized weight, and how deltakit handles them:

* read its values as a float matrix (DoRA's row norms): :func:`dequantize` asks the library for them;
* write to it (merging): adding a float update to integer storage is not defined (and a library that re-quantized
  the sum would round away most of a small update), so :func:`refuse_quantized_merge` raises a clear error. To
  ship a merged model, merge into the float backbone and quantize the result (docs/quantization.md).

None of the libraries is imported here: a library's tensors can only exist once it has been imported, so
``sys.modules`` tells which ones to check, and a process that never imported one pays nothing.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from .errors import DeltaStateError

__all__ = [
    "dequantize",
    "is_quantized",
    "logical_shape",
    "quantization_library",
    "quantized_storage",
    "refuse_quantized_merge",
]


def _torchao_base() -> type | None:
    module = sys.modules.get("torchao.utils")
    return getattr(module, "TorchAOBaseTensor", None)


def _bnb_classes() -> tuple[type, ...]:
    module = sys.modules.get("bitsandbytes.nn")
    if module is None:
        return ()
    return tuple(c for c in (getattr(module, "Int8Params", None), getattr(module, "Params4bit", None)) if c)


def _quanto_base() -> type | None:
    module = sys.modules.get("optimum.quanto")
    return getattr(module, "QTensor", None)


def quantization_library(weight: Any) -> str | None:
    """Which library quantized ``weight``: ``"torchao"``, ``"bitsandbytes"``, ``"optimum-quanto"``, ``"torch"``
    (PyTorch's own quantized tensors), or ``None`` for an ordinary tensor (or anything that is not a tensor)."""
    if not isinstance(weight, torch.Tensor):
        return None
    torchao = _torchao_base()
    if torchao is not None and isinstance(weight, torchao):
        return "torchao"
    bnb = _bnb_classes()
    if bnb and isinstance(weight, bnb):
        return "bitsandbytes"
    quanto = _quanto_base()
    if quanto is not None and isinstance(weight, quanto):
        return "optimum-quanto"
    if weight.is_quantized:
        return "torch"
    return None


def is_quantized(weight: Any) -> bool:
    """Whether ``weight`` is a quantized tensor of one of the libraries of :func:`quantization_library`."""
    return quantization_library(weight) is not None


def logical_shape(weight: torch.Tensor) -> torch.Size:
    """The shape ``weight`` stands for: a bitsandbytes 4-bit weight is stored packed (``(n, 1)`` bytes), its
    ``quant_state`` knows the matrix's shape; every other tensor reports it itself."""
    state = getattr(weight, "quant_state", None)
    if quantization_library(weight) == "bitsandbytes" and state is not None:
        return torch.Size(state.shape)
    return weight.shape


def dequantize(weight: torch.Tensor, owner: nn.Module | None = None) -> torch.Tensor:
    """The values of a quantized ``weight`` as an ordinary floating tensor of its logical shape, computed by the
    library that quantized it (no gradient; a new tensor each call). An ordinary tensor is returned detached.

    Args:
        weight: The tensor.
        owner: The module holding it: a bitsandbytes 8-bit layer moves its weight's row scales into its own
            ``state`` at its first forward pass, after which only the module has them.

    Raises:
        DeltaStateError: the weight's library offers no way to read its values (named in the message).
    """
    library = quantization_library(weight)
    with torch.no_grad():
        if library is None:
            return weight.detach()
        if library == "bitsandbytes":
            return _dequantize_bnb(weight, owner)
        if library == "torch":
            return weight.detach().dequantize()
        values = weight.detach().dequantize()
        # torchao and quanto return a plain tensor already; a subclass left over would defeat the float maths
        return values.as_subclass(torch.Tensor) if type(values) is not torch.Tensor else values


def _dequantize_bnb(weight: torch.Tensor, owner: nn.Module | None) -> torch.Tensor:
    import bitsandbytes.functional as bnbf  # imported already: the weight is one of its tensors

    state = getattr(weight, "quant_state", None)
    if state is not None:  # Params4bit
        return bnbf.dequantize_4bit(weight.data, state)
    scales = getattr(weight, "SCB", None)
    if scales is None:
        scales = getattr(getattr(owner, "state", None), "SCB", None)
    if scales is None:
        raise DeltaStateError(
            f"Cannot read the values of a bitsandbytes {type(weight).__name__} of shape {tuple(weight.shape)}: it has "
            f"no per-row scales (SCB, on it or on the layer's state), so it has not been quantized yet. Move the "
            f"model to its device (model.to('cpu') or .to('cuda')): bitsandbytes quantizes an 8-bit layer's weight "
            f"at that moment."
        )
    return bnbf.int8_vectorwise_dequant(weight.data, scales)


def quantized_storage(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """The tensors that hold a quantized ``weight``'s data (integer values, scales, zero points), by name; for an
    ordinary tensor ``{"data": weight}``. Comparing them with ``torch.equal`` tells whether a quantized backbone is
    bit for bit what it was."""
    library = quantization_library(weight)
    if library in ("torchao", "optimum-quanto"):
        names, _ = weight.__tensor_flatten__()
        return {name: getattr(weight, name) for name in names}
    if library == "bitsandbytes":
        out = {"data": weight.data}
        state = getattr(weight, "quant_state", None)
        if state is not None:
            out["absmax"] = state.absmax
            if getattr(state, "state2", None) is not None:  # double quantization: the scales are quantized too
                out["nested_absmax"] = state.state2.absmax
        elif getattr(weight, "SCB", None) is not None:
            out["SCB"] = weight.SCB
        return out
    if library == "torch":  # the integers, and the values they stand for (which fold in scales and zero points)
        return {"int_repr": weight.int_repr(), "values": weight.dequantize()}
    return {"data": weight}


def refuse_quantized_merge(host: nn.Module, method: str, param: str = "weight") -> None:
    """Raise when ``host``'s ``param`` is quantized: a delta cannot be folded into it.

    Called by a method's ``merge_deltas`` before it computes anything, so a refused merge changes nothing.

    Raises:
        DeltaStateError: naming the library, the host's class and what to do instead.
    """
    weight = getattr(host, param, None)
    library = quantization_library(weight)
    if library is None:
        return
    raise DeltaStateError(
        f"Cannot merge {method} into this {type(host).__name__}: its {param} is quantized by {library} "
        f"({type(weight).__name__}), and a float update cannot be added to its integer storage (re-quantizing the "
        f"sum would round most of a small update away). Keep the delta attached (it trains and serves on the "
        f"quantized model as it is), or merge into a float copy of the backbone: load the float model, load this "
        f"delta into it, merge(), then quantize the result (see docs/quantization.md)."
    )
