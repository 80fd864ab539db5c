"""Per-sample denoising error: the one dispatch point and its eager torch twin.

err[n] = weight[n] * mean over all non-batch dims of (pred[n] - target[n])^2

This is the quantity every objective consumes (see docs/architecture.md). Two backends compute it:

- ``torch``: plain eager ops (`per_sample_error_torch`). The reference twin that tests compare against.
- ``triton``: one fused read of pred and target in the forward, one fused gradient write in the
  backward (`diffalign/kernels/_triton_error.py`). Never materialises the difference or its square.

Backend choice: an explicit ``backend="torch"|"triton"`` argument wins; with ``backend="auto"`` the
environment variable ``DIFFALIGN_KERNELS=torch|triton`` forces one; otherwise Triton is used for CUDA
tensors of dtype float16/bfloat16/float32 when triton imports, and torch everywhere else.

Gradients: ``err`` is differentiable with respect to ``pred``, ``target`` and ``weight`` on both
backends (the trainer only needs ``pred``; the others are supported so that nothing is silently
dropped). Double backward is supported by the torch backend only.

Precision: the accumulation and the output are float32 for float16/bfloat16/float32 inputs (float64
inputs give a float64 result on the torch backend, which gradcheck uses). Gradients take the dtype of
the input they belong to.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

ENV_VAR = "DIFFALIGN_KERNELS"
BACKENDS = ("torch", "triton")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------- validation


def _check_tensor(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(
            f"{name} must be a floating-point tensor, got dtype {x.dtype}; cast it with .float()"
        )


def check_inputs(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> None:
    """Raise a ValueError/TypeError naming the problem if (pred, target, weight) are not a valid input."""
    _check_tensor("pred", pred)
    _check_tensor("target", target)
    if pred.dim() < 2:
        raise ValueError(
            f"pred must have a batch dim and at least one more dim, got shape {tuple(pred.shape)}; "
            "for one value per sample use pred.unsqueeze(1)"
        )
    if pred.shape != target.shape:
        raise ValueError(
            f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}; "
            "per_sample_error does not broadcast, pass tensors of the same shape"
        )
    if pred.shape[0] == 0:
        raise ValueError(f"empty batch: pred has shape {tuple(pred.shape)}; pass at least one sample")
    if pred.numel() == 0:
        raise ValueError(
            f"pred has zero elements per sample (shape {tuple(pred.shape)}); the mean over non-batch dims is undefined"
        )
    if pred.device != target.device:
        raise ValueError(
            f"pred is on {pred.device} but target is on {target.device}; move them to one device"
        )
    if weight is not None:
        _check_tensor("weight", weight)
        n = pred.shape[0]
        if weight.shape != (n,):
            raise ValueError(
                f"weight must have shape ({n},) (one value per sample), got {tuple(weight.shape)}; "
                "flatten a per-sample (N, 1, 1, 1) weighting with weight.reshape(-1)"
            )
        if weight.device != pred.device:
            raise ValueError(
                f"weight is on {weight.device} but pred is on {pred.device}; move it to one device"
            )


def _acc_dtype(*tensors: torch.Tensor) -> torch.dtype:
    # float32 at least (never accumulate in half precision); float64 if an input is float64.
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


# ----------------------------------------------------------------------------- torch twin


def per_sample_error_torch(
    pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Eager reference: weight[n] * mean over non-batch dims of (pred - target)^2, accumulated in float32+."""
    check_inputs(pred, target, weight)
    acc = _acc_dtype(pred, target)
    err = (pred.to(acc) - target.to(acc)).square().flatten(1).mean(dim=1)
    if weight is not None:
        err = err * weight.to(acc)
    return err


