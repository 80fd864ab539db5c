"""Our trainer against the real diffusers Diffusion-DPO SDXL script, both run as whole processes (issue #17).

The baseline is the unmodified `examples/research_projects/diffusion_dpo/train_diffusion_dpo_sdxl.py` of a
diffusers checkout, read at run time from `--diffusers_repo` (a checkout, or a bare git dir from which the file
is extracted with `git show` into a temporary folder outside this tree). Nothing of it is copied here. Its
top-level `import wandb` is met by a stub module in a temporary folder put first on PYTHONPATH for that
subprocess only; the script itself is never edited.

Both programs get the same inputs, written to a temporary work folder: a tiny random SDXL
(`diffalign.testing.tiny_sdxl_pipeline(0).save_pretrained`, tokenizers included), a 64-row Pick-a-Pic-style
parquet (caption, jpg_0, jpg_1 as PNG bytes, label_0 in {0, 1}), 64 px, 2 pairs a step, LoRA r8 on
to_q/to_k/to_v/to_out.0, lr 1e-5, constant schedule, fp32, beta 5000, no flips, no validation, no checkpoints,
no tracker, one process under `accelerate launch --num_processes 1 --cpu`, `--threads` OpenMP threads.

Arms (run alternating, ABCD ABCD ...):
  diffusers              the diffusers script
  ours                   train/train.py on the parquet (VAE and text encoders every step, as the script)
  ours_cache             train/train.py on a `diffalign cache` latent cache (built once, before timing)
  ours_cache_precompute  the cache + precompute_reference=true (its pre-pass runs inside the process, so the
                         per-step figure includes it: the pre-pass covers every step of the run)

Per-step cost = (run with n2 steps - run with n1 steps) / (n2 - n1), which takes out start-up (imports, model
load, dataset conversion, LoRA save). Wall clock of the whole subprocess and CPU-seconds (user + system, from
getrusage(RUSAGE_CHILDREN) deltas: the launcher and the training process it waits for) are both reported;
medians over `--repeats` repetitions.

    python benchmarks/vs_diffusers.py --diffusers_repo /path/to/diffusers --out benchmarks/results
    python benchmarks/vs_diffusers.py --diffusers_repo DIR --n1 1 --n2 3 --repeats 1 --threads 1 --out /tmp/x.json  # smoke
    python benchmarks/vs_diffusers.py --profile --out /tmp/profile.json   # torch.profiler breakdown of our step, in-process

`--out` is a .json path or a folder (vs_diffusers.json / vs_diffusers_profile.json are written there).
Run it on an idle machine: the load average before every run is kept in the JSON.

What the script needs from its inputs (it is run as published; only inputs and flags are chosen):
  --dataset_split_name train     its default split is "validation"; a local parquet folder has "train" only
  --checkpointing_steps 10**9    it computes `global_step % checkpointing_steps` every step (0 divides by zero)
  --report_to <missing tracker>  Accelerator(log_with=...) refuses "none"; a known tracker whose package is not
                                 installed is skipped, so none runs (we check that no tfevents file appears)
  --no_hflip                     it flips with p=0.5 by default; ours does not (random_flip=false)
  import wandb                   met by a stub module on that subprocess's PYTHONPATH
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import hashlib
import io
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

SCRIPT_IN_REPO = "examples/research_projects/diffusion_dpo/train_diffusion_dpo_sdxl.py"
ARMS = ("diffusers", "ours", "ours_cache", "ours_cache_precompute")
ARM_TITLES = {
    "diffusers": "diffusers train_diffusion_dpo_sdxl.py (VAE + text encoders every step)",
    "ours": "ours, parquet (VAE + text encoders every step)",
    "ours_cache": "ours, latent cache",
    "ours_cache_precompute": "ours, latent cache + precompute_reference (pre-pass counted)",
}
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
# Trackers accelerate knows; the script passes --report_to straight to Accelerator(log_with=...), which refuses
# "none" but skips a known tracker whose package is missing. We pass the first missing one: no tracker runs.
UNINSTALLED_TRACKER_CANDIDATES = ("dvclive", "aim", "swanlab", "clearml", "comet_ml", "mlflow", "trackio")


# =========================================================================================== the diffusers script
def _git(repo: str, *args: str) -> str:
    return subprocess.run(["git", "-C", repo, *args], check=True, capture_output=True, text=True).stdout


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder + os.sep)


def locate_script(repo: str, rev: str | None, scratch: str) -> dict:
    """The script to run: the checkout's file as it is, or (bare git dir, or `rev` given) `git show rev:path`
    written into `scratch` (outside this tree)."""
    repo = os.path.abspath(os.path.expanduser(repo))
    if _inside(repo, REPO):
        raise SystemExit(f"--diffusers_repo {repo} is inside this repository; the baseline must stay outside it")
    if not os.path.isdir(repo):
        raise SystemExit(f"--diffusers_repo {repo} is not a folder")
    info: dict = {"repo": repo, "path_in_repo": SCRIPT_IN_REPO}
    in_checkout = os.path.join(repo, SCRIPT_IN_REPO)
    if rev is None and os.path.isfile(in_checkout):
        info.update(source="checkout (run in place)", path=in_checkout)
        try:
            info["commit"] = _git(repo, "rev-parse", "HEAD").strip()
            info["modified_in_checkout"] = bool(_git(repo, "status", "--porcelain", "--", SCRIPT_IN_REPO).strip())
        except (subprocess.CalledProcessError, FileNotFoundError):
            info["commit"], info["modified_in_checkout"] = None, None
    else:
        rev = rev or "HEAD"
        try:
            commit = _git(repo, "rev-parse", "--verify", f"{rev}^{{commit}}").strip()
            text = _git(repo, "show", f"{commit}:{SCRIPT_IN_REPO}")
        except subprocess.CalledProcessError as e:
            raise SystemExit(f"cannot read {SCRIPT_IN_REPO} at {rev} from {repo}: {e.stderr.strip()}") from e
        folder = os.path.join(scratch, "diffusers_script")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, os.path.basename(SCRIPT_IN_REPO))
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        info.update(source=f"git show {rev}:{SCRIPT_IN_REPO}", path=path, commit=commit, rev=rev)
        with contextlib.suppress(subprocess.CalledProcessError):
            info["commit_date"] = _git(repo, "show", "-s", "--format=%cI", commit).strip()
    with open(info["path"], "rb") as f:
        info["sha256"] = hashlib.sha256(f.read()).hexdigest()
    if _inside(info["path"], REPO):
        raise SystemExit(f"the script to run ({info['path']}) is inside this repository; refusing")
    return info


def write_wandb_stub(folder: str) -> str:
    """A `wandb` module that satisfies the script's top-level import (no tracker uses it: see report_to)."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "wandb.py"), "w", encoding="utf-8") as f:
        f.write(
            '"""Import stub for the diffusers DPO script (benchmarks/vs_diffusers.py); not the real wandb."""\n'
            "__version__ = '0.0.0+stub'\n\n\n"
            "def __getattr__(name):\n"
            "    raise RuntimeError(f'wandb.{name} called, but this is an import stub (vs_diffusers benchmark)')\n"
        )
    return folder


