"""The delta methods, one file each; importing this package registers them."""

from .adapter import AdapterConfig, AdapterModel
from .bitfit import BitFitConfig, BitFitModel
from .compacter import CompacterConfig, CompacterModel
from .dora import DoraConfig, DoraModel
from .lora import LoraConfig, LoraModel
from .low_rank_adapter import LowRankAdapterConfig, LowRankAdapterModel
from .parallel_adapter import ParallelAdapterConfig, ParallelAdapterModel
from .prefix import PrefixConfig, PrefixModel
from .soft_prompt import SoftPromptConfig, SoftPromptModel

__all__ = [
    "AdapterConfig",
    "AdapterModel",
    "BitFitConfig",
    "BitFitModel",
    "CompacterConfig",
    "CompacterModel",
    "DoraConfig",
    "DoraModel",
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
]
