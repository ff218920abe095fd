"""Compact ``modified_modules`` patterns that match exactly a selection of modules.

A selection made by clicking (``model.layers.0.self_attn.q_proj`` ... ``model.layers.31.self_attn.q_proj``) is
written back in the forms a person would type: a dotted suffix (``q_proj``) when it selects every such module, else
a ``[r]`` regex over the layer indices (``[r]layers\\.(?:[0-9]|1[0-5])\\.self_attn\\.q_proj``). Each candidate is
checked against every module name with the matcher's own rules, the shortest exact one wins, and the final list is
verified by :func:`deltakit.find_modules` itself (:func:`verify_patterns`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from itertools import product

from torch import nn

from ..addressing import REGEX_PREFIX, find_modules
from ..errors import ModuleMatchError
from .tree import DELTA_TYPES


def _same_length(lo: str, hi: str) -> list[str]:
    """Regexes (no alternation inside) for the integers from ``lo`` to ``hi``, both with the same digit count."""
    if lo == hi:
        return [lo]
    if len(lo) == 1:
        return [f"[{lo}-{hi}]"]
    rest = len(lo) - 1
    if lo[0] == hi[0]:
        return [lo[0] + tail for tail in _same_length(lo[1:], hi[1:])]
    if lo[1:] == "0" * rest and hi[1:] == "9" * rest:
        head = lo[0] if lo[0] == hi[0] else f"[{lo[0]}-{hi[0]}]"
        return [head + "[0-9]" * rest]
    out = [lo[0] + tail for tail in _same_length(lo[1:], "9" * rest)]
    low, high = int(lo[0]) + 1, int(hi[0]) - 1
    if low <= high:
        out.append((str(low) if low == high else f"[{low}-{high}]") + "[0-9]" * rest)
    out.extend(hi[0] + tail for tail in _same_length("0" * rest, hi[1:]))
    return out


def _range_parts(lo: int, hi: int) -> list[str]:
    parts: list[str] = []
    while lo <= hi:
        top = min(hi, 10 ** len(str(lo)) - 1)  # stay within one digit count
        parts.extend(_same_length(str(lo), str(top)))
        lo = top + 1
    return parts


def int_set_regex(values: Iterable[int]) -> str:
    """A regex matching exactly the decimal forms (no leading zeros) of ``values``.

    >>> int_set_regex([0, 1, 2, 3, 7])
    '(?:[0-3]|7)'
    """
    nums = sorted(set(values))
    if not nums:
        raise ValueError("int_set_regex needs at least one value")
    parts: list[str] = []
    start = prev = nums[0]
    for n in nums[1:] + [None]:  # type: ignore[list-item]
        if n is not None and n == prev + 1:
            prev = n
            continue
        parts.extend(_range_parts(start, prev))
        if n is not None:
            start = prev = n
    return parts[0] if len(parts) == 1 else "(?:" + "|".join(parts) + ")"


class _Names:
    """All matchable names, indexed by their last component (a pattern's last part is fixed, so only names ending
    the same way can match it)."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        self.by_last: dict[str, list[list[str]]] = {}
        for name in self.names:
            parts = name.split(".")
            self.by_last.setdefault("#" if parts[-1].isdigit() else parts[-1], []).append(parts)

    def matches(self, suffix: list[str | None], regex: re.Pattern[str] | None) -> set[str]:
        """Names matched by the pattern made of ``suffix`` (``None``: a numeric part, in ``regex``)."""
        last = suffix[-1]
        bucket = self.by_last.get("#" if last is None or last.isdigit() else last, [])
        k = len(suffix)
        out = set()
        for parts in bucket:
            if len(parts) < k:
                continue
            if regex is None:
                if parts[-k:] == suffix:
                    out.add(".".join(parts))
            elif regex.fullmatch(".".join(parts[-k:])):
                out.add(".".join(parts))
        # A [r] regex is tried on every dotted suffix, but the ones written here never match a '.' outside their
        # literal '\.', so only the suffix with as many parts can match: checking that one is the matcher's rule.
        return out


def _split_product(tuples: list[tuple[int, ...]]) -> list[list[tuple[int, ...]]]:
    """Split index tuples into groups that are each a full product of per-position sets (one regex each)."""
    sets = [sorted({t[i] for t in tuples}) for i in range(len(tuples[0]))]
    size = 1
    for s in sets:
        size *= len(s)
    if size == len(set(tuples)):
        return [tuples]
    pos = next(i for i, s in enumerate(sets) if len(s) > 1)
    out: list[list[tuple[int, ...]]] = []
    for value in sets[pos]:
        out.extend(_split_product([t for t in tuples if t[pos] == value]))
    return out


