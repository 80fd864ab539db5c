"""Toy-world cost per image: the pretrain step (training images/s) and generation (images/s, 10 steps, CFG).

    python benchmarks/toy_throughput.py [--v1 DIR] [--threads 2] [--rounds 7] --out runs/bench/toy_throughput

Each arm is a toy pipeline folder: the current checkpoints (or, before they exist, freshly built
components of the current architecture) and, with --v1, the folder holding the v1 checkpoints
(`git archive 8295deb diffalign/toyworld/checkpoints | tar -x -C /tmp/v1`, then --v1 /tmp/v1/diffalign/toyworld/checkpoints).
A training step is the recipe's own: render a batch, VAE-encode it, encode captions, the denoising loss,
backward, clipping, AdamW and the EMA update. Arms alternate round by round (ABAB) and medians are reported.
The v1 SD3 transformer is timed with the same collapsed zero tokens as v2 (the v1 recipe ran 256 real ones),
so its training figure flatters v1.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from diffalign.toyworld import pretrain as P  # noqa: E402


class Arm:
    def __init__(self, name: str, family: str, path: str | None, batch_size: int, gen_images: int):
        self.name, self.family = name, family
        if path is None:  # the current architecture, freshly initialised (the cost does not depend on the weights)
            components = P.build_components(family)
            self.pipe = P.make_pipeline(family, components)
        else:
            self.pipe = P.load_toy_pipeline(family, path)
            components = dict(self.pipe.components)
        self.components = components
        if family == "sd3":
            components["transformer"].set_attn_processor(P.RepeatedTokenJointAttnProcessor())
        self.cfg = P.PretrainConfig(family=family, batch_size=batch_size, output_dir="unused", state_dir="unused")
        self.modules = P._trainable(components)
        self.params = P._named_params(self.modules)
        self.opt = torch.optim.AdamW(self.params.values(), lr=1e-5)
        self.ema = {k: p.detach().clone() for k, p in self.params.items()}
        self.tok = P.TokenCache(components["tokenizer"])
        self.empty = self.tok([""])
        self.stream = P.SceneStream(0, 0.5)
        self.gen_images = gen_images
        self.step_index = 0
        self.n_params = {k: sum(p.numel() for p in m.parameters()) for k, m in components.items() if isinstance(m, torch.nn.Module)}

    def train_step(self) -> float:
        for m in self.modules.values():
            m.train()
        t0 = time.perf_counter()
        start = self.step_index * self.cfg.batch_size
        items = [self.stream[i] for i in range(start, start + self.cfg.batch_size)]
        x, captions = torch.stack([a for a, _ in items]), [c for _, c in items]
        latents, ids = P.batch_inputs(self.cfg, self.components["vae"], self.tok, self.empty, x, captions, self.step_index)
        loss = P.training_loss(self.cfg, self.components, latents, ids, self.step_index, torch.device("cpu"))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params.values(), 1.0)
        self.opt.step()
        P._ema_update(self.ema, self.params, 0.999)
        self.step_index += 1
        return time.perf_counter() - t0

    def generate(self) -> float:
        for m in self.modules.values():
            m.eval()
        prompts = [r["prompt"] for r in P.eval_rows(20)][: self.gen_images]
        t0 = time.perf_counter()
        P.generate(self.pipe, prompts, list(range(len(prompts))), 10, 5.0, batch_size=len(prompts))
        return time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--v1", help="folder with the v1 toy-sdxl/ and toy-sd3/ checkpoints (side-by-side baseline)")
    ap.add_argument("--current", default=P.CHECKPOINT_ROOT, help="folder with the current checkpoints, or 'fresh'")
    ap.add_argument("--families", default="sdxl,sd3")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batch_size", type=int, default=64)
    ap.add_argument("--gen_images", type=int, default=32)
    ap.add_argument("--out", default="runs/bench/toy_throughput")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    arms = []
    for fam in args.families.split(","):
        if args.v1:
            arms.append(Arm(f"v1 toy-{fam}", fam, os.path.join(args.v1, f"toy-{fam}"), args.batch_size, args.gen_images))
        current = None if args.current == "fresh" else os.path.join(args.current, f"toy-{fam}")
        arms.append(Arm(f"v2 toy-{fam}", fam, current, args.batch_size, args.gen_images))
    times = {a.name: {"train": [], "gen": []} for a in arms}
    for r in range(args.rounds + 1):  # round 0 warms up
        for a in arms:
            tr, ge = a.train_step(), a.generate()
            if r:
                times[a.name]["train"].append(tr)
                times[a.name]["gen"].append(ge)
    rows = []
    for a in arms:
        tr, ge = float(np.median(times[a.name]["train"])), float(np.median(times[a.name]["gen"]))
        rows.append({"arm": a.name, "params": a.n_params, "train_step_s": tr, "train_images_per_s": args.batch_size / tr,
                     "gen_batch_s": ge, "gen_images_per_s": args.gen_images / ge})
    print(f"threads {args.threads}, batch {args.batch_size}, {args.rounds} rounds (medians), generation: {args.gen_images} images, "
          "10 steps, CFG 5")
    print("| arm | denoiser params | train images/s | generated images/s |\n|---|---|---|---|")
    for row in rows:
        den = row["params"].get("unet", row["params"].get("transformer", 0))
        print(f"| {row['arm']} | {den / 1e6:.2f}M | {row['train_images_per_s']:.1f} | {row['gen_images_per_s']:.1f} |")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "toy_throughput.json"), "w", encoding="utf-8") as f:
        json.dump({"threads": args.threads, "batch_size": args.batch_size, "rounds": args.rounds, "rows": rows,
                   "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}, f, indent=2)


if __name__ == "__main__":
    main()
