"""One typed config tree; see sections.py for every field and parser.py for the CLI and YAML."""

from sluice.config.checks import validate
from sluice.errors import ConfigError
from sluice.config.parser import build_parser, parse_config
from sluice.config.sections import (
    BUILTIN_REWARDS,
    AlgorithmConfig,
    CheckpointConfig,
    Config,
    DataConfig,
    DebugConfig,
    EngineConfig,
    EvalConfig,
    LoggingConfig,
    ModelConfig,
    RewardConfig,
    RolloutConfig,
    TrainConfig,
)
from sluice.config.yaml_file import config_to_dict, save_config

__all__ = [
    "AlgorithmConfig", "CheckpointConfig", "Config", "DataConfig", "DebugConfig", "EngineConfig", "EvalConfig",
    "LoggingConfig", "ModelConfig", "RewardConfig", "RolloutConfig", "TrainConfig",
    "BUILTIN_REWARDS", "ConfigError", "build_parser", "config_to_dict", "parse_config", "save_config",
    "validate",
]
