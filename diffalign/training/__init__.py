"""Preference training: `TrainConfig` (YAML + key=value overrides) and the accelerate `PreferenceTrainer`.

The trainer loads on first use, so rooms below it (personalization's PPD hook) can import `training.hooks`
without importing the trainer.
"""

from diffalign.training.config import TrainConfig, parse_overrides
from diffalign.training.hooks import ConditioningHook

__all__ = ["ConditioningHook", "NonFiniteLossError", "PreferenceTrainer", "TrainConfig", "parse_overrides", "train"]
_TRAINER_NAMES = ("NonFiniteLossError", "PreferenceTrainer", "train")


def __getattr__(name):
    if name in _TRAINER_NAMES:
        from diffalign.training import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'diffalign.training' has no attribute {name!r}")
