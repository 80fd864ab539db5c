"""Tests of diffalign.kernels.per_sample_error: the torch twin, the Triton kernels, dispatch and validation.

Triton-vs-torch parity runs the Triton kernels in Triton's CPU interpreter (TRITON_INTERPRET=1).
Triton decides interpreter-or-compiler when a kernel is decorated, i.e. when
diffalign.kernels._triton_error is first imported, and it also reads the variable when triton itself is
imported. pytest runs every test file in one process, and any of them may import triton first (torch
imports it lazily too), so setting the variable from here would depend on test order. Instead the
interpreter checks run in ONE fresh subprocess (this file, run as a script with --interpret-child) whose
environment sets TRITON_INTERPRET=1 from the start; it prints the measured differences as JSON and the
parametrised tests below assert on them case by case. One subprocess keeps the cost (import torch once,
about 2 s, plus ~10 s of interpreted kernels) low. Cases are fp32 (the interpreter has no bf16
arithmetic) plus one fp16-pred case, which numpy handles.

Known environment limit: triton 3.6's interpreter with numpy 2.5 fails on any runtime loop bound
("only 0-dimensional arrays can be converted to Python scalars", seen on the GPU image); triton 3.8,
which this project installs, works. The compiled kernels are checked by test_cuda_triton_matches_torch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import diffalign.kernels as K
from diffalign.kernels import error as pse_module

REPO_ROOT = Path(__file__).resolve().parents[1]

# (name, shape, use_weight, split, extra) -- split=None uses the launch heuristic; the interpreter counts
# one SM, so the heuristic gives min(cdiv(8, N), blocks per row) programs per sample.
INTERPRET_CASES = [
    ("odd_3x5x7", (3, 5, 7), False, None, {}),
    ("odd_3x5x7_weight", (3, 5, 7), True, None, {}),
    ("batch1_weight", (1, 4, 9, 13), True, None, {}),  # D=468 < one block
    ("d_not_block_multiple_split", (2, 2500), False, None, {}),  # 3 blocks per row, 3 programs per row
    ("d_not_block_multiple_onepass", (2, 2500), True, 1, {}),  # one program loops over 3 blocks
    ("uneven_split_weight", (3, 7001), True, 4, {}),  # 7 blocks over 4 programs: chunks of 2,2,2,1 blocks
    ("large_n", (512, 3, 3), True, None, {}),  # 512 programs, direct (FINAL) path
    ("large_n_split", (129, 3000), False, 2, {}),  # partials + finalize kernel for many rows
    ("target_and_weight_grad", (3, 2, 50), True, 2, {"target_grad": True, "weight_grad": True}),
    ("non_contiguous", (4, 6, 5), True, None, {"transpose": True}),
    ("fp16_pred_fp32_target", (3, 100), False, None, {"pred_dtype": "float16"}),
    ("sum_backward_expanded_grad", (5, 33), True, None, {"sum_backward": True}),
]


def _run_interpret_cases() -> dict:
    """Child side: runs inside the TRITON_INTERPRET=1 subprocess. Returns {case: measurements}."""
    from diffalign.kernels import _triton_error as te

    if not te.INTERPRETED:
        raise RuntimeError("TRITON_INTERPRET=1 was set but the kernels were compiled, not interpreted")
    results = {"interpreted": te.INTERPRETED, "available": K.available_backends()}
    gen = torch.Generator().manual_seed(0)
    for name, shape, use_weight, split, extra in INTERPRET_CASES:
        pred_dtype = getattr(torch, extra.get("pred_dtype", "float32"))
        pred = torch.randn(shape, generator=gen).to(pred_dtype)
        target = torch.randn(shape, generator=gen)
        weight = torch.rand(shape[0], generator=gen) + 0.5 if use_weight else None
        if extra.get("transpose"):
            pred, target = pred.transpose(1, 2), target.transpose(1, 2)  # non-contiguous views
        grads_of = {"pred": pred}
        if extra.get("target_grad"):
            grads_of["target"] = target
        if extra.get("weight_grad"):
            grads_of["weight"] = weight
        outs = {}
        for backend in ("torch", "triton"):
            leaves = {k: v.detach().clone().requires_grad_(True) for k, v in grads_of.items()}
            p = leaves.get("pred")
            t = leaves.get("target", target)
            w = leaves.get("weight", weight)
            if backend == "triton":
                err = te.per_sample_error_triton(p, t, w, split=split)
            else:
                err = K.per_sample_error_torch(p, t, w)
            if extra.get("sum_backward"):
                (err.sum() * 3.0).backward()  # autograd passes an expanded, stride-0 grad_out
            else:
                g = torch.linspace(-1.0, 2.0, shape[0])
                err.backward(g)
            outs[backend] = (err.detach(), {k: v.grad for k, v in leaves.items()})
        (ref, ref_grads), (tri, tri_grads) = outs["torch"], outs["triton"]
        case = {
            "value_dtype": str(tri.dtype),
            "value_shape": list(tri.shape),
            "value_diff": (tri - ref).abs().max().item(),
            "value_scale": ref.abs().max().item(),
            "grads": {},
        }
        for k in ref_grads:
            case["grads"][k] = {
                "dtype": str(tri_grads[k].dtype),
                "expected_dtype": str(ref_grads[k].dtype),
                "shape_ok": tri_grads[k].shape == ref_grads[k].shape,
                "diff": (tri_grads[k].float() - ref_grads[k].float()).abs().max().item(),
                "scale": ref_grads[k].float().abs().max().item(),
            }
        results[name] = case

    # The fused pair: values of both errors and the policy gradient, against the torch twin.
    shape = (3, 4, 301)
    policy = torch.randn(shape, generator=gen)
    ref_pred = torch.randn(shape, generator=gen)
    target = torch.randn(shape, generator=gen)
    weight = torch.rand(3, generator=gen)
    pair = {}
    for backend in ("torch", "triton"):
        p = policy.clone().requires_grad_(True)
        e_pol, e_ref = K.per_sample_error_pair(p, ref_pred, target, weight, backend=backend)
        e_pol.backward(torch.tensor([1.0, -2.0, 0.5]))
        pair[backend] = (e_pol.detach(), e_ref, p.grad, e_ref.requires_grad)
    results["pair"] = {
        "policy_diff": (pair["triton"][0] - pair["torch"][0]).abs().max().item(),
        "ref_diff": (pair["triton"][1] - pair["torch"][1]).abs().max().item(),
        "grad_diff": (pair["triton"][2] - pair["torch"][2]).abs().max().item(),
        "scale": pair["torch"][1].abs().max().item(),
        "ref_requires_grad": pair["triton"][3],
    }

    # Dispatch under the interpreter: the env variable forces triton for CPU tensors.
    os.environ[K.ENV_VAR] = "triton"
    x, y = torch.randn(2, 10, generator=gen), torch.randn(2, 10, generator=gen)
    results["env_forced"] = {
        "resolved": K.resolve_backend("auto", x, y),
        "diff": (K.per_sample_error(x, y) - K.per_sample_error_torch(x, y)).abs().max().item(),
    }
    del os.environ[K.ENV_VAR]
    return results


@pytest.fixture(scope="module")
def interpreted():
    env = dict(os.environ)
    env.update(TRITON_INTERPRET="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    env.pop(K.ENV_VAR, None)
    proc = subprocess.run(
        [sys.executable, __file__, "--interpret-child"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO_ROOT,
    )
    if proc.returncode != 0:
        pytest.fail(f"interpreter subprocess failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _close(diff: float, scale: float, rtol: float = 1e-5, atol: float = 1e-6) -> bool:
    return diff <= atol + rtol * scale


def test_interpreter_really_ran(interpreted):
    assert interpreted["interpreted"] is True
    assert "triton" in interpreted["available"]


@pytest.mark.parametrize("name", [c[0] for c in INTERPRET_CASES])
def test_triton_matches_torch_twin_values_and_grads(interpreted, name):
    case = interpreted[name]
    shape = next(c[1] for c in INTERPRET_CASES if c[0] == name)
    assert case["value_dtype"] == "torch.float32"
    assert case["value_shape"] == [shape[0]]
    assert case["value_scale"] > 0
    assert _close(case["value_diff"], case["value_scale"]), case
    for k, g in case["grads"].items():
        assert g["dtype"] == g["expected_dtype"], (k, g)
        assert g["shape_ok"], (k, g)
        assert g["scale"] > 0, (k, g)
        assert _close(g["diff"], g["scale"]), (k, g)
    expected = {"pred"} | ({"target", "weight"} if name == "target_and_weight_grad" else set())
    assert set(case["grads"]) == expected


def test_triton_pair_matches_torch_twin(interpreted):
    pair = interpreted["pair"]
    assert pair["scale"] > 0
    for key in ("policy_diff", "ref_diff", "grad_diff"):
        assert _close(pair[key], pair["scale"]), pair
    assert pair["ref_requires_grad"] is False


def test_env_forces_triton_under_interpreter(interpreted):
    assert interpreted["env_forced"]["resolved"] == "triton"
    assert interpreted["env_forced"]["diff"] < 1e-6


# ----------------------------------------------------------------------------- torch twin


def test_torch_twin_hand_checked():
    pred = torch.tensor([[1.0, 2.0], [3.0, 5.0]])
    target = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    # sample 0: (1 + 4) / 2 = 2.5; sample 1: (4 + 16) / 2 = 10
    assert torch.equal(K.per_sample_error(pred, target, backend="torch"), torch.tensor([2.5, 10.0]))
    weight = torch.tensor([2.0, 0.5])
    assert torch.equal(K.per_sample_error(pred, target, weight, backend="torch"), torch.tensor([5.0, 5.0]))


def test_torch_twin_equals_mse_loss_per_sample():
    gen = torch.Generator().manual_seed(1)
    pred, target = torch.randn(4, 4, 8, 8, generator=gen), torch.randn(4, 4, 8, 8, generator=gen)
    expected = torch.stack([torch.nn.functional.mse_loss(pred[i], target[i]) for i in range(4)])
    torch.testing.assert_close(K.per_sample_error_torch(pred, target), expected)


def test_torch_gradcheck_float64():
    gen = torch.Generator().manual_seed(2)
    pred = torch.randn(3, 2, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    target = torch.randn(3, 2, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.rand(3, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda p, t, w: K.per_sample_error(p, t, w, backend="torch"), (pred, target, weight)
    )
    assert torch.autograd.gradgradcheck(
        lambda p, t, w: K.per_sample_error(p, t, w, backend="torch"), (pred, target, weight)
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_accumulate_in_float32(dtype):
    gen = torch.Generator().manual_seed(3)
    pred32 = torch.randn(2, 4096, generator=gen)
    target32 = torch.randn(2, 4096, generator=gen)
    pred = pred32.to(dtype).requires_grad_(True)
    err = K.per_sample_error(pred, target32.to(dtype), backend="torch")
    assert err.dtype == torch.float32
    exact = ((pred.detach().double() - target32.to(dtype).double()) ** 2).mean(1)
    torch.testing.assert_close(
        err.double(), exact, rtol=1e-6, atol=0
    )  # a half-precision sum would be ~1e-3 off
    err.sum().backward()
    assert pred.grad.dtype == dtype


# ----------------------------------------------------------------------------- dispatch


def test_auto_picks_torch_on_cpu(monkeypatch):
    monkeypatch.delenv(K.ENV_VAR, raising=False)
    x = torch.randn(2, 3)
    assert K.resolve_backend("auto", x, x) == "torch"
    assert "torch" in K.available_backends()


def test_env_forces_torch(monkeypatch):
    monkeypatch.setenv(K.ENV_VAR, "torch")
    x = torch.randn(2, 3)
    assert K.resolve_backend("auto", x, x) == "torch"


def test_env_bad_value(monkeypatch):
    monkeypatch.setenv(K.ENV_VAR, "cuda")
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="DIFFALIGN_KERNELS"):
        K.per_sample_error(x, x)


def test_bad_backend_argument():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="backend must be"):
        K.per_sample_error(x, x, backend="cuda")


def test_forced_triton_without_triton_is_clear(monkeypatch):
    monkeypatch.setattr(pse_module, "triton_importable", lambda: False)
    monkeypatch.setenv(K.ENV_VAR, "triton")
    x = torch.randn(2, 3)
    with pytest.raises(ImportError, match="triton is not importable"):
        K.per_sample_error(x, x)


def test_forced_triton_on_cpu_without_interpreter_is_clear(monkeypatch):
    if not pse_module.triton_importable():
        pytest.skip("triton not installed")
    from diffalign.kernels import _triton_error

    if _triton_error.INTERPRETED:
        pytest.skip("this process runs Triton's interpreter, which accepts CPU tensors")
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        K.per_sample_error(x, x, backend="triton")


def test_forced_triton_rejects_float64():
    if not pse_module.triton_importable():
        pytest.skip("triton not installed")
    x = torch.randn(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="float64"):
        K.per_sample_error(x, x, backend="triton")


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "pred, target, weight, match",
    [
        (torch.zeros(2, 3), torch.zeros(2, 4), None, "shapes differ"),
        (torch.zeros(2, 3), torch.zeros(3, 3), None, "shapes differ"),
        (torch.zeros(3), torch.zeros(3), None, "batch dim and at least one more"),
        (torch.zeros(0, 3), torch.zeros(0, 3), None, "empty batch"),
        (torch.zeros(2, 0), torch.zeros(2, 0), None, "zero elements per sample"),
        (torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(3), r"weight must have shape \(2,\)"),
        (torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 1, 1, 1), "reshape"),
        (torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3), None, "floating-point"),
        (torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, dtype=torch.long), "floating-point"),
        (torch.zeros(2, 3), torch.zeros(2, 3, device="meta"), None, "move them to one device"),
    ],
)
def test_bad_inputs_raise(pred, target, weight, match):
    with pytest.raises(ValueError, match=match):
        K.per_sample_error(pred, target, weight)


def test_non_tensor_raises():
    with pytest.raises(TypeError, match="pred must be a torch.Tensor"):
        K.per_sample_error([[1.0]], torch.zeros(1, 1))


def test_pair_rejects_ref_requiring_grad():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="ref_pred requires grad"):
        K.per_sample_error_pair(x, x.clone().requires_grad_(True), x)
    with pytest.raises(ValueError, match="shapes differ"):
        K.per_sample_error_pair(x, torch.randn(2, 4), x)


def test_pair_torch_matches_two_calls():
    gen = torch.Generator().manual_seed(4)
    p, r, t = (torch.randn(3, 7, generator=gen) for _ in range(3))
    w = torch.rand(3, generator=gen)
    e_pol, e_ref = K.per_sample_error_pair(p, r, t, w, backend="torch")
    torch.testing.assert_close(e_pol, K.per_sample_error_torch(p, t, w))
    torch.testing.assert_close(e_ref, K.per_sample_error_torch(r, t, w))


# ----------------------------------------------------------------------------- CUDA (skipped on CPU)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 4, 128, 128), (6, 16, 64, 64), (3, 5, 7), (1000, 3, 11)])
def test_cuda_triton_matches_torch(dtype, shape):
    gen = torch.Generator(device="cuda").manual_seed(5)
    pred = torch.randn(shape, device="cuda", generator=gen).to(dtype)
    target = torch.randn(shape, device="cuda", generator=gen)  # fp32 target, as families produce it
    weight = torch.rand(shape[0], device="cuda", generator=gen)
    g = torch.randn(shape[0], device="cuda", generator=gen)
    res = {}
    for backend in ("torch", "triton"):
        p = pred.clone().requires_grad_(True)
        t = target.clone().requires_grad_(True)
        err = K.per_sample_error(p, t, weight, backend=backend)
        err.backward(g)
        res[backend] = (err.detach(), p.grad, t.grad)
    assert res["triton"][0].dtype == torch.float32
    assert res["triton"][1].dtype == dtype
    torch.testing.assert_close(res["triton"][0], res["torch"][0], rtol=1e-5, atol=1e-6)
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}[dtype]
    torch.testing.assert_close(res["triton"][1], res["torch"][1], rtol=tol, atol=tol * 1e-3)
    torch.testing.assert_close(res["triton"][2], res["torch"][2], rtol=1e-5, atol=1e-8)
    assert K.resolve_backend("auto", pred, target) == "triton" or os.environ.get(K.ENV_VAR) == "torch"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_triton_pair_matches_torch(dtype):
    gen = torch.Generator(device="cuda").manual_seed(6)
    shape = (8, 4, 128, 128)
    policy, ref, target = (torch.randn(shape, device="cuda", generator=gen).to(dtype) for _ in range(3))
    weight = torch.rand(8, device="cuda", generator=gen)
    g = torch.randn(8, device="cuda", generator=gen)
    res = {}
    for backend in ("torch", "triton"):
        p = policy.clone().requires_grad_(True)
        e_pol, e_ref = K.per_sample_error_pair(p, ref, target, weight, backend=backend)
        e_pol.backward(g)
        res[backend] = (e_pol.detach(), e_ref, p.grad)
    assert not res["triton"][1].requires_grad
    torch.testing.assert_close(res["triton"][0], res["torch"][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(res["triton"][1], res["torch"][1], rtol=1e-5, atol=1e-6)
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(res["triton"][2], res["torch"][2], rtol=tol, atol=tol * 1e-3)


if __name__ == "__main__" and sys.argv[1:] == ["--interpret-child"]:
    print(json.dumps(_run_interpret_cases()))
