"""`PreferenceTrainer`: the accelerate loop shared by DPO, RankDPO, SFT (and, through a hook, PPD).

One training step, for B groups of k samples:
  latents (cached, or VAE-encoded) -> group-shared noise and t -> x_t, target, weight (family)
  -> reference prediction (no grad: LoRA adapters off, or the frozen copy) and policy prediction
  -> per-sample errors (float32, `diffalign.kernels.per_sample_error`) -> objective (B, k) -> loss.

Determinism: every random draw of a micro-step (VAE sample, noise, timestep, prompt dropout) comes
from a generator seeded by (seed, micro-step, process), and the data order is a pure function of
(seed, epoch). A resumed run therefore replays the same loss sequence as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import time

import numpy as np
import torch

from diffalign.objectives import REGISTRY as OBJECTIVE_REGISTRY
from diffalign.training import checkpoint as ckpt
from diffalign.training.checkpoint import EMA_STATE_FILE, LORA_STATE_FILE, LOSSES_FILE, SUMMARY_FILE  # noqa: F401 (API)
from diffalign.training.config import TrainConfig
from diffalign.training.hooks import ConditioningHook
from diffalign.training.sampling import GroupBatchSampler, KeyedDataset, collate_keyed, group_seed

logger = logging.getLogger("diffalign.training")

PPD_USERS_FILE = "ppd_users.json"  # the PPD user split (test users and every user's context rows, for evaluation)


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/inf; the message names the step and the last good checkpoint."""


class _NonFinite(Exception):
    def __init__(self, value: float):
        self.value = value


def lora_metadata(model) -> dict:
    """The adapter's peft LoraConfig as a dict (what diffusers' `_collate_lora_metadata` stores): rank, alpha,
    targets. Without it `load_lora_weights` assumes alpha = rank."""
    return model.peft_config["default"].to_dict()


@contextlib.contextmanager
def adapters_disabled(model, layers: list | None = None):
    """The LoRA reference: the same weights with the peft adapters switched off. `layers`, the model's peft tuner
    layers listed once, saves walking every module twice a step (what `disable_adapters` does)."""
    if layers is None:
        model.disable_adapters()
    else:
        for layer in layers:
            layer.enable_adapters(False)
    try:
        yield
    finally:
        if layers is None:
            model.enable_adapters()
        else:
            for layer in layers:
                layer.enable_adapters(True)


def _tensorboard_installed() -> bool:
    import importlib.util

    return any(importlib.util.find_spec(name) is not None for name in ("tensorboard", "tensorboardX"))


def _dtype(mixed_precision: str) -> torch.dtype:
    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]


def _place(module, device, dtype):
    """Move a module; cast only when its dtype differs (diffusers warns on no-op casts)."""
    module.to(device)
    if next(module.parameters()).dtype != dtype:
        module.to(dtype=dtype)
    return module


