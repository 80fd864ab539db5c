"""PPD evaluation: win rate of user-conditioned over base generations for held-out users, N in {1, 2, 4, 8}.

Synthetic users (judged by their own reward mixture):
    python eval/personalization.py --pretrained_model_name_or_path stabilityai/stable-diffusion-3-medium-diffusers \
        --user_attention out/ppd/user_attention.safetensors --encoder clip --encoder_model ViT-H-14 \
        --encoder_pretrained laion2b_s32b_b79k --encoder_head out/ppd/user_encoder_head.safetensors \
        --synthetic_user aesthetic=aesthetic:1 --synthetic_user mix=pickscore:0.5,hpsv21:0.5 \
        --prompts_file prompts.txt --seeds 4 --interpolate aesthetic mix --output ppd_eval.json

Real held-out users (Pick-a-Pic rows with user_id), judged by a preference model:
    ... --dataset /data/pickapic_test --judge pickscore --max_users 50

Offline smoke run: --pretrained_model_name_or_path tiny:sd3 --encoder clip --encoder_model tiny
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained_model_name_or_path", required=True)
    p.add_argument("--user_attention", help="safetensors from save_user_attention / PPDConditioning.save")
    p.add_argument("--encoder", default="clip", choices=["clip", "vlm"])
    p.add_argument("--encoder_model", default="tiny", help="open_clip name ('tiny' = offline random) or a VLM id")
    p.add_argument("--encoder_pretrained", default=None)
    p.add_argument("--encoder_head", default=None, help="safetensors from UserEncoder.save_head")
    p.add_argument("--encoder_dim", type=int, default=32)
    p.add_argument("--num_tokens", type=int, default=4)
    p.add_argument("--vlm_layer", type=int, default=-2)
    p.add_argument("--synthetic_user", action="append", default=[], help="name=reward:weight[,reward:weight...]")
    p.add_argument("--dataset", help="pairwise data with user_id (real users)")
    p.add_argument("--judge", help="reward name judging real users (e.g. pickscore)")
    p.add_argument("--max_users", type=int, default=50)
    p.add_argument("--min_pairs", type=int, default=10)
    p.add_argument("--num_examples", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--prompts", nargs="*", default=None)
    p.add_argument("--prompts_file", default=None)
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--num_inference_steps", type=int, default=28)
    p.add_argument("--guidance_scale", type=float, default=5.0)
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--interpolate", nargs=2, metavar=("USER_A", "USER_B"), help="two synthetic users")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="ppd_eval.json")
    return p.parse_args(argv)


def _parse_user(spec: str):
    name, _, rest = spec.partition("=")
    if not name or not rest:
        raise ValueError(f"--synthetic_user {spec!r}: use name=reward:weight[,reward:weight]")
    weights = {}
    for part in rest.split(","):
        reward, _, w = part.partition(":")
        weights[reward] = float(w) if w else 1.0
    return name, weights


def main(argv=None) -> dict:
    import torch

    from diffalign.families import family_of_pipeline, load_pipeline
    from diffalign.personalization import (
        SyntheticUser,
        create_user_encoder,
        load_user_attention,
        tiny_clip_user_encoder,
    )
    from diffalign.personalization.evaluation import (
        interpolation_monotonicity,
        synthetic_user_examples,
        win_rates,
    )
    from diffalign.pipelines import (
        PersonalizedStableDiffusion3Pipeline,
        PersonalizedStableDiffusionXLPipeline,
    )

    args = parse_args(argv)
    if not args.synthetic_user and not args.dataset:
        raise ValueError("give --synthetic_user (one or more) and/or --dataset with --judge")
    if args.dataset and not args.judge:
        raise ValueError("real users need a preference model: pass --judge <reward name>")
    prompts = args.prompts or []
    if args.prompts_file:
        with open(args.prompts_file, encoding="utf-8") as f:
            prompts += [line.strip() for line in f if line.strip()]
    if not prompts and not args.dataset:
        raise ValueError("give --prompts or --prompts_file")

    torch.manual_seed(args.seed)
    base = load_pipeline(args.pretrained_model_name_or_path, seed=args.seed)
    cls = PersonalizedStableDiffusion3Pipeline if family_of_pipeline(base) == "sd3" else PersonalizedStableDiffusionXLPipeline
    pipe = cls.from_base(base)
    pipe.set_progress_bar_config(disable=True)
    if args.encoder == "clip" and args.encoder_model == "tiny":
        encoder = tiny_clip_user_encoder(dim=args.encoder_dim, num_tokens=args.num_tokens, seed=args.seed)
    elif args.encoder == "clip":
        encoder = create_user_encoder("clip", args.encoder_model, pretrained=args.encoder_pretrained,
                                      dim=args.encoder_dim, num_tokens=args.num_tokens)
    else:
        encoder = create_user_encoder("vlm", args.encoder_model, layer=args.vlm_layer, dim=args.encoder_dim,
                                      num_tokens=args.num_tokens)
    if args.encoder_head:
        encoder.load_head(args.encoder_head)
    denoiser = pipe.transformer if hasattr(pipe, "transformer") else pipe.unet
    if args.user_attention:
        load_user_attention(denoiser, args.user_attention)
    else:
        from diffalign.personalization import add_user_attention

        print("warning: no --user_attention given; evaluating freshly initialised (identity) user attention", file=sys.stderr)
        add_user_attention(denoiser, encoder_dim=encoder.dim, seed=args.seed)
    pipe.set_user_encoder(encoder)

    gen = dict(num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale)
    if args.resolution:
        gen.update(height=args.resolution, width=args.resolution)
    seeds = list(range(args.seed + 10_000, args.seed + 10_000 + args.seeds))
    n_max = max(args.num_examples)
    users, synthetic = {}, {}
    for spec in args.synthetic_user:
        name, weights = _parse_user(spec)
        user = SyntheticUser(name, weights)
        synthetic[name] = user
        # Context pairs: base generations with seeds disjoint from the evaluation seeds.
        examples = synthetic_user_examples(pipe, user, prompts, n_max, seed=args.seed + 20_000, **gen)
        users[name] = (examples, user.score)
    if args.dataset:
        from diffalign.data import load_preference_dataset
        from diffalign.personalization import UserSplit, contexts_from_dataset, dataset_user_ids, split_users
        from diffalign.rewards import load as load_reward

        ds = load_preference_dataset(args.dataset, "pairwise", resolution=args.resolution or 512)
        split = split_users(dataset_user_ids(ds), num_context=n_max, min_pairs=max(args.min_pairs, n_max + 1),
                            test_fraction=0.0, seed=args.seed)
        chosen = split.train_users[: args.max_users]  # every user of an evaluation split is held out from training
        contexts = contexts_from_dataset(ds, UserSplit(chosen, [], {u: split.context_rows[u] for u in chosen}, {}))
        judge = load_reward(args.judge).score
        for u in chosen:
            users[f"user:{u}"] = (contexts[u], judge)
        if not prompts:  # the users' own (non-context) prompts, a few of them
            rows = [split.pair_rows[u][0] for u in chosen[:8]]
            prompts = sorted({ds[i]["prompt"] for i in rows})
    result = {"win_rates": win_rates(pipe, encoder, users, prompts, seeds, args.num_examples, **gen)}
    if args.interpolate:
        a, b = args.interpolate
        if a not in synthetic or b not in synthetic:
            raise ValueError(f"--interpolate needs two --synthetic_user names, got {a!r}, {b!r}")
        emb_a, emb_b = encoder(users[a][0]), encoder(users[b][0])
        result["interpolation"] = interpolation_monotonicity(pipe, emb_a, emb_b, synthetic[a].score, synthetic[b].score,
                                                             prompts, seeds, **gen)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result["win_rates"]["mean_win_rate"], indent=2))
    return result


if __name__ == "__main__":
    main()
