"""The delta methods, one file each; importing this package registers them."""

from .bitfit import BitFitConfig, BitFitModel
from .lora import LoraConfig, LoraModel

__all__ = ["BitFitConfig", "BitFitModel", "LoraConfig", "LoraModel"]
