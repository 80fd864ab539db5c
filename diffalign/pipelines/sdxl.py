"""`PersonalizedStableDiffusionXLPipeline`: SDXL conditioned on a user embedding."""

from __future__ import annotations

from diffusers import StableDiffusionXLPipeline

from diffalign.pipelines._personalized import PersonalizedMixin


class PersonalizedStableDiffusionXLPipeline(PersonalizedMixin, StableDiffusionXLPipeline):
    """`StableDiffusionXLPipeline` plus `user_embedding=`, `user_examples=` and `user_scale=`.

    The UNet needs user attention (`add_user_attention(pipe.unet, ...)` or `load_user_attention`).
    With classifier-free guidance the unconditional branch gets the null user (the base attention).
    Without a user the pipeline is exactly the base pipeline.
    """

    def _denoiser(self):
        return self.unet

    def __call__(self, *args, user_embedding=None, user_examples=None, user_scale=None, **kwargs):
        return self._call_with_user(super().__call__, args, kwargs, user_embedding, user_examples, user_scale)
