"""The site list of a checkpoint in its lossless range form (``model.layers.{0-79}.self_attn.q_proj``)."""

from __future__ import annotations

import re
from typing import Any

from ..errors import CheckpointError
from .layout import MAX_SITES
from .meta_fields import short

#: Bound on a site's layer index in the range form (nine digits).
_MAX_INDEX = 10**9

_RANGE_GROUP = re.compile(r"\{([0-9,-]*)\}")


def format_indices(indices: list[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0-2,5,7-8"`` (indices sorted, without duplicates)."""
    runs: list[str] = []
    start = prev = indices[0]
    for index in indices[1:] + [None]:  # type: ignore[list-item]
        if index is not None and index == prev + 1:
            prev = index
            continue
        runs.append(str(start) if start == prev else f"{start}-{prev}")
        if index is not None:
            start = prev = index
    return ",".join(runs)


def compress_sites(names: list[str]) -> list[str] | None:
    """Write site names compactly: names that differ only in their first numeric component share one entry.

    ``bert.encoder.layer.{0-5}.attention.self.query`` stands for the six query projections; a name without a
    numeric component, or alone in its group, stays as it is. The form is lossless for the *set* of names (the
    loader orders sites by the backbone's module order, which is the order a delta is built in), and keeps the
    config of a 80-layer model as short as that of a 2-layer one.

    Args:
        names: Full site names, in model order.

    Returns:
        The entries, or ``None`` when a name contains a brace (the compact form would be ambiguous).
    """
    if any("{" in n or "}" in n for n in names) or len(set(names)) != len(names):
        return None
    groups: dict[tuple[str, ...], list[int]] = {}
    literal: dict[tuple[str, ...], str] = {}
    for name in names:
        parts = name.split(".")
        slot = next((i for i, part in enumerate(parts) if part.isdigit() and str(int(part)) == part), None)
        if slot is None:
            literal[(name,)] = name
            groups.setdefault((name,), [])
            continue
        key = tuple(parts[:slot]) + ("{}",) + tuple(parts[slot + 1 :])
        groups.setdefault(key, []).append(int(parts[slot]))
        literal[key] = name
    entries = []
    for key, indices in groups.items():
        if len(indices) <= 1:
            entries.append(literal[key])
        else:
            entries.append(".".join(key).replace("{}", "{" + format_indices(sorted(indices)) + "}", 1))
    return entries


def _ranges(entry: str, where: str) -> tuple[str, str, list[tuple[int, int]]]:
    """Split a range-form entry into ``(head, tail, [(low, high), ...])``; a plain name has no runs."""
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{where!r} lists a malformed site range {entry[:120]!r} ({why}); the file is corrupt.")

    match = _RANGE_GROUP.search(entry)
    if match is None:
        if "{" in entry or "}" in entry:
            raise bad("unbalanced braces")
        return entry, "", []
    head, tail = entry[: match.start()], entry[match.end() :]
    if "{" in head + tail or "}" in head + tail:
        raise bad("more than one range")
    runs = []
    for run in match.group(1).split(","):
        low, dash, high = run.partition("-")
        high = high if dash else low
        if not (low.isdigit() and high.isdigit()) or len(low) > 9 or len(high) > 9:
            raise bad(f"{run!r} is not an index or a range of indices below {_MAX_INDEX:,}")
        if int(high) < int(low):
            raise bad(f"{run!r} runs backwards")
        runs.append((int(low), int(high)))
    return head, tail, runs


def expand_sites(entries: list[Any], where: str = "the checkpoint", limit: int = MAX_SITES) -> list[str]:
    """Inverse of :func:`compress_sites`: the full site names (each entry's names in increasing index order).

    The number of names is computed from the ranges first and must not exceed ``limit`` (a 300-byte entry such
    as ``x.{0-100000000000}.y`` would otherwise be expanded in full).

    Raises:
        CheckpointError: An entry is not a string, holds a malformed range, the names exceed ``limit``, or a name
            is listed twice.
    """
    if not isinstance(entries, list):
        raise CheckpointError(f"{where!r}: field 'sites' must be a list of strings; the file is corrupt.")
    parsed = []
    total = 0
    for entry in entries:
        if not isinstance(entry, str) or not entry:
            raise CheckpointError(
                f"{where!r} lists a site {short(entry)} that is not a non-empty string; the file is corrupt."
            )
        head, tail, runs = _ranges(entry, where)
        total += sum(high - low + 1 for low, high in runs) if runs else 1
        if total > limit:
            raise CheckpointError(
                f"{where!r} lists more sites than the {limit:,} possible here (entry {entry[:120]!r}); the file is "
                f"corrupt or was made for another model."
            )
        parsed.append((head, tail, runs))
    names: list[str] = []
    for head, tail, runs in parsed:
        if not runs:
            names.append(head)
        for low, high in runs:
            names.extend(f"{head}{i}{tail}" for i in range(low, high + 1))
    if len(set(names)) != len(names):
        twice = next(n for i, n in enumerate(names) if n in names[:i])
        raise CheckpointError(f"{where!r} lists the site {twice!r} twice; the file is corrupt.")
    return names
