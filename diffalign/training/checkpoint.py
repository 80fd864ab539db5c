"""Save and resume of a training run, with atomic checkpoints: everything is written into a hidden temporary
folder, then renamed into place.

A checkpoint counts only once `checkpoint-<step>/trainer_state.json` exists, and that folder
appears in one `os.rename`, so a kill during a save leaves at worst a `.tmp-checkpoint-*`
folder that `latest_checkpoint` ignores (and the next save removes). `check_output_dir`, `resume` and
`save_checkpoint` act on a `PreferenceTrainer`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil

logger = logging.getLogger("diffalign.training")

STATE_FILE = "trainer_state.json"
SUMMARY_FILE = "training_summary.json"
LOSSES_FILE = "losses.jsonl"
# Not accelerate's register_for_checkpointing: it unpickles custom objects with weights_only=False on resume.
EMA_STATE_FILE = "ema_state.safetensors"
LORA_STATE_FILE = "lora_state.safetensors"
_CKPT = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_dirs(output_dir: str) -> list[str]:
    """Complete checkpoints under `output_dir`, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        m = _CKPT.match(name)
        if m and os.path.isfile(os.path.join(output_dir, name, STATE_FILE)):
            found.append((int(m.group(1)), os.path.join(output_dir, name)))
    return [path for _, path in sorted(found)]


def latest_checkpoint(output_dir: str) -> str | None:
    dirs = checkpoint_dirs(output_dir)
    return dirs[-1] if dirs else None


def resolve_resume(resume: str | None, output_dir: str) -> str | None:
    """`latest` -> newest complete checkpoint (None when there is none yet); a path must be complete."""
    if resume is None:
        return None
    if resume == "latest":
        return latest_checkpoint(output_dir)
    if not os.path.isfile(os.path.join(resume, STATE_FILE)):
        raise FileNotFoundError(
            f"{resume} is not a complete checkpoint (no {STATE_FILE}); pass a checkpoint-<step> folder or 'latest'"
        )
    return resume


def read_state(checkpoint: str) -> dict:
    with open(os.path.join(checkpoint, STATE_FILE), encoding="utf-8") as f:
        return json.load(f)


def temporary_dir(output_dir: str, step: int) -> str:
    return os.path.join(output_dir, f".tmp-checkpoint-{step}")


def clean_temporary(output_dir: str) -> None:
    """Remove leftovers of interrupted saves."""
    if os.path.isdir(output_dir):
        for name in os.listdir(output_dir):
            if name.startswith(".tmp-checkpoint-") or name.startswith(".old-checkpoint-"):
                shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


def finalize(tmp: str, output_dir: str, step: int, state: dict) -> str:
    """Write the marker file last, then move the folder into place in one rename."""
    with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as f:
        json.dump(state, f, indent=2)
    final = os.path.join(output_dir, f"checkpoint-{step}")
    if os.path.exists(final):  # a rerun of the same step after a resume: swap, never leave a gap
        old = os.path.join(output_dir, f".old-checkpoint-{step}")
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    return final


def prune(output_dir: str, keep: int | None) -> None:
    if keep is None or keep < 1:
        return
    for path in checkpoint_dirs(output_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


# Keys a resumed run may change: how long, how often and where it logs or saves, not what it computes.
RESUME_MAY_CHANGE = frozenset({
    "max_train_steps", "resume_from_checkpoint", "overwrite_output_dir", "output_dir", "checkpointing_steps",
    "checkpoints_total_limit", "report_to", "tracker_project_name", "log_every", "progress_bar", "validation_steps",
    "validation_prompts", "validation_num_inference_steps", "validation_guidance_scale", "validation_resolution",
    "dataloader_num_workers", "hf_cache_dir", "precompute_reference", "reference_errors_path", "latent_cache",
    "torch_compile", "attention_backend", "allow_tf32", "gradient_checkpointing",
})


def changed_config(saved: dict, current: dict) -> list[str]:
    """`key: saved -> current` for every key that differs and may not change on resume."""
    current = json.loads(json.dumps(current))  # tuples -> lists, as the checkpoint stored them
    return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in sorted(set(saved) | set(current))
            if k not in RESUME_MAY_CHANGE and k in saved and saved.get(k) != current.get(k)]


def earlier_run_files(output_dir: str, log_files: tuple[str, ...]) -> list[str]:
    """Names in `output_dir` that an earlier run left: non-empty logs and checkpoints (complete or not)."""
    if not os.path.isdir(output_dir):
        return []
    found = [n for n in log_files if os.path.isfile(os.path.join(output_dir, n)) and os.path.getsize(os.path.join(output_dir, n))]
    found += sorted(n for n in os.listdir(output_dir) if _CKPT.match(n) or n.startswith((".tmp-checkpoint-", ".old-checkpoint-")))
    return found


