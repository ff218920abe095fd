"""Name-based addressing: which backbone submodules a delta modifies.

Patterns are matched against the full dotted names that ``model.named_modules()`` yields:

* ``"attention.self.query"`` matches every module whose name *ends* with that dotted suffix at a ``.``
  boundary: ``encoder.layer.0.attention.self.query`` matches, ``...attention.self.xquery`` does not.
* ``"[r]<regex>"`` matches every module with a dotted suffix that the regex matches *as a whole*
  (``re.fullmatch``), e.g. ``[r]layer\\.[0-5]\\.output\\.dense``.
* A common-structure role name (``attn.q``, ``ff.w2``, see :mod:`deltakit.structures`) is resolved for the
  backbone's architecture.

``exclude`` uses the same forms and removes every match that is an excluded module or lies inside one. A pattern
that matches nothing is an error that names the pattern and the closest existing names.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Sequence

from torch import nn

from .errors import ModuleMatchError
from .site import is_inside
from .structures import (
    ROLE_NAMES,
    STRUCTURES,
    InferredStructure,
    RoleAbsentError,
    detect_model_type,
    infer_structure,
    is_role_name,
    log_inferred,
    role_patterns,
)

REGEX_PREFIX = "[r]"


def dotted_suffixes(name: str) -> list[str]:
    """All suffixes of a dotted name that start at a ``.`` boundary, longest first.

    >>> dotted_suffixes("a.b.c")
    ['a.b.c', 'b.c', 'c']
    """
    parts = name.split(".")
    return [".".join(parts[i:]) for i in range(len(parts))]


def _compile(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern[len(REGEX_PREFIX) :])
    except re.error as exc:
        raise ModuleMatchError(
            f"Invalid regular expression in module pattern {pattern!r}: {exc}. "
            f"Write a Python regex after the '{REGEX_PREFIX}' prefix, e.g. '[r]layer\\.\\d+\\.output\\.dense'."
        ) from None


def name_matches(name: str, pattern: str) -> bool:
    """Whether a full module name matches one literal (suffix) or ``[r]`` regex pattern."""
    if pattern.startswith(REGEX_PREFIX):
        regex = _compile(pattern)
        return any(regex.fullmatch(suffix) for suffix in dotted_suffixes(name))
    return name == pattern or name.endswith("." + pattern)


def _match_literal_or_regex(names: Sequence[str], pattern: str) -> list[str]:
    if pattern.startswith(REGEX_PREFIX):
        regex = _compile(pattern)
        return [n for n in names if any(regex.fullmatch(s) for s in dotted_suffixes(n))]
    if not pattern or pattern.startswith(".") or pattern.endswith(".") or ".." in pattern:
        raise ModuleMatchError(
            f"Module pattern {pattern!r} is not a dotted module name. Use a name such as 'attention.self.query', "
            f"a regex such as '[r]layer\\.\\d+\\.output\\.dense', or a role name such as 'attn.q'."
        )
    tail = "." + pattern
    return [n for n in names if n == pattern or n.endswith(tail)]


def _suggest(pattern: str, names: Sequence[str], limit: int = 5) -> list[str]:
    """Existing names (full names and their dotted suffixes, and role names) closest to ``pattern``."""
    target = pattern.removeprefix(REGEX_PREFIX)
    candidates: dict[str, None] = {}
    for name in names:
        for suffix in dotted_suffixes(name):
            candidates.setdefault(suffix, None)
    for role in ROLE_NAMES:
        candidates.setdefault(role, None)
    return difflib.get_close_matches(target, list(candidates), n=limit, cutoff=0.5)


def _no_match_error(pattern: str, names: Sequence[str], what: str, extra: str = "") -> ModuleMatchError:
    close = _suggest(pattern, names)
    hint = f" Closest existing names: {', '.join(repr(c) for c in close)}." if close else ""
    return ModuleMatchError(
        f"{what} pattern {pattern!r} matches no module of the backbone.{hint}{extra} "
        f"Patterns match dotted name suffixes (e.g. 'attention.self.query'), '[r]'-prefixed regexes that match a "
        f"whole suffix, or role names ({', '.join(ROLE_NAMES)}); print the names with "
        f"[n for n, _ in model.named_modules()] or deltakit.Visualization(model).structure_graph()."
    )


def _resolve(
    names: Sequence[str],
    pattern: str,
    model_type: str | None,
    what: str,
    inference: Callable[[], InferredStructure] | None = None,
) -> list[str]:
    if not isinstance(pattern, str):
        raise ModuleMatchError(f"{what} patterns must be strings, got {pattern!r} of type {type(pattern).__name__}.")
    if is_role_name(pattern):
        patterns = role_patterns(model_type, pattern)
        if patterns is None:
            literal = _match_literal_or_regex(names, pattern)
            if literal:
                return literal
            if inference is not None:  # no structure map: roles inferred from the module structure
                wanted = set(inference().names_for(pattern, what))
                return [n for n in names if n in wanted]
            known = ", ".join(sorted(STRUCTURES))
            arch = f"model_type {model_type!r}" if model_type else "a backbone that is not a transformers model"
            raise ModuleMatchError(
                f"{what} pattern {pattern!r} is a common-structure role name, but deltakit has no structure map for "
                f"{arch} (known: {known}). Pass the concrete module names instead, e.g. "
                f"modified_modules=['q_proj', 'v_proj'], or a regex like '[r]layers\\.\\d+\\.attn\\.q_proj'."
            )
        found: dict[str, None] = {}
        for concrete in patterns:
            for n in _match_literal_or_regex(names, concrete):
                found.setdefault(n, None)
        matched = [n for n in names if n in found]
        if not matched:
            raise ModuleMatchError(
                f"{what} role {pattern!r} resolves to {patterns} for model_type {model_type!r}, but none of these "
                f"match a module of the backbone. Pass concrete module names instead."
            )
        return matched
    matched = _match_literal_or_regex(names, pattern)
    if not matched:
        raise _no_match_error(pattern, names, what)
    return matched


def _as_list(patterns: str | Iterable[str] | None, what: str) -> list[str]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        return [patterns]
    try:
        return list(patterns)
    except TypeError:
        raise ModuleMatchError(f"{what} must be a list of strings, got {type(patterns).__name__}.") from None


def find_modules(
    model: nn.Module,
    patterns: str | Iterable[str],
    exclude: str | Iterable[str] | None = None,
    *,
    what: str = "modified_modules",
    skip_types: tuple[type[nn.Module], ...] = (),
    allow_unmatched_roles: bool = False,
) -> list[tuple[str, nn.Module]]:
    """Resolve name patterns to ``(full_name, module)`` pairs, in ``model.named_modules()`` order.

    Args:
        model: The backbone (any ``nn.Module``; transformers models enable role names).
        patterns: Suffix names, ``[r]`` regexes or role names. Each must match at least one module.
        exclude: Patterns in the same forms; a match equal to or inside an excluded module is dropped.
        what: How to call the patterns in error messages.
        skip_types: Modules of these types, and everything inside them, are never matched (deltakit passes its
            own per-site delta modules, so one delta never modifies another).
        allow_unmatched_roles: Skip role names that the architecture lacks (e.g. ``ff.gate`` on BERT) instead of
            raising; used for methods' default positions. At least one module must still match.

    Returns:
        The matched modules, without duplicates, in the model's module order.

    Raises:
        ModuleMatchError: a pattern (or exclude pattern) matches nothing, or every match is excluded.
    """
    pattern_list = _as_list(patterns, what)
    exclude_list = _as_list(exclude, "exclude_modules")
    if not pattern_list:
        raise ModuleMatchError(f"{what} is empty: give at least one module name, regex or role name.")
    modules = dict(model.named_modules())
    modules.pop("", None)
    if skip_types:
        skipped = {n for n, m in modules.items() if isinstance(m, skip_types)}
        modules = {n: m for n, m in modules.items() if not is_inside(n, skipped)}
    names = list(modules)
    model_type = detect_model_type(model)
    inferred: list[InferredStructure] = []

    def inference() -> InferredStructure:
        if not inferred:
            inferred.append(infer_structure(model, skip_types))
        return inferred[0]

    selected: set[str] = set()
    for pattern in pattern_list:
        if allow_unmatched_roles and is_role_name(pattern):
            try:
                selected.update(_resolve(names, pattern, model_type, what, inference))
            except ModuleMatchError as exc:
                if role_patterns(model_type, pattern) is None and not isinstance(exc, RoleAbsentError):
                    raise
            continue
        selected.update(_resolve(names, pattern, model_type, what, inference))
    excluded: set[str] = set()
    for pattern in exclude_list:
        excluded.update(_resolve(names, pattern, model_type, "exclude_modules", inference))
    result = [(n, modules[n]) for n in names if n in selected and not is_inside(n, excluded)]
    if not selected:
        raise ModuleMatchError(
            f"None of the {what} {pattern_list} exists in this {model_type or type(model).__name__} backbone. "
            f"Pass concrete module names."
        )
    if not result:
        raise ModuleMatchError(
            f"Every module matched by {what}={pattern_list} is excluded by exclude_modules={exclude_list}; "
            f"nothing would be modified. Narrow exclude_modules."
        )
    if inferred:
        log_inferred(inferred[0], model_type)
    return result


def module_names_matching(model: nn.Module, patterns: Iterable[str], *, what: str) -> list[str]:
    """Names of all modules matched by ``patterns`` (each must match), in module order."""
    return [n for n, _ in find_modules(model, list(patterns), what=what)]