def uninstalled_tracker() -> str:
    from accelerate import utils

    for name in UNINSTALLED_TRACKER_CANDIDATES:
        check = getattr(utils, f"is_{name}_available", None)
        if check is not None and not check():
            return name
    raise SystemExit(f"every tracker of {UNINSTALLED_TRACKER_CANDIDATES} is installed; pass --report_to tensorboard")


# =========================================================================================== shared inputs
def write_model(folder: str, seed: int = 0) -> str:
    """The tiny random SDXL as a diffusers folder: unet, vae, text_encoder(_2), tokenizer(_2), scheduler."""
    from diffalign.testing import tiny_sdxl_pipeline

    tiny_sdxl_pipeline(seed).save_pretrained(folder)
    needed = ["model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
              "text_encoder_2/config.json", "scheduler/scheduler_config.json", "tokenizer/tokenizer_config.json",
              "tokenizer_2/tokenizer_config.json"]
    missing = [name for name in needed if not os.path.isfile(os.path.join(folder, name))]
    if missing:
        raise RuntimeError(f"save_pretrained left out {missing} in {folder}")
    return folder


def write_parquet(folder: str, rows: int, image_size: int, seed: int = 0) -> str:
    """A Pick-a-Pic-style parquet: caption, jpg_0 / jpg_1 (PNG bytes), label_0 (1.0: jpg_0 preferred, 0.0: jpg_1).

    The file is named train-00000-of-00001.parquet, so `datasets.load_dataset(folder)` (the script) and our
    parquet reader both see one "train" split."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(seed)
    colours = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
    things = ["cube", "sphere", "cat", "dog", "car", "tree", "house", "bird"]

    def png() -> bytes:
        base = rng.integers(0, 256, size=(1, 1, 3))
        ramp = np.linspace(0, 1, image_size)[None, :, None] * rng.integers(-128, 128, size=(1, 1, 3))
        noise = rng.normal(0, 24, size=(image_size, image_size, 3))
        pixels = np.clip(base + ramp + noise, 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        return buffer.getvalue()

    captions = [f"a photo of a {colours[i % 8]} {things[(i // 8) % 8]}, number {i}" for i in range(rows)]
    table = pa.table({
        "caption": pa.array(captions, pa.string()),
        "jpg_0": pa.array([png() for _ in range(rows)], pa.binary()),
        "jpg_1": pa.array([png() for _ in range(rows)], pa.binary()),
        "label_0": pa.array([float(v) for v in rng.integers(0, 2, size=rows)], pa.float64()),
    })
    os.makedirs(folder, exist_ok=True)
    pq.write_table(table, os.path.join(folder, "train-00000-of-00001.parquet"))
    return folder


def ours_config(model: str, data: str, hf_cache: str, resolution: int, report_to: str) -> dict:
    """The settings every `ours` arm shares (written to a YAML file; per-run keys go on the command line)."""
    return {
        "pretrained_model_name_or_path": model,
        "dataset": data,
        "dataset_split": "train",
        "hf_cache_dir": hf_cache,
        "resolution": resolution,
        "crop": "center",
        "random_flip": False,
        "objective": "dpo",
        "beta": 5000.0,
        "tuning": "lora",
        "lora_rank": 8,
        "lora_alpha": 8,
        "lora_target_modules": list(LORA_TARGETS),
        "train_batch_size": 2,  # groups of 2 = pairs
        "gradient_accumulation_steps": 1,
        "learning_rate": 1e-5,
        "lr_scheduler": "constant",
        "lr_warmup_steps": 0,
        "optimizer": "adamw",
        "adam_weight_decay": 1e-2,
        "max_grad_norm": 1.0,
        "mixed_precision": "no",
        "gradient_checkpointing": False,
        "seed": 0,
        "dataloader_num_workers": 0,
        "checkpointing_steps": 0,
        "validation_steps": 0,
        "report_to": "tensorboard" if report_to == "tensorboard" else "none",
        "overwrite_output_dir": True,
    }


# =========================================================================================== commands
def launcher(threads: int) -> list[str]:
    """`accelerate launch` with every default it would otherwise guess spelled out (one CPU process)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1", "--cpu",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", str(threads)]


