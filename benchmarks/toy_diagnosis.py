"""Why does fine-tuning toy-sdxl on its own samples pull its toy-GenEval down? (issue #15, "Diagnose first")

    python benchmarks/toy_diagnosis.py --base runs/diag/toy-sdxl-v1 --out runs/diag/out \
        [--arms base,text,png,latent,oracle,g1,g5,cont] [--json benchmarks/results/toy_diagnosis.json]

One experiment per hypothesis. Every model is judged on the same 360 images with shared noise, exactly as the
quickstart evaluates (`quickstart.eval_rows(60)`, `evaluate`, `QuickstartConfig()` defaults: 10 DPM-Solver++
steps, guidance 5), and each arm's delta against the base comes from `quickstart.paired_deltas`.

Arms (SFT = LoRA r16, lr 1e-3 constant, 80 steps x 4 images, the project's `PreferenceTrainer`, objective sft,
via `quickstart.train_config`; 64 training prompts `quickstart.training_prompts(64, 0)`, one image per prompt):
  base          the model itself
  text          `probe_text` on the model's text encoders and on randomly initialised copies (no training)
  png / latent  SFT on the best of k=4 own samples (guidance 2/3.5/5/7, the quickstart's synth seeds), through
                uint8 PNG + VAE encode (what synth + the pixel dataset do) / on the latents kept as generated
  oracle        SFT on rendered ground-truth scenes for the same prompts (`scenes.sample_scene`)
  oracle_lr2e-4 the same at lr 2e-4
  g1 / g5       plain SFT (no selection) on own samples at guidance 1 / 5 (same noise seeds)
  cont          continue the pretrain recipe from the weights (`python -m diffalign.toyworld.pretrain --init_from`)
  cont_lr3e-4   the same with --lr 3e-4
  <arm>+bu      an SFT arm's model evaluated with the BASE model's unconditional branch under CFG (LoRA only on the
                conditional half): does the drop come from the untrained unconditional prediction drifting?
Each arm writes <out>/arm-<name>.json and is skipped when that file exists (resumable). Own samples are generated
once and cached in <out>/samples.pt.
"""

from __future__ import annotations

import os

# One thread, passive waits: another job shares this 2-core machine. Set before torch loads OpenMP.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from diffalign.toyworld import quickstart as Q  # noqa: E402
from diffalign.toyworld import scenes  # noqa: E402

ARMS = ("base", "text", "png", "latent", "oracle", "oracle_lr2e-4", "g1", "g5", "cont", "cont_lr3e-4")
ALL_ARMS = ARMS + tuple(f"{a}+bu" for a in ("png", "latent", "oracle", "oracle_lr2e-4", "g1", "g5"))
SYNTH_STEPS = 20  # the quickstart's synth: the checkpoint's own 20-step Euler sampler
SYNTH_BATCH = 32


# ------------------------------------------------------------------------------------------------
# Own samples: latents as generated, their decoded images, the checker's verdicts
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def generate_latents(pipe, prompts: list[str], seeds: list[int], guidance: float) -> torch.Tensor:
    """The latents the SDXL pipeline returns with output_type="latent": already multiplied by the VAE's
    scaling_factor (the pipeline divides by it before decoding), i.e. the space the trainer's
    `encode_images` produces. Noise exactly as synth's `generate_images` (one CPU generator per image)."""
    out = []
    for s in range(0, len(prompts), SYNTH_BATCH):
        gens = [torch.Generator("cpu").manual_seed(int(x)) for x in seeds[s : s + SYNTH_BATCH]]
        res = pipe(prompt=prompts[s : s + SYNTH_BATCH], num_inference_steps=SYNTH_STEPS, guidance_scale=guidance,
                   generator=gens, height=Q.IMAGE_SIZE, width=Q.IMAGE_SIZE, output_type="latent")
        out.append(res.images.float())
    return torch.cat(out)


