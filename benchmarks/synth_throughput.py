"""Synth throughput: images/s of generation and rewards/s of scoring at batch sizes 1, 4, 16.

    python benchmarks/synth_throughput.py --out synth.json              # tiny pipelines + tiny rewards (CPU or GPU)
    python benchmarks/synth_throughput.py --full-size --out synth.json  # + full-size reward architectures (GPU)
    python benchmarks/synth_throughput.py --cpu-dry-run                 # smallest settings, checks the script

Generation uses the offline tiny pipelines (diffalign.testing) through the same `load_pipeline` /
`generate_images` calls as `diffalign synth`; scoring uses the same `RewardModel.score` on PIL images.
`--full-size` adds randomly initialised reward models of the real architectures (CLIP ViT-L/14 for
clip_score/aesthetic, ViT-H-14 for HPSv2 and PickScore) on 512x512 inputs: speed does not depend on the
weights. Full-size generation needs real pipeline weights and is not measured here. Each cell is the median
of `--repeats` timed calls after one warm-up; batch sizes are interleaved per repeat so drift hits all alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _images(n, size, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)) for _ in range(n)]


def bench_generation(source, batch_sizes, repeats, device, size, steps, deadline):
    from diffalign.synth.specs import GeneratorSpec, generate_images, load_pipeline

    spec = GeneratorSpec(source=source, steps=steps, height=size, width=size, guidance=5.0)
    pipe = load_pipeline(spec, device)
    prompts = ["a red cube on a blue sphere"] * max(batch_sizes)
    times = {b: [] for b in batch_sizes}
    generate_images(pipe, spec, prompts[:1], [0])  # warm-up
    for _ in range(repeats):
        for b in batch_sizes:
            if time.time() > deadline:
                break
            _sync(device)
            t0 = time.perf_counter()
            generate_images(pipe, spec, prompts[:b], list(range(b)))
            _sync(device)
            times[b].append(time.perf_counter() - t0)
    del pipe
    return [{"kind": "generate", "model": source, "size": size, "steps": steps, "batch_size": b,
             "repeats": len(t), "images_per_s": b / statistics.median(t) if t else None}
            for b, t in times.items()]


def bench_reward(name, kwargs, batch_sizes, repeats, device, image_size, deadline, label=None):
    from diffalign import rewards

    model = rewards.load(name, device=device, batch_size=max(batch_sizes), **kwargs)
    images = _images(max(batch_sizes), image_size)
    prompts = ["a red cube on a blue sphere"] * len(images)
    times = {b: [] for b in batch_sizes}
    model.score(images[:1], prompts[:1])  # warm-up
    for _ in range(repeats):
        for b in batch_sizes:
            if time.time() > deadline:
                break
            _sync(device)
            t0 = time.perf_counter()
            model.score(images[:b], prompts[:b], batch_size=b)
            _sync(device)
            times[b].append(time.perf_counter() - t0)
    del model
    return [{"kind": "reward", "model": label or name, "size": image_size, "batch_size": b, "repeats": len(t),
             "rewards_per_s": b / statistics.median(t) if t else None} for b, t in times.items()]


def _full_size_pickscore(device, dtype):
    """A PickScore-architecture CLIPModel (laion ViT-H-14) with random weights, and a default CLIP processor."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTextConfig,
        CLIPVisionConfig,
    )

    from diffalign.tokenization import clip_tokenizer

    text = CLIPTextConfig(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                          num_hidden_layers=24, projection_dim=1024, hidden_act="gelu", bos_token_id=49406,
                          eos_token_id=49407, pad_token_id=1)
    vision = CLIPVisionConfig(hidden_size=1280, intermediate_size=5120, num_attention_heads=16, num_hidden_layers=32,
                              patch_size=14, image_size=224, projection_dim=1024, hidden_act="gelu")
    with torch.device(device):
        model = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=1024))
    return {"model": model.to(dtype), "processor": CLIPProcessor(image_processor=CLIPImageProcessor(),
                                                                 tokenizer=clip_tokenizer()), "dtype": dtype}


