"""`diffalign train` and `train/train.py`: `--config FILE`, then overrides as `key=value`, `--key value` or
`--key=value` (every TrainConfig field is a flag, listed with its help by `--help`), then train."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import types
import typing

FIELDS_GROUP = "TrainConfig fields (each also works as key=value; they win over --config)"


def _without_none(hint):
    """X for `X | None`, else the hint itself."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else hint
    return hint


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from diffalign.training.config import TrainConfig, available_configs

    parser.add_argument("--config", "-c", default=None, help="YAML file, or the name of a shipped config ("
                        f"{', '.join(available_configs())}); keys of diffalign.training.TrainConfig")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides; they win over the file")
    parser.add_argument("--print_config", "--print-config", action="store_true", help="print the resolved config as JSON and exit")
    group = parser.add_argument_group(FIELDS_GROUP)
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        hint = _without_none(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kwargs: dict = {"metavar": hint.__name__.upper() if isinstance(hint, type) else "VALUE"}
        if typing.get_origin(hint) is typing.Literal:
            kwargs["metavar"] = "{" + ",".join(typing.get_args(hint)) + "}"
        elif typing.get_origin(hint) is list:
            kwargs["nargs"] = "+"
        elif hint is bool:
            kwargs.update(nargs="?", const="true", metavar="true|false")  # `--use_ema` alone means true
        # Values stay strings here and are parsed as the key=value form is (YAML), then checked by TrainConfig.
        group.add_argument(f"--{f.name}", dest=f"field:{f.name}", default=argparse.SUPPRESS,
                           help=f"{f.metadata.get('help', '')} (default: {default!r})", **kwargs)


def _field_overrides(args: argparse.Namespace) -> list[str]:
    """`--key value` flags as `key=value` overrides (values parsed as YAML, as the positional form)."""
    out = []
    for dest, value in vars(args).items():
        if dest.startswith("field:"):
            name = dest[len("field:"):]
            out.append(f"{name}={json.dumps(value) if isinstance(value, list) else value}")
    return out


def run(args: argparse.Namespace) -> int:
    from diffalign.training import TrainConfig, train

    config = TrainConfig.from_yaml(args.config, list(args.overrides) + _field_overrides(args))
    if args.print_config:
        print(config.to_json())
        return 0
    summary = train(config)
    if int(os.environ.get("RANK", "0")) == 0:  # once, not once per process of `accelerate launch`
        print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=2, default=str))
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train with DPO / RankDPO / SFT / PPD (run under `accelerate launch` for several GPUs)",
        description="Preference training. Example: diffalign train --config tiny_sdxl_dpo --max_train_steps 5",
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    from diffalign.cli import run_command

    parser = argparse.ArgumentParser(description="diffalign preference trainer (accelerate launch train/train.py --config ...)")
    add_arguments(parser)
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return run_command(run, parser.parse_args(argv), "train.py")
