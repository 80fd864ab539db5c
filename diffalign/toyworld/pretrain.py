"""Recipe for the shipped tiny base models: `python -m diffalign.toyworld.pretrain --family sdxl|sd3`.

Two stages, both on freshly rendered toy scenes (an endless, seeded stream; no data set on disk):

1. a small `AutoencoderKL` (64x64 RGB -> 16x16x4), reconstruction MSE + a small KL term; its
   `scaling_factor` (and, for SD3, `shift_factor`) are measured on the trained latents;
2. the denoiser and both CLIP text encoders, trained jointly from scratch with the frozen VAE:
   - toy-sdxl: `UNet2DConditionModel` with SDXL text_time micro-conditioning, epsilon prediction on the
     SDXL noise schedule; captions dropped to zero embeddings (as the pipeline's `force_zeros_for_empty_prompt`);
   - toy-sd3: `SD3Transformer2DModel`, rectified flow (x_t = (1-s) x0 + s noise, target noise - x0,
     logit-normal s); captions dropped to the empty prompt (what the SD3 pipeline uses as negative); the
     pipeline's 256 zero T5 tokens enter as one weighted token (`RepeatedTokenJointAttnProcessor`, exact).
   Text is encoded exactly as the diffusers pipelines do (penultimate hidden states, pooled output),
   which a test checks against `pipeline.encode_prompt`.

An exponential moving average of the weights is what gets evaluated and saved. Every `eval_every` steps
the real diffusers pipeline generates the toy-GenEval subset and the exact detector scores it with the
official GenEval rules; loss and scores go to `<state_dir>/log.jsonl`. The run is resumable from
`<state_dir>/state.pt` (weights-only torch file), and each step's data and noise are seeded by the step
index, so a resumed run continues the same sequence.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
import torch.nn.functional as F

from diffalign.tokenization import clip_tokenizer
from diffalign.toyworld import scenes

CHECKPOINT_ROOT = os.path.join(os.path.dirname(__file__), "checkpoints")
FAMILIES = ("sdxl", "sd3")
IMAGE_SIZE = scenes.IMAGE_SIZE
LATENT_SIZE = 16  # a 3-level VAE: 64x64 images -> 16x16x4 latents, so the denoiser works on 256 positions
# Wide enough to bind attributes and relations; the 49,408-row embedding sets each encoder's size
# (48 x 49,408 x 2 B = 4.7 MB in fp16), so this is also what the checkpoint budget buys.
TEXT_HIDDEN = 48
TEXT_HEADS = 4


# --------------------------------------------------------------------------------------------
# Architectures
# --------------------------------------------------------------------------------------------


def toy_text_config(hidden_size: int = TEXT_HIDDEN, num_heads: int = TEXT_HEADS):
    from transformers import CLIPTextConfig

    from diffalign.tokenization import CLIP_BOS_ID, CLIP_EOS_ID, CLIP_VOCAB_SIZE

    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,  # the real token ids, so the real tokenizer works unchanged
        bos_token_id=CLIP_BOS_ID,
        eos_token_id=CLIP_EOS_ID,
        pad_token_id=CLIP_EOS_ID,
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_attention_heads=num_heads,
        num_hidden_layers=3,  # the pipelines read the penultimate layer: 2 layers shape the context
        projection_dim=hidden_size,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )


def toy_vae(family: str):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64, 64),  # three levels: latents are 1/4 of the image size
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=16,
        sample_size=IMAGE_SIZE,
        force_upcast=False,
        shift_factor=0.0 if family == "sd3" else None,
    )


def toy_unet():
    from diffusers import UNet2DConditionModel

    # Attention only at 8x8 and 4x4: on a (64, 128) UNet, attention at 16x16 too cut training from 58 to 24 images/s.
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        block_out_channels=(48, 96, 128),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=4,  # diffusers' name for the number of heads
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=1,
        projection_class_embeddings_input_dim=6 * 8 + TEXT_HIDDEN,  # 6 micro-conditioning ids + pooled text
        cross_attention_dim=2 * TEXT_HIDDEN,  # both encoders' hidden states, concatenated
        norm_num_groups=16,
    )


SD3_PATCH = 2
SD3_ZERO_TOKENS = 256  # the SD3 pipeline's default max_sequence_length: zero "T5" tokens without T5


def toy_sd3_transformer():
    from diffusers import SD3Transformer2DModel

    model = SD3Transformer2DModel(
        sample_size=LATENT_SIZE,
        patch_size=SD3_PATCH,
        in_channels=4,
        out_channels=4,
        num_layers=6,
        attention_head_dim=24,
        num_attention_heads=4,
        caption_projection_dim=96,
        joint_attention_dim=2 * TEXT_HIDDEN,
        pooled_projection_dim=2 * TEXT_HIDDEN,
        pos_embed_max_size=LATENT_SIZE // SD3_PATCH,
        qk_norm="rms_norm",  # as SD3.5: attention logits stay bounded when training from scratch
    )
    adaln_zero_init(model)
    return model


def adaln_zero_init(transformer) -> None:
    """DiT's initialisation for a transformer trained from scratch: xavier-uniform linears, and zeros in every
    adaLN modulation and in the output projection, so each block starts as the identity.

    diffusers' SD3 model keeps PyTorch's default init (it is meant to be loaded, not trained from scratch).
    """
    from diffusers.models.normalization import AdaLayerNormContinuous, AdaLayerNormZero

    for m in transformer.modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                torch.nn.init.zeros_(m.bias)
    for m in transformer.modules():
        if isinstance(m, (AdaLayerNormZero, AdaLayerNormContinuous)):
            torch.nn.init.zeros_(m.linear.weight)
            torch.nn.init.zeros_(m.linear.bias)
    torch.nn.init.zeros_(transformer.proj_out.weight)
    torch.nn.init.zeros_(transformer.proj_out.bias)


class RepeatedTokenJointAttnProcessor:
    """SD3 joint attention where the last context token stands for `last_token_repeats` identical copies.

    Without T5 the SD3 pipeline appends 256 zero tokens to the 77 CLIP tokens. Every layer treats tokens
    independently except attention, and there n identical keys/values weigh like one key with its logit
    raised by log(n). So training on 77 + 1 tokens with that bias computes exactly what the pipeline computes
    on 77 + 256 (tests/test_toyworld_pretrain.py checks it), at 142 instead of 397 tokens per toy image. Without the
    keyword it is diffusers' plain joint attention, so evaluation through the pipeline is unchanged.
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, last_token_repeats: int = 1):
        b, n_img = hidden_states.shape[:2]

        def heads(x):
            return x.view(b, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        bias = None
        if encoder_hidden_states is not None:
            cq, ck, cv = (heads(f(encoder_hidden_states)) for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            if attn.norm_added_q is not None:
                cq, ck = attn.norm_added_q(cq), attn.norm_added_k(ck)
            q, k, v = torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2)
            if last_token_repeats != 1:
                bias = q.new_zeros(1, 1, 1, k.shape[2])
                bias[..., -1] = float(np.log(last_token_repeats))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        out = out.transpose(1, 2).reshape(b, -1, out.shape[1] * out.shape[3]).to(q.dtype)
        if encoder_hidden_states is None:
            return attn.to_out[1](attn.to_out[0](out))
        out, context = out[:, :n_img], out[:, n_img:]
        if not attn.context_pre_only:
            context = attn.to_add_out(context)
        return attn.to_out[1](attn.to_out[0](out)), context


def build_components(family: str, seed: int = 0) -> dict:
    """Randomly initialised toy components for `family`, ready for the diffusers pipeline constructor."""
    from diffusers import EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    torch.manual_seed(seed)
    vae = toy_vae(family)
    torch.manual_seed(seed + 1)
    te1_cls = CLIPTextModel if family == "sdxl" else CLIPTextModelWithProjection
    text_encoder = te1_cls(toy_text_config())
    torch.manual_seed(seed + 2)
    text_encoder_2 = CLIPTextModelWithProjection(toy_text_config())
    torch.manual_seed(seed + 3)
    tok = clip_tokenizer()
    if family == "sdxl":
        scheduler = EulerDiscreteScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            num_train_timesteps=1000,
            steps_offset=1,
            timestep_spacing="leading",
            prediction_type="epsilon",
        )
        return {
            "unet": toy_unet(),
            "vae": vae,
            "text_encoder": text_encoder,
            "text_encoder_2": text_encoder_2,
            "tokenizer": tok,
            "tokenizer_2": tok,
            "scheduler": scheduler,
            "image_encoder": None,
            "feature_extractor": None,
        }
    return {
        "transformer": toy_sd3_transformer(),
        "vae": vae,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "text_encoder_3": None,
        "tokenizer": tok,
        "tokenizer_2": tok,
        "tokenizer_3": None,
        "scheduler": FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0),
    }


