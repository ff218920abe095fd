"""Activation checkpointing with a frozen backbone: keep gradients flowing into the deltas.

With *reentrant* activation checkpointing (``torch.utils.checkpoint(..., use_reentrant=True)``), a checkpointed
block whose inputs do not require a gradient produces an output that does not require one either, so the delta
parameters inside it silently get no gradient (or ``backward()`` fails when the head is frozen too). With a frozen
embedding layer this is exactly what happens to the first block's input.

transformers' ``gradient_checkpointing_enable()`` works around it only for models whose main input is
``input_ids``. deltakit closes the gap for every transformers model (vision models whose input is
``pixel_values``, models where the user called ``disable_input_require_grads()``): while a delta is attached, a
forward hook on each input-embedding module marks its output as requiring a gradient (and a forward pre-hook on
the model does the same for a user's ``inputs_embeds``, on a new tensor object), *only* when the model is in
training mode, autograd is on, activation checkpointing is enabled on some block, and the output does not already
require a gradient. Otherwise it does nothing, so plain training and inference pay nothing. The hook's handle is
kept by the delta and removed on ``detach()``.

Non-reentrant checkpointing (transformers' default) needs none of this; both modes are tested.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


def _transformers_models(backbone: nn.Module) -> list[nn.Module]:
    return [m for m in backbone.modules() if hasattr(m, "get_input_embeddings") and hasattr(m, "supports_gradient_checkpointing")]


def _input_embeddings(models: list[nn.Module]) -> list[nn.Module]:
    """The input-embedding modules of the given transformers models (each once)."""
    found: list[nn.Module] = []
    for module in models:
        try:
            embeddings = module.get_input_embeddings()
        except (NotImplementedError, AttributeError):
            continue
        if isinstance(embeddings, nn.Module) and all(embeddings is not f for f in found):
            found.append(embeddings)
    return found


class _RequireGradWhenCheckpointing:
    """Make the embedding output (forward hook) or a given ``inputs_embeds`` (forward pre-hook on the model)
    require a gradient while activation checkpointing is on."""

    def __init__(self, blocks: list[nn.Module]) -> None:
        self.blocks = blocks

    def active(self, module: nn.Module, tensor: Any) -> bool:
        return (
            module.training
            and torch.is_grad_enabled()
            and isinstance(tensor, torch.Tensor)
            and tensor.is_floating_point()
            and not tensor.requires_grad
            and any(getattr(block, "gradient_checkpointing", False) for block in self.blocks)
        )

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self.active(module, output):
            output.requires_grad_(True)  # a fresh tensor computed from frozen weights

    def pre_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> Any:
        if kwargs is None:
            # torch calls a hook without kwargs when its handle was removed after the call looked it up (a forward
            # that waited while DeltaGroup.switch() detached this delta): it no longer applies.
            return None
        embeds = kwargs.get("inputs_embeds")
        if self.active(module, embeds):
            # The caller's tensor: hand the model a new tensor object instead of changing theirs.
            return args, {**kwargs, "inputs_embeds": embeds.detach().requires_grad_(True)}
        return None


class CheckpointingInputHooks:
    """The hooks described in the module docstring, for one backbone; built once per delta.

    Finding the transformers models and blocks walks the module tree, so it happens once, at construction;
    :meth:`install` (on every attach) only looks the embedding modules up again (``resize_token_embeddings`` may
    have replaced them) and registers the hooks. Models that are not transformers models (no
    ``get_input_embeddings``) get no hook: with reentrant checkpointing in your own code, pass inputs that require
    a gradient, or use ``use_reentrant=False``.

    Args:
        backbone: The model a delta is attached to.
    """

    def __init__(self, backbone: nn.Module) -> None:
        self.models = _transformers_models(backbone)
        # The modules whose ``gradient_checkpointing`` flag transformers toggles (the repeated blocks, encoders).
        blocks = [m for m in backbone.modules() if isinstance(getattr(m, "gradient_checkpointing", None), bool)]
        self.hook = _RequireGradWhenCheckpointing(blocks) if self.models and blocks else None

    def install(self) -> list[RemovableHandle]:
        """Register the hooks; return their handles (empty when there is nothing to hook)."""
        if self.hook is None:
            return []
        handles = [module.register_forward_hook(self.hook) for module in _input_embeddings(self.models)]
        # Only the outermost model sees a user's ``inputs_embeds``; inner models get it from there.
        handles.append(self.models[0].register_forward_pre_hook(self.hook.pre_hook, with_kwargs=True))
        return handles
