"""The run configuration: one typed dataclass per section, a strict YAML loader and dotted overrides.

A YAML file is an instance of `Config`; `section.key=value` on the command line overrides one leaf.
Every problem (unknown key, wrong type, value out of range) is collected and reported at once, before
anything is built.

The sections live in modules of their own (`model`, `data`, `train`, `validation`), the typed builder in
`building`, the whole `Config` and its loader in `loading`; import every name from here, `finetune.config`.
"""

from .building import _build
from .data import DataConfig, FilterConfig, held_out_section
from .errors import ConfigError
from .loading import Config, apply_overrides, config_yaml, load_config, save_config
from .model import LoraConfig, ModelConfig, TextualInversionConfig
from .train import TRACKERS, PriorConfig, TrainConfig
from .validation import HubConfig, ValidationConfig, ValidationPrompt

__all__ = [
    "Config", "ConfigError", "DataConfig", "FilterConfig", "HubConfig", "LoraConfig", "ModelConfig", "PriorConfig",
    "TRACKERS", "TextualInversionConfig", "TrainConfig", "ValidationConfig", "ValidationPrompt", "apply_overrides",
    "config_yaml", "held_out_section", "load_config", "save_config",
    "_build",  # the loader's builder, which finetune.prior and finetune.data.mixing build their own sections with
]
