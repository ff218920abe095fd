"""Roles of an architecture deltakit has no map for, inferred from its module structure (see :mod:`.roles`)."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from torch import nn

from ..errors import ModuleMatchError
from ..site import DeltaSite
from .hosts import linear_dims, norm_shape
from .model_config import find_config
from .roles import ROLE_NAMES

# The name users know from the docs (the package, not this file).
logger = logging.getLogger("deltakit.structures")

_ATTENTION_NAME = re.compile(r"attn|attention", re.IGNORECASE)
_FUSED_QKV = re.compile(r"qkv|query_key_value|c_attn|in_proj", re.IGNORECASE)
_PROJ_SUFFIX = r"(_?proj|_lin|_linear|_layer)?"
_QKV_NAMES = {
    "attn.q": re.compile(rf"(q|query|wq|w_q|to_q){_PROJ_SUFFIX}", re.IGNORECASE),
    "attn.k": re.compile(rf"(k|key|wk|w_k|to_k){_PROJ_SUFFIX}", re.IGNORECASE),
    "attn.v": re.compile(rf"(v|value|wv|w_v|to_v){_PROJ_SUFFIX}", re.IGNORECASE),
}
_OUT_NAMES = re.compile(r"(o|out|output|wo|w_o|to_out|dense|c_proj|proj)" + _PROJ_SUFFIX, re.IGNORECASE)


class RoleAbsentError(ModuleMatchError):
    """An inferred structure has no module for a role (e.g. ``ff.gate`` in a non-gated FFN): default positions
    skip such roles, an explicit request is an error."""


@dataclass
class InferredStructure:
    """Roles inferred from a model's module structure (see :func:`infer_structure`).

    Attributes:
        model_class: Class name of the model the structure was inferred for.
        layers: Full names of the transformer layer blocks that were found.
        roles: Role -> full module names, for every role that could be inferred (possibly empty: role absent).
        ambiguous: Role -> explanation naming the candidate modules, for roles that could not be told apart.
    """

    model_class: str
    layers: list[str] = field(default_factory=list)
    roles: dict[str, list[str]] = field(default_factory=dict)
    ambiguous: dict[str, str] = field(default_factory=dict)

    def names_for(self, role: str, what: str = "modified_modules") -> list[str]:
        """Full names of the modules playing ``role``.

        Raises:
            ModuleMatchError: the role is ambiguous here (the message lists the candidates), or no layers exist.
            RoleAbsentError: the structure has no module for this role.
        """
        if not self.layers:
            raise ModuleMatchError(
                f"{what} pattern {role!r} is a common-structure role name, but deltakit has no structure map for this "
                f"{self.model_class} and found no transformer layers to infer one from (a ModuleList of identical "
                f"blocks holding an attention module). Pass the concrete module names in modified_modules instead, "
                f"e.g. modified_modules=['q_proj', 'v_proj']; known role names: {', '.join(ROLE_NAMES)}."
            )
        if role in self.ambiguous:
            raise ModuleMatchError(
                f"Cannot infer the role {role!r} in this {self.model_class} (its model_type is not in deltakit's "
                f"structure map): {self.ambiguous[role]} Pass the concrete module names in {what} instead."
            )
        found = self.roles.get(role, [])
        if not found:
            raise RoleAbsentError(
                f"{what} role {role!r} was not found in the structure inferred for this {self.model_class}: "
                f"{self.describe()} Pass concrete module names instead."
            )
        return list(found)

    def describe(self) -> str:
        """One line per role: how many modules and the first one, and which roles are ambiguous."""
        parts = [f"{len(self.layers)} layer blocks ({_preview(self.layers)})"]
        for role in ROLE_NAMES:
            if self.roles.get(role):
                parts.append(f"{role} -> {_preview(self.roles[role])}")
            elif role in self.ambiguous:
                parts.append(f"{role} -> ambiguous")
        return "; ".join(parts) + "."


def _preview(names: list[str]) -> str:
    return f"{names[0]!r}" + (f" and {len(names) - 1} more" if len(names) > 1 else "")


def _named_modules(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``named_modules()`` without deltakit's own delta modules (and what they hold)."""
    stack = [("", module)]
    while stack:
        name, current = stack.pop()
        yield name, current
        children = [
            (f"{name}.{child_name}" if name else child_name, child)
            for child_name, child in current.named_children()
            if not isinstance(child, DeltaSite)
        ]
        stack.extend(reversed(children))


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _inside(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _is_layer_list(container: nn.Module) -> bool:
    children = list(container.children())
    return (
        isinstance(container, (nn.ModuleList, nn.Sequential))
        and bool(children)
        and len({type(c) for c in children}) == 1
        and all(_attention_blocks(c, "") for c in children)
    )


def _attention_blocks(layer: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
    """Outermost descendants named like attention (``attn``, ``attention``) that hold a linear layer."""
    found: list[tuple[str, nn.Module]] = []
    for rel, module in _named_modules(layer):
        if not rel or not _ATTENTION_NAME.search(_leaf(rel)) or linear_dims(module) is not None:
            continue
        if any(_inside(rel, f) for f, _ in found):
            continue
        if any(linear_dims(m) is not None for m in module.modules()):
            found.append((rel, module))
    return [(f"{prefix}.{rel}" if prefix else rel, m) for rel, m in found]


class _Collector:
    """Accumulates the per-layer classification into one role map, recording ambiguities once per role."""

    def __init__(self) -> None:
        self.roles: dict[str, list[str]] = {role: [] for role in ROLE_NAMES}
        self.ambiguous: dict[str, str] = {}

    def add(self, role: str, names: list[str]) -> None:
        for name in names:
            if name not in self.roles[role]:
                self.roles[role].append(name)

    def ambiguity(self, role: str, where: str, candidates: list[str], why: str) -> None:
        if role not in self.ambiguous:
            listed = ", ".join(repr(c) for c in candidates) if candidates else "none"
            self.ambiguous[role] = f"in {where!r} {why}; candidates: {listed}."


def _classify_attention(block: str, module: nn.Module, out: _Collector) -> int | None:
    """Find q, k, v, o in one attention block; returns the hidden size (the query projection's input)."""
    linears = [
        (f"{block}.{rel}", m) for rel, m in _named_modules(module) if rel and linear_dims(m) is not None
    ]
    names = [n for n, _ in linears]
    fused = [n for n in names if _FUSED_QKV.search(_leaf(n))]
    used: set[str] = set(fused)
    hidden: int | None = None
    for role, pattern in _QKV_NAMES.items():
        named = [n for n in names if n not in fused and pattern.fullmatch(_leaf(n))]
        if len(named) == 1:
            out.add(role, named)
            used.update(named)
        elif not named and len(fused) == 1:
            out.add(role, fused)
        else:
            why = "several modules could be" if named else "no module is named like"
            out.ambiguity(role, block, names, f"{why} the {role[-1]} projection")
    query = [n for n in out.roles["attn.q"] if _inside(n, block)]
    if query:  # the query projection reads the hidden states: its input size is the hidden size
        hidden = linear_dims(dict(linears)[query[0]])[0]  # type: ignore[index]
    rest = [n for n in names if n not in used]
    if len(rest) > 1:
        rest = [n for n in rest if _OUT_NAMES.fullmatch(_leaf(n))] or rest
    if len(rest) == 1:
        out.add("attn.o", rest)
    else:
        why = "several modules could be" if rest else "no module is left to be"
        out.ambiguity("attn.o", block, [n for n in names if n not in used] or names, f"{why} the output projection")
    return hidden


def _classify_layer(layer: str, module: nn.Module, out: _Collector) -> None:
    blocks = _attention_blocks(module, layer)
    hidden = None
    for block, block_module in blocks:
        hidden = _classify_attention(block, block_module, out) or hidden

    outside = [
        (f"{layer}.{rel}", m)
        for rel, m in _named_modules(module)
        if rel and not any(_inside(f"{layer}.{rel}", b) for b, _ in blocks)
    ]
    linears = [(n, linear_dims(m)) for n, m in outside if linear_dims(m) is not None]
    if hidden is None:
        sizes = [d[0] for _, d in linears] + [d[1] for _, d in linears]
        hidden = max(set(sizes), key=sizes.count) if sizes else None

    # Feed-forward projections by shape: up-type maps hidden -> wider, down-type maps back to hidden.
    up = [n for n, (i, o) in linears if i == hidden and o != hidden]  # type: ignore[misc]
    down = [n for n, (i, o) in linears if i != hidden and o == hidden]  # type: ignore[misc]
    if not up and not down and len(linears) == 2:  # intermediate size == hidden: registration order decides
        up, down = [linears[0][0]], [linears[1][0]]
    gates = [n for n in up if "gate" in _leaf(n).lower()]
    if len(up) == 1:
        out.add("ff.w1", up)
        out.add("ff.gate", gates)  # a fused gate_up projection is both
    elif len(up) == 2 and len(gates) == 1:
        out.add("ff.gate", gates)
        out.add("ff.w1", [n for n in up if n not in gates])
    elif up:
        for role in ("ff.w1", "ff.gate"):
            out.ambiguity(role, layer, up, f"{len(up)} projections map the hidden size {hidden} to a wider one")
    if len(down) == 1:
        out.add("ff.w2", down)
    elif down:
        out.ambiguity("ff.w2", layer, down, f"{len(down)} projections map back to the hidden size {hidden}")

    # Norms of the hidden size (per-head q/k norms have another size): inside an attention block -> attn.norm.
    norms = [
        (f"{layer}.{rel}", m)
        for rel, m in _named_modules(module)
        if rel and norm_shape(m) is not None and (hidden is None or math.prod(norm_shape(m)) == hidden)  # type: ignore[arg-type]
    ]
    inner = [n for n, _ in norms if any(_inside(n, b) for b, _ in blocks)]
    outer = [n for n, _ in norms if n not in inner]
    if inner:
        out.add("attn.norm", inner)
        if len(outer) == 1:
            out.add("ff.norm", outer)
        elif outer:
            out.ambiguity("ff.norm", layer, outer, "several norms lie outside the attention blocks")
    elif len(outer) == len(blocks) + 1:  # one norm per attention block, then the FFN's, in registration order
        out.add("attn.norm", outer[:-1])
        out.add("ff.norm", outer[-1:])
    elif outer:
        for role in ("attn.norm", "ff.norm"):
            out.ambiguity(
                role, layer, outer, f"{len(outer)} norms for {len(blocks)} attention block(s) cannot be assigned by place"
            )


def infer_structure(model: nn.Module, skip_types: tuple[type[nn.Module], ...] = ()) -> InferredStructure:
    """Infer the common-structure roles of a transformer from its module structure.

    Layers are the innermost ``ModuleList`` / ``Sequential`` of identical blocks that each hold an attention
    module (a submodule named like ``attn`` / ``attention`` containing linear layers). In each attention block, q, k
    and v are the linear layers named like ``q``/``query``/``q_proj``/``q_lin``/``wq`` (or one fused
    ``qkv``/``query_key_value``/``c_attn`` projection for all three) and the remaining one is ``attn.o``. Outside
    the attention blocks, linear layers mapping the hidden size to a wider one are ``ff.w1`` (the one named
    ``gate``, if two, is ``ff.gate``), those mapping back are ``ff.w2``. A norm inside an attention block is
    ``attn.norm``; otherwise with one norm per attention block plus one, the last is ``ff.norm`` and the others
    ``attn.norm`` (registration order). ``embed`` is the ``nn.Embedding`` of the vocabulary size outside the
    layers (with one tied weight held by several modules, as in T5 and BART, the ones inside the encoder and decoder
    stacks rather than the ``shared`` holder). Whatever cannot be told apart is recorded as ambiguous with its candidates.

    Args:
        model: Any ``nn.Module``.
        skip_types: Modules of these types (and everything inside) are ignored, besides deltakit's own delta
            modules, which are always ignored.

    Returns:
        The inferred structure; nothing in the model is changed.
    """
    skipped = [n for n, m in _named_modules(model) if skip_types and isinstance(m, skip_types)]
    modules = {n: m for n, m in _named_modules(model) if n and not any(_inside(n, s) for s in skipped)}
    lists = [n for n, m in modules.items() if _is_layer_list(m)]
    lists = [n for n in lists if not any(other != n and _inside(other, n) for other in lists)]  # innermost
    result = InferredStructure(type(model).__name__)
    out = _Collector()
    for list_name in lists:
        for child_name, child in modules[list_name].named_children():
            layer = f"{list_name}.{child_name}"
            result.layers.append(layer)
            _classify_layer(layer, child, out)
    if result.layers:
        config = find_config(model)
        vocab = getattr(config, "vocab_size", None) if config is not None else None
        embeddings = [
            (n, m) for n, m in modules.items()
            if isinstance(m, nn.Embedding) and not any(_inside(n, layer) for layer in result.layers)
        ]
        if isinstance(vocab, int):
            candidates = [n for n, m in embeddings if m.num_embeddings == vocab]
        else:
            largest = max((m.num_embeddings for _, m in embeddings), default=0)
            candidates = [n for n, m in embeddings if m.num_embeddings == largest]
        if len(candidates) > 1 and len({id(modules[n].weight) for n in candidates}) == 1:
            # One tied weight (T5, BART): the copies called are those inside a stack (encoder, decoder), not the
            # holder whose parent contains every stack (``shared`` on the root).
            def holds_every_stack(name: str) -> bool:
                parent = name.rpartition(".")[0]
                return not parent or all(_inside(stack, parent) for stack in lists)

            candidates = [n for n in candidates if not holds_every_stack(n)] or candidates
            if len(candidates) > 1:
                out.add("embed", candidates)
                candidates = []
        if len(candidates) == 1:
            out.add("embed", candidates)
        elif candidates:
            out.ambiguity("embed", type(model).__name__, candidates, "several embeddings have the vocabulary size")
    result.roles = {role: names for role, names in out.roles.items() if names and role not in out.ambiguous}
    result.ambiguous = out.ambiguous
    return result


def log_inferred(structure: InferredStructure, model_type: str | None) -> None:
    """Tell the user (logger ``deltakit.structures``, WARNING) which roles were inferred for an unknown model."""
    what = f"model_type {model_type!r}" if model_type else "this model (no transformers config)"
    logger.warning(
        "deltakit has no structure map for %s; roles inferred from the module structure of %s: %s "
        "Check them, or pass concrete module names in modified_modules.",
        what,
        structure.model_class,
        structure.describe(),
    )
