"""Latent + text-embedding cache: encode every image with the VAE and every prompt with the text encoders once,
so training runs only the denoiser.

Layout of a cache folder (see docs/data.md):

    cache.json                              config + fingerprints (format, adapter, resolution, dataset, shards)
    uncond.safetensors                      encode_prompts([""]) for prompt dropout (first dim 1)
    shard-00000-of-00012.safetensors        rows [0, shard_size) of the dataset, ...

A shard holds `latents` (n, k, C, h, w), `scores` (n, k), `original_sizes` / `crop_top_lefts` (n, k, 2),
`positions` (n,) (index in the dataset) and `rows` (n,) (row in the source), `text_index` (n,) and
`text.<key>` (u, ...) for the u distinct prompts of the shard (Pick-a-Pic repeats prompts a lot); prompts,
prompt ids, user ids and the rows skipped as bad sit in the safetensors metadata as JSON.

Shard s is written by process s % world_size (accelerate launch: one process per GPU), so the shards do not
depend on the number of processes and a cache can be resumed with any number of them. A shard is written to a
temporary file and renamed, so a shard file that exists is complete: a rerun skips it.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from diffalign.data.collate import collate_groups
from diffalign.data.errors import CacheMismatchError, DataError

logger = logging.getLogger("diffalign.data")

CACHE_FORMAT = "diffalign-cache/1"
INDEX_NAME = "cache.json"
UNCOND_NAME = "uncond.safetensors"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ---- sharding ---------------------------------------------------------------------------------------------------
def num_shards_for(num_rows: int, shard_size: int) -> int:
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}.")
    return max(1, -(-num_rows // shard_size))


def shard_name(shard: int, num_shards: int) -> str:
    return f"shard-{shard:05d}-of-{num_shards:05d}.safetensors"


def shards_for_rank(num_shards: int, rank: int, world_size: int) -> list[int]:
    """The shards process `rank` of `world_size` writes: s % world_size == rank."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}.")
    return list(range(rank, num_shards, world_size))


def shard_rows(shard: int, num_rows: int, shard_size: int) -> range:
    return range(shard * shard_size, min((shard + 1) * shard_size, num_rows))


def rows_for_rank(num_rows: int, shard_size: int, rank: int, world_size: int) -> list[int]:
    """Every dataset position process `rank` encodes; over all ranks these cover each position exactly once."""
    n = num_shards_for(num_rows, shard_size)
    return [i for s in shards_for_rank(n, rank, world_size) for i in shard_rows(s, num_rows, shard_size)]


# ---- fingerprints ---------------------------------------------------------------------------------------------
def _param_checksum(module) -> list[float]:
    """A cheap content check: sum and sum of squares of the first parameter tensor (different weights differ)."""
    for param in module.parameters():
        values = param.detach().to(torch.float64)
        return [round(float(values.sum()), 6), round(float(values.square().sum()), 6)]
    return []


def adapter_fingerprint(adapter: Any) -> str:
    """What identifies the encoders: `adapter.fingerprint` if it has one, else the family name plus the VAE and
    text-encoder configs and a checksum of their first weights."""
    fingerprint = getattr(adapter, "fingerprint", None)
    if callable(fingerprint):
        fingerprint = fingerprint()
    if fingerprint is not None:
        return fingerprint if isinstance(fingerprint, str) else json.dumps(fingerprint, sort_keys=True, default=str)
    parts: dict[str, Any] = {"family": getattr(adapter, "name", None) or type(adapter).__name__}
    for attr in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(adapter, attr, None)
        if module is None:
            continue
        config = getattr(module, "config", None)
        config = dict(config) if hasattr(config, "keys") else (config.to_dict() if hasattr(config, "to_dict") else {})
        # Private keys (_name_or_path, _use_default_values, ...) say where and how it was loaded, not what it
        # computes; _use_default_values is even built from a set, so its order changes between processes.
        config = {key: value for key, value in config.items() if not key.startswith("_")}
        blob = json.dumps(config, sort_keys=True, default=str).encode()
        parts[attr] = {"config": hashlib.sha1(blob).hexdigest()[:16], "weights": _param_checksum(module)}
    if len(parts) == 1:
        raise TypeError(
            f"cannot fingerprint {type(adapter).__name__}: give it a `fingerprint` attribute (a string naming the model) "
            "or `vae` / `text_encoder` modules."
        )
    return json.dumps(parts, sort_keys=True)


