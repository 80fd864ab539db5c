"""PPD training glue: what the trainer's `ppd` mode calls, user splits, and synthetic users.

PPD is pairwise Diffusion-DPO in which the policy is the denoiser conditioned on the user's embedding
(computed from that user's held-apart context pairs) and the reference is the same denoiser with user
attention off (and LoRA off, when LoRA co-trains; with full fine-tuning, a frozen copy stripped of user
attention). `PPDConditioning` subclasses the trainer's `ConditioningHook` (policy_context / reference_context /
trainable_parameters / reference_copy / owned_state_keys / save / load / to).
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from diffalign.data.synthetic import TOY_CHANNEL_REWARDS as TOY_REWARDS  # pixel-statistics toy rewards
from diffalign.personalization.attention import (
    add_user_attention,
    has_user_attention,
    load_user_attention,
    remove_user_attention,
    save_user_attention,
    user_attention_disabled,
    user_attention_parameters,
    user_attention_state_dict,
    user_condition,
)
from diffalign.personalization.encoder import UserEmbeddingCache, UserEncoder, UserExample
from diffalign.training.hooks import ConditioningHook

USER_ATTENTION_FILE = "user_attention.safetensors"
ENCODER_HEAD_FILE = "user_encoder_head.safetensors"

logger = logging.getLogger(__name__)


class PPDConditioning(ConditioningHook):
    """The trainer's conditioning hook for `objective: ppd`.

    contexts: user_id -> that user's context examples (held apart from its training pairs).
    num_context: when set and a user has more context examples than this, every step conditions each
    group on a fresh draw of `num_context` of them. With fixed contexts the encoder head only ever sees one
    example set per training user and can learn user identities rather than how to read examples; the
    draws are meant against that (on the toy PPD study they did not raise held-out win rates:
    docs/personalization.md, "Ablations"). None = always all of them.
    user_dropout: probability that a group trains with the null user (its policy equals the
    reference there; useful when LoRA co-trains, so LoRA also learns the user-free preference).
    Dropout draws are a pure function of (seed, prompt_ids, user_ids) of the batch, so a resumed run
    replays them.
    """

    def __init__(
        self,
        encoder: UserEncoder,
        contexts: dict[str, Sequence[UserExample]],
        user_dropout: float = 0.0,
        seed: int = 0,
        train_encoder_head: bool = True,
        num_context: int | None = None,
    ):
        if not 0.0 <= user_dropout < 1.0:
            raise ValueError(f"user_dropout must be in [0, 1), got {user_dropout}")
        if not contexts:
            raise ValueError("PPD needs at least one user with context examples")
        for user, examples in contexts.items():
            if len(examples) == 0:
                raise ValueError(f"user {user!r} has no context examples")
        if num_context is not None and num_context < 1:
            raise ValueError(f"num_context must be >= 1 or None, got {num_context}")
        self.encoder = encoder
        self.contexts = dict(contexts)
        self.num_context = num_context
        self.user_dropout = user_dropout
        self.seed = seed
        self.train_encoder_head = train_encoder_head
        self.cache = UserEmbeddingCache(encoder)
        self._features: dict[str, torch.Tensor] = {}  # frozen backbone features, computed once per user
        self.model = None
        self.null_rows = 0  # groups trained with the null user (dropout)

    def attach(self, model, token_dim: int | None = None, scale: float = 1.0, seed: int | None = 0):
        """Install user attention on the denoiser (if missing); call before building the trainer."""
        if not has_user_attention(model):
            add_user_attention(model, encoder_dim=self.encoder.dim, token_dim=token_dim, scale=scale, seed=seed)
        self.model = model
        return model

    def user_embeddings(self, user_ids: Sequence[str], draw: int | None = None) -> torch.Tensor:
        """(B, T, D) embeddings with gradient into the encoder head; the backbone features are cached.
        draw: a seed; each row then uses a random `num_context` of its user's examples (training). None = all."""
        missing = [u for u in user_ids if u not in self.contexts]
        if missing:
            raise KeyError(f"users without context examples: {missing[:5]}; split the data with split_users first")
        features = [self._user_features(u) for u in user_ids]
        if draw is not None:
            features = self._draw(features, draw)
        stacked, mask = self.encoder.stack_features(features)
        device = next(self.encoder.head.parameters()).device
        return self.encoder.pool(stacked.to(device), mask.to(device))

    def _user_features(self, user: str) -> torch.Tensor:
        # Contexts are fixed for the run: key by user id alone (no per-step hashing of the images).
        if user not in self._features:
            self._features[user] = self.cache.features(user, self.contexts[user])
        return self._features[user]

    def _batch_digest(self, batch, salt: str = "") -> int:
        # A pure function of (seed, prompt_ids, user_ids): a resumed run replays the same draws.
        key = "|".join(map(str, batch.get("prompt_ids", []))) + "#" + "|".join(map(str, batch["user_ids"]))
        return int(hashlib.sha256(f"{self.seed}:{salt}{key}".encode()).hexdigest()[:15], 16)

    def _draw(self, features: list[torch.Tensor], digest: int) -> list[torch.Tensor]:
        """Each row's user features restricted to a random `num_context` of its examples."""
        g = torch.Generator().manual_seed(digest)
        out = []
        for f in features:
            pick = torch.randperm(f.shape[0], generator=g)[: self.num_context]
            out.append(f[pick.sort().values] if f.shape[0] > self.num_context else f)
        return out

    def _keep(self, batch) -> torch.Tensor:
        b = len(batch["user_ids"])
        if self.user_dropout == 0.0:
            return torch.ones(b)
        g = torch.Generator().manual_seed(self._batch_digest(batch))
        keep = (torch.rand(b, generator=g) >= self.user_dropout).float()
        self.null_rows += int((keep == 0).sum())
        return keep

    def policy_context(self, model, batch):
        """Condition each sample of the B x k batch on its group's user."""
        user_ids = batch["user_ids"]
        if any(u is None for u in user_ids):
            raise ValueError("a PPD batch has rows without user_id; filter them out (split_users does)")
        k = batch["scores"].shape[1]
        draw = self._batch_digest(batch, "context:") if self.num_context is not None else None
        embedding = self.user_embeddings(list(user_ids), draw=draw)
        keep = self._keep(batch).to(embedding.device)
        return user_condition(model, embedding.repeat_interleave(k, dim=0), row_weight=keep.repeat_interleave(k))

    def reference_context(self, model, batch):
        """The reference when it is the policy model itself (tuning lora / none): user attention off."""
        return user_attention_disabled(model)

    def reference_copy(self, model):
        """tuning=full: the trainer's frozen deep copy of the denoiser becomes the exact base (no user attention)."""
        if has_user_attention(model):
            remove_user_attention(model)
        return model

    def owned_state_keys(self, model) -> set[str]:
        """The user-attention keys of the denoiser's state dict: saved by `save`, kept out of full-weights saves."""
        return set(user_attention_state_dict(model)) if has_user_attention(model) else set()

    def to(self, device):
        """Move the encoder (frozen backbone + head) to the training device."""
        self.encoder.to(device)
        self._features.clear()  # cached on the old device
        return self

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """User-attention weights (+ the encoder head), trainable and in float32 (the base may be bf16)."""
        if self.model is None:
            raise ValueError("call PPDConditioning.attach(denoiser) before building the trainer")
        params = user_attention_parameters(self.model)
        if self.train_encoder_head:
            params += self.encoder.head_parameters()
        else:
            self.encoder.head.requires_grad_(False)
        for p in params:
            p.data = p.data.float()
            p.requires_grad_(True)
        return params

    def save(self, output_dir: str) -> None:
        """`user_attention.safetensors` + `user_encoder_head.safetensors`: what a personalized pipeline loads."""
        import os

        os.makedirs(output_dir, exist_ok=True)
        save_user_attention(self.model, os.path.join(output_dir, USER_ATTENTION_FILE))
        self.encoder.save_head(os.path.join(output_dir, ENCODER_HEAD_FILE))

    def load(self, input_dir: str) -> None:
        """Restore what `save` wrote (a checkpoint on resume), in place: the optimizer keeps the same tensors."""
        import os

        if self.model is None:
            raise ValueError("call PPDConditioning.attach(denoiser) before loading its weights")
        for name in (USER_ATTENTION_FILE, ENCODER_HEAD_FILE):
            if not os.path.isfile(os.path.join(input_dir, name)):
                raise FileNotFoundError(f"{input_dir} has no {name}; it was not written by a PPD run")
        load_user_attention(self.model, os.path.join(input_dir, USER_ATTENTION_FILE))
        self.encoder.load_head(os.path.join(input_dir, ENCODER_HEAD_FILE))
        self.cache.clear_embeddings()


