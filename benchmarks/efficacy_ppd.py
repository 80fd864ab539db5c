"""PPD efficacy in the toy world (issue 7): held-out synthetic users on the shipped toy-sdxl, several seeds.

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE python benchmarks/efficacy_ppd.py --seeds 0 1 2 \\
        --output_dir runs/efficacy_ppd --json benchmarks/results/efficacy_ppd.json

Per seed, `diffalign.toyworld.ppd.run_toyworld_ppd` draws a population of synthetic users
(weighted mixes of the toy taste rewards), trains PPD with the project trainer on the training users and
measures on held-out users: win rate over the base under the user's own reward with N = 1/2/4/8 example
pairs (same prompts and noise seeds), user specificity (images from another held-out user's examples) and
an interpolation sweep between two held-out users. Prints a table of mean ± std over seeds (and the mean
per-seed standard error); writes the JSON (finished seeds are kept: a rerun continues).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from diffalign.toyworld import ppd as T  # noqa: E402


def _save(path: str, state: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(state, f, indent=2, default=str)
    os.replace(path + ".tmp", path)


def _ms(values) -> str:
    v = np.asarray(values, dtype=float)
    return f"{v.mean():.3f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.3f}"


def summarize(runs: dict) -> dict:
    """Mean / std over seeds of every win rate, mean per-seed se, and the interpolation verdicts."""
    seeds = sorted(runs, key=int)
    first = runs[seeds[0]]
    out = {"seeds": [int(s) for s in seeds], "own": {}}
    for n in first["win_rate"]["own"]:
        vals = [runs[s]["win_rate"]["own"][n]["mean"] for s in seeds]
        out["own"][n] = {"mean": float(np.mean(vals)), "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0,
                         "mean_se": float(np.mean([runs[s]["win_rate"]["own"][n]["se"] for s in seeds])), "per_seed": vals}
    for key in ("other", "own_vs_other"):
        vals = [runs[s]["win_rate"][key]["mean"] for s in seeds]
        out[key] = {"mean": float(np.mean(vals)), "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0,
                    "mean_se": float(np.mean([runs[s]["win_rate"][key]["se"] for s in seeds])), "per_seed": vals}
    out["interpolation"] = {
        s: {k: runs[s]["interpolation"][k] for k in ("user_a", "user_b", "cosine", "spearman_a", "spearman_b", "monotone_a",
                                                      "monotone_b", "monotone_a_within_2se", "monotone_b_within_2se")}
        | {"reward_a": [p["reward_a"] for p in runs[s]["interpolation"]["points"]],
           "reward_b": [p["reward_b"] for p in runs[s]["interpolation"]["points"]]}
        for s in seeds
    }
    return out


def format_summary(summary: dict) -> str:
    lines = [f"seeds {summary['seeds']}; win rate of the personalized image over the base image (same prompt and noise), "
             "judged by the held-out user's own reward; mean ± std over seeds, (mean per-seed se)"]
    for n, s in summary["own"].items():
        lines.append(f"  own examples N={n:<3} {_ms(s['per_seed'])}  ({s['mean_se']:.3f})   per seed {np.round(s['per_seed'], 3).tolist()}")
    o, oo = summary["other"], summary["own_vs_other"]
    lines.append(f"  another user's examples vs base  {_ms(o['per_seed'])}  ({o['mean_se']:.3f})")
    lines.append(f"  own vs another user's examples   {_ms(oo['per_seed'])}  ({oo['mean_se']:.3f})")
    for s, it in summary["interpolation"].items():
        lines.append(f"  interpolation seed {s}: A {np.round(it['reward_a'], 2).tolist()} (monotone {it['monotone_a']}, "
                     f"within 2se {it['monotone_a_within_2se']}); B {np.round(it['reward_b'], 2).tolist()} "
                     f"(monotone {it['monotone_b']}, within 2se {it['monotone_b_within_2se']})")
    return "\n".join(lines)


def main(argv=None) -> int:
    d = T.ToyWorldPPDConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--output_dir", default="runs/efficacy_ppd")
    p.add_argument("--json", default="benchmarks/results/efficacy_ppd.json")
    p.add_argument("--base", default=None, help="toy-sdxl pipeline folder (default: the shipped checkpoint)")
    for name in ("num_train_users", "num_test_users", "num_prompts", "images_per_prompt", "context_images", "num_inference_steps",
                 "train_steps", "batch_size", "eval_prompts", "eval_seeds_per_prompt", "num_context", "encoder_dim",
                 "num_tokens", "lora_rank", "context_pool"):
        p.add_argument(f"--{name}", type=int, default=getattr(d, name))
    for name in ("learning_rate", "beta", "guidance_scale", "user_dropout", "user_scale", "eval_user_scale", "sft_weight"):
        p.add_argument(f"--{name}", type=float, default=getattr(d, name))
    p.add_argument("--tuning", choices=["none", "lora"], default=d.tuning)
    p.add_argument("--encoder", choices=["taste", "toy_clip"], default=d.encoder)
    p.add_argument("--negative_user", choices=["none", "swapped"], default=d.negative_user,
                   help="unconditional-branch user when generating: the null user, or the user's examples swapped")
    p.add_argument("--tasks", nargs="+", default=list(d.tasks))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no_progress", action="store_true")
    args = p.parse_args(argv)

    names = {f.name for f in dataclasses.fields(T.ToyWorldPPDConfig)}
    kw = {k: v for k, v in vars(args).items() if k in names and k not in ("output_dir", "seed")}
    kw["progress"] = not args.no_progress
    state = {}
    if os.path.exists(args.json):
        with open(args.json, encoding="utf-8") as f:
            state = json.load(f)
    probe = dataclasses.asdict(T.ToyWorldPPDConfig(**kw))
    key = json.loads(json.dumps({k: v for k, v in probe.items() if k not in ("progress", "threads", "output_dir", "seed")}))
    if state.get("key") != key:
        state = {"key": key, "runs": {}}
    t0 = time.perf_counter()
    for seed in args.seeds:
        if str(seed) in state["runs"]:
            continue
        cfg = T.ToyWorldPPDConfig(output_dir=os.path.join(args.output_dir, f"seed{seed}"), seed=seed, **kw)
        res = T.run_toyworld_ppd(cfg)
        print(f"\nseed {seed} ({res['seconds']:.0f} s; stages {res['stage_seconds']})\n{T.format_table(res)}", flush=True)
        state["runs"][str(seed)] = res
        state["summary"] = summarize(state["runs"])
        _save(args.json, state)
    state["summary"] = summarize(state["runs"])
    state["command"] = "OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE python benchmarks/efficacy_ppd.py " + " ".join(argv or os.sys.argv[1:])
    state["seconds_this_invocation"] = time.perf_counter() - t0
    _save(args.json, state)
    print("\n" + format_summary(state["summary"]))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
