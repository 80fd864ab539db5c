"""User encoders: a few pairwise examples (prompt, preferred image, rejected image) -> a user embedding.

Every encoder has two stages:

1. `example_features(examples) -> (N, F)`: a frozen backbone describes each example on its own
   (no gradient; cacheable).
2. `pool(features (U, N, F), mask (U, N)) -> (U, num_tokens, dim)`: a small trainable set encoder
   (`SetPooling`) turns a user's examples into tokens. It attends from learned queries over the
   examples, so the result does not depend on their order.

Back-ends (registry `USER_ENCODERS`, factory `create_user_encoder(name, **kwargs)`):
- `clip`: open_clip image and text embeddings; per example [img(chosen), img(rejected),
  img(chosen) - img(rejected), text(prompt)], unit-normalised.
- `vlm`: a transformers vision-language model sees the prompt and both images; the hidden states of a
  configurable layer are mean-pooled over the sequence into one vector per example.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# An open_clip config small enough for tests and toy runs (1.7M parameters, random weights, offline).
TINY_OPEN_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


@dataclass
class UserExample:
    """One pairwise judgement by a user. Images are PIL images or float tensors (3, H, W) in [-1, 1]."""

    prompt: str
    chosen: object
    rejected: object


def _check_examples(examples: Sequence[UserExample]) -> None:
    if len(examples) == 0:
        raise ValueError("a user needs at least one example (prompt, chosen image, rejected image)")
    for i, ex in enumerate(examples):
        if not isinstance(ex, UserExample):
            raise TypeError(f"example {i} is {type(ex).__name__}; wrap it as UserExample(prompt, chosen, rejected)")


def _to_unit_tensor(image) -> torch.Tensor:
    """PIL image or (3, H, W) tensor in [-1, 1] -> float32 (3, H, W) in [0, 1]."""
    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"image tensors must be (3, H, W) in [-1, 1], got shape {tuple(image.shape)}")
        return ((image.detach().float().cpu() + 1) / 2).clamp(0, 1)
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - pillow is a dependency
        raise ImportError("pillow is needed for PIL images") from e
    if not isinstance(image, Image.Image):
        raise TypeError(f"images must be PIL.Image or torch.Tensor, got {type(image).__name__}")
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def example_digest(examples: Sequence[UserExample]) -> str:
    """A content hash of examples (prompts and pixels), order-independent, for caching."""
    parts = []
    for ex in examples:
        h = hashlib.sha256(ex.prompt.encode("utf-8"))
        for image in (ex.chosen, ex.rejected):
            if isinstance(image, torch.Tensor):
                h.update(image.detach().float().cpu().numpy().tobytes())
            else:
                buf = io.BytesIO()
                image.save(buf, format="PNG")
                h.update(buf.getvalue())
        parts.append(h.hexdigest())
    return hashlib.sha256("".join(sorted(parts)).encode()).hexdigest()


class SetPooling(nn.Module):
    """Permutation-invariant pooling of a set of example vectors into `num_tokens` tokens.

    An element-wise MLP, then multi-head attention from learned queries over the set (Set Transformer's
    pooling by multi-head attention). Padding rows are masked out.
    """

    def __init__(self, in_dim: int, dim: int, num_tokens: int = 4, num_heads: int = 4):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.element = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.queries = nn.Parameter(torch.randn(num_tokens, dim) * dim**-0.5)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.out_norm = nn.LayerNorm(dim)

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if features.dim() != 3:
            raise ValueError(f"features must be (users, examples, dim), got {tuple(features.shape)}")
        users = features.shape[0]
        if mask is not None and (mask.sum(dim=1) == 0).any():
            raise ValueError("every user needs at least one valid (unmasked) example")
        elements = self.element(features.to(self.queries.dtype))
        queries = self.queries.unsqueeze(0).expand(users, -1, -1)
        pad = None if mask is None else ~mask.bool()
        pooled, _ = self.attn(queries, elements, elements, key_padding_mask=pad, need_weights=False)
        return self.out_norm(pooled + queries)


class UserEncoder(nn.Module):
    """Base class: frozen `example_features` + trainable `pool` (a `SetPooling` head)."""

    name = "base"

    def __init__(self, feature_dim: int, dim: int, num_tokens: int, num_heads: int = 4):
        super().__init__()
        self.feature_dim, self.dim, self.num_tokens = feature_dim, dim, num_tokens
        self.head = SetPooling(feature_dim, dim, num_tokens, num_heads)

    def example_features(self, examples: Sequence[UserExample]) -> torch.Tensor:
        raise NotImplementedError

    def pool(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(features, mask)

    def forward(self, examples: Sequence[UserExample]) -> torch.Tensor:
        """(num_tokens, dim) embedding of one user."""
        return self.encode_users([examples])[0]

    def stack_features(self, features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Pad per-user (N_u, F) features to (U, max N, F) with a validity mask (U, max N)."""
        longest = max(f.shape[0] for f in features)
        out = features[0].new_zeros(len(features), longest, self.feature_dim)
        mask = torch.zeros(len(features), longest, dtype=torch.bool, device=out.device)
        for i, f in enumerate(features):
            out[i, : f.shape[0]] = f
            mask[i, : f.shape[0]] = True
        return out, mask

    def encode_users(self, users: Sequence[Sequence[UserExample]]) -> torch.Tensor:
        """(U, num_tokens, dim) for U users, each with its own number of examples."""
        features = [self.example_features(examples) for examples in users]
        stacked, mask = self.stack_features(features)
        return self.pool(stacked, mask)

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters())

    def save_head(self, path: str | os.PathLike) -> None:
        from safetensors.torch import save_file

        tensors = {k: v.detach().contiguous().cpu() for k, v in self.head.state_dict().items()}
        meta = {"backend": self.name, "feature_dim": self.feature_dim, "dim": self.dim, "num_tokens": self.num_tokens}
        save_file(tensors, str(path), metadata={"diffalign_user_encoder": json.dumps(meta)})

    def load_head(self, path: str | os.PathLike) -> None:
        from safetensors import safe_open
        from safetensors.torch import load_file

        if not os.path.isfile(path):
            raise FileNotFoundError(f"no user-encoder head at {path}")
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("diffalign_user_encoder", "{}"))
        for key in ("backend", "feature_dim", "dim", "num_tokens"):
            mine = self.name if key == "backend" else getattr(self, key)
            if meta.get(key) != mine:
                raise ValueError(f"{path} holds a head with {key}={meta.get(key)!r}; this encoder has {mine!r}")
        self.head.load_state_dict(load_file(str(path)))


