"""The Personalize tab: a few pairwise choices -> a user embedding -> images for that user (PPD).

The pairs shown to the user come from the base model at fixed seeds, so `/personalize` can rebuild them
from (prompt, pair seed) alone: a script sends its choices ("left"/"right") without sending images.
"""

from __future__ import annotations

import glob
import json
import os
import threading
from collections import OrderedDict

import torch

from diffalign.demo.validation import DemoInputError

NUM_PAIRS = 4
CHOICES = ("left", "right")
ATTENTION_KEY = "diffalign_user_attention"  # metadata written by save_user_attention
ENCODER_KEY = "diffalign_user_encoder"  # metadata written by UserEncoder.save_head
ENCODER_CONFIG = "user_encoder.json"  # {"backend": "clip", "model_name": ..., "pretrained": ...}


def pair_seeds(pair_seed: int, i: int) -> tuple[int, int]:
    return pair_seed + 2 * i, pair_seed + 2 * i + 1


def _metadata(path: str) -> dict:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return f.metadata() or {}


def find_user_adapter(path: str) -> tuple[str, str | None, dict | None]:
    """(user-attention file, encoder-head file or None, encoder config or None) from a file or a folder.

    The files are recognised by the metadata their writers put in them, not by name."""
    p = os.path.expanduser(str(path).strip())
    if not os.path.exists(p):
        raise FileNotFoundError(
            f"user adapter {path!r} not found; pass the .safetensors written by save_user_attention, "
            "or a folder holding it (and the user-encoder head written by UserEncoder.save_head)"
        )
    files = [p] if os.path.isfile(p) else sorted(glob.glob(os.path.join(p, "*.safetensors")))
    attention = [f for f in files if ATTENTION_KEY in _metadata(f)]
    heads = [f for f in files if ENCODER_KEY in _metadata(f)]
    if len(attention) != 1:
        raise ValueError(f"user adapter {path!r}: expected one file with user-attention weights, found {len(attention)}")
    if len(heads) > 1:
        raise ValueError(f"user adapter {path!r}: found {len(heads)} user-encoder heads; keep one")
    config = None
    cfg_path = os.path.join(p if os.path.isdir(p) else os.path.dirname(p), ENCODER_CONFIG)
    if os.path.isfile(cfg_path):
        with open(cfg_path, encoding="utf-8") as f:
            config = json.load(f)
    return attention[0], (heads[0] if heads else None), config