@torch.no_grad()
def decode_latents(pipe, latents: torch.Tensor):
    """PIL images exactly as the pipeline's own decode path makes them (this toy VAE has no latents_mean/std)."""
    vae = pipe.vae
    x = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
    if pipe.watermark is not None:
        x = pipe.watermark.apply_watermark(x)
    return pipe.image_processor.postprocess(x, output_type="pil")


def judge(images, prompts: list[str]) -> tuple[list[float], list[bool]]:
    """`toy_geneval_graded` score and the official verdict per image (the exact checker)."""
    from diffalign.toyworld.detector import ToyWorldDetector
    from diffalign.toyworld.toy_rewards import graded_score, metadata_for_prompt

    det = ToyWorldDetector()
    scores, verdicts = [], []
    for image, prompt in zip(images, prompts):
        meta = metadata_for_prompt(prompt)
        names = sorted({c["class"] for c in meta.get("include", []) + meta.get("exclude", [])})
        s, v = graded_score(det.detect(image, names), meta)
        scores.append(float(s))
        verdicts.append(bool(v))
    return scores, verdicts


def own_samples(base: str, out: str, rows: list[dict]) -> dict:
    """k=4 images per prompt at the quickstart's guidances and synth seeds, plus guidance 1 with the guidance-5
    seeds; cached. Seeds: generator i draws prompt p with (16 * seed + i) * 100000 + p (quickstart.generator_specs,
    seed 0, per-prompt policy)."""
    path = os.path.join(out, "samples.pt")
    if os.path.exists(path):
        return torch.load(path, weights_only=False)
    pipe = Q.load_base_pipeline("sdxl", base)  # the checkpoint's own Euler sampler, as synth
    prompts = [r["prompt"] for r in rows]
    cfg = Q.QuickstartConfig()
    runs = [(f"g{g:g}", g, [i * 100_000 + p for p in range(len(rows))]) for i, g in enumerate(cfg.guidances)]
    g5_seeds = runs[list(cfg.guidances).index(5.0)][2]
    runs.append(("g1", 1.0, g5_seeds))  # same noise as the guidance-5 samples: only the guidance differs
    data = {"prompts": prompts, "gens": {}}
    t0 = time.perf_counter()
    for name, g, seeds in runs:
        lat = generate_latents(pipe, prompts, seeds, g)
        images = decode_latents(pipe, lat)
        scores, verdicts = judge(images, prompts)
        data["gens"][name] = {"guidance": g, "seeds": seeds, "latents": lat, "images": images, "scores": scores,
                              "verdicts": verdicts}
        print(f"samples {name}: correct {np.mean(verdicts):.3f}, mean graded {np.mean(scores):.3f}", flush=True)
    data["seconds"] = time.perf_counter() - t0
    torch.save(data, path)
    return data


def best_of_k(data: dict) -> tuple[list[str], list[int]]:
    """Per prompt the generator with the highest graded score; ties go to the first in generator order
    (2, 3.5, 5, 7), as the quickstart's SFT does (stable ranks_from on phi)."""
    names = [f"g{g:g}" for g in Q.QuickstartConfig().guidances]
    s = np.array([data["gens"][n]["scores"] for n in names])  # (k, P)
    pick = s.argmax(0)  # argmax returns the first maximum
    return names, pick.tolist()


# ------------------------------------------------------------------------------------------------
# SFT data sets: one image per group, either pixels (through PNG, as synth + RankedDataset) or latents
# ------------------------------------------------------------------------------------------------


