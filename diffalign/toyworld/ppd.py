"""PPD efficacy in the toy world: held-out synthetic users on the shipped toy-sdxl (issue 7, PPD part).

    from diffalign.toyworld.ppd import ToyWorldPPDConfig, run_toyworld_ppd
    results = run_toyworld_ppd(ToyWorldPPDConfig(output_dir="runs/toyworld_ppd", seed=0))

1. **Users.** A user is a weighted mix of the toy taste rewards (`toy_taste_large`, `toy_taste_warm`,
   `toy_taste_cool`, `toy_taste_centred`; a negative weight on `toy_taste_large` is "prefers small", on
   `toy_taste_centred` "prefers the edges"). Its direction in (size, warmth, centredness) is a seeded
   random unit vector; each taste is divided by its standard deviation over the base model's images, so
   the weights compare the tastes on an equal footing. Training users and held-out users are drawn from
   different seeds (different mixes); the held-out users are never trained on.
2. **Data.** The base toy-sdxl (guidance 5) draws a few images for each toy-grammar prompt. Every
   training user labels every pair of images of a prompt by its own reward; exact ties are dropped and
   counted. Held-out users label pairs of other prompts' images: those are their examples.
3. **Training.** `prepare_ppd` (the project's PPD glue: context pairs held apart, `PPDConditioning`, user
   attention on every `attn2` of the UNet) and `PreferenceTrainer` with `objective: ppd`. The user encoder
   (`cfg.encoder`) is the exact detector's taste values (`TasteUserEncoder`, default) or the `clip` back-end on
   the shipped `toy_clip` model, frozen, with a trainable `SetPooling` head. Options measured in
   docs/personalization.md ("Ablations"): `context_pool`, `sft_weight`, `tuning="lora"`, and the
   evaluation-only `eval_user_scale` and `negative_user`.
4. **Evaluation, held-out users only.** Embedding from the user's first N = 1/2/4/8 example pairs; images
   with that embedding and base images from the SAME prompts and noise seeds; win rate = share of
   (prompt, seed) where the user's own reward prefers the personalized image (ties count 1/2), with its
   standard error. User specificity: the same user judges the images made from every OTHER held-out user's 4
   examples (vs the base, and own vs other on the same prompt and noise). Interpolation: embeddings (1 - a) e_A + a e_B between the two most opposed held-out users;
   both users' mean rewards per a.

Generated images are cached (their taste features, keyed by model, settings and embedding), so an
interrupted run continues where it stopped. Writes `results.json` into `output_dir`.
"""

from __future__ import annotations

import os

if __name__ == "__main__":  # run as a script: idle OpenMP threads must not spin (set before torch loads OpenMP)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import dataclasses  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from diffalign.evaluation.stats import mean_se, wins  # noqa: E402
from diffalign.personalization.encoder import UserEncoder, UserExample, interpolate_users  # noqa: E402
from diffalign.toyworld.scenes import IMAGE_SIZE  # noqa: E402

TASTES = ("toy_taste_large", "toy_taste_warm", "toy_taste_cool", "toy_taste_centred")
AXES = ("size", "warmth", "centredness")
# Noise-seed blocks: training pool, held-out users' example pool, evaluation. Disjoint by construction.
POOL_SEED, CONTEXT_SEED, EVAL_SEED = 20_000_000, 30_000_000, 40_000_000
DEFAULT_TASKS = ("single_object", "two_object", "counting", "position")


