"""Training-step speed: our trainer vs a baseline loop in the style of the diffusers Diffusion-DPO example.

Baseline (as `examples/research_projects/diffusion_dpo/train_diffusion_dpo_sdxl.py` does it): every step
runs the VAE on the pixels and both text encoders on the prompts, one LoRA policy forward, then a
disable-adapters reference forward while the policy graph is alive, fp32 MSE, sigmoid DPO loss.
Ours: `PreferenceTrainer.optimizer_step` on cached latents + text embeddings (what `diffalign cache`
produces), reference forward first under no_grad, `per_sample_error` + `objectives.compute`.

Both run side by side in one process, alternating (ABAB), and we report medians.

    python benchmarks/train_step.py --out DIR                 # tiny SDXL on CPU
    python benchmarks/train_step.py --full-size --out DIR     # GPU: random full-size SDXL UNet + SD3-Medium
    python benchmarks/train_step.py --full-size --cpu-dry-run --out DIR   # full-size code path, tiny models

`--out` may be a folder (writes train_step.json there) or a .json path.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16, SXM parts


# --------------------------------------------------------------------------- models
def tiny_sdxl():
    from diffalign.testing import tiny_sdxl_components

    return tiny_sdxl_components(0)


def full_sdxl(device):
    """Random full-size SDXL: UNet from benchmarks/configs/sdxl_unet.json, CLIP-L + bigG text encoders, SDXL VAE."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from diffalign.tokenization import clip_tokenizer

    with open(os.path.join(HERE, "configs", "sdxl_unet.json")) as f:
        unet_cfg = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(unet_cfg)
        common = dict(vocab_size=49408, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, max_position_embeddings=77)
        te1 = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                                           projection_dim=768, hidden_act="quick_gelu", **common))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_attention_heads=20,
                                                         num_hidden_layers=32, projection_dim=1280, hidden_act="gelu", **common))
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=1024,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            scaling_factor=0.13025)
    tok = clip_tokenizer()
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                                   timestep_spacing="leading")
    return {"unet": unet, "vae": vae, "text_encoder": te1, "text_encoder_2": te2, "tokenizer": tok, "tokenizer_2": tok,
            "scheduler": sched}


