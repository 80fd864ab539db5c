"""`diffalign geneval generate | evaluate | summary` (also `python eval/geneval.py ...`)."""

from __future__ import annotations

import argparse
import json
import os
import sys


def _dtype(name: str):
    import torch

    table = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    if name not in table:
        raise ValueError(f"--dtype must be one of {sorted(table)}, got {name!r}.")
    return table[name]


def _generate(args) -> int:
    from diffalign.evaluation.geneval import load_metadata
    from diffalign.evaluation.geneval.runner import generate, load_pipeline, parse_indices

    metadata = load_metadata(args.metadata)
    kwargs = json.loads(args.pipeline_kwargs) if args.pipeline_kwargs else {}
    if not isinstance(kwargs, dict):
        raise ValueError("--pipeline_kwargs must be a JSON object, e.g. '{\"clip_skip\": 1}'.")
    for key, value in (
        ("num_inference_steps", args.steps),
        ("guidance_scale", args.guidance_scale),
        ("height", args.height),
        ("width", args.width),
        ("negative_prompt", args.negative_prompt),
    ):
        if value is not None:
            kwargs[key] = value
    if args.user_embedding:
        from safetensors.torch import load_file

        tensors = load_file(args.user_embedding)
        key = args.user_embedding_tensor or (next(iter(tensors)) if len(tensors) == 1 else None)
        if key not in tensors:
            raise ValueError(
                f"{args.user_embedding} holds {sorted(tensors)}; name one with --user_embedding_tensor."
            )
        kwargs[args.user_embedding_kwarg] = tensors[key]
    pipe = load_pipeline(
        args.model,
        lora=args.lora,
        lora_scale=args.lora_scale,
        dtype=_dtype(args.dtype),
        device=args.device,
        variant=args.variant,
    )
    report = generate(
        pipe,
        args.out,
        metadata=metadata,
        indices=parse_indices(args.indices, len(metadata)),
        n_samples=args.n_samples,
        seed=args.seed,
        batch_size=args.batch_size,
        pipeline_kwargs=kwargs,
        model_name=args.model if args.lora is None else f"{args.model} + {args.lora}",
    )
    print(json.dumps(report))
    return 0


def _evaluate(args) -> int:
    from diffalign.evaluation.detectors import load_detector
    from diffalign.evaluation.geneval import load_metadata
    from diffalign.evaluation.geneval.colors import ColorClassifier
    from diffalign.evaluation.geneval.runner import EvalOptions, GenEvalErrors, evaluate

    if args.detector == "mask2former":
        # Detections at or below the lowest threshold can never count: drop them before their masks are copied.
        floor = min(args.threshold, args.counting_threshold)
        detector = load_detector(
            "mask2former", model_name_or_path=args.detector_model, device=args.device, min_score=floor
        )
    elif args.detector == "mmdet":
        detector = load_detector(
            "mmdet", checkpoint=args.mmdet_checkpoint, config=args.mmdet_config, device=args.device
        )
    else:
        detector = load_detector(args.detector)
    class_names = None  # COCO's 80 names in label order (object_names.txt)
    if args.detector == "toyworld":
        from diffalign.toyworld.detector import SHAPES

        class_names = list(SHAPES)
    colors = (
        None
        if args.detector == "toyworld"
        else ColorClassifier.from_pretrained(args.clip_model, args.clip_pretrained, device=args.device)
    )
    reference = (
        None if args.no_metadata_check else (load_metadata(args.metadata) if args.metadata else "official")
    )
    options = EvalOptions(
        threshold=args.threshold,
        counting_threshold=args.counting_threshold,
        max_objects=args.max_objects,
        nms_threshold=args.nms_threshold,
        position_threshold=args.position_threshold,
    )
    try:
        report = evaluate(
            args.image_dir,
            detector,
            colors,
            outfile=args.outfile,
            reference_metadata=reference,
            options=options,
            class_names=class_names,
            overwrite=args.overwrite,
        )
    except GenEvalErrors as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps({k: v for k, v in report.items() if k != "errors"}))
    return 0


