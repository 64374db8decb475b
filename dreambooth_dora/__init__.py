"""DreamBooth fine-tuning of Stable Diffusion with DoRA (and LoRA as the baseline)."""

from .adapters.inject import (
    adapted_layers,
    adapter_parameters,
    adapter_state_dict,
    add_adapters,
    load_adapter_state_dict,
    merge_adapters,
    set_adapters_enabled,
)
from .families.sd import TEXT_ENCODER_TARGETS, UNET_ATTENTION_TARGETS
from .adapters.dora import AdaptedConv2d, AdaptedLayer, AdaptedLinear
from .adapters.file import AdapterError, load_adapter, read_adapter

__all__ = [
    "TEXT_ENCODER_TARGETS", "UNET_ATTENTION_TARGETS", "AdaptedConv2d", "AdaptedLayer", "AdaptedLinear", "AdapterError",
    "adapted_layers", "adapter_parameters", "adapter_state_dict", "add_adapters", "load_adapter",
    "load_adapter_state_dict", "merge_adapters", "read_adapter", "set_adapters_enabled",
]
__version__ = "0.1.0"
