"""`diffalign quickstart`: the whole mission on a CPU, in the toy world, measured.

    diffalign quickstart [--method rankdpo|dpo|sft|ppd] [--family sdxl|sd3] [--with_control] [--json out.json]

1. **Toy Syn-Pic.** Training prompts are drawn from the toy grammar (uniform over the six GenEval tasks).
   k generators (the toy checkpoint at different guidance scales and noise seeds, plus any extra
   checkpoints given with --generator) each draw an image per prompt; the rewards score them: by default the
   exact checker `toy_geneval_graded` (the VQA-like reward: verdict plus partial credit per clause); `--reward`
   adds others (toy_clip, tastes). Win counts rank each list (`diffalign synth`, unchanged).
2. **Preference fine-tuning** of the toy model with the project trainer (`PreferenceTrainer`): RankDPO on
   the lists, DPO on the pairs of the same lists, or SFT on the best of each list; LoRA by default.
   `--with_control` trains the same objective, data and budget with the labels shuffled within each
   group: what fine-tuning on the model's own samples gives without any preference.
3. **Toy-GenEval** before and after: `--eval_per_task` prompts per task from the fixed evaluation set,
   one image each, with noise seeds that every compared model shares. Accuracy per task, overall
   (the mean of the tasks) and standard errors; deltas come with paired standard errors.

Writes into --output_dir: `results.json` (also to --json), `grid.png` (the same prompts and noise for
every model, green frame = correct), `training_curves.png`, the Syn-Pic shards and the LoRA weights.
Stages are cached on disk (synth resumes; an evaluation of the same model and settings is reused), so
rerunning a command after an interruption continues where it stopped.
"""

from __future__ import annotations

import os

if __name__ == "__main__":  # run as a script: idle OpenMP threads must not spin (set before torch loads OpenMP)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import numpy as np  # noqa: E402

from diffalign.toyworld.bases import checkpoint_digest, export_state, resolve_base  # noqa: E402,F401 (part of this API)
from diffalign.toyworld.scenes import IMAGE_SIZE  # noqa: E402

METHODS = ("rankdpo", "dpo", "sft", "ppd")
FAMILIES = ("sdxl", "sd3")
ROUND_REFERENCES = ("base", "previous")
# A DPM-Solver++ built from a flow-matching config samples another process (toy-sd3: 0.35 -> 0.10 toy-GenEval).
EVAL_SCHEDULERS = {"sdxl": "DPMSolverMultistepScheduler", "sd3": None}
# Noise seeds of the evaluation images; synth seeds live far below, so no training image shares noise with them.
EVAL_SEED = 10_000_000