class ClipUserEncoder(UserEncoder):
    """open_clip back-end. The CLIP model is frozen; only `head` trains."""

    name = "clip"

    def __init__(self, clip_model, tokenizer, dim: int = 768, num_tokens: int = 4, num_heads: int = 4):
        with torch.no_grad():  # the joint embedding width, whatever the model class
            embed_dim = int(clip_model.encode_text(tokenizer(["x"])).shape[-1])
        super().__init__(4 * embed_dim, dim, num_tokens, num_heads)
        self.clip = clip_model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.embed_dim = embed_dim
        size = clip_model.visual.image_size
        self.image_size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        import open_clip

        cfg = open_clip.get_model_preprocess_cfg(clip_model)
        self.register_buffer("mean", torch.tensor(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.get("std", open_clip.OPENAI_DATASET_STD)).view(3, 1, 1), persistent=False)

    @classmethod
    def from_open_clip(cls, model_name: str, pretrained: str | None = None, device="cpu", **kwargs) -> ClipUserEncoder:
        """`pretrained=None` builds random weights (tests); a real run names e.g. ViT-H-14 / laion2b_s32b_b79k."""
        import open_clip

        model, _, _ = open_clip.create_model_and_transforms(model_name, pretrained=pretrained, device=device)
        return cls(model, open_clip.get_tokenizer(model_name), **kwargs)

    def train(self, mode: bool = True):
        super().train(mode)
        self.clip.eval()  # the backbone never trains
        return self

    def _pixels(self, images) -> torch.Tensor:
        batch = []
        for image in images:
            x = _to_unit_tensor(image).unsqueeze(0)
            x = F.interpolate(x, size=self.image_size, mode="bicubic", align_corners=False, antialias=True)
            batch.append(x.clamp(0, 1)[0])
        x = torch.stack(batch).to(self.mean.device)
        return ((x - self.mean) / self.std).to(next(self.clip.parameters()).dtype)

    @torch.no_grad()
    def example_features(self, examples: Sequence[UserExample]) -> torch.Tensor:
        _check_examples(examples)
        n = len(examples)
        pixels = self._pixels([ex.chosen for ex in examples] + [ex.rejected for ex in examples])
        image = F.normalize(self.clip.encode_image(pixels).float(), dim=-1)
        text = F.normalize(self.clip.encode_text(self.tokenizer([ex.prompt for ex in examples]).to(pixels.device)).float(), dim=-1)
        chosen, rejected = image[:n], image[n:]
        return torch.cat([chosen, rejected, chosen - rejected, text], dim=-1)