# -------------------------------------------------------------------------------------------- user splits


@dataclass
class UserSplit:
    """Row indices of a pairwise data set grouped by user.

    Train and test users are disjoint. Each user's first `num_context` pairs (in a seeded shuffle)
    are its context examples; the rest are its training (or evaluation) pairs.
    """

    train_users: list[str]
    test_users: list[str]
    context_rows: dict[str, list[int]]
    pair_rows: dict[str, list[int]]
    filtered_users: int = 0
    filtered_rows: int = 0
    rows_without_user: int = 0
    stats: dict = field(default_factory=dict)

    def train_rows(self) -> list[int]:
        return sorted(i for u in self.train_users for i in self.pair_rows[u])

    def test_rows(self) -> list[int]:
        return sorted(i for u in self.test_users for i in self.pair_rows[u])


def split_users(
    user_ids: Sequence[str | None],
    num_context: int = 4,
    min_pairs: int = 8,
    test_fraction: float = 0.1,
    seed: int = 0,
    labels: Sequence[float] | None = None,
) -> UserSplit:
    """Group rows by `user_id`, drop users with fewer than `min_pairs` rows (logged and counted),
    split users into disjoint train/test sets, and hold `num_context` pairs per user apart as context.

    Rows without a user id are counted in `rows_without_user` and left out. With `labels` (label_0),
    ties (0.5) are never used as context examples: a context pair must say which image was preferred.
    """
    if num_context < 1:
        raise ValueError(f"num_context must be >= 1, got {num_context}")
    if min_pairs <= num_context:
        raise ValueError(f"min_pairs ({min_pairs}) must exceed num_context ({num_context}) to leave training pairs")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    rows: dict[str, list[int]] = {}
    without = 0
    for i, u in enumerate(user_ids):
        if u is None or u == "":
            without += 1
            continue
        rows.setdefault(str(u), []).append(i)
    kept = {u: r for u, r in rows.items() if len(r) >= min_pairs}
    filtered_users = len(rows) - len(kept)
    filtered_rows = sum(len(r) for u, r in rows.items() if u not in kept)
    logger.info(
        "split_users: %d users kept, %d users with < %d pairs filtered (%d rows), %d rows without user_id",
        len(kept), filtered_users, min_pairs, filtered_rows, without,
    )
    if not kept:
        raise ValueError(f"no user has >= {min_pairs} pairs ({len(rows)} users in total); lower min_pairs")
    rng = random.Random(seed)
    users = sorted(kept)
    rng.shuffle(users)
    n_test = int(round(len(users) * test_fraction))
    if test_fraction > 0 and n_test == 0 and len(users) > 1:
        n_test = 1
    test_users, train_users = sorted(users[:n_test]), sorted(users[n_test:])
    if not train_users:
        raise ValueError("no training users left after the test split; lower test_fraction")
    context_rows, pair_rows = {}, {}
    for u in users:
        order = list(kept[u])
        rng.shuffle(order)
        decisive = [i for i in order if labels is None or labels[i] != 0.5]
        if len(decisive) < num_context:
            raise ValueError(f"user {u!r} has only {len(decisive)} non-tie pairs, fewer than num_context={num_context}")
        context_rows[u] = sorted(decisive[:num_context])
        held = set(context_rows[u])
        pair_rows[u] = sorted(i for i in order if i not in held)
    return UserSplit(
        train_users, test_users, context_rows, pair_rows, filtered_users, filtered_rows, without,
        stats={"users": len(rows), "kept_users": len(kept), "train_users": len(train_users), "test_users": len(test_users)},
    )