def full_sd3(device):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from diffalign.tokenization import clip_tokenizer

    with open(os.path.join(HERE, "configs", "sd3_medium_transformer.json")) as f:
        cfg = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
    common = dict(vocab_size=49408, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, max_position_embeddings=77)
    with torch.device(device):
        transformer = SD3Transformer2DModel.from_config(cfg)
        te1 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                                         num_hidden_layers=12, projection_dim=768, hidden_act="quick_gelu", **common))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_attention_heads=20,
                                                         num_hidden_layers=32, projection_dim=1280, hidden_act="gelu", **common))
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16, sample_size=1024,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5305)
    tok = clip_tokenizer()
    return {"transformer": transformer, "vae": vae, "text_encoder": te1, "text_encoder_2": te2, "tokenizer": tok,
            "tokenizer_2": tok, "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0)}


def tiny_sd3():
    from diffalign.testing import tiny_sd3_components

    return tiny_sd3_components(0)


# --------------------------------------------------------------------------- baseline (diffusers DPO example style)
class BaselineDPO:
    """The per-step work of the public Diffusion-DPO SDXL LoRA example, written out."""

    def __init__(self, comps, device, weight_dtype, beta=5000.0, rank=8, lr=1e-5, grad_ckpt=False):
        from diffusers import DDPMScheduler
        from peft import LoraConfig

        self.c, self.device, self.dtype, self.beta = comps, device, weight_dtype, beta
        self.unet = comps["unet"]
        for name in ("vae", "text_encoder", "text_encoder_2"):
            comps[name].requires_grad_(False).eval()
        comps["vae"].to(device, dtype=torch.float32)  # fp32 VAE (the example upcasts unless an fp16-fix VAE is given)
        comps["text_encoder"].to(device, dtype=weight_dtype)
        comps["text_encoder_2"].to(device, dtype=weight_dtype)
        self.unet.requires_grad_(False).to(device, dtype=weight_dtype)
        self.unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                         target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
        params = [p for p in self.unet.parameters() if p.requires_grad]
        for p in params:
            p.data = p.data.float()
        if grad_ckpt:
            self.unet.enable_gradient_checkpointing()
        self.params = params
        self.opt = torch.optim.AdamW(params, lr=lr)
        self.sched = DDPMScheduler.from_config(comps["scheduler"].config)

    def encode_prompt(self, prompts):
        embeds, pooled = [], None
        for tok, te in ((self.c["tokenizer"], self.c["text_encoder"]), (self.c["tokenizer_2"], self.c["text_encoder_2"])):
            ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
            out = te(ids.to(self.device), output_hidden_states=True, return_dict=False)
            pooled = out[0]
            embeds.append(out[-1][-2])
        return torch.cat(embeds, dim=-1), pooled

    def step(self, batch):
        pixels = batch["pixel_values"]  # (B, 2, 3, H, W): the example stacks winners then losers
        b = pixels.shape[0]
        feed = torch.cat([pixels[:, 0], pixels[:, 1]]).to(self.device)
        with torch.no_grad():
            latents = self.c["vae"].encode(feed.float()).latent_dist.sample() * self.c["vae"].config.scaling_factor
            prompt_embeds, pooled = self.encode_prompt(list(batch["prompts"]))
        latents = latents.to(self.dtype)
        noise = torch.randn_like(latents).chunk(2)[0].repeat(2, 1, 1, 1)
        t = torch.randint(0, self.sched.config.num_train_timesteps, (b,), device=self.device).repeat(2)
        noisy = self.sched.add_noise(latents, noise, t)
        h, w = pixels.shape[-2:]
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], device=self.device, dtype=self.dtype).repeat(2 * b, 1)
        cond = {"time_ids": time_ids, "text_embeds": pooled.repeat(2, 1)}
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            pred = self.unet(noisy, t, prompt_embeds.repeat(2, 1, 1), added_cond_kwargs=cond).sample
        target = noise
        model_losses = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=[1, 2, 3])
        mw, ml = model_losses.chunk(2)
        with torch.no_grad(), torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            self.unet.disable_adapters()
            ref = self.unet(noisy, t, prompt_embeds.repeat(2, 1, 1), added_cond_kwargs=cond).sample
            self.unet.enable_adapters()
        ref_losses = F.mse_loss(ref.float(), target.float(), reduction="none").mean(dim=[1, 2, 3])
        rw, rl = ref_losses.chunk(2)
        inside = -0.5 * self.beta * ((mw - ml) - (rw - rl))
        loss = -F.logsigmoid(inside).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())


# --------------------------------------------------------------------------- ours
def make_ours(comps, family, mixed_precision, tuning, grad_ckpt=False, compile_=False, out_dir="/tmp/diffalign-bench"):
    from accelerate.state import AcceleratorState

    from diffalign.data.synthetic import SyntheticPreferenceDataset
    from diffalign.families import get_family
    from diffalign.training import PreferenceTrainer, TrainConfig

    # Modes in one run use different mixed precisions; accelerate allows one per process unless reset.
    AcceleratorState._reset_state(reset_partial_state=False)
    adapter = get_family(family).from_components(comps)
    cfg = TrainConfig(
        pretrained_model_name_or_path="(in-memory)", objective="dpo", beta=5000.0, tuning=tuning, lora_rank=8,
        learning_rate=1e-5, mixed_precision=mixed_precision, gradient_checkpointing=grad_ckpt, torch_compile=compile_,
        report_to="none", checkpointing_steps=0, progress_bar=False, output_dir=out_dir, overwrite_output_dir=True,
    )
    return PreferenceTrainer(cfg, train_dataset=SyntheticPreferenceDataset(num_groups=4, resolution=8), adapter=adapter)


