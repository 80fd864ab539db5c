"""Personalized SDXL and SD3 pipelines: thin subclasses of the diffusers ones."""

from diffalign.personalization.encoder import interpolate_users
from diffalign.pipelines.sd3 import PersonalizedStableDiffusion3Pipeline
from diffalign.pipelines.sdxl import PersonalizedStableDiffusionXLPipeline

__all__ = ["PersonalizedStableDiffusion3Pipeline", "PersonalizedStableDiffusionXLPipeline", "interpolate_users"]
