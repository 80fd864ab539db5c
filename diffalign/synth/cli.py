"""`diffalign synth`: make a ranked synthetic preference data set (Syn-Pic schema).

    diffalign synth --prompts prompts.txt \\
        --generator "stabilityai/stable-diffusion-xl-base-1.0,id=sdxl,steps=30,guidance=5,size=1024" \\
        --generator "stabilityai/stable-diffusion-3-medium-diffusers,id=sd3,steps=28,guidance=7,size=1024" \\
        --reward "hpsv21,checkpoint=/models/HPS_v2.1_compressed.pt" --reward "pickscore" \\
        --output_dir synpic/ [--pairwise_dir synpic-pairs/ --pairwise_mode best_worst]

Multi-process: `accelerate launch --num_processes N -m diffalign.cli synth ...`. Restart the same command
to resume. A --config YAML/JSON file may hold the same keys; flags given on the command line win.
"""

from __future__ import annotations

import argparse
import json
import logging


def register(subparsers) -> None:
    p = subparsers.add_parser("synth", help="generate k images per prompt with several models, score, rank by win counts",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML or JSON file with SynthConfig keys")
    p.add_argument("--prompts", help=".txt (one prompt a line), .jsonl, or hf:<dataset id or save_to_disk folder>")
    p.add_argument("--prompt_field", help="JSONL / dataset column holding the prompt (default: prompt)")
    p.add_argument("--prompt_id_field", help="column holding a stable prompt id (default: the row index)")
    p.add_argument("--prompt_split", help="dataset split (default: train)")
    p.add_argument("--limit", type=int, help="use only the first N prompts")
    p.add_argument("--generator", action="append", dest="generators", metavar="SPEC",
                   help="'source[,id=..,steps=..,guidance=..,size=..|height=..,width=..,seed=..,seed_policy=per_prompt|fixed,"
                        "n=images_per_prompt,batch_size=..,dtype=..,variant=..,scheduler=<diffusers class>]'; source: diffusers id/path or "
                        "tiny:sdxl[:seed] / tiny:sd3[:seed]. Repeat for each generator.")
    p.add_argument("--reward", action="append", dest="rewards", metavar="SPEC",
                   help="'name[,id=..,key=value..]' (keys go to diffalign.rewards.load). Repeat for each reward.")
    p.add_argument("--output_dir", help="where the parquet shards (and the resumable progress) go")
    p.add_argument("--chunk_size", type=int, help="prompts per shard (default 64)")
    p.add_argument("--chunks_per_pass", type=int, help="chunks per pipeline load (default 16)")
    p.add_argument("--reward_batch_size", type=int, help="images per reward forward (default 16)")
    p.add_argument("--skip_bad_prompts", action="store_true", default=None,
                   help="skip empty / over-77-token prompts and report the count, instead of failing")
    p.add_argument("--pairwise_dir", help="also export Pick-a-Pic-schema pairs here")
    p.add_argument("--pairwise_mode", choices=["best_worst", "all_pairs"])
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    p.set_defaults(func=main)


def _load_config_file(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        if path.endswith((".yaml", ".yml")):
            import yaml

            return yaml.safe_load(f) or {}
        return json.load(f)


def main(args) -> int:
    from diffalign.synth.runner import config_from_dict, run_synth

    # Our logger only: open_clip logs every model build at INFO on the root logger.
    log = logging.getLogger("diffalign")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.propagate = False  # accelerate/torchrun may give the root logger a handler too: no double lines
    log.setLevel(logging.INFO)
    values = _load_config_file(args.config) if args.config else {}
    for key in ("prompts", "prompt_field", "prompt_id_field", "prompt_split", "limit", "generators", "rewards",
                "output_dir", "chunk_size", "chunks_per_pass", "reward_batch_size", "skip_bad_prompts",
                "pairwise_dir", "pairwise_mode"):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    if args.no_progress:
        values["progress"] = False
    for key in ("prompts", "output_dir", "generators", "rewards"):
        if not values.get(key):
            raise SystemExit(f"diffalign synth: --{key.rstrip('s') if key in ('generators', 'rewards') else key} "
                             "is required (on the command line or in --config)")
    stats = run_synth(config_from_dict(values))
    logging.getLogger("diffalign.synth").info("done: %s", json.dumps(stats.__dict__))
    return 0
