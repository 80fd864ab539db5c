"""The `diffalign` command.

Each sub-command lives in the module that owns its logic and exposes
`register(subparsers)`, which adds its parser and sets `func`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# (name, module). A module listed here must exist; add a line when a room gains a command.
COMMANDS: list[tuple[str, str]] = [
    ("cache", "diffalign.data.cache"),
    ("geneval", "diffalign.evaluation.geneval.cli"),
    ("synth", "diffalign.synth.cli"),
    ("train", "diffalign.training.cli"),
    ("demo", "diffalign.demo.cli"),
    ("quickstart", "diffalign.toyworld.quickstart"),
]


# Errors a user causes (bad config, missing file, refused output_dir): one line, no traceback.
EXPECTED_ERRORS = (ValueError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
                   PermissionError, FloatingPointError)


def run_command(func, args: argparse.Namespace, prog: str) -> int:
    """`func(args)`, with expected errors printed as `prog: error: message` (exit 2); --debug or
    DIFFALIGN_DEBUG=1 lets them raise with their traceback."""
    if getattr(args, "debug", False) or os.environ.get("DIFFALIGN_DEBUG", "") not in ("", "0"):
        return int(func(args) or 0)
    try:
        return int(func(args) or 0)
    except EXPECTED_ERRORS as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        print(f"{prog}: (rerun with --debug for the traceback)", file=sys.stderr)
        return 2


def snake_case_options(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """One flag style: `--a_b` is the spelling of every `--a-b` option (as TRL and the diffusers scripts spell flags),
    and `--a-b` (the older spelling here) stays an alias; recurses into sub-commands. Returns the parser."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in set(action.choices.values()):
                snake_case_options(sub)
            continue
        for opt in list(action.option_strings):
            snake = "--" + opt[2:].replace("-", "_")
            if opt.startswith("--") and snake != opt and snake not in parser._option_string_actions:
                parser._option_string_actions[snake] = action
                action.option_strings.insert(action.option_strings.index(opt), snake)
    return parser


def build_parser() -> argparse.ArgumentParser:
    from diffalign import __version__

    parser = argparse.ArgumentParser(
        prog="diffalign",
        description="Align text-to-image diffusion models with preferences (Diffusion-DPO, RankDPO, PPD).",
    )
    parser.add_argument("--version", action="version", version=f"diffalign {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for _name, module_name in COMMANDS:
        importlib.import_module(module_name).register(subparsers)
    return snake_case_options(parser)


def main(argv: list[str] | None = None) -> int:
    # Idle OpenMP threads must not spin: several of our jobs share few cores.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0
    return run_command(args.func, args, f"diffalign {args.command}")


if __name__ == "__main__":
    sys.exit(main())
