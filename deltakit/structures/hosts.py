"""What kind of host a module is: linear (``nn.Linear`` or transformers' ``Conv1D``), a norm, and its sizes."""

from __future__ import annotations

from torch import nn

from ..site import DeltaSite


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' ``Conv1D`` (GPT-2's linear layer with a transposed weight)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is a dependency, but keep plain-torch use possible
        return False
    return isinstance(module, Conv1D)


def linear_dims(module: nn.Module) -> tuple[int, int] | None:
    """``(in_features, out_features)`` of an ``nn.Linear`` or a transformers ``Conv1D``, else ``None``."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if is_conv1d(module):
        return int(module.weight.shape[0]), int(module.nf)
    return None


def norm_shape(module: nn.Module) -> tuple[int, ...] | None:
    """The normalized shape of a LayerNorm or an RMSNorm-like module (T5LayerNorm, LlamaRMSNorm, ...), else None.

    RMSNorm-like means: a class whose name ends with ``Norm``, with a 1-d weight parameter and no child modules
    besides deltakit's own per-site modules (a :class:`~deltakit.hooks.DeltaSite` that an attached delta registered
    on the norm does not change what the norm is, so a second delta can still modify it).
    """
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        return tuple(module.normalized_shape)
    weight = getattr(module, "weight", None)
    if (
        type(module).__name__.endswith("Norm")
        and isinstance(weight, nn.Parameter)
        and weight.dim() == 1
        and all(isinstance(child, DeltaSite) for child in module.children())
    ):
        return tuple(weight.shape)
    return None
