"""``AutoDeltaConfig`` and ``AutoDeltaModel``: build or load any registered delta method by its ``delta_type``."""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from .base import DeltaBase
from .checkpoint import CONFIG_NAME, config_from_meta, load_delta, read_checkpoint_meta
from .config import DeltaConfig, config_from_dict
from .errors import DeltaConfigError
from .registry import DELTA_REGISTRY


class AutoDeltaConfig:
    """Builds the right :class:`DeltaConfig` subclass from a dict or a saved checkpoint directory."""

    def __init__(self) -> None:
        raise TypeError("AutoDeltaConfig is a factory: use AutoDeltaConfig.from_dict() or .from_finetuned().")

    @staticmethod
    def from_dict(values: dict[str, Any]) -> DeltaConfig:
        """Build a config from a dict holding ``"delta_type"`` (e.g. ``"lora"``) and the method's settings."""
        return config_from_dict(values)

    @staticmethod
    def from_finetuned(path: str | os.PathLike[str]) -> DeltaConfig:
        """Read the config of a checkpoint written by :meth:`DeltaBase.save_finetuned`.

        Raises:
            CheckpointError: The directory holds no valid ``delta_config.json`` (naming the file and the field).
        """
        meta = read_checkpoint_meta(path)
        return config_from_meta(meta, os.path.join(os.fspath(path), CONFIG_NAME))


class AutoDeltaModel:
    """Factory for delta objects; mirrors OpenDelta's ``AutoDeltaModel``.

    Example:
        >>> config = AutoDeltaConfig.from_dict({"delta_type": "lora", "lora_r": 4, "modified_modules": ["query"]})
        >>> delta = AutoDeltaModel.from_config(config, backbone_model=model)
        >>> delta = AutoDeltaModel.from_finetuned("out/sst2-lora", backbone_model=fresh_model)
    """

    def __init__(self) -> None:
        raise TypeError("AutoDeltaModel is a factory: use AutoDeltaModel.from_config() or .from_finetuned().")

    @staticmethod
    def from_config(config: DeltaConfig | dict[str, Any], backbone_model: nn.Module, **kwargs: Any) -> DeltaBase:
        """Create and attach the delta described by ``config`` (a config object or a dict with ``delta_type``)."""
        if isinstance(config, dict):
            config = AutoDeltaConfig.from_dict(config)
        if not isinstance(config, DeltaConfig) or config.delta_type not in DELTA_REGISTRY:
            raise DeltaConfigError(
                f"AutoDeltaModel.from_config needs a delta config (one of {sorted(DELTA_REGISTRY)}), got {config!r}."
            )
        return DELTA_REGISTRY[config.delta_type].from_config(config, backbone_model, **kwargs)

    @staticmethod
    def from_finetuned(
        path: str | os.PathLike[str], backbone_model: nn.Module, *, check_backbone: bool = True, **kwargs: Any
    ) -> DeltaBase:
        """Load any delta checkpoint written by ``save_finetuned`` onto ``backbone_model`` (validated first)."""
        return load_delta(path, backbone_model, check_backbone=check_backbone, **kwargs)
