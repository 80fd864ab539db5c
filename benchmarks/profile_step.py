"""Profile one full-size SDXL DPO training step (LoRA, bf16, cached latents) and list the top kernels by time.

    python benchmarks/profile_step.py --out DIR_or_JSON                 # CUDA: random full-size SDXL, 1024 px
    python benchmarks/profile_step.py --out DIR_or_JSON --cpu-dry-run   # tiny SDXL on CPU, to check the script

Writes the top kernels (name, total time, calls, share of the step) as JSON; `--trace` adds a Chrome trace.
This is what issue 9's "profile and fuse" starts from: memory-bound kernels high in the list that torch.compile
does not already fuse are the candidates for Triton.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import train_step  # noqa: E402  (shares the model builders and the cached batch with the step benchmark)


def profile(dry: bool, pairs: int, warmup: int, top: int) -> tuple[dict, object]:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    device = torch.device("cpu" if dry else "cuda")
    if not dry and not torch.cuda.is_available():
        raise SystemExit("profile_step.py needs a CUDA GPU (or --cpu-dry-run)")
    res = 64 if dry else 1024
    comps = train_step.tiny_sdxl() if dry else train_step.full_sdxl(device)
    trainer = train_step.make_ours(comps, "sdxl", "no" if dry else "bf16", "lora")
    prompts = [f"a photo of object {i}" for i in range(pairs)]
    latent_shape = (4, res // 2, res // 2) if dry else (4, res // 8, res // 8)
    batch = train_step.cached_batch(
        trainer.adapter, train_step.pixel_batch(pairs, res, prompts)["pixel_values"], prompts, device,
        random_latents_shape=latent_shape,
    )
    for i in range(warmup):
        trainer.optimizer_step([batch], i, i)
    train_step.sync(device)

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities, record_shapes=False) as prof:
        trainer.optimizer_step([batch], warmup, warmup)
        train_step.sync(device)

    use_cuda = device.type == "cuda"
    events = [e for e in prof.key_averages() if not e.key.startswith("ProfilerStep")]

    def self_time_us(e) -> float:
        return float(e.self_device_time_total if use_cuda else e.self_cpu_time_total)

    total = sum(self_time_us(e) for e in events) or 1.0
    ranked = sorted(events, key=self_time_us, reverse=True)[:top]
    rows = [
        {
            "kernel": e.key[:120],
            "self_time_ms": self_time_us(e) / 1e3,
            "calls": int(e.count),
            "share": self_time_us(e) / total,
        }
        for e in ranked
    ]
    result = {
        "device": torch.cuda.get_device_name(device) if use_cuda else "cpu (dry run, tiny SDXL)",
        "resolution": res,
        "pairs_per_step": pairs,
        "time_basis": "self device (GPU) time" if use_cuda else "self CPU time",
        "step_total_ms": total / 1e3,
        "rows": rows,
    }
    return result, prof


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="a .json path, or a folder to write profile.json into")
    parser.add_argument("--cpu-dry-run", action="store_true")
    parser.add_argument("--pairs", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--trace", action="store_true", help="also export a Chrome trace next to the JSON")
    args = parser.parse_args(argv)

    out = args.out if args.out.endswith(".json") else os.path.join(args.out, "profile.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    result, prof = profile(args.cpu_dry_run, args.pairs, args.warmup, args.top)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    if args.trace:
        prof.export_chrome_trace(out.replace(".json", ".trace.json"))
    print(f"device: {result['device']}; step total {result['step_total_ms']:.1f} ms ({result['time_basis']})")
    print(f"{'share':>6}  {'ms':>9}  {'calls':>6}  kernel")
    for r in result["rows"]:
        print(f"{r['share']:6.1%}  {r['self_time_ms']:9.2f}  {r['calls']:6d}  {r['kernel']}")


if __name__ == "__main__":
    main()
