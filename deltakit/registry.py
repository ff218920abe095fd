"""The one table of delta methods: ``delta_type -> (config class, delta class)``.

A method is registered when its delta class is created (:meth:`deltakit.base.DeltaBase.__init_subclass__`), with
its config class: both are checked to name the same ``delta_type``, and a ``delta_type`` cannot be taken twice.
:data:`CONFIG_REGISTRY` and :data:`DELTA_REGISTRY` are read-only views of the table, one column each.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from .errors import DeltaError

#: delta_type -> (config class, delta class)
_TABLE: dict[str, tuple[type, type]] = {}


def _same_definition(a: type, b: type) -> bool:
    """The same class defined again (a reloaded module), not a second method under one name."""
    return (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)


def register(delta_class: type) -> None:
    """Register a delta class and its ``config_class`` under their common ``delta_type``.

    Raises:
        DeltaError: the names disagree, are empty, or the ``delta_type`` is already taken by another class.
    """
    delta_type = getattr(delta_class, "delta_type", "")
    config_class = getattr(delta_class, "config_class", None)
    where = f"{delta_class.__module__}.{delta_class.__qualname__}"
    if not isinstance(delta_type, str) or not delta_type.isidentifier():
        raise DeltaError(f"{where}.delta_type must be a Python identifier such as 'lora', got {delta_type!r}.")
    config_type = getattr(config_class, "delta_type", None)
    if config_type != delta_type:
        raise DeltaError(
            f"{where} declares delta_type {delta_type!r} but its config_class "
            f"{getattr(config_class, '__name__', config_class)!r} declares {config_type!r}; they must be the same "
            f"name (set delta_type: ClassVar[str] = {delta_type!r} on the config class)."
        )
    taken = _TABLE.get(delta_type)
    if taken is not None and not (_same_definition(taken[1], delta_class) and _same_definition(taken[0], config_class)):
        raise DeltaError(
            f"delta_type {delta_type!r} of {where} is already registered by {taken[1].__module__}."
            f"{taken[1].__qualname__}; choose another name."
        )
    _TABLE[delta_type] = (config_class, delta_class)  # type: ignore[assignment]


def unregister(delta_type: str) -> None:
    """Remove a method from the table (tests that register a method for their own duration)."""
    _TABLE.pop(delta_type, None)


def lookup(delta_type: str) -> tuple[type, type]:
    """``(config class, delta class)`` of ``delta_type``; ``KeyError`` if it is not registered."""
    return _TABLE[delta_type]


class _Column(Mapping[str, Any]):
    """A read-only view of one column of the table."""

    def __init__(self, column: int) -> None:
        self._column = column

    def __getitem__(self, delta_type: str) -> Any:
        return _TABLE[delta_type][self._column]

    def __iter__(self) -> Iterator[str]:
        return iter(list(_TABLE))

    def __len__(self) -> int:
        return len(_TABLE)

    def __repr__(self) -> str:
        return repr(dict(self))


#: delta_type -> config class (a view of the table).
CONFIG_REGISTRY: Mapping[str, Any] = _Column(0)
#: delta_type -> delta class (a view of the table).
DELTA_REGISTRY: Mapping[str, Any] = _Column(1)
