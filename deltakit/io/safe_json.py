"""JSON from untrusted bytes: every malformed or hostile input becomes one :class:`CheckpointError`.

``json.loads`` alone lets a few hundred bytes raise ``RecursionError`` (deep nesting), ``ValueError`` about
``sys.set_int_max_str_digits`` (a 5,000-digit integer), accept ``NaN``/``Infinity`` (not JSON) and keep the last
of two duplicate keys (two readers may then disagree on what a file says). Here each is refused, with the file
named, before any value reaches the caller.
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import CheckpointError

#: Longest integer literal accepted: 2**64 has 20 digits; no field of a checkpoint needs more.
MAX_INT_DIGITS = 30
#: Deepest nesting accepted; deltakit's own files nest at most 4 levels (PEFT configs a few more).
MAX_DEPTH = 64


class _Refused(ValueError):
    """A construct refused while parsing (raised from the decoder hooks, turned into a CheckpointError)."""


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _Refused(f"an integer with {len(text)} digits (at most {MAX_INT_DIGITS} are accepted)")
    return int(text)


def _parse_float(text: str) -> float:
    if len(text) > 64:
        raise _Refused(f"a number literal of {len(text)} characters")
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise _Refused(f"the number {text[:40]} which overflows to infinity")
    return value


def _parse_constant(name: str) -> Any:
    raise _Refused(f"{name}, which is not valid JSON")


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Refused(f"the key {key[:80]!r} twice in one object (readers could disagree on its value)")
        out[key] = value
    return out


def _check_tree(value: Any) -> None:
    """Depth and string checks, iteratively (a recursive walk would fail on the inputs it guards against)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise _Refused(f"values nested more than {MAX_DEPTH} levels deep")
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise _Refused(f"a string with an unpaired surrogate escape ({item[:40]!r})") from None
        elif isinstance(item, dict):
            stack.extend((k, depth + 1) for k in item)
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)


def loads(data: bytes, where: str) -> Any:
    """Parse UTF-8 JSON ``data`` read from ``where`` (named in every error).

    Raises:
        CheckpointError: Not UTF-8, a byte-order mark, invalid JSON, nesting deeper than :data:`MAX_DEPTH`,
            integers longer than :data:`MAX_INT_DIGITS` digits, ``NaN``/``Infinity``, numbers overflowing to
            infinity, duplicate keys, or unpaired surrogates.
    """
    if data.startswith(b"\xef\xbb\xbf"):
        raise CheckpointError(
            f"{where!r} starts with a UTF-8 byte-order mark, which JSON does not allow; save the file as UTF-8 "
            f"without BOM (or save the checkpoint again with deltakit)."
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CheckpointError(
            f"{where!r} is not UTF-8 text (invalid byte at offset {exc.start}); the file is corrupt."
        ) from None
    try:
        value = json.loads(
            text,
            parse_int=_parse_int,
            parse_float=_parse_float,
            parse_constant=_parse_constant,
            object_pairs_hook=_pairs,
        )
        _check_tree(value)
    except RecursionError:
        raise CheckpointError(
            f"{where!r} nests JSON values too deeply to parse (at most {MAX_DEPTH} levels are accepted); the file is "
            f"corrupt or hostile."
        ) from None
    except _Refused as exc:
        raise CheckpointError(f"{where!r} holds {exc}; the file is corrupt or hostile.") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{where!r} is not valid JSON ({exc}); the file is corrupt.") from None
    return value
