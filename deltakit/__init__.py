"""deltakit: delta tuning (parameter-efficient fine-tuning) for any PyTorch / transformers model.

Wrap an existing model in a few lines; deltas are injected with hooks, detach exactly, and save only their own
weights::

    from deltakit import LoraModel
    delta = LoraModel(backbone_model=model, modified_modules=["query", "value"], lora_r=8, lora_alpha=16)
    delta.freeze_module(exclude=["deltas", "classifier"])
"""

from ._version import __version__
from .addressing import find_modules
from .auto import (
    AutoDeltaConfig,
    AutoDeltaModel,
    AutoDeltaModelForCausalLM,
    AutoDeltaModelForSeq2SeqLM,
    AutoDeltaModelForSequenceClassification,
    AutoDeltaModelForTokenClassification,
)
from .base import DeltaBase
from .combine import combine_loras
from .composite import CompositeDelta
from .config import DeltaConfig
from .deltas import (
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
from .deltas.dora import DoraConfig, DoraModel
from .deltas.ia3 import IA3Config, IA3Model
from .deltas.vera import VeraConfig, VeraModel
from .deltas.prefix import PTuningV2Config, PTuningV2Model
from .errors import (
    CheckpointError,
    DeltaConfigError,
    DeltaError,
    DeltaStateError,
    ModuleMatchError,
    UnsupportedModuleError,
)
from .optim import create_loraplus_optimizer, loraplus_parameter_groups
from .search import CandidateSet, Structure, StructureSearch
from .serving import DeltaGroup
from .visualization import Visualization

__all__ = [
    "AdapterConfig",
    "AdapterModel",
    "AutoDeltaConfig",
    "AutoDeltaModel",
    "AutoDeltaModelForCausalLM",
    "AutoDeltaModelForSeq2SeqLM",
    "AutoDeltaModelForSequenceClassification",
    "AutoDeltaModelForTokenClassification",
    "BitFitConfig",
    "BitFitModel",
    "CandidateSet",
    "CheckpointError",
    "CompacterConfig",
    "CompacterModel",
    "CompositeDelta",
    "DeltaBase",
    "DeltaConfig",
    "DeltaConfigError",
    "DeltaError",
    "DeltaGroup",
    "DeltaStateError",
    "DoraConfig",
    "DoraModel",
    "IA3Config",
    "IA3Model",
    "LoraConfig",
    "LoraModel",
    "LowRankAdapterConfig",
    "LowRankAdapterModel",
    "ModuleMatchError",
    "PTuningV2Config",
    "PTuningV2Model",
    "ParallelAdapterConfig",
    "ParallelAdapterModel",
    "PrefixConfig",
    "PrefixModel",
    "SoftPromptConfig",
    "SoftPromptModel",
    "Structure",
    "StructureSearch",
    "UnsupportedModuleError",
    "VeraConfig",
    "VeraModel",
    "Visualization",
    "__version__",
    "combine_loras",
    "create_loraplus_optimizer",
    "find_modules",
    "loraplus_parameter_groups",
]
