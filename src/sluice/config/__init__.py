"""One typed config tree; see sections.py for every field and parser.py for the CLI and YAML."""

from sluice.config.sections import (
    AlgorithmConfig,
    CheckpointConfig,
    Config,
    DataConfig,
    EngineConfig,
    EvalConfig,
    LoggingConfig,
    ModelConfig,
    RewardConfig,
    RolloutConfig,
    TrainConfig,
)

__all__ = [
    "AlgorithmConfig", "CheckpointConfig", "Config", "DataConfig", "EngineConfig", "EvalConfig",
    "LoggingConfig", "ModelConfig", "RewardConfig", "RolloutConfig", "TrainConfig",
]