def cached_batch(adapter, pixel_values, prompts, device, random_latents_shape=None):
    """The batch `diffalign cache` yields: latents + text embeddings instead of pixels."""
    b, k = pixel_values.shape[:2]
    if random_latents_shape is not None:  # full size: skip the VAE, speed does not depend on latent values
        latents = torch.randn(b, k, *random_latents_shape)
    else:
        with torch.no_grad():
            lat = adapter.encode_images(pixel_values.flatten(0, 1).to(device))
        latents = lat.float().view(b, k, *lat.shape[1:]).cpu()
    with torch.no_grad():
        text = {key: v.cpu() for key, v in adapter.encode_prompts(prompts).items()}
    h, w = pixel_values.shape[-2:]
    return {"latents": latents, "text": text, "scores": torch.tensor([[1.0, 0.0]] * b), "prompts": prompts,
            "original_sizes": torch.tensor([[[h, w]] * k] * b), "crop_top_lefts": torch.zeros(b, k, 2, dtype=torch.long)}


def pixel_batch(b, res, prompts):
    g = torch.Generator().manual_seed(0)
    return {"pixel_values": torch.rand(b, 2, 3, res, res, generator=g) * 2 - 1, "scores": torch.tensor([[1.0, 0.0]] * b),
            "prompts": prompts, "original_sizes": torch.tensor([[[res, res]] * 2] * b),
            "crop_top_lefts": torch.zeros(b, 2, 2, dtype=torch.long)}


