"""deltakit: delta tuning (parameter-efficient fine-tuning) for any PyTorch / transformers model.

Wrap an existing model in a few lines; deltas are injected with hooks, detach exactly, and save only their own
weights::

    from deltakit import LoraModel
    delta = LoraModel(backbone_model=model, modified_modules=["query", "value"], lora_r=8, lora_alpha=16)
    delta.freeze_module(exclude=["deltas", "classifier"])
"""

__version__ = "0.1.0"

from .addressing import find_modules  # noqa: E402
from .auto import AutoDeltaModel  # noqa: E402
from .base import DeltaBase  # noqa: E402
from .config import AutoDeltaConfig, DeltaConfig  # noqa: E402
from .deltas import (  # noqa: E402
    AdapterConfig,
    AdapterModel,
    BitFitConfig,
    BitFitModel,
    CompacterConfig,
    CompacterModel,
    LoraConfig,
    LoraModel,
    LowRankAdapterConfig,
    LowRankAdapterModel,
    ParallelAdapterConfig,
    ParallelAdapterModel,
    PrefixConfig,
    PrefixModel,
    SoftPromptConfig,
    SoftPromptModel,
)
from .errors import (  # noqa: E402
    CheckpointError,
    DeltaConfigError,
    DeltaError,
    DeltaStateError,
    ModuleMatchError,
    UnsupportedModuleError,
)
from .serving import DeltaGroup  # noqa: E402
from .visualization import Visualization  # noqa: E402

__all__ = [
    "AdapterConfig",
    "AdapterModel",
    "AutoDeltaConfig",
    "AutoDeltaModel",
    "BitFitConfig",
    "BitFitModel",
    "CheckpointError",
    "CompacterConfig",
    "CompacterModel",
    "DeltaBase",
    "DeltaConfig",
    "DeltaConfigError",
    "DeltaError",
    "DeltaGroup",
    "DeltaStateError",
    "LoraConfig",
    "LoraModel",
    "LowRankAdapterConfig",
    "LowRankAdapterModel",
    "ModuleMatchError",
    "ParallelAdapterConfig",
    "ParallelAdapterModel",
    "PrefixConfig",
    "PrefixModel",
    "SoftPromptConfig",
    "SoftPromptModel",
    "UnsupportedModuleError",
    "Visualization",
    "__version__",
    "find_modules",
]
