"""What the personalized SDXL and SD3 pipelines share: turning `user_*` arguments into a conditioning block."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from diffalign.personalization import (
    UserEncoder,
    UserExample,
    has_user_attention,
    restore_user_processors,
    user_condition,
)


def _prompt_batch(args, kwargs) -> int:
    prompt = args[0] if args else kwargs.get("prompt")
    if isinstance(prompt, str):
        return 1
    if isinstance(prompt, (list, tuple)):
        return len(prompt)
    embeds = kwargs.get("prompt_embeds")
    if embeds is not None:
        return embeds.shape[0]
    raise ValueError("pass `prompt` (str or list) or `prompt_embeds` to a personalized pipeline")


def _per_image(embedding: torch.Tensor, prompts: int, per_prompt: int, what: str) -> torch.Tensor:
    """(T, D) / (1, T, D) / (prompts, T, D) -> one embedding per generated image."""
    emb = embedding if embedding.dim() == 3 else embedding.unsqueeze(0)
    if emb.shape[0] == 1:
        return emb.expand(prompts * per_prompt, *emb.shape[1:])
    if emb.shape[0] == prompts:
        # diffusers repeats each prompt's embeddings num_images_per_prompt times in a row.
        return emb.repeat_interleave(per_prompt, dim=0)
    raise ValueError(f"got {emb.shape[0]} {what} embeddings for {prompts} prompts; give one, or one per prompt")


class PersonalizedMixin:
    """Adds `user_embedding=`, `user_examples=`, `user_scale=` and `negative_user_embedding=` /
    `negative_user_examples=` to a diffusers pipeline's `__call__`."""

    user_encoder: UserEncoder | None = None

    def _denoiser(self):
        raise NotImplementedError

    def set_user_encoder(self, encoder: UserEncoder | None) -> None:
        """The encoder `user_examples=` goes through (kept as an attribute, not a saved component)."""
        self.user_encoder = encoder

    @torch.no_grad()
    def encode_user(self, user_examples) -> torch.Tensor:
        """One user's examples -> (T, D); a list of users' example lists -> (U, T, D)."""
        if self.user_encoder is None:
            raise ValueError("user_examples= needs a user encoder: call pipe.set_user_encoder(encoder) first")
        if len(user_examples) == 0:
            raise ValueError("user_examples is empty: give at least one UserExample")
        if isinstance(user_examples[0], UserExample):
            return self.user_encoder(user_examples)
        return self.user_encoder.encode_users(user_examples)

    def _user_block(self, args, kwargs, user_embedding, user_examples, user_scale, negative_user_embedding=None,
                    negative_user_examples=None):
        if user_embedding is not None and user_examples is not None:
            raise ValueError("pass either user_embedding= or user_examples=, not both")
        if negative_user_embedding is not None and negative_user_examples is not None:
            raise ValueError("pass either negative_user_embedding= or negative_user_examples=, not both")
        if user_examples is not None:
            user_embedding = self.encode_user(user_examples)
        if negative_user_examples is not None:
            negative_user_embedding = self.encode_user(negative_user_examples)
        if user_embedding is None:
            if user_scale is not None or negative_user_embedding is not None:
                raise ValueError("user_scale= / negative_user_*= were given without a user (user_embedding= or user_examples=)")
            return contextlib.nullcontext()
        model = self._denoiser()
        if not has_user_attention(model):
            raise ValueError(
                "this pipeline's denoiser has no user attention; call add_user_attention(...) or load_user_attention(...)"
            )
        prompts = _prompt_batch(args, kwargs)
        per_prompt = kwargs.get("num_images_per_prompt") or 1
        emb = _per_image(user_embedding, prompts, per_prompt, "user")
        negative = None if negative_user_embedding is None else _per_image(negative_user_embedding, prompts, per_prompt, "negative user")
        # (both pipelines default to a guidance scale > 1)
        if negative is not None and kwargs.get("guidance_scale", 2.0) <= 1.0:
            raise ValueError("negative_user_*= acts through classifier-free guidance: use guidance_scale > 1")
        # The pipelines concatenate [unconditional, conditional]; the unconditional half gets the null user,
        # or the negative user when one is given.
        return user_condition(model, emb, classifier_free_guidance=True, scale=user_scale, negative_user_embedding=negative)

    def _call_with_user(self, call, args, kwargs, user_embedding, user_examples, user_scale, negative_user_embedding=None,
                        negative_user_examples=None):
        block = self._user_block(args, kwargs, user_embedding, user_examples, user_scale, negative_user_embedding,
                                 negative_user_examples)
        with block:
            return call(*args, **kwargs)

    def enable_xformers_memory_efficient_attention(self, attention_op=None):
        super().enable_xformers_memory_efficient_attention(attention_op)
        if has_user_attention(self._denoiser()):
            restore_user_processors(self._denoiser())

    @classmethod
    def from_base(cls, pipe, user_encoder: UserEncoder | None = None):
        """Wrap an existing diffusers pipeline's components (shared, not copied)."""
        new = cls(**pipe.components)
        new.set_user_encoder(user_encoder)
        if hasattr(pipe, "_progress_bar_config"):
            new.set_progress_bar_config(**pipe._progress_bar_config)
        return new


UserExamples = Sequence[UserExample] | Sequence[Sequence[UserExample]]