def _summary(args) -> int:
    from diffalign.evaluation.geneval.summary import format_table, plot_summaries, summarize_file

    names = args.names or [os.path.basename(os.path.dirname(os.path.abspath(p))) or p for p in args.results]
    if len(names) != len(args.results):
        raise ValueError(f"--names has {len(names)} names for {len(args.results)} results files.")
    if len(set(names)) != len(names):
        names = [f"{n}[{i}]" for i, n in enumerate(names)]
    summaries = {n: summarize_file(p, allow_errors=args.allow_errors) for n, p in zip(names, args.results)}
    print(format_table(summaries))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(
                {n: {**s, "results_file": p} for (n, s), p in zip(summaries.items(), args.results)},
                f,
                indent=1,
            )
    if args.plot:
        plot_summaries(summaries, args.plot)
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="geneval_command", metavar="STAGE", required=True)

    g = sub.add_parser("generate", help="generate images for the GenEval prompts (resumable)")
    g.add_argument("--model", required=True, help="diffusers pipeline: hub id or local folder")
    g.add_argument("--out", required=True, help="output folder (<out>/<00000>/samples/0000.png ...)")
    g.add_argument(
        "--lora", default=None, help="LoRA weights (folder or .safetensors) loaded with load_lora_weights"
    )
    g.add_argument("--lora-scale", type=float, default=None, help="fuse the LoRA at this scale")
    g.add_argument("--metadata", default=None, help="prompt JSONL (default: the 553 official prompts)")
    g.add_argument("--indices", default=None, help="subset of prompt indices, e.g. '0-9,40'")
    g.add_argument("--n-samples", type=int, default=4, help="images per prompt (official: 4)")
    g.add_argument(
        "--seed", type=int, default=42, help="image j of every prompt uses seed + j (official seed: 42)"
    )
    g.add_argument("--batch-size", type=int, default=4)
    g.add_argument("--steps", type=int, default=None, help="num_inference_steps (default: the pipeline's)")
    g.add_argument("--guidance-scale", type=float, default=None)
    g.add_argument("--height", type=int, default=None)
    g.add_argument("--width", type=int, default=None)
    g.add_argument("--negative-prompt", default=None)
    g.add_argument("--pipeline-kwargs", default=None, help="JSON object of extra pipeline call arguments")
    g.add_argument(
        "--user-embedding",
        default=None,
        help="safetensors file with a user embedding (personalized pipelines)",
    )
    g.add_argument("--user-embedding-tensor", default=None, help="tensor name inside --user-embedding")
    g.add_argument(
        "--user-embedding-kwarg", default="user_embedding", help="pipeline keyword that receives it"
    )
    g.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    g.add_argument("--variant", default=None, help="weights variant, e.g. fp16")
    g.add_argument("--device", default=None)
    g.set_defaults(func=_generate)

    e = sub.add_parser(
        "evaluate", help="detect objects and colours, apply the GenEval rules, write results.jsonl"
    )
    e.add_argument("image_dir")
    e.add_argument("--outfile", default=None, help="default: <image_dir>/results.jsonl")
    e.add_argument("--detector", default="mask2former", choices=["mask2former", "mmdet", "toyworld"])
    e.add_argument(
        "--detector-model",
        default="facebook/mask2former-swin-small-coco-instance",
        help="mask2former: hub id or folder",
    )
    e.add_argument("--mmdet-checkpoint", default=None, help="mmdet: the official Mask2Former .pth")
    e.add_argument(
        "--mmdet-config", default=None, help="mmdet: config file (default: mmdet's mask2former swin-s)"
    )
    e.add_argument("--clip-model", default="ViT-L-14")
    e.add_argument("--clip-pretrained", default="openai", help="open_clip tag or local weights file")
    e.add_argument(
        "--metadata", default=None, help="the prompt JSONL the images were generated from (default: official)"
    )
    e.add_argument("--no-metadata-check", action="store_true", help="trust each folder's metadata.jsonl")
    e.add_argument("--threshold", type=float, default=0.3)
    e.add_argument("--counting-threshold", type=float, default=0.9)
    e.add_argument("--max-objects", type=int, default=16)
    e.add_argument(
        "--nms-threshold", type=float, default=1.0, help="1.0 disables suppression (official default)"
    )
    e.add_argument("--position-threshold", type=float, default=0.1)
    e.add_argument("--overwrite", action="store_true", help="start results.jsonl afresh instead of resuming")
    e.add_argument("--device", default=None)
    e.set_defaults(func=_evaluate)

    s = sub.add_parser(
        "summary", help="per-task and overall scores; table, JSON and bar chart comparing runs"
    )
    s.add_argument("results", nargs="+", help="one or more results.jsonl")
    s.add_argument("--names", nargs="+", default=None, help="a name per results file (default: its folder)")
    s.add_argument("--json", default=None, help="write the summaries here")
    s.add_argument("--plot", default=None, help="write a bar chart PNG here")
    s.add_argument(
        "--allow-errors", action="store_true", help="summarize even if evaluate recorded errors (counted)"
    )
    s.set_defaults(func=_summary)


def register(subparsers) -> None:
    parser = subparsers.add_parser("geneval", help="GenEval: generate, evaluate, summary")
    add_arguments(parser)


def main(argv: list[str] | None = None) -> int:
    from diffalign.cli import snake_case_options

    parser = argparse.ArgumentParser(
        prog="geneval", description="GenEval in-process (generate, evaluate, summary)."
    )
    add_arguments(parser)
    args = snake_case_options(parser).parse_args(argv)
    return int(args.func(args) or 0)