# --------------------------------------------------------------------------- measurement
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def count_flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def peak_tflops(device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None


def row(name, times, pairs, device, flops=None, peak_mem=None, note=""):
    med = statistics.median(times)
    out = {"mode": name, "median_step_s": med, "pairs_per_s": pairs / med, "steps_timed": len(times)}
    peak = peak_tflops(device)
    if flops is not None:
        out["tflop_per_step"] = flops / 1e12
        if peak:
            out["mfu"] = flops / med / (peak * 1e12)
    if peak_mem is not None:
        out["peak_mem_gib"] = peak_mem / 2**30
    if note:
        out["note"] = note
    return out


def free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def run_interleaved(fns, rounds, warmup, device):
    """Alternate the step functions (ABCABC...); returns one time list per function."""
    times = [[] for _ in fns]
    for i in range(warmup + rounds):
        for j, fn in enumerate(fns):
            t = timed(lambda fn=fn, i=i: fn(i), device)
            if i >= warmup:
                times[j].append(t)
    return times


def with_reference(ours, batch):
    """The cached batch plus its precomputed reference errors (`precompute_reference=True`)."""
    batch = {**batch, "group_keys": [(0, j) for j in range(len(batch["scores"]))]}
    return {**batch, "ref_errors": ours.reference_errors(batch).float().cpu()}


def run_single(ours, batch, rounds, warmup, device):
    times = []
    for i in range(warmup + rounds):
        t = timed(lambda i=i: ours.optimizer_step([batch], i, i), device)
        if i >= warmup:
            times.append(t)
    return times


def mem_of(fn, device):
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats()
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated()


# --------------------------------------------------------------------------- suites
def cpu_suite(args):
    device = torch.device("cpu")
    b, res = 2, 64
    prompts = ["a red cube on a blue sphere", "two cats on a sofa"][:b]
    base = BaselineDPO(tiny_sdxl(), device, torch.float32)
    ours = make_ours(tiny_sdxl(), "sdxl", "no", "lora")
    pix = pixel_batch(b, res, prompts)
    cached = cached_batch(ours.adapter, pix["pixel_values"], prompts, device)
    cached_ref = with_reference(ours, cached)
    bt, ot, rt, nt, pt = run_interleaved([
        lambda i: base.step(pix),
        lambda i: ours.optimizer_step([cached], i, i),
        lambda i: ours.optimizer_step([cached_ref], i, i),
        lambda i: ours.optimizer_step([pix], i, i),
        lambda i: ours.reference_errors(cached_ref),
    ], args.rounds, args.warmup, device)
    rows = [
        row("baseline: diffusers DPO example style (VAE+text every step, LoRA r8)", bt, b, device),
        row("ours: cached latents+text (LoRA r8)", ot, b, device),
        row("ours: cached latents+text + precomputed reference errors", rt, b, device),
        row("ours: no cache (VAE+text every step)", nt, b, device),
        row("(reference pre-pass alone for one step's groups, run before training)", pt, b, device),
    ]
    med = statistics.median
    return {"device": "cpu", "threads": torch.get_num_threads(), "model": "tiny SDXL (diffalign.testing), 64 px, 2 pairs, fp32",
            "ratio_ours_cached_over_baseline": med(ot) / med(bt),
            "ratio_ours_cached_precomputed_ref_over_baseline": med(rt) / med(bt),
            "ratio_ours_nocache_over_baseline": med(nt) / med(bt),
            "ratio_ours_precomputed_ref_plus_prepass_over_baseline": (med(rt) + med(pt)) / med(bt),
            "target_ratio": 0.7, "rows": rows}


def full_suite(args, emit=lambda partial: None):
    """`emit` gets the partial result after every mode, so a run killed by a time limit still leaves JSON."""
    dry = args.cpu_dry_run
    device = torch.device("cpu" if dry else "cuda")
    if not dry and not torch.cuda.is_available():
        raise SystemExit("--full-size needs a CUDA GPU (or add --cpu-dry-run to check the code path on tiny models)")
    mp, dtype = ("no", torch.float32) if dry else ("bf16", torch.bfloat16)
    res = 64 if dry else 1024
    b = args.pairs
    prompts = [f"a photo of object {i}" for i in range(b)]
    t_start = time.perf_counter()
    rows, skipped = [], []
    sdxl_comps = (lambda: tiny_sdxl()) if dry else (lambda: full_sdxl(device))
    sd3_comps = (lambda: tiny_sd3()) if dry else (lambda: full_sd3(device))
    lat_sdxl = (4, res // 2, res // 2) if dry else (4, res // 8, res // 8)
    lat_sd3 = (4, 32, 32) if dry else (16, res // 8, res // 8)
    R, W = args.rounds, args.warmup

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run, tiny models)"
    result = {"device": name, "peak_bf16_tflops": peak_tflops(device), "resolution": res, "pairs_per_step": b,
              "skipped_over_budget": skipped, "rows": rows}

    def over_budget(name, headroom=0.0):
        result["wall_s"] = time.perf_counter() - t_start
        emit(result)
        if time.perf_counter() - t_start > args.budget_s - headroom:
            skipped.append(name)
            return True
        return False

    # 1) SDXL LoRA: baseline vs ours, ABAB (both resident).
    base = BaselineDPO(sdxl_comps(), device, dtype)
    ours = make_ours(sdxl_comps(), "sdxl", mp, "lora")
    pix = pixel_batch(b, res, prompts)
    cached = cached_batch(ours.adapter, pix["pixel_values"], prompts, device, random_latents_shape=lat_sdxl)
    cached_ref = with_reference(ours, cached)
    bt, ot, rt = run_interleaved([
        lambda i: base.step(pix),
        lambda i: ours.optimizer_step([cached], i, i),
        lambda i: ours.optimizer_step([cached_ref], i, i),
    ], R, W, device)
    f_base = count_flops(lambda: base.step(pix))
    f_ours = count_flops(lambda: ours.optimizer_step([cached], 0, 0))
    f_ref = count_flops(lambda: ours.optimizer_step([cached_ref], 0, 0))
    m_base = mem_of(lambda: base.step(pix), device)
    m_ours = mem_of(lambda: ours.optimizer_step([cached], 0, 0), device)
    m_ref = mem_of(lambda: ours.optimizer_step([cached_ref], 0, 0), device)
    note = "interleaved with baseline; both models resident"
    rows.append(row("sdxl baseline DPO-example LoRA (VAE+text each step)", bt, b, device, f_base, m_base, note))
    rows.append(row("sdxl ours LoRA (cache)", ot, b, device, f_ours, m_ours, note))
    rows.append(row("sdxl ours LoRA (cache + precomputed ref)", rt, b, device, f_ref, m_ref, note))
    med = statistics.median
    result["ratio_ours_cached_over_baseline"] = med(ot) / med(bt)
    result["ratio_ours_cached_precomputed_ref_over_baseline"] = med(rt) / med(bt)
    base = ours = None  # free before the next mode
    free()

    def single(name, comps_fn, family, tuning, gc_, compile_, lat, flops=None):
        if over_budget(name, headroom=args.compile_headroom_s if compile_ else 0.0):
            return None
        tr = make_ours(comps_fn(), family, mp, tuning, grad_ckpt=gc_, compile_=compile_)
        batch = cached_batch(tr.adapter, pixel_batch(b, res, prompts)["pixel_values"], prompts, device, random_latents_shape=lat)
        times = run_single(tr, batch, R, W + (1 if compile_ else 0), device)
        f = flops if flops is not None else count_flops(lambda: tr.optimizer_step([batch], 0, 0))
        m = mem_of(lambda: tr.optimizer_step([batch], 0, 0), device)
        rows.append(row(name, times, b, device, f, m, "flops from the eager run" if compile_ else ""))
        tr = None  # noqa: F841 (free before the next mode)
        free()
        return f

    single("sdxl ours LoRA + grad ckpt (cache)", sdxl_comps, "sdxl", "lora", True, False, lat_sdxl)
    single("sdxl ours full FT, frozen ref copy (bf16 on GPU), grad ckpt (cache)", sdxl_comps, "sdxl", "full", True, False, lat_sdxl)
    f3 = single("sd3 ours LoRA (cache)", sd3_comps, "sd3", "lora", False, False, lat_sd3)
    single("sd3 ours full FT, frozen ref copy (bf16 on GPU), grad ckpt (cache)", sd3_comps, "sd3", "full", True, False, lat_sd3)
    if not args.no_compile:
        single("sdxl ours LoRA + torch.compile (cache)", sdxl_comps, "sdxl", "lora", False, True, lat_sdxl, flops=f_ours)
        single("sd3 ours LoRA + torch.compile (cache)", sd3_comps, "sd3", "lora", False, True, lat_sd3, flops=f3)
    result["wall_s"] = time.perf_counter() - t_start
    return result


def print_table(result):
    rows = result["rows"]
    cols = ["mode", "median_step_s", "pairs_per_s", "tflop_per_step", "mfu", "peak_mem_gib"]
    print(f"device: {result['device']}")
    print(" | ".join(cols))
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            cells.append(f"{v:.4g}" if isinstance(v, float) else str(v))
        print(" | ".join(cells))
    for key, value in result.items():
        if key.startswith("ratio_"):
            print(f"{key}: {value:.3f}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full-size", action="store_true")
    p.add_argument("--cpu-dry-run", action="store_true", help="with --full-size: tiny models on CPU, to test the script")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--rounds", type=int, default=None, help="timed steps per mode (default 15 CPU, 5 GPU)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--pairs", type=int, default=1, help="pairs per step for --full-size")
    p.add_argument("--budget-s", type=float, default=240.0, help="--full-size: skip remaining modes after this many seconds")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--compile-headroom-s", type=float, default=90.0,
                   help="start a torch.compile mode only if this much of --budget-s is left (compilation is slow)")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if args.rounds is None:
        args.rounds = 5 if args.full_size else 15
    torch.manual_seed(0)
    out = args.out if args.out.endswith(".json") else os.path.join(args.out, "train_step.json")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)

    def write(result):
        result["command"] = " ".join(sys.argv)
        tmp = out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=2)
        os.replace(tmp, out)

    result = full_suite(args, emit=write) if args.full_size else cpu_suite(args)
    write(result)
    print_table(result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
