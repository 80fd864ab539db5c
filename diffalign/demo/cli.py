"""`diffalign demo` (and `python demos/app.py`): parse flags into a DemoConfig, build, serve."""

from __future__ import annotations

import argparse
import sys

from diffalign.demo.config import DemoConfig


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    d = DemoConfig()
    parser.add_argument("--base", default=d.base,
                        help="toy | toy:sd3 | tiny:sdxl | tiny:sd3 | diffusers folder | Hub id (default: toy, falling "
                             "back to the random tiny:sdxl with a notice when the toy checkpoint is absent)")
    parser.add_argument("--lora", default=None, help="aligned model: LoRA .safetensors file or folder")
    parser.add_argument("--user-adapter", default=None,
                        help="PPD output folder (user_attention.safetensors + user_encoder_head.safetensors)")
    parser.add_argument("--user-encoder", default=None,
                        help="user-encoder backbone the adapter was trained with, e.g. "
                             "clip:model_name=ViT-H-14,pretrained=laion2b_s32b_b79k (default: user_encoder.json "
                             "beside the adapter, else the tiny random open_clip)")
    parser.add_argument("--device", default=d.device, help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--dtype", default=d.dtype, help="float32 | float16 | bfloat16")
    parser.add_argument("--rewards", nargs="*", default=None,
                        help="reward models under each image: NAME or NAME:key=value,... ('none' for none; default: "
                             "what builds offline)")
    parser.add_argument("--no-geneval", action="store_true", help="do not show toy GenEval verdicts")
    parser.add_argument("--results", nargs="*", default=[], help="GenEval results folders for the Benchmark tab")
    parser.add_argument("--lora-dir", action="append", default=[], metavar="DIR",
                        help="a folder whose LoRAs clients may load by path (repeatable; --lora's folder always is)")
    parser.add_argument("--results-root", action="append", default=[], metavar="DIR",
                        help="a folder whose GenEval results and images clients may open (repeatable; the --results "
                             "folders and gradio's upload folder always are)")
    parser.add_argument("--max-loras", type=int, default=d.max_loras, help="LoRAs kept loaded at once (LRU)")
    parser.add_argument("--host", default=d.host,
                        help="bind address (default 127.0.0.1: this machine only); any other needs --auth or --insecure_public")
    parser.add_argument("--auth", action="append", default=[], metavar="USER:PASSWORD", help="a login (repeatable)")
    parser.add_argument("--auth-file", default=None, help="a file of USER:PASSWORD lines (keeps passwords out of `ps`)")
    parser.add_argument("--insecure-public", action="store_true", help="serve a non-local --host without a login")
    parser.add_argument("--port", type=int, default=d.port)
    parser.add_argument("--concurrency-limit", type=int, default=d.concurrency_limit)
    parser.add_argument("--max-queue-size", type=int, default=d.max_queue_size)
    parser.add_argument("--max-steps", type=int, default=d.max_steps)
    parser.add_argument("--max-size", type=int, default=d.max_size)
    parser.add_argument("--max-upload-mb", type=float, default=d.max_upload_mb)
    parser.add_argument("--max-upload-pixels", type=int, default=d.max_upload_pixels)
    return parser


def parse_auth(pairs: list[str], auth_file: str | None) -> list[tuple[str, str]] | None:
    lines = list(pairs)
    if auth_file:
        with open(auth_file, encoding="utf-8") as f:
            lines += [line.strip() for line in f if line.strip() and not line.startswith("#")]
    logins = []
    for line in lines:
        user, sep, password = line.partition(":")
        if not sep or not user or not password:
            raise ValueError("each login must be USER:PASSWORD with both parts non-empty")
        logins.append((user, password))
    return logins or None


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    return DemoConfig(
        lora_dirs=list(args.lora_dir), results_roots=list(args.results_root), max_loras=args.max_loras,
        auth=parse_auth(args.auth, args.auth_file), insecure_public=args.insecure_public,
        base=args.base, lora=args.lora, user_adapter=args.user_adapter, user_encoder=args.user_encoder, device=args.device, dtype=args.dtype,
        rewards=args.rewards, geneval=not args.no_geneval, results_dirs=list(args.results), host=args.host,
        port=args.port, concurrency_limit=args.concurrency_limit, max_queue_size=args.max_queue_size,
        max_steps=args.max_steps, max_size=args.max_size, max_upload_mb=args.max_upload_mb,
        max_upload_pixels=args.max_upload_pixels,
    )


def run(args: argparse.Namespace) -> int:
    import importlib.util

    if importlib.util.find_spec("gradio") is None:
        print("diffalign demo needs gradio: pip install 'diffalign[demo]'", file=sys.stderr)
        return 2
    from diffalign.demo import build_app, launch

    try:
        config = config_from_args(args)
        demo = build_app(config)
    except (OSError, ValueError, KeyError) as e:
        print(f"diffalign demo: {e}", file=sys.stderr)
        return 2
    for notice in demo.diffalign_state.notices:
        print(f"notice: {notice}", file=sys.stderr)
    if not config.is_local:
        login = "with a login" if config.auth else "WITHOUT a login (--insecure_public)"
        print(f"warning: serving on {config.host} {login}: other machines can reach this demo", file=sys.stderr)
    launch(demo, config)
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="Gradio demo: compare base vs aligned, personalize, browse GenEval results")
    add_arguments(parser)
    parser.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    from diffalign.cli import snake_case_options

    parser = add_arguments(argparse.ArgumentParser(prog="demos/app.py", description="diffalign Gradio demo"))
    return run(snake_case_options(parser).parse_args(argv))