def dataset_user_ids(dataset) -> list[str | None]:
    """The user_id of every item of a data-room `PairwiseDataset`, read from the Arrow column (no image decoding)."""
    from diffalign.data.sources import arrow_column

    if "user_id" not in getattr(dataset, "columns", {}):
        raise ValueError("the data set has no user_id column; PPD needs Pick-a-Pic-style rows with user_id")
    column = arrow_column(dataset.hf, "user_id").to_pylist()
    return [None if column[int(r)] is None else str(column[int(r)]) for r in dataset.rows]


def dataset_labels(dataset) -> list[float] | None:
    """label_0 of every item of a data-room `PairwiseDataset` (Arrow column, no decoding); None if unknown."""
    from diffalign.data.sources import arrow_column

    if "label_0" not in getattr(dataset, "columns", {}) or not hasattr(dataset, "rows"):
        return None
    column = arrow_column(dataset.hf, "label_0").to_pylist()
    return [float(column[int(r)]) for r in dataset.rows]


def contexts_from_dataset(dataset, split: UserSplit) -> dict[str, list[UserExample]]:
    """Context examples per user from a pairwise data set whose items carry pixel_values (2, 3, H, W),
    scores (2,) and prompt (the data room's item format): chosen is the higher-scored image."""
    contexts = {}
    for user, rows in split.context_rows.items():
        examples = []
        for i in rows:
            item = dataset[i]
            scores = item["scores"]
            if float(scores[0]) == float(scores[1]):
                raise ValueError(f"row {i} of user {user!r} is a tie and cannot be a context example")
            win, lose = (0, 1) if float(scores[0]) > float(scores[1]) else (1, 0)
            examples.append(UserExample(item["prompt"], item["pixel_values"][win], item["pixel_values"][lose]))
        contexts[user] = examples
    return contexts


