"""The trainer's conditioning hook: how PPD (or any other conditioning) plugs into `PreferenceTrainer`."""

from __future__ import annotations

import contextlib

import torch


class ConditioningHook:
    """How PPD plugs in (`diffalign.personalization.PPDConditioning` implements it). Defaults do nothing.

    - `policy_context(model, batch)`: around the policy forward (user conditioning on).
    - `reference_context(model, batch)`: around the reference forward when the reference IS the policy
      model (tuning lora / none: user attention off). Not entered for tuning=full's frozen copy.
    - `reference_copy(model)`: turns tuning=full's deep copy of the denoiser into the reference (PPD
      strips the user attention from it, so the reference is exactly the base).
    - `trainable_parameters()`: optimised with the denoiser's (user attention, encoder head). Those that
      are not the denoiser's own (the encoder head) are broadcast from the main process at start and
      their gradients all-reduced by hand, since accelerate does not wrap them.
    - `owned_state_keys(model)`: denoiser state-dict keys the hook saves itself (kept out of full saves).
    - `save(dir)` / `load(dir)`: the hook's weights, at checkpoints, at the end, and on resume.
    - `to(device)`: move the hook's own modules.
    """

    def policy_context(self, model, batch):
        return contextlib.nullcontext()

    def reference_context(self, model, batch):
        return contextlib.nullcontext()

    def reference_copy(self, model):
        return model

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return []

    def owned_state_keys(self, model) -> set[str]:
        return set()

    def save(self, output_dir: str) -> None:
        pass

    def load(self, input_dir: str) -> None:
        pass

    def to(self, device):
        return self