def diffusers_command(ctx: dict, steps: int, out_dir: str) -> list[str]:
    return launcher(ctx["threads"]) + [
        ctx["script"]["path"],
        "--pretrained_model_name_or_path", ctx["model"],
        "--dataset_name", ctx["data"],
        "--dataset_split_name", "train",  # its default is "validation"; a local parquet folder has "train"
        "--cache_dir", ctx["hf_cache"],
        "--output_dir", out_dir,
        "--resolution", str(ctx["resolution"]),
        "--train_batch_size", "2",  # pairs
        "--gradient_accumulation_steps", "1",
        "--rank", "8",  # its LoraConfig: r=rank, lora_alpha=rank, targets to_k/to_q/to_v/to_out.0 (fixed)
        "--learning_rate", "1e-5",
        "--lr_scheduler", "constant",
        "--lr_warmup_steps", "0",
        "--adam_weight_decay", "1e-2",
        "--max_grad_norm", "1.0",
        "--mixed_precision", "no",
        "--beta_dpo", "5000",
        "--max_train_steps", str(steps),
        # `global_step % checkpointing_steps` runs every step: 0 would divide by zero, so a step never reached.
        "--checkpointing_steps", str(10**9),
        "--report_to", ctx["diffusers_report_to"],
        "--no_hflip",  # ours does not flip (random_flip=false)
        "--dataloader_num_workers", "0",
        "--seed", "0",
    ]


def ours_command(ctx: dict, arm: str, steps: int, out_dir: str) -> list[str]:
    extra = []
    if arm in ("ours_cache", "ours_cache_precompute"):
        extra.append(f"latent_cache={ctx['latent_cache']}")
    if arm == "ours_cache_precompute":
        extra.append("precompute_reference=true")
    return launcher(ctx["threads"]) + [
        os.path.join(REPO, "train", "train.py"), "--config", ctx["ours_config_path"],
        f"max_train_steps={steps}", f"output_dir={out_dir}", *extra,
    ]


def command_for(ctx: dict, arm: str, steps: int, out_dir: str) -> list[str]:
    return diffusers_command(ctx, steps, out_dir) if arm == "diffusers" else ours_command(ctx, arm, steps, out_dir)


def child_env(ctx: dict, arm: str) -> dict:
    """The same environment for every arm (threads, offline, HF_HOME in the work folder: no user accelerate
    config); the wandb stub is on PYTHONPATH of the diffusers script only."""
    env = dict(os.environ)
    threads = str(ctx["threads"])
    env.update({
        "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "OMP_WAIT_POLICY": "PASSIVE",
        "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": "",
        "HF_HOME": ctx["hf_home"], "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONHASHSEED": "0",
    })
    env.pop("ACCELERATE_CONFIG_FILE", None)
    env.pop("DIFFALIGN_KERNEL_BACKEND", None)
    old = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if arm == "diffusers":
        env["PYTHONPATH"] = os.pathsep.join([ctx["stub_dir"], *old])
    else:
        env["PYTHONPATH"] = os.pathsep.join([REPO, *old])
    return env


ENV_SHOWN = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "TOKENIZERS_PARALLELISM", "CUDA_VISIBLE_DEVICES",
             "HF_HOME", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "PYTHONPATH", "PYTHONHASHSEED")