class UserPairs(torch.utils.data.Subset):
    """The training users' non-context pairs: a Subset that keeps the data room's per-epoch
    augmentation (`set_epoch`) and skipped-row count of the data set it selects from."""

    @property
    def epoch(self):
        return getattr(self.dataset, "epoch", None)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    @property
    def skipped_rows(self) -> int:
        return int(getattr(self.dataset, "skipped_rows", 0) or 0)


def prepare_ppd(
    dataset,
    denoiser,
    encoder: UserEncoder,
    *,
    num_context: int = 4,
    min_pairs: int = 8,
    test_fraction: float = 0.1,
    user_dropout: float = 0.0,
    seed: int = 0,
    token_dim: int | None = None,
    user_scale: float = 1.0,
    train_encoder_head: bool = True,
    context_pool: int | None = None,
):
    """Everything the trainer needs for `objective: ppd` from a pairwise data set with user ids.

    context_pool: hold this many pairs per user apart instead of `num_context`, and condition every
    training step on a fresh draw of `num_context` of them (see `PPDConditioning`). None = num_context.

    Returns (train_dataset, hook, split): the training users' non-context pairs (`UserPairs`, a Subset),
    the `PPDConditioning` hook with user attention installed on `denoiser`, and the `UserSplit` (its
    `test_users` are for evaluation only). Ties are never context examples.
    """
    if hasattr(dataset, "hf") and hasattr(dataset, "rows"):
        user_ids = dataset_user_ids(dataset)  # the Arrow column: no image decoding
        labels = dataset_labels(dataset)
    else:
        user_ids, labels = [], []
        for i in range(len(dataset)):  # one item at a time: never holds the decoded images
            item = dataset[i]
            user_ids.append(item.get("user_id"))
            labels.append(0.5 if float(item["scores"][0]) == float(item["scores"][1]) else 1.0)
    if all(u is None or u == "" for u in user_ids):
        raise ValueError(
            f"none of the {len(user_ids)} rows has a user_id; PPD needs pairs grouped by user (Pick-a-Pic v2 parquet with "
            "its user_id column, or dataset=synthetic:users for a smoke run)"
        )
    pool = num_context if context_pool is None else context_pool
    if pool < num_context:
        raise ValueError(f"context_pool ({context_pool}) must be >= num_context ({num_context})")
    split = split_users(user_ids, num_context=pool, min_pairs=min_pairs, test_fraction=test_fraction, seed=seed, labels=labels)
    contexts = contexts_from_dataset(dataset, UserSplit(split.train_users, [], {u: split.context_rows[u] for u in split.train_users}, {}))
    train = UserPairs(dataset, split.train_rows())
    hook = PPDConditioning(encoder, contexts, user_dropout=user_dropout, seed=seed, train_encoder_head=train_encoder_head,
                           num_context=num_context if pool > num_context else None)
    hook.attach(denoiser, token_dim=token_dim, scale=user_scale, seed=seed)
    return train, hook, split


