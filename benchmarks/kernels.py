"""Benchmark per_sample_error: torch eager vs Triton (vs torch.compile of the eager twin), forward + backward.

    python benchmarks/kernels.py --out DIR            # CUDA: SDXL (B x 4 x 128 x 128) and SD3 (B x 16 x 128 x 128)
    python benchmarks/kernels.py --out DIR --sweep    # also sweep the Triton launch parameters
    python benchmarks/kernels.py --out DIR --cpu-dry-run   # no GPU: tiny sizes, torch + Triton interpreter

One timed step = err = f(pred, target, weight); torch.autograd.grad(err, pred, g): the work a training
step does per model call. Implementations alternate inside every repetition (A B C A B C ..., order
reversed on odd repetitions) and the table reports medians. Inputs rotate over several sets so that the
working set exceeds the L2 cache. Effective bandwidth counts the fewest bytes the step must move:
forward reads pred and target, backward reads them again and writes grad_pred (5 tensor passes; 6 for
the fused policy/reference pair against 7 unfused). Parity against the eager twin is checked on every
CUDA configuration (float32 tolerance for values, one bf16/fp16 rounding step for gradients).

Self-contained: runs from a checkout without installing (adds the repository root to sys.path).
Writes DIR/kernels.json and prints a table. Two timings per implementation: "host" (events around eager
calls; bound by Python/launch overhead at these sizes, ~0.3-0.8 ms for every implementation) and "gpu"
(CUDA-graph replay: the device time the step costs when it queues behind the denoiser, as in training).

Measured 2026-11-26, H100 80GB HBM3, torch 2.11 / triton 3.6, default launch parameters, GPU time per
fwd+bwd step (effective GB/s at 5 passes; device-to-device copy ceiling 3.0 TB/s):
    shape / dtype               torch eager       triton              torch.compile     peak extra mem
    SDXL 8x4x128x128  fp32      26.3 us           8.3 us (1.27 TB/s)  8.2 us            10 -> 2 MiB
    SDXL 8x4x128x128  bf16      35.7 us           7.1 us              6.7 us            10 -> 1 MiB
    SDXL 64x4x128x128 bf16      117.2 us          17.7 us (2.37 TB/s) 19.6 us           80 -> 8 MiB
    SD3  64x16x128x128 fp32     358.0 us          121.1 us (2.77 TB/s) 162.4 us         320 -> 64 MiB
    SD3  64x16x128x128 bf16     499.6 us          62.3 us (2.69 TB/s) 63.8 us           320 -> 32 MiB
Fused policy/reference pair vs two Triton calls (GPU time): 13.0 -> 10.8 us (SDXL 8 fp32),
47.6 -> 41.5 (SDXL 64 fp32), 25.0 -> 21.1 (SDXL 64 bf16), 168.8 -> 144.8 (SD3 64 fp32),
90.7 -> 74.8 us (SD3 64 bf16): 10-22 % less, and one launch fewer on the host. The sweep of block
sizes / grid targets found nothing more than 2 % better than the defaults.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path


def _parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for kernels.json")
    ap.add_argument(
        "--cpu-dry-run", action="store_true", help="tiny sizes on CPU (torch + Triton interpreter)"
    )
    ap.add_argument("--batches", default="8,64", help="comma-separated batch sizes N (default 8,64)")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--reps", type=int, default=15, help="alternating repetitions (median reported)")
    ap.add_argument("--iters", type=int, default=10, help="steps per timed repetition")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile of the eager twin")
    ap.add_argument("--no-pair", action="store_true", help="skip the fused policy/reference pair comparison")
    ap.add_argument("--sweep", action="store_true", help="also sweep Triton block sizes / grid targets")
    return ap.parse_args(argv)


ARGS = _parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.cpu_dry_run:
    # Must happen before triton is imported anywhere: triton picks interpreter-or-compiler at kernel definition.
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from diffalign.kernels import error as kerr  # noqa: E402

FAMILIES = {"sdxl": (4, 128, 128), "sd3": (16, 128, 128)}
DRY_FAMILIES = {"sdxl": (4, 16, 16), "sd3": (16, 8, 8)}


# ----------------------------------------------------------------------------- helpers


class Timer:
    """CUDA events on GPU, perf_counter on CPU; returns milliseconds."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def __call__(self, fn, iters: int) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for i in range(iters):
                fn(i)
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / iters
        t0 = time.perf_counter()
        for i in range(iters):
            fn(i)
        return (time.perf_counter() - t0) * 1e3 / iters


