"""`PersonalizedStableDiffusion3Pipeline`: SD3 conditioned on a user embedding."""

from __future__ import annotations

from diffusers import StableDiffusion3Pipeline

from diffalign.pipelines._personalized import PersonalizedMixin


class PersonalizedStableDiffusion3Pipeline(PersonalizedMixin, StableDiffusion3Pipeline):
    """`StableDiffusion3Pipeline` plus `user_embedding=`, `user_examples=`, `user_scale=` and a negative user.

    The transformer needs user attention (`add_user_attention(pipe.transformer, ...)`). The user branch
    adds to the image tokens of every joint-attention block. With classifier-free guidance the
    unconditional branch gets the null user, or the user given as `negative_user_embedding=` /
    `negative_user_examples=`; skip-layer-guidance passes (conditional batch only) keep it.
    """

    def _denoiser(self):
        return self.transformer

    def __call__(self, *args, user_embedding=None, user_examples=None, user_scale=None, negative_user_embedding=None,
                 negative_user_examples=None, **kwargs):
        return self._call_with_user(super().__call__, args, kwargs, user_embedding, user_examples, user_scale,
                                    negative_user_embedding, negative_user_examples)
