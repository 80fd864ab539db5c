"""User cross-attention: decoupled, IP-Adapter-style attention on user tokens.

For every targeted attention layer the output becomes

    out = base_attention(x, text) + scale * W_out Attn(Q(x), W_k' u, W_v' u)

where `u` are the user tokens, `Q` and `W_out` are the layer's own query and output weights, and
`W_k'`, `W_v'` are new. `W_v'` starts at zero, so a freshly adapted model is exactly the base model.

Targets:
- SDXL `UNet2DConditionModel`: every text cross-attention (`attn2`) layer.
- SD3 `SD3Transformer2DModel`: the joint attention of every `JointTransformerBlock` (`block.attn`);
  the user branch adds to the image-token output only.

How the user reaches the layers. A `user_condition(model, embedding)` context manager stores the
encoder output on the model; a forward pre-hook projects it (`model.user_projection`) into tokens once
per forward and the processors read them. Nothing travels through `cross_attention_kwargs`, so the
text self-attention processors never see unknown keywords, and the same code serves a plain forward,
the trainer and the pipelines. `user_attention_disabled(model)` switches the branch off (the DPO
reference pass: LoRA's `disable_adapters()` does not touch it).

Where the weights live. `W_k'`/`W_v'` are a submodule of the attention layer itself
(`attn.user_attention`), not of the processor. The processor is a thin wrapper around whatever base
processor the layer had (SDPA, xformers, NPU...), so replacing processors -- e.g.
`enable_xformers_memory_efficient_attention()` -- cannot drop the weights; the pre-hook re-wraps the
new base processor on the next forward (`restore_user_processors` does it at once).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

STATE_ATTR = "_diffalign_user_state"
PROJECTION_ATTR = "user_projection"
LAYER_ATTR = "user_attention"
METADATA_KEY = "diffalign_user_attention"


@dataclass
class UserAttentionConfig:
    """What `add_user_attention` built; stored in the safetensors metadata so loading can check it."""

    family: str  # "sdxl" (UNet attn2 layers) or "sd3" (joint-attention blocks)
    encoder_dim: int  # width of the user encoder's output tokens
    token_dim: int  # width of the projected user tokens (input of W_k', W_v')
    scale: float = 1.0


class UserTokenProjection(nn.Module):
    """Projects the encoder's (num_tokens, encoder_dim) output to the model's user tokens."""

    def __init__(self, encoder_dim: int, token_dim: int):
        super().__init__()
        # Names chosen so peft LoRA target lists ("to_k", "proj", "linear", ...) never match them.
        self.user_fc = nn.Linear(encoder_dim, token_dim)
        self.user_norm = nn.LayerNorm(token_dim)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.user_norm(self.user_fc(embedding))


class UserKV(nn.Module):
    """W_k' and W_v' of one attention layer. W_v' is zero-initialised: the branch adds exactly 0 at step 0."""

    def __init__(self, token_dim: int, inner_dim: int, scale: float = 1.0):
        super().__init__()
        self.user_key = nn.Linear(token_dim, inner_dim, bias=False)
        self.user_value = nn.Linear(token_dim, inner_dim, bias=False)
        nn.init.zeros_(self.user_value.weight)
        self.scale = float(scale)


class _UserState:
    """Per-model conditioning state shared by the pre-hook and the processors."""

    def __init__(self, config: UserAttentionConfig, layers: list):
        self.config = config
        self.layers = layers  # the Attention modules that carry a user branch
        self.embedding: torch.Tensor | None = None  # (Bu, T, encoder_dim)
        self.row_weight: torch.Tensor | None = None  # (Bu,) 0 = null user for that row
        # (Bu, T, encoder_dim) user of the unconditional half under classifier-free guidance; None = null user
        self.negative_embedding: torch.Tensor | None = None
        self.classifier_free_guidance = False
        self.scale_override: float | None = None
        self.enabled = True
        # Set by the pre-hook at each forward. Kept after the forward so that activation
        # checkpointing recomputes the same branch during backward.
        self.tokens: torch.Tensor | None = None
        self.weight: torch.Tensor | None = None
        self.hook = None


