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


def build_parser() -> argparse.ArgumentParser:
    from diffalign import __version__

    parser = argparse.ArgumentParser(
        prog="diffalign",
        description="Align text-to-image diffusion models with preferences (Diffusion-DPO, RankDPO, PPD).",
    )
    parser.add_argument("--version", action="version", version=f"diffalign {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for _name, module_name in COMMANDS:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Idle OpenMP threads must not spin: several of our jobs share few cores.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
