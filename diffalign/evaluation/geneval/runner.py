"""GenEval's generate and evaluate stages.

Layout (the official one): `<out>/<00000>/metadata.jsonl` (the prompt's record) and
`<out>/<00000>/samples/0000.png`, `0001.png`, ... The folder name is the prompt's index in the
metadata file. `generate` also writes `<out>/geneval_generation.json` (what was generated, with
which settings), which `evaluate` uses to check that nothing is missing.

`evaluate` writes `results.jsonl` in the official row format: filename, tag, prompt, correct,
reason, metadata (a JSON string), details (a JSON string: class -> kept boxes
[x0, y0, x1, y1, score]). A prompt folder or image that cannot be evaluated (missing folder,
missing or unreadable metadata, metadata that does not match the reference prompts, an
unreadable PNG) does not stop the run: it is written as one row of `<results>.errors.jsonl`
(folder, filename, error) and left out of `results.jsonl`; at the end `evaluate` raises
`GenEvalErrors` naming the count and the file. `summary` refuses results with errors unless
told `allow_errors=True`, and then reports how many images were skipped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence

import torch
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from diffalign._jsonl import repair_cut_tail, write_json_atomic
from diffalign.evaluation.geneval import load_metadata, load_object_names
from diffalign.evaluation.geneval.rules import (
    COUNTING_THRESHOLD,
    MAX_OBJECTS,
    NMS_THRESHOLD,
    POSITION_THRESHOLD,
    THRESHOLD,
    colour_requests,
    evaluate_clauses,
    filter_detections,
    validate_metadata,
)

logger = logging.getLogger(__name__)

MANIFEST = "geneval_generation.json"
SAMPLE_RE = re.compile(r"^\d+\.png$")


class GenEvalErrors(RuntimeError):
    """Some prompts or images could not be evaluated; the others were, and are in results.jsonl."""

    def __init__(self, errors: list[dict], errors_file: str, results_file: str):
        self.errors, self.errors_file, self.results_file = errors, errors_file, results_file
        head = "\n".join(f"  {e['folder']}/{e.get('filename') or ''}: {e['error']}" for e in errors[:5])
        more = f"\n  ... and {len(errors) - 5} more" if len(errors) > 5 else ""
        super().__init__(
            f"{len(errors)} prompt folder(s)/image(s) could not be evaluated (listed in {errors_file}):\n{head}{more}\n"
            f"The other images were evaluated and written to {results_file}. Fix or regenerate the listed ones "
            "(`diffalign geneval generate` resumes and fills gaps) and run evaluate again: finished rows are kept."
        )


def _metadata_digest(rows: Sequence[Mapping]) -> str:
    return hashlib.sha256("\n".join(json.dumps(r, sort_keys=True) for r in rows).encode()).hexdigest()[:16]


def parse_indices(spec: str | None, n: int) -> list[int]:
    """'0-9,20,30-31' -> [0..9, 20, 30, 31]; None -> all n."""
    if spec is None or spec == "":
        return list(range(n))
    out: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise ValueError(f"Bad index range {part!r} in {spec!r}; use e.g. '0-9,20'.")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo or hi >= n:
            raise ValueError(f"Index range {part!r} is outside 0..{n - 1} (the metadata has {n} prompts).")
        out.extend(range(lo, hi + 1))
    return sorted(set(out))


def _save_png_atomic(image: Image.Image, path: str) -> None:
    tmp = os.path.join(os.path.dirname(path), f".tmp-{os.path.basename(path)}")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------- generate


def load_pipeline(
    model: str,
    *,
    lora: str | None = None,
    lora_scale: float | None = None,
    dtype: torch.dtype = torch.float16,
    device: str | None = None,
    variant: str | None = None,
):
    """A diffusers text-to-image pipeline from a hub id, local folder or `tiny:` spec (`diffalign.families.
    load_pipeline`), optionally with LoRA weights."""
    from diffalign.families import load_pipeline as load_any_pipeline

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = load_any_pipeline(model, torch_dtype=dtype, variant=variant)
    if lora is not None:
        pipe.load_lora_weights(lora)
        if not any(pipe.get_list_adapters().values()):
            raise ValueError(f"LoRA {lora!r} loaded no adapter weights into {model!r}: the file holds no keys for its "
                             "denoiser or text encoders (a diffalign checkpoint-N folder needs pytorch_lora_weights.safetensors)")
        if lora_scale is not None:
            pipe.fuse_lora(lora_scale=lora_scale)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def generate(
    pipeline,
    out_dir: str,
    *,
    metadata: Sequence[Mapping] | None = None,
    indices: Sequence[int] | None = None,
    n_samples: int = 4,
    seed: int = 42,
    batch_size: int = 1,
    pipeline_kwargs: Mapping | None = None,
    model_name: str | None = None,
    progress: bool = True,
) -> dict:
    """Generate `n_samples` images per prompt into the GenEval layout; resumable.

    Image j of every prompt is drawn with its own CPU generator seeded `seed + j` (the official
    script seeds 42 once per prompt and draws its images in sequence; per-image seeds make a
    run independent of `batch_size` and let a resumed run regenerate exactly the missing images).
    Existing PNGs are kept. `pipeline_kwargs` go to every pipeline call (steps, guidance, size,
    negative prompt, a user embedding for personalized pipelines, ...).
    Returns {"generated": n, "skipped": n, "prompts": n}.
    """
    if n_samples < 1 or batch_size < 1:
        raise ValueError(f"n_samples and batch_size must be >= 1, got {n_samples} and {batch_size}.")
    metadata = list(metadata) if metadata is not None else load_metadata()
    for i, row in enumerate(metadata):
        try:
            validate_metadata(row)
        except ValueError as e:
            raise ValueError(f"metadata record {i}: {e}") from e
    indices = list(range(len(metadata))) if indices is None else sorted(set(int(i) for i in indices))
    for i in indices:
        if not 0 <= i < len(metadata):
            raise ValueError(f"Prompt index {i} is outside 0..{len(metadata) - 1}.")
    pipeline_kwargs = dict(pipeline_kwargs or {})
    for key in ("prompt", "generator", "num_images_per_prompt"):
        if key in pipeline_kwargs:
            raise ValueError(f"pipeline_kwargs must not set {key!r}: generate sets it per prompt and image.")

    os.makedirs(out_dir, exist_ok=True)
    manifest_path = os.path.join(out_dir, MANIFEST)
    settings = {"n_samples": n_samples, "seed": seed, "metadata_digest": _metadata_digest(metadata)}
    manifest = {"indices": [], **settings}
    if os.path.exists(manifest_path):
        with open(manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
        clash = {k: (manifest.get(k), v) for k, v in settings.items() if manifest.get(k) != v}
        if clash:
            raise ValueError(
                f"{out_dir} was generated with other settings {clash} (existing, requested); resuming would mix "
                "samples. Use a new output folder or the same settings."
            )
    manifest["indices"] = sorted(set(manifest.get("indices", [])) | set(indices))
    manifest["model"] = model_name or manifest.get("model")
    manifest["pipeline_kwargs"] = {
        k: v for k, v in pipeline_kwargs.items() if isinstance(v, (str, int, float, bool, type(None)))
    }
    write_json_atomic(manifest_path, manifest, indent=1)

    todo: list[tuple[int, list[int]]] = []
    skipped = 0
    for i in indices:
        folder = os.path.join(out_dir, f"{i:05d}")
        os.makedirs(os.path.join(folder, "samples"), exist_ok=True)
        meta_path = os.path.join(folder, "metadata.jsonl")
        if os.path.exists(meta_path):
            with open(meta_path, encoding="utf-8") as f:
                existing = json.loads(f.read())
            if existing != metadata[i]:
                raise ValueError(
                    f"{meta_path} holds {existing.get('prompt')!r} but prompt {i} is {metadata[i]['prompt']!r}; "
                    "this folder belongs to another metadata file. Use a new output folder."
                )
        else:
            write_json_atomic(meta_path, metadata[i])
        missing = [
            j for j in range(n_samples) if not os.path.exists(os.path.join(folder, "samples", f"{j:04d}.png"))
        ]
        skipped += n_samples - len(missing)
        if missing:
            todo.append((i, missing))

    generated = 0
    total = sum(len(m) for _, m in todo)
    with tqdm(total=total, desc="geneval generate", unit="img", disable=not progress or total == 0) as bar:
        for i, missing in todo:
            prompt = metadata[i]["prompt"]
            for start in range(0, len(missing), batch_size):
                chunk = missing[start : start + batch_size]
                generators = [torch.Generator("cpu").manual_seed(seed + j) for j in chunk]
                images = pipeline(
                    prompt=[prompt] * len(chunk),
                    generator=generators,
                    num_images_per_prompt=1,
                    **pipeline_kwargs,
                ).images
                if len(images) != len(chunk):
                    raise RuntimeError(
                        f"The pipeline returned {len(images)} images for {len(chunk)} prompts."
                    )
                for j, image in zip(chunk, images):
                    _save_png_atomic(image, os.path.join(out_dir, f"{i:05d}", "samples", f"{j:04d}.png"))
                generated += len(chunk)
                bar.update(len(chunk))
    return {"generated": generated, "skipped": skipped, "prompts": len(indices)}


# ----------------------------------------------------------------------------------------- evaluate


@dataclasses.dataclass
class EvalOptions:
    """The official `--options` (evaluate_images.py) with their defaults."""

    threshold: float = THRESHOLD
    counting_threshold: float = COUNTING_THRESHOLD
    max_objects: int = MAX_OBJECTS
    nms_threshold: float = NMS_THRESHOLD
    position_threshold: float = POSITION_THRESHOLD


def evaluate_image(
    image: Image.Image,
    metadata: Mapping,
    detector,
    color_classifier,
    class_names: list[str],
    options: EvalOptions,
):
    """Detect, classify the colours the rules will read, apply the rules. Returns (correct, reason, kept)."""
    detections = detector.detect(image, class_names)
    kept = filter_detections(
        detections,
        metadata["tag"],
        threshold=options.threshold,
        counting_threshold=options.counting_threshold,
        max_objects=options.max_objects,
        nms_threshold=options.nms_threshold,
    )
    requests = [
        (name, idx) for name, idx in colour_requests(metadata, kept) if kept[name][idx].get("color") is None
    ]
    if requests:
        if color_classifier is None:
            raise ValueError("This prompt needs colour classification but no colour classifier was given.")
        by_class: dict[str, list[int]] = {}
        for name, idx in requests:
            by_class.setdefault(name, []).append(idx)
        for name, idxs in by_class.items():
            colors = color_classifier.classify(image, [kept[name][k] for k in idxs], name)
            for k, color in zip(idxs, colors):
                kept[name][k] = {**kept[name][k], "color": color}
    correct, reason = evaluate_clauses(metadata, kept, position_threshold=options.position_threshold)
    return correct, reason, kept


def _read_folder_metadata(folder_path: str) -> dict:
    path = os.path.join(folder_path, "metadata.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"missing {path}")
    with open(path, encoding="utf-8") as f:
        text = f.read().strip()
    try:
        # The official generator writes one JSON object (json.dump); accept a trailing newline.
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not one JSON object ({e})") from e
    validate_metadata(meta)
    return meta


def _open_image(path: str) -> Image.Image:
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            im.load()
            return im.convert("RGB")
    except Exception as e:  # PIL raises several types for corrupt files
        raise ValueError(f"unreadable image ({type(e).__name__}: {e})") from e


def evaluate(
    image_dir: str,
    detector,
    color_classifier=None,
    *,
    outfile: str | None = None,
    reference_metadata: Sequence[Mapping] | None | str = "official",
    options: EvalOptions | None = None,
    class_names: list[str] | None = None,
    overwrite: bool = False,
    raise_on_error: bool = True,
    progress: bool = True,
) -> dict:
    """Evaluate every `<image_dir>/<NNNNN>/samples/*.png`; write results.jsonl (and errors, if any).

    `reference_metadata`: the prompt list the folders were generated from ("official" = the
    shipped 553; a list of records; None = trust each folder's metadata.jsonl). A folder whose
    metadata differs from the reference at its index is an error. If `<image_dir>` has the
    manifest written by `generate`, every prompt and sample it names must be present.
    Resumes: rows already in `outfile` are kept and their images skipped, unless `overwrite`.
    Returns {"results_file", "errors_file", "evaluated", "reused", "errors"}.
    """
    if not os.path.isdir(image_dir):
        raise FileNotFoundError(f"GenEval image folder not found: {image_dir}")
    options = options or EvalOptions()
    class_names = class_names or load_object_names()
    if isinstance(reference_metadata, str):
        if reference_metadata != "official":
            raise ValueError(
                f"reference_metadata must be 'official', a list of records or None, got {reference_metadata!r}."
            )
        reference_metadata = load_metadata()
    outfile = outfile or os.path.join(image_dir, "results.jsonl")
    errors_file = outfile + ".errors.jsonl"
    options_file = outfile + ".options.json"
    os.makedirs(os.path.dirname(os.path.abspath(outfile)), exist_ok=True)

    # Resume bookkeeping: the options must match those the existing rows were made with.
    options_dict = dataclasses.asdict(options)
    done: set[tuple[str, str]] = set()
    if os.path.exists(outfile) and not overwrite:
        if os.path.exists(options_file):
            with open(options_file, encoding="utf-8") as f:
                previous = json.load(f)
            if previous != options_dict:
                raise ValueError(
                    f"{outfile} was made with options {previous}, not {options_dict}; pass overwrite=True "
                    "(--overwrite) or another outfile."
                )
        repaired = repair_cut_tail(outfile)  # a kill mid-write: redo that one row, keep the rest
        if repaired:
            logger.warning(repaired)
        with open(outfile, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        # A cut last line was repaired above: a bad line here is corruption.
                        raise ValueError(
                            f"{outfile}:{lineno} is not valid JSON; delete the line or pass --overwrite."
                        ) from None
                    parts = os.path.normpath(row["filename"]).split(os.sep)
                    done.add((parts[-3], parts[-1]))
    else:
        open(outfile, "w").close()
    write_json_atomic(options_file, options_dict)

    # What should be there.
    errors: list[dict] = []
    folders = sorted(
        d for d in os.listdir(image_dir) if d.isdigit() and os.path.isdir(os.path.join(image_dir, d))
    )
    expected_samples: dict[str, list[str]] = {}
    manifest_path = os.path.join(image_dir, MANIFEST)
    if os.path.exists(manifest_path):
        with open(manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
        for i in manifest.get("indices", []):
            name = f"{i:05d}"
            expected_samples[name] = [f"{j:04d}.png" for j in range(manifest["n_samples"])]
            if name not in folders:
                errors.append(
                    {
                        "folder": name,
                        "filename": None,
                        "error": f"missing prompt folder {os.path.join(image_dir, name)}",
                    }
                )
    if not folders and not errors:
        raise FileNotFoundError(
            f"No prompt folders (00000, 00001, ...) in {image_dir}; run `diffalign geneval generate` first."
        )

    jobs: list[tuple[str, str, dict]] = []
    for folder in folders:
        folder_path = os.path.join(image_dir, folder)
        try:
            meta = _read_folder_metadata(folder_path)
            if reference_metadata is not None:
                idx = int(folder)
                if idx >= len(reference_metadata):
                    raise ValueError(
                        f"folder index {idx} is outside the reference metadata (0..{len(reference_metadata) - 1})"
                    )
                if meta != reference_metadata[idx]:
                    raise ValueError(
                        f"metadata mismatch: the folder's metadata.jsonl says {meta.get('prompt')!r} but reference prompt "
                        f"{idx} is {reference_metadata[idx]['prompt']!r} (pass the metadata file the images were generated from)"
                    )
        except (OSError, ValueError) as e:
            errors.append({"folder": folder, "filename": None, "error": str(e)})
            continue
        sample_dir = os.path.join(folder_path, "samples")
        present = (
            sorted(n for n in os.listdir(sample_dir) if SAMPLE_RE.match(n))
            if os.path.isdir(sample_dir)
            else []
        )
        for name in expected_samples.get(folder, []):
            if name not in present:
                errors.append(
                    {
                        "folder": folder,
                        "filename": name,
                        "error": f"missing sample {os.path.join(sample_dir, name)}",
                    }
                )
        if not present and folder not in expected_samples:
            errors.append(
                {"folder": folder, "filename": None, "error": f"no samples (NNNN.png) in {sample_dir}"}
            )
        jobs.extend((folder, name, meta) for name in present if (folder, name) not in done)

    evaluated = 0
    with open(outfile, "a", encoding="utf-8") as out:
        for folder, name, meta in tqdm(
            jobs, desc="geneval evaluate", unit="img", disable=not progress or not jobs
        ):
            path = os.path.join(image_dir, folder, "samples", name)
            try:
                image = _open_image(path)
            except ValueError as e:
                errors.append({"folder": folder, "filename": name, "error": str(e)})
                continue
            correct, reason, kept = evaluate_image(
                image, meta, detector, color_classifier, class_names, options
            )
            row = {
                "filename": path,
                "tag": meta["tag"],
                "prompt": meta["prompt"],
                "correct": bool(correct),
                "reason": reason,
                "metadata": json.dumps(meta),
                "details": json.dumps(
                    {
                        k: [list(map(float, d["box"][:4])) + [float(d["score"])] for d in v]
                        for k, v in kept.items()
                    }
                ),
            }
            out.write(json.dumps(row) + "\n")
            out.flush()
            evaluated += 1

    if errors:
        with open(errors_file, "w", encoding="utf-8") as f:
            for e in errors:
                f.write(json.dumps(e) + "\n")
    elif os.path.exists(errors_file):
        os.remove(errors_file)
    report = {
        "results_file": outfile,
        "errors_file": errors_file if errors else None,
        "evaluated": evaluated,
        "reused": len(done),
        "errors": errors,
    }
    if errors and raise_on_error:
        raise GenEvalErrors(errors, errors_file, outfile)
    return report