def _compare(cached: dict, wanted: dict, out_dir: Path) -> None:
    for key in wanted:
        if cached.get(key) != wanted[key]:
            if isinstance(wanted[key], dict) and isinstance(cached.get(key), dict):
                diffs = [f"{key}.{sub}: cached {cached[key].get(sub)!r}, now {wanted[key].get(sub)!r}"
                         for sub in sorted(set(cached[key]) | set(wanted[key])) if cached[key].get(sub) != wanted[key].get(sub)]
            else:
                diffs = [f"{key}: cached {cached.get(key)!r}, now {wanted[key]!r}"]
            raise CacheMismatchError(
                f"{out_dir} holds a cache built with a different {key} ({'; '.join(diffs)}). "
                f"Fix: write this cache to a new folder, or delete {out_dir} to rebuild it."
            )


def _atomic_save(tensors: dict, path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def _atomic_write_json(data: dict, path: Path) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


def shard_problem(path: Path) -> str | None:
    """Why a shard file is not whole (missing, cut, unreadable header), or None when it is.

    A safetensors file is 8 bytes of header length, the JSON header, then the tensors, whose byte ranges the
    header lists: a whole file is exactly as long as the largest end offset says."""
    if not path.exists():
        return "missing"
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or 8 + n > size:
                return f"cut: {size} bytes, shorter than its header"
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        return f"unreadable header ({type(e).__name__}: {e})"
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if size != 8 + n + end:
        return f"cut: {size} bytes of {8 + n + end}"
    return None


def _check_text(text: dict, n: int) -> dict:
    if not isinstance(text, dict) or not text:
        raise TypeError(f"adapter.encode_prompts must return a non-empty dict of tensors, got {type(text).__name__}.")
    for key, value in text.items():
        if not torch.is_tensor(value) or value.shape[0] != n:
            shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
            raise ValueError(f"adapter.encode_prompts()[{key!r}] must be a tensor with first dim {n}, got {shape}.")
    return text


# ---- building ---------------------------------------------------------------------------------------------------
def build_cache(
    dataset,
    adapter,
    out_dir: str | os.PathLike,
    batch_size: int = 8,
    *,
    shard_size: int = 256,
    dtype: str | None = None,
    device: str | torch.device | None = None,
    seed: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    progress: bool = True,
) -> dict:
    """Encode `dataset` (PairwiseDataset / RankedDataset) with `adapter` into sharded safetensors under `out_dir`.

    Resumable: shards already on disk are skipped. Sharded across processes: with rank/world_size unset they come
    from accelerate's PartialState (1 process when not launched), and process r writes shards s % world_size == r.
    `dtype` ("float32", "float16", "bfloat16"; default: as encoded) is the storage dtype of latents and text.
    The VAE posterior is sampled with a generator seeded by (seed, shard), so a rebuild gives the same latents.
    Returns a summary dict (shards written / resumed, rows encoded, rows skipped as bad).
    """
    from tqdm.auto import tqdm

    distributed = rank is None or world_size is None
    state = None
    if distributed:
        from accelerate import PartialState

        state = PartialState(cpu=not torch.cuda.is_available())
        rank, world_size = state.process_index, state.num_processes
    if not all(hasattr(dataset, attr) for attr in ("load_group", "fingerprint", "transform", "rows")):
        raise TypeError(
            f"build_cache needs a PairwiseDataset or RankedDataset (diffalign.data), got {type(dataset).__name__}. "
            "Fix: build it with diffalign.data.load_preference_dataset (a torch Subset of one is not enough)."
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)} or None, got {dtype!r}.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    num_rows = len(dataset)
    num_shards = num_shards_for(num_rows, shard_size)
    config = {
        "format": CACHE_FORMAT,
        "adapter": adapter_fingerprint(adapter),
        "resolution": dataset.transform.resolution,
        "dataset": dataset.fingerprint(),
        "num_rows": num_rows,
        "shard_size": int(shard_size),
        "num_shards": num_shards,
        "dtype": dtype or "as-encoded",
        "seed": int(seed),
    }
    index_path = out / INDEX_NAME
    if index_path.exists():
        _compare(json.loads(index_path.read_text()), config, out)
    else:
        if dataset.transform.crop == "random" or dataset.transform.random_flip:
            logger.warning("random crops/flips are drawn once (epoch 0) and frozen into the cache")
        _atomic_write_json({**config, "eager_skipped_rows": dataset.skipped_rows}, index_path)

    device = device if device is not None else getattr(adapter, "device", None)
    takes_generator = "generator" in inspect.signature(adapter.encode_images).parameters
    if rank == 0 and not (out / UNCOND_NAME).exists():
        with torch.no_grad():
            uncond = _check_text(adapter.encode_prompts([""]), 1)
        _atomic_save({k: _store(v, dtype) for k, v in uncond.items()}, out / UNCOND_NAME, {"format": CACHE_FORMAT})

    mine = shards_for_rank(num_shards, rank, world_size)
    for stale in out.glob("shard-*.safetensors.tmp-*"):  # left by a killed run; only our own shards' files
        if int(stale.name.split("-")[1]) in mine:
            stale.unlink(missing_ok=True)
    todo = []
    for s in mine:
        problem = shard_problem(out / shard_name(s, num_shards))
        if problem is not None:
            if problem != "missing":
                logger.warning("cache shard %s is %s; rebuilding it", shard_name(s, num_shards), problem)
            todo.append(s)
    resumed = [s for s in mine if s not in todo]
    total = sum(len(shard_rows(s, num_rows, shard_size)) for s in mine)
    done = total - sum(len(shard_rows(s, num_rows, shard_size)) for s in todo)
    bar = tqdm(total=total, initial=done, desc=f"cache [{rank + 1}/{world_size}]", unit="group",
               disable=not progress, position=rank if world_size > 1 else None)
    skipped_now = 0
    for shard in todo:
        generator = None
        if takes_generator:
            generator = torch.Generator().manual_seed(  # on CPU: the same draws on any accelerator
                int(seed) * 1_000_003 + shard)
        tensors, metadata = _encode_shard(
            dataset, adapter, shard_rows(shard, num_rows, shard_size), batch_size, dtype, device, generator, bar
        )
        skipped_now += len(json.loads(metadata["skipped"]))
        _atomic_save(tensors, out / shard_name(shard, num_shards), metadata)
    bar.close()
    if state is not None and world_size > 1:
        state.wait_for_everyone()
    missing = [s for s in range(num_shards) if shard_problem(out / shard_name(s, num_shards)) is not None]
    summary = {
        "out_dir": str(out),
        "num_shards": num_shards,
        "written": todo,
        "resumed": resumed,
        "rows_encoded": sum(len(shard_rows(s, num_rows, shard_size)) for s in todo) - skipped_now,
        "skipped_rows": skipped_now,
        "complete": not missing,
        "missing_shards": len(missing),
    }
    logger.info("cache %s: wrote %d shards, resumed %d, %d bad rows skipped", out, len(todo), len(resumed), skipped_now)
    return summary