@dataclass
class QuickstartConfig:
    family: str = "sdxl"
    method: str = "rankdpo"
    base: str | None = None  # a toy pipeline folder or a pretrain --state_dir; None = the committed checkpoint
    output_dir: str = "runs/quickstart"
    with_control: bool = False
    seed: int = 0
    # 1. toy Syn-Pic
    num_prompts: int = 64
    guidances: tuple[float, ...] = (2.0, 3.5, 5.0, 7.0)  # one generator per guidance scale (k = len)
    generators: list[str] = field(default_factory=list)  # extra generator specs (e.g. another training stage)
    rewards: list[str] | None = None  # None = toy_geneval_graded alone (default_rewards)
    synth_steps: int = 20
    # None = the checkpoint's own (Euler), the measured setting. The one run on DPM-Solver++ 10-step training images
    # (with 4x the prompts and 2x the steps) drifted: random-label control -0.067 (docs/quickstart.md).
    synth_scheduler: str | None = None
    pairwise_mode: str = "all_pairs"
    # 2. training
    tuning: str = "lora"
    lora_rank: int = 16
    train_steps: int = 80
    groups_per_step: int = 4  # lists per step; DPO gets the same number of images (groups * k / 2 pairs)
    learning_rate: float = 1e-3  # measured: 2e-4 gave no gain over the random-label control (docs/quickstart.md)
    beta: float = 2000.0
    # Iterative rounds: round r draws fresh prompts, generates lists from the policy after round r-1, ranks and trains on
    # them. round_reference "base": one LoRA continues across rounds against the original base; "previous": each round
    # trains a fresh LoRA on the previous policy (fused) and uses it as the reference.
    rounds: int = 1
    round_reference: str = "base"
    sft_weight: float = 0.0  # TrainConfig.sft_weight: + weight x the best image's denoising error (preference methods)
    # 3. evaluation
    eval_per_task: int = 60
    num_inference_steps: int = 10
    # "auto" = the family's (EVAL_SCHEDULERS): for toy-sdxl DPM-Solver++ at 10 steps, which matches Euler at 20 on
    # toy-GenEval (0.375 vs 0.381 on the 360 quickstart images, same noise) at half the cost; for toy-sd3 its own
    # flow-matching Euler. None = the checkpoint's own.
    eval_scheduler: str | None = "auto"
    guidance_scale: float = 5.0  # the shipped toy-sdxl's recommended scale
    eval_batch_size: int = 60
    grid_per_task: int = 2
    # machinery
    threads: int | None = None
    progress: bool = True

    @property
    def eval_sampler(self) -> str | None:
        """The scheduler class the evaluation uses (`eval_scheduler`, with "auto" resolved for the family)."""
        return EVAL_SCHEDULERS[self.family] if self.eval_scheduler == "auto" else self.eval_scheduler

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.round_reference not in ROUND_REFERENCES:
            raise ValueError(f"round_reference must be one of {ROUND_REFERENCES}, got {self.round_reference!r}")
        if self.rounds > 1 and self.tuning != "lora":
            raise ValueError("rounds > 1 continues or fuses LoRA adapters: it needs tuning='lora'")
        if self.tuning not in ("lora", "full"):
            raise ValueError(f"tuning must be 'lora' or 'full', got {self.tuning!r}")
        self.guidances = tuple(float(g) for g in self.guidances)
        if len(self.guidances) + len(self.generators) < 2:
            raise ValueError("a ranked list needs k >= 2 images per prompt: give at least two guidances/generators")
        for name in ("rounds", "num_prompts", "train_steps", "groups_per_step", "eval_per_task", "synth_steps", "num_inference_steps", "lora_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_per_task > 100:
            raise ValueError(f"the toy evaluation set has 100 prompts per task; eval_per_task={self.eval_per_task} is too many")


# ------------------------------------------------------------------------------------------------
# Model source
# ------------------------------------------------------------------------------------------------


def load_base_pipeline(family: str, path: str, scheduler: str | None = None):
    from diffalign.synth.specs import swap_scheduler
    from diffalign.toyworld.pretrain import load_toy_pipeline

    return swap_scheduler(load_toy_pipeline(family, path), scheduler)


# ------------------------------------------------------------------------------------------------
# 1. Toy Syn-Pic
# ------------------------------------------------------------------------------------------------


def training_prompts(n: int, seed: int, round_index: int = 1) -> list[dict]:
    """`n` metadata rows from the toy grammar, uniform over tasks (seeded; repeats are kept); new ones each round."""
    from diffalign.toyworld import scenes

    rng = np.random.default_rng([seed, 7_919] + ([round_index] if round_index > 1 else []))
    return [scenes.sample_row(rng) for _ in range(n)]


def default_rewards() -> list[str]:
    """The exact graded checker alone. Registers the toy world's other rewards (toy_geneval, tastes, toy_clip), so
    that `--reward toy_clip` works too.

    Measured (docs/quickstart.md, 3 seeds): ranking by the checker alone gave RankDPO - control +0.032 against
    +0.012 with toy_clip as a second reward; toy_clip agrees with the checker on only 79% of decisive pairs of
    generated images, so it mostly adds label noise here.
    """
    import importlib.util

    from diffalign.toyworld import toy_rewards

    for mod in ("diffalign.toyworld.rewards", "diffalign.toyworld.toy_clip"):
        if importlib.util.find_spec(mod) is not None:
            importlib.import_module(mod)
    return [toy_rewards.TOY_GENEVAL]


def generator_specs(cfg: QuickstartConfig, base_dir: str, round_index: int = 1) -> list[str]:
    """One spec per guidance scale; each generator (and each round) gets its own block of noise seeds."""
    specs = []
    offset = (round_index - 1) * 1_000_000_000
    for i, g in enumerate(cfg.guidances):
        seed = offset + (cfg.seed * 16 + i) * 100_000
        spec = f"{base_dir},id=g{g:g},steps={cfg.synth_steps},guidance={g},size={IMAGE_SIZE},seed={seed},batch_size=32"
        specs.append(spec + (f",scheduler={cfg.synth_scheduler}" if cfg.synth_scheduler else ""))
    for j, spec in enumerate(cfg.generators):
        if ",seed=" not in spec:
            spec += f",seed={offset + (cfg.seed * 16 + len(cfg.guidances) + j) * 100_000}"
        if ",size=" not in spec and ",height=" not in spec:
            spec += f",size={IMAGE_SIZE}"
        specs.append(spec)
    return specs


def run_toy_synpic(cfg: QuickstartConfig, base_dir: str, root: str, round_index: int = 1) -> dict:
    """Generate with `base_dir` (round r > 1: the policy after round r-1), score and rank; returns paths and stats.
    The data go to `root/data-seed<S>-<digest of the settings>`, so a rerun with the same settings resumes (or
    reuses) them and other settings get a new folder."""
    from diffalign.synth import SynthConfig, run_synth

    defaults = default_rewards()  # also registers the toy rewards that --reward may name
    rewards = list(cfg.rewards) if cfg.rewards else defaults
    specs = generator_specs(cfg, base_dir, round_index)
    key = [checkpoint_digest(base_dir), [sp.replace(base_dir, "BASE") for sp in specs], rewards, cfg.num_prompts, cfg.seed,
           cfg.pairwise_mode] + ([round_index] if round_index > 1 else [])
    key = json.dumps(key)
    out_dir = os.path.join(root, f"data-seed{cfg.seed}-{hashlib.sha256(key.encode()).hexdigest()[:10]}")
    os.makedirs(out_dir, exist_ok=True)
    rows = training_prompts(cfg.num_prompts, cfg.seed, round_index)
    prompts_path = os.path.join(out_dir, "prompts.jsonl")
    with open(prompts_path, "w", encoding="utf-8") as f:
        for i, row in enumerate(rows):
            f.write(json.dumps({"prompt": row["prompt"], "prompt_id": f"{cfg.seed}-{i:05d}", "tag": row["tag"]}) + "\n")
    synpic = os.path.join(out_dir, "synpic")
    pairs = os.path.join(out_dir, "pairs")
    scfg = SynthConfig(
        prompts=prompts_path, prompt_id_field="prompt_id", generators=specs, rewards=rewards,
        output_dir=synpic, chunk_size=max(64, cfg.num_prompts), reward_batch_size=64, pairwise_dir=pairs,
        pairwise_mode=cfg.pairwise_mode, progress=cfg.progress,
    )
    stats = run_synth(scfg)
    return {"synpic": synpic, "pairs": pairs, "k": scfg.k, "rewards": rewards, "generators": [g.id for g in scfg.generators],
            "stats": dataclasses.asdict(stats), "prompts": rows}


def synpic_summary(synpic_dir: str) -> dict:
    """What the lists hold: mean exact-checker verdict per generator and how many lists are all ties."""
    from diffalign.synth import read_synpic

    table = read_synpic(synpic_dir)
    rows = table.to_pylist() if hasattr(table, "to_pylist") else list(table)
    gens = rows[0]["generator_ids"]
    names = rows[0]["reward_names"]
    out = {"lists": len(rows), "all_tied": int(sum(len(set(r["phi"])) == 1 for r in rows))}
    if "toy_geneval_graded" in names:
        r = names.index("toy_geneval_graded")
        s = np.array([row["scores"][r] for row in rows])  # (P, k) graded scores; 1.0 = correct
        out["correct_rate_per_generator"] = {g: float((s[:, j] >= 1.0).mean()) for j, g in enumerate(gens)}
        out["best_of_k_correct_rate"] = float((s.max(1) >= 1.0).mean())
    return out


# ------------------------------------------------------------------------------------------------
# 2. Training
# ------------------------------------------------------------------------------------------------


class RandomLabels:
    """The control: each group's images in a random order (seeded per group), the scores left in place.

    For lists this assigns the scores to the images at random; for pairs it makes the preferred image a
    coin flip. The data, the pixels and the budget are those of the real run; only the preference is gone.
    """

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        import torch

        item = dict(self.dataset[index])
        k = item["scores"].shape[0]
        perm = torch.randperm(k, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + int(index)))
        for key in ("pixel_values", "latents", "original_sizes", "crop_top_lefts"):
            if key in item:
                item[key] = item[key][perm]
        return item


