"""Offline fixtures: tiny, randomly initialised SDXL and SD3 pipelines built from configs.

They are real diffusers pipelines (same classes, same call paths) small enough to run a
64x64 generation on a CPU in about a second. Nothing is downloaded.
"""

from __future__ import annotations

import torch

from diffalign.tokenization import CLIP_BOS_ID, CLIP_EOS_ID, CLIP_VOCAB_SIZE, clip_tokenizer

TINY_IMAGE_SIZE = 64


def tiny_clip_text_config(hidden_size: int = 32, projection_dim: int = 32, num_layers: int = 2):
    from transformers import CLIPTextConfig

    # The real vocabulary and special ids, so the pooled output picks the real end token.
    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        bos_token_id=CLIP_BOS_ID,
        eos_token_id=CLIP_EOS_ID,
        pad_token_id=CLIP_EOS_ID,
        hidden_size=hidden_size,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=num_layers,
        projection_dim=projection_dim,
        max_position_embeddings=77,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
    )


def tiny_sdxl_components(seed: int = 0) -> dict:
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * 8 + 32,  # 6 micro-conditioning ids + pooled text (32)
        cross_attention_dim=64,  # 32 + 32 from the two text encoders
        norm_num_groups=8,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        block_out_channels=(16, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=TINY_IMAGE_SIZE,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(tiny_clip_text_config())
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(tiny_clip_text_config())
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    tokenizer = clip_tokenizer()
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer,
        "scheduler": scheduler,
        "image_encoder": None,
        "feature_extractor": None,
    }


def tiny_sdxl_pipeline(seed: int = 0):
    """A real `StableDiffusionXLPipeline` with tiny random weights (latents are 1/2 the image size)."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(**tiny_sdxl_components(seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_t5():
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    # T5Tokenizer() builds with no files in transformers 5 (a ~100-token vocabulary).
    tokenizer = T5Tokenizer()
    model = T5EncoderModel(T5Config(d_model=32, d_ff=37, d_kv=8, num_heads=1, num_layers=1, vocab_size=max(128, len(tokenizer))))
    return model, tokenizer


def tiny_sd3_components(seed: int = 0, with_t5: bool = False) -> dict:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=1,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        block_out_channels=(4,),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModelWithProjection(tiny_clip_text_config())
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(tiny_clip_text_config())
    tokenizer = clip_tokenizer()
    text_encoder_3, tokenizer_3 = None, None
    if with_t5:
        torch.manual_seed(seed + 4)
        text_encoder_3, tokenizer_3 = tiny_t5()
    return {
        "transformer": transformer,
        "vae": vae,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "text_encoder_3": text_encoder_3,
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer,
        "tokenizer_3": tokenizer_3,
        "scheduler": FlowMatchEulerDiscreteScheduler(),
    }


def tiny_sd3_pipeline(seed: int = 0, with_t5: bool = False):
    """A real `StableDiffusion3Pipeline` with tiny random weights; T5 is optional, as in SD3."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(**tiny_sd3_components(seed, with_t5=with_t5))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_mask2former(num_labels: int = 80, num_queries: int = 10, seed: int = 0):
    """A tiny random `Mask2FormerForUniversalSegmentation` (Swin backbone) that builds offline in ~0.1 s."""
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig

    torch.manual_seed(seed)
    backbone = SwinConfig(
        embed_dim=16,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 1, 1],
        window_size=4,
        image_size=64,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    config = Mask2FormerConfig(
        backbone_config=backbone,
        use_pretrained_backbone=False,
        num_labels=num_labels,
        hidden_dim=32,
        mask_feature_size=32,
        feature_size=32,
        num_queries=num_queries,
        encoder_layers=1,
        decoder_layers=2,
        num_attention_heads=2,
        dim_feedforward=64,
        encoder_feedforward_dim=64,
        common_stride=4,
    )
    return Mask2FormerForUniversalSegmentation(config)
