"""Task heads a delta carries: its own trainable copies of whole backbone modules (PEFT's ``modules_to_save``).

A delta created with ``modules_to_save=["classifier"]`` owns a copy of ``classifier``. While the delta is attached,
the original module's output is replaced by the copy's (one forward hook on the original, in the host's deltakit
dispatcher, like any site); detached, nothing of it is left and the original is back, bit for bit (it was never
written). The copies live in one :class:`DeltaHeads` module registered on the backbone root under
``<delta name>_heads`` while attached, mirroring the heads' paths: ``lora_heads.classifier.weight``.

Why a hook and a root child rather than swapping the module in its parent:

* the backbone's own modules, parameter names and ``state_dict`` keys never change (the copies add keys under their
  own prefix, as every attached delta does), and whatever else holds the original module (tied weights,
  ``get_output_embeddings()``, a user's hooks) keeps holding the module the model runs;
* the copies are in the module tree while attached, so ``model.to()``, ``.half()``, ``.train()``, DDP and
  ``model.parameters()`` see them with no extra code, and a detached copy follows its original's device, dtype and
  training flag on the next attach;
* a head that iterates its children (an ``nn.Sequential``) is not handed an extra child.

The price: the original head still runs and its output is discarded. For a classifier, a ``score`` layer or a
pooler that is a few thousand multiply-adds; for an ``lm_head`` it doubles that layer's cost.

In a checkpoint the copies' tensors are stored as ``<delta_type>_heads.<head module>.<param>`` (see
:func:`head_tensor_key`) and their module names are listed under ``"heads"`` in ``delta_config.json``.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import torch
from torch import nn

from .errors import DeltaError
from .site import DeltaSite, is_inside

__all__ = ["DeltaHeads", "check_heads", "copy_head", "head_shapes", "head_tensor_key", "resize_heads"]


def head_tensor_key(delta_type: str, name: str = "") -> str:
    """The checkpoint key of a head copy's tensor, ``<delta_type>_heads.<head module>.<param>`` (``name`` is
    ``<head module>.<param>``); the prefix alone when ``name`` is empty."""
    return f"{delta_type}_heads.{name}"


def copy_head(module: nn.Module) -> nn.Module:
    """A trainable copy of ``module`` without what deltas or users attached to it.

    Delta modules attached inside it (another delta's LoRA on ``classifier``) and hooks (deltakit's dispatchers, a
    user's) belong to the original and are left out: the copy computes what the bare module computes.
    """
    memo: dict[int, Any] = {}
    for sub in module.modules():
        for child in sub._modules.values():
            if isinstance(child, DeltaSite):
                memo[id(child)] = None
        for attr, value in sub.__dict__.items():
            if attr.startswith("_") and "hook" in attr and isinstance(value, dict):
                memo[id(value)] = type(value)()
    duplicate = copy.deepcopy(module, memo)
    for name, sub in list(duplicate.named_modules()):
        original = module.get_submodule(name)
        for child_name in [n for n, c in sub._modules.items() if c is None]:
            if isinstance(original._modules.get(child_name), DeltaSite):
                del sub._modules[child_name]
    for param in duplicate.parameters():
        param.requires_grad_(True)
    return duplicate


def check_heads(
    heads: list[tuple[str, nn.Module]], sites: list[str], owner: str
) -> None:
    """Refuse heads that overlap each other or the delta's own sites (a site inside a head would act on the
    original, which the copy replaces; a head inside a site would be replaced by the site's host computation).

    Args:
        heads: ``(full name, module)`` of each head, in model order.
        sites: The delta's site names.
        owner: The delta, for the message.
    """
    names = [n for n, _ in heads]
    if len(set(names)) != len(names):
        raise DeltaError(f"{owner}: modules_to_save lists the module {next(n for n in names if names.count(n) > 1)!r} "
                         f"twice.")
    for name in names:
        inner = [other for other in names if other != name and is_inside(other, {name})]
        if inner:
            raise DeltaError(
                f"{owner}: modules_to_save holds {name!r} and {inner[0]!r}, which lies inside it. Keep only the outer "
                f"module (its copy includes the inner one)."
            )
        clash = [s for s in sites if is_inside(s, {name}) or is_inside(name, {s})]
        if clash:
            raise DeltaError(
                f"{owner}: {name!r} is in modules_to_save and the delta also modifies {clash[0]!r}, which "
                f"{'lies inside' if clash[0] != name else 'is'} it. A head copy is trained whole, so a delta on the "
                f"same module would act on the unused original. Drop it from modified_modules (exclude_modules="
                f"[{name!r}]) or from modules_to_save."
            )


class DeltaHeads(DeltaSite):
    """The head copies of one delta, at their modules' paths (``heads.classifier``, ``heads.bert.pooler``).

    Registered on the backbone root while the delta is attached; applies nothing itself (the hooks on the original
    modules call the copies).
    """

    composition = None

    def __init__(self, heads: list[tuple[str, nn.Module]]) -> None:
        super().__init__()
        self.names: list[str] = []
        for name, original in heads:
            self.add(name, copy_head(original))

    def add(self, name: str, module: nn.Module) -> None:
        """Put ``module`` at the dotted path ``name`` (intermediate containers are plain modules)."""
        *parents, leaf = name.split(".")
        owner: nn.Module = self
        for part in parents:
            if part not in owner._modules:
                owner.add_module(part, nn.Module())
            owner = owner._modules[part]
        owner.add_module(leaf, module)
        self.names.append(name)

    def get(self, name: str) -> nn.Module:
        """The copy of the head ``name``."""
        return self.get_submodule(name)

    def hook(self, name: str) -> Any:
        """The forward hook for the original module ``name``: its output becomes the copy's output on the same
        call (the original's output is discarded). A partial of a bound method, so ``copy.deepcopy`` of the model
        rebinds it to the copied heads."""
        return functools.partial(self.run_head, name)

    def run_head(self, name: str, host: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        """Run the copy of ``name`` on the original's call."""
        return self.get_submodule(name)(*args, **kwargs)


def head_shapes(heads: DeltaHeads) -> dict[str, list[int]]:
    """``{"<head>.<param>": shape}`` of every head tensor (recorded in a checkpoint: a head may have another size
    than the backbone's own, e.g. six topic labels on a backbone built with two)."""
    return {name: list(tensor.shape) for name, tensor in heads.state_dict().items()}


def resize_heads(heads: DeltaHeads, shapes: dict[str, list[int]], owner: str) -> None:
    """Give head copies the recorded sizes where they differ from the backbone's module (before loading values).

    Only the output size of an ``nn.Linear`` may differ (a classifier with another number of labels): its input
    is the backbone's hidden state, so anything else means another backbone.

    Raises:
        DeltaError: A tensor that is not an ``nn.Linear``'s, or whose input size differs; nothing is changed.
    """
    changes: list[tuple[nn.Linear, int]] = []
    current = heads.state_dict()
    for key, shape in shapes.items():
        if key not in current or list(current[key].shape) == list(shape):
            continue
        module_name, _, pname = key.rpartition(".")
        module = heads.get_submodule(module_name)
        ok = isinstance(module, nn.Linear) and (
            (pname == "weight" and len(shape) == 2 and shape[1] == module.in_features)
            or (pname == "bias" and len(shape) == 1)
        )
        if not ok:
            raise DeltaError(
                f"{owner}: the head tensor {key!r} has the size {list(shape)} in the checkpoint and "
                f"{list(current[key].shape)} in this backbone; only the number of outputs of a Linear head (e.g. the "
                f"labels of a classifier) may differ. Load into the model the delta was trained on."
            )
        changes.append((module, shape[0]))
    outputs: dict[int, set[int]] = {}
    for module, size in changes:
        outputs.setdefault(id(module), set()).add(size)
    if any(len(sizes) > 1 for sizes in outputs.values()):
        raise DeltaError(f"{owner}: a Linear head's weight and bias have different output sizes in the checkpoint.")
    for module, size in changes:
        if module.out_features == size:
            continue
        kwargs = {"device": module.weight.device, "dtype": module.weight.dtype}
        module.weight = nn.Parameter(torch.empty(size, module.in_features, **kwargs))
        if module.bias is not None:
            module.bias = nn.Parameter(torch.empty(size, **kwargs))
        module.out_features = size