def train_config(cfg: QuickstartConfig, base_dir: str, data_dir: str, out_dir: str, k: int, objective: str,
                 init_lora: str | None = None):
    from diffalign.training import TrainConfig

    groups = cfg.groups_per_step * k // 2 if objective == "dpo" else cfg.groups_per_step
    return TrainConfig(
        pretrained_model_name_or_path=base_dir, family=cfg.family, objective=objective, dataset=data_dir,
        resolution=IMAGE_SIZE, tuning=cfg.tuning, lora_rank=cfg.lora_rank, train_batch_size=max(1, groups),
        max_train_steps=cfg.train_steps, learning_rate=cfg.learning_rate, beta=cfg.beta, lr_scheduler="constant",
        sft_weight=cfg.sft_weight if objective != "sft" else 0.0,
        adam_weight_decay=0.0, output_dir=out_dir, overwrite_output_dir=True, checkpointing_steps=0, report_to="none",
        seed=cfg.seed, progress_bar=cfg.progress, init_lora=init_lora,
        # The toy SD3 pipeline runs without T5 and pads with its default 256 zero tokens: train the same way.
        max_sequence_length=256 if cfg.family == "sd3" else 77,
    )


def train_stage(cfg: QuickstartConfig, base_dir: str, synth: dict, out_dir: str, objective: str, control: bool = False,
                init_lora: str | None = None):
    """Train one model; returns (trainer, summary). The trainer holds the trained denoiser in memory."""
    from diffalign.data import load_preference_dataset
    from diffalign.training import PreferenceTrainer

    data_dir = synth["pairs"] if objective == "dpo" else synth["synpic"]
    tcfg = train_config(cfg, base_dir, data_dir, out_dir, synth["k"], objective, init_lora)
    # All-tied lists stay in (zero loss, but they share each step's mean): dropping them, the library default,
    # measured worse on seeds 0 and 1 (RankDPO - control -0.014 / -0.003 against +0.011 / +0.061). DPO's pairs
    # are exported without ties.
    dataset = load_preference_dataset(data_dir, "auto", resolution=IMAGE_SIZE, seed=cfg.seed, keep_ties=objective != "dpo")
    if control:
        dataset = RandomLabels(dataset, cfg.seed + 1)
    trainer = PreferenceTrainer(tcfg, train_dataset=dataset)
    summary = trainer.train()
    return trainer, summary


