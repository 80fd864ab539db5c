"""`diffalign train` and `train/train.py`: parse `--config FILE` plus `key=value` overrides, then train."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", default=None, help="YAML config (see train/configs/); keys of diffalign.training.TrainConfig")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides; they win over the file")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")


def run(args: argparse.Namespace) -> int:
    from diffalign.training import TrainConfig, train

    config = TrainConfig.from_yaml(args.config, args.overrides)
    if args.print_config:
        print(config.to_json())
        return 0
    summary = train(config)
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=2, default=str))
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train with DPO / RankDPO / SFT / PPD (run under `accelerate launch` for several GPUs)",
        description="Preference training. Example: diffalign train --config train/configs/tiny_sdxl_dpo.yaml max_train_steps=5",
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    from diffalign.cli import run_command

    parser = argparse.ArgumentParser(description="diffalign preference trainer (accelerate launch train/train.py --config ...)")
    add_arguments(parser)
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return run_command(run, parser.parse_args(argv), "train.py")
