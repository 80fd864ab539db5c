"""Personalized preference fine-tuning (PPD): user encoders and user cross-attention.

See docs/personalization.md for the method, the API and a real-model recipe.
"""

from diffalign.personalization.attention import (
    UserAttentionConfig,
    UserAttnProcessor,
    add_user_attention,
    has_user_attention,
    load_user_attention,
    remove_user_attention,
    restore_user_processors,
    save_user_attention,
    set_user_scale,
    user_attention_disabled,
    user_attention_parameters,
    user_attention_state_dict,
    user_condition,
)
from diffalign.personalization.encoder import (
    USER_ENCODERS,
    ClipUserEncoder,
    SetPooling,
    UserEmbeddingCache,
    UserEncoder,
    UserExample,
    VLMUserEncoder,
    create_user_encoder,
    example_digest,
    interpolate_users,
    tiny_clip_user_encoder,
)
from diffalign.personalization.training import (
    TOY_REWARDS,
    PPDConditioning,
    SyntheticUser,
    UserSplit,
    contexts_from_dataset,
    split_users,
)

__all__ = [
    "PPDConditioning",
    "SyntheticUser",
    "TOY_REWARDS",
    "UserSplit",
    "contexts_from_dataset",
    "split_users",
    "USER_ENCODERS",
    "ClipUserEncoder",
    "SetPooling",
    "UserAttentionConfig",
    "UserAttnProcessor",
    "UserEmbeddingCache",
    "UserEncoder",
    "UserExample",
    "VLMUserEncoder",
    "add_user_attention",
    "create_user_encoder",
    "example_digest",
    "has_user_attention",
    "interpolate_users",
    "load_user_attention",
    "remove_user_attention",
    "restore_user_processors",
    "save_user_attention",
    "set_user_scale",
    "tiny_clip_user_encoder",
    "user_attention_disabled",
    "user_attention_parameters",
    "user_attention_state_dict",
    "user_condition",
]
