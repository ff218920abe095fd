"""Small helpers for naming a bad field of a checkpoint config in an error message."""

from __future__ import annotations

from typing import Any

from ..errors import CheckpointError


def short(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters (a hostile value may be megabytes long)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def field_error(where: str, key: str, problem: str) -> CheckpointError:
    return CheckpointError(f"{where!r}: field {key!r} {problem}; the file is corrupt or was edited by hand.")


def check_string_list(meta: dict[str, Any], key: str, where: str, *, unique: bool) -> None:
    value = meta.get(key)
    if not isinstance(value, list):
        raise field_error(where, key, f"must be a list of strings, got {type(value).__name__}")
    if not all(isinstance(v, str) and v for v in value):
        bad = next(v for v in value if not (isinstance(v, str) and v))
        raise field_error(where, key, f"must hold non-empty strings only, got {short(bad)} ({type(bad).__name__})")
    if unique and len(set(value)) != len(value):
        raise field_error(where, key, "lists a name twice")
