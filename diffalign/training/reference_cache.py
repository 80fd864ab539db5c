"""Precomputed reference errors (`precompute_reference`), and their cache on disk (`reference_errors_path`).

The frozen reference's per-sample errors depend only on (seed, epoch, group index) and the set-up, so one pass
before training gives every step's errors, and a sweep over beta / lr / objective reuses them. The files hold one
dense (groups, k) float32 tensor per epoch per process (NaN = not computed), beside a fingerprint of everything
the errors depend on; another set-up is refused, naming what differs.
"""

from __future__ import annotations

import glob
import json
import os

import torch

from diffalign.training.sampling import GroupBatchSampler, KeyedDataset, collate_keyed


def precompute_reference(trainer, start_step: int = 0) -> dict:
    """Reference errors for every (epoch, group) this process will visit from `start_step` to the end.

    With `reference_errors_path`, errors saved by earlier runs with the same fingerprint are reused
    (a beta / lr / objective sweep pays for the reference once) and new ones are added to the files.
    """
    from tqdm.auto import tqdm

    cfg, acc = trainer.config, trainer.accelerator
    if trainer.conditioning is not None:
        raise ValueError("precompute_reference cannot be combined with a conditioning hook (PPD); turn it off")
    accum = cfg.gradient_accumulation_steps
    total = (cfg.max_train_steps - start_step) * accum
    sampler = GroupBatchSampler(len(trainer.dataset), cfg.train_batch_size, acc.num_processes, acc.process_index, cfg.seed,
                                start=start_step * accum)
    keyed = KeyedDataset(trainer.dataset)
    # One dense (n, k) float32 tensor per epoch touched (NaN = not computed): small even for millions of groups.
    table: dict[int, torch.Tensor] = load_errors(trainer) if cfg.reference_errors_path else {}
    todo, seen = [], set()  # the groups still to compute, in visiting order
    keys_iter = iter(sampler)
    for _ in range(total):
        for epoch, index in next(keys_iter):
            if (epoch, index) not in seen and not (epoch in table and not torch.isnan(table[epoch][index]).any()):
                seen.add((epoch, index))
                todo.append((epoch, index))
    # Every draw of a group is seeded by its key, so the errors do not depend on which groups share a forward:
    # without gradients the pre-pass batches more groups than a training step holds.
    chunk = cfg.precompute_reference_batch_size or 4 * cfg.train_batch_size
    trainer.reference_passes, trainer.reference_groups = 0, len(todo)
    starts = range(0, len(todo), chunk)
    for start in tqdm(starts, desc="reference", disable=not (acc.is_local_main_process and cfg.progress_bar)):
        batch = collate_keyed([keyed[key] for key in todo[start : start + chunk]])
        errors = trainer.reference_errors(batch).float().cpu()
        trainer.reference_passes += 1
        for (epoch, index), row in zip(batch["group_keys"], errors):
            if epoch not in table:
                table[epoch] = torch.full((len(trainer.dataset), errors.shape[1]), float("nan"))
            table[epoch][index] = row
    if cfg.reference_errors_path:
        save_errors(trainer, table)
    return table


def fingerprint(trainer) -> dict:
    """Everything the reference errors depend on: model, noising options, data, seed, precision."""
    cfg = trainer.config
    keys = ["pretrained_model_name_or_path", "revision", "variant", "model_seed", "family", "pretrained_vae_model_name_or_path",
            "prediction_type", "timestep_sampling", "logit_mean", "logit_std", "mode_scale", "loss_weighting",
            "max_sequence_length", "dataset", "dataset_schema", "dataset_split", "latent_cache", "resolution", "crop",
            "random_flip", "keep_ties", "max_k", "skip_bad_rows", "max_train_samples", "prompt_dropout", "seed",
            "mixed_precision", "tuning", "attention_backend", "init_lora", "init_lora_merge"]
    ref = trainer.reference if trainer.reference is not None else trainer.unwrapped
    checksum = []
    for name, param in list(ref.named_parameters())[:4]:  # base weights (LoRA adds its own after these)
        values = param.detach().double()
        checksum.append([name, round(float(values.sum()), 6), round(float(values.square().sum()), 6)])
    data = getattr(trainer.dataset, "fingerprint", None)
    data = data() if callable(data) else None
    if data is None and not cfg.dataset and not cfg.latent_cache:
        raise ValueError("reference_errors_path needs a config-described data set (dataset= or latent_cache=) or one with fingerprint()")
    return {"version": 1, "config": {k: getattr(cfg, k) for k in keys}, "num_groups": len(trainer.dataset),
            "reference_weights": checksum, "data": data}


def _files(path: str) -> list[str]:
    return sorted(glob.glob(os.path.join(path, "reference_errors.rank*.safetensors")))


def load_errors(trainer) -> dict[int, torch.Tensor]:
    from safetensors.torch import load_file

    path = trainer.config.reference_errors_path
    meta_path = os.path.join(path, "fingerprint.json")
    table: dict[int, torch.Tensor] = {}
    if not os.path.isfile(meta_path):
        return table
    with open(meta_path, encoding="utf-8") as f:
        saved = json.load(f)
    wanted = json.loads(json.dumps(fingerprint(trainer), default=str))
    if saved != wanted:
        diff = sorted({k for k in set(saved["config"]) | set(wanted["config"]) if saved["config"].get(k) != wanted["config"].get(k)})
        other = [k for k in ("num_groups", "reference_weights", "data") if saved.get(k) != wanted.get(k)]
        raise ValueError(
            f"reference errors in {path} were computed for another setup (differs in {diff + other}); "
            "use a new reference_errors_path or remove the folder"
        )
    for file in _files(path):  # every process's file: keys are global (epoch, group)
        for name, tensor in load_file(file).items():
            epoch = int(name.split("_", 1)[1])
            if epoch not in table:
                table[epoch] = tensor.clone()
            else:
                fill = torch.isnan(table[epoch])
                table[epoch][fill] = tensor[fill]
    return table


def save_errors(trainer, table: dict[int, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    acc, path = trainer.accelerator, trainer.config.reference_errors_path
    os.makedirs(path, exist_ok=True)
    out = os.path.join(path, f"reference_errors.rank{acc.process_index}.safetensors")
    save_file({f"epoch_{e}": t.contiguous() for e, t in table.items()}, out + ".tmp")
    os.replace(out + ".tmp", out)
    if acc.is_main_process:
        with open(os.path.join(path, "fingerprint.json.tmp"), "w", encoding="utf-8") as f:
            json.dump(fingerprint(trainer), f, indent=2, default=str)
        os.replace(os.path.join(path, "fingerprint.json.tmp"), os.path.join(path, "fingerprint.json"))
    acc.wait_for_everyone()
