"""A/B of toy-sd3 transformer variants on the pretrain recipe: the same seed gives the same data and noise per
step, so a variant's log.jsonl losses compare step by step with another run's.

    python benchmarks/toy_sd3_variant.py '{"qk_norm": "rms_norm"}' --family sd3 --vae_from runs/v2/toy-sdxl \
        --state_dir runs/s6/sd3-qk --output_dir runs/s6/sd3-qk-out --steps 750 --batch_size 64 --eval_every 500 \
        --eval_per_task 20 --guidance_scale 5.0 --save_every 250

The JSON object overrides `SD3Transformer2DModel` arguments of `pretrain.toy_sd3_transformer` (and `"init":
"adaln_zero"` applies `pretrain.adaln_zero_init`); the rest are the pretrain's own flags.
"""

import json
import sys

from diffalign.toyworld import pretrain as P


def variant_transformer(overrides: dict):
    def build():
        from diffusers import SD3Transformer2DModel

        kw = dict(sample_size=P.LATENT_SIZE, patch_size=P.SD3_PATCH, in_channels=4, out_channels=4, num_layers=6,
                  attention_head_dim=24, num_attention_heads=4, caption_projection_dim=96,
                  joint_attention_dim=2 * P.TEXT_HIDDEN, pooled_projection_dim=2 * P.TEXT_HIDDEN,
                  pos_embed_max_size=P.LATENT_SIZE // P.SD3_PATCH)
        arch = dict(overrides)
        init = arch.pop("init", None)
        kw.update(arch)
        kw["pos_embed_max_size"] = P.LATENT_SIZE // kw["patch_size"]
        model = SD3Transformer2DModel(**kw)
        if init == "adaln_zero":
            P.adaln_zero_init(model)
        elif init is not None:
            raise ValueError(f"unknown init {init!r}; expected 'adaln_zero'")
        return model

    return build


if __name__ == "__main__":
    P.toy_sd3_transformer = variant_transformer(json.loads(sys.argv[1]))
    P.main(sys.argv[2:])
