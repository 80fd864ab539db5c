"""The plateau curve of a toy pretrain run: export its current EMA weights, score them on 1,200 images.

    python benchmarks/toy_plateau.py --family sdxl --state_dir runs/v2/toy-sdxl --out runs/v2/plateau-sdxl.jsonl

Each call appends one point (step, images seen, wall time of the run, toy-GenEval per task and overall with
standard errors) to --out. Every point uses the same 1,200 images: the 600 evaluation rows x 2 noise seeds,
20 steps of the checkpoint's sampler, guidance 5 (the shipped-checkpoint table in docs/toyworld.md).
A run is at a plateau when 20 more minutes of the recipe move overall by less than one standard error.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from diffalign.toyworld import pretrain as P  # noqa: E402
from diffalign.toyworld.bases import export_state  # noqa: E402


def run_seconds(state_dir: str, family: str) -> float:
    """Wall time of the denoiser stage so far, from the run's log (gaps between resumed processes excluded)."""
    with open(os.path.join(state_dir, "log.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    times = [r["time"] for r in records if r.get("stage") in (family, "eval")]
    gaps = [b - a for a, b in zip(times, times[1:])]
    typical = sorted(gaps)[len(gaps) // 2] if gaps else 0.0
    return float(sum(g for g in gaps if g < 20 * typical + 600))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--family", default="sdxl", choices=P.FAMILIES)
    ap.add_argument("--state_dir", required=True)
    ap.add_argument("--out", required=True, help="JSONL file the point is appended to")
    ap.add_argument("--export_root", default=None, help="where the exported pipeline goes (default: beside --out)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--guidance_scale", type=float, default=5.0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    root = args.export_root or os.path.join(os.path.dirname(os.path.abspath(args.out)), f"exports-{args.family}")
    path = export_state(args.state_dir, root, args.family)
    with open(os.path.join(path, "toyworld_info.json"), encoding="utf-8") as f:
        step = json.load(f)["steps"]
    state = torch.load(os.path.join(args.state_dir, "state.pt"), map_location="cpu", weights_only=True)
    batch = int(state["config"].get("batch_size", 64))
    pipe = P.load_toy_pipeline(args.family, path)
    t0 = time.time()
    res = P.toy_geneval(pipe, per_task=100, images_per_prompt=2, seed=1234, num_inference_steps=20, guidance_scale=args.guidance_scale)
    point = {"family": args.family, "step": step, "images": step * batch, "run_seconds": run_seconds(args.state_dir, args.family),
             "export": path, "eval_seconds": time.time() - t0, "guidance_scale": args.guidance_scale, **res}
    with open(args.out, "a", encoding="utf-8") as f:
        f.write(json.dumps(point) + "\n")
    tasks = " ".join(f"{t}={res[t]:.3f}" for t in ("single_object", "two_object", "counting", "colors", "position", "color_attr"))
    print(f"step {step} ({point['run_seconds'] / 60:.0f} min): overall {res['overall']:.3f} +- {res['overall_se']:.3f}  {tasks}")


if __name__ == "__main__":
    main()