def _store(tensor: torch.Tensor, dtype: str | None) -> torch.Tensor:
    tensor = tensor.detach().cpu()
    return tensor.to(DTYPES[dtype]) if dtype is not None and tensor.is_floating_point() else tensor


@torch.no_grad()
def _encode_shard(dataset, adapter, positions: range, batch_size, dtype, device, generator, bar):
    groups, kept, skipped = [], [], {}
    latents: list[torch.Tensor] = []

    def flush():
        if not groups[len(latents):]:
            return
        batch = collate_groups(groups[len(latents):])
        b, k = batch["pixel_values"].shape[:2]
        pixels = batch["pixel_values"].flatten(0, 1)
        if device is not None:
            pixels = pixels.to(device)
        encoded = adapter.encode_images(pixels, generator=generator) if generator is not None else adapter.encode_images(pixels)
        if not torch.is_tensor(encoded) or encoded.ndim != 4 or encoded.shape[0] != b * k:
            shape = tuple(encoded.shape) if torch.is_tensor(encoded) else type(encoded).__name__
            raise ValueError(f"adapter.encode_images must return latents (N={b * k}, C, h, w), got {shape}.")
        latents.extend(_store(encoded, dtype).view(b, k, *encoded.shape[1:]).unbind(0))

    for position in positions:
        try:
            groups.append(dataset.load_group(position))
            kept.append(int(position))
        except DataError as error:
            if not dataset.skip_bad_rows:
                raise
            row = int(dataset.rows[position])
            dataset.mark_bad(row, error)
            skipped[str(row)] = str(error)
        if len(groups) - len(latents) >= batch_size:
            flush()
        bar.update(1)
    flush()

    prompts = [g["prompt"] for g in groups]
    unique = list(dict.fromkeys(prompts))
    text_parts: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(unique), batch_size):
        chunk = unique[start : start + batch_size]
        for key, value in _check_text(adapter.encode_prompts(chunk), len(chunk)).items():
            text_parts.setdefault(key, []).append(_store(value, dtype))
    where = {prompt: i for i, prompt in enumerate(unique)}
    tensors = {
        "positions": torch.tensor(kept, dtype=torch.int64),
        "rows": torch.tensor([g["row"] for g in groups], dtype=torch.int64),
        "text_index": torch.tensor([where[p] for p in prompts], dtype=torch.int64),
    }
    if groups:
        tensors["latents"] = torch.stack(latents)
        tensors["scores"] = torch.stack([g["scores"] for g in groups]).to(torch.float32)
        tensors["original_sizes"] = torch.stack([g["original_sizes"] for g in groups])
        tensors["crop_top_lefts"] = torch.stack([g["crop_top_lefts"] for g in groups])
        tensors.update({f"text.{key}": torch.cat(parts) for key, parts in text_parts.items()})
    metadata = {
        "format": CACHE_FORMAT,
        "prompts": json.dumps(prompts),
        "prompt_ids": json.dumps([g["prompt_id"] for g in groups]),
        "user_ids": json.dumps([g["user_id"] for g in groups]),
        "skipped": json.dumps(skipped),
    }
    return tensors, metadata