def per_sample_error_pair_torch(
    policy_pred: torch.Tensor,
    ref_pred: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager reference of `per_sample_error_pair`: (err_policy, err_ref), err_ref is a constant."""
    _check_pair(policy_pred, ref_pred, target, weight)
    err_policy = per_sample_error_torch(policy_pred, target, weight)
    with torch.no_grad():
        err_ref = per_sample_error_torch(ref_pred, target, weight)
    return err_policy, err_ref


def _check_pair(policy_pred, ref_pred, target, weight) -> None:
    check_inputs(policy_pred, target, weight)
    _check_tensor("ref_pred", ref_pred)
    if ref_pred.shape != policy_pred.shape:
        raise ValueError(
            f"ref_pred and policy_pred shapes differ: {tuple(ref_pred.shape)} vs {tuple(policy_pred.shape)}"
        )
    if ref_pred.device != policy_pred.device:
        raise ValueError(f"ref_pred is on {ref_pred.device} but policy_pred is on {policy_pred.device}")
    if ref_pred.requires_grad:
        raise ValueError(
            "ref_pred requires grad, but the reference error is returned as a constant (the reference model "
            "is frozen); pass ref_pred.detach(), or call per_sample_error(ref_pred, target) if you need its gradient"
        )


# ----------------------------------------------------------------------------- dispatch


@functools.lru_cache(maxsize=1)
def triton_importable() -> bool:
    """True if `import triton` works in this process (checked once)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
    except Exception:  # a broken install counts as absent
        return False
    return True


def _triton_module():
    if not triton_importable():
        raise ImportError(
            "the triton backend was requested but triton is not importable; install it with "
            f"`pip install 'diffalign[triton]'`, or use backend='torch' / {ENV_VAR}=torch"
        )
    from . import _triton_error

    return _triton_error


def available_backends() -> list[str]:
    """Backends usable in this process: always 'torch'; 'triton' when triton imports and it can run
    (a CUDA device, or the CPU interpreter enabled by TRITON_INTERPRET=1 before triton was imported)."""
    names = ["torch"]
    if triton_importable():
        if torch.cuda.is_available() or _triton_module().INTERPRETED:
            names.append("triton")
    return names


def resolve_backend(backend: str, *tensors: torch.Tensor) -> str:
    """Turn a backend request ("auto", "torch", "triton") into the backend that will run, or raise.

    ``tensors`` are the large inputs (pred, target, ...); their device and dtype decide "auto".
    """
    if backend not in ("auto", *BACKENDS):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    if backend == "auto":
        forced = os.environ.get(ENV_VAR, "").strip().lower()
        if forced:
            if forced not in BACKENDS:
                raise ValueError(
                    f"{ENV_VAR}={os.environ[ENV_VAR]!r} is not a backend; set it to 'torch' or 'triton', or unset it"
                )
            backend = forced
        else:
            on_cuda = all(t.is_cuda for t in tensors)
            dtypes_ok = all(t.dtype in TRITON_DTYPES for t in tensors)
            return "triton" if on_cuda and dtypes_ok and triton_importable() else "torch"
    if backend == "triton":
        module = _triton_module()
        for t in tensors:
            if t.dtype not in TRITON_DTYPES:
                raise ValueError(
                    f"the triton backend supports float16, bfloat16 and float32 inputs, got {t.dtype}; "
                    "use backend='torch' for float64"
                )
            if not t.is_cuda and not module.INTERPRETED:
                raise ValueError(
                    f"the triton backend needs CUDA tensors, got a tensor on {t.device}; use backend='torch' "
                    "(or set TRITON_INTERPRET=1 before triton is first imported to run the slow CPU interpreter)"
                )
    return backend


def per_sample_error(
    pred: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Per-sample weighted mean squared error, shape (N,), float32.

    Args:
        pred: model prediction, shape (N, ...), float16/bfloat16/float32 (float64: torch backend only).
        target: the regression target, same shape as ``pred``; dtype may differ from ``pred``'s.
        weight: optional per-sample weight, shape (N,) (e.g. the SD3 sigma weighting).
        backend: "auto" (default), "torch" or "triton"; see the module docstring.

    Returns:
        err with err[n] = weight[n] * mean((pred[n] - target[n])^2), differentiable w.r.t. pred,
        target and weight.
    """
    check_inputs(pred, target, weight)
    if resolve_backend(backend, pred, target) == "torch":
        return per_sample_error_torch(pred, target, weight)
    return _triton_module().per_sample_error_triton(pred, target, weight)


def per_sample_error_pair(
    policy_pred: torch.Tensor,
    ref_pred: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(err_policy, err_ref) = per-sample errors of the policy and of the frozen reference on one target.

    The Triton backend reads ``target`` once for both. ``err_policy`` is differentiable exactly as in
    `per_sample_error`; ``err_ref`` is a constant (no gradient flows from it), and ``ref_pred`` must not
    require grad.
    """
    _check_pair(policy_pred, ref_pred, target, weight)
    if resolve_backend(backend, policy_pred, ref_pred, target) == "torch":
        return per_sample_error_pair_torch(policy_pred, ref_pred, target, weight)
    return _triton_module().per_sample_error_pair_triton(policy_pred, ref_pred, target, weight)
