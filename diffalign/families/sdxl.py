"""SDXL (and SD1.5) family: DDPM noising, epsilon / v-prediction targets, micro-conditioning.

Follows diffusers' `train_text_to_image_sdxl.py` and the Diffusion-DPO SDXL example:
x_t = scheduler.add_noise(x0, noise, t); target = noise (epsilon) or scheduler.get_velocity
(v_prediction); the UNet sees both CLIP encoders' penultimate hidden states (concatenated),
the pooled embedding of the second encoder, and `add_time_ids` = original size + crop
top-left + target size. SD1.5 has one encoder, its last hidden state, and no added ids.
"""

from __future__ import annotations

import torch

from diffalign.families import register_family
from diffalign.families.base import FamilyAdapter

PREDICTION_TYPES = ("epsilon", "v_prediction")


def ddpm_noisy_inputs(scheduler, x0, noise, timesteps, prediction_type: str = "epsilon"):
    """(x_t, target, weight): `scheduler.add_noise`, and `noise` or `scheduler.get_velocity` as the target.

    Computed in float32 and cast back: diffusers casts `alphas_cumprod` to the sample dtype first, and in bf16
    that rounds the schedule itself.
    """
    x0f, noisef = x0.float(), noise.float()
    x_t = scheduler.add_noise(x0f, noisef, timesteps).to(x0.dtype)
    target = noise if prediction_type == "epsilon" else scheduler.get_velocity(x0f, noisef, timesteps).to(x0.dtype)
    return x_t, target, torch.ones(x0.shape[0], device=x0.device, dtype=torch.float32)