def export_policy(trainer, path: str) -> str:
    """The trained policy as a plain pipeline folder (LoRA fused in): the next round's generator and, with
    round_reference "previous", its base and reference."""
    import copy

    model = copy.deepcopy(trainer.unwrapped)
    if getattr(model, "peft_config", None):
        model.fuse_lora()
        model.unload_lora()
    trainer.adapter.pipeline(model).save_pretrained(path, safe_serialization=True)
    return path


def train_rounds(cfg: QuickstartConfig, base_dir: str, synth: dict, work: str, tag: str, objective: str,
                 control: bool = False, evaluate_round=None, clock=None, label: str | None = None) -> list[dict]:
    """`cfg.rounds` rounds of data -> training; round 1 trains on `synth`, later rounds on lists generated by the
    policy after the previous round (the control's chain by its own policy). `evaluate_round(trainer, r)` is called
    after each round; returns one record per round (summary, its evaluation, its data). `clock(name)` times the
    stages as train_<label>[-roundN] and synth_<label>-roundN."""
    label = label or tag
    records = []
    source, init_lora, train_dir = base_dir, None, None
    for r in range(1, cfg.rounds + 1):
        suffix = "" if r == 1 else f"-round{r}"
        if r > 1:  # the lists of a policy live beside it, in the previous round's folder
            with clock(f"synth_{label}{suffix}") if clock else contextlib.nullcontext():
                synth = run_toy_synpic(cfg, source, train_dir, round_index=r)
        train_dir = os.path.join(work, f"train-{tag}-seed{cfg.seed}{suffix}")
        train_base = source if cfg.round_reference == "previous" else base_dir
        with clock(f"train_{label}{suffix}") if clock else contextlib.nullcontext():
            trainer, summary = train_stage(cfg, train_base, synth, train_dir, objective, control=control, init_lora=init_lora)
        record = {"round": r, "train_dir": train_dir, "summary": summary, "data": synpic_summary(synth["synpic"])}
        if evaluate_round is not None:
            record["eval"] = evaluate_round(trainer, r)
        if r < cfg.rounds:
            source = export_policy(trainer, os.path.join(train_dir, "policy"))
            init_lora = train_dir if cfg.round_reference == "base" else None
        del trainer
        records.append(record)
    return records


def trained_pipeline(trainer, scheduler: str | None = None):
    from diffalign.synth.specs import swap_scheduler

    model = trainer.unwrapped
    model.eval()
    return swap_scheduler(trainer.adapter.pipeline(model), scheduler)


# ------------------------------------------------------------------------------------------------
# 3. Toy-GenEval with shared noise
# ------------------------------------------------------------------------------------------------


def eval_rows(per_task: int) -> list[dict]:
    from diffalign.toyworld import scenes

    return [r for task in scenes.TASKS for r in scenes.load_eval_set(task)[:per_task]]


