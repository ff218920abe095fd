"""The folded module tree the picker and the report draw, as plain data (JSON-ready).

It folds like :class:`deltakit.Visualization` (bigmodelvis): siblings with the same structure (type, own parameter
shapes, children) become one node labelled ``0-31`` or ``q_proj,o_proj``, and leaves without parameters (dropout,
activations, rotary tables) are left out. Each node lists the full module names it stands for, so ticking a folded
node selects all its members, and a folded node also carries its members one by one so the page can unfold it.

Node format (short keys keep a Llama-7B tree small): ``l`` label, ``t`` module type, ``n`` indices into the tree's
``names`` list, ``p`` parameters of those modules (descendants included), ``s`` the own parameter shapes of one of
them, ``r`` role names all of them have, ``c`` children, ``m`` members (folded nodes only).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..addressing import find_modules
from ..checkpoint.sites import format_indices
from ..errors import ModuleMatchError
from ..site import DeltaSite, SharedParameters, is_inside
from ..structures import ROLE_NAMES, STRUCTURES, detect_model_type, infer_structure

#: Module types that belong to deltas, never to the backbone: neither drawn nor selectable.
DELTA_TYPES = (DeltaSite, SharedParameters)


@dataclass
class _Raw:
    """One backbone module: its full name, own parameter shapes, total parameters and drawn children."""

    name: str
    local: str
    type: str
    shapes: str
    total: int
    children: list[_Raw] = field(default_factory=list)
    fingerprint: int = 0


def _build_raw(module: nn.Module, name: str, local: str, prints: dict[tuple[Any, ...], int]) -> _Raw | None:
    own = [(p_name, tuple(p.shape)) for p_name, p in module.named_parameters(recurse=False)]
    shapes = " ".join(f"{p_name}:{list(shape)}" for p_name, shape in own)
    total = sum(p.numel() for p in module.parameters(recurse=False))
    raw = _Raw(name, local, type(module).__name__, shapes, total)
    has_children = False
    for child_local, child in module.named_children():
        if isinstance(child, DELTA_TYPES):
            continue
        has_children = True
        child_raw = _build_raw(child, f"{name}.{child_local}" if name else child_local, child_local, prints)
        if child_raw is not None:
            raw.children.append(child_raw)
            raw.total += child_raw.total
    if not has_children and not own:
        return None  # a leaf without parameters: Visualization leaves it out too
    key = (raw.type, shapes, tuple((c.local, c.fingerprint) for c in raw.children))
    raw.fingerprint = prints.setdefault(key, len(prints))
    return raw


def fold_label(names: list[str]) -> str:
    """``["0", "1", "2", "5"]`` -> ``"0-2,5"`` (as Visualization writes folded layers); other names comma-joined."""
    if not all(n.isdigit() for n in names):
        return ",".join(names)
    return format_indices(sorted(int(n) for n in names))


class _Viewer:
    def __init__(self, roles_by_name: dict[str, list[str]]) -> None:
        self.index: dict[str, int] = {}
        self.roles_by_name = roles_by_name

    def idx(self, name: str) -> int:
        return self.index.setdefault(name, len(self.index))

    def view(self, raws: list[_Raw], label: str) -> dict[str, Any]:
        rep = raws[0]
        node: dict[str, Any] = {"l": label, "t": rep.type, "n": [self.idx(r.name) for r in raws if r.name],
                                "p": sum(r.total for r in raws)}
        if rep.shapes:
            node["s"] = rep.shapes
        roles = set(self.roles_by_name.get(rep.name, ()))
        for r in raws[1:]:
            roles &= set(self.roles_by_name.get(r.name, ()))
        if roles:
            node["r"] = sorted(roles)
        groups: dict[int, list[int]] = {}
        for j, child in enumerate(rep.children):
            groups.setdefault(child.fingerprint, []).append(j)
        children = []
        for positions in groups.values():
            kids = [r.children[j] for r in raws for j in positions]
            child = self.view(kids, fold_label([rep.children[j].local for j in positions]))
            if len(positions) > 1:
                child["m"] = [self.view([r.children[j] for r in raws], rep.children[j].local) for j in positions]
            children.append(child)
        if children:
            node["c"] = children
        return node


def module_tree(model: nn.Module, roles: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """The folded tree of ``model`` as data: ``{"root": node, "names": [full names], "model": class name}``.

    Args:
        model: Any ``nn.Module`` (meta-device models work: only names and shapes are read).
        roles: ``{role: [module names]}`` to label nodes with (see :func:`role_map`); default none.
    """
    by_name: dict[str, list[str]] = {}
    for role, names in (roles or {}).items():
        for name in names:
            by_name.setdefault(name, []).append(role)
    raw = _build_raw(model, "", type(model).__name__, {})
    viewer = _Viewer(by_name)
    if raw is None:
        root: dict[str, Any] = {"l": type(model).__name__, "t": type(model).__name__, "n": [], "p": 0}
    else:
        root = viewer.view([raw], type(model).__name__)
    return {"root": root, "names": list(viewer.index), "model": type(model).__name__}


def selectable_names(model: nn.Module) -> list[str]:
    """The module names ``modified_modules`` patterns are matched against, in model order: every named module
    except the root and the modules of deltas (what :func:`deltakit.find_modules` considers)."""
    modules = [(n, m) for n, m in model.named_modules() if n]
    skipped = {n for n, m in modules if isinstance(m, DELTA_TYPES)}
    return [n for n, _ in modules if not is_inside(n, skipped)]


def role_map(model: nn.Module) -> dict[str, Any]:
    """``{"source": ..., "roles": {role: [names]}, "ambiguous": {role: why}}`` for ``model``: the common-structure
    role names (``attn.q``, ``ff.w2``, ...) from deltakit's structure map, or inferred for unmapped architectures."""
    model_type = detect_model_type(model)
    if model_type in STRUCTURES:
        roles: dict[str, list[str]] = {}
        for role in ROLE_NAMES:
            try:
                roles[role] = [n for n, _ in find_modules(model, [role], skip_types=DELTA_TYPES)]
            except ModuleMatchError:
                continue
        return {"source": f"structure map for model_type {model_type!r}", "roles": roles, "ambiguous": {}}
    inferred = infer_structure(model)
    return {
        "source": f"inferred from the module structure (model_type {model_type!r} is not in the structure map)",
        "roles": inferred.roles,
        "ambiguous": inferred.ambiguous,
    }
