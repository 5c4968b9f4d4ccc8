"""Models: the ``tiny`` preset (GPT-2 from a config) and pretrained GPT-2-family checkpoints (HF, safetensors).

Importing this package is cheap: torch/transformers load when a function is called.
"""

from chatray.model.loading import (
    build_model,
    config_context_length,
    load_model,
    load_model_tokenizer,
    model_context_length,
    model_source,
    quiet_transformers,
    resolve_device,
    resolve_dtype,
    save_model,
)
from chatray.model.presets import GPT2_ARCH, HUB_PRESETS, TINY, is_tiny, tiny_config

__all__ = [
    "GPT2_ARCH",
    "HUB_PRESETS",
    "TINY",
    "build_model",
    "config_context_length",
    "is_tiny",
    "load_model",
    "load_model_tokenizer",
    "model_context_length",
    "model_source",
    "quiet_transformers",
    "resolve_device",
    "resolve_dtype",
    "save_model",
    "tiny_config",
]
