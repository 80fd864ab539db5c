"""What every family adapter shares: group-shared noise and timesteps, and prompt dropout.

A batch holds B groups of k samples. Diffusion-DPO compares the winner and loser of a pair on
the SAME noised input (same noise, same timestep), so the noise and the timestep are drawn
once per group and repeated over its k members. A family only says how x_t, the target and
the per-sample weight follow from (x0, noise, t) and how its denoiser is called.
"""

from __future__ import annotations

import torch


class FamilyAdapter:
    """Base class. Subclasses set `name`, `denoiser_attr` and implement the abstract methods."""

    name: str = ""
    denoiser_attr: str = ""  # "unet" or "transformer"
    lora_target_modules: list[str] = []
    options: tuple[str, ...] = ()  # the family's keyword options; the other constructor arguments are components
    tiny_kinds: tuple[str, ...] = ()  # the offline `tiny:<kind>` models this family builds (`tiny_pipeline`)

    @classmethod
    def tiny_pipeline(cls, kind: str, seed: int):
        """An offline pipeline with tiny random weights (`tiny:<kind>[:seed]`), for tests and smoke runs."""
        raise NotImplementedError(f"family {cls.name!r} builds no tiny pipeline")

    @classmethod
    def from_pipeline(cls, pipe, **options):
        """The adapter for a diffusers pipeline: the components it uses, plus family options (an option of
        another family is an error that lists this family's)."""
        return cls.from_components(pipe.components, **options)

    @classmethod
    def from_components(cls, components: dict, **options):
        """As `from_pipeline`, from a pipeline's `components` dict."""
        import inspect

        unknown = sorted(set(options) - set(cls.options))
        if unknown:
            raise ValueError(f"option(s) {unknown} do not apply to model family {cls.name!r}; "
                             f"its options: {list(cls.options) or 'none'}")
        wanted = set(inspect.signature(cls.__init__).parameters) - {"self"} - set(cls.options)
        # Components the adapter does not use (safety checker, IP-Adapter image encoder) stay with the pipeline.
        return cls(**{k: v for k, v in components.items() if k in wanted}, **options)

    # --- implemented by each family -------------------------------------------------------
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def encode_images(self, pixel_values: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError

    def scale_latents(self, z: torch.Tensor) -> torch.Tensor:
        """VAE posterior sample -> the denoiser's latent space (the family's shift and scaling)."""
        raise NotImplementedError

    def encode_image_groups(self, pixel_values: torch.Tensor, generators: list) -> torch.Tensor:
        """(b, k, 3, H, W) -> (b, k, C, h, w) in one VAE pass; group i's posterior sample is drawn from
        generators[i] exactly as `encode_images(pixel_values[i], generators[i])` draws it."""
        from diffusers.utils.torch_utils import randn_tensor

        b, k = pixel_values.shape[:2]
        dist = self.vae.encode(pixel_values.flatten(0, 1).to(device=self.vae.device, dtype=self.vae.dtype)).latent_dist
        mean, std = dist.mean.unflatten(0, (b, k)), dist.std.unflatten(0, (b, k))
        draws = [randn_tensor(mean[i].shape, generator=g, device=mean.device, dtype=mean.dtype) for i, g in enumerate(generators)]
        return self.scale_latents(mean + std * torch.stack(draws))

    def sample_timesteps(self, batch_size: int, generator: torch.Generator | None = None, device="cpu") -> torch.Tensor:
        raise NotImplementedError

    def noisy_inputs(self, x0, noise, timesteps):
        raise NotImplementedError

    def micro_conditioning(self, original_sizes, crop_top_lefts, target_size) -> dict[str, torch.Tensor] | None:
        return None

    def predict(self, model, x_t, timesteps, text, micro=None, **extra) -> torch.Tensor:
        raise NotImplementedError

    def save_lora(self, output_dir: str, lora_state_dict: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def load_lora(self, model: torch.nn.Module, path: str, adapter_name: str, **kwargs) -> None:
        """A diffusers-format LoRA (`save_lora`'s file, or a Hub LoRA) into `model` as adapter `adapter_name`, with the
        rank and alpha of its metadata."""
        kwargs.setdefault("weight_name", "pytorch_lora_weights.safetensors")  # what the pipelines look for first
        model.load_lora_adapter(path, prefix=self.denoiser_attr, adapter_name=adapter_name, use_safetensors=True, **kwargs)

    def pipeline(self, denoiser=None):
        """A diffusers pipeline built from this adapter's components (for validation images)."""
        raise NotImplementedError

    # --- shared ---------------------------------------------------------------------------
    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self, self.denoiser_attr)

    @denoiser.setter
    def denoiser(self, module: torch.nn.Module) -> None:
        setattr(self, self.denoiser_attr, module)

    def text_encoders(self) -> list[torch.nn.Module]:
        return [m for m in (getattr(self, n, None) for n in ("text_encoder", "text_encoder_2", "text_encoder_3")) if m is not None]

    def freeze_frozen_parts(self) -> None:
        """VAE and text encoders are never trained: eval mode (no dropout) and no grads."""
        for module in [self.vae, *self.text_encoders()]:
            if module is not None:
                module.eval().requires_grad_(False)

    def group_noise_and_timesteps(self, latents: torch.Tensor, generator: torch.Generator | None = None):
        """Noise (B, k, C, h, w) and timesteps (B, k), identical within each group of k.

        The noise is drawn on the generator's device (CPU by default) so a seeded run gives the
        same numbers on any accelerator, then moved to the latents' device.
        """
        if latents.ndim != 5:
            raise ValueError(f"latents must have shape (B, k, C, h, w), got {tuple(latents.shape)}")
        b, k = latents.shape[:2]
        gen_device = generator.device if generator is not None else torch.device("cpu")
        noise = torch.randn((b, 1, *latents.shape[2:]), generator=generator, device=gen_device, dtype=torch.float32)
        noise = noise.to(device=latents.device, dtype=latents.dtype).expand(-1, k, -1, -1, -1)
        timesteps = self.sample_timesteps(b, generator=generator, device=gen_device).to(latents.device)
        return noise, timesteps[:, None].expand(b, k)

    def training_inputs(
        self,
        latents: torch.Tensor,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
        timesteps: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Flatten B groups of k latents into N = B*k denoiser inputs with group-shared noise and t.

        Returns x_t (N, C, h, w), timesteps (N,), target (N, C, h, w) and weight (N,).
        """
        if noise is None or timesteps is None:
            noise, timesteps = self.group_noise_and_timesteps(latents, generator)
        flat = latents.flatten(0, 1)
        x_t, target, weight = self.noisy_inputs(flat, noise.flatten(0, 1), timesteps.flatten(0, 1))
        return {"x_t": x_t, "timesteps": timesteps.flatten(0, 1), "target": target, "weight": weight}


def drop_prompts(
    text: dict[str, torch.Tensor], null_text: dict[str, torch.Tensor], drop_mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Replace the rows of `text` where `drop_mask` is True by the empty-prompt encoding.

    This is prompt dropout for classifier-free guidance, done on embeddings so it also works
    with cached text features. `null_text` tensors have a leading dim of 1.
    """
    out = {}
    for key, value in text.items():
        if key not in null_text:
            raise KeyError(f"null_text lacks '{key}'; encode the empty prompt with the same adapter")
        mask = drop_mask.to(value.device).view(-1, *([1] * (value.ndim - 1)))
        out[key] = torch.where(mask, null_text[key].to(device=value.device, dtype=value.dtype), value)
    return out


def repeat_groups(text: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Repeat per-group tensors (B, ...) to per-sample tensors (B*k, ...), group-major."""
    return {key: value.repeat_interleave(k, dim=0) for key, value in text.items()}