class VLMUserEncoder(UserEncoder):
    """Vision-language-model back-end.

    `model` is a transformers model that accepts the `processor`'s outputs and returns `hidden_states`
    with `output_hidden_states=True` (e.g. `AutoModelForImageTextToText` for LLaVA / Qwen2-VL / Idefics).
    Each example is shown as one prompt with both images; the hidden states of `layer` are mean-pooled
    over the non-padding sequence positions into one vector per example.
    """

    name = "vlm"
    TEMPLATE = (
        "A user compared two images for the prompt: \"{prompt}\". Preferred image: <image>. "
        "Rejected image: <image>. Describe what this user likes."
    )

    def __init__(
        self,
        model,
        processor,
        hidden_size: int | None = None,
        layer: int = -2,
        dim: int = 768,
        num_tokens: int = 4,
        num_heads: int = 4,
        build_inputs: Callable | None = None,
    ):
        if hidden_size is None:
            config = getattr(model, "config", None)
            text_config = getattr(config, "text_config", config)
            hidden_size = getattr(text_config, "hidden_size", None)
            if hidden_size is None:
                raise ValueError("cannot read the VLM's hidden size from its config; pass hidden_size=")
        super().__init__(int(hidden_size), dim, num_tokens, num_heads)
        self.vlm = model.eval().requires_grad_(False) if isinstance(model, nn.Module) else model
        self.processor = processor
        self.layer = layer
        self.build_inputs = build_inputs or self._default_inputs

    @classmethod
    def from_pretrained(cls, model_id: str, layer: int = -2, torch_dtype=None, **kwargs) -> VLMUserEncoder:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        processor = AutoProcessor.from_pretrained(model_id)
        model = AutoModelForImageTextToText.from_pretrained(model_id, dtype=torch_dtype)
        return cls(model, processor, layer=layer, **kwargs)

    def train(self, mode: bool = True):
        super().train(mode)
        if isinstance(self.vlm, nn.Module):
            self.vlm.eval()
        return self

    def _default_inputs(self, example: UserExample) -> dict:
        from PIL import Image

        def to_pil(image):
            if isinstance(image, Image.Image):
                return image.convert("RGB")
            array = (_to_unit_tensor(image).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            return Image.fromarray(array)

        images = [to_pil(example.chosen), to_pil(example.rejected)]
        if getattr(self.processor, "chat_template", None):
            content = [
                {"type": "text", "text": f"A user compared two images for the prompt: \"{example.prompt}\". Preferred image:"},
                {"type": "image"},
                {"type": "text", "text": "Rejected image:"},
                {"type": "image"},
                {"type": "text", "text": "Describe what this user likes."},
            ]
            text = self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        else:
            token = getattr(self.processor, "image_token", "<image>")
            text = self.TEMPLATE.format(prompt=example.prompt).replace("<image>", token)
        return dict(self.processor(text=text, images=images, return_tensors="pt"))

    def pool_hidden(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Masked mean over the sequence: (1, L, H) -> (H,)."""
        if attention_mask is None:
            return hidden[0].float().mean(dim=0)
        weights = attention_mask[0].to(hidden.device, torch.float32)
        return (hidden[0].float() * weights[:, None]).sum(dim=0) / weights.sum().clamp_min(1.0)

    @torch.no_grad()
    def example_features(self, examples: Sequence[UserExample]) -> torch.Tensor:
        _check_examples(examples)
        device = next(self.head.parameters()).device
        vectors = []
        for example in examples:
            inputs = self.build_inputs(example)
            inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
            out = self.vlm(**inputs, output_hidden_states=True)
            hidden_states = out.hidden_states
            if not -len(hidden_states) <= self.layer < len(hidden_states):
                raise ValueError(f"layer {self.layer} is out of range for a model with {len(hidden_states)} hidden states")
            vectors.append(self.pool_hidden(hidden_states[self.layer], inputs.get("attention_mask")))
        return torch.stack(vectors)


USER_ENCODERS: dict[str, Callable[..., UserEncoder]] = {
    "clip": ClipUserEncoder.from_open_clip,
    "vlm": VLMUserEncoder.from_pretrained,
}


def create_user_encoder(name: str, *args, **kwargs) -> UserEncoder:
    """`create_user_encoder("clip", "ViT-H-14", pretrained="laion2b_s32b_b79k", dim=2048)` or
    `create_user_encoder("vlm", "llava-hf/llava-1.5-7b-hf", layer=-2)`."""
    if name not in USER_ENCODERS:
        raise ValueError(f"unknown user encoder {name!r}; choose one of {sorted(USER_ENCODERS)}")
    return USER_ENCODERS[name](*args, **kwargs)


def tiny_clip_user_encoder(dim: int = 32, num_tokens: int = 4, seed: int = 0, cache_dir: str | None = None) -> ClipUserEncoder:
    """A `clip` encoder on a random 1.7M-parameter open_clip model, built offline (tests, toy runs)."""
    import tempfile

    import open_clip

    name = "diffalign-tiny-clip"
    if open_clip.get_model_config(name) is None:
        folder = cache_dir or os.path.join(tempfile.gettempdir(), "diffalign-cache", "open_clip")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{name}.json")
        tmp = f"{path}.{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(TINY_OPEN_CLIP_CONFIG, f)
        os.replace(tmp, path)
        open_clip.add_model_config(path)
    torch.manual_seed(seed)
    return ClipUserEncoder.from_open_clip(name, pretrained=None, dim=dim, num_tokens=num_tokens)


class UserEmbeddingCache:
    """Per-user cache of embeddings (inference) and of frozen example features (training).

    Keys are (user_id, content hash of the examples), so changed examples never hit a stale entry.
    Embeddings depend on the trainable head: call `clear_embeddings()` after the head changes. Features
    come from the frozen backbone and stay valid. With `directory`, embeddings persist as safetensors.
    """

    def __init__(self, encoder: UserEncoder, directory: str | os.PathLike | None = None):
        self.encoder = encoder
        self.directory = None if directory is None else str(directory)
        self._embeddings: dict[tuple[str, str], torch.Tensor] = {}
        self._features: dict[tuple[str, str], torch.Tensor] = {}
        self.hits = self.misses = 0

    def _path(self, user_id: str, digest: str) -> str:
        safe = hashlib.sha256(user_id.encode()).hexdigest()[:16]
        return os.path.join(self.directory, f"{safe}-{digest[:16]}.safetensors")

    def features(self, user_id: str, examples: Sequence[UserExample]) -> torch.Tensor:
        key = (user_id, example_digest(examples))
        if key not in self._features:
            self._features[key] = self.encoder.example_features(examples).detach()
        return self._features[key]

    @torch.no_grad()
    def embedding(self, user_id: str, examples: Sequence[UserExample]) -> torch.Tensor:
        key = (user_id, example_digest(examples))
        if key in self._embeddings:
            self.hits += 1
            return self._embeddings[key]
        if self.directory is not None and os.path.isfile(self._path(*key)):
            from safetensors.torch import load_file

            self.hits += 1
            self._embeddings[key] = load_file(self._path(*key))["embedding"]
            return self._embeddings[key]
        self.misses += 1
        was_training = self.encoder.training
        self.encoder.eval()
        try:
            embedding = self.encoder.pool(self.features(user_id, examples).unsqueeze(0))[0].detach()
        finally:
            self.encoder.train(was_training)
        self._embeddings[key] = embedding
        if self.directory is not None:
            from safetensors.torch import save_file

            os.makedirs(self.directory, exist_ok=True)
            save_file({"embedding": embedding.contiguous().cpu()}, self._path(*key), metadata={"user_id": user_id})
        return embedding

    def clear_embeddings(self) -> None:
        self._embeddings.clear()
        if self.directory is not None and os.path.isdir(self.directory):
            for name in os.listdir(self.directory):
                if name.endswith(".safetensors"):
                    os.remove(os.path.join(self.directory, name))


def interpolate_users(emb_a: torch.Tensor, emb_b: torch.Tensor, alpha: float, extrapolate: bool = False) -> torch.Tensor:
    """(1 - alpha) * emb_a + alpha * emb_b: alpha=0 is user A, 1 is user B."""
    if emb_a.shape != emb_b.shape:
        raise ValueError(f"user embeddings differ in shape: {tuple(emb_a.shape)} vs {tuple(emb_b.shape)}")
    alpha = float(alpha)
    if not np.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha}")
    if not extrapolate and not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha} is outside [0, 1]; pass extrapolate=True to go beyond the two users")
    return torch.lerp(emb_a, emb_b.to(emb_a.dtype), alpha)