def remove_earlier_run(output_dir: str, names: list[str]) -> None:
    for name in names:
        path = os.path.join(output_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.remove(path)


def truncate_log(path: str, last_step: int) -> int:
    """Keep the JSONL records of steps <= `last_step` (and drop a cut last line); returns how many were dropped.

    A run killed after its last checkpoint logged steps it will now redo; without this they would appear twice."""
    if not os.path.isfile(path):
        return 0
    kept, dropped = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                dropped += 1
                continue
            if int(record.get("step", 0)) <= last_step:
                kept.append(json.dumps(record) + "\n")
            else:
                dropped += 1
    if dropped:
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(tmp, path)
    return dropped


# ------------------------------------------------------------------------------------------------
# A trainer's run
# ------------------------------------------------------------------------------------------------


class _RandomStateWatch(logging.Filter):
    """Catches accelerate's "Could not load random states", which it logs at INFO and otherwise ignores.

    Lowers the logger's level for the duration and filters out again what its old level would have hidden."""

    def __init__(self):
        super().__init__()
        self.failed = False
        self._logger = logging.getLogger("accelerate.checkpointing")

    def filter(self, record):
        if "Could not load random states" in record.getMessage():
            self.failed = True
        return record.levelno >= self._shown

    def __enter__(self):
        self._level, self._shown = self._logger.level, self._logger.getEffectiveLevel()
        self._logger.setLevel(logging.INFO)
        self._logger.addFilter(self)
        return self

    def __exit__(self, *exc):
        self._logger.removeFilter(self)
        self._logger.setLevel(self._level)
        return False


def check_output_dir(trainer) -> None:
    """Before any work: a fresh run must not mix into an earlier one; a resume must not change what it computes."""
    cfg = trainer.config
    path = resolve_resume(cfg.resume_from_checkpoint, cfg.output_dir)
    if path is not None:
        changed = changed_config(read_state(path).get("config", {}), cfg.to_dict())
        if changed:
            raise ValueError(
                f"resuming {path} with a different config: {'; '.join(changed)}. Restore those values, "
                "or start a new output_dir"
            )
        return
    if cfg.resume_from_checkpoint is not None:
        return  # "latest" before the first checkpoint: the same run starting over (its log is truncated)
    earlier = earlier_run_files(cfg.output_dir, (LOSSES_FILE, SUMMARY_FILE))
    if earlier and not cfg.overwrite_output_dir:
        shown = ", ".join(earlier[:4]) + (f" and {len(earlier) - 4} more" if len(earlier) > 4 else "")
        raise FileExistsError(
            f"output_dir {cfg.output_dir} holds an earlier run ({shown}). Continue it with "
            "resume_from_checkpoint=latest, replace it with overwrite_output_dir=true, or pick another output_dir"
        )
    if earlier and int(os.environ.get("RANK", "0")) == 0:  # the global first process deletes, once
        remove_earlier_run(cfg.output_dir, earlier)

def resume(trainer) -> int:
    cfg, acc = trainer.config, trainer.accelerator
    path = resolve_resume(cfg.resume_from_checkpoint, cfg.output_dir)
    if path is None:
        if cfg.resume_from_checkpoint == "latest":
            acc.print(f"resume_from_checkpoint=latest: no checkpoint in {cfg.output_dir} yet, starting from step 0")
        return 0
    with _RandomStateWatch() as watch:
        acc.load_state(path)
    if watch.failed:
        name = f"random_states_{acc.process_index}.pkl"
        message = (f"{path}/{name} is missing or unreadable: this process resumes with fresh Python/NumPy/torch "
                   "random states (noise and timesteps are seeded per step and stay exact)")
        logger.warning(message)
        acc.print(f"warning: {message}")
    if trainer.conditioning is not None:
        trainer.conditioning.load(path)  # user attention + encoder head (PPD)
    state = read_state(path)
    if trainer.ema is not None:
        from safetensors.torch import load_file

        ema = load_file(os.path.join(path, EMA_STATE_FILE))
        for i, p in enumerate(trainer.ema.shadow_params):
            p.data.copy_(ema[f"shadow.{i}"].to(p.device))
        trainer.ema.optimization_step = int(state.get("ema_optimization_step", 0))
    acc.print(f"resumed from {path} at step {state['global_step']}")
    return int(state["global_step"])


def save_checkpoint(trainer, step: int, last_loss: float | None = None) -> str | None:
    cfg, acc = trainer.config, trainer.accelerator
    tmp = temporary_dir(cfg.output_dir, step)
    if acc.is_main_process:
        clean_temporary(cfg.output_dir)
    acc.wait_for_everyone()
    acc.save_state(tmp)
    final = None
    if acc.is_main_process:
        if trainer.conditioning is not None:
            trainer.conditioning.save(tmp)
        state = {"global_step": step, "last_loss": last_loss, "config": cfg.to_dict(), "num_processes": acc.num_processes}
        if trainer.ema is not None:
            from safetensors.torch import save_file

            save_file({f"shadow.{i}": p.detach().contiguous().cpu() for i, p in enumerate(trainer.ema.shadow_params)},
                      os.path.join(tmp, EMA_STATE_FILE))
            state["ema_optimization_step"] = int(trainer.ema.optimization_step)
        final = finalize(tmp, cfg.output_dir, step, state)
        prune(cfg.output_dir, cfg.checkpoints_total_limit)
    acc.wait_for_everyone()
    return final
