"""A short, offline PPD run on a tiny model with two synthetic users (the issue's "must show" run).

Two users judge the SAME image pairs in opposite ways ("warm" prefers redder images, "cool" bluer
ones; rewards `toy_red` / `toy_blue`), under the same prompt. Only user conditioning can fit both.
The run goes through the project trainer (`PreferenceTrainer`, `objective: ppd`) with
`PPDConditioning`, then measures on fresh pairs and fresh generations:

- implicit preference accuracy: the fraction of held-out pairs on which the DPO implicit reward of
  the user-conditioned model, -(err_policy - err_ref), is higher for the image the user prefers
  (the base model scores 50% by construction: policy = reference);
- generation: mean user reward of images generated with the user's embedding minus that of the base
  model's images from the same seeds, and the win rate of conditioned over base.

This is a smoke-scale demonstration on random tiny models, not a quality measurement.
"""

from __future__ import annotations

import copy
import json
import os
import time

import numpy as np
import torch

from diffalign.data.synthetic import TWO_USER_PROMPT as PROMPT
from diffalign.data.synthetic import TwoUserPairs, pair_images
from diffalign.personalization.attention import user_attention_disabled, user_condition
from diffalign.personalization.encoder import UserExample, tiny_clip_user_encoder
from diffalign.personalization.training import PPDConditioning, SyntheticUser

USERS = {"warm": {"toy_red": 1.0}, "cool": {"toy_blue": 1.0}}


def context_examples(users: dict[str, SyntheticUser], num_context: int, resolution: int, seed: int) -> dict[str, list[UserExample]]:
    """Held-apart context pairs per user (fresh images, not in the training pairs)."""
    contexts = {}
    for j, (name, user) in enumerate(users.items()):
        rng = np.random.default_rng([seed, 1000 + j])
        examples = []
        for _ in range(num_context):
            px = pair_images(rng, resolution)
            a_first = bool(user.prefers(px[:1], px[1:], [PROMPT])[0])
            win, lose = (px[0], px[1]) if a_first else (px[1], px[0])
            examples.append(UserExample(PROMPT, win, lose))
        contexts[name] = examples
    return contexts


@torch.no_grad()
def implicit_accuracy(adapter, model, embedding, pairs: TwoUserPairs, user: str, draws: int = 4, seed: int = 0) -> float:
    """Share of (pair, noise draw) on which the conditioned model's implicit reward prefers the user's choice."""
    from diffalign.kernels import per_sample_error

    items = [it for it in pairs.items if it["user_id"] == user]
    px = torch.stack([it["pixel_values"] for it in items])  # (B, 2, 3, H, W), chosen first
    b = px.shape[0]
    encoded = adapter.encode_images(px.flatten(0, 1), generator=torch.Generator().manual_seed(seed)).float()
    latents = encoded.view(b, 2, *encoded.shape[1:])
    text = {k: v.repeat_interleave(2 * b, dim=0) for k, v in adapter.encode_prompts([PROMPT]).items()}
    wins = total = 0
    for d in range(draws):
        g = torch.Generator().manual_seed(seed * 1000 + d)
        inp = adapter.training_inputs(latents, generator=g)
        x_t, t, target, weight = inp["x_t"], inp["timesteps"], inp["target"], inp["weight"]
        micro = adapter.micro_conditioning(torch.tensor([[px.shape[-2], px.shape[-1]]] * 2 * b),
                                           torch.zeros(2 * b, 2, dtype=torch.int64), (px.shape[-2], px.shape[-1]))
        with user_attention_disabled(model):
            ref = adapter.predict(model, x_t, t, text, micro)
        with user_condition(model, embedding.expand(2 * b, *embedding.shape[-2:])):
            pol = adapter.predict(model, x_t, t, text, micro)
        s = (per_sample_error(pol, target, weight) - per_sample_error(ref, target, weight)).view(b, 2)  # reward: -beta * s
        wins += int((s[:, 0] < s[:, 1]).sum())
        total += b
    return wins / total