def make_sets(n, shape, dtype, device, min_bytes, max_sets=64, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    per_set = 3 * n * int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
    n_sets = max(1, min(max_sets, -(-min_bytes // per_set)))
    sets = []
    for _ in range(n_sets):
        pred = torch.randn((n, *shape), device=device, dtype=torch.float32, generator=gen).to(dtype)
        ref = torch.randn((n, *shape), device=device, dtype=torch.float32, generator=gen).to(dtype)
        target = torch.randn((n, *shape), device=device, dtype=torch.float32, generator=gen).to(dtype)
        weight = torch.rand(n, device=device, generator=gen) + 0.5
        g = torch.randn(n, device=device, generator=gen)
        sets.append((pred.requires_grad_(True), ref, target, weight, g))
    return sets


def single_step(fn):
    def step(s):
        pred, _, target, weight, g = s
        err = fn(pred, target, weight)
        return err, torch.autograd.grad(err, pred, g)[0]

    return step


def pair_step(fn):
    def step(s):
        pred, ref, target, weight, g = s
        err, err_ref = fn(pred, ref, target, weight)
        return (err, err_ref), torch.autograd.grad(err, pred, g)[0]

    return step


def rel_diff(a, b) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def measure(impls: dict, sets, timer, reps, iters, cuda):
    """Alternate implementations inside each repetition; return {name: {median_ms, ...}}."""
    names = list(impls)
    for name in names:  # warm-up (includes Triton JIT / torch.compile) outside the timed region
        t0 = time.perf_counter()
        for s in sets[:2]:
            impls[name](s)
        if cuda:
            torch.cuda.synchronize()
        impls[name].__dict__["first_call_s"] = time.perf_counter() - t0
    times = {name: [] for name in names}
    counter = itertools.count()  # keep rotating through all input sets across repetitions
    for rep in range(reps):
        order = names if rep % 2 == 0 else names[::-1]
        for name in order:
            fn = impls[name]
            times[name].append(timer(lambda i, fn=fn: fn(sets[next(counter) % len(sets)]), iters))
    out = {}
    for name in names:
        ts = times[name]
        out[name] = {
            "median_ms": statistics.median(ts),
            "min_ms": min(ts),
            "max_ms": max(ts),
            "first_call_s": impls[name].__dict__.get("first_call_s"),
        }
    return out


def measure_graphs(impls: dict, sets, reps, max_steps=64):
    """GPU time per step without host overhead: each implementation's steps over k input sets are
    captured in one CUDA graph; graphs are replayed alternately (ABAB) and the median is reported.
    In training these ops queue behind the denoiser's kernels, so GPU time is what they cost there."""
    k = min(len(sets), max_steps)
    graphs, out = {}, {}
    for name, fn in impls.items():
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up on a side stream, as capture requires
                for st in sets[:k]:
                    fn(st)
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                keep = [fn(st) for st in sets[:k]]
            graphs[name] = (graph, keep)
        except Exception as exc:  # report, keep going with the others
            out[name] = {"graph_error": repr(exc)[:300]}
            print(f"  graph capture of {name} failed: {out[name]['graph_error']}", flush=True)
    timer = Timer(True)
    times = {name: [] for name in graphs}
    for graph, _ in graphs.values():
        graph.replay()
    names = list(graphs)
    for rep in range(reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            times[name].append(timer(lambda i, g=graphs[name][0]: g.replay(), 3) / k)
    for name in names:
        ts = times[name]
        out[name] = {"gpu_median_ms": statistics.median(ts), "gpu_min_ms": min(ts), "gpu_max_ms": max(ts)}
    del graphs
    return out


def peak_memory(fn, s) -> int | None:
    """Extra device memory (bytes) one step allocates at its peak, beyond what was allocated before."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn(s)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return int(peak)


def copy_bandwidth_gbs() -> float | None:
    """Device-to-device copy rate (bytes read + written) as the practical bandwidth ceiling."""
    if not torch.cuda.is_available():
        return None
    x = torch.empty(256 * 2**20, device="cuda", dtype=torch.float32)  # 1 GiB
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    t = Timer(True)
    ms = statistics.median(t(lambda i: y.copy_(x), 5) for _ in range(5))
    return 2 * x.numel() * 4 / (ms * 1e-3) / 1e9


class Fn:
    """A plain callable with a __dict__ (for first-call timing)."""

    def __init__(self, f):
        self.f = f

    def __call__(self, s):
        return self.f(s)


# ----------------------------------------------------------------------------- main


def build_impls(args, cuda, triton_ok):
    single = {"torch": Fn(single_step(kerr.per_sample_error_torch))}
    if triton_ok:
        single["triton"] = Fn(single_step(lambda p, t, w: kerr.per_sample_error(p, t, w, backend="triton")))
    if cuda and not args.no_compile:
        try:
            compiled = torch.compile(kerr.per_sample_error_torch)
            single["compile"] = Fn(single_step(compiled))
        except Exception as exc:  # torch.compile unavailable: report and go on
            print(f"torch.compile unavailable: {exc!r}")
    pair = {}
    if not args.no_pair:
        pair["pair_torch"] = Fn(pair_step(kerr.per_sample_error_pair_torch))
        if triton_ok:

            def unfused(p, r, t, w):
                err = kerr.per_sample_error(p, t, w, backend="triton")
                with torch.no_grad():
                    err_ref = kerr.per_sample_error(r, t, w, backend="triton")
                return err, err_ref

            pair["pair_triton_unfused"] = Fn(pair_step(unfused))
            pair["pair_triton_fused"] = Fn(
                pair_step(lambda p, r, t, w: kerr.per_sample_error_pair(p, r, t, w, backend="triton"))
            )
    return single, pair


def _drop_failing(impls: dict, s) -> dict:
    """Run each implementation once; remove (and report) any that raise, so one broken path
    (e.g. torch.compile on an odd install) cannot take the whole benchmark down."""
    failed = {}
    for name in list(impls):
        try:
            impls[name](s)
        except Exception as exc:
            failed[name] = repr(exc)[:500]
            print(f"  {name} failed and is dropped: {failed[name]}", flush=True)
            if name in ("torch", "pair_torch"):
                raise
            del impls[name]
    return failed


def parity(single, pair, s, dtype):
    """Relative max differences of triton (and compile) against the eager twin on one input set."""
    res = {}
    ref_err, ref_grad = single["torch"](s)
    grad_tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    for name in ("triton", "compile"):
        if name in single:
            err, grad = single[name](s)
            v, g = rel_diff(err, ref_err), rel_diff(grad, ref_grad)
            res[name] = {
                "value_rel": v,
                "grad_rel": g,
                "ok": v <= 1e-5 and g <= grad_tol and grad.dtype == dtype,
            }
    if "pair_triton_fused" in pair:
        (e, er), g = pair["pair_triton_fused"](s)
        (e0, er0), g0 = pair["pair_torch"](s)
        v = max(rel_diff(e, e0), rel_diff(er, er0))
        gr = rel_diff(g, g0)
        res["pair_triton_fused"] = {"value_rel": v, "grad_rel": gr, "ok": v <= 1e-5 and gr <= grad_tol}
    return res


def run_configs(args, device, cuda, triton_ok):
    timer = Timer(cuda)
    families = DRY_FAMILIES if args.cpu_dry_run else FAMILIES
    batches = [2] if args.cpu_dry_run else [int(b) for b in args.batches.split(",")]
    dtypes = ["float32"] if args.cpu_dry_run else args.dtypes.split(",")
    reps = min(args.reps, 3) if args.cpu_dry_run else args.reps
    iters = min(args.iters, 2) if args.cpu_dry_run else args.iters
    min_bytes = 0 if args.cpu_dry_run else 200 * 2**20  # rotate inputs past the 50 MB L2 of an H100
    single, pair = build_impls(args, cuda, triton_ok)
    rows = []
    for fam, shape in families.items():
        for n in batches:
            for dname in dtypes:
                dtype = getattr(torch, dname)
                sets = make_sets(n, shape, dtype, device, min_bytes)
                numel = n * torch.Size(shape).numel()
                elt = sets[0][0].element_size()
                row = {"family": fam, "n": n, "shape": [n, *shape], "dtype": dname, "sets": len(sets)}
                row["failed"] = _drop_failing(single, sets[0]) | _drop_failing(pair, sets[0])
                row["parity"] = parity(single, pair, sets[0], dtype)
                for kind, impls, passes in (("single", single, 5), ("pair", pair, 6)):
                    if not impls:
                        continue
                    row[kind] = measure(impls, sets, timer, reps, iters, cuda)
                    gpu = measure_graphs(impls, sets, reps) if cuda else {}
                    for name, m in row[kind].items():
                        m.update(gpu.get(name, {}))
                        ms = m.get("gpu_median_ms", m["median_ms"])
                        # effective bandwidth over the fewest bytes: 5 tensor passes (6 for the fused pair)
                        m[f"gbs_{passes}_passes"] = passes * numel * elt / (ms * 1e-3) / 1e9
                        m["peak_extra_bytes"] = peak_memory(impls[name], sets[0])
                rows.append(row)
                _print_row(row)
                del sets
                if cuda:
                    torch.cuda.empty_cache()
    return rows


def run_sweep(args, device, cuda):
    from diffalign.kernels import _triton_error as te

    timer = Timer(cuda)
    default = dict(te.CONFIG)
    variants = [{}]  # the default, through the same wrapper as the others
    for fb in (1024, 2048, 4096):
        for pps in (4, 8, 16):
            variants.append({"fwd_block": fb, "programs_per_sm": pps, "fwd_warps": 4})
    for pps in (4, 8, 16):
        variants.append({"fwd_block": 4096, "programs_per_sm": pps, "fwd_warps": 8})
    for bb in (1024, 2048, 4096):
        for bw in (4, 8):
            variants.append({"bwd_block": bb, "bwd_warps": bw})
    out = []
    cases = [("sdxl", 8, "float32"), ("sd3", 8, "bfloat16"), ("sd3", 64, "bfloat16")]
    if args.cpu_dry_run:
        cases, variants = [("sdxl", 2, "float32")], variants[:3]
    fams = DRY_FAMILIES if args.cpu_dry_run else FAMILIES
    step = single_step(lambda p, t, w: kerr.per_sample_error(p, t, w, backend="triton"))
    for fam, n, dname in cases:
        sets = make_sets(n, fams[fam], getattr(torch, dname), device, 0 if args.cpu_dry_run else 200 * 2**20)
        impls = {}
        for i, var in enumerate(variants):

            def fn(s, var=var):
                te.CONFIG.update(default)
                te.CONFIG.update(var)
                try:
                    return step(s)
                finally:
                    te.CONFIG.update(default)

            impls[f"v{i}"] = Fn(fn)
        if cuda:
            res = {
                k: {"median_ms": v["gpu_median_ms"]}
                for k, v in measure_graphs(impls, sets, max(3, args.reps // 3)).items()
                if "gpu_median_ms" in v
            }
        else:
            res = measure(impls, sets, timer, max(3, args.reps // 3), args.iters, cuda)
        for i, var in enumerate(variants):
            if f"v{i}" in res:
                out.append(
                    {"family": fam, "n": n, "dtype": dname, "config": {**default, **var}, **res[f"v{i}"]}
                )
        best = min(
            (r for r in out if r["family"] == fam and r["n"] == n and r["dtype"] == dname),
            key=lambda r: r["median_ms"],
        )
        print(
            f"sweep {fam} N={n} {dname}: default {res['v0']['median_ms']:.4f} ms, "
            f"best {best['median_ms']:.4f} ms with {best['config']}"
        )
        del sets
    return out


def _print_row(row):
    """One line per implementation: host-bound eager time, GPU time (graph replay), speed-up on GPU time
    against the torch baseline of its group, effective GB/s, extra peak memory."""
    head = f"{row['family']:>4} N={row['n']:<3} {row['dtype']:<8}"
    for kind, base_name, passes in (("single", "torch", 5), ("pair", "pair_torch", 6)):
        if kind not in row:
            continue
        key = "gpu_median_ms" if "gpu_median_ms" in row[kind][base_name] else "median_ms"
        base = row[kind][base_name][key]
        for name, m in row[kind].items():
            mem = m["peak_extra_bytes"]
            mem_s = f"{mem / 2**20:8.1f} MiB" if mem is not None else ""
            gpu = m.get(key)
            gpu_s = (
                f"{gpu * 1e3:8.1f} us x{base / gpu:4.2f} {m[f'gbs_{passes}_passes']:7.1f} GB/s"
                if gpu
                else "  (no gpu time)"
            )
            label = "gpu" if key == "gpu_median_ms" else "cpu"
            print(
                f"{head} {name:<20} host {m['median_ms'] * 1e3:8.1f} us | {label} {gpu_s} {mem_s}", flush=True
            )
            head = " " * len(head)
    bad = {k: v for k, v in row["parity"].items() if not v["ok"]}
    if bad:
        print(" " * len(head) + f" | PARITY FAIL {bad}", flush=True)


def main(args):
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available() and not args.cpu_dry_run
    if not cuda and not args.cpu_dry_run:
        sys.exit("no CUDA device: run with --cpu-dry-run for the tiny CPU mode (torch + Triton interpreter)")
    device = torch.device("cuda" if cuda else "cpu")
    triton_ok = kerr.triton_importable()
    if triton_ok and not cuda:
        from diffalign.kernels import _triton_error as te

        triton_ok = te.INTERPRETED
    meta = {
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": __import__("triton").__version__ if kerr.triton_importable() else None,
        "mode": "cuda" if cuda else "cpu-dry-run",
        "reps": min(args.reps, 3) if args.cpu_dry_run else args.reps,
        "iters": min(args.iters, 2) if args.cpu_dry_run else args.iters,
        "copy_bandwidth_gbs": copy_bandwidth_gbs() if cuda else None,
    }
    if triton_ok:
        from diffalign.kernels import _triton_error as te

        meta["triton_config"] = dict(te.CONFIG)
    print(json.dumps(meta))
    rows = run_configs(args, device, cuda, triton_ok)
    result = {"meta": meta, "rows": rows}
    if args.sweep and triton_ok:
        result["sweep"] = run_sweep(args, device, cuda)
    path = out_dir / "kernels.json"
    path.write_text(json.dumps(result, indent=1))
    n_bad = sum(not v["ok"] for r in rows for v in r["parity"].values())
    print(f"wrote {path}; parity failures: {n_bad}")
    return 1 if n_bad else 0


if __name__ == "__main__":
    sys.exit(main(ARGS))
