"""Configuration: dataclasses loaded from YAML, with precedence defaults < YAML < ``--set key=value``.

This package must stay importable without torch or ray (``chatray --help`` imports it).

* :mod:`chatray.config.loading`   the YAML -> dataclass machinery (``opt``, ``load_config``, ``ConfigError``)
* :mod:`chatray.config.finetune`  the fine-tuning run config and its sections
"""

from chatray.config.finetune import (
    CheckpointSection,
    DataSection,
    EvalSection,
    FinetuneConfig,
    ModelSection,
    RunSection,
    ScalingSection,
    TrainSection,
)
from chatray.config.loading import ConfigError, field_help, from_dict, load_config, opt, parse_overrides, to_dict

__all__ = [
    "CheckpointSection",
    "ConfigError",
    "DataSection",
    "EvalSection",
    "FinetuneConfig",
    "ModelSection",
    "RunSection",
    "ScalingSection",
    "TrainSection",
    "field_help",
    "from_dict",
    "load_config",
    "opt",
    "parse_overrides",
    "to_dict",
]