# =========================================================================================== running
def run_process(cmd: list[str], env: dict, cwd: str, log_path: str, timeout: float) -> dict:
    """Run to completion; wall clock of the whole process, CPU-seconds of it and every descendant it waited for."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load = os.getloadavg()
    t0 = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher's group: it and the training process it started
            proc.wait()
            raise RuntimeError(f"timed out after {timeout:.0f} s: {shlex.join(cmd)} (log {log_path})") from None
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    user, system = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
    return {"rc": rc, "wall_s": wall, "cpu_s": user + system, "user_s": user, "sys_s": system,
            "loadavg_before": [round(x, 2) for x in load], "log": log_path}


def _tail(path: str, n: int = 40) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read().replace("\r", "\n")
    return "\n".join([line for line in text.splitlines() if line.strip()][-n:])


def check_run(ctx: dict, arm: str, steps: int, out_dir: str, record: dict) -> None:
    """The run did what it was asked: exit 0, exactly `steps` steps, the LoRA saved, and no tracker files."""
    if record["rc"] != 0:
        raise RuntimeError(f"{arm} ({steps} steps) exited with {record['rc']}; last lines of {record['log']}:\n"
                           f"{_tail(record['log'])}")
    with open(record["log"], encoding="utf-8", errors="replace") as f:
        log = f.read()
    if arm == "diffusers":
        if not os.path.isfile(os.path.join(out_dir, "pytorch_lora_weights.safetensors")):
            raise RuntimeError(f"diffusers run left no pytorch_lora_weights.safetensors in {out_dir}")
        if not re.search(rf"Steps: 100%\|[^\n\r]*\| {steps}/{steps} ", log):
            raise RuntimeError(f"diffusers run: no 'Steps: 100% ... {steps}/{steps}' in {record['log']}")
        losses = re.findall(r"(?<![\w])loss=([-+0-9.eE]+)", log)  # not raw_model_loss= / ref_loss=
        record["final_loss"] = float(losses[-1]) if losses else None
    else:
        with open(os.path.join(out_dir, "training_summary.json"), encoding="utf-8") as f:
            summary = json.load(f)
        if summary.get("status") != "finished" or summary.get("global_step") != steps:
            raise RuntimeError(f"{arm}: summary says status={summary.get('status')} global_step={summary.get('global_step')}")
        record["final_loss"] = summary.get("final_loss")
        record["median_step_time_s_in_process"] = summary.get("median_step_time_s")
    # The training loop's own rate as its progress bar last showed it (tqdm's smoothed estimate; informational).
    bar = re.findall(rf"{'Steps' if arm == 'diffusers' else 'train'}: 100%\|[^|\n\r]*\| ({steps}/{steps} \[[^\]\n\r]*\])", log)
    record["progress_bar_final"] = bar[-1] if bar else None
    if ctx["report_to"] == "off":
        events = [os.path.join(d, f) for d, _, files in os.walk(out_dir) for f in files if "tfevents" in f]
        if events:
            raise RuntimeError(f"{arm}: a tracker wrote {events[0]} although trackers are off")


def build_latent_cache(ctx: dict) -> dict:
    out = os.path.join(ctx["work"], "latent_cache")
    cmd = [sys.executable, "-m", "diffalign.cli", "cache", "--data", ctx["data"], "--out", out, "--model", ctx["model"],
           "--resolution", str(ctx["resolution"]), "--seed", "0", "--hf_cache_dir", ctx["hf_cache"]]
    record = run_process(cmd, child_env(ctx, "ours"), ctx["work"], os.path.join(ctx["logs"], "build_cache.log"), 1800)
    if record["rc"] != 0:
        raise RuntimeError(f"diffalign cache failed:\n{_tail(record['log'])}")
    ctx["latent_cache"] = out
    return {"command": shlex.join(cmd), **record}


def machine_info() -> dict:
    import accelerate
    import datasets
    import diffusers
    import peft
    import torch
    import transformers

    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": _cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "accelerate": accelerate.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "datasets": datasets.__version__,
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def _cpu_model() -> str | None:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return None


def prepare_inputs(args, work: str) -> dict:
    ctx = {"work": work, "threads": args.threads, "resolution": args.resolution, "report_to": args.report_to,
           "logs": os.path.join(work, "logs"), "hf_home": os.path.join(work, "hf_home"),
           "hf_cache": os.path.join(work, "hf_datasets_cache")}
    for key in ("logs", "hf_home", "hf_cache"):
        os.makedirs(ctx[key], exist_ok=True)
    ctx["model"] = write_model(os.path.join(work, "tiny_sdxl"), seed=0)
    ctx["data"] = write_parquet(os.path.join(work, "pickapic_style"), args.rows, args.image_size, seed=0)
    return ctx


def measure(args) -> dict:
    import yaml

    work = make_workdir(args.workdir)
    print(f"work folder: {work}", flush=True)
    result: dict = {"benchmark": "vs_diffusers", "issue": 17, "started": _now(), "machine": machine_info(),
                    "argv": sys.argv, "work_folder": work}
    arms = [a for a in args.arms.split(",") if a]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        raise SystemExit(f"unknown arm(s) {unknown}; choose from {ARMS}")
    ctx = prepare_inputs(args, work)
    ctx["script"] = locate_script(args.diffusers_repo, args.diffusers_rev, work)
    ctx["stub_dir"] = write_wandb_stub(os.path.join(work, "stubs"))
    ctx["diffusers_report_to"] = "tensorboard" if args.report_to == "tensorboard" else uninstalled_tracker()
    config = ours_config(ctx["model"], ctx["data"], ctx["hf_cache"], args.resolution, args.report_to)
    ctx["ours_config_path"] = os.path.join(work, "ours.yaml")
    with open(ctx["ours_config_path"], "w", encoding="utf-8") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    result["diffusers_script"] = ctx["script"]
    result["settings"] = {
        "n1": args.n1, "n2": args.n2, "repeats": args.repeats, "warmup_runs_per_arm": args.warmup, "threads": args.threads,
        "resolution": args.resolution, "rows": args.rows, "image_size": args.image_size, "pairs_per_step": 2,
        "lora_rank": 8, "lora_alpha": 8, "lora_targets": LORA_TARGETS, "learning_rate": 1e-5, "lr_scheduler": "constant",
        "beta": 5000, "mixed_precision": "no", "flip": False, "seed": 0, "report_to": args.report_to,
        "diffusers_report_to": ctx["diffusers_report_to"],
        "diffusers_report_to_why": None if args.report_to == "tensorboard" else (
            "the script hands --report_to to Accelerator(log_with=...), which refuses 'none' but skips a known tracker "
            "whose package is not installed; this one is not, so no tracker runs (checked: no tfevents written)"),
        "model": "diffalign.testing.tiny_sdxl_pipeline(0).save_pretrained(<work>/tiny_sdxl)",
        "data": f"{args.rows} rows, {args.image_size}x{args.image_size} PNG pairs, label_0 in {{0.0, 1.0}}, "
                "<work>/pickapic_style/train-00000-of-00001.parquet",
    }
    result["ours_config"] = config
    if any(a.startswith("ours_cache") for a in arms):
        print("building the latent cache (diffalign cache) ...", flush=True)
        result["latent_cache_build"] = build_latent_cache(ctx)
    result["commands"] = {arm: {str(n): shlex.join(command_for(ctx, arm, n, os.path.join(work, "runs", f"{arm}-n{n}-<tag>")))
                                for n in (args.n1, args.n2)} for arm in arms}
    result["env"] = {arm: {k: child_env(ctx, arm).get(k) for k in ENV_SHOWN} for arm in arms}
    runs: list[dict] = []
    warmups: list[dict] = []
    result["runs"], result["warmup_runs"] = runs, warmups

    def one(arm: str, steps: int, tag: str) -> dict:
        out_dir = os.path.join(work, "runs", f"{arm}-n{steps}-{tag}")
        shutil.rmtree(out_dir, ignore_errors=True)
        cmd = command_for(ctx, arm, steps, out_dir)
        record = {"arm": arm, "steps": steps, "tag": tag, "command": shlex.join(cmd),
                  **run_process(cmd, child_env(ctx, arm), work, os.path.join(ctx["logs"], f"{arm}-n{steps}-{tag}.log"),
                                args.timeout)}
        check_run(ctx, arm, steps, out_dir, record)
        if not args.keep_workdir:
            shutil.rmtree(out_dir, ignore_errors=True)
        print(f"  {tag:>7} {arm:<22} {steps:>3} steps: {record['wall_s']:7.2f} s wall, {record['cpu_s']:7.2f} CPU-s "
              f"(load {record['loadavg_before'][0]:.2f})", flush=True)
        _write(args.out_json, result)
        return record

    for w in range(args.warmup):  # untimed: dataset Arrow conversion, page cache, .pyc files
        for arm in arms:
            warmups.append(one(arm, args.n1, f"warm{w}"))
    for rep in range(args.repeats):
        order = (args.n1, args.n2) if rep % 2 == 0 else (args.n2, args.n1)
        for steps in order:
            for arm in arms:
                runs.append(one(arm, steps, f"r{rep}"))
    result["results"] = summarize(runs, arms, args.n1, args.n2, args.repeats)
    result["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result["finished"] = _now()
    if not args.keep_workdir:
        shutil.rmtree(work, ignore_errors=True)
        result["work_folder_removed"] = True
    return result


def summarize(runs: list[dict], arms: list[str], n1: int, n2: int, repeats: int) -> dict:
    med = statistics.median
    table: dict = {}
    for arm in arms:
        reps = []
        for rep in range(repeats):
            got = {r["steps"]: r for r in runs if r["arm"] == arm and r["tag"] == f"r{rep}"}
            a, b = got[n1], got[n2]
            wall = (b["wall_s"] - a["wall_s"]) / (n2 - n1)
            cpu = (b["cpu_s"] - a["cpu_s"]) / (n2 - n1)
            reps.append({"rep": rep, "wall_s_per_step": wall, "cpu_s_per_step": cpu,
                         "startup_wall_s": a["wall_s"] - n1 * wall, "startup_cpu_s": a["cpu_s"] - n1 * cpu})
        table[arm] = {"title": ARM_TITLES[arm], "per_rep": reps,
                      "wall_s_per_step": med([r["wall_s_per_step"] for r in reps]),
                      "cpu_s_per_step": med([r["cpu_s_per_step"] for r in reps]),
                      "startup_wall_s": med([r["startup_wall_s"] for r in reps]),
                      "startup_cpu_s": med([r["startup_cpu_s"] for r in reps])}
    if "diffusers" in table:
        base = table["diffusers"]
        for arm in arms:
            row = table[arm]
            row["ratio_cpu_vs_diffusers"] = row["cpu_s_per_step"] / base["cpu_s_per_step"]
            row["ratio_wall_vs_diffusers"] = row["wall_s_per_step"] / base["wall_s_per_step"]
            row["ratio_cpu_vs_diffusers_per_rep"] = [
                r["cpu_s_per_step"] / d["cpu_s_per_step"] for r, d in zip(row["per_rep"], base["per_rep"])]
    return table


def print_table(result: dict) -> None:
    res = result["results"]
    s = result["settings"]
    print()
    print(f"per-step cost = (t[{s['n2']} steps] - t[{s['n1']} steps]) / {s['n2'] - s['n1']}, median of {s['repeats']} "
          f"alternating repetitions; {s['threads']} thread(s); diffusers commit {str(result['diffusers_script'].get('commit'))[:12]}")
    print()
    print("| arm | s/step (wall) | CPU-s/step | ratio CPU-s vs diffusers | ratio wall vs diffusers | start-up (wall s) |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in res.values():
        ratio_c = f"{row['ratio_cpu_vs_diffusers']:.3f}" if "ratio_cpu_vs_diffusers" in row else "-"
        ratio_w = f"{row['ratio_wall_vs_diffusers']:.3f}" if "ratio_wall_vs_diffusers" in row else "-"
        print(f"| {row['title']} | {row['wall_s_per_step']:.3f} | {row['cpu_s_per_step']:.3f} | {ratio_c} | {ratio_w} "
              f"| {row['startup_wall_s']:.1f} |")
    loads = [r["loadavg_before"][0] for r in result["runs"]]
    if loads:
        print(f"\n1-min load average before the timed runs: {min(loads):.2f} .. {max(loads):.2f} "
              f"(cpu_count {result['machine']['cpu_count']}); figures from a busy machine are not the real measurement")


# =========================================================================================== profile (in-process)
class _Instrument:
    """Wraps methods in torch.profiler.record_function ranges named "bench/<label>"; `restore()` undoes it."""

    def __init__(self):
        self._undo: list = []

    def wrap(self, owner, name: str, label, before=None):
        from torch.profiler import record_function

        original = getattr(owner, name)
        had_own = name in vars(owner)
        own_value = vars(owner)[name] if had_own else None
        labeller = label if callable(label) else (lambda: label)

        @functools.wraps(original)
        def wrapper(*a, **k):
            if before is not None:
                before()
            with record_function("bench/" + labeller()):
                return original(*a, **k)

        setattr(owner, name, wrapper)
        self._undo.append((owner, name, had_own, own_value))
        return original

    def restore(self):
        for owner, name, had_own, value in reversed(self._undo):
            if had_own:
                setattr(owner, name, value)
            else:
                delattr(owner, name)
        self._undo.clear()


def _instrument(trainer, holder: dict, timers: dict) -> _Instrument:
    import torch
    import tqdm.auto

    import diffalign.families
    import diffalign.kernels
    import diffalign.objectives
    from diffalign.training import trainer as trainer_module

    ins = _Instrument()
    adapter, acc = trainer.adapter, trainer.accelerator

    def step_boundary():
        holder["prof"].step()  # ProfilerStep#n = one loop iteration: optimizer step, its logging, the next batch

    ins.wrap(trainer, "optimizer_step", "optimizer_step (glue)", before=step_boundary)
    unet = trainer.unwrapped
    toggle = "LoRA adapters off/on (peft toggle for the reference)"
    contexts = "hooks: reference/policy context construction"
    steps = "zero_grad + lr_scheduler.step"
    labels = [
        (trainer, "compute_loss", "compute_loss (glue: isfinite checks, .item())"),
        (trainer, "prepare_inputs", "prepare_inputs (glue: casts, dict building)"),
        (trainer, "reference_errors", "reference_errors (glue)"),
        (trainer, "_generators", "per-group torch.Generator seeding (SeedSequence)"),
        (trainer, "_reference_context", contexts), (trainer, "_policy_context", contexts),
        (unet, "disable_adapters", toggle), (unet, "enable_adapters", toggle),
        (adapter, "encode_image_groups", "VAE encode"), (adapter, "encode_prompts", "text encoders"),
        (adapter, "predict",
         lambda: "denoiser forward (policy)" if torch.is_grad_enabled() else "denoiser forward (reference, no grad)"),
        (adapter, "group_noise_and_timesteps", "noise + timestep draws"),
        (adapter, "micro_conditioning", "micro-conditioning time_ids"),
        (adapter, "training_inputs", "x_t and target (training_inputs)"),
        (acc, "backward", "denoiser backward (accelerator.backward)"),
        (acc, "reduce", "accelerator.reduce (loss / metrics / non-finite flag)"),
        (acc, "clip_grad_norm_", "clip_grad_norm_"),
        (trainer.optimizer, "step", "optimizer.step (AdamW)"),
        (trainer.optimizer, "zero_grad", steps), (trainer.lr_scheduler, "step", steps),
        (diffalign.kernels, "per_sample_error", "per_sample_error (error kernel dispatch)"),
        (diffalign.objectives, "compute", "objective + metrics (objectives.compute)"),
        (diffalign.families, "repeat_groups", "repeat text embeddings per group"),
    ]
    for owner, name, label in labels:
        ins.wrap(owner, name, label)
    ins.wrap(trainer_module, "collate_keyed", "data: collate")
    ins.wrap(trainer_module.KeyedDataset, "__getitem__", "data: read + decode + transform (dataset __getitem__)")
    ins.wrap(tqdm.auto.tqdm, "update", "progress bar (tqdm)")
    ins.wrap(tqdm.auto.tqdm, "set_postfix", "progress bar (tqdm)")

    original_pre = trainer.precompute_reference

    def timed_precompute(*a, **k):
        t0 = time.perf_counter()
        try:
            return original_pre(*a, **k)
        finally:
            timers["precompute_reference_s"] = time.perf_counter() - t0

    trainer.precompute_reference = timed_precompute
    ins._undo.append((trainer, "precompute_reference", False, None))
    return ins


CORE = ("denoiser forward (policy)", "denoiser forward (reference, no grad)", "denoiser backward (accelerator.backward)")
ENCODERS = ("VAE encode", "text encoders")
LOOP_REST = "loop remainder (losses.jsonl write, ref_errors lookup, step bookkeeping)"
DATALOADER = "data: DataLoader.__next__ (exclusive: sampler, fetch glue)"


def breakdown(prof) -> dict:
    """Exclusive wall time (main thread) of every labelled range, averaged over the profiled steps, and the
    number of top-level aten ops (dispatches) inside each."""

    def label_of(event) -> str | None:
        if event.name.startswith("bench/"):
            return event.name[len("bench/"):]
        if event.name.startswith("enumerate(DataLoader)"):
            return DATALOADER
        return None

    exclusive: dict[str, float] = defaultdict(float)
    ops: dict[str, int] = defaultdict(int)

    def walk(node, owner: str, in_op: bool):
        for child in node.cpu_children:
            label = label_of(child)
            if label is not None:
                duration = child.time_range.elapsed_us()
                exclusive[owner] -= duration
                exclusive[label] += duration
                walk(child, label, in_op)
                continue
            is_op = child.name.startswith("aten::")
            if is_op and not in_op:
                ops[owner] += 1
            walk(child, owner, in_op or is_op)

    steps = [e for e in prof.events() if e.name.startswith("ProfilerStep")]
    if not steps:
        raise RuntimeError("the profiler recorded no ProfilerStep ranges")
    for step in steps:
        exclusive[LOOP_REST] += step.time_range.elapsed_us()
        walk(step, LOOP_REST, False)
    n = len(steps)
    total = sum(s.time_range.elapsed_us() for s in steps) / n
    rows = [{"where": k, "ms_per_step": v / n / 1e3, "share": v / n / total, "aten_ops_per_step": ops.get(k, 0) / n}
            for k, v in exclusive.items()]
    rows.sort(key=lambda r: -r["ms_per_step"])
    core = sum(r["ms_per_step"] for r in rows if r["where"] in CORE)
    enc = sum(r["ms_per_step"] for r in rows if r["where"] in ENCODERS)
    return {"profiled_steps": n, "step_ms": total / 1e3, "rows": rows,
            "denoiser_fwd_bwd_ms": core, "encoders_ms": enc, "rest_ms": total / 1e3 - core - enc,
            "aten_ops_per_step": sum(ops.values()) / n}


def top_ops(prof, steps: int, top: int) -> list[dict]:
    events = [e for e in prof.key_averages()
              if not e.key.startswith(("ProfilerStep", "bench/", "enumerate(DataLoader)"))]
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    events.sort(key=lambda e: -e.self_cpu_time_total)
    return [{"op": e.key[:100], "self_ms_per_step": e.self_cpu_time_total / steps / 1e3,
             "calls_per_step": e.count / steps, "share_of_op_self_time": e.self_cpu_time_total / total}
            for e in events[:top]]


def profile_one(setting: str, overrides: dict, base: dict, work: str, args) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, schedule
    from torch.profiler import profile as torch_profile

    from diffalign.training import PreferenceTrainer, TrainConfig

    warm, active = args.profile_warmup, args.profile_steps
    out_dir = os.path.join(work, "profile_runs", setting.replace(" ", "_").replace("+", "plus"))
    cfg = TrainConfig.from_dict({**base, **overrides, "max_train_steps": warm + active + 1, "output_dir": out_dir})
    trainer = PreferenceTrainer(cfg)
    holder: dict = {}
    timers: dict = {}
    ins = _instrument(trainer, holder, timers)
    # Step 0 of the profiler is set-up up to the first optimizer step; 1..warm are warm-up iterations.
    sched = schedule(wait=warm, warmup=1, active=active, repeat=1)
    try:
        with torch_profile(activities=[ProfilerActivity.CPU], schedule=sched, record_shapes=False) as prof:
            holder["prof"] = prof
            summary = trainer.train()
    finally:
        ins.restore()
    with open(os.path.join(out_dir, "losses.jsonl"), encoding="utf-8") as f:
        step_times = [json.loads(line)["step_time_s"] for line in f if line.strip()]
    # Iteration i (step i + 1 in losses.jsonl) is profiled for warm <= i < warm + active. Unprofiled: 1 .. warm - 2
    # (iteration 0 warms up, warm - 1 is the profiler's warm-up, the last one stops the trace inside its step).
    profiled = step_times[warm:warm + active]
    unprofiled = step_times[1:max(1, warm - 1)]
    result = breakdown(prof)
    result.update(
        setting=setting, overrides=overrides, threads=torch.get_num_threads(),
        top_ops=top_ops(prof, result["profiled_steps"], args.top),
        step_time_s_profiled_median=statistics.median(profiled) if profiled else None,
        step_time_s_unprofiled_median=statistics.median(unprofiled) if unprofiled else None,
        final_loss=summary.get("final_loss"),
    )
    if "precompute_reference_s" in timers:
        result["precompute_reference_s"] = timers["precompute_reference_s"]
        result["precompute_reference_ms_per_training_step"] = timers["precompute_reference_s"] / cfg.max_train_steps * 1e3
    return result


def print_profile(p: dict) -> None:
    print(f"\n### {p['setting']}: {p['step_ms']:.1f} ms per loop iteration under the profiler ({p['profiled_steps']} steps, "
          f"{p['threads']} thread(s)); trainer step_time_s median: profiled {_ms(p['step_time_s_profiled_median'])}, "
          f"unprofiled {_ms(p['step_time_s_unprofiled_median'])}")
    print(f"denoiser forwards + backward {p['denoiser_fwd_bwd_ms']:.1f} ms ({p['denoiser_fwd_bwd_ms'] / p['step_ms']:.1%}), "
          f"VAE + text encoders {p['encoders_ms']:.1f} ms ({p['encoders_ms'] / p['step_ms']:.1%}), everything else "
          f"{p['rest_ms']:.1f} ms ({p['rest_ms'] / p['step_ms']:.1%}); {p['aten_ops_per_step']:.0f} top-level aten ops per step")
    if "precompute_reference_s" in p:
        print(f"reference pre-pass (before training, not in the table): {p['precompute_reference_s']:.2f} s = "
              f"{p['precompute_reference_ms_per_training_step']:.1f} ms per training step")
    print("\n| where (exclusive time) | ms/step | % of step | aten ops/step |")
    print("|---|---:|---:|---:|")
    for r in p["rows"]:
        print(f"| {r['where']} | {r['ms_per_step']:.2f} | {r['share']:.1%} | {r['aten_ops_per_step']:.0f} |")
    print("\ntop ops by self CPU time (all labelled ranges together):\n")
    print("| op | self ms/step | calls/step | % of op self time |")
    print("|---|---:|---:|---:|")
    for r in p["top_ops"]:
        print(f"| {r['op']} | {r['self_ms_per_step']:.2f} | {r['calls_per_step']:.0f} | {r['share_of_op_self_time']:.1%} |")


def _ms(seconds) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f} ms"


def profile_mode(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    work = make_workdir(args.workdir)
    print(f"work folder: {work}", flush=True)
    ctx = prepare_inputs(args, work)
    os.environ.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    build = build_latent_cache(ctx)
    base = ours_config(ctx["model"], ctx["data"], ctx["hf_cache"], args.resolution, "off")
    base["progress_bar"] = True  # as in the timed runs: its cost is part of the loop
    settings = [("no cache", {}), ("cache", {"latent_cache": ctx["latent_cache"]}),
                ("cache + precomputed reference", {"latent_cache": ctx["latent_cache"], "precompute_reference": True})]
    result = {"benchmark": "vs_diffusers --profile", "issue": 17, "started": _now(), "machine": machine_info(),
              "argv": sys.argv, "config": base, "latent_cache_build": build,
              "method": ("torch.profiler (CPU) around PreferenceTrainer.train(); trainer, adapter, accelerator, optimizer, "
                         "data and tqdm methods wrapped in record_function ranges from outside (no diffalign file changed); "
                         "one ProfilerStep = one loop iteration (optimizer step, its logging, the next batch's loading); "
                         "times are exclusive wall time on the main thread, averaged over the profiled steps; the "
                         "profiler's per-op overhead inflates op-heavy small regions"),
              "profiles": []}
    for setting, overrides in settings:
        print(f"profiling: {setting} ...", flush=True)
        p = profile_one(setting, overrides, base, work, args)
        result["profiles"].append(p)
        _write(args.out_json, result)
    for p in result["profiles"]:
        print_profile(p)
    result["finished"] = _now()
    if not args.keep_workdir:
        shutil.rmtree(work, ignore_errors=True)
    return result


# =========================================================================================== main
def make_workdir(requested: str | None) -> str:
    work = os.path.abspath(requested) if requested else tempfile.mkdtemp(prefix="diffalign-vs-diffusers-")
    if _inside(work, REPO):
        raise SystemExit(f"--workdir {work} is inside this repository; the inputs and the diffusers script stay outside it")
    os.makedirs(work, exist_ok=True)
    return work


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _write(path: str, result: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2, default=str)
    os.replace(tmp, path)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--diffusers_repo", default=None, help="diffusers checkout or bare git dir (needed unless --profile)")
    p.add_argument("--diffusers_rev", default=None,
                   help="commit/branch to extract with git show (default: a checkout's file as it is, a bare dir's HEAD)")
    p.add_argument("--out", default=os.path.join("benchmarks", "results"), help="a .json path, or a folder")
    p.add_argument("--n1", type=int, default=6, help="steps of the short run")
    p.add_argument("--n2", type=int, default=36, help="steps of the long run")
    p.add_argument("--repeats", type=int, default=3, help="alternating repetitions (medians are reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed n1-step runs of every arm before timing")
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of every run")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {','.join(ARMS)}")
    p.add_argument("--rows", type=int, default=64, help="rows of the parquet")
    p.add_argument("--image_size", type=int, default=64, help="side of the stored PNGs (resized to --resolution)")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--report_to", default="off", choices=["off", "tensorboard"],
                   help="off: no tracker in either program; tensorboard: both log to tensorboard")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds one training process may take")
    p.add_argument("--workdir", default=None, help="work folder (default: a new temporary one); must be outside this repo")
    p.add_argument("--keep_workdir", action="store_true", help="keep the work folder (inputs, logs, run outputs)")
    p.add_argument("--profile", action="store_true",
                   help="instead: torch.profiler breakdown of our training step, in-process, without and with the cache")
    p.add_argument("--profile_warmup", type=int, default=4, help="--profile: iterations before the profiled ones (>= 3)")
    p.add_argument("--profile_steps", type=int, default=5, help="--profile: profiled iterations (averaged)")
    p.add_argument("--top", type=int, default=15, help="--profile: top ops listed")
    args = p.parse_args(argv)
    if args.n2 <= args.n1 or args.n1 < 1:
        p.error("need 1 <= n1 < n2")
    name = "vs_diffusers_profile.json" if args.profile else "vs_diffusers.json"
    args.out_json = os.path.abspath(args.out if args.out.endswith(".json") else os.path.join(args.out, name))
    os.makedirs(os.path.dirname(args.out_json), exist_ok=True)
    if args.profile:
        result = profile_mode(args)
        _write(args.out_json, result)
        print(f"\nwrote {args.out_json}")
        return
    if not args.diffusers_repo:
        p.error("--diffusers_repo is required (a diffusers checkout or bare git dir)")
    try:
        result = measure(args)
    except BaseException:
        print("failed; the work folder is kept for its logs (see above)", file=sys.stderr)
        raise
    _write(args.out_json, result)
    print_table(result)
    print(f"\nwrote {args.out_json}")


if __name__ == "__main__":
    main()
