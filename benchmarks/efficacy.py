"""Efficacy benchmark: does the preference signal matter? Random-label control vs SFT (best-of-k) vs DPO vs
RankDPO on identical data and compute, several seeds, toy-sdxl and toy-sd3, scored by toy-GenEval.

    python benchmarks/efficacy.py                                  # both families, 3 seeds, quickstart budgets
    python benchmarks/efficacy.py --families sdxl --seeds 1 --train_steps 60 --eval_per_task 30   # a quick look

Per seed, one toy Syn-Pic set (diffalign.toyworld.quickstart: k generators x the exact-checker reward) feeds
every method; every method trains the same number of steps on the same number of images per step (DPO
sees the lists as pairs: groups * k / 2 pairs a step); every model is evaluated on the same prompts with
the same noise seeds as the base. The control is the --control_objective (RankDPO by default) trained on
the same lists with the images shuffled within each list, i.e. with random labels.

Reports, per family and method: mean ± std over seeds of toy-GenEval overall, the mean per-task change
over the base, and the preference-specific gain (method - control, paired per seed; mean ± std over seeds
and the mean paired standard error). Prints a table; writes JSON (resumable: finished runs are kept).
The PPD part of issue 7 (held-out synthetic users, win rates) is `benchmarks/efficacy_ppd.py`.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from diffalign.toyworld import quickstart as Q  # noqa: E402
from diffalign.toyworld.bases import checkpoint_digest, resolve_base  # noqa: E402

METHODS = ("control", "sft", "dpo", "rankdpo")


def run_key(cfg: Q.QuickstartConfig) -> dict:
    """The settings a stored result depends on (a rerun with other settings starts afresh)."""
    keep = ("num_prompts", "guidances", "generators", "rewards", "synth_steps", "pairwise_mode", "tuning", "lora_rank",
            "train_steps", "groups_per_step", "learning_rate", "beta", "eval_per_task", "num_inference_steps", "guidance_scale",
            "synth_scheduler", "eval_scheduler", "rounds", "round_reference")
    return json.loads(json.dumps({k: getattr(cfg, k) for k in keep}))


def _save(path: str, state: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(state, f, indent=2, default=str)
    os.replace(path + ".tmp", path)


def run_family(family: str, base: str | None, seeds: list[int], methods: list[str], cfg: Q.QuickstartConfig,
               control_objective: str, state: dict, out_json: str) -> None:
    from diffalign.toyworld import scenes

    fam = state["families"].setdefault(family, {"runs": {}})
    work = os.path.join(cfg.output_dir, family)
    os.makedirs(work, exist_ok=True)
    base_dir = resolve_base(family, base, work)
    digest = checkpoint_digest(base_dir)
    if fam.get("base_digest") not in (None, digest):
        fam["runs"] = {}  # another checkpoint: earlier results do not apply
    fam.update(base_checkpoint=base_dir, base_digest=digest)
    fcfg = dataclasses.replace(cfg, family=family, output_dir=work)
    rows = Q.eval_rows(cfg.eval_per_task)
    key = Q.eval_cache_key(cfg, len(rows), digest)
    t = time.perf_counter()
    base_eval = Q._cached_eval(os.path.join(work, f"eval-base-{digest}.json"), key,
                               lambda: Q.evaluate(Q.load_base_pipeline(family, base_dir, fcfg.eval_sampler), rows, fcfg, f"{family} base"))
    fam["base"] = base_eval["summary"]
    fam["base_correct"] = base_eval["correct"]
    fam.setdefault("seconds", {})["eval_base"] = time.perf_counter() - t
    _save(out_json, state)
    for seed in seeds:
        scfg = dataclasses.replace(fcfg, seed=seed)
        todo = [m for m in methods if f"{seed}/{m}" not in fam["runs"]]
        if not todo:
            continue
        t = time.perf_counter()
        synth = Q.run_toy_synpic(scfg, base_dir, work)
        data = Q.synpic_summary(synth["synpic"])
        data["train_prompts_in_eval_set"] = float(np.mean([r["prompt"] in {e["prompt"] for e in scenes.load_eval_set()}
                                                           for r in synth["prompts"]]))
        fam.setdefault("data", {})[str(seed)] = data | {"synth_seconds": time.perf_counter() - t}
        for method in todo:
            objective = control_objective if method == "control" else method
            t = time.perf_counter()
            def evaluate(trainer, r, scfg=scfg, desc=f"{family} seed{seed} {method} round"):
                return Q.evaluate(Q.trained_pipeline(trainer, scfg.eval_sampler), rows, scfg, f"{desc} {r}")

            records = Q.train_rounds(scfg, base_dir, synth, work, method, objective, control=method == "control",
                                     evaluate_round=evaluate)
            ev, summary = records[-1]["eval"], records[-1]["summary"]
            eval_s = sum(rec["eval"]["summary"]["seconds"] for rec in records)
            fam["runs"][f"{seed}/{method}"] = {
                "summary": ev["summary"], "correct": ev["correct"], "objective": objective,
                "train_seconds": time.perf_counter() - t - eval_s, "eval_seconds": eval_s,
                "final_loss": summary.get("final_loss"), "median_step_time_s": summary.get("median_step_time_s"),
                "rounds": [{"summary": rec["eval"]["summary"], "correct": rec["eval"]["correct"], "data": rec["data"]}
                           for rec in records],
            }
            _save(out_json, state)


def aggregate(state: dict, seeds: list[int], methods: list[str]) -> dict:
    """Mean ± std over seeds; per-task deltas over the base; paired gains over the control."""
    from diffalign.toyworld import scenes

    rows = Q.eval_rows(state["config"]["eval_per_task"])
    out = {}
    for family, fam in state["families"].items():
        res = {"base_overall": fam["base"]["overall"], "base_overall_se": fam["base"]["overall_se"], "methods": {}}
        for m in methods:
            done = [s for s in seeds if f"{s}/{m}" in fam["runs"]]
            if not done:
                continue
            runs = [fam["runs"][f"{s}/{m}"] for s in done]
            overall = np.array([r["summary"]["overall"] for r in runs])
            entry = {
                "seeds": done,
                "overall_mean": float(overall.mean()),
                "overall_std": float(overall.std(ddof=1)) if len(done) > 1 else None,
                "overall_se_mean": float(np.mean([r["summary"]["overall_se"] for r in runs])),
                "gain_mean": float(overall.mean() - fam["base"]["overall"]),
                "task_delta_mean": {t: float(np.mean([r["summary"][t] for r in runs]) - fam["base"][t]) for t in scenes.TASKS},
                "train_seconds_mean": float(np.mean([r["train_seconds"] for r in runs])),
            }
            if len(runs[0].get("rounds", [])) > 1:  # iterative rounds: each round's gain over the one before, paired
                entry["rounds"] = []
                for i in range(len(runs[0]["rounds"])):
                    before = [fam["base_correct"] if i == 0 else r["rounds"][i - 1]["correct"] for r in runs]
                    steps = [Q.paired_deltas(rows, b, r["rounds"][i]["correct"]) for b, r in zip(before, runs)]
                    entry["rounds"].append({
                        "overall_mean": float(np.mean([r["rounds"][i]["summary"]["overall"] for r in runs])),
                        "gain_over_previous_mean": float(np.mean([d["overall"] for d in steps])),
                        "gain_over_previous_paired_se_mean": float(np.mean([d["overall_se"] for d in steps])),
                        "gain_over_previous_per_seed": [d["overall"] for d in steps],
                    })
            if m != "control":
                paired = [Q.paired_deltas(rows, fam["runs"][f"{s}/control"]["correct"], fam["runs"][f"{s}/{m}"]["correct"])
                          for s in done if f"{s}/control" in fam["runs"]]
                if paired:
                    g = np.array([p["overall"] for p in paired])
                    entry["gain_over_control_mean"] = float(g.mean())
                    entry["gain_over_control_std"] = float(g.std(ddof=1)) if len(g) > 1 else None
                    entry["gain_over_control_paired_se_mean"] = float(np.mean([p["overall_se"] for p in paired]))
            res["methods"][m] = entry
        out[family] = res
    return out


def format_report(agg: dict) -> str:
    from diffalign.toyworld import scenes

    lines = []
    for family, res in agg.items():
        lines.append(f"\ntoy-{family}: base overall {res['base_overall']:.3f} ± {res['base_overall_se']:.3f} (SE)")
        head = f"{'method':<9}{'seeds':>6}{'overall mean±std':>20}{'gain':>8}{'vs control (±std, paired SE)':>32}  " + " ".join(
            f"{t[:8]:>8}" for t in scenes.TASKS)
        lines += [head, "-" * len(head)]
        for m, e in res["methods"].items():
            std = f"±{e['overall_std']:.3f}" if e["overall_std"] is not None else " (1 seed)"
            vs = ""
            if "gain_over_control_mean" in e:
                gs = f"±{e['gain_over_control_std']:.3f}" if e["gain_over_control_std"] is not None else ""
                vs = f"{e['gain_over_control_mean']:+.3f}{gs} (SE {e['gain_over_control_paired_se_mean']:.3f})"
            lines.append(f"{m:<9}{len(e['seeds']):>6}{e['overall_mean']:>11.3f}{std:>9}{e['gain_mean']:>+8.3f}{vs:>32}  "
                         + " ".join(f"{e['task_delta_mean'][t]:>+8.3f}" for t in scenes.TASKS))
            for i, rd in enumerate(e.get("rounds", [])):
                lines.append(f"  round {i + 1}: overall {rd['overall_mean']:.3f}, over round {i}: {rd['gain_over_previous_mean']:+.3f} "
                             f"(paired SE {rd['gain_over_previous_paired_se_mean']:.3f}; per seed "
                             + " / ".join(f"{g:+.3f}" for g in rd["gain_over_previous_per_seed"]) + ")")
    return "\n".join(lines)


def main(argv=None) -> int:
    d = Q.QuickstartConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", nargs="+", choices=Q.FAMILIES, default=list(Q.FAMILIES))
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (0, 1, ...)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--control_objective", choices=["rankdpo", "dpo", "sft"], default="rankdpo")
    p.add_argument("--base_sdxl", default=None, help="toy-sdxl pipeline folder or pretrain state dir (default: committed)")
    p.add_argument("--base_sd3", default=None)
    p.add_argument("--output_dir", default="runs/efficacy")
    p.add_argument("--json", default="benchmarks/results/efficacy.json")
    for name in ("num_prompts", "synth_steps", "lora_rank", "train_steps", "groups_per_step", "eval_per_task", "num_inference_steps"):
        p.add_argument(f"--{name}", type=int, default=getattr(d, name))
    for name in ("learning_rate", "beta", "guidance_scale"):
        p.add_argument(f"--{name}", type=float, default=getattr(d, name))
    p.add_argument("--guidances", type=float, nargs="+", default=list(d.guidances))
    p.add_argument("--tuning", choices=["lora", "full"], default=d.tuning)
    p.add_argument("--rounds", type=int, default=d.rounds, help="iterative rounds (each later round: new lists from the last policy)")
    p.add_argument("--round_reference", choices=Q.ROUND_REFERENCES, default=d.round_reference)
    p.add_argument("--reward", action="append", dest="rewards", default=None, metavar="SPEC",
                   help="reward specs for synth, as in the quickstart (default: toy_geneval_graded alone)")
    p.add_argument("--synth_scheduler", default=d.synth_scheduler, help="diffusers scheduler class for synth (default: the checkpoint's)")
    p.add_argument("--eval_scheduler", default=d.eval_scheduler, help="diffusers scheduler class for evaluation ('none' = the checkpoint's; 'auto' = the family's)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no_progress", action="store_true")
    args = p.parse_args(argv)
    Q._quiet_loading_bars()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = Q.QuickstartConfig(
        output_dir=args.output_dir, num_prompts=args.num_prompts, guidances=tuple(args.guidances), synth_steps=args.synth_steps,
        tuning=args.tuning, rounds=args.rounds, round_reference=args.round_reference, rewards=args.rewards, lora_rank=args.lora_rank, train_steps=args.train_steps, groups_per_step=args.groups_per_step,
        learning_rate=args.learning_rate, beta=args.beta, eval_per_task=args.eval_per_task,
        num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale, progress=not args.no_progress,
        synth_scheduler=None if str(args.synth_scheduler).lower() == "none" else args.synth_scheduler,
        eval_scheduler=None if str(args.eval_scheduler).lower() == "none" else args.eval_scheduler,
    )
    state = {}
    if os.path.exists(args.json):
        with open(args.json, encoding="utf-8") as f:
            state = json.load(f)
    key = run_key(cfg) | {"control_objective": args.control_objective}
    if state.get("config") != {**key, "eval_per_task": cfg.eval_per_task}:
        state = {"config": {**key, "eval_per_task": cfg.eval_per_task}, "families": {}}
    state["command"] = "python benchmarks/efficacy.py " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    state["machine"] = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "load_start": os.getloadavg()}
    t0 = time.perf_counter()
    seeds = list(range(args.seeds))
    for family in args.families:
        base = args.base_sdxl if family == "sdxl" else args.base_sd3
        run_family(family, base, seeds, args.methods, cfg, args.control_objective, state, args.json)
    state["machine"]["load_end"] = os.getloadavg()
    state["seconds_this_invocation"] = time.perf_counter() - t0
    state["aggregate"] = aggregate(state, seeds, args.methods)
    _save(args.json, state)
    print(format_report(state["aggregate"]))
    print(f"\nwrote {args.json} ({state['seconds_this_invocation']:.0f} s this invocation)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
