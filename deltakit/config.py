"""Delta configurations: one dataclass per delta method (:class:`deltakit.auto.AutoDeltaConfig` builds them by name).

A method's config dataclass is the one place its hyper-parameters are declared: name, type and default as fields,
and a one-line doc each in the class docstring's ``Args:`` section. The method's keyword constructor, its signature
and its docstring are made from them (:class:`deltakit.base.DeltaBase`).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from dataclasses import dataclass
from typing import Any, ClassVar

from .errors import CheckpointError, DeltaConfigError
from .registry import CONFIG_REGISTRY

__all__ = ["CONFIG_NAME", "CONFIG_REGISTRY", "DeltaConfig", "field_docs"]

CONFIG_NAME = "delta_config.json"


@dataclass
class DeltaConfig:
    """Settings shared by every delta method.

    Args:
        modified_modules: Name patterns of the modules to modify (dotted suffixes, ``[r]`` regexes or role names
            such as ``attn.q``). ``None`` uses the method's default positions for the backbone's architecture.
        exclude_modules: Patterns of modules (and everything inside them) that must not be modified.
        unfrozen_modules: What :meth:`~deltakit.base.DeltaBase.freeze_module` keeps trainable by default;
            ``"deltas"`` means this delta's own parameters. ``None`` means ``["deltas"]``.
        modules_to_save: Patterns of whole modules (a ``classifier``, a ``score`` head, a pooler) the delta carries
            its own trainable copy of: used while the delta is attached, saved in its checkpoint (PEFT's name).
    """

    delta_type: ClassVar[str] = ""

    modified_modules: list[str] | None = None
    exclude_modules: list[str] | None = None
    unfrozen_modules: list[str] | None = None  # None becomes ["deltas"] in __post_init__
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        if self.unfrozen_modules is None:
            self.unfrozen_modules = ["deltas"]
        for attr in ("modified_modules", "exclude_modules", "unfrozen_modules", "modules_to_save"):
            setattr(self, attr, check_str_list(self, attr))
        self.validate()

    def validate(self) -> None:
        """Check the hyper-parameters; subclasses extend it. Raises :class:`DeltaConfigError`."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict holding ``delta_type`` and every field."""
        return {"delta_type": self.delta_type, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DeltaConfig:
        """Build a config from a dict; unknown keys are an error that lists the valid ones."""
        if not isinstance(values, dict):
            raise DeltaConfigError(
                f"{cls.__name__}.from_dict needs a dict of settings, got {type(values).__name__}: {values!r:.80}."
            )
        values = dict(values)
        delta_type = values.pop("delta_type", cls.delta_type)
        if cls.delta_type and delta_type != cls.delta_type:
            raise DeltaConfigError(f"{cls.__name__} got delta_type {delta_type!r}, expected {cls.delta_type!r}.")
        names = {f.name for f in dataclasses.fields(cls)}
        bad_keys = [k for k in values if not isinstance(k, str)]
        if bad_keys:
            raise DeltaConfigError(f"{cls.__name__}.from_dict keys must be strings, got {bad_keys[:3]!r}.")
        unknown = sorted(set(values) - names)
        if unknown:
            raise DeltaConfigError(
                f"Unknown {cls.delta_type or 'delta'} config key(s) {unknown}; valid keys: {sorted(names)}."
            )
        return cls(**values)


def field_docs(config_class: type) -> dict[str, str]:
    """``{field: doc}`` from the ``Args:`` sections of a config class's docstring and its bases' (Google style:
    one ``name: text`` entry per field, continuation lines indented deeper; a blank line ends the section)."""
    docs: dict[str, str] = {}
    for klass in reversed(config_class.__mro__):
        lines = (klass.__dict__.get("__doc__") or "").partition("Args:\n")[2].splitlines()
        if not lines:
            continue
        indent = len(lines[0]) - len(lines[0].lstrip())
        name = None
        for line in lines:
            depth = len(line) - len(line.lstrip())
            if not line.strip() or depth < indent:
                break
            if depth == indent:
                name, _, text = line.strip().partition(": ")
                docs[name] = text
            elif name is not None:
                docs[name] += " " + line.strip()
    return docs


# ---------------------------------------------------------------------------------------------- argument checks
# Small checkers shared by every config's validate() and by the delta methods' plan-time size checks. Each raises a
# DeltaConfigError naming the config field, the value and what would be accepted, so a bad argument fails before
# anything is allocated or attached.

#: The largest size (rank, bottleneck, prompt length, MLP width) a hyper-parameter may take when no host bounds it:
#: well above what any model needs (the widest hidden size of today's models is 16384 = 2**14), far below what
#: would try to allocate terabytes.
MAX_SIZE = 2**16

#: Bound on multiplicative scales (``lora_alpha``, ``scaled``): the largest float16 number, so the scale (and
#: ``lora_alpha / lora_r``) is representable in every floating dtype a model may run in. Larger values only
#: overflow a forward pass.
MAX_SCALE = 65504.0

#: Sizes (ranks, bottlenecks) up to this are accepted on any host, however narrow: they cost at most
#: ``SIZE_FLOOR * (in + out)`` numbers, and a 2-label head or a toy model keeps the usual defaults (r=8, 24).
SIZE_FLOOR = 64

#: Longest prefix / soft prompt (positions in front of every input): papers use 5-200.
MAX_PROMPT_LENGTH = 4096

#: Widest reparameterization MLP of a prefix: the widest hidden size of today's models.
MAX_MLP_WIDTH = 16384


def _where(config: object, name: str) -> str:
    owner = config if isinstance(config, str) else type(config).__name__
    return f"{owner}.{name}"


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_int(config: object, name: str, value: Any = None, *, low: int = 1, high: int = MAX_SIZE) -> int:
    """Check that ``config.name`` (or ``value``) is an integer in ``[low, high]``; returns it as an ``int``.

    ``config`` is the config object (its class names the field in the message) or a string naming the owner.
    """
    value = getattr(config, name) if value is None and not isinstance(config, str) else value
    if not _is_int(value) or not low <= value <= high:
        what = "a positive integer" if low == 1 else f"an integer >= {low}"
        raise DeltaConfigError(f"{_where(config, name)} must be {what} (at most {high:,}), got {value!r}.")
    return int(value)


def check_positive_int(config: DeltaConfig, name: str, high: int = MAX_SIZE) -> None:
    """Check that a config field is an integer in ``[1, high]`` (and store it as a plain ``int``)."""
    setattr(config, name, check_int(config, name, high=high))


def _is_finite(value: numbers.Real) -> bool:
    """``math.isfinite``, false (not OverflowError) for an int too large for a float."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def check_finite_number(
    config: object,
    name: str,
    value: Any = None,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    positive: bool = False,
    nonzero: bool = False,
    hint: str = "",
) -> float:
    """Check that a field is a finite real number (not a bool) within ``[low, high]``; returns it as a float.

    Args:
        positive: Require ``> 0``.
        nonzero: Require ``!= 0``.
        hint: Appended to the message (how to choose a good value).
    """
    value = getattr(config, name) if value is None and not isinstance(config, str) else value
    number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    ok = number and _is_finite(value) and low <= value <= high
    ok = ok and (not positive or value > 0) and (not nonzero or value != 0)
    if not ok:
        kind = "a finite number"
        if positive:
            kind += " > 0"
        elif nonzero:
            kind += " other than 0"
        bounds = []
        if low != -math.inf:
            bounds.append(f">= {low:g}")
        if high != math.inf:
            bounds.append(f"<= {high:g}")
        extra = f" ({' and '.join(bounds)})" if bounds else ""
        hint = f" {hint}" if hint else ""
        raise DeltaConfigError(f"{_where(config, name)} must be {kind}{extra}, got {value!r}.{hint}")
    return float(value)


def check_probability(config: DeltaConfig, name: str) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value < 1.0:
        raise DeltaConfigError(f"{type(config).__name__}.{name} must be a float in [0, 1), got {value!r}.")


def check_bool(config: object, name: str, value: Any = None) -> bool:
    """Check that a field is ``True`` or ``False`` (not ``0``/``1``/``"yes"``)."""
    value = getattr(config, name) if value is None and not isinstance(config, str) else value
    if not isinstance(value, bool):
        raise DeltaConfigError(f"{_where(config, name)} must be True or False, got {value!r}.")
    return value


def check_choice(config: object, name: str, choices: Any, value: Any = None) -> str:
    """Check that a field is one of the strings ``choices``."""
    value = getattr(config, name) if value is None and not isinstance(config, str) else value
    if not isinstance(value, str) or value not in choices:
        raise DeltaConfigError(f"{_where(config, name)} must be one of {sorted(choices)}, got {value!r}.")
    return value


def check_str_list(config: object, name: str, value: Any = None) -> list[str] | None:
    """Normalise a module-pattern field: ``None``, one string, or a list/tuple of non-empty strings."""
    value = getattr(config, name) if value is None and not isinstance(config, str) else value
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise DeltaConfigError(
            f"{_where(config, name)} must be a list of module name patterns (non-empty strings), got "
            f"{value!r:.120} ({type(value).__name__}). Example: {name}=['query', 'value']."
        )
    return list(value)


def check_bounded_by(config: object, name: str, value: int, limit: int, module: str, shape: Any, why: str) -> None:
    """Refuse a size larger than what the host module could use (checked before anything is allocated).

    Sizes up to :data:`SIZE_FLOOR` are accepted on any host, so the usual defaults work on small hosts too.

    Args:
        value: The size asked for (e.g. the rank).
        limit: The largest useful size for this host.
        module: The host's full name; ``shape`` its shape (both named in the message).
        why: What bounds it, e.g. ``"max(in_features, out_features)"``.
    """
    limit = max(limit, SIZE_FLOOR)
    if value > limit:
        raise DeltaConfigError(
            f"{_where(config, name)}={value:,} is larger than {module!r} ({shape}) can use: at most {why} "
            f"(or {SIZE_FLOOR}, whichever is larger) = {limit:,}. Choose {name} <= {limit}."
        )


def config_from_dict(values: dict[str, Any]) -> DeltaConfig:
    """Build the config of the method named by ``values["delta_type"]`` (e.g. ``"lora"``) from its settings.

    Raises:
        DeltaConfigError: ``values`` is not a dict with a known ``delta_type``, or a setting is invalid.
    """
    if not isinstance(values, dict) or "delta_type" not in values:
        raise DeltaConfigError(
            f"AutoDeltaConfig.from_dict needs a dict with a 'delta_type' key (one of {sorted(CONFIG_REGISTRY)})."
        )
    delta_type = values["delta_type"]
    if not isinstance(delta_type, str) or delta_type not in CONFIG_REGISTRY:
        raise DeltaConfigError(f"Unknown delta_type {delta_type!r}; known types: {sorted(CONFIG_REGISTRY)}.")
    return CONFIG_REGISTRY[delta_type].from_dict(values)


#: Largest JSON file :func:`load_json` reads.
MAX_JSON_BYTES = 16 * 2**20


def load_json(path: str | os.PathLike[str], limit: int = MAX_JSON_BYTES) -> dict[str, Any]:
    """Read a JSON object from the regular file ``path`` (at most ``limit`` bytes, strict JSON).

    Raises:
        CheckpointError: The file is missing, not a regular file (a directory, FIFO or device), too large, or not a
            JSON object (see :func:`deltakit.io.safe_json.loads`); the message names the file.
    """
    from .io.files import read_regular_file
    from .io.safe_json import loads

    path = os.fspath(path)
    data = loads(read_regular_file(path, "the JSON file", limit), path)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path!r} must hold a JSON object, got {type(data).__name__}.")
    return data