def make_pipeline(family: str, components: dict):
    from diffusers import StableDiffusion3Pipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusion3Pipeline
    pipe = cls(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def denoiser_of(components: dict) -> torch.nn.Module:
    return components["unet"] if "unet" in components else components["transformer"]


# --------------------------------------------------------------------------------------------
# Text encoding, exactly as the pipelines do it
# --------------------------------------------------------------------------------------------


class TokenCache:
    """Caption -> (77,) CLIP ids, padded like the pipelines (max_length, truncation)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.cache: dict[str, torch.Tensor] = {}

    def __call__(self, captions: list[str]) -> torch.Tensor:
        missing = [c for c in dict.fromkeys(captions) if c not in self.cache]
        if missing:
            ids = self.tokenizer(
                missing, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt"
            ).input_ids
            self.cache.update(zip(missing, ids))
        return torch.stack([self.cache[c] for c in captions])


def encode_text(family: str, text_encoder, text_encoder_2, ids: torch.Tensor, sd3_t5_tokens: int = 256):
    """(prompt_embeds, pooled) from token ids, as `pipeline.encode_prompt` computes them (no CFG)."""
    out1 = text_encoder(ids, output_hidden_states=True)
    out2 = text_encoder_2(ids, output_hidden_states=True)
    h = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)
    if family == "sdxl":
        return h, out2.text_embeds
    pooled = torch.cat([out1.text_embeds, out2.text_embeds], dim=-1)
    # Without T5 the SD3 pipeline appends `max_sequence_length` zero tokens of the joint width.
    zeros = h.new_zeros(h.shape[0], sd3_t5_tokens, h.shape[-1])
    return torch.cat([h, zeros], dim=1), pooled


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


@dataclass
class PretrainConfig:
    family: str = "sdxl"
    output_dir: str | None = None  # default: diffalign/toyworld/checkpoints/toy-<family>
    state_dir: str | None = None  # default: runs/toy-<family> (resume state and log.jsonl)
    seed: int = 0
    # stage 1: VAE
    vae_steps: int = 1500
    vae_batch_size: int = 32
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-5
    vae_from: str | None = None  # a toy pipeline, VAE folder or another run's state_dir whose VAE replaces stage 1
    init_from: str | None = None  # a saved toy pipeline to continue from (all weights; fresh optimizer and EMA)
    vae_calibration_images: int = 256  # images whose latents set scaling_factor / shift_factor
    # stage 2: denoiser + text encoders
    steps: int = 20000
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 200
    # Cool-down: from step `decay_start` the lr falls linearly to final_lr_ratio x lr over `decay_steps`, then stays
    # (None: constant to the end). Pass it when resuming too: the schedule is rebuilt from the config on every start.
    decay_start: int | None = None
    decay_steps: int = 0
    final_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    p_full_caption: float = 0.5
    # Web-alt-text-like flaws (omitted colours or objects, wrong counts, no relation; scenes.flawed_caption) on this
    # share of the denoiser's training captions: the base is then weak where its data are, not where its capacity is.
    p_flawed_caption: float = 0.0
    # evaluation
    eval_every: int = 2000
    eval_per_task: int = 20
    eval_seed: int = 1234
    num_inference_steps: int = 20
    guidance_scale: float = 4.0
    # bookkeeping
    save_every: int = 1000
    log_every: int = 50
    time_limit_s: float | None = None  # stop (saving) after this much wall time in this process
    num_workers: int = 0
    device: str = "auto"
    progress: bool = True
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        if self.output_dir is None:
            self.output_dir = os.path.join(CHECKPOINT_ROOT, f"toy-{self.family}")
        if self.state_dir is None:
            self.state_dir = os.path.join("runs", f"toy-{self.family}")
        for name in ("steps", "batch_size", "vae_batch_size", "save_every", "eval_every", "log_every", "vae_calibration_images"):
            if getattr(self, name) < 0 or (name != "steps" and getattr(self, name) == 0):
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.decay_start is not None and (self.decay_start < 0 or self.decay_steps < 1):
            raise ValueError(f"decay_start needs decay_steps >= 1 and a step >= 0, got {self.decay_start}, {self.decay_steps}")
        if not 0.0 <= self.final_lr_ratio <= 1.0:
            raise ValueError(f"final_lr_ratio must be in [0, 1], got {self.final_lr_ratio}")
        if not 0.0 <= self.p_flawed_caption <= 1.0:
            raise ValueError(f"p_flawed_caption must be in [0, 1], got {self.p_flawed_caption}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")


# --------------------------------------------------------------------------------------------
# Data: an endless seeded stream of rendered scenes
# --------------------------------------------------------------------------------------------


class SceneStream(torch.utils.data.Dataset):
    """Example `i` is a pure function of (seed, i): workers and resumption do not change the data."""

    def __init__(self, seed: int, p_full_caption: float, length: int = 2**62, p_flawed_caption: float = 0.0):
        self.seed, self.p_full, self.length, self.p_flawed = seed, p_full_caption, length, p_flawed_caption

    def __len__(self):
        return self.length

    def __getitem__(self, i: int):
        rng = np.random.default_rng([self.seed, int(i)])
        image, caption, _ = scenes.sample_training_example(rng, IMAGE_SIZE, self.p_full, self.p_flawed)
        x = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0
        return x, caption


def _collate(items):
    return torch.stack([x for x, _ in items]), [c for _, c in items]


def _batches(stream: SceneStream, start_step: int, batch_size: int, num_workers: int):
    sampler = range(start_step * batch_size, stream.length)
    loader = torch.utils.data.DataLoader(
        stream,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=_collate,
        persistent_workers=num_workers > 0,
    )
    return iter(loader)


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


def eval_rows(per_task: int) -> list[dict]:
    rows = []
    for task in scenes.TASKS:
        rows += scenes.load_eval_set(task)[:per_task]
    return rows


def fast_sd3_kwargs(pipe) -> dict:
    """Pipeline kwargs that compute the default SD3 call (256 zero T5 tokens) on one weighted zero token.

    Exact (`RepeatedTokenJointAttnProcessor`), and about 3x faster for the toy model. Only for a T5-less SD3
    pipeline whose attention is diffusers' plain joint attention; anything else (SDXL, custom processors
    such as PPD's) gets no extra kwargs.
    """
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    transformer = getattr(pipe, "transformer", None)
    if transformer is None or getattr(pipe, "text_encoder_3", None) is not None:
        return {}
    plain = (JointAttnProcessor2_0, RepeatedTokenJointAttnProcessor)
    if not all(isinstance(p, plain) for p in transformer.attn_processors.values()):
        return {}
    transformer.set_attn_processor(RepeatedTokenJointAttnProcessor())
    return {"max_sequence_length": 1, "joint_attention_kwargs": {"last_token_repeats": SD3_ZERO_TOKENS}}


def latent_shape(pipe, image_size: int = IMAGE_SIZE) -> tuple[int, int, int]:
    """(C, h, w) of the initial noise the pipeline draws for `image_size` images."""
    from diffalign.families import pipeline_denoiser

    denoiser = pipeline_denoiser(pipe)
    side = image_size // pipe.vae_scale_factor
    return (denoiser.config.in_channels, side, side)


@torch.no_grad()
def generate(pipe, prompts: list[str], seeds: list[int], num_inference_steps: int, guidance_scale: float, batch_size: int = 64):
    """One image per (prompt, seed); every image has its own seeded generator, so batching changes nothing."""
    device = pipe.device
    images = []
    for s in range(0, len(prompts), batch_size):
        gens = [torch.Generator(device="cpu").manual_seed(int(x)) for x in seeds[s : s + batch_size]]
        shape = latent_shape(pipe)
        latents = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)
        out = pipe(
            prompt=prompts[s : s + batch_size],
            height=IMAGE_SIZE,
            width=IMAGE_SIZE,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            latents=latents,
            **fast_sd3_kwargs(pipe),
        )
        images += out.images
    return images


def toy_geneval(pipe, per_task: int = 20, images_per_prompt: int = 1, seed: int = 1234, num_inference_steps: int = 20, guidance_scale: float = 4.0) -> dict:
    """Toy-GenEval of a pipeline: per-task accuracy, overall and standard errors (official GenEval rules)."""
    from diffalign.toyworld.detector import score_images, summarize

    rows = [r for r in eval_rows(per_task) for _ in range(images_per_prompt)]
    seeds = [seed + i for i in range(len(rows))]
    images = generate(pipe, [r["prompt"] for r in rows], seeds, num_inference_steps, guidance_scale)
    return summarize(rows, score_images(images, rows))


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _lr_lambda(warmup: int, decay_start: int | None = None, decay_steps: int = 0, final_ratio: float = 0.0):
    """Warm-up, constant, then (from `decay_start`) linear down to `final_ratio` over `decay_steps`, where it stays:
    a warmup-stable-decay schedule."""
    def factor(step: int) -> float:
        f = min(1.0, (step + 1) / max(1, warmup))
        if decay_start is not None and step >= decay_start:
            done = min(1.0, (step - decay_start + 1) / max(1, decay_steps))
            f *= 1.0 - done * (1.0 - final_ratio)
        return f

    return factor


def _save_state(path: str, state: dict):
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def _log(cfg: PretrainConfig, record: dict):
    with open(os.path.join(cfg.state_dir, "log.jsonl"), "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _trim_log(cfg: PretrainConfig, stages: tuple[str, ...], step: int) -> None:
    """On resume, drop the records a stopped run logged after its last save: the resumed run logs those steps again."""
    path = os.path.join(cfg.state_dir, "log.jsonl")
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    records = [(line, json.loads(line)) for line in lines]
    keep = [line for line, r in records if not (r["stage"] in stages and r["step"] > step)]
    if len(keep) != len(lines):
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.writelines(keep)
        os.replace(path + ".tmp", path)


def train_vae(cfg: PretrainConfig, vae, device, state: dict) -> None:
    from tqdm.auto import tqdm

    vae.to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr)
    step = 0
    if state.get("stage") == "vae":
        vae.load_state_dict(state["vae"])
        opt.load_state_dict(state["vae_opt"])
        step = state["step"]
        _trim_log(cfg, ("vae",), step)
    stream = SceneStream(cfg.seed + 10_000, cfg.p_full_caption)
    batches = _batches(stream, step, cfg.vae_batch_size, cfg.num_workers)
    bar = tqdm(total=cfg.vae_steps, initial=step, desc="vae", disable=not cfg.progress)
    t0 = time.time()
    while step < cfg.vae_steps:
        x, _ = next(batches)
        x = x.to(device)
        post = vae.encode(x).latent_dist
        g = torch.Generator(device="cpu").manual_seed(cfg.seed * 1_000_003 + step)
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g).to(device)
        rec = vae.decode(z).sample
        mse = F.mse_loss(rec.float(), x.float())
        kl = post.kl().float().mean() / x[0].numel()
        loss = mse + cfg.vae_kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.vae_steps:
            bar.set_postfix(mse=f"{mse.item():.4f}")
            _log(cfg, {"stage": "vae", "step": step, "mse": mse.item(), "kl": kl.item(), "time": time.time()})
        if step % cfg.save_every == 0 and step < cfg.vae_steps:
            _save_state(os.path.join(cfg.state_dir, "state.pt"), {"stage": "vae", "step": step, "vae": vae.state_dict(), "vae_opt": opt.state_dict()})
        if cfg.time_limit_s is not None and time.time() - t0 > cfg.time_limit_s:
            _save_state(os.path.join(cfg.state_dir, "state.pt"), {"stage": "vae", "step": step, "vae": vae.state_dict(), "vae_opt": opt.state_dict()})
            raise TimeoutError(f"time limit reached during VAE training at step {step}; run again to resume")
    bar.close()
    vae.eval()


def _vae_weights(source: str) -> dict:
    """VAE weights from a toy pipeline folder, a VAE folder, or another run's --state_dir past stage 1."""
    state_path = os.path.join(source, "state.pt")
    if os.path.exists(state_path):
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        if state.get("stage") != "denoiser":
            raise ValueError(f"{state_path} is still training its VAE; wait until its denoiser stage has saved a state")
        return state["vae"]
    from diffusers import AutoencoderKL

    sub = os.path.join(source, "vae")
    return AutoencoderKL.from_pretrained(sub if os.path.isdir(sub) else source).state_dict()


@torch.no_grad()
def calibrate_vae(cfg: PretrainConfig, vae, device) -> None:
    """Set `scaling_factor` (and SD3's `shift_factor`) so that training latents have unit variance."""
    stream = SceneStream(cfg.seed + 20_000, cfg.p_full_caption)
    x = torch.stack([stream[i][0] for i in range(cfg.vae_calibration_images)]).to(device)
    z = vae.encode(x).latent_dist.mean.float()
    shift = float(z.mean()) if cfg.family == "sd3" else 0.0
    scale = float(1.0 / (z - shift).std())
    vae.register_to_config(scaling_factor=scale)
    if cfg.family == "sd3":
        vae.register_to_config(shift_factor=shift)


def _ema_update(ema: dict, model_params: dict, decay: float):
    with torch.no_grad():
        for k, p in model_params.items():
            ema[k].mul_(decay).add_(p.detach(), alpha=1 - decay)


def _trainable(components: dict) -> dict[str, torch.nn.Module]:
    return {k: components[k] for k in ("unet", "transformer", "text_encoder", "text_encoder_2") if components.get(k) is not None}


def _named_params(modules: dict[str, torch.nn.Module]) -> dict[str, torch.nn.Parameter]:
    return {f"{m}.{n}": p for m, mod in modules.items() for n, p in mod.named_parameters()}


def _swap_in(modules: dict, ema: dict) -> dict:
    """Copy EMA weights into the modules; return the live weights to restore."""
    params = _named_params(modules)
    live = {k: p.detach().clone() for k, p in params.items()}
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(ema[k])
    return live


def _restore(modules: dict, live: dict):
    with torch.no_grad():
        for k, p in _named_params(modules).items():
            p.copy_(live[k])


def training_loss(cfg: PretrainConfig, components: dict, latents: torch.Tensor, ids: torch.Tensor, step: int, device) -> torch.Tensor:
    """One denoising loss (float32) on a batch of VAE latents and caption ids (dropout applied by the caller)."""
    b = latents.shape[0]
    g = torch.Generator(device="cpu").manual_seed(cfg.seed * 7_919 + step)
    noise = torch.randn(latents.shape, generator=g).to(device)
    prompt_embeds, pooled = encode_text(cfg.family, components["text_encoder"], components["text_encoder_2"], ids,
                                        sd3_t5_tokens=1)
    if cfg.family == "sdxl":
        drop = (torch.rand(b, generator=g) < cfg.caption_dropout).to(device)
        keep = (~drop).float()
        # The SDXL pipeline's negative prompt is all zeros (force_zeros_for_empty_prompt).
        prompt_embeds = prompt_embeds * keep[:, None, None]
        pooled = pooled * keep[:, None]
        sched = components["scheduler"]
        t = torch.randint(0, sched.config.num_train_timesteps, (b,), generator=g).to(device)
        acp = sched.alphas_cumprod.to(device=device, dtype=torch.float32)[t].view(b, 1, 1, 1)
        x_t = acp.sqrt() * latents + (1 - acp).sqrt() * noise
        time_ids = torch.tensor([IMAGE_SIZE, IMAGE_SIZE, 0, 0, IMAGE_SIZE, IMAGE_SIZE], device=device, dtype=x_t.dtype).repeat(b, 1)
        pred = components["unet"](
            x_t, t, encoder_hidden_states=prompt_embeds, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}
        ).sample
        target = noise
    else:
        u = torch.sigmoid(torch.randn(b, generator=g)).to(device)  # logit-normal sigmas
        s = u.view(b, 1, 1, 1)
        x_t = (1 - s) * latents + s * noise
        pred = components["transformer"](
            hidden_states=x_t, timestep=u * 1000.0, encoder_hidden_states=prompt_embeds, pooled_projections=pooled,
            joint_attention_kwargs={"last_token_repeats": SD3_ZERO_TOKENS},  # = the pipeline's 256 zero tokens
        ).sample
        target = noise - latents
    return F.mse_loss(pred.float(), target.float())


