"""`toy_clip`: a tiny open_clip model trained contrastively on toy scenes, registered as a reward.

Recipe: `python -m diffalign.toyworld.toy_clip --steps 3000`. Each step renders a batch of scenes with their
captions (the GenEval-phrased prompt or a full description), per scene `hard_negatives` near-miss captions
(another shape, another colour, swapped colours, the opposite relation, another count) and one near-miss
image (a scene rendered for a near miss of its prompt). The loss is CLIP's symmetric InfoNCE with the near-miss
captions added to the image->text side and the near-miss images to the text->image side: a reward compares
images for one prompt, so the text->image direction is the one that must read colours, counts and relations.
Resumable from `<state_dir>/state.pt`.

`agreement(...)` measures what the issue asks for: on pairs of images for one prompt where the exact
GenEval checker says one is right and the other wrong (decisive pairs), how often toy_clip prefers the
right one.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F

from diffalign.rewards.base import PreprocessConfig, RewardModel, register_reward
from diffalign.toyworld import scenes

MODEL_NAME = "toyworld-clip-rn"
CONFIG = {
    "embed_dim": 32,
    # A small ModifiedResNet: a 2-3-layer ViT with 8x8 patches learnt colours but stayed at chance on shapes
    # after 1,450 steps; convolutions see the outlines.
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16},
    # The 49,408-token embedding dominates the size: a narrow text tower keeps the file at ~3.5 MB.
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 3},
}
WEIGHTS_DIR = os.path.join(os.path.dirname(__file__), "checkpoints", "toy-clip")
# Pixels in [0, 1] are normalised with these (scenes are grey-centred).
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _register_config() -> None:
    import open_clip

    if MODEL_NAME not in open_clip.list_models():
        import tempfile

        d = tempfile.mkdtemp(prefix="toyclip-")
        with open(os.path.join(d, f"{MODEL_NAME}.json"), "w") as f:
            json.dump(CONFIG, f)
        open_clip.add_model_config(d)


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()


def build_model(seed: int = 0, weights_follow: bool = False):
    """A fresh toy_clip model and its tokenizer. weights_follow: the caller loads trained weights next, so
    open_clip's "Model initialized randomly" warning would be false and is dropped."""
    import open_clip

    _register_config()
    quiet = _DropRandomInitWarning() if weights_follow else None
    if quiet:
        logging.getLogger().addFilter(quiet)  # open_clip logs it on the root logger
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = open_clip.create_model(MODEL_NAME, pretrained=None)
    finally:
        if quiet:
            logging.getLogger().removeFilter(quiet)
    return model, open_clip.get_tokenizer(MODEL_NAME)


def to_pixels(images) -> torch.Tensor:
    """PIL images (64x64) or a [-1, 1] tensor -> normalised (N, 3, 64, 64) float32."""
    if isinstance(images, torch.Tensor):
        x = (images.float() + 1) / 2
    else:
        x = torch.stack([torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32)).permute(2, 0, 1) / 255.0 for im in images])
    if x.shape[-2:] != (scenes.IMAGE_SIZE, scenes.IMAGE_SIZE):
        x = F.interpolate(x, size=(scenes.IMAGE_SIZE, scenes.IMAGE_SIZE), mode="bilinear", antialias=True, align_corners=False)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (x - mean.to(x)) / std.to(x)


# --------------------------------------------------------------------------------------------
# Near-miss captions
# --------------------------------------------------------------------------------------------

_OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def perturb(row: dict, rng) -> dict:
    """A metadata row of the same task that differs from `row` in one attribute."""
    rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
    tag, inc = row["tag"], row["include"]

    def other(options, *not_these):
        opts = [o for o in options if o not in not_these]
        return opts[rng.integers(len(opts))]

    if tag == "single_object":
        return scenes.single_object_row(other(scenes.SHAPES, inc[0]["class"]))
    if tag == "two_object":
        a, b = inc[0]["class"], inc[1]["class"]
        return scenes.two_object_row(a, other(scenes.SHAPES, a, b)) if rng.random() < 0.5 else scenes.two_object_row(other(scenes.SHAPES, a, b), b)
    if tag == "counting":
        s, n = inc[0]["class"], inc[0]["count"]
        return scenes.counting_row(s, other(list(scenes.NUMBERS), n)) if rng.random() < 0.7 else scenes.counting_row(other(scenes.SHAPES, s), n)
    if tag == "colors":
        s, c = inc[0]["class"], inc[0]["color"]
        return scenes.colors_row(s, other(scenes.COLORS, c)) if rng.random() < 0.7 else scenes.colors_row(other(scenes.SHAPES, s), c)
    if tag == "position":
        b, a, rel = inc[0]["class"], inc[1]["class"], inc[1]["position"][0]
        u = rng.random()
        if u < 0.4:
            return scenes.position_row(a, _OPPOSITE[rel], b)
        if u < 0.7:
            return scenes.position_row(b, rel, a)  # the two objects swapped
        return scenes.position_row(a, other(scenes.RELATIONS, rel, _OPPOSITE[rel]), b)
    if tag == "color_attr":
        (a, ca), (b, cb) = (inc[0]["class"], inc[0]["color"]), (inc[1]["class"], inc[1]["color"])
        u = rng.random()
        if u < 0.5:
            return scenes.color_attr_row(a, cb, b, ca)  # colours swapped between the objects
        if u < 0.8:
            return scenes.color_attr_row(a, other(scenes.COLORS, ca, cb), b, cb)
        return scenes.color_attr_row(a, ca, other(scenes.SHAPES, a, b), cb)
    raise ValueError(f"unknown task {tag!r}")


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


