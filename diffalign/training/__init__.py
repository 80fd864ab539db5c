"""Preference training: `TrainConfig` (YAML + key=value overrides) and the accelerate `PreferenceTrainer`."""

from diffalign.training.config import TrainConfig, parse_overrides
from diffalign.training.trainer import ConditioningHook, NonFiniteLossError, PreferenceTrainer, train

__all__ = ["ConditioningHook", "NonFiniteLossError", "PreferenceTrainer", "TrainConfig", "parse_overrides", "train"]