def _candidates(parts: list[str | None], sets: list[list[int]]) -> list[tuple[str, list[str | None], str | None]]:
    """Patterns for a template (``None`` at numeric parts), shortest suffix first: ``(pattern, suffix, regex)``."""
    out: list[tuple[str, list[str | None], str | None]] = []
    numeric_positions = [i for i, p in enumerate(parts) if p is None]
    for start in range(len(parts) - 1, -1, -1):
        if parts[start] is None and start > 0:
            continue  # "layers.3", never a bare "3": a suffix starts at a name, which says what is counted
        suffix = parts[start:]
        inside = [i for i in numeric_positions if i >= start]
        if all(len(sets[numeric_positions.index(i)]) == 1 for i in inside):
            filled: list[str | None] = [
                str(sets[numeric_positions.index(i)][0]) if parts[i] is None else parts[i]
                for i in range(start, len(parts))
            ]
            out.append((".".join(filled), filled, None))  # type: ignore[arg-type]
            continue
        for loose in (True, False):
            pieces = []
            for i in range(start, len(parts)):
                if parts[i] is not None:
                    pieces.append(re.escape(parts[i]))  # type: ignore[arg-type]
                else:
                    values = sets[numeric_positions.index(i)]
                    pieces.append(r"\d+" if loose else int_set_regex(values))
            regex = r"\.".join(pieces)
            out.append((REGEX_PREFIX + regex, suffix, regex))
    return out


def compact_patterns(all_names: Sequence[str], selection: Iterable[str]) -> list[str]:
    """The shortest patterns, one per kind of selected module, that together match exactly ``selection``.

    Args:
        all_names: Every module name the matcher considers (:func:`~deltakit.web.tree.selectable_names`).
        selection: The chosen module names.

    Returns:
        Patterns in model order of their first module.

    Raises:
        ModuleMatchError: a name is not a module of the model, or the selection cannot be written as patterns
            (a module name that is also a dotted suffix of another module's name).
    """
    index = _Names(all_names)
    known = {n: i for i, n in enumerate(index.names)}
    chosen = set(selection)
    unknown = sorted(chosen - set(known))
    if unknown:
        raise ModuleMatchError(
            f"The selection names {len(unknown)} modules the model does not have: {unknown[:3]}. Select names from "
            f"model.named_modules() (deltas' own modules are not selectable)."
        )
    groups: dict[tuple[str | None, ...], list[tuple[int, ...]]] = {}
    for name in sorted(chosen, key=known.__getitem__):
        parts = name.split(".")
        template = tuple(None if p.isdigit() else p for p in parts)
        groups.setdefault(template, []).append(tuple(int(p) for p in parts if p.isdigit()))
    patterns: list[str] = []
    covered: set[str] = set()
    for template, tuples in groups.items():
        for block in _split_product(tuples) if tuples[0] else [tuples]:
            sets = [sorted({t[i] for t in block}) for i in range(len(block[0]))]
            wanted = {_fill(template, t) for t in product(*sets)}
            if wanted <= covered:
                continue  # an earlier, shorter pattern already matches these (and nothing outside the selection)
            pattern, matched = _first_fitting(index, list(template), sets, wanted, chosen)
            patterns.append(pattern)
            covered |= matched
    return patterns


def _fill(template: tuple[str | None, ...], values: tuple[int, ...]) -> str:
    it = iter(values)
    return ".".join(str(next(it)) if p is None else p for p in template)


def _first_fitting(
    index: _Names, parts: list[str | None], sets: list[list[int]], wanted: set[str], chosen: set[str]
) -> tuple[str, set[str]]:
    """The shortest candidate matching all of ``wanted`` and nothing outside ``chosen``, with what it matches."""
    for pattern, suffix, regex in _candidates(parts, sets):
        matched = index.matches(suffix, None if regex is None else re.compile(regex))
        if wanted <= matched <= chosen:
            return pattern, matched
    example = min(wanted)
    raise ModuleMatchError(
        f"The selection cannot be written as modified_modules patterns: {example!r} is also the dotted suffix of "
        f"another module's name, so every pattern that matches it matches that module too. Select the other "
        f"module as well, or pass the modules in Python with exclude_modules."
    )


def verify_patterns(model: nn.Module, patterns: list[str], selection: Iterable[str]) -> list[str]:
    """Check with :func:`deltakit.find_modules` that ``patterns`` match exactly ``selection``; return the matched
    names in model order.

    Raises:
        ModuleMatchError: they do not (naming what is missing or extra).
    """
    matched = [n for n, _ in find_modules(model, patterns, skip_types=DELTA_TYPES)]
    chosen = set(selection)
    if set(matched) != chosen:
        extra, missing = sorted(set(matched) - chosen), sorted(chosen - set(matched))
        raise ModuleMatchError(
            f"Patterns {patterns} do not match exactly the selection: extra {extra[:3]}, missing {missing[:3]}."
        )
    return matched
