"""`TrainConfig`: every knob of a preference-training run, loaded from YAML with `key=value` overrides."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Literal

from diffalign.objectives import REGISTRY as OBJECTIVE_REGISTRY

# Choice fields are Literal-typed, so HfArgumentParser and `diffalign train --help` list their choices.
Objective = Literal[tuple(OBJECTIVE_REGISTRY)]  # diffalign.objectives.REGISTRY: the one list of objectives
Tuning = Literal["lora", "full", "none"]  # none: base frozen, only a conditioning hook's weights train (PPD)
PPDEncoder = Literal["clip", "vlm"]
MixedPrecision = Literal["no", "fp16", "bf16"]
Optimizer = Literal["adamw", "adamw8bit", "adafactor"]
AttentionBackend = Literal["sdpa", "xformers"]
LRScheduler = Literal["constant", "constant_with_warmup", "linear", "cosine"]
OBJECTIVES, TUNING, PPD_ENCODERS, MIXED_PRECISION, OPTIMIZERS, ATTENTION, LR_SCHEDULERS = (
    typing.get_args(t) for t in (Objective, Tuning, PPDEncoder, MixedPrecision, Optimizer, AttentionBackend, LRScheduler)
)


def option(default=dataclasses.MISSING, help: str = "", **kwargs):
    """A dataclass field with its help text (shown by `diffalign train --help` and HfArgumentParser)."""
    return field(default=default, metadata={"help": help}, **kwargs)


@dataclass
class TrainConfig:
    # --- model -----------------------------------------------------------------------------
    pretrained_model_name_or_path: str = option("tiny:sdxl", "hub id, local path, or tiny:sdxl / tiny:sd3 / tiny:sd3-t5")
    family: str | None = option(None, "sdxl / sd15 / sd3; None = from the pipeline class")
    revision: str | None = option(None, "model revision (branch, tag or commit) on the Hub")
    variant: str | None = option(None, "weights variant, e.g. fp16")
    pretrained_vae_model_name_or_path: str | None = option(None, "e.g. madebyollin/sdxl-vae-fp16-fix")
    prediction_type: str | None = option(None, "SDXL: epsilon / v_prediction; None = the scheduler's")
    timestep_sampling: str = option("logit_normal", "SD3: logit_normal / mode / uniform")
    logit_mean: float = option(0.0, "SD3 logit_normal timestep sampling: mean")
    logit_std: float = option(1.0, "SD3 logit_normal timestep sampling: std")
    mode_scale: float = option(1.29, "SD3 mode timestep sampling: scale")
    loss_weighting: str = option("none", "SD3: none / sigma_sqrt / cosmap")
    max_sequence_length: int = option(77, "SD3 T5 tokens")
    model_seed: int = option(0, "seed of the random weights of tiny:* models")

    # --- objective -------------------------------------------------------------------------
    objective: Objective = option("dpo", "; ".join(f"{s.name}: {s.help}" for s in OBJECTIVE_REGISTRY.values()))
    beta: float = option(5000.0, "KL strength of DPO/RankDPO/PPD (Diffusion-DPO uses 5000 for SDXL)")
    rank_weighting: str = option("dcg", "rankdpo: dcg / none")
    discount_from: str = option("true", "rankdpo: true / predicted")
    sft_weight: float = option(0.0, "Adds sft_weight x the best sample's denoising error to a preference loss (DPO + NLL, as in RPO): it keeps the likelihood of preferred images from falling while the losers' rises. 0 = the plain objective.")

    # --- data ------------------------------------------------------------------------------
    dataset: str | None = option(None, "parquet folder/file, saved HF dataset, hub id, or synthetic:pairs / synthetic:ranked")
    dataset_schema: str = option("auto", "auto / pairwise / ranked")
    dataset_split: str = option("train", "split of the data set to train on")
    hf_cache_dir: str | None = option(None, "where `datasets` caches parquet / hub data (None = its default)")
    latent_cache: str | None = option(None, "folder written by `diffalign cache`: the loop then runs only the denoiser")
    resolution: int = option(1024, "training resolution in pixels (multiple of 8)")
    crop: str = option("center", "center / random")
    random_flip: bool = option(False, "flip images horizontally with probability 0.5")
    keep_ties: bool = option(False, "keep tied pairs / all-tied lists (dropped by default)")
    max_k: int | None = option(None, "ranked data: sub-sample every list to at most this many images")
    skip_bad_rows: bool = option(False, "skip and count bad data rows instead of failing")
    max_train_samples: int | None = option(None, "use only the first N groups")
    dataloader_num_workers: int = option(0, "DataLoader worker processes")
    prompt_dropout: float = option(0.0, "probability of training on the empty prompt (classifier-free guidance)")
    precompute_reference: bool = option(False, "Run the frozen reference over the run's batches once, before training, and reuse its errors (as TRL's precompute_ref_log_probs): the training step then runs only the policy. The same errors as the inline pass (to float rounding): noise, timestep and dropout of a group depend only on (seed, epoch, group index).")
    precompute_reference_batch_size: int | None = option(None, "Groups per forward of the reference pre-pass (no gradients, so more than a training step holds; as TRL's precompute_ref_batch_size). None = 4 x train_batch_size.")
    reference_errors_path: str | None = option(None, "Folder to keep the precomputed reference errors in: later runs with the same model, data, seed and noising options (e.g. a beta or learning-rate sweep) reuse them instead of recomputing.")

    # --- tuning ----------------------------------------------------------------------------
    tuning: Tuning = option("lora", "lora / full / none (none: the base stays frozen; needs objective=ppd)")
    lora_rank: int = option(8, "LoRA rank")
    lora_alpha: int | None = option(None, "None = lora_rank")
    lora_dropout: float = option(0.0, "LoRA dropout")
    lora_target_modules: list[str] | None = option(None, "None = the family's default")
    init_lora: str | None = option(None, "Start from this diffusers-format LoRA (a folder with pytorch_lora_weights.safetensors, e.g. an earlier run's output_dir): the adapter continues from it, and the reference stays the base. For iterative rounds.")
    init_lora_merge: bool = option(False, "Fuse init_lora into the base weights and train a fresh LoRA on top: the reference is then base + init_lora (the previous round's policy) instead of the base.")

    # --- PPD (objective: ppd; see docs/personalization.md) -------------------------------------
    # The data set must carry user_id (Pick-a-Pic v2). Users with < ppd_min_pairs pairs are dropped
    # (counted and logged); train/test users are disjoint; each user's ppd_num_context pairs are held
    # apart as context examples for the user encoder and never trained on.
    ppd_encoder: PPDEncoder = option("clip", "user-encoder back-end: clip (open_clip) / vlm (transformers vision-language model)")
    ppd_encoder_model: str | None = option(None, 'clip: open_clip model name (ViT-H-14) or "tiny" (offline random); vlm: hub id or local path')
    ppd_encoder_pretrained: str | None = option(None, "clip: open_clip pretrained tag or checkpoint file (laion2b_s32b_b79k)")
    ppd_encoder_layer: int = option(-2, "vlm: hidden-state layer pooled into the example vector")
    ppd_encoder_dim: int = option(768, "width of the user-embedding tokens (the encoder head's output)")
    ppd_num_tokens: int = option(4, "user-embedding tokens")
    ppd_token_dim: int | None = option(None, "width of the projected user tokens in the denoiser (None = text-token width)")
    ppd_user_scale: float = option(1.0, "scale of the user branch in every adapted attention layer")
    ppd_num_context: int = option(4, "context pairs per user (the paper: 4)")
    ppd_context_pool: int | None = option(None, 'Hold this many pairs per user apart and condition each step on a fresh draw of ppd_num_context of them (None = ppd_num_context, fixed contexts). Meant to keep the encoder from memorising training users; no gain measured on the toy PPD study (docs/personalization.md, "Ablations").')
    ppd_min_pairs: int = option(8, "users with fewer pairs are filtered out")
    ppd_test_fraction: float = option(0.1, "share of users held out for evaluation (never trained on)")
    ppd_user_dropout: float = option(0.0, "share of groups trained with the null user")
    ppd_train_encoder_head: bool = option(True, "train the encoder head with the user attention")

    # --- optimisation ----------------------------------------------------------------------
    train_batch_size: int = option(1, "groups (pairs or lists) per process per micro-step")
    gradient_accumulation_steps: int = option(1, "micro-steps per optimizer step")
    max_train_steps: int = option(1000, "optimizer steps to train")
    learning_rate: float = option(1e-5, "peak learning rate")
    scale_lr: bool = option(False, "multiply by train_batch_size * grad_accum * num_processes")
    lr_scheduler: LRScheduler = option("constant", "learning-rate schedule")
    lr_warmup_steps: int = option(0, "linear warm-up steps")
    optimizer: Optimizer = option("adamw", "adamw / adamw8bit / adafactor")
    adam_beta1: float = option(0.9, "Adam beta1")
    adam_beta2: float = option(0.999, "Adam beta2")
    adam_weight_decay: float = option(1e-2, "AdamW weight decay")
    adam_epsilon: float = option(1e-8, "Adam epsilon")
    max_grad_norm: float = option(1.0, "gradient clipping norm")
    mixed_precision: MixedPrecision | None = option(None, 'no / fp16 / bf16; None = the launcher\'s (`accelerate launch` config or --mixed_precision), else "no"')
    gradient_checkpointing: bool = option(False, "recompute activations in the backward pass (less memory)")
    use_ema: bool = option(False, "keep an EMA of the trained weights (saved as the final weights)")
    ema_decay: float = option(0.9999, "EMA decay in (0, 1)")
    torch_compile: bool = option(False, "torch.compile the denoiser")
    attention_backend: AttentionBackend = option("sdpa", "sdpa / xformers")
    allow_tf32: bool = option(True, "allow TF32 matmuls on CUDA")
    seed: int = option(0, "seed of data order, noise and timesteps")

    # --- operations ------------------------------------------------------------------------
    output_dir: str = option("outputs/run", "folder the run writes to")
    checkpointing_steps: int = option(500, "save a resumable checkpoint every N steps (0: never)")
    checkpoints_total_limit: int | None = option(None, "keep only the newest N checkpoints (None: all)")
    resume_from_checkpoint: str | None = option(None, 'a checkpoint folder or "latest"')
    overwrite_output_dir: bool = option(False, "A fresh run (no resume) refuses an output_dir that holds an earlier run's losses or checkpoints; True deletes those first.")
    report_to: str = option("tensorboard", "tensorboard / wandb / none")
    tracker_project_name: str = option("diffalign", "project name for the tracker")
    log_every: int = option(1, "log metrics to the tracker every N steps")
    validation_steps: int = option(0, "0 = no validation images")
    validation_prompts: list[str] = option(help="prompts of the validation images", default_factory=lambda: ["a photo of a cat", "a red cube on a blue sphere"])
    validation_num_inference_steps: int = option(20, "denoising steps of the validation images")
    validation_guidance_scale: float = option(5.0, "guidance of the validation images")
    validation_resolution: int | None = option(None, "None = resolution")
    progress_bar: bool = option(True, "show a progress bar")

    # --- construction ----------------------------------------------------------------------
    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        def choice(name, options):
            value = getattr(self, name)
            if value not in options:
                raise ValueError(f"{name}={value!r} is not one of {list(options)}")

        choice("objective", tuple(OBJECTIVE_REGISTRY))  # live: objectives registered after import count
        choice("tuning", TUNING)
        if self.mixed_precision is not None:
            choice("mixed_precision", MIXED_PRECISION)
        choice("optimizer", OPTIMIZERS)
        choice("attention_backend", ATTENTION)
        choice("lr_scheduler", LR_SCHEDULERS)
        choice("rank_weighting", ("dcg", "none"))
        choice("discount_from", ("true", "predicted"))
        choice("crop", ("center", "random"))
        for name in ("train_batch_size", "gradient_accumulation_steps", "max_train_steps", "lora_rank", "resolution", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if self.sft_weight < 0:
            raise ValueError(f"sft_weight must be >= 0, got {self.sft_weight}")
        if self.sft_weight > 0 and self.objective == "sft":
            raise ValueError("sft_weight adds an SFT term to a preference objective; objective='sft' is SFT already")
        if not 0.0 <= self.prompt_dropout < 1.0:
            raise ValueError(f"prompt_dropout must be in [0, 1), got {self.prompt_dropout}")
        if self.checkpointing_steps < 0 or self.validation_steps < 0:
            raise ValueError("checkpointing_steps and validation_steps must be >= 0 (0 turns them off)")
        if not str(self.output_dir or "").strip():
            raise ValueError("output_dir is empty; name the folder the run writes to")
        if self.resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8 (the VAE's downsampling), got {self.resolution}")
        if self.validation_resolution is not None and (self.validation_resolution < 8 or self.validation_resolution % 8):
            raise ValueError(f"validation_resolution must be a positive multiple of 8, got {self.validation_resolution}")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise ValueError(f"checkpoints_total_limit must be >= 1 or None (keep all), got {self.checkpoints_total_limit}")
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        if not (math.isfinite(self.validation_guidance_scale) and self.validation_guidance_scale >= 0):
            raise ValueError(f"validation_guidance_scale must be a finite number >= 0, got {self.validation_guidance_scale}")
        if self.validation_num_inference_steps < 1:
            raise ValueError(f"validation_num_inference_steps must be >= 1, got {self.validation_num_inference_steps}")
        if self.validation_steps and not [p for p in self.validation_prompts or [] if str(p).strip()]:
            raise ValueError("validation_steps > 0 needs at least one non-empty validation prompt (or validation_steps=0)")
        for name in ("learning_rate", "max_grad_norm", "beta"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be finite, got {getattr(self, name)}")
        if self.precompute_reference_batch_size is not None and self.precompute_reference_batch_size < 1:
            raise ValueError(f"precompute_reference_batch_size must be >= 1, got {self.precompute_reference_batch_size}")
        if self.reference_errors_path and not self.precompute_reference:
            raise ValueError("reference_errors_path needs precompute_reference=true")
        choice("ppd_encoder", PPD_ENCODERS)
        if self.init_lora and self.tuning != "lora":
            raise ValueError(f"init_lora needs tuning='lora' (got {self.tuning!r})")
        if self.init_lora_merge and not self.init_lora:
            raise ValueError("init_lora_merge=true needs init_lora (the LoRA to fuse into the base)")
        if self.tuning == "none" and self.objective != "ppd":
            raise ValueError("tuning='none' trains only a conditioning hook's weights; it needs objective='ppd' (else use lora or full)")
        if self.objective == "ppd":
            if self.ppd_num_context < 1 or self.ppd_min_pairs <= self.ppd_num_context:
                raise ValueError(
                    f"ppd_num_context must be >= 1 and ppd_min_pairs > ppd_num_context (got {self.ppd_num_context}, "
                    f"{self.ppd_min_pairs}): every kept user needs context pairs plus training pairs"
                )
            if self.ppd_context_pool is not None and not self.ppd_num_context <= self.ppd_context_pool < self.ppd_min_pairs:
                raise ValueError(
                    f"ppd_context_pool must be >= ppd_num_context and < ppd_min_pairs (got {self.ppd_context_pool}; "
                    f"ppd_num_context {self.ppd_num_context}, ppd_min_pairs {self.ppd_min_pairs})"
                )
            if not 0.0 <= self.ppd_test_fraction < 1.0:
                raise ValueError(f"ppd_test_fraction must be in [0, 1), got {self.ppd_test_fraction}")
            if not 0.0 <= self.ppd_user_dropout < 1.0:
                raise ValueError(f"ppd_user_dropout must be in [0, 1), got {self.ppd_user_dropout}")
            if self.ppd_encoder_dim < 1 or self.ppd_num_tokens < 1:
                raise ValueError("ppd_encoder_dim and ppd_num_tokens must be >= 1")
            if self.precompute_reference:
                raise ValueError("precompute_reference does not apply to objective='ppd' (the reference pass is per user batch); turn it off")

    @property
    def loss_name(self) -> str:
        """The name `diffalign.objectives.compute` dispatches on."""
        return OBJECTIVE_REGISTRY[self.objective].loss

    @classmethod
    def valid_keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def family_options(self) -> dict:
        """The model-family options (any family's `options` that is a field here) set away from their defaults;
        the family then checks that they are its own."""
        from diffalign.families import family_option_names

        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        return {k: getattr(self, k) for k in family_option_names() if k in defaults and getattr(self, k) != defaults[k]}

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        if "loss_type" in values:
            raise ValueError("loss_type is gone: ask for objective=ipo or objective=hinge (objective=dpo is the "
                             "sigmoid loss)")
        unknown = sorted(set(values) - set(cls.valid_keys()))
        if unknown:
            raise ValueError(f"unknown config key(s) {unknown}. Valid keys: {', '.join(cls.valid_keys())}")
        hints = typing.get_type_hints(cls)
        return cls(**{k: _coerce(k, v, hints[k]) for k, v in values.items()})

    @classmethod
    def from_yaml(cls, path: str | None = None, overrides: list[str] | None = None) -> TrainConfig:
        """Load `path` (YAML mapping), then apply `key=value` overrides (values parsed as YAML)."""
        import yaml

        values: dict = {}
        if path is not None:
            path = resolve_config_path(path)
            with open(path, encoding="utf-8") as f:
                loaded = yaml.safe_load(f) or {}
            if not isinstance(loaded, dict):
                raise ValueError(f"{path} must hold a YAML mapping of config keys, got {type(loaded).__name__}")
            values.update(loaded)
        values.update(parse_overrides(overrides or []))
        return cls.from_dict(values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")  # also reachable as train/configs in a checkout


def available_configs() -> list[str]:
    """Names of the configs shipped with the package (`diffalign train --config NAME`)."""
    return sorted(f[: -len(".yaml")] for f in os.listdir(CONFIG_DIR) if f.endswith(".yaml"))


def resolve_config_path(name_or_path: str) -> str:
    """A YAML file as given; else a shipped config, by name (`sdxl_dpo`, `sdxl_dpo.yaml`) or by its checkout
    path (`train/configs/sdxl_dpo.yaml`, so the documented commands also work from an installed wheel)."""
    if os.path.isfile(name_or_path):
        return name_or_path
    head, file = os.path.split(name_or_path)
    name = file.removesuffix(".yaml")
    if name in available_configs() and head.replace(os.sep, "/").rstrip("/") in ("", "train/configs"):
        return os.path.join(CONFIG_DIR, f"{name}.yaml")
    raise FileNotFoundError(
        f"config {name_or_path!r} is neither a file nor a shipped config; shipped: {', '.join(available_configs())}"
    )


def parse_overrides(overrides: list[str]) -> dict:
    import yaml

    out = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value (e.g. learning_rate=1e-6)")
        key, raw = item.split("=", 1)
        key = key.strip().lstrip("-").replace("-", "_")
        out[key] = yaml.safe_load(raw) if raw != "" else None
    return out


def _coerce(name: str, value, hint):
    """Light type checks for YAML values: ints become floats where a float is expected, '1e-5' strings too."""
    if value is None:
        return None
    target = hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # `X | None` -> X
        base = [a for a in typing.get_args(hint) if a is not type(None)]
        target = base[0] if len(base) == 1 else hint
    if target is float:
        if isinstance(value, bool):
            raise ValueError(f"{name} expects a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} expects a number, got {value!r}") from None
    if target is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ValueError(f"{name} expects an integer, got {value!r}")
        return int(value)
    if target is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name} expects true/false, got {value!r}")
        return value
    if typing.get_origin(target) is Literal and isinstance(value, bool):
        # YAML 1.1 reads `mixed_precision=no` as False: map it back to the choice it spelled.
        spelled = [c for c in typing.get_args(target) if c in (("yes", "true", "on") if value else ("no", "false", "off"))]
        if len(spelled) == 1:
            return spelled[0]
    if target is str or typing.get_origin(target) is Literal:  # Literal: the choice is checked by validate()
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ValueError(f"{name} expects a string, got {value!r}")
        return str(value)
    if typing.get_origin(target) is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ValueError(f"{name} expects a list, got {value!r}")
        return [str(v) for v in value]
    return value