class Personalizer:
    """Owns the user encoder and the personalized pipeline (sharing the base pipeline's modules)."""

    def __init__(self, models, user_adapter: str | None = None, user_encoder: str | None = None):
        self.models = models
        self.notices: list[str] = []
        self.missing: str | None = None
        self.lock = threading.Lock()
        self._pairs: OrderedDict[tuple, list] = OrderedDict()
        try:
            from diffalign import personalization
            from diffalign.pipelines import personalized_pipeline_class
        except ImportError as e:
            self.missing = f"personalization is not available in this install ({e})"
            return
        self._p = personalization
        self.encoder = self._build_encoder(user_adapter, user_encoder)
        denoiser = getattr(models.pipe, "unet", None) or models.pipe.transformer
        if user_adapter:
            attention_file, _, _ = find_user_adapter(user_adapter)
            personalization.load_user_attention(denoiser, attention_file)
            self.trained = True
        else:
            personalization.add_user_attention(denoiser, encoder_dim=self.encoder.dim, seed=0)
            self.trained = False
            if models.source.kind == "tiny":
                # A random model gets a random user branch, so the plumbing visibly does something.
                with torch.no_grad():
                    for param in personalization.user_attention_parameters(denoiser):
                        if param.dim() == 2:
                            torch.nn.init.normal_(param, std=0.5 / param.shape[1] ** 0.5, generator=torch.Generator().manual_seed(0))
                self.notices.append(
                    "No `--user_adapter`: the user branch and the user encoder (tiny open_clip) are RANDOM. "
                    "The personalized image changes with your choices, but not toward your taste."
                )
            else:
                self.notices.append(
                    "No `--user_adapter`: the user branch is fresh (zero-initialised output), so the personalized "
                    "image equals the base exactly, and the user encoder is the tiny RANDOM open_clip. Pass a PPD "
                    "checkpoint with `--user_adapter`."
                )
        denoiser.to(device=models.device)
        cls = personalized_pipeline_class(models.family)
        self.pipe = cls.from_base(models.pipe, user_encoder=self.encoder)

    def _build_encoder(self, user_adapter: str | None, user_encoder: str | None):
        """The encoder backbone: `--user_encoder NAME:key=value,...`, else `user_encoder.json` beside the
        adapter, else the tiny random open_clip. The head's width and token count come from its metadata."""
        from diffalign.demo.scoring import parse_reward_spec

        p = self._p
        head, config = None, None
        if user_adapter:
            _, head, config = find_user_adapter(user_adapter)
        if user_encoder:
            backend, kwargs = parse_reward_spec(user_encoder)
            config = {"backend": backend, **kwargs}
        dim, tokens = 32, 4
        if head is not None:
            meta = json.loads(_metadata(head)[ENCODER_KEY])
            dim, tokens = int(meta["dim"]), int(meta["num_tokens"])
        if config is not None:
            backend = config.get("backend", "clip")
            kwargs = {k: v for k, v in config.items() if k != "backend"}
            kwargs.setdefault("dim", dim)
            kwargs.setdefault("num_tokens", tokens)
            encoder = p.create_user_encoder(backend, **kwargs)
        else:
            encoder = p.tiny_clip_user_encoder(dim=dim, num_tokens=tokens, seed=0)
            if user_adapter:
                self.notices.append(
                    f"The user encoder's CLIP backbone is the tiny RANDOM open_clip model: neither `--user_encoder` "
                    f"nor a `{ENCODER_CONFIG}` beside the user adapter names a real one."
                )
        if head is not None:
            encoder.load_head(head)
        elif user_adapter:
            raise ValueError(
                f"user adapter {user_adapter!r} has no user-encoder head (UserEncoder.save_head); "
                "save it next to the user-attention weights"
            )
        return encoder.to(self.models.device).eval()

    # ------------------------------------------------------------------ pairs
    def pairs(self, prompt: str, pair_seed: int, steps: int, size: int, guidance: float, on_image=None) -> list:
        """NUM_PAIRS (left, right) pairs from the base model; cached per settings."""
        key = (prompt, pair_seed, steps, size, guidance)
        with self.lock:
            if key in self._pairs:
                self._pairs.move_to_end(key)
                return self._pairs[key]
        out = []
        for i in range(NUM_PAIRS):
            pair = []
            for s in pair_seeds(pair_seed, i):
                pair.append(self.models.generate(prompt, s, steps, size, guidance))
                if on_image is not None:
                    on_image(2 * i + len(pair))
            out.append(tuple(pair))
        with self.lock:
            self._pairs[key] = out
            while len(self._pairs) > 16:
                self._pairs.popitem(last=False)
        return out

    # ------------------------------------------------------------------ users
    def examples(self, prompt: str, pairs: list, choices: list, uploads: list[tuple]) -> list:
        """UserExample list from the chosen pairs (None = no choice for that pair) and uploaded (chosen, rejected)."""
        UserExample = self._p.UserExample
        out = []
        for i, ((left, right), choice) in enumerate(zip(pairs, choices)):
            if choice in (None, ""):
                continue
            if choice not in CHOICES:
                raise DemoInputError(f"pair {i + 1}: choice {choice!r} must be 'left' or 'right'")
            chosen, rejected = (left, right) if choice == "left" else (right, left)
            out.append(UserExample(prompt, chosen, rejected))
        out.extend(UserExample(prompt, c, r) for c, r in uploads)
        if not out:
            raise DemoInputError("no examples: pick the preferred image in at least one pair, or upload preferred/rejected images")
        return out

    @torch.no_grad()
    def embed(self, examples: list) -> torch.Tensor:
        with self.models.lock:
            return self.encoder(examples).detach()

    def interpolate(self, emb_a: torch.Tensor, emb_b: torch.Tensor, alpha: float) -> torch.Tensor:
        return self._p.interpolate_users(emb_a, emb_b, alpha)

    def generate(self, prompt, embedding, seed, steps, size, guidance, scale=None, on_step=None):
        return self.models.generate(
            prompt, seed, steps, size, guidance, on_step=on_step, pipe=self.pipe,
            user_embedding=embedding.to(self.models.device), user_scale=scale,
        )