def evaluate(pipe, rows: list[dict], cfg: QuickstartConfig, desc: str = "eval", keep: list[int] | None = None) -> dict:
    """Generate one image per row (seed EVAL_SEED + row index, the same for every model) and judge it.

    Returns the summary (per task, overall, standard errors), the per-image verdicts and the images at `keep`.
    """
    import torch
    from tqdm.auto import tqdm

    from diffalign.toyworld.detector import ToyWorldDetector, score_images, summarize
    from diffalign.toyworld.pretrain import generate

    seeds = [EVAL_SEED + i for i in range(len(rows))]
    detector = ToyWorldDetector()
    correct, kept = [], {}
    keep = set(keep or [])
    t0 = time.perf_counter()
    bar = tqdm(total=len(rows), desc=desc, unit="img", disable=not cfg.progress)
    with torch.no_grad():
        for s in range(0, len(rows), cfg.eval_batch_size):
            batch = rows[s : s + cfg.eval_batch_size]
            images = generate(pipe, [r["prompt"] for r in batch], seeds[s : s + len(batch)], cfg.num_inference_steps,
                              cfg.guidance_scale, batch_size=len(batch))
            correct += score_images(images, batch, detector)
            for j, image in enumerate(images):
                if s + j in keep:
                    kept[s + j] = image
            bar.update(len(batch))
    bar.close()
    summary = summarize(rows, correct)
    summary["seconds"] = time.perf_counter() - t0
    return {"summary": summary, "correct": [bool(c) for c in correct], "images": kept}


def paired_deltas(rows: list[dict], before: list[bool], after: list[bool]) -> dict:
    """Per-task and overall accuracy change with paired standard errors (same prompts, same noise)."""
    from diffalign.evaluation.stats import paired_mean_se
    from diffalign.toyworld import scenes

    out, var = {}, 0.0
    tasks = [t for t in scenes.TASKS if any(r["tag"] == t for r in rows)]
    for t in tasks:
        pairs = [(float(a), float(b)) for r, b, a in zip(rows, before, after) if r["tag"] == t]
        out[t], se = paired_mean_se([a for a, _ in pairs], [b for _, b in pairs])
        out[t + "_se"] = se
        var += se**2
    out["overall"] = float(np.mean([out[t] for t in tasks]))
    out["overall_se"] = float(np.sqrt(var) / len(tasks))
    return out


def grid_indices(rows: list[dict], per_task: int) -> list[int]:
    from diffalign.toyworld import scenes

    idx = []
    for t in scenes.TASKS:
        idx += [i for i, r in enumerate(rows) if r["tag"] == t][:per_task]
    return idx


# ------------------------------------------------------------------------------------------------
# Reports
# ------------------------------------------------------------------------------------------------


def format_table(results: dict, models: list[str]) -> str:
    from diffalign.toyworld import scenes

    head = f"{'task':<14}" + "".join(f"{m:>16}" for m in models)
    deltas = [m for m in models if m != "base"]
    head += "".join(f"{'d(' + m + ')':>18}" for m in deltas)
    lines = [head, "-" * len(head)]
    for t in (*scenes.TASKS, "overall"):
        line = f"{t:<14}"
        for m in models:
            s = results[m]
            line += f"{s[t]:>9.3f} ±{s[t + '_se']:.3f}"
        for m in deltas:
            d = results["delta"][m]
            line += f"{d[t]:>+11.3f} ±{d[t + '_se']:.3f}"
        lines.append(line)
    return "\n".join(lines)


