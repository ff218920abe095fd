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

Per-sample routing (:meth:`deltakit.serving.DeltaGroup.route`) applies the copies row by row with a
:class:`HeadRouter` on each original: each delta's copy runs on its own rows only, and rows whose delta carries no
copy (and ``None`` rows) keep the original's output. The rows of one batch must use heads of one shape
(:func:`check_routed_heads`, checked before anything runs): a 6-label head and a 2-label one give outputs that
cannot be one tensor.

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
from .routing import SiteRouter
from .site import DeltaSite, delta_site_names, follow_host, is_inside

__all__ = [
    "DeltaHeads",
    "HeadRouter",
    "check_heads",
    "check_routed_heads",
    "copy_head",
    "head_shapes",
    "head_tensor_key",
    "module_shapes",
    "resize_heads",
]


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
        # at least one output: a 0-label head loads, then every logits tensor is empty and fails far from here
        ok = isinstance(module, nn.Linear) and len(shape) >= 1 and shape[0] > 0 and (
            (pname == "weight" and len(shape) == 2 and shape[1] == module.in_features)
            or (pname == "bias" and len(shape) == 1)
        )
        if not ok:
            raise DeltaError(
                f"{owner}: the head tensor {key!r} has the size {list(shape)} in the checkpoint and "
                f"{list(current[key].shape)} in this backbone; only the number of outputs of a Linear head (e.g. the "
                f"labels of a classifier, at least one) may differ. Load into the model the delta was trained on."
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


# ------------------------------------------------------------------------------ per-sample routing
def module_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """``{state_dict key: shape}`` of ``module``'s own tensors (what deltas attached inside it add is left out, as
    :func:`copy_head` leaves it out)."""
    inner = delta_site_names(module)
    return {key: tuple(value.shape) for key, value in module.state_dict().items()
            if not is_inside(key.rpartition(".")[0], inner)}


def check_routed_heads(uses: dict[str, list[tuple[str, nn.Module]]]) -> None:
    """Refuse a routed batch whose rows would run heads of different shapes on one module.

    Args:
        uses: Per head module name, ``(who, module)`` for each distinct kind of row of the batch: ``who`` describes
            the rows (a delta's name, ``"None"``...) and ``module`` is what they run there (a delta's copy, or the
            backbone's original).

    Raises:
        DeltaError: Two kinds of rows use heads whose tensors have different shapes (their outputs could not be one
            batch); the message names the rows, the module and the shapes.
    """
    for head, rows in uses.items():
        by_shape: dict[tuple[tuple[str, tuple[int, ...]], ...], list[str]] = {}
        for who, module in rows:
            by_shape.setdefault(tuple(sorted(module_shapes(module).items())), []).append(who)
        if len(by_shape) < 2:
            continue
        groups = "; ".join(
            f"{', '.join(whos)} -> " + (", ".join(f"{k} {list(v)}" for k, v in shape) or "no tensors")
            for shape, whos in by_shape.items()
        )
        raise DeltaError(
            f"route(): the rows of this batch use task heads of different shapes on {head!r}, so their outputs "
            f"cannot form one batch: {groups}. Route the rows of each head shape in separate route() blocks, or serve "
            f"them with switch()."
        )


def _batch_rows(args: tuple[Any, ...], kwargs: dict[str, Any], where: str) -> torch.Tensor:
    """The first tensor argument of a head call (its dim 0 is the batch)."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value
    raise DeltaError(
        f"DeltaGroup.route(): the task head {where!r} was called without a tensor argument, so its rows cannot be "
        f"routed. Serve the deltas carrying a copy of it with switch()."
    )


def _take_rows(values: Any, rows: torch.Tensor, n: int) -> Any:
    """``values`` (a tuple of arguments or a dict of keyword arguments) with every tensor of ``n`` rows cut to
    ``rows`` (anything else passes through: a mask of other shape, a flag)."""

    def cut(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n:
            return value.index_select(0, rows)
        return value

    if isinstance(values, dict):
        return {key: cut(value) for key, value in values.items()}
    return tuple(cut(value) for value in values)


class HeadRouter(SiteRouter):
    """Routes one task head per sample: on the original module, each row runs the copy of its own delta.

    Its host is the original head module and its "sites" are the deltas' copies of it (:class:`DeltaHeads`
    entries). Nothing is stacked: each copy runs on its own rows (at most one call per delta present in the batch),
    the results are written into those rows of the original's output out of place (so autograd and inference
    tensors both work), and the other rows (``None``, deltas without a copy of this head) keep the original's
    output. A batch routed entirely through one copy returns that copy's call as is: the same computation as
    :meth:`~deltakit.serving.DeltaGroup.switch`, bit for bit. A batch routed entirely through copies is built from
    their outputs, which may have another size than the original's (6 labels on a backbone built with 2).

    The copies are off the model's tree while routing: they follow the original's device, dtype and training flag
    when a block starts using the router (:meth:`sync_params`).
    """

    @staticmethod
    def _entry_sources(delta: Any, site: nn.Module) -> list[tuple[nn.Module, str]]:
        # Only the copy's own parameters: a head never reads the delta's shared ones.
        return [(module, pname) for module in site.modules()
                for pname, p in module._parameters.items() if p is not None]

    def build(self) -> dict[str, torch.Tensor]:
        raise DeltaError(f"HeadRouter on {self.host_name!r}: task heads are run per delta, never stacked.")

    def sync_params(self) -> None:
        """As :meth:`SiteRouter.sync_params`; when no block uses the router yet, also move the copies to the
        original's device and dtype and give them its training flag (a ``model.to()`` since they were detached)."""
        super().sync_params()
        if self._users == 0:
            for copy_ in self.sites:
                follow_host(copy_, self.host)

    def forward_hook(self, host: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        """The routed forward hook on the original head (the identity in a thread whose block does not use it)."""
        state = self._state()
        if state is None:
            return output
        self._check_mode(host)
        first = _batch_rows(args, kwargs, self.host_name)
        n = first.shape[0]
        plan = self.segments(state, n)
        if not plan.ranges:
            return output
        self.calls["segment"] += 1
        if plan.routed == n and len(plan.ranges) == 1:
            return self._site_at[plan.ranges[0][0]](*args, **kwargs)
        order = torch.arange(n) if plan.order is None else plan.order
        order = order.to(first.device)
        pieces, index = [], []
        for slot, start, stop in plan.ranges:
            rows = order[start:stop]
            result = self._site_at[slot](*_take_rows(args, rows, n), **_take_rows(kwargs, rows, n))
            # Rows without a copy keep the original's output: every piece must fit into it.
            reference = pieces[0] if pieces else (output if plan.routed < n else None)
            self._check_piece(result, stop - start, reference, n, bool(pieces))
            pieces.append(result)
            index.append(rows)
        values = torch.cat(pieces)
        if plan.routed == n:
            if plan.order is None:
                return values  # rows already in batch order
            return values.new_empty(values.shape).index_copy(0, torch.cat(index), values)
        return output.index_copy(0, torch.cat(index), values)

    def _check_piece(self, result: Any, rows: int, reference: Any, n: int, among_copies: bool) -> None:
        """A copy's output for ``rows`` rows must be one tensor with the rows on dim 0 that fits with
        ``reference``: an earlier copy's output, the original's output (of ``n`` rows) when some rows keep it, or
        ``None`` (nothing to fit yet)."""
        if not isinstance(result, torch.Tensor) or result.dim() == 0 or result.shape[0] != rows:
            got = f"a tensor of shape {list(result.shape)}" if isinstance(result, torch.Tensor) else \
                type(result).__name__
            raise DeltaError(
                f"DeltaGroup.route(): the task head {self.host_name!r} returned {got} for {rows} rows, not one tensor "
                f"with the rows on dim 0, so the rows of different deltas cannot be put back into one batch. Route "
                f"its deltas in separate route() blocks (all rows of a block on one delta) or serve them with switch()."
            )
        if reference is None:
            return
        fits = isinstance(reference, torch.Tensor) and reference.dim() > 0 and (
            among_copies or reference.shape[0] == n
        ) and reference.shape[1:] == result.shape[1:] and reference.dtype == result.dtype
        if not fits:
            what = "another copy's" if among_copies else "the original head's (kept by rows without a copy)"
            theirs = (f"of shape {list(reference.shape)} ({reference.dtype})" if isinstance(reference, torch.Tensor)
                      else f"a {type(reference).__name__}")
            raise DeltaError(
                f"DeltaGroup.route(): on the task head {self.host_name!r} a copy returned shape {list(result.shape)} "
                f"({result.dtype}) and {what} output is {theirs}: the rows cannot form one batch. Route them in "
                f"separate route() blocks or serve them with switch()."
            )