@dataclass
class ToyClipConfig:
    output_dir: str = WEIGHTS_DIR
    state_dir: str = os.path.join("runs", "toy-clip")
    seed: int = 0
    steps: int = 3000
    batch_size: int = 48
    hard_negatives: int = 3
    lr: float = 2e-3
    warmup_steps: int = 100
    save_every: int = 250
    log_every: int = 50
    eval_pairs: int = 300
    time_limit_s: float | None = None
    progress: bool = True


def _example(seed: int, i: int, hard: int):
    """(image, caption, near-miss captions, near-miss image), a pure function of (seed, i)."""
    rng = np.random.default_rng([seed, i])
    row = scenes.sample_row(rng)
    scene = scenes.sample_scene(row, rng)
    caption = scenes.training_caption(scene, rng, p_full=0.3)
    negs = [perturb(row, rng)["prompt"] for _ in range(hard)]
    near = scenes.render(scenes.sample_scene(perturb(row, rng), rng))
    return scenes.render(scene), caption, negs, near


def clip_loss(model, tokenizer, images, captions, negatives, near_images=None) -> torch.Tensor:
    """Symmetric InfoNCE; near-miss captions join the image->text side, near-miss images the text->image side."""
    device = next(model.parameters()).device
    b = len(images)
    all_images = list(images) + list(near_images or [])
    img = model.encode_image(to_pixels(all_images).to(device), normalize=True).float()
    texts = list(captions) + [n for ns in negatives for n in ns]
    txt = model.encode_text(tokenizer(texts).to(device), normalize=True).float()
    scale = model.logit_scale.exp()
    target = torch.arange(b, device=device)
    loss_i = F.cross_entropy(scale * img[:b] @ txt.T, target)  # (B, B + B*H)
    loss_t = F.cross_entropy(scale * txt[:b] @ img.T, target)  # (B, B or 2B)
    return (loss_i + loss_t) / 2


def train(cfg: ToyClipConfig) -> dict:
    from tqdm.auto import tqdm

    os.makedirs(cfg.state_dir, exist_ok=True)
    model, tokenizer = build_model(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup_steps))
    state_path = os.path.join(cfg.state_dir, "state.pt")
    step = 0
    if os.path.exists(state_path):
        st = torch.load(state_path, map_location="cpu", weights_only=True)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        step = st["step"]

    def save():
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(), "step": step}, state_path + ".tmp")
        os.replace(state_path + ".tmp", state_path)

    bar = tqdm(total=cfg.steps, initial=step, desc="toy_clip", disable=not cfg.progress)
    t0 = time.time()
    losses = []
    model.train()
    while step < cfg.steps:
        items = [_example(cfg.seed, step * cfg.batch_size + j, cfg.hard_negatives) for j in range(cfg.batch_size)]
        loss = clip_loss(model, tokenizer, *[[x[k] for x in items] for k in range(4)])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        losses.append(loss.item())
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.steps:
            rec = {"step": step, "loss": float(np.mean(losses)), "time": time.time()}
            losses = []
            bar.set_postfix(loss=f"{rec['loss']:.3f}")
            with open(os.path.join(cfg.state_dir, "log.jsonl"), "a") as f:
                f.write(json.dumps(rec) + "\n")
        out_of_time = cfg.time_limit_s is not None and time.time() - t0 > cfg.time_limit_s
        if step % cfg.save_every == 0 or step == cfg.steps or out_of_time:
            save()
        if out_of_time:
            break
    bar.close()
    model.eval()
    save_weights(model, cfg.output_dir, {"steps": step, "batch_size": cfg.batch_size, "hard_negatives": cfg.hard_negatives})
    return {"steps": step}


def save_weights(model, output_dir: str, info: dict) -> None:
    from safetensors.torch import save_file

    os.makedirs(output_dir, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(output_dir, "open_clip_model.safetensors"))
    with open(os.path.join(output_dir, "open_clip_config.json"), "w") as f:
        json.dump(CONFIG, f, indent=1)
    with open(os.path.join(output_dir, "toyworld_info.json"), "w") as f:
        json.dump(info, f, indent=1)


