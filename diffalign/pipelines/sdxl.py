"""`PersonalizedStableDiffusionXLPipeline`: SDXL conditioned on a user embedding."""

from __future__ import annotations

from diffusers import StableDiffusionXLPipeline

from diffalign.pipelines._personalized import PersonalizedMixin


class PersonalizedStableDiffusionXLPipeline(PersonalizedMixin, StableDiffusionXLPipeline):
    """`StableDiffusionXLPipeline` plus `user_embedding=`, `user_examples=`, `user_scale=` and a negative user.

    The UNet needs user attention (`add_user_attention(pipe.unet, ...)` or `load_user_attention`).
    With classifier-free guidance the unconditional branch gets the null user (the base attention), or the
    user given as `negative_user_embedding=` / `negative_user_examples=` (guidance then moves away from it).
    Without a user the pipeline is exactly the base pipeline.
    """

    def _denoiser(self):
        return self.unet

    def __call__(self, *args, user_embedding=None, user_examples=None, user_scale=None, negative_user_embedding=None,
                 negative_user_examples=None, **kwargs):
        return self._call_with_user(super().__call__, args, kwargs, user_embedding, user_examples, user_scale,
                                    negative_user_embedding, negative_user_examples)