def _write(path, device, batch_sizes, repeats, rows, errors):
    result = {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else f"cpu ({platform.processor() or 'x86'})",
        "torch_threads": torch.get_num_threads(),
        "batch_sizes": batch_sizes,
        "repeats": repeats,
        "rows": rows,
        "errors": errors,
    }
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


def _table(rows):
    lines = ["| kind | model | size | batch | images/s or rewards/s | repeats |", "|---|---|---|---|---|---|"]
    for r in rows:
        v = r.get("images_per_s", r.get("rewards_per_s"))
        lines.append(f"| {r['kind']} | {r['model']} | {r['size']} | {r['batch_size']} | "
                     f"{'skipped' if v is None else f'{v:.2f}'} | {r['repeats']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="synth_throughput.json")
    p.add_argument("--batch-sizes", default="1,4,16")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--size", type=int, default=64, help="tiny generation resolution")
    p.add_argument("--steps", type=int, default=2, help="tiny generation steps")
    p.add_argument("--full-size", action="store_true", help="also full-size reward architectures (GPU only)")
    p.add_argument("--cpu-dry-run", action="store_true", help="CPU, batch sizes 1,4, one repeat")
    p.add_argument("--time-budget", type=float, default=40.0, help="seconds; later cells are skipped after it")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    args = p.parse_args(argv)

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.cpu_dry_run else "cpu"))
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    repeats = args.repeats
    if args.cpu_dry_run:
        batch_sizes, repeats = [1, 4], 1
    deadline = time.time() + args.time_budget
    rows, errors = [], []
    tiny_clip = {"model_name": "diffalign-tiny-clip", "random_init": True}
    plan = [
        ("gen", "tiny:sdxl:0"),
        ("gen", "tiny:sd3:0"),
        ("reward", ("clip_score", tiny_clip, "clip_score[tiny]", 64)),
        ("reward", ("aesthetic", {"clip_model": "diffalign-tiny-clip", "random_init": True}, "aesthetic[tiny]", 64)),
    ]
    if args.full_size and (device.type == "cuda" or args.device == "cpu"):
        fp16 = torch.float16 if device.type == "cuda" else torch.float32
        # First: on a GPU the full-size rewards are the numbers that matter, and the time budget is short.
        plan = [
            ("reward", ("clip_score", {"model_name": "ViT-L-14", "random_init": True, "dtype": fp16},
                        "clip_score[ViT-L-14]", 512)),
            ("reward", ("hpsv21", {"random_init": True, "dtype": fp16}, "hpsv21[ViT-H-14]", 512)),
            ("reward", ("pickscore", "full-pickscore", "pickscore[ViT-H-14]", 512)),
        ] + plan
    elif args.full_size:
        print("--full-size needs CUDA; measuring the tiny models only", file=sys.stderr)
    for kind, what in plan:
        if time.time() > deadline:
            print(f"time budget spent; skipping {what}", file=sys.stderr)
            continue
        t0 = time.time()
        label = what if kind == "gen" else what[2]
        try:
            if kind == "gen":
                rows += bench_generation(what, batch_sizes, repeats, device, args.size, args.steps, deadline)
            else:
                name, kwargs, label, size = what
                if kwargs == "full-pickscore":
                    kwargs = _full_size_pickscore(device, fp16)
                rows += bench_reward(name, kwargs, batch_sizes, repeats, device, size, deadline, label)
        except Exception as e:  # one broken cell must not lose the others' numbers; the error is recorded
            errors.append({"cell": label, "error": f"{type(e).__name__}: {e}"})
            print(f"{label} failed: {e!r}", file=sys.stderr)
        print(f"{kind} {label}: {time.time() - t0:.1f}s", file=sys.stderr)
        _write(args.out, device, batch_sizes, repeats, rows, errors)  # after every cell: a timeout keeps what ran
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(_table(rows))
    _write(args.out, device, batch_sizes, repeats, rows, errors)
    print(f"wrote {args.out}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