class SFTImages(torch.utils.data.Dataset):
    """Groups of k=2 for `PreferenceTrainer`: the image (score 1) and a copy of it (score 0; the objectives refuse
    k=1). SFT trains only the best image of a group, and the group's noise and timestep do not depend on k, so this
    trains the same images as the quickstart with 8 forward passes a step instead of 16."""

    def __init__(self, prompts: list[str], pixels: list[torch.Tensor] | None = None, latents: torch.Tensor | None = None):
        self.prompts, self.pixels, self.latents = prompts, pixels, latents

    def __len__(self):
        return len(self.prompts)

    def __getitem__(self, i: int) -> dict:
        item = {"scores": torch.tensor([1.0, 0.0]), "prompt": self.prompts[i], "prompt_id": str(i), "user_id": None,
                "original_sizes": torch.tensor([[Q.IMAGE_SIZE, Q.IMAGE_SIZE]] * 2), "crop_top_lefts": torch.tensor([[0, 0]] * 2)}
        if self.latents is not None:
            item["latents"] = self.latents[i][None].expand(2, -1, -1, -1).clone()
        else:
            item["pixel_values"] = self.pixels[i][None].expand(2, -1, -1, -1).clone()
        return item


def png_pixels(images) -> list[torch.Tensor]:
    """What synth + the pixel dataset do: uint8 PNG bytes, decode, ImageTransform -> [-1, 1] pixels."""
    from diffalign.data import ImageTransform, decode_image
    from diffalign.synth.schema import encode_png

    tf = ImageTransform(Q.IMAGE_SIZE)
    return [tf(decode_image(encode_png(im)))[0] for im in images]


def train_sft(base: str, dataset, out_dir: str, learning_rate: float | None = None):
    """The quickstart's SFT training (train_config at QuickstartConfig defaults) on `dataset`."""
    from diffalign.training import PreferenceTrainer

    cfg = Q.QuickstartConfig(progress=False, **({} if learning_rate is None else {"learning_rate": learning_rate}))
    tcfg = Q.train_config(cfg, base, out_dir, out_dir, k=2, objective="sft")
    if os.path.exists(os.path.join(out_dir, "losses.jsonl")):
        os.remove(os.path.join(out_dir, "losses.jsonl"))
    t0 = time.perf_counter()
    trainer = PreferenceTrainer(tcfg, train_dataset=dataset)
    summary = trainer.train()
    wall = time.perf_counter() - t0
    pipe = Q.trained_pipeline(trainer, cfg.eval_sampler)
    return pipe, {"wall_s": wall, "final_loss": summary.get("final_loss"), "mean_loss_last_10": summary.get("mean_loss_last_10"),
                  "steps": summary.get("global_step"), "learning_rate": tcfg.learning_rate}


def base_unconditional(pipe):
    """Make the pipeline's CFG use the base model (LoRA off) for the unconditional half of each batch and the
    fine-tuned one for the conditional half. SFT never trains the unconditional branch (prompt_dropout 0), yet the
    LoRA on self-attention and on the query/output projections moves it, and guidance 5 weighs it by -4."""
    from diffalign.training.trainer import adapters_disabled

    unet = pipe.unet
    forward = unet.forward

    def split_forward(sample, timestep, encoder_hidden_states, added_cond_kwargs=None, **kw):
        n = sample.shape[0] // 2  # the SDXL pipeline stacks [negative, positive]
        half = lambda sl: {k: v[sl] for k, v in (added_cond_kwargs or {}).items()}  # noqa: E731
        with adapters_disabled(unet):
            u = forward(sample[:n], timestep, encoder_hidden_states[:n], added_cond_kwargs=half(slice(0, n)), **kw)[0]
        c = forward(sample[n:], timestep, encoder_hidden_states[n:], added_cond_kwargs=half(slice(n, None)), **kw)[0]
        return (torch.cat([u, c]),)

    unet.forward = split_forward
    return pipe


def evaluate_pipe(pipe, rows) -> dict:
    res = Q.evaluate(pipe, rows, Q.QuickstartConfig(progress=False))
    return {"summary": res["summary"], "correct": res["correct"]}