class PreferenceTrainer:
    def __init__(self, config: TrainConfig, train_dataset=None, adapter=None, conditioning: ConditioningHook | None = None):
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        config.validate()
        self.config = cfg = config
        if conditioning is not None and not isinstance(conditioning, ConditioningHook):
            raise TypeError(f"conditioning must subclass diffalign.training.ConditioningHook (its defaults are the "
                            f"no-ops of the methods it does not need), got {type(conditioning).__name__}")
        if cfg.mixed_precision is None:  # what Accelerator(mixed_precision=None) would take: the launcher's choice
            cfg.mixed_precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
            cfg.validate()
        ckpt.check_output_dir(self)
        os.makedirs(cfg.output_dir, exist_ok=True)
        log_with = None if cfg.report_to in ("none", "", None) else cfg.report_to
        if log_with == "tensorboard" and not _tensorboard_installed():
            logger.warning("report_to=tensorboard, but neither tensorboard nor tensorboardX is installed: metrics go to "
                           "%s only. pip install 'diffalign[tracking]', or set report_to=none to silence this.", LOSSES_FILE)
            log_with = None
        try:
            self.accelerator = Accelerator(
                gradient_accumulation_steps=cfg.gradient_accumulation_steps,  # `accumulate()` in optimizer_step
                mixed_precision=cfg.mixed_precision,
                log_with=log_with,
                project_config=ProjectConfiguration(project_dir=cfg.output_dir,
                                                    logging_dir=os.path.join(cfg.output_dir, "logs")),
                cpu=not torch.cuda.is_available(),
            )
        except ValueError as e:
            if "already been initialized" not in str(e):
                raise
            raise ValueError(f"mixed_precision={cfg.mixed_precision!r}: this process already made an accelerate "
                             "Accelerator with another mixed precision, and accelerate keeps one per process; "
                             "train with this precision in a new process") from e
        acc = self.accelerator
        self.device = acc.device
        self.weight_dtype = _dtype(cfg.mixed_precision)
        if torch.cuda.is_available() and cfg.allow_tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        torch.manual_seed(cfg.seed)

        # --- model -------------------------------------------------------------------------
        family_options = cfg.family_options()
        if adapter is None:
            from diffalign.families import load_family

            adapter = load_family(cfg.pretrained_model_name_or_path, family=cfg.family, seed=cfg.model_seed,
                                  revision=cfg.revision, variant=cfg.variant, **family_options)
        elif family_options:
            raise ValueError(f"{sorted(family_options)} are model-family options; with an adapter passed in, set them "
                             "on the adapter")
        if cfg.pretrained_vae_model_name_or_path:
            from diffusers import AutoencoderKL

            adapter.vae = AutoencoderKL.from_pretrained(cfg.pretrained_vae_model_name_or_path).eval().requires_grad_(False)
        self.adapter = adapter
        self.needs_reference = OBJECTIVE_REGISTRY[cfg.objective].needs_reference
        if cfg.tuning == "none" and conditioning is None and cfg.objective != "ppd":
            raise ValueError("tuning='none' needs a conditioning hook whose weights train (objective='ppd')")
        # --- data (before the models are cast: a cache checks the encoders' fingerprint) ------
        self.dataset = train_dataset if train_dataset is not None else self._build_dataset()
        self.ppd_split = None
        if cfg.objective == "ppd" and conditioning is None:
            # Built from the config: split users, hold context pairs apart, install user attention.
            from diffalign.personalization.training import ppd_from_config

            self.dataset, conditioning, self.ppd_split = ppd_from_config(cfg, self.dataset, adapter.denoiser)
            sp = self.ppd_split
            acc.print(
                f"ppd: {sp.stats['kept_users']} of {sp.stats['users']} users kept ({sp.filtered_users} with < {cfg.ppd_min_pairs} "
                f"pairs filtered, {sp.filtered_rows} rows; {sp.rows_without_user} rows without user_id); "
                f"{len(sp.train_users)} train / {len(sp.test_users)} test users; {len(self.dataset)} training pairs"
            )
        self.conditioning = conditioning
        if conditioning is not None:
            conditioning.to(self.device)
        self._setup_models()
        self.null_text = None
        if cfg.prompt_dropout > 0:
            empty = getattr(self.dataset, "empty_text", None) if cfg.latent_cache else None
            empty = empty if empty is not None else adapter.encode_prompts([""])
            self.null_text = {k: v.to(self.device) for k, v in empty.items()}

        # --- optimiser ---------------------------------------------------------------------
        params = [p for p in self.denoiser.parameters() if p.requires_grad]
        own = {id(p) for p in self.denoiser.parameters()}
        self.extra_trainable: list[torch.nn.Parameter] = []  # trainable, but not the denoiser's (encoder head)
        if conditioning is not None:
            seen = {id(p) for p in params}
            for p in conditioning.trainable_parameters():
                if id(p) not in seen:  # tuning=full already lists the user attention (part of the denoiser)
                    seen.add(id(p))
                    params.append(p)
                    if id(p) not in own:
                        self.extra_trainable.append(p)
        if not params:
            raise ValueError("nothing to train: no parameter requires grad")
        self.trainable = params
        world = acc.num_processes
        lr = cfg.learning_rate
        if cfg.scale_lr:
            lr = lr * cfg.train_batch_size * cfg.gradient_accumulation_steps * world
        self.learning_rate = lr
        self.optimizer = self._build_optimizer(params, lr)
        from diffusers.optimization import get_scheduler

        lr_scheduler = get_scheduler(
            cfg.lr_scheduler, self.optimizer, num_warmup_steps=cfg.lr_warmup_steps * world,
            num_training_steps=cfg.max_train_steps * world,
        )
        self.ema = None
        if cfg.use_ema:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(params, decay=cfg.ema_decay)
            self.ema.to(self.device)
        from accelerate.utils import DistributedType

        if cfg.tuning in ("lora", "none") and acc.distributed_type == DistributedType.FSDP:
            raise ValueError(
                f"tuning={cfg.tuning} with FSDP is not supported (the reference pass toggles adapters / user attention on "
                "the unsharded module); use train/accelerate_configs/multi_gpu.yaml (DDP), FSDP for tuning=full"
            )
        if self.extra_trainable and acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            raise ValueError(
                "a conditioning hook with its own trainable weights (PPD's encoder head) runs single-process or under DDP "
                "(train/accelerate_configs/multi_gpu.yaml); FSDP / DeepSpeed would not shard or sync them"
            )
        self.denoiser, self.optimizer, self.lr_scheduler = acc.prepare(self.denoiser, self.optimizer, lr_scheduler)
        if acc.num_processes > 1 and self.extra_trainable:
            # accelerate does not wrap them: start every process from the main process's values.
            import torch.distributed as dist

            with torch.no_grad():
                for p in self.extra_trainable:
                    dist.broadcast(p.data, src=0)
        if cfg.tuning in ("lora", "none"):
            # Checkpoints hold only what trains (LoRA weights; the hook saves its own), never the frozen base.
            acc.register_save_state_pre_hook(self._save_lora_hook)
            acc.register_load_state_pre_hook(self._load_lora_hook)

    # ------------------------------------------------------------------------------------------
    def _setup_models(self) -> None:
        cfg, adapter = self.config, self.adapter
        denoiser = adapter.denoiser
        denoiser.requires_grad_(False)
        vae_dtype = torch.float32  # the SDXL VAE overflows in fp16; it runs once per image (or never, with the cache)
        _place(adapter.vae, self.device, vae_dtype)
        for enc in adapter.text_encoders():
            _place(enc, self.device, self.weight_dtype)
        if cfg.attention_backend == "xformers":
            try:
                import xformers  # noqa: F401
            except ImportError as e:
                raise ImportError(
                    "attention_backend='xformers' needs xformers: pip install 'diffalign[xformers]' (or use 'sdpa')"
                ) from e
            denoiser.enable_xformers_memory_efficient_attention()
        self.reference = None
        self._tuner_layers = None  # listed on the first reference pass
        if cfg.tuning == "lora":
            from peft import LoraConfig

            _place(denoiser, self.device, self.weight_dtype)
            from diffalign.training.lora import add_lora

            targets = cfg.lora_target_modules or adapter.lora_target_modules
            lora_config = LoraConfig(
                r=cfg.lora_rank, lora_alpha=cfg.lora_alpha or cfg.lora_rank, lora_dropout=cfg.lora_dropout,
                init_lora_weights="gaussian", target_modules=list(targets),
            )
            add_lora(adapter, denoiser, lora_config, cfg.init_lora, cfg.init_lora_merge)
            for p in denoiser.parameters():  # LoRA weights train in fp32 even when the base is bf16/fp16
                if p.requires_grad:
                    p.data = p.data.float()
        elif cfg.tuning == "none":
            # The base stays frozen (in the compute dtype); only the hook's weights train. The reference is
            # this same model under the hook's reference_context (user attention off): no second copy.
            _place(denoiser, self.device, self.weight_dtype)
        else:
            _place(denoiser, self.device, torch.float32)
            if self.needs_reference:
                # The frozen reference in the compute dtype (bf16 under bf16 mixed precision), on the accelerator.
                reference = copy.deepcopy(denoiser)
                if self.conditioning is not None:
                    reference = self.conditioning.reference_copy(reference)  # PPD: the base without user attention
                self.reference = _place(reference, self.device, self.weight_dtype).eval().requires_grad_(False)
            denoiser.requires_grad_(True)
        if cfg.gradient_checkpointing:
            denoiser.enable_gradient_checkpointing()
        denoiser.train()
        if cfg.torch_compile:
            denoiser.compile()
            if self.reference is not None:
                self.reference.compile()
        self.denoiser = denoiser

    def _build_dataset(self):
        cfg = self.config
        if cfg.latent_cache:
            from diffalign.data import CachedDataset

            return CachedDataset(cfg.latent_cache, adapter=self.adapter, resolution=cfg.resolution)
        if not cfg.dataset:
            raise ValueError("no training data: set dataset=<parquet folder | HF dataset | hub id | synthetic:pairs> or latent_cache=<dir>")
        if cfg.dataset.startswith("synthetic:"):
            from diffalign.data.synthetic import synthetic_from_spec

            return synthetic_from_spec(cfg.dataset, cfg.resolution, cfg.seed)
        from diffalign.data import load_preference_dataset

        ds = load_preference_dataset(
            cfg.dataset, cfg.dataset_schema, split=cfg.dataset_split, cache_dir=cfg.hf_cache_dir, resolution=cfg.resolution, crop=cfg.crop,
            random_flip=cfg.random_flip, seed=cfg.seed, skip_bad_rows=cfg.skip_bad_rows, keep_ties=cfg.keep_ties, max_k=cfg.max_k,
        )
        if cfg.max_train_samples is not None and cfg.max_train_samples < len(ds):
            ds = torch.utils.data.Subset(ds, range(cfg.max_train_samples))
        return ds

    def _build_optimizer(self, params, lr):
        cfg = self.config
        if cfg.optimizer == "adamw8bit":
            try:
                import bitsandbytes as bnb
            except ImportError as e:
                raise ImportError("optimizer='adamw8bit' needs bitsandbytes: pip install bitsandbytes (or use 'adamw')") from e
            cls = bnb.optim.AdamW8bit
        elif cfg.optimizer == "adafactor":
            from transformers.optimization import Adafactor

            return Adafactor(params, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False, weight_decay=cfg.adam_weight_decay)
        else:
            cls = torch.optim.AdamW
        return cls(params, lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)

    # --- checkpoint hooks (LoRA: save only the adapter weights; none: nothing of the denoiser) -------
    def _save_lora_hook(self, models, weights, output_dir):
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file

        for model in models:
            if self.accelerator.is_main_process and self.config.tuning == "lora":
                unwrapped = self.accelerator.unwrap_model(model)
                state = get_peft_model_state_dict(unwrapped)
                save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, os.path.join(output_dir, LORA_STATE_FILE))
                # Beside the resume file, what diffusers scripts write: `load_lora_weights(checkpoint-N)` works.
                self.adapter.save_lora(output_dir, state, lora_metadata(unwrapped))
        while weights:
            weights.pop()

    def _load_lora_hook(self, models, input_dir):
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        if self.config.tuning == "none":  # the base is frozen: nothing of it is in the checkpoint
            while models:
                models.pop()
            return
        state = load_file(os.path.join(input_dir, LORA_STATE_FILE))
        while models:
            model = self.accelerator.unwrap_model(models.pop())
            result = set_peft_model_state_dict(model, state)
            if getattr(result, "unexpected_keys", None):
                raise ValueError(f"checkpoint {input_dir} has LoRA keys this model lacks: {result.unexpected_keys[:5]}")

    # ------------------------------------------------------------------------------------------
    @property
    def unwrapped(self):
        return self.accelerator.unwrap_model(self.denoiser)

    def _reference_context(self, batch):
        stack = contextlib.ExitStack()
        if self.reference is not None:  # tuning=full: a separate frozen copy, already the plain base
            return stack
        if self.config.tuning == "lora":
            if self._tuner_layers is None:
                from peft.tuners.tuners_utils import BaseTunerLayer

                self._tuner_layers = [m for m in self.unwrapped.modules() if isinstance(m, BaseTunerLayer)]
            stack.enter_context(adapters_disabled(self.unwrapped, self._tuner_layers))
        if self.conditioning is not None:
            stack.enter_context(self.conditioning.reference_context(self.unwrapped, batch))
        return stack

    def _policy_context(self, batch):
        if self.conditioning is not None:
            return self.conditioning.policy_context(self.unwrapped, batch)
        return contextlib.nullcontext()

    def _generators(self, batch: dict, micro_step: int, purpose: int) -> list[torch.Generator]:
        """One generator per group, seeded by (seed, epoch, group index, purpose): the draws of a group
        do not depend on batch composition, process count or step, so reference errors can be
        precomputed and a resumed run replays the same numbers."""
        keys = batch.get("group_keys")
        if keys is None:  # a hand-made batch (tests, benchmarks): key by micro-step and position
            keys = [(-1 - micro_step, j) for j in range(len(batch["scores"]))]
        return [torch.Generator().manual_seed(group_seed(self.config.seed, e, i, purpose)) for e, i in keys]

    def prepare_inputs(self, batch: dict, micro_step: int = 0) -> dict:
        """Denoiser inputs for a batch: latents (cached or VAE-sampled), text (cached or encoded), prompt
        dropout, micro-conditioning and group-shared noise/timesteps -> x_t, target, weight."""
        cfg, adapter = self.config, self.adapter
        scores = batch["scores"].to(self.device, torch.float32)
        b, k = scores.shape
        if "latents" in batch:
            latents = batch["latents"].to(self.device, torch.float32)
        else:
            px = batch["pixel_values"].to(self.device)
            gens = self._generators(batch, micro_step, 0)
            latents = adapter.encode_image_groups(px, gens).float()  # one VAE pass for the step's groups
        text = batch.get("text")
        if text is None:
            text = adapter.encode_prompts(list(batch["prompts"]))
        text = {key: value.to(self.device) for key, value in text.items()}
        if self.null_text is not None:
            from diffalign.families import drop_prompts

            drop = torch.tensor([bool(torch.rand(1, generator=g) < cfg.prompt_dropout) for g in self._generators(batch, micro_step, 1)])
            text = drop_prompts(text, self.null_text, drop)
        from diffalign.families import repeat_groups

        text = repeat_groups(text, k)
        h, w = latents.shape[-2:]
        micro = adapter.micro_conditioning(
            batch["original_sizes"].flatten(0, 1), batch["crop_top_lefts"].flatten(0, 1),
            (h * adapter.vae_scale_factor, w * adapter.vae_scale_factor),
        )
        if micro is not None:
            micro = {key: value.to(self.device) for key, value in micro.items()}
        pieces = [adapter.group_noise_and_timesteps(latents[i : i + 1], g) for i, g in enumerate(self._generators(batch, micro_step, 2))]
        noise = torch.cat([p[0] for p in pieces])
        timesteps = torch.cat([p[1] for p in pieces])
        inputs = adapter.training_inputs(latents, noise=noise, timesteps=timesteps)
        return {**inputs, "text": text, "micro": micro, "scores": scores, "b": b, "k": k}

    @torch.no_grad()
    def reference_prediction(self, batch: dict, inputs: dict) -> torch.Tensor:
        """The frozen reference's prediction on `inputs`: LoRA adapters off, or the frozen copy."""
        ref_model = self.reference if self.reference is not None else self.unwrapped
        with self._reference_context(batch), self.accelerator.autocast():
            return self.adapter.predict(ref_model, inputs["x_t"], inputs["timesteps"], inputs["text"], inputs["micro"])

    @torch.no_grad()
    def reference_errors(self, batch: dict, micro_step: int = 0, inputs: dict | None = None) -> torch.Tensor:
        """Per-sample errors (B, k) of the frozen reference."""
        from diffalign.kernels import per_sample_error

        inputs = inputs if inputs is not None else self.prepare_inputs(batch, micro_step)
        ref_pred = self.reference_prediction(batch, inputs)
        return per_sample_error(ref_pred, inputs["target"], inputs["weight"]).view(inputs["b"], inputs["k"])

    def compute_loss(self, batch: dict, micro_step: int) -> tuple[torch.Tensor, dict]:
        """Loss and metrics of one micro-batch. A batch carrying `ref_errors` (precomputed) skips the reference pass."""
        from diffalign.kernels import per_sample_error, per_sample_error_pair
        from diffalign.objectives import compute, objective_kwargs

        cfg, adapter, acc = self.config, self.adapter, self.accelerator
        inputs = self.prepare_inputs(batch, micro_step)
        b, k = inputs["b"], inputs["k"]
        err_ref = ref_pred = None
        if self.needs_reference:
            if "ref_errors" in batch:
                err_ref = batch["ref_errors"].to(self.device, torch.float32)
            else:
                ref_pred = self.reference_prediction(batch, inputs)
        with self._policy_context(batch), acc.autocast():
            pred = adapter.predict(self.denoiser, inputs["x_t"], inputs["timesteps"], inputs["text"], inputs["micro"])
        if ref_pred is not None:  # both errors in one pass over the target (the fused kernel on CUDA)
            err_policy, err_ref = per_sample_error_pair(pred, ref_pred, inputs["target"], inputs["weight"])
            err_policy, err_ref = err_policy.view(b, k), err_ref.view(b, k)
        else:
            err_policy = per_sample_error(pred, inputs["target"], inputs["weight"]).view(b, k)
        # A NaN/inf error must stop every process at the same step, before the objective rejects it.
        bad = (~torch.isfinite(err_policy.detach())).any()
        if err_ref is not None:
            bad = bad | (~torch.isfinite(err_ref)).any()
        if acc.reduce(bad.float().reshape(1), reduction="sum").item() > 0:
            raise _NonFinite(float("nan"))
        loss, metrics = compute(cfg.loss_name, err_policy, err_ref, inputs["scores"], **objective_kwargs(cfg.objective, cfg))
        if cfg.sft_weight > 0:
            anchor, _ = compute("sft", err_policy, None, inputs["scores"])
            loss = loss + cfg.sft_weight * anchor
            metrics = {**metrics, "sft_anchor": anchor.detach()}
        return loss.float(), metrics

    def precompute_reference(self, start_step: int = 0) -> dict:
        """Reference errors for every (epoch, group) this process will visit from `start_step` to the end
        (`diffalign.training.reference_cache`)."""
        from diffalign.training import reference_cache

        return reference_cache.precompute_reference(self, start_step)

    def optimizer_step(self, batches: list[dict], step: int, micro_step: int) -> dict[str, float]:
        """One optimiser update over `batches` (the gradient-accumulation micro-batches); returns the
        loss and metrics averaged over micro-batches and processes. `step` is the number of updates done."""
        acc = self.accelerator
        sums: dict[str, float] = {}
        n = len(batches)
        if n != acc.gradient_accumulation_steps:
            raise ValueError(f"optimizer_step got {n} micro-batches; gradient_accumulation_steps is "
                             f"{acc.gradient_accumulation_steps}")
        for j, batch in enumerate(batches):
            # Skips the gradient all-reduce until the last micro-batch; under DeepSpeed the engine accumulates.
            with acc.accumulate(self.denoiser):
                try:
                    loss, metrics = self.compute_loss(batch, micro_step + j)
                    global_loss = acc.reduce(loss.detach().reshape(1), reduction="mean")
                    if not torch.isfinite(global_loss).all():
                        raise _NonFinite(float(global_loss))
                except _NonFinite as e:
                    self._fail_non_finite(step + 1, micro_step + j, e.value)
                acc.backward(loss)  # accelerate divides by gradient_accumulation_steps
            # One all-reduce for the loss and every metric.
            names = ["loss", *metrics]
            values = torch.stack([loss.detach().float(), *(m.detach().float().to(self.device) for m in metrics.values())])
            values = acc.reduce(values, reduction="mean").cpu().tolist()
            for name, value in zip(names, values):
                sums[name] = sums.get(name, 0.0) + value / n
        self._sync_extra_gradients()
        if self.config.max_grad_norm > 0:
            grad_norm = acc.clip_grad_norm_(self.trainable, self.config.max_grad_norm)
            if grad_norm is not None:  # DeepSpeed clips inside its engine and returns None
                sums["grad_norm"] = float(grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.step(self.trainable)
        return sums

    def _sync_extra_gradients(self) -> None:
        """Average the gradients of trainable weights outside the prepared denoiser (PPD's encoder head)
        over processes, as DDP does for the denoiser's: one all-reduce of one flat buffer per step."""
        if self.accelerator.num_processes == 1 or not self.extra_trainable:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.extra_trainable]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        flat = self.accelerator.reduce(flat, reduction="mean")
        offset = 0
        for p, g in zip(self.extra_trainable, grads):
            p.grad = flat[offset : offset + g.numel()].view_as(p).to(p.dtype)
            offset += g.numel()

    # ------------------------------------------------------------------------------------------
    def save_checkpoint(self, step: int, last_loss: float | None = None) -> str | None:
        """A resumable `checkpoint-<step>` (`diffalign.training.checkpoint.save_checkpoint`)."""
        return ckpt.save_checkpoint(self, step, last_loss)

    def _save_other_components(self, out: str) -> None:
        """model_index.json and every component but the (already saved) denoiser, as `save_pretrained` lays
        them out: `<Pipeline>.from_pretrained(output_dir)` then loads the fine-tuned model."""
        pipe = self.adapter.pipeline()
        pipe.save_config(out)
        for name, component in pipe.components.items():
            if name != self.adapter.denoiser_attr and hasattr(component, "save_pretrained"):
                component.save_pretrained(os.path.join(out, name))

    def validate(self, step: int) -> str | None:
        """Generate the validation prompts with the current weights; save a grid PNG (main process)."""
        cfg, acc = self.config, self.accelerator
        path = None
        if acc.is_main_process:
            from diffusers.utils import make_image_grid

            model = self.unwrapped
            model.eval()
            pipe = self.adapter.pipeline(model)
            res = cfg.validation_resolution or cfg.resolution
            images = []
            with torch.no_grad(), acc.autocast():
                for i, prompt in enumerate(cfg.validation_prompts):
                    gen = torch.Generator(device="cpu").manual_seed(cfg.seed + i)
                    images.append(pipe(prompt, height=res, width=res, num_inference_steps=cfg.validation_num_inference_steps,
                                       guidance_scale=cfg.validation_guidance_scale, generator=gen).images[0])
            model.train()
            os.makedirs(os.path.join(cfg.output_dir, "validation"), exist_ok=True)
            path = os.path.join(cfg.output_dir, "validation", f"step-{step:06d}.png")
            make_image_grid(images, rows=1, cols=len(images)).save(path)
            self._log_validation_images(images, step)
        acc.wait_for_everyone()
        return path

    def _log_validation_images(self, images, step: int) -> None:
        """The validation images to the trackers as well, as diffusers' training scripts do."""
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_images("validation", np.stack([np.asarray(im) for im in images]), step,
                                          dataformats="NHWC")
            elif tracker.name == "wandb":
                import wandb

                tracker.log({"validation": [wandb.Image(im, caption=f"{i}: {p}") for i, (im, p)
                                            in enumerate(zip(images, self.config.validation_prompts))]}, step=step)

    def save_final(self) -> None:
        from accelerate.utils import DistributedType

        cfg, acc = self.config, self.accelerator
        acc.wait_for_everyone()
        if self.ema is not None:  # on every process: sharded models gather the EMA weights below
            self.ema.copy_to(self.trainable)
        model = self.unwrapped
        owned = self.conditioning.owned_state_keys(model) if self.conditioning is not None else set()
        if cfg.tuning == "lora":
            if acc.is_main_process:
                from peft.utils import get_peft_model_state_dict

                self.adapter.save_lora(cfg.output_dir, get_peft_model_state_dict(model), lora_metadata(model))
        elif cfg.tuning == "none":
            pass  # the base did not change; the hook saves what trained (below)
        elif acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED) or owned:
            # Gathered shards, or a state dict without the hook's keys (PPD saves user attention on its own,
            # so unet/ stays a plain diffusers model that from_pretrained loads without unexpected keys).
            sharded = acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
            state = acc.get_state_dict(self.denoiser) if sharded else model.state_dict()  # the former is a collective
            if acc.is_main_process:
                from safetensors.torch import save_file

                out = os.path.join(cfg.output_dir, self.adapter.denoiser_attr)
                os.makedirs(out, exist_ok=True)
                model.save_config(out)
                save_file({k: v.detach().contiguous().cpu() for k, v in state.items() if k not in owned},
                          os.path.join(out, "diffusion_pytorch_model.safetensors"))
        elif acc.is_main_process:
            model.save_pretrained(os.path.join(cfg.output_dir, self.adapter.denoiser_attr), safe_serialization=True)
        if cfg.tuning == "full" and acc.is_main_process:
            self._save_other_components(cfg.output_dir)
        if self.conditioning is not None and acc.is_main_process:
            self.conditioning.save(cfg.output_dir)
        if self.ppd_split is not None and acc.is_main_process:
            sp = self.ppd_split
            with open(os.path.join(cfg.output_dir, PPD_USERS_FILE), "w", encoding="utf-8") as f:
                json.dump({"train_users": sp.train_users, "test_users": sp.test_users, "context_rows": sp.context_rows,
                           "filtered_users": sp.filtered_users, "filtered_rows": sp.filtered_rows,
                           "rows_without_user": sp.rows_without_user, "stats": sp.stats}, f)
        acc.wait_for_everyone()

    # ------------------------------------------------------------------------------------------
    def train(self) -> dict:
        """Run to `max_train_steps`; returns (and writes) the training summary."""
        from tqdm.auto import tqdm

        cfg, acc = self.config, self.accelerator
        start_step = ckpt.resume(self)
        accum = cfg.gradient_accumulation_steps
        sampler = GroupBatchSampler(len(self.dataset), cfg.train_batch_size, acc.num_processes, acc.process_index, cfg.seed,
                                    start=start_step * accum)
        loader = torch.utils.data.DataLoader(KeyedDataset(self.dataset), batch_sampler=sampler, collate_fn=collate_keyed,
                                             num_workers=cfg.dataloader_num_workers)
        if cfg.report_to not in ("none", "", None):
            acc.init_trackers(cfg.tracker_project_name, config={k: (v if isinstance(v, (int, float, str, bool)) else str(v))
                                                              for k, v in cfg.to_dict().items()})
        ref_table = self.precompute_reference(start_step) if cfg.precompute_reference and self.needs_reference else None
        losses_path = os.path.join(cfg.output_dir, LOSSES_FILE)
        if acc.is_main_process:
            dropped = ckpt.truncate_log(losses_path, start_step)
            if dropped:
                acc.print(f"{LOSSES_FILE}: dropped {dropped} records after step {start_step} (they are redone now)")
        acc.wait_for_everyone()
        bar = tqdm(total=cfg.max_train_steps, initial=start_step, desc="train",
                   disable=not (acc.is_local_main_process and cfg.progress_bar))
        groups_per_step = cfg.train_batch_size * acc.num_processes * accum
        step = start_step
        micro_step = start_step * accum
        history: list[dict] = []
        t_start = time.perf_counter()
        step_times: list[float] = []
        data_iter = iter(loader)
        self.denoiser.train()
        while step < cfg.max_train_steps:
            t0 = time.perf_counter()
            batches = [next(data_iter) for _ in range(accum)]
            if ref_table is not None:
                for batch in batches:
                    batch["ref_errors"] = torch.stack([ref_table[e][i] for e, i in batch["group_keys"]])
            sums = self.optimizer_step(batches, step, micro_step)
            micro_step += accum
            step += 1
            dt = time.perf_counter() - t0
            step_times.append(dt)
            sums["lr"] = self.lr_scheduler.get_last_lr()[0]
            sums["step_time_s"] = dt
            sums["pairs_per_s"] = groups_per_step / dt
            history.append({"step": step, **sums})
            if acc.is_main_process:
                with open(losses_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"step": step, "loss": sums["loss"], **{k: v for k, v in sums.items() if k != "loss"}}) + "\n")
            if step % cfg.log_every == 0 and acc.trackers:
                acc.log(sums, step=step)
            bar.update(1)
            bar.set_postfix(loss=f"{sums['loss']:.4f}", s_per_step=f"{dt:.3f}", pairs_s=f"{sums['pairs_per_s']:.1f}")
            if cfg.checkpointing_steps and step % cfg.checkpointing_steps == 0 and step < cfg.max_train_steps:
                self.save_checkpoint(step, sums["loss"])
            if cfg.validation_steps and step % cfg.validation_steps == 0:
                self.validate(step)
        bar.close()
        if cfg.checkpointing_steps:
            self.save_checkpoint(step, history[-1]["loss"] if history else None)
        self.save_final()
        summary = self._summary("finished", step, start_step, history, step_times, time.perf_counter() - t_start)
        acc.end_training()
        return summary

    def _summary(self, status, step, start_step, history, step_times, wall) -> dict:
        cfg, acc = self.config, self.accelerator
        last = history[-1] if history else {}
        tail = history[-10:]
        timed = step_times[1:] or step_times  # the first step includes warm-up (compilation, allocator)
        median = float(np.median(timed)) if timed else float("nan")
        summary = {
            "status": status,
            "objective": cfg.objective,
            "loss_name": cfg.loss_name,
            "family": self.adapter.name,
            "tuning": cfg.tuning,
            "global_step": step,
            "resumed_from_step": start_step,
            "num_processes": acc.num_processes,
            "final_loss": last.get("loss"),
            "mean_loss_last_10": float(np.mean([h["loss"] for h in tail])) if tail else None,
            "final_metrics": {k: v for k, v in last.items() if k not in ("step",)},
            "median_step_time_s": median,
            "pairs_per_s": cfg.train_batch_size * acc.num_processes * cfg.gradient_accumulation_steps / median if timed else None,
            "wall_time_s": wall,
            "skipped_rows": int(getattr(self.dataset, "skipped_rows", getattr(getattr(self.dataset, "dataset", None), "skipped_rows", 0)) or 0),
            "ppd_users": None if self.ppd_split is None else {
                **self.ppd_split.stats, "filtered_users": self.ppd_split.filtered_users,
                "filtered_rows": self.ppd_split.filtered_rows, "rows_without_user": self.ppd_split.rows_without_user,
            },
            "config": cfg.to_dict(),
        }
        if acc.is_main_process:
            with open(os.path.join(cfg.output_dir, SUMMARY_FILE), "w", encoding="utf-8") as f:
                json.dump(summary, f, indent=2, default=str)
        return summary

    def _fail_non_finite(self, step: int, micro_step: int, value: float):
        cfg = self.config
        good = ckpt.latest_checkpoint(cfg.output_dir)
        where = f"the last good checkpoint is {good}" if good else "no checkpoint was written before it"
        msg = (
            f"non-finite loss ({value}) at step {step} (micro-step {micro_step}); training stopped before the update, "
            f"{where}. Lower learning_rate or beta, or check the data, then resume_from_checkpoint=latest."
        )
        if self.accelerator.is_main_process:
            with open(os.path.join(cfg.output_dir, SUMMARY_FILE), "w", encoding="utf-8") as f:
                json.dump({"status": "non_finite_loss", "step": step, "message": msg, "last_good_checkpoint": good}, f, indent=2)
        self.accelerator.end_training()
        raise NonFiniteLossError(msg)


def train(config: TrainConfig, **kwargs) -> dict:
    """Build a `PreferenceTrainer` for `config` and run it."""
    return PreferenceTrainer(config, **kwargs).train()
