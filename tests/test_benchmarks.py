"""The benchmark scripts' own configs stay valid as the library moves (they are not run in CI)."""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_vs_diffusers_config_is_a_valid_train_config():
    from diffalign.training import TrainConfig

    bench = _load("vs_diffusers")
    cfg = TrainConfig.from_dict(bench.ours_config("tiny:sdxl", "data", "cache", 64, "none"))
    assert cfg.objective == "dpo" and cfg.beta == 5000.0 and cfg.train_batch_size == 2
