"""The synthetic ranked-preference generator (Syn-Pic style): k images per prompt from several models,
scored by n reward models and ranked by win counts. See docs/synpic.md for the output schema."""

from diffalign.synth.aggregate import ranks_from_phi, win_count_ranks, win_count_scores
from diffalign.synth.prompts import Prompt, check_prompts, find_bad_prompts, load_prompts
from diffalign.synth.runner import SynthConfig, SynthStats, config_from_dict, run_synth
from diffalign.synth.schema import (
    PICKAPIC_SCHEMA,
    SYNPIC_SCHEMA,
    export_pairwise,
    read_synpic,
    shard_name,
    validate_synpic_table,
)
from diffalign.synth.specs import GeneratorSpec, RewardSpec, generate_images, load_pipeline

__all__ = [
    "PICKAPIC_SCHEMA",
    "SYNPIC_SCHEMA",
    "GeneratorSpec",
    "Prompt",
    "RewardSpec",
    "SynthConfig",
    "SynthStats",
    "check_prompts",
    "config_from_dict",
    "export_pairwise",
    "find_bad_prompts",
    "generate_images",
    "load_pipeline",
    "load_prompts",
    "ranks_from_phi",
    "read_synpic",
    "run_synth",
    "shard_name",
    "validate_synpic_table",
    "win_count_ranks",
    "win_count_scores",
]
