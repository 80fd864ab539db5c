"""GenEval runtime: how long generate and evaluate take for the full 553 x 4 = 2212 images.

Weights do not change speed, so full-size models are built with random weights from configs
(nothing is downloaded):
- evaluate: Mask2Former Swin-S COCO (100 queries, 80 classes) at mmdet's test size (800 px) on
  1024x1024 PNGs through the real `evaluate()` loop (PNG decode, detection, post-processing,
  rules, JSON rows); CLIP ViT-L-14 colour classification timed per crop (random weights find no
  objects above 0.3, so the loop itself classifies nothing; we add the crops a real run needs).
- generate: the SDXL UNet (shared/configs/sdxl_unet.json, copied beside this script or given by
  --unet-config) for a few denoising steps at 1024 px, batch 4 with classifier-free guidance, plus
  the SDXL VAE decode; extrapolated to 50 steps.

    python benchmarks/geneval_runtime.py --out runtime.json            # GPU
    python benchmarks/geneval_runtime.py --tiny --out /tmp/rt.json     # CPU smoke test, tiny sizes
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import torch
from PIL import Image

N_IMAGES = 2212
N_PROMPTS = 553


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _swin_small(tiny: bool):
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig

    if tiny:
        from diffalign.testing import tiny_mask2former

        return tiny_mask2former()
    # facebook/mask2former-swin-small-coco-instance: Swin-S backbone, 100 queries, 9 decoder layers (+ the initial one).
    backbone = SwinConfig(
        embed_dim=96,
        depths=[2, 2, 18, 2],
        num_heads=[3, 6, 12, 24],
        window_size=7,
        image_size=224,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    cfg = Mask2FormerConfig(
        backbone_config=backbone,
        use_pretrained_backbone=False,
        num_labels=80,
        num_queries=100,
        decoder_layers=10,
    )
    return Mask2FormerForUniversalSegmentation(cfg)


def bench_evaluate(tiny: bool, device: str, n_prompts: int) -> dict:
    import open_clip
    from transformers import Mask2FormerImageProcessor

    from diffalign.evaluation.detectors import load_detector
    from diffalign.evaluation.geneval import load_metadata
    from diffalign.evaluation.geneval.colors import ColorClassifier
    from diffalign.evaluation.geneval.runner import evaluate

    size = 64 if tiny else 1024
    test_size = (64, 64) if tiny else (800, 1333)
    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU: much faster than on the CPU
        model = _swin_small(tiny)
    meta = load_metadata()
    work = tempfile.mkdtemp()
    rng = np.random.default_rng(0)
    # Smooth random images (noise compresses badly and decodes slower than generated images).
    for i in range(n_prompts):
        os.makedirs(os.path.join(work, f"{i:05d}", "samples"))
        with open(os.path.join(work, f"{i:05d}", "metadata.jsonl"), "w") as f:
            json.dump(meta[i], f)
        for j in range(4):
            small = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(small).resize((size, size), Image.BICUBIC).save(
                os.path.join(work, f"{i:05d}", "samples", f"{j:04d}.png")
            )

    out = {}
    for label, floor in (
        ("min_score=0.3 (CLI default)", 0.3),
        ("min_score=None (all 100 masks to CPU)", None),
    ):
        det = load_detector(
            "mask2former",
            model=model,
            processor=Mask2FormerImageProcessor(),
            device=device,
            test_size=test_size,
            min_score=floor,
        )
        # Warm-up on one image (cuDNN autotune, allocator).
        det.detect(
            Image.open(os.path.join(work, "00000", "samples", "0000.png")), [str(k) for k in range(80)]
        )
        _sync()
        t = time.perf_counter()
        evaluate(
            work,
            det,
            None,
            outfile=os.path.join(work, f"r{floor}.jsonl"),
            reference_metadata=None,
            progress=False,
        )
        _sync()
        dt = time.perf_counter() - t
        out[label] = {"images": 4 * n_prompts, "seconds": dt, "s_per_image": dt / (4 * n_prompts)}

    name = "ViT-B-32" if tiny else "ViT-L-14"
    with torch.device(device):
        clip_model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=None, device=device
        )
    clf = ColorClassifier(clip_model, preprocess, open_clip.get_tokenizer(name), device=device)
    image = Image.open(os.path.join(work, "00000", "samples", "0000.png")).convert("RGB")
    obj = {"box": [size * 0.2, size * 0.2, size * 0.7, size * 0.8], "mask": np.ones((size, size), bool)}
    clf.classify(image, [obj], "car")  # warm-up + text classifier for "car"
    reps = 10
    _sync()
    t = time.perf_counter()
    for k in range(reps):
        clf.text_classifier(f"object{k}")  # 10 colours x 3 templates, once per class name
    _sync()
    out["clip_text_classifier_s"] = (time.perf_counter() - t) / reps
    t = time.perf_counter()
    for _ in range(reps):
        clf.classify(image, [obj], "car")
    _sync()
    out["clip_per_crop_s"] = (time.perf_counter() - t) / reps
    return out


def bench_generate(tiny: bool, device: str, unet_config: str | None, steps: int) -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    dtype = torch.float16 if device == "cuda" else torch.float32
    if tiny:
        from diffalign.testing import tiny_sdxl_components

        comps = tiny_sdxl_components(0)
        unet, vae = comps["unet"], comps["vae"]
        latent, ctx_dim, pooled = 32, 64, 32
    else:
        with open(unet_config) as f:
            unet_cfg = json.load(f)
        with torch.device(device):  # random init of 2.6B parameters on the GPU
            unet = UNet2DConditionModel.from_config(unet_cfg)
            vae = AutoencoderKL(
                in_channels=3,
                out_channels=3,
                latent_channels=4,
                sample_size=1024,
                layers_per_block=2,
                block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4,
            )
        latent, ctx_dim, pooled = 128, 2048, 1280
    unet = unet.to(device, dtype).eval()
    vae = vae.to(device, dtype).eval()
    b = 4 * 2  # 4 images per prompt, classifier-free guidance doubles the batch
    x = torch.randn(b, 4, latent, latent, device=device, dtype=dtype)
    ctx = torch.randn(b, 77, ctx_dim, device=device, dtype=dtype)
    added = {
        "text_embeds": torch.randn(b, pooled, device=device, dtype=dtype),
        "time_ids": torch.tensor(
            [[latent * 8, latent * 8, 0, 0, latent * 8, latent * 8]] * b, device=device, dtype=dtype
        ),
    }
    with torch.no_grad():
        unet(x, 999, encoder_hidden_states=ctx, added_cond_kwargs=added)  # warm-up
        _sync()
        t = time.perf_counter()
        for s in range(steps):
            unet(x, 999 - s, encoder_hidden_states=ctx, added_cond_kwargs=added)
        _sync()
        step = (time.perf_counter() - t) / steps
        vae.decode(x[:4] / 0.13025)
        _sync()
        t = time.perf_counter()
        vae.decode(x[:4] / 0.13025)
        _sync()
        decode = time.perf_counter() - t
    per_prompt_50 = 50 * step + decode
    return {
        "unet_step_batch8_s": step,
        "vae_decode_batch4_s": decode,
        "per_prompt_50_steps_s": per_prompt_50,
        "dtype": str(dtype),
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--out", required=True)
    p.add_argument("--eval-prompts", type=int, default=12)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument(
        "--unet-config", default=os.path.join(os.path.dirname(__file__), "configs", "sdxl_unet.json")
    )
    p.add_argument("--skip-generate", action="store_true")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "tiny": args.tiny}
    result["evaluate"] = ev = bench_evaluate(args.tiny, device, args.eval_prompts)
    if not args.skip_generate:
        result["generate"] = bench_generate(args.tiny, device, args.unet_config, args.steps)
    # Extrapolate to the full benchmark. Colour crops: 94 colour prompts x 1 + 100 colour_attr x 2, x 4 images.
    crops = 4 * (94 * 1 + 100 * 2)
    det_s = ev["min_score=0.3 (CLI default)"]["s_per_image"] * N_IMAGES
    clip_s = ev["clip_per_crop_s"] * crops + ev["clip_text_classifier_s"] * 80  # at most 80 class names
    result["estimate_2212"] = {
        "evaluate_detect_s": det_s,
        "evaluate_clip_s": clip_s,
        "evaluate_total_s": det_s + clip_s,
    }
    if "generate" in result:
        result["estimate_2212"]["generate_s"] = result["generate"]["per_prompt_50_steps_s"] * N_PROMPTS
    print(f"device: {result['device']}{' (tiny models)' if args.tiny else ''}")
    print(f"{'stage':<60}{'value':>10}")
    for label, r in ev.items():
        if isinstance(r, dict):
            print(f"{'evaluate s/image, ' + label:<60}{r['s_per_image']:>10.4f}")
    print(f"{'CLIP colour s/crop':<60}{ev['clip_per_crop_s']:>10.4f}")
    print(f"{'CLIP text classifier s/class name':<60}{ev['clip_text_classifier_s']:>10.4f}")
    if "generate" in result:
        g = result["generate"]
        print(f"{'SDXL UNet step, batch 8 (4 img x CFG)':<60}{g['unet_step_batch8_s']:>10.4f}")
        print(f"{'SDXL VAE decode, batch 4':<60}{g['vae_decode_batch4_s']:>10.4f}")
    for k, v in result["estimate_2212"].items():
        print(f"{'2212 images: ' + k:<60}{v / 60:>7.1f} min")
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