class UserAttnProcessor:
    """Wraps a layer's base processor and adds the user branch to its (image-token) output."""

    def __init__(self, base, state: _UserState, joint: bool):
        self.base = base
        self.state = state
        self.joint = joint

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        out = self.base(
            attn, hidden_states, encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask, **kwargs
        )
        state = self.state
        if not state.enabled or state.tokens is None:
            return out
        if state.tokens.shape[0] != hidden_states.shape[0]:
            raise ValueError(
                f"user tokens have batch {state.tokens.shape[0]} but the attention layer sees batch "
                f"{hidden_states.shape[0]}; the forward that set them had another batch size"
            )
        scale = state.scale_override if state.scale_override is not None else attn.user_attention.scale
        extra = _user_branch(attn, hidden_states, state.tokens)
        extra = extra * (scale * state.weight.to(extra.dtype))[:, None, None]
        if self.joint:
            if isinstance(out, tuple):
                return (out[0] + extra.to(out[0].dtype),) + tuple(out[1:])
            return out + extra.to(out.dtype)
        # A residual, if any, is already inside `out`; the branch adds before the output rescaling.
        return out + (extra / attn.rescale_output_factor).to(out.dtype)


def _user_branch(attn, hidden_states: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """W_out Attn(Q(x), W_k' u, W_v' u) for one layer; (B, N, out_dim)."""
    batch = hidden_states.shape[0]
    heads = attn.heads
    query = attn.to_q(hidden_states)
    head_dim = query.shape[-1] // heads
    query = query.view(batch, -1, heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    user = attn.user_attention
    tokens = tokens.to(dtype=user.user_key.weight.dtype)
    # The user weights may be kept in float32 while the base runs in bf16/fp16: meet at the query's dtype.
    key = user.user_key(tokens).to(query.dtype).view(batch, -1, heads, head_dim).transpose(1, 2)
    value = user.user_value(tokens).to(query.dtype).view(batch, -1, heads, head_dim).transpose(1, 2)
    branch = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
    branch = branch.transpose(1, 2).reshape(batch, -1, heads * head_dim).to(query.dtype)
    # The layer's output projection is linear: to_out(h + b) = to_out(h) + W_out b. Its bias is already
    # in the base output. (LoRA on to_out.0 is not applied to the user branch: W_out is the base weight.)
    branch = F.linear(branch, attn.to_out[0].weight)
    return attn.to_out[1](branch)


# ----------------------------------------------------------------------------------------------- install


def _family_of(model) -> str:
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel

    if isinstance(model, UNet2DConditionModel):
        return "sdxl"
    if isinstance(model, SD3Transformer2DModel):
        return "sd3"
    raise TypeError(
        f"add_user_attention supports UNet2DConditionModel (SDXL) and SD3Transformer2DModel (SD3), "
        f"got {type(model).__name__}; pass pipe.unet or pipe.transformer"
    )


def _target_layers(model, family: str) -> list[tuple[str, nn.Module]]:
    from diffusers.models.attention_processor import Attention

    if family == "sdxl":
        layers = [
            (name, m)
            for name, m in model.named_modules()
            if name.endswith("attn2") and isinstance(m, Attention) and m.is_cross_attention
        ]
    else:
        layers = [(f"transformer_blocks.{i}.attn", block.attn) for i, block in enumerate(model.transformer_blocks)]
    if not layers:
        raise ValueError(f"found no attention layer to adapt in this {family} model")
    for name, attn in layers:
        if attn.group_norm is not None or attn.spatial_norm is not None:
            raise ValueError(f"attention layer {name} uses group/spatial norm, which the user branch does not support")
    return layers


def _default_token_dim(model, family: str) -> int:
    if family == "sdxl":
        dim = model.config.cross_attention_dim
        if not isinstance(dim, int):
            raise ValueError("this UNet has per-block cross_attention_dim; pass token_dim= explicitly")
        return dim
    return model.config.caption_projection_dim


def has_user_attention(model) -> bool:
    return getattr(model, STATE_ATTR, None) is not None


def _state(model) -> _UserState:
    state = getattr(model, STATE_ATTR, None)
    if state is None:
        raise ValueError("this model has no user attention; call add_user_attention(model, encoder_dim=...) first")
    return state


def add_user_attention(model, encoder_dim: int, token_dim: int | None = None, scale: float = 1.0, seed: int | None = None):
    """Install user cross-attention on an SDXL UNet or SD3 transformer, in place; returns the model.

    encoder_dim: width of the user encoder's output tokens. token_dim: width of the projected user
    tokens (default: the model's text-token width). New parameters are created trainable, on the
    model's device and dtype; freeze the base yourself (`model.requires_grad_(False)` before calling).
    """
    if has_user_attention(model):
        raise ValueError("user attention is already installed; call remove_user_attention(model) first")
    if encoder_dim <= 0:
        raise ValueError(f"encoder_dim must be positive, got {encoder_dim}")
    family = _family_of(model)
    token_dim = token_dim or _default_token_dim(model, family)
    config = UserAttentionConfig(family=family, encoder_dim=int(encoder_dim), token_dim=int(token_dim), scale=float(scale))
    ref = next(model.parameters())
    generator_state = None
    if seed is not None:
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
    try:
        layers = _target_layers(model, family)
        for _name, attn in layers:
            inner_dim = attn.to_q.out_features
            attn.add_module(LAYER_ATTR, UserKV(token_dim, inner_dim, scale).to(device=ref.device, dtype=ref.dtype))
        model.add_module(PROJECTION_ATTR, UserTokenProjection(encoder_dim, token_dim).to(device=ref.device, dtype=ref.dtype))
    finally:
        if generator_state is not None:
            torch.random.set_rng_state(generator_state)
    state = _UserState(config, [attn for _n, attn in layers])
    setattr(model, STATE_ATTR, state)
    for attn in state.layers:
        attn.set_processor(UserAttnProcessor(attn.processor, state, joint=family == "sd3"))
    state.hook = model.register_forward_pre_hook(_pre_forward, with_kwargs=True)
    return model


def remove_user_attention(model):
    """Remove the user branch, its weights and the hook; the layers keep their current base processor."""
    state = _state(model)
    for attn in state.layers:
        proc = attn.processor
        if isinstance(proc, UserAttnProcessor):
            attn.set_processor(proc.base)
        del attn._modules[LAYER_ATTR]
    del model._modules[PROJECTION_ATTR]
    state.hook.remove()
    delattr(model, STATE_ATTR)
    return model


def set_user_scale(model, scale: float) -> None:
    """Set the user-branch scale of every adapted layer (0 switches the branch's effect off)."""
    state = _state(model)
    for attn in state.layers:
        attn.user_attention.scale = float(scale)
    state.config.scale = float(scale)


def user_attention_parameters(model) -> list[nn.Parameter]:
    """The parameters add_user_attention created (projection + every layer's W_k', W_v')."""
    state = _state(model)
    params = list(getattr(model, PROJECTION_ATTR).parameters())
    for attn in state.layers:
        params += list(attn.user_attention.parameters())
    return params


def restore_user_processors(model) -> int:
    """Re-wrap layers whose processor was replaced (e.g. by enable_xformers_memory_efficient_attention).

    Returns how many layers were re-wrapped. The weights are never lost: they live on the layer.
    """
    state = _state(model)
    joint = state.config.family == "sd3"
    restored = 0
    for attn in state.layers:
        proc = attn.processor
        if isinstance(proc, UserAttnProcessor):
            continue
        base = proc
        if joint:
            from diffusers.models.attention_processor import XFormersAttnProcessor, XFormersJointAttnProcessor

            # Our wrapper is not a JointAttnProcessor, so the xformers switch picks the plain (non-joint)
            # xformers processor, which would ignore the text stream: use the joint variant instead.
            if type(proc) is XFormersAttnProcessor:
                base = XFormersJointAttnProcessor(attention_op=proc.attention_op)
        attn.set_processor(UserAttnProcessor(base, state, joint=joint))
        restored += 1
    if restored:
        logger.info("re-installed user attention around %d replaced attention processors", restored)
    return restored


def _batch_of(args, kwargs) -> int:
    sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
    if sample is None:
        raise ValueError("could not find the model input (sample / hidden_states) to size the user tokens")
    return sample.shape[0]


def _pre_forward(model, args, kwargs):
    state = getattr(model, STATE_ATTR)
    restore_user_processors(model)
    if not state.enabled:
        return None  # keep the last tokens: a checkpointed policy pass may still recompute with them
    if state.embedding is None:
        state.tokens = state.weight = None
        return None
    batch = _batch_of(args, kwargs)
    emb, weight = state.embedding, state.row_weight
    users = emb.shape[0]
    if state.classifier_free_guidance and batch == 2 * users:
        # Pipelines concatenate [unconditional, conditional]: the unconditional half gets the null user, or the
        # negative user when one is given (guidance then pushes away from it, like a negative prompt).
        if state.negative_embedding is None:
            emb = torch.cat([emb, emb])
            weight = torch.cat([torch.zeros_like(weight), weight])
        else:
            emb = torch.cat([state.negative_embedding.to(emb), emb])
            weight = torch.cat([torch.ones_like(weight), weight])
    elif users == 1 and batch > 1:
        emb = emb.expand(batch, *emb.shape[1:])
        weight = weight.expand(batch)
    elif users != batch:
        raise ValueError(
            f"user embedding batch {users} does not match the model batch {batch}: give one embedding per "
            f"sample (repeat it per group member), or one for all"
            + (", or half the batch with classifier-free guidance" if state.classifier_free_guidance else "")
        )
    projection = getattr(model, PROJECTION_ATTR)
    ref = projection.user_fc.weight
    state.tokens = projection(emb.to(device=ref.device, dtype=ref.dtype))
    state.weight = weight.to(device=ref.device)
    return None


# ------------------------------------------------------------------------------------------- conditioning


@contextlib.contextmanager
def user_condition(
    model,
    user_embedding: torch.Tensor,
    row_weight: torch.Tensor | None = None,
    classifier_free_guidance: bool = False,
    scale: float | None = None,
    negative_user_embedding: torch.Tensor | None = None,
):
    """Condition every forward of `model` inside the block on user embeddings.

    user_embedding: (B, T, encoder_dim), one user per sample, or (1, T, D) / (T, D) for all samples.
    row_weight: optional (B,) float; 0 gives that row the null user (exactly the base), e.g. for
    user-embedding dropout. classifier_free_guidance: a model batch twice the embedding batch is
    [unconditional, conditional] and the unconditional half gets the null user (what the pipelines use).
    scale: overrides the layers' scale inside the block.
    negative_user_embedding: with classifier_free_guidance, the user of the unconditional half (same shape as
    user_embedding) instead of the null user. The guided prediction then moves away from it. Any effect the
    user branch has for every user cancels in the guidance difference. A natural choice is the user's own
    examples with chosen and rejected swapped.

    With activation checkpointing, call backward inside the block (or before the next forward): the
    recomputation reads the tokens of the last conditioned forward.
    """
    state = _state(model)
    if user_embedding.dim() == 2:
        user_embedding = user_embedding.unsqueeze(0)
    if user_embedding.dim() != 3 or user_embedding.shape[-1] != state.config.encoder_dim:
        raise ValueError(
            f"user_embedding must be (B, num_tokens, {state.config.encoder_dim}), got {tuple(user_embedding.shape)}"
        )
    if not torch.isfinite(user_embedding).all():
        raise ValueError("user_embedding contains NaN or inf")
    if row_weight is None:
        row_weight = torch.ones(user_embedding.shape[0], device=user_embedding.device)
    row_weight = torch.as_tensor(row_weight, dtype=torch.float32, device=user_embedding.device)
    if row_weight.shape != (user_embedding.shape[0],):
        raise ValueError(f"row_weight must have shape ({user_embedding.shape[0]},), got {tuple(row_weight.shape)}")
    if negative_user_embedding is not None:
        if not classifier_free_guidance:
            raise ValueError("negative_user_embedding needs classifier_free_guidance=True (it conditions the unconditional half)")
        if negative_user_embedding.dim() == 2:
            negative_user_embedding = negative_user_embedding.unsqueeze(0)
        if negative_user_embedding.shape != user_embedding.shape:
            raise ValueError(
                f"negative_user_embedding must have the shape of user_embedding {tuple(user_embedding.shape)}, "
                f"got {tuple(negative_user_embedding.shape)}"
            )
        if not torch.isfinite(negative_user_embedding).all():
            raise ValueError("negative_user_embedding contains NaN or inf")
    saved = (state.embedding, state.row_weight, state.classifier_free_guidance, state.scale_override, state.negative_embedding)
    state.embedding, state.row_weight = user_embedding, row_weight
    state.classifier_free_guidance, state.scale_override = classifier_free_guidance, scale
    state.negative_embedding = negative_user_embedding
    try:
        yield model
    finally:
        (state.embedding, state.row_weight, state.classifier_free_guidance, state.scale_override,
         state.negative_embedding) = saved


@contextlib.contextmanager
def user_attention_disabled(model):
    """Inside the block the model is the base (plus any LoRA): the DPO reference pass.

    `disable_adapters()` only switches peft LoRA layers; combine both for a LoRA+user policy.
    """
    state = _state(model)
    saved = state.enabled
    state.enabled = False
    try:
        yield model
    finally:
        state.enabled = saved


# ---------------------------------------------------------------------------------------------- save/load


def user_attention_state_dict(model) -> dict[str, torch.Tensor]:
    _state(model)
    return {
        k: v
        for k, v in model.state_dict().items()
        if f".{LAYER_ATTR}." in k or k.startswith(f"{PROJECTION_ATTR}.")
    }


def save_user_attention(model, path: str | os.PathLike) -> None:
    """Save only the user-attention weights (and their config) as safetensors."""
    from safetensors.torch import save_file

    state = _state(model)
    tensors = {k: v.detach().contiguous().cpu() for k, v in user_attention_state_dict(model).items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(asdict(state.config))})


def load_user_attention(model, path: str | os.PathLike):
    """Load weights saved by `save_user_attention`; installs the branch first if the model has none."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise FileNotFoundError(f"no user-attention weights at {path}")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if METADATA_KEY not in metadata:
        raise ValueError(f"{path} has no '{METADATA_KEY}' metadata; it was not written by save_user_attention")
    saved = UserAttentionConfig(**json.loads(metadata[METADATA_KEY]))
    if not has_user_attention(model):
        add_user_attention(model, encoder_dim=saved.encoder_dim, token_dim=saved.token_dim, scale=saved.scale)
    config = _state(model).config
    for field in ("family", "encoder_dim", "token_dim"):
        if getattr(config, field) != getattr(saved, field):
            raise ValueError(
                f"{path} was saved with {field}={getattr(saved, field)!r} but the model has {getattr(config, field)!r}"
            )
    tensors = load_file(str(path))
    expected = set(user_attention_state_dict(model))
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match this model's user attention: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"
        )
    model.load_state_dict(tensors, strict=False)
    set_user_scale(model, saved.scale)
    return model