@dataclass
class ToyWorldPPDConfig:
    output_dir: str = "runs/toyworld_ppd"
    base: str | None = None  # a toy-sdxl pipeline folder; None = the shipped checkpoint
    seed: int = 0
    # users
    num_train_users: int = 24
    num_test_users: int = 6
    # Users come in opposite pairs (d, -d). Training: no user-independent change of the model pleases the
    # population on average, so only the user embedding can explain the labels. Held-out: a change that
    # ignores the user cannot raise the mean win rate, so the measure credits personalization only.
    antipodal_users: bool = True
    # data (prompts from the toy grammar; the default tasks leave colour free, so warmth can vary)
    tasks: tuple[str, ...] = DEFAULT_TASKS
    num_prompts: int = 48  # training prompts; every training user labels every pair of their images
    images_per_prompt: int = 4
    context_images: int = 3  # images per example prompt of a held-out user (one decisive pair is drawn)
    num_inference_steps: int = 10
    guidance_scale: float = 5.0
    generate_batch_size: int = 32
    # training (PreferenceTrainer, objective ppd)
    tuning: str = "none"  # none: user attention + encoder head only; lora: LoRA co-trains
    lora_rank: int = 8
    num_context: int = 4  # context pairs per training user (held apart from its training pairs)
    # pairs per training user held apart; each step draws num_context of them (None = num_context, fixed)
    context_pool: int | None = None
    train_steps: int = 800
    batch_size: int = 8
    learning_rate: float = 1e-3
    beta: float = 2000.0
    # sft_weight x the chosen image's denoising error is added to the PPD loss (DPO + NLL). Plain DPO raises the
    # error of both images of a pair, which degrades images and shrinks the detected objects for every user.
    sft_weight: float = 0.0
    user_dropout: float = 0.0
    encoder_dim: int = 64
    num_tokens: int = 4
    user_scale: float = 1.0
    # Scale of the user branch when generating (IP-Adapter's `scale`; `user_scale=` of the pipelines). It does
    # not change training, so trained weights are reused across values.
    eval_user_scale: float = 1.0
    # The user of the unconditional half of classifier-free guidance when generating: "none" = the null user
    # (the base), "swapped" = the user's own examples with chosen and rejected swapped (a negative user: what
    # the branch does for every user cancels in the guidance difference). Evaluation only, like eval_user_scale.
    negative_user: str = "none"
    encoder: str = "taste"  # taste (the exact detector), toy_clip (the shipped toy-world CLIP) or tiny (random, tests)
    # evaluation
    num_examples: tuple[int, ...] = (1, 2, 4, 8)
    eval_prompts: int = 24
    eval_seeds_per_prompt: int = 1
    specificity_examples: int = 4  # N of the other user's embedding
    alphas: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    # machinery
    threads: int | None = None
    progress: bool = True

    def __post_init__(self):
        from diffalign.toyworld import scenes

        self.tasks = tuple(self.tasks)
        self.num_examples = tuple(int(n) for n in self.num_examples)
        self.alphas = tuple(float(a) for a in self.alphas)
        unknown = [t for t in self.tasks if t not in scenes.TASKS]
        if not self.tasks or unknown:
            raise ValueError(f"tasks must be a non-empty subset of {scenes.TASKS}, got {self.tasks}")
        if self.tuning not in ("none", "lora"):
            raise ValueError(f"tuning must be 'none' or 'lora', got {self.tuning!r}")
        if self.encoder not in ("toy_clip", "taste", "tiny"):
            raise ValueError(f"encoder must be 'toy_clip', 'taste' or 'tiny', got {self.encoder!r}")
        for name in ("num_train_users", "num_prompts", "train_steps", "batch_size", "eval_prompts", "eval_seeds_per_prompt",
                     "num_inference_steps", "num_context", "encoder_dim", "num_tokens", "generate_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_test_users < 2:
            raise ValueError(f"num_test_users must be >= 2 (specificity and interpolation need two users), got {self.num_test_users}")
        if self.antipodal_users and (self.num_train_users % 2 or self.num_test_users % 2 or self.num_test_users < 4):
            raise ValueError(
                "antipodal_users pairs every user with its opposite: num_train_users must be even and num_test_users even and "
                f">= 4 (got {self.num_train_users}, {self.num_test_users}); or set antipodal_users=False"
            )
        if self.images_per_prompt < 2 or self.context_images < 2:
            raise ValueError("images_per_prompt and context_images must be >= 2: a pair needs two images")
        if not self.num_examples or min(self.num_examples) < 1:
            raise ValueError(f"num_examples must be positive counts of example pairs, got {self.num_examples}")
        if self.specificity_examples not in self.num_examples:
            raise ValueError(f"specificity_examples={self.specificity_examples} must be one of num_examples {self.num_examples}")
        if len(self.alphas) < 2 or any(not 0.0 <= a <= 1.0 for a in self.alphas) or list(self.alphas) != sorted(self.alphas):
            raise ValueError(f"alphas must be increasing values in [0, 1] (at least two), got {self.alphas}")
        if self.negative_user not in ("none", "swapped"):
            raise ValueError(f"negative_user must be 'none' or 'swapped', got {self.negative_user!r}")
        if not self.eval_user_scale > 0.0:
            raise ValueError(f"eval_user_scale must be > 0, got {self.eval_user_scale}")
        if self.context_pool is not None and self.context_pool < self.num_context:
            raise ValueError(f"context_pool must be >= num_context ({self.num_context}), got {self.context_pool}")
        if self.sft_weight < 0.0:
            raise ValueError(f"sft_weight must be >= 0, got {self.sft_weight}")
        if not 0.0 <= self.user_dropout < 1.0:
            raise ValueError(f"user_dropout must be in [0, 1), got {self.user_dropout}")


# ------------------------------------------------------------------------------------------------
# Taste features and users
# ------------------------------------------------------------------------------------------------


def taste_features(images, detector=None) -> np.ndarray:
    """(N, 4) values of the four taste rewards (TASTES order) for PIL images: one detector pass per image."""
    from diffalign.toyworld.detector import ToyWorldDetector
    from diffalign.toyworld.rewards import taste_value

    detector = detector or ToyWorldDetector()
    out = np.zeros((len(images), len(TASTES)), dtype=np.float64)
    for i, image in enumerate(images):
        objects = detector.objects(image)
        for j, name in enumerate(TASTES):
            out[i, j] = taste_value(name[len("toy_taste_"):], objects, image.size[0])
    return out


@dataclass
class ToyUser:
    """A synthetic user: `weights` over the taste rewards (registry names); reward = features @ weights."""

    name: str
    direction: tuple[float, float, float]  # unit vector over AXES
    weights: dict[str, float]

    def vector(self) -> np.ndarray:
        return np.array([self.weights.get(t, 0.0) for t in TASTES], dtype=np.float64)

    def reward(self, features: np.ndarray) -> np.ndarray:
        return np.asarray(features, dtype=np.float64) @ self.vector()

    def synthetic_user(self):
        """The same user as a `SyntheticUser` over the registered toy rewards (scores PIL images or tensors)."""
        import diffalign.toyworld.rewards  # noqa: F401  (registers the taste rewards)
        from diffalign.personalization.training import SyntheticUser

        return SyntheticUser(self.name, {k: v for k, v in self.weights.items() if v != 0.0})

    def describe(self) -> str:
        return " ".join(f"{k[len('toy_taste_'):]}{v:+.2f}" for k, v in self.weights.items() if v != 0.0)


def taste_scales(features: np.ndarray) -> dict[str, float]:
    """Standard deviation of size, warmth and centredness over a set of images (warm and cool share warmth's)."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[1] != len(TASTES) or f.shape[0] < 2:
        raise ValueError(f"need (N >= 2, {len(TASTES)}) taste features, got shape {f.shape}")
    s = {"size": f[:, 0].std(), "warmth": f[:, 1].std(), "centredness": f[:, 3].std()}
    bad = [k for k, v in s.items() if not v > 1e-6]
    if bad:
        raise ValueError(f"the base images do not vary in {bad}: users cannot be defined on them; generate more images")
    return {k: float(v) for k, v in s.items()}


def make_users(n: int, seed: int, prefix: str, scales: dict[str, float], antipodal: bool = False) -> list[ToyUser]:
    """`n` users with seeded random directions over (size, warmth, centredness); with `antipodal`, users 2i and
    2i + 1 have opposite directions (n must be even)."""
    if n < 1:
        raise ValueError(f"need at least one user, got {n}")
    if antipodal and n % 2:
        raise ValueError(f"antipodal users come in pairs: n must be even, got {n}")
    rng = np.random.default_rng([seed, sum(map(ord, prefix))])
    users = []
    for i in range(n):
        if antipodal and i % 2:
            d = -np.array(users[-1].direction)
        else:
            d = rng.standard_normal(3)
            d /= np.linalg.norm(d)
        w = {
            "toy_taste_large": d[0] / scales["size"],
            "toy_taste_warm": max(d[1], 0.0) / scales["warmth"],
            "toy_taste_cool": max(-d[1], 0.0) / scales["warmth"],
            "toy_taste_centred": d[2] / scales["centredness"],
        }
        users.append(ToyUser(f"{prefix}-{i:02d}", tuple(float(x) for x in d), {k: float(v) for k, v in w.items()}))
    return users


def split_population(cfg: ToyWorldPPDConfig, scales: dict[str, float]) -> tuple[list[ToyUser], list[ToyUser]]:
    """Training and held-out users: different seeds, disjoint names and mixes."""
    train = make_users(cfg.num_train_users, cfg.seed, "train", scales, antipodal=cfg.antipodal_users)
    test = make_users(cfg.num_test_users, cfg.seed, "heldout", scales, antipodal=cfg.antipodal_users)
    seen = {tuple(np.round(u.direction, 9)) for u in train}
    if any(tuple(np.round(u.direction, 9)) in seen for u in test):  # pragma: no cover - measure-zero event
        raise RuntimeError("a held-out user has the same mix as a training user; change the seed")
    return train, test


# ------------------------------------------------------------------------------------------------
# Generation (cached by the taste features of the images)
# ------------------------------------------------------------------------------------------------


def _digest(obj) -> str:
    if isinstance(obj, torch.Tensor):
        return hashlib.sha256(obj.detach().float().contiguous().cpu().numpy().tobytes()).hexdigest()[:16]
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@torch.no_grad()
def generate(pipe, prompts: list[str], seeds: list[int], cfg: ToyWorldPPDConfig, user_embedding=None, desc: str | None = None,
             negative_embedding=None):
    """PIL images, one per (prompt, seed), with initial latents drawn from each seed (batching changes nothing)."""
    from diffalign.toyworld.pretrain import latent_shape

    images = []
    bs = cfg.generate_batch_size
    shape = latent_shape(pipe, IMAGE_SIZE)
    bar = tqdm(total=len(prompts), desc=desc, unit="img", disable=not cfg.progress or desc is None, leave=False)
    for s in range(0, len(prompts), bs):
        gens = [torch.Generator().manual_seed(int(x)) for x in seeds[s : s + bs]]
        latents = torch.stack([torch.randn(shape, generator=g) for g in gens])
        kw = {} if user_embedding is None else {"user_embedding": user_embedding, "user_scale": cfg.user_scale * cfg.eval_user_scale}
        if negative_embedding is not None:
            kw["negative_user_embedding"] = negative_embedding
        out = pipe(prompt=prompts[s : s + bs], height=IMAGE_SIZE, width=IMAGE_SIZE, num_inference_steps=cfg.num_inference_steps,
                   guidance_scale=cfg.guidance_scale, latents=latents, **kw)
        images += out.images
        bar.update(len(gens))
    bar.close()
    return images


class FeatureCache:
    """Taste features of generated image sets, persisted as JSON: key -> (N, 4) list."""

    def __init__(self, path: str):
        self.path = path
        self.data = {}
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                self.data = json.load(f)

    def get(self, key: str, make) -> np.ndarray:
        if key not in self.data:
            self.data[key] = np.asarray(make()).tolist()
            tmp = f"{self.path}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(self.data, f)
            os.replace(tmp, self.path)
        return np.asarray(self.data[key], dtype=np.float64)


def prompt_rows(n: int, seed: int, tasks, salt: int) -> list[str]:
    from diffalign.toyworld import scenes

    rng = np.random.default_rng([seed, salt])
    return [scenes.sample_row(rng, tasks[int(rng.integers(len(tasks)))])["prompt"] for _ in range(n)]


def build_pool(pipe, prompts: list[str], per_prompt: int, seed_base: int, cfg: ToyWorldPPDConfig, path: str, desc: str) -> dict:
    """Base images for each prompt, cached at `path` (.safetensors + .json): uint8 images and taste features."""
    from PIL import Image
    from safetensors.torch import load_file, save_file

    flat_prompts = [p for p in prompts for _ in range(per_prompt)]
    seeds = [seed_base + i for i in range(len(flat_prompts))]
    key = {"prompts": flat_prompts, "seeds": seeds, "steps": cfg.num_inference_steps, "guidance": cfg.guidance_scale}
    if os.path.exists(path + ".json") and os.path.exists(path + ".safetensors"):
        with open(path + ".json", encoding="utf-8") as f:
            meta = json.load(f)
        if meta.get("key") == key:
            t = load_file(path + ".safetensors")
            images = [Image.fromarray(a) for a in t["images"].numpy()]
            return {"prompts": flat_prompts, "prompt_index": meta["prompt_index"], "images": images,
                    "features": t["features"].double().numpy()}
    images = generate(pipe, flat_prompts, seeds, cfg, desc=desc)
    features = taste_features(images)
    arr = torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images]))
    save_file({"images": arr, "features": torch.from_numpy(features)}, path + ".safetensors")
    prompt_index = [i for i in range(len(prompts)) for _ in range(per_prompt)]
    with open(path + ".json", "w", encoding="utf-8") as f:
        json.dump({"key": key, "prompt_index": prompt_index}, f)
    return {"prompts": flat_prompts, "prompt_index": prompt_index, "images": images, "features": features}


def to_tensor(image) -> torch.Tensor:
    """PIL -> (3, H, W) float32 in [-1, 1]."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1).contiguous()


# ------------------------------------------------------------------------------------------------
# Training data
# ------------------------------------------------------------------------------------------------


def label_pairs(users: list[ToyUser], features: np.ndarray, prompt_index: list[int]) -> tuple[list[tuple[str, int, int]], dict]:
    """Every pair of images of one prompt, for every user: (user, chosen image, rejected image). Ties dropped, counted."""
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(prompt_index):
        groups.setdefault(p, []).append(i)
    pairs, ties = [], {}
    for u in users:
        r = u.reward(features)
        ties[u.name] = 0
        for members in groups.values():
            for a in range(len(members)):
                for b in range(a + 1, len(members)):
                    i, j = members[a], members[b]
                    if r[i] == r[j]:
                        ties[u.name] += 1
                    else:
                        pairs.append((u.name, i, j) if r[i] > r[j] else (u.name, j, i))
    return pairs, ties


class UserPairDataset(torch.utils.data.Dataset):
    """Pairs in the data room's item format (pixel_values and cached latents, chosen first), with user_id."""

    def __init__(self, pairs, pixels: torch.Tensor, latents: torch.Tensor, prompts: list[str]):
        self.pairs, self.pixels, self.latents, self.prompts = pairs, pixels, latents, prompts

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        user, win, lose = self.pairs[index]
        return {
            "pixel_values": self.pixels[[win, lose]],
            "latents": self.latents[[win, lose]],
            "scores": torch.tensor([1.0, 0.0]),
            "prompt": self.prompts[win],
            "prompt_id": f"{win}-{lose}",
            "user_id": user,
            "original_sizes": torch.tensor([[IMAGE_SIZE, IMAGE_SIZE]] * 2),
            "crop_top_lefts": torch.zeros(2, 2, dtype=torch.int64),
        }


def heldout_examples(user: ToyUser, pool: dict, n: int, seed: int) -> list[UserExample]:
    """`n` example pairs of a held-out user: per example prompt, one random decisive pair of its images."""
    r = user.reward(pool["features"])
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(pool["prompt_index"]):
        groups.setdefault(p, []).append(i)
    rng = np.random.default_rng([seed, sum(map(ord, user.name))])
    examples = []
    for p in sorted(groups):
        m = groups[p]
        decisive = [(m[a], m[b]) for a in range(len(m)) for b in range(a + 1, len(m)) if r[m[a]] != r[m[b]]]
        if not decisive:
            continue
        i, j = decisive[int(rng.integers(len(decisive)))]
        win, lose = (i, j) if r[i] > r[j] else (j, i)
        examples.append(UserExample(pool["prompts"][win], to_tensor(pool["images"][win]), to_tensor(pool["images"][lose])))
        if len(examples) == n:
            return examples
    raise ValueError(
        f"held-out user {user.name} has only {len(examples)} example prompts with a decisive pair, fewer than {n}; "
        "raise context_images or lower max(num_examples)"
    )


def swapped(examples: list[UserExample]) -> list[UserExample]:
    """The same pairs with chosen and rejected exchanged: the examples of the opposite taste."""
    return [dataclasses.replace(ex, chosen=ex.rejected, rejected=ex.chosen) for ex in examples]


class TasteUserEncoder(UserEncoder):
    """A user encoder whose frozen "backbone" is the toy world's exact detector: per example the four taste
    values of the chosen and of the rejected image and their difference (12 numbers). The toy analogue of a
    perfect perception model; the user's weights are still unknown to it and must be read off the examples
    by the trainable `SetPooling` head."""

    name = "toy_taste"

    def __init__(self, dim: int = 64, num_tokens: int = 4, num_heads: int = 4):
        super().__init__(3 * len(TASTES), dim, num_tokens, num_heads)
        from diffalign.toyworld.detector import ToyWorldDetector

        self.detector = ToyWorldDetector()

    @torch.no_grad()
    def example_features(self, examples) -> torch.Tensor:
        from PIL import Image

        from diffalign.personalization.encoder import _check_examples, _to_unit_tensor

        _check_examples(examples)

        def pil(image):
            if isinstance(image, Image.Image):
                return image.convert("RGB")
            return Image.fromarray((_to_unit_tensor(image).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))

        f = taste_features([pil(ex.chosen) for ex in examples] + [pil(ex.rejected) for ex in examples], self.detector)
        chosen, rejected = f[: len(examples)], f[len(examples):]
        out = torch.from_numpy(np.concatenate([chosen, rejected, chosen - rejected], axis=1)).float()
        return out.to(next(self.head.parameters()).device)


def make_encoder(cfg: ToyWorldPPDConfig):
    """The user encoder `cfg.encoder` names, with a fresh head seeded by `cfg.seed`:
    toy_clip = the `clip` back-end on the shipped toy_clip model (frozen); taste = `TasteUserEncoder`;
    tiny = the `clip` back-end on a random tiny open_clip model (tests)."""
    from diffalign.personalization.encoder import ClipUserEncoder, tiny_clip_user_encoder

    if cfg.encoder == "taste":
        torch.manual_seed(cfg.seed)
        return TasteUserEncoder(dim=cfg.encoder_dim, num_tokens=cfg.num_tokens)
    if cfg.encoder == "tiny":
        return tiny_clip_user_encoder(dim=cfg.encoder_dim, num_tokens=cfg.num_tokens, seed=cfg.seed)
    from diffalign.toyworld import toy_clip

    model, tokenizer = toy_clip.load_model()
    torch.manual_seed(cfg.seed)
    encoder = ClipUserEncoder(model, tokenizer, dim=cfg.encoder_dim, num_tokens=cfg.num_tokens)
    # toy_clip normalises pixels with its own statistics (scenes are grey-centred), not open_clip's defaults.
    encoder.mean.copy_(torch.tensor(toy_clip.MEAN).view(3, 1, 1))
    encoder.std.copy_(torch.tensor(toy_clip.STD).view(3, 1, 1))
    return encoder


# ------------------------------------------------------------------------------------------------
# Statistics
# ------------------------------------------------------------------------------------------------


def monotone_within_noise(means: list[float], diffs_se: list[float], increasing: bool, k: float = 2.0) -> bool:
    """Every step moves the expected way, or against it by less than k paired standard errors."""
    sign = 1.0 if increasing else -1.0
    return all(sign * (b - a) >= -k * se for a, b, se in zip(means, means[1:], diffs_se))


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------


def run_toyworld_ppd(cfg: ToyWorldPPDConfig) -> dict:
    """Build users and data, train PPD with the project trainer, evaluate on held-out users; writes results.json."""
    from scipy.stats import spearmanr

    from diffalign.families import load_family
    from diffalign.personalization.attention import load_user_attention
    from diffalign.personalization.training import ENCODER_HEAD_FILE, USER_ATTENTION_FILE, prepare_ppd
    from diffalign.pipelines import PersonalizedStableDiffusionXLPipeline
    from diffalign.toyworld.bases import checkpoint_digest, resolve_base
    from diffalign.toyworld.pretrain import load_toy_pipeline
    from diffalign.training.config import TrainConfig
    from diffalign.training.trainer import PreferenceTrainer

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t_start = time.perf_counter()
    stage = {}
    out = cfg.output_dir
    os.makedirs(out, exist_ok=True)
    base_dir = resolve_base("sdxl", cfg.base, out)
    digest = checkpoint_digest(base_dir)
    gen_key = {"model": digest, "steps": cfg.num_inference_steps, "guidance": cfg.guidance_scale}
    cache_dir = os.path.join(out, f"cache-{_digest(gen_key)}")
    os.makedirs(cache_dir, exist_ok=True)

    # 1. Base images: the training pool, the held-out users' example pool, the evaluation images.
    t = time.perf_counter()
    pipe = load_toy_pipeline("sdxl", base_dir)
    train_prompts = prompt_rows(cfg.num_prompts, cfg.seed, cfg.tasks, 1)
    n_ctx_prompts = max(cfg.num_examples) + 4  # spares for prompts whose images all tie for a user
    ctx_prompts = prompt_rows(n_ctx_prompts, cfg.seed, cfg.tasks, 2)
    pool = build_pool(pipe, train_prompts, cfg.images_per_prompt, POOL_SEED + cfg.seed * 100_000, cfg,
                      os.path.join(cache_dir, f"pool-seed{cfg.seed}-{cfg.num_prompts}x{cfg.images_per_prompt}"), "train pool")
    ctx_pool = build_pool(pipe, ctx_prompts, cfg.context_images, CONTEXT_SEED + cfg.seed * 100_000, cfg,
                          os.path.join(cache_dir, f"context-seed{cfg.seed}-{n_ctx_prompts}x{cfg.context_images}"), "example pool")
    eval_prompt_list = prompt_rows(cfg.eval_prompts, cfg.seed, cfg.tasks, 3)
    eval_prompts = [p for p in eval_prompt_list for _ in range(cfg.eval_seeds_per_prompt)]
    eval_seeds = [EVAL_SEED + cfg.seed * 100_000 + i for i in range(len(eval_prompts))]
    stage["data"] = time.perf_counter() - t

    # 2. Users.
    scales = taste_scales(pool["features"])
    train_users, test_users = split_population(cfg, scales)
    pairs, ties = label_pairs(train_users, pool["features"], pool["prompt_index"])
    examples = {u.name: heldout_examples(u, ctx_pool, max(cfg.num_examples), cfg.seed) for u in test_users}

    # 3. Training through the project trainer.
    t = time.perf_counter()
    adapter = load_family(base_dir, family="sdxl", seed=cfg.seed)
    pixels = torch.stack([to_tensor(im) for im in pool["images"]])
    with torch.no_grad():
        latents = torch.cat([adapter.encode_images(pixels[s : s + 64], generator=torch.Generator().manual_seed(cfg.seed + s)).float()
                             for s in range(0, len(pixels), 64)])
    dataset = UserPairDataset(pairs, pixels, latents, pool["prompts"])
    encoder = make_encoder(cfg)
    min_pairs = max(cfg.num_context, cfg.context_pool or 0) + 1
    train_set, hook, split = prepare_ppd(dataset, adapter.denoiser, encoder, num_context=cfg.num_context, min_pairs=min_pairs,
                                         test_fraction=0.0, user_dropout=cfg.user_dropout, seed=cfg.seed, user_scale=cfg.user_scale,
                                         context_pool=cfg.context_pool)
    train_keys = ("antipodal_users", "tuning", "lora_rank", "num_context", "train_steps", "batch_size", "learning_rate", "beta", "user_dropout",
                  "encoder_dim", "num_tokens", "user_scale", "encoder", "num_train_users", "num_prompts", "images_per_prompt", "tasks")
    train_key = {"gen": gen_key, "seed": cfg.seed, **{k: getattr(cfg, k) for k in train_keys}}
    for name in ("sft_weight", "context_pool"):  # only when set, so weights trained before these options existed stay valid
        if getattr(cfg, name):
            train_key[name] = getattr(cfg, name)
    train_dir = os.path.join(out, f"train-seed{cfg.seed}-{_digest(train_key)}")
    done_path = os.path.join(train_dir, "done.json")
    summary = {}
    if cfg.tuning == "none" and os.path.exists(done_path):  # the trained user weights are all there is: reuse them
        with open(done_path, encoding="utf-8") as f:
            summary = json.load(f)["summary"]
        load_user_attention(adapter.denoiser, os.path.join(train_dir, USER_ATTENTION_FILE))
        encoder.load_head(os.path.join(train_dir, ENCODER_HEAD_FILE))
        model = adapter.denoiser.eval()
    else:
        tcfg = TrainConfig(
            pretrained_model_name_or_path=base_dir, family="sdxl", objective="ppd", resolution=IMAGE_SIZE, tuning=cfg.tuning,
            lora_rank=cfg.lora_rank, train_batch_size=cfg.batch_size, max_train_steps=cfg.train_steps,
            learning_rate=cfg.learning_rate, beta=cfg.beta, sft_weight=cfg.sft_weight, lr_scheduler="constant", adam_weight_decay=0.0, output_dir=train_dir,
            overwrite_output_dir=True, checkpointing_steps=0, report_to="none", seed=cfg.seed, model_seed=cfg.seed, progress_bar=cfg.progress,
        )
        trainer = PreferenceTrainer(tcfg, train_dataset=train_set, adapter=adapter, conditioning=hook)
        full = trainer.train()
        summary = {k: full.get(k) for k in ("final_loss", "mean_loss_last_10", "median_step_time_s", "wall_time_s", "global_step")}
        final = full.get("final_metrics") or {}
        summary["final_metrics"] = {k: float(v) for k, v in final.items() if isinstance(v, (int, float))}
        model = trainer.unwrapped.eval()
        del trainer
        with open(done_path, "w", encoding="utf-8") as f:
            json.dump({"key": train_key, "summary": summary}, f, default=str)
    encoder.eval()
    stage["train"] = time.perf_counter() - t

    # 4. Evaluation on held-out users.
    t = time.perf_counter()
    cache = FeatureCache(os.path.join(cache_dir, f"eval-features-seed{cfg.seed}.json"))
    ppipe = PersonalizedStableDiffusionXLPipeline.from_base(adapter.pipeline(model))
    ppipe.set_progress_bar_config(disable=True)
    model_key = "base" if cfg.tuning == "none" else train_dir  # tuning none: every user weight lives in the embedding branch
    eval_key = _digest({"prompts": eval_prompts, "seeds": eval_seeds})

    def base_features():
        def make():
            if cfg.tuning == "lora":
                model.disable_adapters()
            try:
                return taste_features(generate(ppipe, eval_prompts, eval_seeds, cfg, desc="eval base"))
            finally:
                if cfg.tuning == "lora":
                    model.enable_adapters()

        return cache.get(f"base/{eval_key}", make)

    def user_features(embedding: torch.Tensor, desc: str, negative: torch.Tensor | None = None):
        # Suffixes only for non-default settings, so caches written before these options existed stay valid.
        scale = "" if cfg.eval_user_scale == 1.0 else f"/scale{cfg.eval_user_scale:g}"
        neg = "" if negative is None else f"/negative{_digest(negative)}"
        key = f"user/{model_key}/{_digest(train_key) if cfg.tuning == 'none' else ''}/{eval_key}/{_digest(embedding)}{scale}{neg}"
        return cache.get(key, lambda: taste_features(generate(ppipe, eval_prompts, eval_seeds, cfg, user_embedding=embedding, desc=desc,
                                                              negative_embedding=negative)))

    f_base = base_features()
    embeddings, negatives = {}, {}
    with torch.no_grad():
        for u in test_users:
            for n in cfg.num_examples:
                embeddings[(u.name, n)] = encoder(examples[u.name][:n]).detach()
                if cfg.negative_user == "swapped":
                    negatives[(u.name, n)] = encoder(swapped(examples[u.name][:n])).detach()
    feats = {}
    for u in tqdm(test_users, desc="held-out users", disable=not cfg.progress):
        for n in cfg.num_examples:
            feats[(u.name, n)] = user_features(embeddings[(u.name, n)], f"{u.name} N={n}", negatives.get((u.name, n)))

    per_user = {}
    own_outcomes = {n: [] for n in cfg.num_examples}
    other_vs_base, own_vs_other = [], []
    ns = cfg.specificity_examples
    for u in test_users:
        r_base = u.reward(f_base)
        row = {"weights": u.weights, "direction": dict(zip(AXES, u.direction)), "describe": u.describe(), "win_rate": {},
               "mean_reward": {}, "reward_gain": {}, "base_mean_reward": float(r_base.mean())}
        for n in cfg.num_examples:
            r = u.reward(feats[(u.name, n)])
            w = wins(r, r_base)
            own_outcomes[n].append(w)
            row["win_rate"][str(n)] = float(w.mean())
            row["mean_reward"][str(n)] = float(r.mean())
            row["reward_gain"][str(n)] = float((r - r_base).mean())
        # Specificity: this user judges the images made from EVERY other held-out user's examples (an
        # unbiased draw of "another user"; with antipodal pairs the population has no mean preference).
        r_own = u.reward(feats[(u.name, ns)])
        row["other_users"] = {}
        vs_base, vs_own = [], []
        for other in test_users:
            if other is u:
                continue
            r_other = u.reward(feats[(other.name, ns)])
            vs_base.append(wins(r_other, r_base))
            vs_own.append(wins(r_own, r_other))
            row["other_users"][other.name] = {"cosine": float(np.dot(u.direction, other.direction)),
                                              "win_rate_vs_base": float(vs_base[-1].mean()),
                                              "own_vs_other_win_rate": float(vs_own[-1].mean())}
        other_vs_base.append(np.concatenate(vs_base))
        own_vs_other.append(np.concatenate(vs_own))
        row.update(other_users_win_rate_vs_base=float(other_vs_base[-1].mean()), own_vs_other_win_rate=float(own_vs_other[-1].mean()))
        per_user[u.name] = row

    def summary_of(outcomes):
        m, se = mean_se(np.concatenate(outcomes))
        users_ = [float(o.mean()) for o in outcomes]
        return {"mean": m, "se": se, "users_std": float(np.std(users_, ddof=1)) if len(users_) > 1 else 0.0, "per_user": users_}

    win = {"own": {str(n): summary_of(own_outcomes[n]) for n in cfg.num_examples},
           "other": summary_of(other_vs_base), "own_vs_other": summary_of(own_vs_other), "specificity_examples": ns}

    # Interpolation between the two most opposed held-out users.
    dirs = np.array([u.direction for u in test_users])
    cos = dirs @ dirs.T
    ia, ib = np.unravel_index(np.argmin(cos + 2 * np.eye(len(test_users))), cos.shape)
    ua, ub = test_users[ia], test_users[ib]
    ea, eb = embeddings[(ua.name, ns)], embeddings[(ub.name, ns)]
    na, nb = negatives.get((ua.name, ns)), negatives.get((ub.name, ns))
    interp, ra_all, rb_all = [], [], []
    for a in tqdm(cfg.alphas, desc="interpolation", disable=not cfg.progress):
        f = user_features(interpolate_users(ea, eb, a), f"alpha={a:g}", None if na is None else interpolate_users(na, nb, a))
        ra, rb = ua.reward(f), ub.reward(f)
        ra_all.append(ra)
        rb_all.append(rb)
        (ma, sa), (mb, sb) = mean_se(ra), mean_se(rb)
        interp.append({"alpha": a, "reward_a": ma, "reward_a_se": sa, "reward_b": mb, "reward_b_se": sb})
    se_da = [mean_se(y - x)[1] for x, y in zip(ra_all, ra_all[1:])]
    se_db = [mean_se(y - x)[1] for x, y in zip(rb_all, rb_all[1:])]
    mas, mbs = [p["reward_a"] for p in interp], [p["reward_b"] for p in interp]
    interpolation = {
        "user_a": ua.name, "user_b": ub.name, "cosine": float(cos[ia, ib]), "num_examples": ns, "points": interp,
        "spearman_a": float(spearmanr(cfg.alphas, mas).statistic) if len(set(mas)) > 1 else None,
        "spearman_b": float(spearmanr(cfg.alphas, mbs).statistic) if len(set(mbs)) > 1 else None,
        "monotone_a": monotone_within_noise(mas, se_da, increasing=False, k=0.0),
        "monotone_b": monotone_within_noise(mbs, se_db, increasing=True, k=0.0),
        "monotone_a_within_2se": monotone_within_noise(mas, se_da, increasing=False),
        "monotone_b_within_2se": monotone_within_noise(mbs, se_db, increasing=True),
        "reward_a_base": float(ua.reward(f_base).mean()), "reward_b_base": float(ub.reward(f_base).mean()),
    }
    stage["eval"] = time.perf_counter() - t

    results = {
        "method": "ppd",
        "family": "sdxl",
        "seed": cfg.seed,
        "win_rate": win,
        "interpolation": interpolation,
        "per_user": per_user,
        "data": {"train_pairs": len(pairs), "ties_dropped": int(sum(ties.values())), "ties_per_user": ties,
                 "pairs_per_user": int(len(pairs) / max(1, len(train_users))), "training_pairs_after_context": len(train_set),
                 "pool_images": len(pool["images"]), "example_pool_images": len(ctx_pool["images"]),
                 "eval_images_per_model": len(eval_prompts), "taste_scales": scales,
                 "taste_means": dict(zip(TASTES, pool["features"].mean(0).tolist()))},
        "users": {"train": {u.name: u.describe() for u in train_users}, "heldout": {u.name: u.describe() for u in test_users}},
        "training": summary,
        "base_checkpoint": base_dir,
        "base_digest": digest,
        "seconds": time.perf_counter() - t_start,
        "stage_seconds": {k: round(v, 1) for k, v in stage.items()},
        "torch_threads": torch.get_num_threads(),
        "config": dataclasses.asdict(cfg),
    }
    results = json.loads(json.dumps(results, default=str))  # JSON-native (tuples -> lists), as written
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    return results


def format_table(results: dict) -> str:
    """Win rates per N (with standard errors), user specificity and the interpolation sweep."""
    w = results["win_rate"]
    lines = [f"{'held-out users: win rate vs base (own reward)':<50}{'mean':>8}{'se':>8}{'users std':>11}"]
    for n, s in w["own"].items():
        lines.append(f"{'  own examples, N=' + n:<50}{s['mean']:>8.3f}{s['se']:>8.3f}{s['users_std']:>11.3f}")
    ns = w["specificity_examples"]
    for label, s in ((f"  other users' examples (N={ns}) vs base", w["other"]),
                     (f"  own vs other users' examples (N={ns})", w["own_vs_other"])):
        lines.append(f"{label:<50}{s['mean']:>8.3f}{s['se']:>8.3f}{s['users_std']:>11.3f}")
    it = results["interpolation"]
    lines.append(f"interpolation {it['user_a']} -> {it['user_b']} (cosine {it['cosine']:+.2f}); rewards in taste-std units")
    lines.append(f"{'alpha':>8}{'reward A':>12}{'reward B':>12}")
    lines.append(f"{'base':>8}{it['reward_a_base']:>12.3f}{it['reward_b_base']:>12.3f}")
    for p in it["points"]:
        lines.append(f"{p['alpha']:>8.2f}{p['reward_a']:>8.3f}±{p['reward_a_se']:.2f}{p['reward_b']:>8.3f}±{p['reward_b_se']:.2f}")
    lines.append(f"monotone: A {it['monotone_a']} (within 2 se: {it['monotone_a_within_2se']}), "
                 f"B {it['monotone_b']} (within 2 se: {it['monotone_b_within_2se']})")
    return "\n".join(lines)


# The quickstart's budget: about 5 minutes on 2 CPU cores (12 training users, 4 held-out, 200 steps).
QUICKSTART = dict(num_train_users=12, num_test_users=4, num_prompts=24, images_per_prompt=4, train_steps=200, batch_size=8,
                  eval_prompts=12, num_inference_steps=10)


def run_quickstart_ppd(output_dir: str, seed: int = 0, progress: bool = True, **overrides) -> dict:
    """A small PPD run in the toy world (about 5 minutes on 2 cores), JSON-able:

    {"method": "ppd", "family": "sdxl", "win_rate": {"own": {"1": {"mean", "se", ...}, ...}, "other": {...},
    "own_vs_other": {...}}, "interpolation": [{"alpha", "reward_a", "reward_a_se", "reward_b", "reward_b_se"}, ...],
    "interpolation_summary": {users, monotonicity, ...}, "seconds": ..., ...} (the rest as `run_toyworld_ppd`)."""
    kwargs = {**QUICKSTART, **overrides}
    cfg = ToyWorldPPDConfig(output_dir=output_dir, seed=seed, progress=progress, **kwargs)
    results = run_toyworld_ppd(cfg)
    summary = {k: v for k, v in results["interpolation"].items() if k != "points"}
    return {**results, "interpolation": results["interpolation"]["points"], "interpolation_summary": summary}