def load_model(path: str = WEIGHTS_DIR):
    from safetensors.torch import load_file

    f = os.path.join(path, "open_clip_model.safetensors")
    if not os.path.exists(f):
        raise FileNotFoundError(f"no toy_clip weights at {f}; train them with `python -m diffalign.toyworld.toy_clip`")
    model, tokenizer = build_model(weights_follow=True)
    model.load_state_dict(load_file(f))
    return model.eval(), tokenizer


# --------------------------------------------------------------------------------------------
# Reward and agreement with the exact checker
# --------------------------------------------------------------------------------------------


class ToyClipReward(RewardModel):
    """100 x cosine between toy_clip's image and text embeddings."""

    name = "toy_clip"

    def __init__(self, path: str = WEIGHTS_DIR, random_init: bool = False, **kwargs):
        kwargs.setdefault("device", "cpu")
        super().__init__(PreprocessConfig(size=scenes.IMAGE_SIZE, mean=MEAN, std=STD), **kwargs)
        if random_init:
            self.model, self.tokenizer = build_model()
        else:
            self.model, self.tokenizer = load_model(path)
        self._finish_init()

    def score(self, images, prompts, batch_size=None) -> torch.Tensor:
        prompts = list(prompts)
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts; pass one prompt per image")
        if len(prompts) == 0:
            return torch.zeros(0)
        with torch.set_grad_enabled(isinstance(images, torch.Tensor) and torch.is_grad_enabled()):
            img = self.model.encode_image(to_pixels(images).to(self.device_, self.dtype_), normalize=True).float()
            txt = self.model.encode_text(self.tokenizer(prompts).to(self.device_), normalize=True).float()
            return 100.0 * (img * txt).sum(-1)


register_reward("toy_clip", lambda **kw: ToyClipReward(**kw))


def decisive_pairs(n: int, seed: int = 0):
    """(prompt rows, image A, image B, A is right) for n rendered pairs on which the exact checker is decisive.

    A is a scene for the prompt, B a scene for a near miss of it; pairs where the checker does not tell
    them apart are skipped and not counted.
    """
    from diffalign.toyworld.detector import score_images

    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        row = scenes.sample_row(rng)
        a = scenes.render(scenes.sample_scene(row, rng))
        b = scenes.render(scenes.sample_scene(perturb(row, rng), rng))
        ok = score_images([a, b], [row, row])
        if ok[0] != ok[1]:
            out.append((row, a, b, ok[0]))
    return out


def generated_decisive_pairs(pipe, rows: list[dict], k: int = 4, seed: int = 0, num_inference_steps: int = 20, guidance_scale: float = 5.0):
    """Decisive pairs among k generated images per prompt (every pair whose exact verdicts differ)."""
    from diffalign.toyworld.detector import score_images
    from diffalign.toyworld.pretrain import generate

    prompts = [r["prompt"] for r in rows for _ in range(k)]
    images = generate(pipe, prompts, [seed + i for i in range(len(prompts))], num_inference_steps, guidance_scale)
    verdicts = score_images(images, [r for r in rows for _ in range(k)])
    out = []
    for g, row in enumerate(rows):
        ims, oks = images[g * k : (g + 1) * k], verdicts[g * k : (g + 1) * k]
        for i in range(k):
            for j in range(i + 1, k):
                if oks[i] != oks[j]:
                    out.append((row, ims[i], ims[j], oks[i]))
    return out


def agreement(reward, pairs) -> dict:
    """Fraction of decisive pairs where the reward prefers the image the exact checker accepts (per task too)."""
    rows = [p[0] for p in pairs]
    prompts = [r["prompt"] for r in rows]
    sa = reward.score([p[1] for p in pairs], prompts)
    sb = reward.score([p[2] for p in pairs], prompts)
    agree = [bool((x > y) == right) and x != y for x, y, right in zip(sa.tolist(), sb.tolist(), [p[3] for p in pairs])]
    out = {"overall": float(np.mean(agree)), "n_pairs": len(agree)}
    for task in scenes.TASKS:
        sel = [a for a, r in zip(agree, rows) if r["tag"] == task]
        if sel:
            out[task] = float(np.mean(sel))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m diffalign.toyworld.toy_clip", description=__doc__.split("\n")[0])
    casts = {"int": int, "float": float, "str": str}
    for f in fields(ToyClipConfig):
        kind = str(f.type).split("|")[0].strip()
        if kind == "bool":
            p.add_argument(f"--{f.name}", type=lambda s: s.lower() in ("1", "true", "yes"), default=f.default)
        else:
            p.add_argument(f"--{f.name}", type=casts[kind], default=f.default)
    cfg = ToyClipConfig(**vars(p.parse_args(argv)))
    res = train(cfg)
    reward = ToyClipReward(cfg.output_dir)
    res["agreement_rendered"] = agreement(reward, decisive_pairs(cfg.eval_pairs, seed=12345))
    info_path = os.path.join(cfg.output_dir, "toyworld_info.json")
    info = json.load(open(info_path))
    info.update(res)
    info["config"] = asdict(cfg)
    json.dump(info, open(info_path, "w"), indent=1)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
