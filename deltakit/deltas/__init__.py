"""The delta methods, one file each; importing this package registers them."""

from .adapter import AdapterConfig, AdapterModel
from .bitfit import BitFitConfig, BitFitModel
from .compacter import CompacterConfig, CompacterModel
from .dora import DoraConfig, DoraModel
from .ia3 import IA3Config, IA3Model
from .lora import LoraConfig, LoraModel
from .low_rank_adapter import LowRankAdapterConfig, LowRankAdapterModel
from .parallel_adapter import ParallelAdapterConfig, ParallelAdapterModel
from .prefix import PrefixConfig, PrefixModel
from .soft_prompt import SoftPromptConfig, SoftPromptModel
from .vera import VeraConfig, VeraModel

__all__ = [
    "AdapterConfig",
    "AdapterModel",
    "BitFitConfig",
    "BitFitModel",
    "CompacterConfig",
    "CompacterModel",
    "DoraConfig",
    "DoraModel",
    "IA3Config",
    "IA3Model",
    "LoraConfig",
    "LoraModel",
    "LowRankAdapterConfig",
    "LowRankAdapterModel",
    "ParallelAdapterConfig",
    "ParallelAdapterModel",
    "PrefixConfig",
    "PrefixModel",
    "SoftPromptConfig",
    "SoftPromptModel",
    "VeraConfig",
    "VeraModel",
]
