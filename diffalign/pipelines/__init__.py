"""Personalized SDXL and SD3 pipelines: thin subclasses of the diffusers ones."""

from diffalign.personalization.encoder import interpolate_users
from diffalign.pipelines.sd3 import PersonalizedStableDiffusion3Pipeline
from diffalign.pipelines.sdxl import PersonalizedStableDiffusionXLPipeline

# Model family (diffalign.families) -> its personalized pipeline class.
PERSONALIZED_PIPELINES = {"sdxl": PersonalizedStableDiffusionXLPipeline, "sd3": PersonalizedStableDiffusion3Pipeline}


def personalized_pipeline_class(family: str) -> type:
    if family not in PERSONALIZED_PIPELINES:
        raise ValueError(f"no personalized pipeline for model family {family!r}; available: {sorted(PERSONALIZED_PIPELINES)}")
    return PERSONALIZED_PIPELINES[family]


__all__ = ["PERSONALIZED_PIPELINES", "PersonalizedStableDiffusion3Pipeline", "PersonalizedStableDiffusionXLPipeline",
           "interpolate_users", "personalized_pipeline_class"]