# ---- reading ----------------------------------------------------------------------------------------------------
class CachedDataset(torch.utils.data.Dataset):
    """Groups from a finished cache: `latents` (k, C, h, w) and `text` (dict) instead of pixels.

    `collate_groups` turns its items into the same batch as the pixel datasets, with `latents` and `text`.
    Pass `adapter` and/or `resolution` to have a cache built with another model or resolution rejected.
    `empty_text` holds encode_prompts([""]) (first dim 1) for prompt dropout.
    """

    def __init__(self, cache_dir: str | os.PathLike, *, adapter=None, resolution: int | None = None):
        from safetensors import safe_open

        self.cache_dir = Path(cache_dir)
        index_path = self.cache_dir / INDEX_NAME
        if not index_path.exists():
            raise FileNotFoundError(
                f"{self.cache_dir} is not a diffalign cache (no {INDEX_NAME}). Fix: build it with `diffalign cache`."
            )
        self.config = json.loads(index_path.read_text())
        if self.config.get("format") != CACHE_FORMAT:
            raise CacheMismatchError(
                f"{index_path} has format {self.config.get('format')!r}; this version reads {CACHE_FORMAT!r}. "
                "Fix: rebuild the cache with this version of `diffalign cache`."
            )
        wanted = {}
        if adapter is not None:
            wanted["adapter"] = adapter_fingerprint(adapter)
        if resolution is not None:
            wanted["resolution"] = int(resolution)
        _compare(self.config, wanted, self.cache_dir)
        n = self.config["num_shards"]
        paths = [self.cache_dir / shard_name(s, n) for s in range(n)]
        missing = [p.name for p in paths if not p.exists()]
        if missing:
            raise FileNotFoundError(
                f"cache {self.cache_dir} is incomplete: {len(missing)} of {n} shards missing (first: {missing[0]}). "
                "Fix: rerun the same `diffalign cache` command; it resumes and writes only the missing shards."
            )
        for p in paths:
            problem = shard_problem(p)
            if problem is not None:
                raise CacheMismatchError(
                    f"cache shard {p} is {problem}. Fix: rerun the same `diffalign cache` command; it rebuilds that shard."
                )
        self._paths = paths
        self._locations: list[tuple[int, int]] = []
        self.prompts: list[str] = []
        self.prompt_ids: list[str] = []
        self.user_ids: list[str | None] = []
        self.bad_rows: dict[int, str] = {}
        for s, path in enumerate(paths):
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata()
                count = handle.get_slice("rows").get_shape()[0]
            self._locations.extend((s, j) for j in range(count))
            self.prompts += json.loads(meta["prompts"])
            self.prompt_ids += json.loads(meta["prompt_ids"])
            self.user_ids += json.loads(meta["user_ids"])
            self.bad_rows.update({int(r): why for r, why in json.loads(meta["skipped"]).items()})
        self.eager_skipped_rows = int(self.config.get("eager_skipped_rows", 0))
        self.k = int(self.config["dataset"]["k"])
        self._handles: dict[int, Any] = {}
        self._empty_text = None

    @property
    def skipped_rows(self) -> int:
        """Bad source rows left out: found at load (eager column checks) plus found while encoding."""
        return self.eager_skipped_rows + len(self.bad_rows)

    @property
    def resolution(self) -> int:
        return int(self.config["resolution"])

    def __len__(self) -> int:
        return len(self._locations)

    def _handle(self, shard: int):
        from safetensors import safe_open

        if shard not in self._handles:  # opened lazily per process (handles cannot cross to DataLoader workers)
            self._handles[shard] = safe_open(str(self._paths[shard]), framework="pt")
        return self._handles[shard]

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def __getitem__(self, index: int) -> dict:
        shard, j = self._locations[index]
        handle = self._handle(shard)
        t = int(handle.get_slice("text_index")[j : j + 1][0])
        text_keys = [key for key in handle.keys() if key.startswith("text.")]
        latents = handle.get_slice("latents")[j : j + 1][0]
        if not torch.isfinite(latents).all():
            row = int(handle.get_slice("rows")[j : j + 1][0])
            raise DataError(f"the cached latents hold NaN or inf ({self._paths[shard].name}).", row=row, column="latents",
                            fix="check that row's images, then rebuild the cache (delete that shard and rerun `diffalign cache`).")
        return {
            "latents": latents,
            "scores": handle.get_slice("scores")[j : j + 1][0],
            "original_sizes": handle.get_slice("original_sizes")[j : j + 1][0],
            "crop_top_lefts": handle.get_slice("crop_top_lefts")[j : j + 1][0],
            "text": {key[len("text."):]: handle.get_slice(key)[t : t + 1][0] for key in text_keys},
            "prompt": self.prompts[index],
            "prompt_id": self.prompt_ids[index],
            "user_id": self.user_ids[index],
            "row": int(handle.get_slice("rows")[j : j + 1][0]),
        }

    @property
    def empty_text(self) -> dict[str, torch.Tensor]:
        if self._empty_text is None:
            from safetensors.torch import load_file

            path = self.cache_dir / UNCOND_NAME
            if not path.exists():
                raise FileNotFoundError(f"{path} is missing. Fix: rerun `diffalign cache` (process 0 writes it).")
            self._empty_text = load_file(str(path))
        return self._empty_text


