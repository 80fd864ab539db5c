"""User cross-attention on full-size SDXL / SD3 denoisers (random weights): exactness and overhead.

For each family it checks that fresh user attention leaves the output bit-identical, then times, ABAB
in one process, the forward of (a) the base model and (b) the model conditioned on a user, and the
forward+backward of (b) training only the user weights. Prints a table and writes JSON.

    python benchmarks/ppd_user_attention.py --configs ../shared/configs --resolution 1024 --batch 2 --out ppd.json
    python benchmarks/ppd_user_attention.py --tiny   # CPU smoke run on the tiny test models
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch


def build(family: str, configs: str | None, tiny: bool, device, dtype):
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel

    if tiny:
        from diffalign.testing import tiny_sd3_pipeline, tiny_sdxl_pipeline

        model = tiny_sdxl_pipeline(0).unet if family == "sdxl" else tiny_sd3_pipeline(0).transformer
        return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    name = "sdxl_unet.json" if family == "sdxl" else "sd3_medium_transformer.json"
    with open(os.path.join(configs, name)) as f:
        config = json.load(f)
    cls = UNet2DConditionModel if family == "sdxl" else SD3Transformer2DModel
    torch.manual_seed(0)
    with torch.device(device):
        model = cls.from_config(config)
    return model.to(dtype=dtype).eval().requires_grad_(False)


def inputs(model, family: str, batch: int, resolution: int, device, dtype):
    g = torch.Generator(device="cpu").manual_seed(0)
    cfg = model.config

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    if family == "sdxl":
        h = resolution // 8
        cross = cfg.cross_attention_dim
        text_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        return dict(
            sample=rnd(batch, cfg.in_channels, h, h), timestep=torch.full((batch,), 500, device=device),
            encoder_hidden_states=rnd(batch, 77, cross),
            added_cond_kwargs={"text_embeds": rnd(batch, text_dim), "time_ids": rnd(batch, 6)},
        )
    h = resolution // 8
    return dict(
        hidden_states=rnd(batch, cfg.in_channels, h, h), encoder_hidden_states=rnd(batch, 154, cfg.joint_attention_dim),
        pooled_projections=rnd(batch, cfg.pooled_projection_dim), timestep=torch.full((batch,), 500.0, device=device),
    )


def timed(fn, device, iters: int) -> list[float]:
    out = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def run_family(family, args, device, dtype) -> dict:
    from diffalign.personalization import add_user_attention, user_attention_parameters, user_condition

    model = build(family, args.configs, args.tiny, device, dtype)
    x = inputs(model, family, args.batch, args.resolution, device, dtype)
    with torch.no_grad():
        base = model(**x).sample
    add_user_attention(model, encoder_dim=args.encoder_dim, seed=0)
    params = user_attention_parameters(model)
    user = torch.randn(args.batch, args.num_tokens, args.encoder_dim, device=device, dtype=dtype)
    with torch.no_grad(), user_condition(model, user):
        fresh = model(**x).sample
    identical = bool(torch.equal(fresh, base))
    with torch.no_grad():
        for p in params:  # as after training: give the zero-initialised values weights
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)

    def fwd_base():
        with torch.no_grad():
            model(**x)

    def fwd_user():
        with torch.no_grad(), user_condition(model, user):
            model(**x)

    def train_user():
        with user_condition(model, user):
            out = model(**x).sample
        out.float().pow(2).mean().backward()
        for p in params:
            p.grad = None

    for fn in (fwd_base, fwd_user, train_user):  # warm-up
        fn()
    results = {"fwd_base": [], "fwd_user": []}
    for _ in range(args.rounds):  # ABAB
        results["fwd_base"] += timed(fwd_base, device, args.iters)
        results["fwd_user"] += timed(fwd_user, device, args.iters)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    results["train_user"] = timed(train_user, device, args.iters)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    med = {k: statistics.median(v) for k, v in results.items()}
    return {
        "family": family,
        "layers": (len(params) - 4) // 2,
        "user_params_m": sum(p.numel() for p in params) / 1e6,
        "base_params_m": sum(p.numel() for p in model.parameters()) / 1e6 - sum(p.numel() for p in params) / 1e6,
        "fresh_identical": identical,
        "median_ms": med,
        "fwd_overhead_pct": 100 * (med["fwd_user"] / med["fwd_base"] - 1),
        "train_peak_gib": peak,
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--configs", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "configs"))
    p.add_argument("--families", nargs="+", default=["sdxl", "sd3"])
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--encoder_dim", type=int, default=1024)
    p.add_argument("--num_tokens", type=int, default=4)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default="ppd_user_attention.json")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.tiny:
        args.resolution, args.encoder_dim = 32, 16
    rows = []
    for family in args.families:
        rows.append(run_family(family, args, device, dtype))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device: {name}  dtype: {dtype}  resolution: {args.resolution}  batch: {args.batch}")
    print(f"{'family':6} {'layers':>6} {'user M':>8} {'identical':>9} {'fwd base ms':>11} {'fwd user ms':>11} {'overhead':>8} {'train ms':>9} {'peak GiB':>8}")
    for r in rows:
        m = r["median_ms"]
        peak = f"{r['train_peak_gib']:.1f}" if r["train_peak_gib"] is not None else "-"
        print(f"{r['family']:6} {r['layers']:>6} {r['user_params_m']:>8.1f} {str(r['fresh_identical']):>9} {m['fwd_base']:>11.1f} "
              f"{m['fwd_user']:>11.1f} {r['fwd_overhead_pct']:>7.1f}% {m['train_user']:>9.1f} {peak:>8}")
    with open(args.out, "w") as f:
        json.dump({"device": name, "dtype": str(dtype), "resolution": args.resolution, "batch": args.batch, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