# ------------------------------------------------------------------------------------------------
# VAE round trip (arm 3)
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def round_trip(pipe, latents: torch.Tensor, images, prompts: list[str]) -> dict:
    """Generated latent z vs re-encoded latent of its PNG: MSE / Var(z) for the posterior mean and for a posterior
    sample (the trainer samples), and the checker's verdicts on decode(re-encoded) vs the image itself."""
    vae = pipe.vae
    sf = vae.config.scaling_factor
    px = torch.stack(png_pixels(images))
    dist = vae.encode(px).latent_dist
    z_mean = dist.mean * sf
    z_samp = dist.sample(torch.Generator().manual_seed(0)) * sf
    var = float(latents.var())
    dec = decode_latents(pipe, z_mean)
    _, v_orig = judge(images, prompts)
    _, v_rt = judge(dec, prompts)
    v_orig, v_rt = np.array(v_orig), np.array(v_rt)
    pix_orig = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32)) for im in images])
    pix_rt = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32)) for im in dec])
    return {
        "n": len(prompts),
        "latent_var": var,
        "rel_mse_mean": float(((z_mean - latents) ** 2).mean()) / var,
        "rel_mse_sample": float(((z_samp - latents) ** 2).mean()) / var,
        "posterior_std_mean": float((dist.std * sf).mean()),
        "pixel_rmse_uint8": float(((pix_rt - pix_orig) ** 2).mean().sqrt()),
        "correct_original": float(v_orig.mean()),
        "correct_round_trip": float(v_rt.mean()),
        "verdict_changed": float((v_orig != v_rt).mean()),
        "lost": int((v_orig & ~v_rt).sum()),
        "gained": int((~v_orig & v_rt).sum()),
    }


# ------------------------------------------------------------------------------------------------
# Text capacity (arm 5)
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def _embed(pipe, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """What the SDXL denoiser receives: prompt_embeds (both encoders' penultimate states, concatenated) and the
    pooled embedding of the second encoder (`pipe.encode_prompt`, no CFG)."""
    embeds, pooled = [], []
    for s in range(0, len(prompts), 256):
        pe, _, pp, _ = pipe.encode_prompt(prompts[s : s + 256], device=pipe.device, num_images_per_prompt=1,
                                          do_classifier_free_guidance=False)
        embeds.append(pe.flatten(1).float().cpu().numpy())
        pooled.append(pp.float().cpu().numpy())
    return np.concatenate(embeds), np.concatenate(pooled)


def _fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y) + l2 * (w**2).sum() / 2
        loss.backward()
        return loss

    opt.step(closure)
    return w, b


def _probe_accuracy(x: np.ndarray, y: np.ndarray, groups: np.ndarray, folds: int, l2: float = 1e-2) -> float:
    """Held-out accuracy of an L2 logistic regression (torch LBFGS on standardised features), cross-validated over
    groups: prompts of a held-out group are never seen in training."""
    uniq = np.unique(groups)
    split = np.array_split(np.random.default_rng(0).permutation(uniq), min(folds, len(uniq)))
    hits, total = 0, 0
    for held in split:
        te = np.isin(groups, held)
        mu, sd = x[~te].mean(0), x[~te].std(0) + 1e-6
        xtr = torch.tensor((x[~te] - mu) / sd, dtype=torch.float64)
        xte = torch.tensor((x[te] - mu) / sd, dtype=torch.float64)
        w, b = _fit_logistic(xtr, torch.tensor(y[~te], dtype=torch.float64), l2)
        pred = ((xte @ w + b) > 0).detach().numpy()
        hits += int((pred == y[te].astype(bool)).sum())
        total += int(te.sum())
    return hits / total


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float((a * b).sum(1).mean())