@torch.no_grad()
def generation_scores(pipe, users: dict[str, SyntheticUser], embeddings: dict[str, torch.Tensor], seeds, resolution: int, steps: int, guidance: float):
    """Mean user reward of conditioned vs base generations from the same seeds, and the win rate."""
    kw = dict(prompt=PROMPT, num_inference_steps=steps, height=resolution, width=resolution, guidance_scale=guidance, output_type="pt")
    base = torch.cat([pipe(generator=torch.Generator().manual_seed(s), **kw).images for s in seeds]) * 2 - 1
    prompts = [PROMPT] * len(seeds)
    conditioned = {
        name: torch.cat([
            pipe(generator=torch.Generator().manual_seed(s), user_embedding=embeddings[name], **kw).images for s in seeds
        ]) * 2 - 1
        for name in users
    }
    out = {}
    for name, user in users.items():
        other = [v for v in users if v != name][0]
        r_base, r_cond = user.score(base, prompts), user.score(conditioned[name], prompts)
        r_other = user.score(conditioned[other], prompts)  # this user's reward on images made for the other user
        out[name] = {
            "reward_base": float(r_base.mean()),
            "reward_conditioned": float(r_cond.mean()),
            "reward_conditioned_on_other_user": float(r_other.mean()),
            "win_rate_vs_base": float((r_cond > r_base).float().mean()),
            "win_rate_vs_other_user": float((r_cond > r_other).float().mean()),
        }
    return out


