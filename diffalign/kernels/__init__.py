"""Fused per-sample error kernels with eager torch twins and one dispatch point.

`per_sample_error(pred, target, weight=None, backend="auto")` is the contract the objectives and the
trainer use; see `error.py` for backends, gradients and precision.
"""

from .error import (
    ENV_VAR,
    available_backends,
    check_inputs,
    per_sample_error,
    per_sample_error_pair,
    per_sample_error_pair_torch,
    per_sample_error_torch,
    resolve_backend,
)

__all__ = [
    "ENV_VAR",
    "available_backends",
    "check_inputs",
    "per_sample_error",
    "per_sample_error_pair",
    "per_sample_error_pair_torch",
    "per_sample_error_torch",
    "resolve_backend",
]