def probe_text(pipe) -> dict:
    """Are (i) swapped colour attributes and (ii) left/right separable in the embeddings an SDXL pipeline's denoiser
    receives? Works on any StableDiffusionXLPipeline (any text width). Prompts use the toy grammar.

    (i) binding: all 1,800 "a photo of a <c1> <s1> and a <c2> <s2>" prompts. Label: is the lower-index colour on the
        lower-index shape? Both labels use the same words, and the label is an XOR of two word orders, so a linear
        probe on position-wise token identities cannot solve it: only context (which colour goes with which shape)
        can. Held out: whole colour pairs (5-fold).
    (ii) position: "a photo of a <s1> left of / right of a <s2>" (40 prompts). (a) "word": left vs right (one token
        differs: a lower bound on what the encoder keeps); (b) "semantic": is the lower-index shape on the left
        (XOR of the word and the shape order). Held out: whole shape pairs (leave one pair out). The same probes on
        3,600 coloured variants ("a photo of a red star left of a blue ring") under "position_coloured".
    Cosines: mean cosine of each prompt with its swap (colours swapped / left<->right) against random pairs of the
    same family, and with its same-meaning reordering (objects listed the other way round).
    """
    t0 = time.perf_counter()
    C, S = scenes.COLORS, scenes.SHAPES
    # (i) colour binding
    attr = [(ca, sa, cb, sb) for ca in C for cb in C if ca != cb for sa in S for sb in S if sa != sb]
    text = [scenes.color_attr_row(sa, ca, sb, cb)["prompt"] for ca, sa, cb, sb in attr]
    swap = [scenes.color_attr_row(sa, cb, sb, ca)["prompt"] for ca, sa, cb, sb in attr]
    reorder = [scenes.color_attr_row(sb, cb, sa, ca)["prompt"] for ca, sa, cb, sb in attr]
    y = np.array([(C.index(ca) < C.index(cb)) == (S.index(sa) < S.index(sb)) for ca, sa, cb, sb in attr], dtype=float)
    groups = np.array([C.index(min(ca, cb, key=C.index)) * 10 + C.index(max(ca, cb, key=C.index)) for ca, _, cb, _ in attr])
    e, p = _embed(pipe, text)
    e_sw, p_sw = _embed(pipe, swap)
    e_ro, p_ro = _embed(pipe, reorder)
    perm = np.random.default_rng(1).permutation(len(text))
    out: dict = {"binding": {
        "n": len(text), "probe_acc_prompt_embeds": _probe_accuracy(e, y, groups, 5),
        "probe_acc_pooled": _probe_accuracy(p, y, groups, 5),
        "cos_swapped_prompt_embeds": _cos(e, e_sw), "cos_random_prompt_embeds": _cos(e, e[perm]),
        "cos_reordered_prompt_embeds": _cos(e, e_ro),
        "cos_swapped_pooled": _cos(p, p_sw), "cos_random_pooled": _cos(p, p[perm]), "cos_reordered_pooled": _cos(p, p_ro),
    }}
    # (ii) left / right
    pos = [(sa, rel, sb) for sa in S for sb in S if sa != sb for rel in ("left of", "right of")]
    text = [scenes.position_row(sa, rel, sb)["prompt"] for sa, rel, sb in pos]
    flip = [scenes.position_row(sa, "right of" if rel == "left of" else "left of", sb)["prompt"] for sa, rel, sb in pos]
    same = [scenes.position_row(sb, "right of" if rel == "left of" else "left of", sa)["prompt"] for sa, rel, sb in pos]
    y_word = np.array([rel == "left of" for _, rel, _ in pos], dtype=float)
    y_sem = np.array([(rel == "left of") == (S.index(sa) < S.index(sb)) for sa, rel, sb in pos], dtype=float)
    groups = np.array([min(S.index(sa), S.index(sb)) * 10 + max(S.index(sa), S.index(sb)) for sa, _, sb in pos])
    e, p = _embed(pipe, text)
    e_fl, p_fl = _embed(pipe, flip)
    e_sm, p_sm = _embed(pipe, same)
    perm = np.random.default_rng(2).permutation(len(text))
    out["position"] = {
        "n": len(text),
        "probe_acc_word_prompt_embeds": _probe_accuracy(e, y_word, groups, 10),
        "probe_acc_word_pooled": _probe_accuracy(p, y_word, groups, 10),
        "probe_acc_semantic_prompt_embeds": _probe_accuracy(e, y_sem, groups, 10),
        "probe_acc_semantic_pooled": _probe_accuracy(p, y_sem, groups, 10),
        "cos_flipped_prompt_embeds": _cos(e, e_fl), "cos_random_prompt_embeds": _cos(e, e[perm]),
        "cos_same_meaning_prompt_embeds": _cos(e, e_sm),
        "cos_flipped_pooled": _cos(p, p_fl), "cos_random_pooled": _cos(p, p[perm]), "cos_same_meaning_pooled": _cos(p, p_sm),
    }
    # (ii') the same with colours named (the pretraining's full captions, "a photo of a red star left of a blue
    # ring"): 3,600 prompts, so the semantic probe has data enough to be read; held out: shape pairs (5-fold).
    pos = [(ca, sa, rel, cb, sb) for sa in S for sb in S if sa != sb for ca in C for cb in C if ca != cb
           for rel in ("left of", "right of")]
    text = [f"a photo of {scenes._a(sa, ca)} {rel} {scenes._a(sb, cb)}" for ca, sa, rel, cb, sb in pos]
    y_word = np.array([rel == "left of" for _, _, rel, _, _ in pos], dtype=float)
    y_sem = np.array([(rel == "left of") == (S.index(sa) < S.index(sb)) for _, sa, rel, _, sb in pos], dtype=float)
    groups = np.array([min(S.index(sa), S.index(sb)) * 10 + max(S.index(sa), S.index(sb)) for _, sa, _, _, sb in pos])
    ec, pc = _embed(pipe, text)
    out["position_coloured"] = {
        "n": len(text),
        "probe_acc_word_prompt_embeds": _probe_accuracy(ec, y_word, groups, 5),
        "probe_acc_word_pooled": _probe_accuracy(pc, y_word, groups, 5),
        "probe_acc_semantic_prompt_embeds": _probe_accuracy(ec, y_sem, groups, 5),
        "probe_acc_semantic_pooled": _probe_accuracy(pc, y_sem, groups, 5),
    }
    out["dims"] = {"prompt_embeds": int(e.shape[1]), "pooled": int(p.shape[1])}
    out["seconds"] = time.perf_counter() - t0
    return out


