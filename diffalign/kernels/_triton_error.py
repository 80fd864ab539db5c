"""Triton backend of `per_sample_error` (and of the fused policy/reference pair).

Imported lazily by `error.py` only when the triton backend is chosen, so that importing
diffalign never imports triton. Whether the kernels below run compiled (CUDA) or in Triton's CPU
interpreter is decided by triton when they are decorated, i.e. by TRITON_INTERPRET at the time this
module is first imported; `INTERPRETED` records which.

Forward (`_error_fwd_kernel`): the (N, D) problem is cut into N * SPLIT programs; program (n, s) reads
its chunk of pred[n] and target[n] once, block by block, accumulating (pred - target)^2 in float32
registers. With SPLIT == 1 it writes the final error directly; otherwise it writes one partial sum and a
tiny second kernel (`_error_finalize_kernel`) adds the SPLIT partials of each row in a fixed order.
That two-stage reduction is deterministic (no atomics), so seeded runs stay bit-reproducible.

Backward (`_error_bwd_kernel`): one elementwise pass,
grad_pred = grad_out[n] * weight[n] * 2 / D * (pred - target), re-reading pred and target instead of
saving their difference, and writing grad_target = -grad_pred in the same pass when it is needed.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

# Launch parameters. Module-level so that benchmarks/kernels.py can sweep them; not a public API.
CONFIG = {
    "fwd_block": 1024,  # elements per load step of one forward program
    "fwd_warps": 4,
    "bwd_block": 2048,  # elements per backward program
    "bwd_warps": 4,
    "programs_per_sm": 8,  # forward grid target: SMs * this many programs
    "finalize_block": 128,
}


@triton.jit
def _store_row_errors(
    row,
    total,
    total_ref,
    inv_D,
    weight_ptr,
    out_ptr,
    out_ref_ptr,
    mse_ptr,
    HAS_REF: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
):
    # The one epilogue of both forward paths (SPLIT == 1 in the forward kernel, else the finalize kernel), so
    # they cannot drift apart: row sums -> means -> weighted errors. The unweighted mean goes to mse_ptr
    # because the backward needs it for the weight gradient.
    mse = total * inv_D
    mse_ref = total_ref * inv_D
    if HAS_WEIGHT:
        w = tl.load(weight_ptr + row).to(tl.float32)
        tl.store(mse_ptr + row, mse)
        mse = mse * w
        mse_ref = mse_ref * w
    tl.store(out_ptr + row, mse)
    if HAS_REF:
        tl.store(out_ref_ptr + row, mse_ref)


@triton.jit
def _error_fwd_kernel(
    pred_ptr,
    target_ptr,
    ref_ptr,
    weight_ptr,
    out_ptr,
    out_ref_ptr,
    mse_ptr,
    partial_ptr,
    partial_ref_ptr,
    D,
    CHUNK,
    SPLIT,
    inv_D,
    BLOCK: tl.constexpr,
    HAS_REF: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    FINAL: tl.constexpr,
):
    pid = tl.program_id(0)
    row = pid // SPLIT
    part = pid % SPLIT
    row_start = row.to(tl.int64) * D
    chunk_start = part.to(tl.int64) * CHUNK
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    acc_ref = tl.zeros([BLOCK], dtype=tl.float32)
    # CHUNK is a multiple of BLOCK and only the last chunk of a row runs past D, so `col < D` is the only mask.
    for i in range(0, CHUNK, BLOCK):
        col = chunk_start + i + offs
        mask = col < D
        t = tl.load(target_ptr + row_start + col, mask=mask, other=0.0).to(tl.float32)
        p = tl.load(pred_ptr + row_start + col, mask=mask, other=0.0).to(tl.float32)
        d = p - t
        acc += d * d
        if HAS_REF:
            r = tl.load(ref_ptr + row_start + col, mask=mask, other=0.0).to(tl.float32)
            dr = r - t
            acc_ref += dr * dr
    total = tl.sum(acc, axis=0)
    total_ref = tl.sum(acc_ref, axis=0)
    if FINAL:
        _store_row_errors(
            row, total, total_ref, inv_D, weight_ptr, out_ptr, out_ref_ptr, mse_ptr, HAS_REF, HAS_WEIGHT
        )
    else:
        tl.store(partial_ptr + pid, total)
        if HAS_REF:
            tl.store(partial_ref_ptr + pid, total_ref)


@triton.jit
def _error_finalize_kernel(
    partial_ptr,
    partial_ref_ptr,
    weight_ptr,
    out_ptr,
    out_ref_ptr,
    mse_ptr,
    SPLIT,
    inv_D,
    BLOCK: tl.constexpr,
    HAS_REF: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    base = row.to(tl.int64) * SPLIT
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    acc_ref = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, SPLIT, BLOCK):
        mask = i + offs < SPLIT
        acc += tl.load(partial_ptr + base + i + offs, mask=mask, other=0.0)
        if HAS_REF:
            acc_ref += tl.load(partial_ref_ptr + base + i + offs, mask=mask, other=0.0)
    total = tl.sum(acc, axis=0)
    total_ref = tl.sum(acc_ref, axis=0)
    _store_row_errors(row, total, total_ref, inv_D, weight_ptr, out_ptr, out_ref_ptr, mse_ptr, HAS_REF, HAS_WEIGHT)


@triton.jit
def _error_bwd_kernel(
    pred_ptr,
    target_ptr,
    grad_out_ptr,
    weight_ptr,
    grad_pred_ptr,
    grad_target_ptr,
    D,
    BLOCKS_PER_ROW,
    two_over_D,
    BLOCK: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    WRITE_GRAD_TARGET: tl.constexpr,
):
    pid = tl.program_id(0)
    row = pid // BLOCKS_PER_ROW
    blk = pid % BLOCKS_PER_ROW
    scale = tl.load(grad_out_ptr + row).to(tl.float32) * two_over_D
    if HAS_WEIGHT:
        scale = scale * tl.load(weight_ptr + row).to(tl.float32)
    col = blk.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = col < D
    idx = row.to(tl.int64) * D + col
    p = tl.load(pred_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    t = tl.load(target_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    g = scale * (p - t)
    tl.store(grad_pred_ptr + idx, g.to(grad_pred_ptr.dtype.element_ty), mask=mask)
    if WRITE_GRAD_TARGET:
        tl.store(grad_target_ptr + idx, (-g).to(grad_target_ptr.dtype.element_ty), mask=mask)


INTERPRETED = type(_error_fwd_kernel).__name__ == "InterpretedFunction"


@functools.lru_cache(maxsize=16)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # the CPU interpreter runs programs one after another: fewer, longer programs are faster


def _split_plan(n: int, d: int, device: torch.device, split: int | None = None) -> tuple[int, int]:
    """(SPLIT, CHUNK): programs per row and elements per program (a multiple of the block)."""
    block = CONFIG["fwd_block"]
    blocks_per_row = triton.cdiv(d, block)
    if split is None:
        split = triton.cdiv(_num_sms(device) * CONFIG["programs_per_sm"], n)
    split = max(1, min(int(split), blocks_per_row))
    chunk = triton.cdiv(blocks_per_row, split) * block
    return triton.cdiv(d, chunk), chunk


def _rows(x: torch.Tensor) -> torch.Tensor:
    # (N, ...) -> contiguous (N, D); copies only if x is not already row-major contiguous.
    return x.reshape(x.shape[0], -1).contiguous()


def _forward(pred2d, target2d, ref2d, weight, split=None):
    """Launch the forward; returns (out, out_ref or None, mse or None)."""
    n, d = pred2d.shape
    dev = pred2d.device
    out = torch.empty(n, device=dev, dtype=torch.float32)
    out_ref = torch.empty(n, device=dev, dtype=torch.float32) if ref2d is not None else None
    mse = torch.empty(n, device=dev, dtype=torch.float32) if weight is not None else None
    n_split, chunk = _split_plan(n, d, dev, split)
    final = n_split == 1
    partial = partial_ref = None
    if not final:
        partial = torch.empty(n * n_split, device=dev, dtype=torch.float32)
        if ref2d is not None:
            partial_ref = torch.empty(n * n_split, device=dev, dtype=torch.float32)
    # Unused pointer arguments get a valid tensor; the constexpr flags compile their uses away.
    dummy = out
    _error_fwd_kernel[(n * n_split,)](
        pred2d,
        target2d,
        ref2d if ref2d is not None else pred2d,
        weight if weight is not None else dummy,
        out,
        out_ref if out_ref is not None else dummy,
        mse if mse is not None else dummy,
        partial if partial is not None else dummy,
        partial_ref if partial_ref is not None else dummy,
        d,
        chunk,
        n_split,
        1.0 / d,
        BLOCK=CONFIG["fwd_block"],
        HAS_REF=ref2d is not None,
        HAS_WEIGHT=weight is not None,
        FINAL=final,
        num_warps=CONFIG["fwd_warps"],
    )
    if not final:
        _error_finalize_kernel[(n,)](
            partial,
            partial_ref if partial_ref is not None else partial,
            weight if weight is not None else dummy,
            out,
            out_ref if out_ref is not None else dummy,
            mse if mse is not None else dummy,
            n_split,
            1.0 / d,
            BLOCK=CONFIG["finalize_block"],
            HAS_REF=ref2d is not None,
            HAS_WEIGHT=weight is not None,
            num_warps=1,
        )
    return out, out_ref, mse


def _backward(pred2d, target2d, grad_out, weight, want_target_grad):
    n, d = pred2d.shape
    block = CONFIG["bwd_block"]
    blocks_per_row = triton.cdiv(d, block)
    grad_pred = torch.empty_like(pred2d)
    grad_target = torch.empty_like(target2d) if want_target_grad else None
    # autograd hands in expanded (stride-0) grads for e.g. err.sum(); the kernel indexes grad_out[row].
    grad_out = grad_out.to(torch.float32).contiguous()
    _error_bwd_kernel[(n * blocks_per_row,)](
        pred2d,
        target2d,
        grad_out,
        weight if weight is not None else grad_out,
        grad_pred,
        grad_target if grad_target is not None else grad_pred,
        d,
        blocks_per_row,
        2.0 / d,
        BLOCK=block,
        HAS_WEIGHT=weight is not None,
        WRITE_GRAD_TARGET=want_target_grad,
        num_warps=CONFIG["bwd_warps"],
    )
    return grad_pred, grad_target


class _PerSampleError(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pred, target, weight, split):
        out, _ = _forward_for_autograd(ctx, pred, target, None, weight, split)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        need_pred, need_target, need_weight = ctx.needs_input_grad[:3]
        return (*_input_grads(ctx, grad_out, need_pred, need_target, need_weight), None)


def _forward_for_autograd(ctx, pred, target, ref, weight, split):
    """Forward of both autograd Functions: launch on (N, D) views and save what `_input_grads` reads back.

    One place for the save so that its layout always matches `_input_grads` (ref is never saved: its error
    is a constant). Returns (out, out_ref or None).
    """
    pred2d, target2d = _rows(pred), _rows(target)
    weight_c = weight.contiguous() if weight is not None else None
    out, out_ref, mse = _forward(pred2d, target2d, None if ref is None else _rows(ref), weight_c, split)
    ctx.save_for_backward(pred2d, target2d, weight_c, mse)
    ctx.shapes = (pred.shape, target.shape)
    return out, out_ref


def _input_grads(ctx, grad_out, need_pred, need_target, need_weight):
    pred2d, target2d, weight, mse = ctx.saved_tensors
    grad_pred = grad_target = grad_weight = None
    if need_pred or need_target:
        grad_pred, grad_target = _backward(pred2d, target2d, grad_out, weight, need_target)
        grad_pred = grad_pred.view(ctx.shapes[0]) if need_pred else None
        if grad_target is not None:
            grad_target = grad_target.view(ctx.shapes[1])
    if need_weight:
        grad_weight = (grad_out.to(torch.float32) * mse).to(weight.dtype)
    return grad_pred, grad_target, grad_weight


def per_sample_error_triton(pred, target, weight=None, split=None):
    """Triton implementation; inputs are assumed validated by `error.per_sample_error`.

    ``split`` overrides the number of programs per sample (tests use it to cover both reduction paths).
    """
    return _PerSampleError.apply(pred, target, weight, split)


def per_sample_error_pair_triton(policy_pred, ref_pred, target, weight=None, split=None):
    """Fused (policy, reference, target) forward that reads target once; err_ref is a constant."""
    return _PerSampleErrorPair.apply(policy_pred, ref_pred, target, weight, split)


class _PerSampleErrorPair(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pred, ref, target, weight, split):
        out, out_ref = _forward_for_autograd(ctx, pred, target, ref, weight, split)
        ctx.mark_non_differentiable(out_ref)
        return out, out_ref

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, _grad_out_ref):
        need_pred, _, need_target, need_weight = ctx.needs_input_grad[:4]
        grad_pred, grad_target, grad_weight = _input_grads(ctx, grad_out, need_pred, need_target, need_weight)
        return grad_pred, None, grad_target, grad_weight, None