def save_grid(path: str, rows: list[dict], indices: list[int], evals: dict[str, dict], scale: int = 2) -> str:
    """Columns: the grid prompts; rows: the models (same noise). Green frame = correct, red = wrong."""
    from PIL import Image, ImageDraw

    names = list(evals)
    cell = IMAGE_SIZE * scale
    pad, label_w, head_h = 4, 70, 14
    w = label_w + len(indices) * (cell + pad)
    h = head_h + len(names) * (cell + pad)
    grid = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for c, i in enumerate(indices):
        draw.text((label_w + c * (cell + pad), 1), rows[i]["tag"][:10], fill=(0, 0, 0))
    for r, name in enumerate(names):
        y = head_h + r * (cell + pad)
        draw.text((2, y + cell // 2 - 5), name[:11], fill=(0, 0, 0))
        for c, i in enumerate(indices):
            x = label_w + c * (cell + pad)
            image = evals[name]["images"][i].resize((cell, cell), Image.NEAREST)
            ok = evals[name]["correct"][i]
            draw.rectangle([x - 2, y - 2, x + cell + 1, y + cell + 1], outline=(0, 170, 0) if ok else (220, 0, 0), width=2)
            grid.paste(image, (x, y))
    grid.save(path)
    with open(os.path.splitext(path)[0] + "_prompts.txt", "w", encoding="utf-8") as f:
        f.write("\n".join(f"{c}: {rows[i]['prompt']}" for c, i in enumerate(indices)) + "\n")
    return path


def read_losses(train_dir: str) -> list[dict]:
    path = os.path.join(train_dir, "losses.jsonl")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def save_curves(path: str, runs: dict[str, list[dict]]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["loss", "implicit_acc", "rewards/margin", "grad_norm"]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2))
    for ax, key in zip(axes, keys):
        for name, hist in runs.items():
            pts = [(h["step"], h[key]) for h in hist if key in h and h[key] == h[key]]
            if not pts:
                continue
            x, y = map(np.asarray, zip(*pts))
            win = max(1, len(y) // 15)
            smooth = np.convolve(y, np.ones(win) / win, mode="valid")
            ax.plot(x, y, alpha=0.25)
            ax.plot(x[win - 1 :], smooth, label=name, color=ax.lines[-1].get_color())
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------


class _Clock:
    def __init__(self):
        self.wall, self.cpu = {}, {}

    def __call__(self, name: str):
        clock = self

        class _Ctx:
            def __enter__(self):
                self.w, self.c = time.perf_counter(), time.process_time()

            def __exit__(self, *exc):
                clock.wall[name] = clock.wall.get(name, 0.0) + time.perf_counter() - self.w
                clock.cpu[name] = clock.cpu.get(name, 0.0) + time.process_time() - self.c

        return _Ctx()


def eval_cache_key(cfg: QuickstartConfig, num_images: int, digest: str) -> dict:
    """What a base evaluation depends on: a stored one with the same key is reused."""
    return {"n": num_images, "steps": cfg.num_inference_steps, "guidance": cfg.guidance_scale, "seed": EVAL_SEED,
            "scheduler": cfg.eval_sampler, "model": digest}


def _cached_eval(path: str, key: dict, make) -> dict:
    """Reuse an evaluation of the same model and settings; images are re-made only for the grid."""
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        if old.get("key") == key:
            return old
    result = make()
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump({"key": key, "summary": result["summary"], "correct": result["correct"]}, f)
    os.replace(path + ".tmp", path)
    return result


def run_ppd(cfg: QuickstartConfig) -> dict:
    """`--method ppd`: personalization is measured by held-out synthetic users' win rates, not by GenEval
    (diffalign.toyworld.ppd; docs/personalization.md)."""
    import torch

    from diffalign.toyworld.ppd import run_quickstart_ppd

    if cfg.family != "sdxl":
        raise ValueError("--method ppd runs on toy-sdxl only (the personalized pipelines are SDXL/SD3, the toy PPD study is SDXL)")
    if cfg.with_control:
        raise ValueError("--with_control is a random-label control for GenEval methods; PPD's control is another user's "
                         "examples, which --method ppd always reports")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    overrides = {} if cfg.base is None else {"base": cfg.base}
    return run_quickstart_ppd(cfg.output_dir, seed=cfg.seed, progress=cfg.progress, **overrides)


def run_quickstart(cfg: QuickstartConfig) -> dict:
    import platform

    import torch

    from diffalign.toyworld import scenes

    if cfg.method == "ppd":
        return run_ppd(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t_start = time.perf_counter()
    load_start = os.getloadavg()
    clock = _Clock()
    out = cfg.output_dir
    os.makedirs(out, exist_ok=True)
    base_dir = resolve_base(cfg.family, cfg.base, out)
    digest = checkpoint_digest(base_dir)
    rows = eval_rows(cfg.eval_per_task)
    show = grid_indices(rows, cfg.grid_per_task)

    # Base evaluation (reused when the same checkpoint was evaluated with the same settings).
    evals: dict[str, dict] = {}
    with clock("eval_base"):
        pipe = load_base_pipeline(cfg.family, base_dir, cfg.eval_sampler)
        base = _cached_eval(os.path.join(out, f"eval-base-{digest}.json"), eval_cache_key(cfg, len(rows), digest),
                            lambda: evaluate(pipe, rows, cfg, "eval base", show))
        if "images" not in base:  # cached verdicts: regenerate just the grid prompts (same seeds, same images)
            from diffalign.toyworld.pretrain import generate

            images = generate(pipe, [rows[i]["prompt"] for i in show], [EVAL_SEED + i for i in show],
                              cfg.num_inference_steps, cfg.guidance_scale, batch_size=len(show))
            base = {**base, "images": dict(zip(show, images))}
        evals["base"] = base

    with clock("synth"):
        synth = run_toy_synpic(cfg, base_dir, out)
    data_info = synpic_summary(synth["synpic"])
    eval_prompts = {r["prompt"] for r in scenes.load_eval_set()}
    data_info["train_prompts_in_eval_set"] = float(np.mean([r["prompt"] in eval_prompts for r in synth["prompts"]]))

    runs = [(cfg.method, False)] + ([("control", True)] if cfg.with_control else [])
    summaries, curves, round_evals = {}, {}, {}
    for name, control in runs:
        tag = f"{cfg.method}{'-control' if control else ''}"

        def evaluate_round(trainer, r, name=name):
            suffix = "" if r == 1 else f"_round{r}"
            with clock(f"eval_{name}{suffix}"):
                return evaluate(trained_pipeline(trainer, cfg.eval_sampler), rows, cfg, f"eval {name}{suffix}", show)

        records = train_rounds(cfg, base_dir, synth, out, tag, cfg.method, control, evaluate_round, clock, label=name)
        summary = records[-1]["summary"]
        summaries[name] = {k: summary.get(k) for k in ("final_loss", "mean_loss_last_10", "median_step_time_s", "wall_time_s", "global_step")}
        curves[name] = [{**row, "step": row["step"] + i * cfg.train_steps} for i, rec in enumerate(records)
                        for row in read_losses(rec["train_dir"])]
        evals[name] = records[-1]["eval"]
        round_evals[name] = records

    models = list(evals)
    results: dict = {m: evals[m]["summary"] for m in models}
    results["delta"] = {m: paired_deltas(rows, evals["base"]["correct"], evals[m]["correct"]) for m in models if m != "base"}
    if cfg.with_control:
        results["delta"]["method_vs_control"] = paired_deltas(rows, evals["control"]["correct"], evals[cfg.method]["correct"])
    results["aligned"] = results.pop(cfg.method)
    results["delta"]["aligned"] = results["delta"].pop(cfg.method)
    if cfg.rounds > 1:
        results["rounds"] = [
            {"round": i + 1}
            | {("aligned" if m == cfg.method else m): {
                "summary": recs[i]["eval"]["summary"],
                "delta_vs_base": paired_deltas(rows, evals["base"]["correct"], recs[i]["eval"]["correct"]),
                "delta_vs_previous_round": paired_deltas(rows, (evals["base"] if i == 0 else recs[i - 1]["eval"])["correct"],
                                                         recs[i]["eval"]["correct"]),
                "data": recs[i]["data"]} for m, recs in round_evals.items()}
            | ({"method_vs_control": paired_deltas(rows, round_evals["control"][i]["eval"]["correct"],
                                                    round_evals[cfg.method][i]["eval"]["correct"])} if cfg.with_control else {})
            for i in range(cfg.rounds)
        ]
    results.update(
        method=cfg.method,
        family=cfg.family,
        base_checkpoint=base_dir,
        base_digest=digest,
        seconds=time.perf_counter() - t_start,
        stage_seconds={k: round(v, 1) for k, v in clock.wall.items()},
        stage_cpu_seconds={k: round(v, 1) for k, v in clock.cpu.items()},
        machine={"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "load_start": load_start,
                 "load_end": os.getloadavg(), "platform": platform.platform()},
        data={k: v for k, v in synth.items() if k not in ("prompts",)} | {"summary": data_info},
        training=summaries,
        config=dataclasses.asdict(cfg),
    )
    save_grid(os.path.join(out, "grid.png"), rows, show, {("aligned" if m == cfg.method else m): evals[m] for m in models})
    save_curves(os.path.join(out, "training_curves.png"), curves)
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2, default=str)
    return results


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = QuickstartConfig()
    p.add_argument("--method", choices=METHODS, default=d.method)
    p.add_argument("--family", choices=FAMILIES, default=d.family)
    p.add_argument("--base", default=None, help="toy pipeline folder or pretrain --state_dir (default: the committed checkpoint)")
    p.add_argument("--output_dir", "--output-dir", default=d.output_dir)
    p.add_argument("--with_control", "--with-control", dest="with_control", action="store_true",
                   help="also train a random-label control on the same data and budget")
    p.add_argument("--json", default=None, help="also write the results JSON here")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--num_prompts", type=int, default=d.num_prompts)
    p.add_argument("--guidances", type=float, nargs="+", default=list(d.guidances), help="one generator per guidance scale")
    p.add_argument("--generator", action="append", dest="generators", default=[], metavar="SPEC",
                   help="an extra generator (diffalign synth spec), e.g. another training stage of the toy model")
    p.add_argument("--reward", action="append", dest="rewards", default=None, metavar="SPEC",
                   help="reward specs (default: toy_geneval_graded alone; e.g. --reward toy_geneval_graded --reward toy_clip)")
    p.add_argument("--synth_steps", type=int, default=d.synth_steps)
    p.add_argument("--synth_scheduler", default=d.synth_scheduler,
                   help="diffusers scheduler class for the Syn-Pic generators (default: the checkpoint's own)")
    p.add_argument("--eval_scheduler", default=d.eval_scheduler,
                   help="diffusers scheduler class for toy-GenEval ('none' = the checkpoint's own; 'auto' = toy-sdxl "
                        "DPM-Solver++, toy-sd3 its own flow-matching Euler)")
    p.add_argument("--tuning", choices=["lora", "full"], default=d.tuning)
    p.add_argument("--lora_rank", type=int, default=d.lora_rank)
    p.add_argument("--train_steps", type=int, default=d.train_steps)
    p.add_argument("--groups_per_step", type=int, default=d.groups_per_step)
    p.add_argument("--learning_rate", type=float, default=d.learning_rate)
    p.add_argument("--beta", type=float, default=d.beta)
    p.add_argument("--rounds", type=int, default=d.rounds,
                   help="iterative rounds: each later round generates and ranks new lists from the previous round's policy")
    p.add_argument("--round_reference", choices=ROUND_REFERENCES, default=d.round_reference,
                   help="rounds > 1: train against the original base (one LoRA continues) or the previous round's policy")
    p.add_argument("--sft_weight", type=float, default=d.sft_weight,
                   help="add this x the best image's denoising error to the preference loss (0 = plain objective)")
    p.add_argument("--eval_per_task", type=int, default=d.eval_per_task)
    p.add_argument("--num_inference_steps", type=int, default=d.num_inference_steps)
    p.add_argument("--guidance_scale", type=float, default=d.guidance_scale)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--no_progress", action="store_true")


def config_from_args(args) -> QuickstartConfig:
    names = {f.name for f in dataclasses.fields(QuickstartConfig)}
    kw = {k: v for k, v in vars(args).items() if k in names}
    kw["guidances"] = tuple(args.guidances)
    kw["progress"] = not args.no_progress
    for name in ("synth_scheduler", "eval_scheduler"):
        if isinstance(kw.get(name), str) and kw[name].lower() == "none":
            kw[name] = None
    return QuickstartConfig(**kw)


def _quiet_loading_bars() -> None:
    """Model loading and data-set preparation bars of the libraries drown ours; keep only the stage bars."""
    import datasets
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    datasets.disable_progress_bars()


def run(args) -> int:
    cfg = config_from_args(args)
    _quiet_loading_bars()
    results = run_quickstart(cfg)
    if cfg.method == "ppd":
        from diffalign.toyworld.ppd import format_table as ppd_table

        print(ppd_table({**results, "interpolation": {**results["interpolation_summary"], "points": results["interpolation"]}}))
        print(f"total {results['seconds']:.0f} s; wrote {os.path.join(cfg.output_dir, 'results.json')}")
        _write_json(args.json, results)
        return 0
    models = ["base", "aligned"] + (["control"] if cfg.with_control else [])
    table_in = {m: results[m] for m in models} | {"delta": {m: results["delta"][m] for m in models if m != "base"}}
    print(f"\ntoy-GenEval ({cfg.family}, {cfg.method}, {int(results['base']['n_images'])} images per model, "
          "same noise for every model; ± = standard error, deltas paired)")
    print(format_table(table_in, models))
    if cfg.with_control:
        d = results["delta"]["method_vs_control"]
        print(f"preference-specific gain ({cfg.method} - control): {d['overall']:+.3f} ± {d['overall_se']:.3f}")
    for rec in results.get("rounds", []):
        line = ", ".join(f"{m} {rec[m]['summary']['overall']:.3f} ({rec[m]['delta_vs_base']['overall']:+.3f} vs base, "
                         f"{rec[m]['delta_vs_previous_round']['overall']:+.3f} vs round {rec['round'] - 1})"
                         for m in ("aligned", "control") if m in rec)
        print(f"round {rec['round']}: {line}")
    print(f"total {results['seconds']:.0f} s; stages: " + ", ".join(f"{k} {v:.0f}s" for k, v in results["stage_seconds"].items()))
    print(f"wrote {os.path.join(cfg.output_dir, 'results.json')}, grid.png, training_curves.png")
    _write_json(args.json, results)
    return 0


def _write_json(path: str | None, results: dict) -> None:
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2, default=str)


def register(subparsers) -> None:
    p = subparsers.add_parser("quickstart", help="toy world end to end: Syn-Pic -> RankDPO/DPO/SFT -> toy-GenEval before/after",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    from diffalign.cli import snake_case_options

    p = argparse.ArgumentParser(prog="python -m diffalign.toyworld.quickstart", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(snake_case_options(p).parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