@torch.no_grad()
def batch_inputs(cfg: PretrainConfig, vae, tok: TokenCache, empty_ids: torch.Tensor, x: torch.Tensor, captions: list[str], step: int):
    """(scaled VAE latents, caption ids) of one batch; SD3's caption dropout happens here, SDXL's in the loss."""
    post = vae.encode(x).latent_dist
    g = torch.Generator(device="cpu").manual_seed(cfg.seed * 104_729 + step)
    z = post.mean + post.std * torch.randn(post.mean.shape, generator=g).to(x.device)
    latents = (z - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor
    ids = tok(captions)
    if cfg.family == "sd3":
        # SD3's negative prompt is the empty string, so that is what caption dropout trains.
        drop = torch.rand(len(captions), generator=torch.Generator().manual_seed(cfg.seed * 31 + step)) < cfg.caption_dropout
        ids = torch.where(drop[:, None], empty_ids.expand_as(ids), ids)
    return latents, ids


def pretrain(cfg: PretrainConfig) -> dict:
    """Run (or resume) the recipe; save the EMA pipeline to `cfg.output_dir`. Returns the last evaluation."""
    from tqdm.auto import tqdm

    device = _device(cfg.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    os.makedirs(cfg.state_dir, exist_ok=True)
    state_path = os.path.join(cfg.state_dir, "state.pt")
    state = torch.load(state_path, map_location="cpu", weights_only=True) if os.path.exists(state_path) else {}
    if state and state.get("config", {}).get("family", cfg.family) != cfg.family:
        raise ValueError(f"{state_path} holds a {state['config']['family']} run; use another --state_dir for {cfg.family}")
    if cfg.init_from:
        pipe = load_toy_pipeline(cfg.family, cfg.init_from)
        components = dict(pipe.components)
    else:
        components = build_components(cfg.family, cfg.seed)
    vae = components["vae"]

    # Stage 1.
    if state.get("stage") == "denoiser":
        vae.register_to_config(**state["vae_config"])
        vae.load_state_dict(state["vae"])
    elif cfg.init_from:
        pass  # the pipeline's own VAE and its calibration
    elif cfg.vae_from:
        vae.load_state_dict(_vae_weights(cfg.vae_from))
        calibrate_vae(cfg, vae.to(device), device)
    else:
        train_vae(cfg, vae, device, state)
        calibrate_vae(cfg, vae, device)
    vae.to(device).eval().requires_grad_(False)

    # Stage 2.
    if cfg.family == "sd3":
        components["transformer"].set_attn_processor(RepeatedTokenJointAttnProcessor())
    modules = _trainable(components)
    for m in modules.values():
        m.to(device).train()
    params = _named_params(modules)
    opt = torch.optim.AdamW(params.values(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.warmup_steps, cfg.decay_start, cfg.decay_steps,
                                                              cfg.final_lr_ratio))
    ema = {k: p.detach().clone() for k, p in params.items()}
    step = 0
    last_eval: dict = {}
    if state.get("stage") == "denoiser":
        for k, p in params.items():
            p.data.copy_(state["params"][k])
            ema[k].copy_(state["ema"][k])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        step = state["step"]
        last_eval = state.get("last_eval", {})
        _trim_log(cfg, (cfg.family, "eval"), step)

    def save_state():
        vae_cfg = {"scaling_factor": vae.config.scaling_factor}
        if cfg.family == "sd3":
            vae_cfg["shift_factor"] = vae.config.shift_factor
        _save_state(
            state_path,
            {
                "stage": "denoiser",
                "step": step,
                "config": {k: v for k, v in asdict(cfg).items() if isinstance(v, (int, float, str))},
                "vae": vae.state_dict(),
                "vae_config": vae_cfg,
                "params": {k: p.detach().cpu() for k, p in params.items()},
                "ema": {k: v.cpu() for k, v in ema.items()},
                "opt": opt.state_dict(),
                "sched": sched.state_dict(),
                "last_eval": last_eval,
            },
        )

    def evaluate() -> dict:
        live = _swap_in(modules, ema)
        for m in modules.values():
            m.eval()
        pipe = make_pipeline(cfg.family, components)
        t = time.time()
        res = toy_geneval(pipe, cfg.eval_per_task, 1, cfg.eval_seed, cfg.num_inference_steps, cfg.guidance_scale)
        res["eval_seconds"] = time.time() - t
        _restore(modules, live)
        for m in modules.values():
            m.train()
        return res

    tok = TokenCache(components["tokenizer"])
    empty_ids = tok([""])
    stream = SceneStream(cfg.seed, cfg.p_full_caption, p_flawed_caption=cfg.p_flawed_caption)
    batches = _batches(stream, step, cfg.batch_size, cfg.num_workers) if step < cfg.steps else None
    bar = tqdm(total=cfg.steps, initial=step, desc=f"toy-{cfg.family}", disable=not cfg.progress)
    t0 = time.time()
    losses: list[float] = []
    while step < cfg.steps:
        x, captions = next(batches)
        latents, ids = batch_inputs(cfg, vae, tok, empty_ids, x.to(device), captions, step)
        loss = training_loss(cfg, components, latents, ids.to(device), step, device)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()} at step {step}; lower --lr or check the data")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params.values(), cfg.max_grad_norm)
        opt.step()
        sched.step()
        step += 1
        _ema_update(ema, params, min(cfg.ema_decay, (1 + step) / (10 + step)))
        losses.append(loss.item())
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.steps:
            mean = float(np.mean(losses))
            losses = []
            bar.set_postfix(loss=f"{mean:.4f}")
            _log(cfg, {"stage": cfg.family, "step": step, "loss": mean, "lr": sched.get_last_lr()[0], "time": time.time()})
        if step % cfg.eval_every == 0 or step == cfg.steps:
            last_eval = {"step": step, **evaluate()}
            _log(cfg, {"stage": "eval", **last_eval, "time": time.time()})
            bar.write(
                f"step {step}: toy-GenEval overall {last_eval['overall']:.3f} +- {last_eval['overall_se']:.3f} "
                + " ".join(f"{t}={last_eval[t]:.2f}" for t in scenes.TASKS)
            )
        out_of_time = cfg.time_limit_s is not None and time.time() - t0 > cfg.time_limit_s
        if step % cfg.save_every == 0 or step == cfg.steps or out_of_time:
            save_state()
        if out_of_time:
            break
    bar.close()
    save_pipeline(cfg, components, modules, ema, step, last_eval)
    return last_eval


def save_pipeline(cfg: PretrainConfig, components: dict, modules: dict, ema: dict, step: int, last_eval: dict) -> str:
    """Write the EMA weights as a diffusers pipeline (safetensors) plus `toyworld_info.json`."""
    live = _swap_in(modules, ema)
    try:
        for m in modules.values():
            m.to("cpu").eval()
        components["vae"].to("cpu")
        pipe = make_pipeline(cfg.family, components)
        pipe.save_pretrained(cfg.output_dir, safe_serialization=True)
    finally:
        _restore(modules, live)
    slim_tokenizers(cfg.output_dir)
    store_half(cfg.output_dir)
    info = {
        "family": cfg.family,
        "steps": step,
        "batch_size": cfg.batch_size,
        "recipe": recipe_command(cfg),
        "last_eval": last_eval,
    }
    with open(os.path.join(cfg.output_dir, "toyworld_info.json"), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2)
    return cfg.output_dir


def recipe_command(cfg: PretrainConfig) -> str:
    """The command line that reproduces `cfg` (the options that differ from the defaults; paths and machinery left out)."""
    default = PretrainConfig(family=cfg.family, output_dir="-", state_dir="-")
    machinery = {"output_dir", "state_dir", "progress", "device", "num_workers", "time_limit_s", "extra"}
    options = [f"--{f.name} {getattr(cfg, f.name)}" for f in fields(cfg)
               if f.name not in machinery and getattr(cfg, f.name) != getattr(default, f.name)]
    return " ".join(["python -m diffalign.toyworld.pretrain", f"--family {cfg.family}", *[o for o in options if not o.startswith("--family ")]])


def store_half(pipeline_dir: str) -> None:
    """Rewrite every component's float32 weights as float16, which halves the shipped size (the checkpoint budget).

    Each config keeps saying float32, so `from_pretrained` (diffusers and transformers alike) loads float32
    modules on the CPU, as before.
    """
    from safetensors.torch import load_file, save_file

    for sub in sorted(os.listdir(pipeline_dir)):
        d = os.path.join(pipeline_dir, sub)
        if not os.path.isdir(d):
            continue
        for name in os.listdir(d):
            path = os.path.join(d, name)
            if name.endswith(".safetensors"):
                tensors = {k: v.half() if v.dtype == torch.float32 else v for k, v in load_file(path).items()}
                save_file(tensors, path, metadata={"format": "pt"})
            elif name == "config.json":
                with open(path, encoding="utf-8") as f:
                    config = json.load(f)
                if "dtype" in config or "torch_dtype" in config:  # transformers: load as this dtype
                    config.pop("torch_dtype", None)
                    config["dtype"] = "float32"
                    with open(path, "w", encoding="utf-8") as f:
                        json.dump(config, f, indent=2)


def slim_tokenizers(pipeline_dir: str) -> None:
    """Keep the tokenizers as compact vocab.json + merges.txt (1.4 MB) instead of tokenizer.json (3.6 MB)."""
    from diffalign.tokenization import clip_tokenizer_files

    src = clip_tokenizer_files()
    with open(os.path.join(src, "vocab.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    for sub in ("tokenizer", "tokenizer_2"):
        d = os.path.join(pipeline_dir, sub)
        if not os.path.isdir(d):
            continue
        with open(os.path.join(d, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump(vocab, f, separators=(",", ":"), ensure_ascii=False)
        with open(os.path.join(src, "merges.txt"), "rb") as fi, open(os.path.join(d, "merges.txt"), "wb") as fo:
            fo.write(fi.read())
        tj = os.path.join(d, "tokenizer.json")
        if os.path.exists(tj):
            os.remove(tj)


def load_toy_pipeline(family: str = "sdxl", path: str | None = None, device: str = "cpu"):
    """The shipped toy pipeline (`StableDiffusionXLPipeline` or `StableDiffusion3Pipeline`)."""
    from diffusers import StableDiffusion3Pipeline, StableDiffusionXLPipeline

    from diffalign.families import load_pipeline

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    path = path or os.path.join(CHECKPOINT_ROOT, f"toy-{family}")
    if not os.path.exists(os.path.join(path, "model_index.json")):
        raise FileNotFoundError(f"no toy-{family} pipeline at {path}; build it with `python -m diffalign.toyworld.pretrain --family {family}`")
    pipe = load_pipeline(path)  # toy-sd3 has no T5: its model_index.json lists it as null
    expected = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusion3Pipeline
    if not isinstance(pipe, expected):
        raise ValueError(f"{path} holds a {type(pipe).__name__}, not the toy-{family} {expected.__name__}")
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def parse_args(argv=None) -> PretrainConfig:
    p = argparse.ArgumentParser(prog="python -m diffalign.toyworld.pretrain", description=__doc__.split("\n")[0])
    casts = {"int": int, "float": float, "str": str}
    for f in fields(PretrainConfig):
        if f.name == "extra":
            continue
        kind = str(f.type).split("|")[0].strip()
        if kind == "bool":
            p.add_argument(f"--{f.name}", type=lambda s: s.lower() in ("1", "true", "yes"), default=f.default)
        else:
            p.add_argument(f"--{f.name}", type=casts[kind], default=f.default)
    args = p.parse_args(argv)
    return PretrainConfig(**vars(args))


def main(argv=None):
    cfg = parse_args(argv)
    res = pretrain(cfg)
    print(json.dumps({"output_dir": cfg.output_dir, "last_eval": res}, indent=2))


if __name__ == "__main__":
    main()
