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
from .adapters.pivotal import insert_tokens
from .families.models import resolve_model

# Model cards written before the package moved into its wings import from these paths; they keep working.
import sys as _sys

from .adapters import pivotal as _pivotal
from .families import models as _models

_sys.modules.setdefault(__name__ + ".pivotal", _pivotal)
_sys.modules.setdefault(__name__ + ".models", _models)

__all__ = [
    "TEXT_ENCODER_TARGETS", "UNET_ATTENTION_TARGETS", "AdaptedConv2d", "AdaptedLayer", "AdaptedLinear", "AdapterError",
    "adapted_layers", "adapter_parameters", "adapter_state_dict", "add_adapters", "load_adapter",
    "load_adapter_state_dict", "merge_adapters", "read_adapter", "set_adapters_enabled", "insert_tokens", "resolve_model",
]
__version__ = "0.1.0"