# ---- command line -------------------------------------------------------------------------------------------------
def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "cache",
        help="precompute VAE latents and text embeddings (sharded, resumable)",
        description=(
            "Encode a preference dataset once with a model's VAE and text encoders into sharded safetensors. "
            "Rerun the same command to resume. Multi-GPU: accelerate launch -m diffalign.cli cache ..."
        ),
    )
    parser.add_argument("--data", required=True, help="parquet file/folder, save_to_disk folder, or hub id")
    parser.add_argument("--out", required=True, help="cache folder (created; reused to resume)")
    parser.add_argument("--model", required=True, help="hub id / local diffusers folder, or tiny:sdxl, tiny:sd3 (offline)")
    parser.add_argument("--family", default=None, help="sdxl, sd3, sd15 (default: from the pipeline class)")
    parser.add_argument("--schema", default="auto", choices=["auto", "pairwise", "ranked"])
    parser.add_argument("--split", default="train")
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--crop", default="center", choices=["center", "random"])
    parser.add_argument("--random_flip", action="store_true")
    parser.add_argument("--keep_ties", action="store_true", help="pairwise: keep label_0 == 0.5 as scores [0.5, 0.5]")
    parser.add_argument("--max_k", type=int, default=None, help="ranked: sub-sample groups to at most this many images")
    parser.add_argument("--skip_bad_rows", action="store_true", help="skip and count bad rows instead of failing")
    parser.add_argument("--batch_size", type=int, default=8, help="groups per encoder call")
    parser.add_argument("--shard_size", type=int, default=256, help="groups per shard file")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="storage dtype (default: as encoded)")
    parser.add_argument("--device", default=None, help="e.g. cuda (default: cuda:<local rank> if available, else cpu)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hf_cache_dir", default=None, help="where datasets converts parquet to Arrow")
    parser.set_defaults(func=_run_cli)


def _run_cli(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    from diffalign.data import load_preference_dataset
    from diffalign.families import load_family

    state = PartialState(cpu=not torch.cuda.is_available())
    dataset = load_preference_dataset(
        args.data, args.schema, split=args.split, cache_dir=args.hf_cache_dir, resolution=args.resolution,
        crop=args.crop, random_flip=args.random_flip, seed=args.seed, skip_bad_rows=args.skip_bad_rows,
        keep_ties=args.keep_ties, max_k=args.max_k,
    )
    skipped_at_load = dataset.skipped_rows  # the dataset also counts the rows encoding skips: take it before
    adapter = load_family(args.model, family=args.family, seed=args.seed)
    device = torch.device(args.device) if args.device else state.device
    for name in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(adapter, name, None)
        if module is not None:
            module.to(device)
    summary = build_cache(
        dataset, adapter, args.out, args.batch_size, shard_size=args.shard_size, dtype=args.dtype, device=device,
        seed=args.seed, rank=state.process_index, world_size=state.num_processes,
    )
    state.wait_for_everyone()
    if state.is_main_process:
        print(json.dumps({"out": args.out, "rows": len(dataset), "shards": summary["num_shards"], "missing_shards": summary["missing_shards"],
                          "skipped_rows_at_load": skipped_at_load, "skipped_rows_while_encoding": summary["skipped_rows"]}))
    return 0