def random_text_copy(pipe, seed: int = 0):
    """The same pipeline with freshly initialised text encoders of the same configs (the probe's floor)."""
    from diffusers import StableDiffusionXLPipeline

    torch.manual_seed(seed)
    enc = {name: type(getattr(pipe, name))(copy.deepcopy(getattr(pipe, name).config)).eval() for name in ("text_encoder", "text_encoder_2")}
    return StableDiffusionXLPipeline(**{**pipe.components, **enc})


# ------------------------------------------------------------------------------------------------
# Arms
# ------------------------------------------------------------------------------------------------


def arm_sft(args, name: str, rows: list[dict]) -> dict:
    """png / latent / oracle / g1 / g5: build the 64-image set, train SFT, evaluate. A "+bu" suffix evaluates the
    same training with the base model's unconditional prediction (`base_unconditional`)."""
    arm, split_cfg = name, name.endswith("+bu")
    name = name.removesuffix("+bu")
    train_rows = Q.training_prompts(64, 0)
    prompts = [r["prompt"] for r in train_rows]
    info: dict = {}
    if name in ("oracle", "oracle_lr2e-4"):
        images = [scenes.render(scenes.sample_scene(r, np.random.default_rng([0, i]))) for i, r in enumerate(train_rows)]
        info["train_correct"] = float(np.mean(judge(images, prompts)[1]))
        dataset = SFTImages(prompts, pixels=png_pixels(images))
    else:
        data = own_samples(args.base, args.out, train_rows)
        if name in ("png", "latent"):
            names, pick = best_of_k(data)
            lat = torch.stack([data["gens"][names[j]]["latents"][i] for i, j in enumerate(pick)])
            images = [data["gens"][names[j]]["images"][i] for i, j in enumerate(pick)]
            verdicts = [data["gens"][names[j]]["verdicts"][i] for i, j in enumerate(pick)]
            info["picked_generator_counts"] = {n: int(sum(j == k for j in pick)) for k, n in enumerate(names)}
            info["all_tied_lists"] = int(sum(len({data["gens"][n]["scores"][i] for n in names}) == 1 for i in range(len(prompts))))
            info["per_generator_correct"] = {n: float(np.mean(data["gens"][n]["verdicts"])) for n in names}
            if name == "png":
                info["round_trip"] = round_trip(Q.load_base_pipeline("sdxl", args.base), lat, images, prompts)
        else:
            g = data["gens"][name]
            lat, images, verdicts = g["latents"], g["images"], g["verdicts"]
        info["train_correct"] = float(np.mean(verdicts))
        info["train_correct_per_task"] = {t: float(np.mean([v for v, r in zip(verdicts, train_rows) if r["tag"] == t]))
                                          for t in scenes.TASKS}
        info["sample_seconds"] = data["seconds"]
        # g1/g5 use the path arm 3 found harmless (args.guidance_path, default latent: no re-encoding in between)
        use_latent = name == "latent" or (name in ("g1", "g5") and args.guidance_path == "latent")
        info["data_path"] = "latent" if use_latent else "png"
        dataset = SFTImages(prompts, latents=lat) if use_latent else SFTImages(prompts, pixels=png_pixels(images))
    lr = 2e-4 if name.endswith("lr2e-4") else None
    pipe, train = train_sft(args.base, dataset, os.path.join(args.out, f"train-{arm}"), lr)
    if split_cfg:
        pipe = base_unconditional(pipe)
    return {**info, "train": train, **evaluate_pipe(pipe, rows)}


def arm_cont(args, name: str, rows: list[dict]) -> dict:
    lr = ["--lr", "3e-4"] if name.endswith("lr3e-4") else []
    state, model = os.path.join(args.out, name), os.path.join(args.out, f"{name}-out")
    cmd = [sys.executable, "-m", "diffalign.toyworld.pretrain", "--family", "sdxl", "--init_from", args.base, "--state_dir", state,
           "--output_dir", model, "--batch_size", "64", "--steps", str(args.cont_steps), "--eval_every", "1000000",
           "--eval_per_task", "5", "--save_every", "50", "--progress", "false", *lr]
    t0 = time.perf_counter()
    if not os.path.exists(os.path.join(model, "model_index.json")):
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"})
    wall = time.perf_counter() - t0
    with open(os.path.join(state, "log.jsonl"), encoding="utf-8") as f:
        log = [json.loads(line) for line in f if line.strip()]
    losses = [r for r in log if r.get("stage") == "sdxl"]
    pipe = Q.load_base_pipeline("sdxl", model, Q.QuickstartConfig().eval_sampler)
    train = {"wall_s": wall, "images": args.cont_steps * 64, "images_per_s": args.cont_steps * 64 / wall if wall > 60 else None,
             "command": " ".join(cmd[1:]), "loss_curve": [(r["step"], r["loss"]) for r in losses]}
    return {"train": train, **evaluate_pipe(pipe, rows)}


def run_arm(args, name: str, rows: list[dict]) -> dict:
    if name == "base":
        pipe = Q.load_base_pipeline("sdxl", args.base, Q.QuickstartConfig().eval_sampler)
        return evaluate_pipe(pipe, rows)
    if name == "text":
        pipe = Q.load_base_pipeline("sdxl", args.base)
        return {"model": probe_text(pipe), "random_init": probe_text(random_text_copy(pipe))}
    if name.startswith("cont"):
        return arm_cont(args, name, rows)
    return arm_sft(args, name, rows)


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


def collect(args, rows: list[dict]) -> dict:
    arms = {}
    for name in ALL_ARMS:
        path = os.path.join(args.out, f"arm-{name}.json")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                arms[name] = json.load(f)
    if "base" in arms:
        for name, res in arms.items():
            if name not in ("base", "text") and "correct" in res:
                res["delta"] = Q.paired_deltas(rows, arms["base"]["correct"], res["correct"])
    return arms


# (after, before): paired deltas between arms that isolate one factor each
CONTRASTS = (("latent", "png"), ("g1", "g5"), ("latent", "g5"), ("oracle", "latent"), ("png+bu", "png"), ("g5+bu", "g5"),
             ("latent+bu", "latent"), ("oracle_lr2e-4", "oracle"), ("cont_lr3e-4", "cont"))


def contrasts(arms: dict, rows: list[dict]) -> dict:
    return {f"{a} - {b}": Q.paired_deltas(rows, arms[b]["correct"], arms[a]["correct"])
            for a, b in CONTRASTS if a in arms and b in arms}


def table(arms: dict) -> str:
    tasks = scenes.TASKS
    short = {"single_object": "single", "two_object": "two", "counting": "count", "colors": "colors", "position": "pos",
             "color_attr": "attr"}
    head = f"{'arm':<14}{'overall':>8}{'delta':>16}" + "".join(f"{'d ' + short[t]:>10}" for t in tasks) + f"{'train s':>9}{'train ok':>9}"
    lines = [head, "-" * len(head)]
    for name, res in arms.items():
        if "summary" not in res:
            continue
        s = res["summary"]
        d = res.get("delta")
        line = f"{name:<14}{s['overall']:>8.3f}"
        line += f"{d['overall']:>+9.3f} ±{d['overall_se']:.3f}" if d else f"{'':>16}"
        line += "".join(f"{d[t]:>+10.3f}" if d else f"{s[t]:>10.3f}" for t in tasks)
        wall = res.get("train", {}).get("wall_s")
        line += f"{wall:>9.0f}" if wall else f"{'':>9}"
        ok = res.get("train_correct")
        line += f"{ok:>9.3f}" if ok is not None else ""
        lines.append(line)
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", default="runs/diag/toy-sdxl-v1")
    p.add_argument("--out", default="runs/diag/out")
    p.add_argument("--arms", default="base,text,png,latent,oracle,g1,g5,cont")
    p.add_argument("--guidance_path", choices=["latent", "png"], default="latent", help="data path of the g1/g5 arms")
    p.add_argument("--cont_steps", type=int, default=265)
    p.add_argument("--json", default=None, help="also write all results here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    Q._quiet_loading_bars()
    os.makedirs(args.out, exist_ok=True)
    rows = Q.eval_rows(QuickstartEvalPerTask)
    for name in [a for a in args.arms.split(",") if a]:
        if name not in ALL_ARMS:
            raise SystemExit(f"unknown arm {name!r}; choose from {ALL_ARMS}")
        path = os.path.join(args.out, f"arm-{name}.json")
        if os.path.exists(path):
            print(f"{name}: done ({path})", flush=True)
            continue
        t0 = time.perf_counter()
        res = run_arm(args, name, rows)
        res["arm_wall_s"] = time.perf_counter() - t0
        res["load_end"] = os.getloadavg()
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(res, f, indent=1, default=str)
        os.replace(path + ".tmp", path)
        print(f"{name}: {res['arm_wall_s']:.0f} s" + (f", overall {res['summary']['overall']:.3f}" if "summary" in res else ""), flush=True)
    arms = collect(args, rows)
    print(table(arms))
    pairs = contrasts(arms, rows)
    for name, d in pairs.items():
        print(f"{name:<22}{d['overall']:>+8.3f} ±{d['overall_se']:.3f}")
    if "text" in arms:
        print(json.dumps(arms["text"], indent=1))
    if args.json:
        slim = {k: {kk: vv for kk, vv in v.items() if kk != "correct"} for k, v in arms.items()}
        meta = {"base": args.base, "eval_images": len(rows), "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}}
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"meta": meta, "arms": slim, "contrasts": pairs}, f, indent=1, default=str)
    return 0


QuickstartEvalPerTask = Q.QuickstartConfig().eval_per_task  # 60 rows per task = 360 images

if __name__ == "__main__":
    raise SystemExit(main())
