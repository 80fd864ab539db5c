"""Score images with reward models: mean ± standard error per reward (a table and JSON), and, for two sets,
the win rate of the first over the second per reward (matched per image; ties count half).

    # two folders of images (each with metadata.jsonl: {"file_name": ..., "prompt": ...} per line)
    python eval/rewards.py --images runs/base --images runs/rankdpo \\
        --reward "hpsv21,checkpoint=/models/HPS_v2.1_compressed.pt" --reward pickscore --json out.json

    # two models on a prompt set (generator specs as in `diffalign synth`)
    python eval/rewards.py --prompts prompts.txt --generator "tiny:sdxl:0,steps=2,size=64" \\
        --generator "tiny:sdxl:1,steps=2,size=64" --reward "clip_score,model_name=diffalign-tiny-clip,random_init=true"
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", action="append", default=[], help="image folder with metadata.jsonl (repeat)")
    p.add_argument("--generator", action="append", default=[], help="generator spec (repeat); needs --prompts")
    p.add_argument("--prompts", help=".txt / .jsonl / hf:<dataset> prompt source for --generator")
    p.add_argument("--prompt_field", default="prompt")
    p.add_argument("--limit", type=int)
    p.add_argument("--reward", action="append", required=True, help="reward spec 'name[,key=value...]' (repeat)")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--device", default=None)
    p.add_argument("--save_images", help="save generated images here (one folder per generator)")
    p.add_argument("--json", help="write the results here as JSON")
    args = p.parse_args(argv)

    from diffalign.rewards.report import (
        evaluate_sets,
        format_summary_table,
        format_win_table,
        generate_set,
        load_image_folder,
    )
    from diffalign.synth.prompts import check_prompts, load_prompts
    from diffalign.synth.specs import GeneratorSpec, RewardSpec, check_unique_ids

    if not args.images and not args.generator:
        p.error("give --images FOLDER or --generator SPEC (with --prompts), once or twice")
    sets = {}
    for folder in args.images:
        name = os.path.basename(os.path.normpath(folder))
        if name in sets:
            name = folder
        sets[name] = load_image_folder(folder)
    if args.generator:
        if not args.prompts:
            p.error("--generator needs --prompts")
        import torch

        prompts, _ = check_prompts(load_prompts(args.prompts, field=args.prompt_field, limit=args.limit))
        specs = [GeneratorSpec.parse(g) for g in args.generator]
        check_unique_ids(specs, "generator")
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        for spec in specs:
            save = os.path.join(args.save_images, spec.id.replace("/", "_").replace(":", "_")) if args.save_images else None
            sets[spec.id] = generate_set(spec, prompts, device, save)
    rewards = [RewardSpec.parse(r) for r in args.reward]
    check_unique_ids(rewards, "reward")
    result = evaluate_sets(sets, rewards, device=args.device, batch_size=args.batch_size)
    print(format_summary_table(result["summary"]))
    if "win_rates" in result:
        w = result["win_rates"]
        print()
        print(format_win_table(w["per_reward"], w["a"], w["b"]))
    print()
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    from diffalign.cli import EXPECTED_ERRORS

    if "--debug" in sys.argv:
        sys.argv.remove("--debug")
        sys.exit(main())
    try:
        sys.exit(main())
    except EXPECTED_ERRORS as e:  # one line for a bad folder or spec; --debug shows the traceback
        print(f"eval/rewards.py: error: {e}", file=sys.stderr)
        sys.exit(2)
