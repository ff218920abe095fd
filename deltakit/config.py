"""Delta configurations: one dataclass per delta method, and :class:`AutoDeltaConfig` to build them by name."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .errors import CheckpointError, DeltaConfigError

CONFIG_NAME = "delta_config.json"

#: delta_type -> config class, filled by :meth:`DeltaConfig.__init_subclass__`.
CONFIG_REGISTRY: dict[str, type[DeltaConfig]] = {}


@dataclass
class DeltaConfig:
    """Settings shared by every delta method.

    Args:
        modified_modules: Name patterns of the modules to modify (dotted suffixes, ``[r]`` regexes or role names
            such as ``attn.q``). ``None`` uses the method's default positions for the backbone's architecture.
        exclude_modules: Patterns of modules (and everything inside them) that must not be modified.
        unfrozen_modules: What :meth:`DeltaBase.freeze_module` keeps trainable when called without ``exclude``;
            ``"deltas"`` means this delta's own parameters. ``None`` means ``["deltas"]``.
    """

    delta_type: ClassVar[str] = ""

    modified_modules: list[str] | None = None
    exclude_modules: list[str] | None = None
    unfrozen_modules: list[str] | None = field(default_factory=lambda: ["deltas"])

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.delta_type:
            CONFIG_REGISTRY[cls.delta_type] = cls

    def __post_init__(self) -> None:
        if self.unfrozen_modules is None:
            self.unfrozen_modules = ["deltas"]
        for attr in ("modified_modules", "exclude_modules", "unfrozen_modules"):
            value = getattr(self, attr)
            if isinstance(value, str):
                setattr(self, attr, [value])
            elif value is not None:
                value = list(value)
                if not all(isinstance(v, str) for v in value):
                    raise DeltaConfigError(f"{attr} must be a list of strings, got {value!r}.")
                setattr(self, attr, value)
        self.validate()

    def validate(self) -> None:
        """Check the hyper-parameters; subclasses extend it. Raises :class:`DeltaConfigError`."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict holding ``delta_type`` and every field."""
        return {"delta_type": self.delta_type, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DeltaConfig:
        """Build a config from a dict; unknown keys are an error that lists the valid ones."""
        values = dict(values)
        delta_type = values.pop("delta_type", cls.delta_type)
        if cls.delta_type and delta_type != cls.delta_type:
            raise DeltaConfigError(f"{cls.__name__} got delta_type {delta_type!r}, expected {cls.delta_type!r}.")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise DeltaConfigError(
                f"Unknown {cls.delta_type or 'delta'} config key(s) {unknown}; valid keys: {sorted(names)}."
            )
        return cls(**values)


def check_positive_int(config: DeltaConfig, name: str) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise DeltaConfigError(f"{type(config).__name__}.{name} must be a positive integer, got {value!r}.")


def check_probability(config: DeltaConfig, name: str) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise DeltaConfigError(f"{type(config).__name__}.{name} must be a float in [0, 1), got {value!r}.")


class AutoDeltaConfig:
    """Builds the right :class:`DeltaConfig` subclass from a dict or a saved checkpoint directory."""

    def __init__(self) -> None:
        raise TypeError("AutoDeltaConfig is a factory: use AutoDeltaConfig.from_dict() or .from_finetuned().")

    @staticmethod
    def from_dict(values: dict[str, Any]) -> DeltaConfig:
        """Build a config from a dict holding ``"delta_type"`` (e.g. ``"lora"``) and the method's settings."""
        if not isinstance(values, dict) or "delta_type" not in values:
            raise DeltaConfigError(
                f"AutoDeltaConfig.from_dict needs a dict with a 'delta_type' key (one of {sorted(CONFIG_REGISTRY)})."
            )
        delta_type = values["delta_type"]
        if delta_type not in CONFIG_REGISTRY:
            raise DeltaConfigError(f"Unknown delta_type {delta_type!r}; known types: {sorted(CONFIG_REGISTRY)}.")
        return CONFIG_REGISTRY[delta_type].from_dict(values)

    @staticmethod
    def from_finetuned(path: str | os.PathLike[str]) -> DeltaConfig:
        """Read the config of a checkpoint written by :meth:`DeltaBase.save_finetuned`."""
        from .checkpoint import read_checkpoint_meta

        meta = read_checkpoint_meta(path)
        return AutoDeltaConfig.from_dict(meta["config"])


def load_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a JSON object from ``path``; a missing or malformed file is a :class:`CheckpointError`."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        raise CheckpointError(f"No {os.path.basename(path)} at {os.fspath(path)!r}.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{os.fspath(path)!r} is not valid JSON ({exc}); the file is corrupt.") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{os.fspath(path)!r} must hold a JSON object, got {type(data).__name__}.")
    return data