def run_toy_ppd(
    output_dir: str,
    model: str = "tiny:sd3",
    steps: int = 200,
    num_pairs: int = 64,
    num_context: int = 4,
    resolution: int = 32,
    batch_size: int = 8,
    learning_rate: float = 1e-3,
    beta: float = 500.0,
    lora_rank: int = 4,
    user_dropout: float = 0.0,
    seed: int = 0,
    eval_seeds: int = 16,
    eval_steps: int = 8,
    guidance: float = 1.0,
) -> dict:
    """Train PPD on two synthetic users with the project trainer, then measure. Writes results.json."""
    from diffalign.families import load_family
    from diffalign.pipelines import personalized_pipeline_class
    from diffalign.training.config import TrainConfig
    from diffalign.training.trainer import PreferenceTrainer

    torch.manual_seed(seed)
    users = {name: SyntheticUser(name, rewards) for name, rewards in USERS.items()}
    train_pairs = TwoUserPairs(users, num_pairs, resolution, seed)
    test_pairs = TwoUserPairs(users, 32, resolution, seed + 1)
    contexts = context_examples(users, num_context, resolution, seed)

    encoder = tiny_clip_user_encoder(dim=32, num_tokens=4, seed=seed)
    hook = PPDConditioning(encoder, contexts, user_dropout=user_dropout, seed=seed)
    adapter = load_family(model, seed=seed)
    base_denoiser = copy.deepcopy(adapter.denoiser).eval()
    hook.attach(adapter.denoiser, seed=seed)
    cfg = TrainConfig(
        pretrained_model_name_or_path=model, objective="ppd", beta=beta, resolution=resolution, tuning="lora",
        lora_rank=lora_rank, train_batch_size=batch_size, max_train_steps=steps, learning_rate=learning_rate,
        output_dir=output_dir, overwrite_output_dir=True, checkpointing_steps=0, report_to="none", seed=seed, model_seed=seed, progress_bar=True,
    )
    t0 = time.perf_counter()
    trainer = PreferenceTrainer(cfg, train_dataset=train_pairs, adapter=adapter, conditioning=hook)
    summary = trainer.train()
    train_s = time.perf_counter() - t0
    model_ = trainer.unwrapped.eval()
    encoder.eval()
    with torch.no_grad():
        embeddings = {u: hook.user_embeddings([u])[0].detach() for u in users}

    keys = ("objective", "beta", "learning_rate", "max_train_steps", "train_batch_size", "lora_rank", "resolution")
    results = {"config": {k: getattr(cfg, k) for k in keys}, "model": model, "train_seconds": round(train_s, 1),
               "num_pairs_per_user": num_pairs, "num_context": num_context, "user_dropout": user_dropout,
               "trainer_summary": {k: v for k, v in summary.items() if isinstance(v, (int, float, str)) or k == "final_metrics"},
               "implicit_accuracy": {}, "cross_user_implicit_accuracy": {}}
    for u in users:
        other = [v for v in users if v != u][0]
        results["implicit_accuracy"][u] = implicit_accuracy(adapter, model_, embeddings[u], test_pairs, u, seed=seed)
        # The same pairs judged by u, but the model conditioned on the OTHER user: should be low.
        results["cross_user_implicit_accuracy"][u] = implicit_accuracy(adapter, model_, embeddings[other], test_pairs, u, seed=seed)

    # Generation: LoRA off and user attention off = the base; LoRA off + user = the user branch alone.
    pipe = adapter.pipeline(model_)
    cls = personalized_pipeline_class(adapter.name)
    ppipe = cls.from_base(pipe)
    ppipe.set_progress_bar_config(disable=True)
    seeds = list(range(1000, 1000 + eval_seeds))
    model_.disable_adapters()
    try:
        results["generation_user_branch_only"] = generation_scores(ppipe, users, embeddings, seeds, resolution, eval_steps, guidance)
    finally:
        model_.enable_adapters()
    results["generation_with_lora"] = generation_scores(ppipe, users, embeddings, seeds, resolution, eval_steps, guidance)
    with torch.no_grad():  # sanity: the saved base equals the trained model with LoRA and users off
        x = torch.randn(1, *adapter.encode_images(torch.zeros(1, 3, resolution, resolution)).shape[1:])
        text = adapter.encode_prompts([PROMPT])
        t = torch.tensor([500.0]) if adapter.name == "sd3" else torch.tensor([500])
        micro = adapter.micro_conditioning(torch.tensor([[resolution, resolution]]), torch.zeros(1, 2, dtype=torch.int64),
                                           (resolution, resolution))
        model_.disable_adapters()
        a = adapter.predict(model_, x, t, text, micro)
        model_.enable_adapters()
        b = adapter.predict(base_denoiser, x, t, text, micro)
        results["base_recovered_max_abs_diff"] = float((a - b).abs().max())
    hook.save(output_dir)
    with open(os.path.join(output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    return results


def evaluate_saved(output_dir: str, model: str = "tiny:sd3", num_context: int = 4, resolution: int = 32, seed: int = 0,
                   eval_seeds: int = 16, eval_steps: int = 8, guidance: float = 1.0) -> dict:
    """Re-evaluate a finished toy run from its saved user attention + encoder head, user branch only (no LoRA)."""
    from diffalign.families import load_family
    from diffalign.personalization.attention import load_user_attention
    from diffalign.pipelines import personalized_pipeline_class

    users = {name: SyntheticUser(name, rewards) for name, rewards in USERS.items()}
    test_pairs = TwoUserPairs(users, 32, resolution, seed + 1)
    contexts = context_examples(users, num_context, resolution, seed)
    encoder = tiny_clip_user_encoder(dim=32, num_tokens=4, seed=seed)
    encoder.load_head(os.path.join(output_dir, "user_encoder_head.safetensors"))
    encoder.eval()
    adapter = load_family(model, seed=seed)
    den = adapter.denoiser.eval()
    load_user_attention(den, os.path.join(output_dir, "user_attention.safetensors"))
    with torch.no_grad():
        embeddings = {u: encoder(contexts[u]).detach() for u in users}
    out = {"implicit_accuracy": {}, "cross_user_implicit_accuracy": {}}
    for u in users:
        other = [v for v in users if v != u][0]
        out["implicit_accuracy"][u] = implicit_accuracy(adapter, den, embeddings[u], test_pairs, u, seed=seed)
        out["cross_user_implicit_accuracy"][u] = implicit_accuracy(adapter, den, embeddings[other], test_pairs, u, seed=seed)
    cls = personalized_pipeline_class(adapter.name)
    pipe = cls.from_base(adapter.pipeline(den))
    pipe.set_progress_bar_config(disable=True)
    seeds = list(range(1000, 1000 + eval_seeds))
    out["generation_user_branch_only"] = generation_scores(pipe, users, embeddings, seeds, resolution, eval_steps, guidance)
    return out