def user_encoder_from_config(cfg) -> UserEncoder:
    """The user encoder a `TrainConfig` names (`ppd_encoder`, `ppd_encoder_model`, ...); its head is seeded by `cfg.seed`."""
    from diffalign.personalization.encoder import create_user_encoder, tiny_clip_user_encoder

    model = cfg.ppd_encoder_model
    if not model:
        raise ValueError(
            "objective='ppd' needs ppd_encoder_model: an open_clip model name (e.g. ViT-H-14, with ppd_encoder_pretrained="
            "laion2b_s32b_b79k) or 'tiny' for ppd_encoder=clip; a transformers VLM id or local path for ppd_encoder=vlm"
        )
    if cfg.ppd_encoder == "clip":
        if model == "tiny":
            return tiny_clip_user_encoder(dim=cfg.ppd_encoder_dim, num_tokens=cfg.ppd_num_tokens, seed=cfg.seed)
        torch.manual_seed(cfg.seed)
        return create_user_encoder("clip", model, pretrained=cfg.ppd_encoder_pretrained, dim=cfg.ppd_encoder_dim,
                                   num_tokens=cfg.ppd_num_tokens)
    if cfg.ppd_encoder == "vlm":
        if model == "tiny":
            raise ValueError("ppd_encoder_model='tiny' exists for ppd_encoder=clip only")
        torch.manual_seed(cfg.seed)
        # The frozen VLM only describes the context examples: load it in the run's compute dtype (a 7B VLM is 15 GB in bf16).
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(getattr(cfg, "mixed_precision", "no"))
        return create_user_encoder("vlm", model, layer=cfg.ppd_encoder_layer, torch_dtype=dtype, dim=cfg.ppd_encoder_dim,
                                   num_tokens=cfg.ppd_num_tokens)
    raise ValueError(f"unknown ppd_encoder {cfg.ppd_encoder!r}; use clip or vlm")


def ppd_from_config(cfg, dataset, denoiser):
    """`prepare_ppd` with every setting from a `TrainConfig` (the trainer's `objective: ppd` path).

    Returns (train_dataset, hook, split). The data set must carry `user_id` and images (not a latent
    cache: context examples are images the user encoder sees).
    """
    if getattr(cfg, "latent_cache", None):
        raise ValueError(
            "objective='ppd' from a config needs dataset= with images (context examples go through the user encoder); "
            "latent_cache is not supported here. Build the hook yourself (prepare_ppd) to combine them."
        )
    encoder = user_encoder_from_config(cfg)
    return prepare_ppd(
        dataset, denoiser, encoder, num_context=cfg.ppd_num_context, min_pairs=cfg.ppd_min_pairs,
        test_fraction=cfg.ppd_test_fraction, user_dropout=cfg.ppd_user_dropout, seed=cfg.seed, token_dim=cfg.ppd_token_dim,
        user_scale=cfg.ppd_user_scale, train_encoder_head=cfg.ppd_train_encoder_head, context_pool=cfg.ppd_context_pool,
    )


# ---------------------------------------------------------------------------------------- synthetic users


class SyntheticUser:
    """A user whose preference is a weighted mixture of rewards (the paper's multi-reward users).

    rewards: {name: weight}; names are TOY_REWARDS keys or `diffalign.rewards` registry names
    (loaded with `reward_kwargs`). Each reward is standardised over the scored batch before mixing
    when `standardize=True`, so weights compare rewards on an equal footing.
    """

    def __init__(self, name: str, rewards: dict[str, float], standardize: bool = False, reward_kwargs: dict | None = None):
        if not rewards:
            raise ValueError("a synthetic user needs at least one reward")
        self.name, self.weights, self.standardize = name, dict(rewards), standardize
        self._models = {}
        for reward in rewards:
            if reward in TOY_REWARDS:
                self._models[reward] = TOY_REWARDS[reward]
            else:
                from diffalign import rewards as registry

                if reward not in registry.available():
                    raise ValueError(f"unknown reward {reward!r}; choose from {sorted(TOY_REWARDS) + registry.available()}")
                model = registry.load(reward, **(reward_kwargs or {}).get(reward, {}))
                self._models[reward] = model.score

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        total = torch.zeros(images.shape[0])
        for reward, weight in self.weights.items():
            s = self._models[reward](images, list(prompts)).float().cpu()
            if self.standardize and s.numel() > 1:
                s = (s - s.mean()) / s.std().clamp_min(1e-6)
            total += weight * s
        return total

    def prefers(self, images_a: torch.Tensor, images_b: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """(N,) bool: this user prefers image a over image b (scored without batch standardisation)."""
        standardize, self.standardize = self.standardize, False
        try:
            return self.score(images_a, prompts) > self.score(images_b, prompts)
        finally:
            self.standardize = standardize