@register_family("sdxl")
class SDXLFamily(FamilyAdapter):
    """Adapter for `StableDiffusionXLPipeline` components; with `text_encoder_2=None` it is SD1.5."""

    name = "sdxl"
    denoiser_attr = "unet"
    pipeline_class_name = "StableDiffusionXLPipeline"
    # The attention projections, as in the diffusers DPO / LoRA examples.
    lora_target_modules = ["to_k", "to_q", "to_v", "to_out.0"]
    options = ("prediction_type",)
    tiny_kinds = ("sdxl",)

    @classmethod
    def tiny_pipeline(cls, kind: str, seed: int):
        if kind not in cls.tiny_kinds:  # SD1.5 inherits this method, not the kind
            return super().tiny_pipeline(kind, seed)
        from diffalign.testing import tiny_sdxl_pipeline

        return tiny_sdxl_pipeline(seed)

    def __init__(
        self,
        unet,
        vae,
        text_encoder,
        tokenizer,
        scheduler,
        text_encoder_2=None,
        tokenizer_2=None,
        prediction_type: str | None = None,
    ):
        from diffusers import DDPMScheduler

        self.unet, self.vae = unet, vae
        self.text_encoder, self.text_encoder_2 = text_encoder, text_encoder_2
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        self.scheduler = scheduler  # the inference scheduler, kept for validation pipelines
        # Training noises with the DDPM forward process built from the same betas.
        self.noise_scheduler = DDPMScheduler.from_config(scheduler.config)
        self.prediction_type = prediction_type or self.noise_scheduler.config.prediction_type
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {list(PREDICTION_TYPES)}, got {self.prediction_type!r}")
        self.is_xl = text_encoder_2 is not None
        self.freeze_frozen_parts()
        if self.is_xl and getattr(unet.config, "addition_embed_type", None) != "text_time":
            raise ValueError("an SDXL UNet needs addition_embed_type='text_time' (micro-conditioning)")

    # --- text and images -----------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be a list of strings")
        if not self.is_xl:  # SD1.5: one encoder, last hidden state
            te = self.text_encoder
            tok = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt")
            mask = tok.attention_mask.to(te.device) if getattr(te.config, "use_attention_mask", False) else None
            return {"prompt_embeds": te(tok.input_ids.to(te.device), attention_mask=mask)[0]}
        embeds, pooled = [], None
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
            out = encoder(ids.to(encoder.device), output_hidden_states=True)
            if out[0].ndim == 2:  # CLIPTextModelWithProjection: text_embeds is the pooled embedding
                pooled = out[0]
            embeds.append(out.hidden_states[-2])
        if pooled is None:
            raise ValueError("text_encoder_2 must be a CLIPTextModelWithProjection (it gives the pooled embedding)")
        return {"prompt_embeds": torch.cat(embeds, dim=-1), "pooled_prompt_embeds": pooled}

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values must be (N, 3, H, W) in [-1, 1], got {tuple(pixel_values.shape)}")
        dist = self.vae.encode(pixel_values.to(device=self.vae.device, dtype=self.vae.dtype)).latent_dist
        return self.scale_latents(dist.sample(generator))

    def scale_latents(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.vae.config.scaling_factor

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    # --- noising -------------------------------------------------------------------------
    def sample_timesteps(self, batch_size: int, generator=None, device="cpu") -> torch.Tensor:
        n = self.noise_scheduler.config.num_train_timesteps
        return torch.randint(0, n, (batch_size,), generator=generator, device=device, dtype=torch.long)

    def noisy_inputs(self, x0, noise, timesteps):
        return ddpm_noisy_inputs(self.noise_scheduler, x0, noise, timesteps, self.prediction_type)

    def micro_conditioning(self, original_sizes, crop_top_lefts, target_size) -> dict[str, torch.Tensor] | None:
        """`time_ids` (N, 6) = (orig_h, orig_w, crop_top, crop_left, target_h, target_w) per sample."""
        if not self.is_xl:
            return None
        original_sizes, crop_top_lefts = torch.as_tensor(original_sizes), torch.as_tensor(crop_top_lefts)
        if original_sizes.shape[-1] != 2 or crop_top_lefts.shape != original_sizes.shape:
            raise ValueError(
                f"original_sizes and crop_top_lefts must both be (N, 2), got {tuple(original_sizes.shape)} and {tuple(crop_top_lefts.shape)}"
            )
        target = torch.tensor(list(target_size), dtype=original_sizes.dtype).expand_as(original_sizes)
        return {"time_ids": torch.cat([original_sizes, crop_top_lefts, target], dim=-1).float()}

    def predict(self, model, x_t, timesteps, text, micro=None, dtype=None, **extra) -> torch.Tensor:
        cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
        added = None
        if "pooled_prompt_embeds" in text:
            if micro is None or "time_ids" not in micro:
                raise ValueError("SDXL needs micro-conditioning time_ids (original size, crop, target size)")
            added = {"text_embeds": cast(text["pooled_prompt_embeds"]), "time_ids": cast(micro["time_ids"].to(x_t.device))}
        return model(
            cast(x_t),
            timesteps,
            encoder_hidden_states=cast(text["prompt_embeds"]),
            added_cond_kwargs=added,
            cross_attention_kwargs=extra.get("cross_attention_kwargs"),
            return_dict=False,
        )[0]

    # --- outputs -------------------------------------------------------------------------
    def save_lora(self, output_dir: str, lora_state_dict, adapter_metadata: dict | None = None) -> None:
        """`pytorch_lora_weights.safetensors` as diffusers writes it; `adapter_metadata` (the peft LoraConfig as a
        dict) keeps lora_alpha, so `load_lora_weights` restores the trained scale."""
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        cls = StableDiffusionXLPipeline if self.is_xl else StableDiffusionPipeline
        cls.save_lora_weights(output_dir, unet_lora_layers=lora_state_dict, safe_serialization=True,
                              unet_lora_adapter_metadata=adapter_metadata)

    def pipeline(self, denoiser=None):
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        unet = denoiser if denoiser is not None else self.unet
        if self.is_xl:
            pipe = StableDiffusionXLPipeline(
                vae=self.vae, text_encoder=self.text_encoder, text_encoder_2=self.text_encoder_2, tokenizer=self.tokenizer,
                tokenizer_2=self.tokenizer_2, unet=unet, scheduler=self.scheduler, image_encoder=None, feature_extractor=None,
            )
        else:
            pipe = StableDiffusionPipeline(
                vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=unet, scheduler=self.scheduler,
                safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
            )
        pipe.set_progress_bar_config(disable=True)
        return pipe


@register_family("sd15")
class SD15Family(SDXLFamily):
    """SD1.x / SD2.x: the SDXL adapter without the second encoder and micro-conditioning."""

    name = "sd15"
    pipeline_class_name = "StableDiffusionPipeline"
    tiny_kinds = ()

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler, prediction_type=None):
        super().__init__(unet, vae, text_encoder, tokenizer, scheduler, text_encoder_2=None, prediction_type=prediction_type)
