"""SD3 family: rectified-flow matching, as in diffusers' `train_dreambooth_sd3.py`.

x_t = (1 - sigma) x0 + sigma * noise, target = noise - x0. The timestep is drawn by sampling
u from a density (logit-normal by default), indexing the shifted training schedule with
int(u * 1000), and sigma = t / num_train_timesteps. An optional loss weighting
(sigma_sqrt / cosmap) becomes the per-sample weight of the error.
"""

from __future__ import annotations

import torch

from diffalign.families import register_family
from diffalign.families.base import FamilyAdapter

TIMESTEP_SAMPLING = ("logit_normal", "mode", "uniform")
LOSS_WEIGHTING = ("none", "sigma_sqrt", "cosmap")


def flow_matching_weight(sigmas: torch.Tensor, weighting: str = "none") -> torch.Tensor:
    """Per-sample loss weight from SD3's schemes (diffusers' `compute_loss_weighting_for_sd3`)."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    if weighting not in LOSS_WEIGHTING:
        raise ValueError(f"loss_weighting must be one of {LOSS_WEIGHTING}, got {weighting!r}")
    return compute_loss_weighting_for_sd3(weighting, sigmas.float()).float()


def flow_matching_target(x0, noise, sigmas, weighting: str = "none"):
    """(x_t, target, weight) for rectified flow: x_t = (1 - s) x0 + s noise, target = noise - x0."""
    s = sigmas.float().view(-1, *([1] * (x0.ndim - 1)))
    x_t = ((1.0 - s) * x0.float() + s * noise.float()).to(x0.dtype)
    target = noise - x0
    return x_t, target, flow_matching_weight(sigmas, weighting).to(x0.device)


@register_family("sd3")
class SD3Family(FamilyAdapter):
    name = "sd3"
    denoiser_attr = "transformer"
    pipeline_class_name = "StableDiffusion3Pipeline"
    # Joint-attention projections of both streams, as in diffusers' SD3 LoRA example.
    lora_target_modules = [
        "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
        "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
    ]
    options = ("timestep_sampling", "logit_mean", "logit_std", "mode_scale", "loss_weighting", "max_sequence_length")
    tiny_kinds = ("sd3", "sd3-t5")  # sd3: without T5 (zeros in its place); sd3-t5: with a tiny T5

    @classmethod
    def tiny_pipeline(cls, kind: str, seed: int):
        from diffalign.testing import tiny_sd3_pipeline

        return tiny_sd3_pipeline(seed, with_t5=kind == "sd3-t5")

    def __init__(
        self,
        transformer,
        vae,
        text_encoder,
        text_encoder_2,
        tokenizer,
        tokenizer_2,
        scheduler,
        text_encoder_3=None,
        tokenizer_3=None,
        timestep_sampling: str = "logit_normal",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
        loss_weighting: str = "none",
        max_sequence_length: int = 77,
    ):
        from diffusers import FlowMatchEulerDiscreteScheduler

        if timestep_sampling not in TIMESTEP_SAMPLING:
            raise ValueError(f"timestep_sampling must be one of {TIMESTEP_SAMPLING}, got {timestep_sampling!r}")
        if loss_weighting not in LOSS_WEIGHTING:
            raise ValueError(f"loss_weighting must be one of {LOSS_WEIGHTING}, got {loss_weighting!r}")
        self.transformer, self.vae, self.scheduler = transformer, vae, scheduler
        self.text_encoder, self.text_encoder_2, self.text_encoder_3 = text_encoder, text_encoder_2, text_encoder_3
        self.tokenizer, self.tokenizer_2, self.tokenizer_3 = tokenizer, tokenizer_2, tokenizer_3
        # A fresh copy: its timesteps are the full shifted training schedule (sigma * 1000).
        self.noise_scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
        self.timestep_sampling, self.loss_weighting = timestep_sampling, loss_weighting
        self.logit_mean, self.logit_std, self.mode_scale = logit_mean, logit_std, mode_scale
        self.max_sequence_length = max_sequence_length
        self.freeze_frozen_parts()

    # --- text and images -----------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be a list of strings")
        clip_embeds, pooled = [], []
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
            out = encoder(ids.to(encoder.device), output_hidden_states=True)
            pooled.append(out[0])
            clip_embeds.append(out.hidden_states[-2])
        clip = torch.cat(clip_embeds, dim=-1)
        joint_dim = self.transformer.config.joint_attention_dim
        if self.text_encoder_3 is None:  # SD3 runs without T5: zeros in its place, as the pipeline does
            t5 = torch.zeros(len(prompts), self.max_sequence_length, joint_dim, device=clip.device, dtype=clip.dtype)
        else:
            ids = self.tokenizer_3(
                prompts, padding="max_length", max_length=self.max_sequence_length, truncation=True,
                add_special_tokens=True, return_tensors="pt",
            ).input_ids
            t5 = self.text_encoder_3(ids.to(self.text_encoder_3.device))[0].to(clip.dtype)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {"prompt_embeds": torch.cat([clip, t5], dim=-2), "pooled_prompt_embeds": torch.cat(pooled, dim=-1)}

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values must be (N, 3, H, W) in [-1, 1], got {tuple(pixel_values.shape)}")
        dist = self.vae.encode(pixel_values.to(device=self.vae.device, dtype=self.vae.dtype)).latent_dist
        return self.scale_latents(dist.sample(generator))

    def scale_latents(self, z: torch.Tensor) -> torch.Tensor:
        cfg = self.vae.config
        return (z - cfg.shift_factor) * cfg.scaling_factor

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    # --- noising -------------------------------------------------------------------------
    def sample_u(self, batch_size: int, generator=None, device="cpu") -> torch.Tensor:
        from diffusers.training_utils import compute_density_for_timestep_sampling

        return compute_density_for_timestep_sampling(self.timestep_sampling, batch_size, self.logit_mean, self.logit_std,
                                                     self.mode_scale, device=device, generator=generator)

    def sample_timesteps(self, batch_size: int, generator=None, device="cpu") -> torch.Tensor:
        u = self.sample_u(batch_size, generator, device)
        n = self.noise_scheduler.config.num_train_timesteps
        indices = (u * n).long().clamp(0, n - 1)
        return self.noise_scheduler.timesteps.to(device)[indices]

    def sigmas_from_timesteps(self, timesteps: torch.Tensor) -> torch.Tensor:
        return timesteps.float() / self.noise_scheduler.config.num_train_timesteps

    def noisy_inputs(self, x0, noise, timesteps):
        return flow_matching_target(x0, noise, self.sigmas_from_timesteps(timesteps), self.loss_weighting)

    def predict(self, model, x_t, timesteps, text, micro=None, dtype=None, **extra) -> torch.Tensor:
        cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
        return model(
            hidden_states=cast(x_t),
            timestep=timesteps,
            encoder_hidden_states=cast(text["prompt_embeds"]),
            pooled_projections=cast(text["pooled_prompt_embeds"]),
            joint_attention_kwargs=extra.get("joint_attention_kwargs"),
            return_dict=False,
        )[0]

    # --- outputs -------------------------------------------------------------------------
    def save_lora(self, output_dir: str, lora_state_dict, adapter_metadata: dict | None = None) -> None:
        """`pytorch_lora_weights.safetensors` as diffusers writes it, with the peft LoraConfig (lora_alpha) as metadata."""
        from diffusers import StableDiffusion3Pipeline

        StableDiffusion3Pipeline.save_lora_weights(output_dir, transformer_lora_layers=lora_state_dict, safe_serialization=True,
                                                   transformer_lora_adapter_metadata=adapter_metadata)

    def pipeline(self, denoiser=None):
        from diffusers import StableDiffusion3Pipeline

        pipe = StableDiffusion3Pipeline(
            transformer=denoiser if denoiser is not None else self.transformer, vae=self.vae, scheduler=self.scheduler,
            text_encoder=self.text_encoder, text_encoder_2=self.text_encoder_2, text_encoder_3=self.text_encoder_3,
            tokenizer=self.tokenizer, tokenizer_2=self.tokenizer_2, tokenizer_3=self.tokenizer_3,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe
