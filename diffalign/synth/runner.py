"""The synthetic ranked-preference generator: k images per prompt from several models, n rewards, win counts.

On-disk progress (all under `output_dir`), designed so a killed run restarted with the same arguments
ends with exactly one record per (prompt, generator, seed):

    synth_config.json                  what the run is; a restart with different arguments is refused
    train-CCCCC-of-NNNNN.parquet       finished chunk C (written to a temporary name, then renamed)
    .progress/chunk-CCCCC/             unfinished chunk C:
        img-G-IIIIIIII-J.png           image J of prompt index I by generator G (temp name, then rename)
        scores-R.npy                   reward R's scores for the whole chunk (temp name, then rename)

A chunk is a fixed slice of `chunk_size` prompts; chunk c belongs to process c % num_processes. Work is
done a pass (`chunks_per_pass` chunks) at a time: every missing image of the pass with generator 1,
free it, generator 2, ..., then every missing score with reward 1, free it, reward 2, ..., then the
shards are written and the chunk folders removed. Only one pipeline or reward model is in memory at once.
A restart skips finished shards, images already on disk, and score files already on disk.
"""

from __future__ import annotations

import dataclasses
import gc
import glob
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from diffalign.synth.aggregate import ranks_from_phi, win_count_scores
from diffalign.synth.prompts import Prompt, check_prompts, load_prompts
from diffalign.synth.schema import encode_png, export_pairwise, rows_to_table, shard_name, write_atomic
from diffalign.synth.specs import GeneratorSpec, RewardSpec, check_unique_ids, generate_images, load_pipeline

logger = logging.getLogger("diffalign.synth")

CONFIG_FILE = "synth_config.json"
PROGRESS_DIR = ".progress"


@dataclass
class SynthConfig:
    prompts: str  # .txt, .jsonl or hf:<dataset>
    generators: list[GeneratorSpec]
    rewards: list[RewardSpec]
    output_dir: str
    prompt_field: str = "prompt"
    prompt_id_field: str | None = None
    prompt_split: str = "train"
    limit: int | None = None
    skip_bad_prompts: bool = False
    chunk_size: int = 64  # prompts per shard
    chunks_per_pass: int = 16  # chunks generated per pipeline load
    reward_batch_size: int = 16
    pairwise_dir: str | None = None
    pairwise_mode: str = "best_worst"
    progress: bool = True

    def __post_init__(self):
        self.generators = [GeneratorSpec.parse(g) if isinstance(g, str) else g for g in self.generators]
        self.rewards = [RewardSpec.parse(r) if isinstance(r, str) else r for r in self.rewards]
        if not self.generators:
            raise ValueError("no generators given; pass at least one --generator")
        if not self.rewards:
            raise ValueError("no rewards given; pass at least one --reward")
        check_unique_ids(self.generators, "generator")
        check_unique_ids(self.rewards, "reward")
        if sum(g.images_per_prompt for g in self.generators) < 2:
            raise ValueError("k = total images per prompt must be >= 2 to rank; add a generator or raise n=")
        if self.chunk_size < 1 or self.chunks_per_pass < 1:
            raise ValueError("chunk_size and chunks_per_pass must be >= 1")
        if self.reward_batch_size < 1:
            raise ValueError(f"reward_batch_size must be >= 1, got {self.reward_batch_size}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 (or left out for every prompt), got {self.limit}")
        if self.pairwise_dir is not None:
            out, pairs = os.path.abspath(self.output_dir), os.path.abspath(self.pairwise_dir)
            if os.path.commonpath([out, pairs]) == out:
                # Readers take every *.parquet under output_dir as Syn-Pic rows.
                raise ValueError(f"pairwise_dir {self.pairwise_dir!r} is inside output_dir {self.output_dir!r}; "
                                 "put the pairs in a folder of their own")

    @property
    def k(self) -> int:
        return sum(g.images_per_prompt for g in self.generators)

    def fingerprint(self, prompts: list[Prompt]) -> dict:
        """Everything that decides the records; batch sizes, devices and pass sizes do not."""
        digest = hashlib.sha256(json.dumps([[p.prompt_id, p.text] for p in prompts]).encode()).hexdigest()
        return {
            "prompts_sha256": digest,
            "num_prompts": len(prompts),
            "generators": [{k: v for k, v in g.to_dict().items() if k != "batch_size"} for g in self.generators],
            "rewards": [r.to_dict() for r in self.rewards],
            "chunk_size": self.chunk_size,
        }


@dataclass
class SynthStats:
    num_prompts: int = 0
    skipped_bad_prompts: int = 0
    shards_written: int = 0
    images_generated: int = 0
    images_scored: int = 0
    generate_seconds: float = 0.0
    score_seconds: float = 0.0
    pairs_written: int = 0
    per_generator: dict = field(default_factory=dict)
    per_reward: dict = field(default_factory=dict)


def _free(obj) -> None:
    import torch

    del obj
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _save_bytes_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _save_npy_atomic(path: str, array: np.ndarray) -> None:
    tmp = f"{path}.tmp-{os.getpid()}.npy"
    np.save(tmp, array)
    os.replace(tmp, path)


class _Chunk:
    def __init__(self, cfg: SynthConfig, index: int, prompts: list[Prompt], num_chunks: int):
        self.index = index
        self.prompts = prompts
        self.shard_path = os.path.join(cfg.output_dir, shard_name(index, num_chunks))
        self.stash = os.path.join(cfg.output_dir, PROGRESS_DIR, f"chunk-{index:05d}")
        # (generator index, image j, seed) in image order: generator 1's images first.
        self.slots = [(g, j) for g, spec in enumerate(cfg.generators) for j in range(spec.images_per_prompt)]

    def image_path(self, g: int, prompt: Prompt, j: int) -> str:
        return os.path.join(self.stash, f"img-{g}-{prompt.index:08d}-{j}.png")

    def scores_path(self, r: int) -> str:
        return os.path.join(self.stash, f"scores-{r}.npy")


def _with_spec_defaults(old: dict, new: dict) -> dict:
    """A run written before a generator-spec key existed stored no value for it: read it as the key's default,
    so that adding an option does not stop old runs from resuming."""
    defaults = {f.name: f.default for f in dataclasses.fields(GeneratorSpec) if f.default is not dataclasses.MISSING}
    gens, fresh = old.get("generators"), new.get("generators")
    if not (isinstance(gens, list) and isinstance(fresh, list) and len(gens) == len(fresh)):
        return old
    filled = []
    for g, f in zip(gens, fresh):
        if isinstance(g, dict) and isinstance(f, dict):
            g = {**{k: defaults[k] for k in f if k not in g and k in defaults}, **g}
        filled.append(g)
    return {**old, "generators": filled}


def _nothing_written(output_dir: str) -> bool:
    """No shard and no stashed image or score yet: an earlier attempt failed before producing anything."""
    for _root, _dirs, files in os.walk(output_dir):
        if any(f != CONFIG_FILE for f in files):
            return False
    return True


def _check_or_write_config(cfg: SynthConfig, prompts: list[Prompt], state) -> None:
    path = os.path.join(cfg.output_dir, CONFIG_FILE)
    fp = cfg.fingerprint(prompts)
    if state.is_main_process:
        os.makedirs(cfg.output_dir, exist_ok=True)
        legacy = sorted(glob.glob(os.path.join(cfg.output_dir, "data-*-of-*.parquet")))
        if legacy:
            # Resuming beside them would write every chunk again under the new names: duplicate records.
            raise ValueError(f"{cfg.output_dir} holds {len(legacy)} shard(s) named data-*.parquet from an older "
                             "diffalign; rename them to train-*.parquet (same numbers) to resume this run")
        if os.path.exists(path):
            with open(path) as f:
                old = json.load(f)
            # JSON round trip so tuples/ints compare as stored.
            new = json.loads(json.dumps(fp))
            old = _with_spec_defaults(old, new)
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            if diff and _nothing_written(cfg.output_dir):
                _save_bytes_atomic(path, json.dumps(fp, indent=2).encode())  # a run that failed before its first image
            elif diff:
                raise ValueError(f"{cfg.output_dir} holds a run with different {diff}; resume with the same "
                                 "arguments, or write to a new --output_dir")
        else:
            _save_bytes_atomic(path, json.dumps(fp, indent=2).encode())
    state.wait_for_everyone()


def run_synth(cfg: SynthConfig, on_image: Callable[[int], None] | None = None, state=None) -> SynthStats:
    """Generate, score and write the Syn-Pic shards this process owns; resumable. `on_image(n)` is called
    after each image is on disk with this process's running count (tests use it to interrupt a run)."""
    import torch
    from accelerate import PartialState
    from tqdm.auto import tqdm

    from diffalign import rewards as reward_registry

    if state is None:
        # Under `accelerate launch` each process takes its share; on a CPU-only host cpu=True is needed
        # for the processes to see each other (gloo).
        state = PartialState(cpu=not torch.cuda.is_available())
    stats = SynthStats()
    all_prompts = load_prompts(cfg.prompts, cfg.prompt_field, cfg.prompt_id_field, cfg.prompt_split, cfg.limit)
    prompts, bad = check_prompts(all_prompts, cfg.skip_bad_prompts)
    if bad:
        logger.warning("skipped %d bad prompt(s) (empty or over 77 tokens): ids %s%s", len(bad),
                       [p.prompt_id for p, _ in bad[:20]], " ..." if len(bad) > 20 else "")
    if not prompts:
        raise ValueError("every prompt was bad; nothing to generate")
    stats.num_prompts, stats.skipped_bad_prompts = len(prompts), len(bad)
    _check_or_write_config(cfg, prompts, state)

    num_chunks = (len(prompts) + cfg.chunk_size - 1) // cfg.chunk_size
    chunks = [_Chunk(cfg, c, prompts[c * cfg.chunk_size : (c + 1) * cfg.chunk_size], num_chunks)
              for c in range(num_chunks)]
    mine = [ch for ch in chunks if ch.index % state.num_processes == state.process_index]
    for ch in mine:
        if os.path.exists(ch.shard_path) and os.path.isdir(ch.stash):
            shutil.rmtree(ch.stash)  # killed between the shard rename and the clean-up
    todo = [ch for ch in mine if not os.path.exists(ch.shard_path)]
    logger.info("process %d/%d: %d of %d chunks to do (%d prompts, k=%d, %d rewards)", state.process_index,
                state.num_processes, len(todo), len(mine), len(prompts), cfg.k, len(cfg.rewards))
    show = cfg.progress and state.is_local_main_process
    count = 0

    for start in range(0, len(todo), cfg.chunks_per_pass):
        pass_chunks = todo[start : start + cfg.chunks_per_pass]
        for ch in pass_chunks:
            os.makedirs(ch.stash, exist_ok=True)

        # 1. Images: one generator at a time.
        for g, spec in enumerate(cfg.generators):
            jobs = [(ch, p, j, seed) for ch in pass_chunks for p in ch.prompts
                    for j, seed in enumerate(spec.seeds(p.index)) if not os.path.exists(ch.image_path(g, p, j))]
            if not jobs:
                continue
            pipe = load_pipeline(spec, state.device)
            t0 = time.perf_counter()
            bar = tqdm(total=len(jobs), desc=f"generate {spec.id}", unit="img", disable=not show)
            for b in range(0, len(jobs), spec.batch_size):
                batch = jobs[b : b + spec.batch_size]
                images = generate_images(pipe, spec, [p.text for _, p, _, _ in batch], [s for *_, s in batch])
                for (ch, p, j, _), image in zip(batch, images):
                    _save_bytes_atomic(ch.image_path(g, p, j), encode_png(image))
                    count += 1
                    if on_image is not None:
                        on_image(count)
                bar.update(len(batch))
            bar.close()
            dt = time.perf_counter() - t0
            stats.images_generated += len(jobs)
            stats.generate_seconds += dt
            per = stats.per_generator.setdefault(spec.id, {"images": 0, "seconds": 0.0})
            per["images"] += len(jobs)
            per["seconds"] += dt
            logger.info("generator %s: %d images in %.1fs (%.2f images/s)", spec.id, len(jobs), dt, len(jobs) / dt)
            _free(pipe)

        # 2. Scores: one reward model at a time, for every chunk of the pass.
        from PIL import Image

        for r, rspec in enumerate(cfg.rewards):
            pending = [ch for ch in pass_chunks if not os.path.exists(ch.scores_path(r))]
            if not pending:
                continue
            kwargs = {"device": state.device, "batch_size": cfg.reward_batch_size, **rspec.kwargs}
            reward = reward_registry.load(rspec.name, **kwargs)
            t0 = time.perf_counter()
            n_pairs = sum(len(ch.prompts) * cfg.k for ch in pending)
            bar = tqdm(total=n_pairs, desc=f"score {rspec.id}", unit="img", disable=not show)
            for ch in pending:
                scores = np.zeros((len(ch.prompts), cfg.k), dtype=np.float32)
                cells = [(pi, si) for pi in range(len(ch.prompts)) for si in range(cfg.k)]
                for b in range(0, len(cells), cfg.reward_batch_size):
                    batch = cells[b : b + cfg.reward_batch_size]
                    images = []
                    for pi, si in batch:
                        g, j = ch.slots[si]
                        with Image.open(ch.image_path(g, ch.prompts[pi], j)) as im:
                            images.append(im.convert("RGB"))
                    s = reward.score(images, [ch.prompts[pi].text for pi, _ in batch]).detach().float().cpu().numpy()
                    for (pi, si), value in zip(batch, s):
                        if not np.isfinite(value):
                            raise ValueError(f"reward {rspec.id!r} gave a non-finite score ({value}) for prompt id "
                                             f"{ch.prompts[pi].prompt_id!r}, image {si}")
                        scores[pi, si] = value
                    bar.update(len(batch))
                _save_npy_atomic(ch.scores_path(r), scores)
            bar.close()
            dt = time.perf_counter() - t0
            stats.images_scored += n_pairs
            stats.score_seconds += dt
            per = stats.per_reward.setdefault(rspec.id, {"images": 0, "seconds": 0.0})
            per["images"] += n_pairs
            per["seconds"] += dt
            logger.info("reward %s: %d images in %.1fs (%.2f rewards/s)", rspec.id, n_pairs, dt, n_pairs / dt)
            _free(reward)

        # 3. Shards.
        for ch in pass_chunks:
            _write_shard(cfg, ch)
            shutil.rmtree(ch.stash)
            stats.shards_written += 1

    state.wait_for_everyone()
    progress_root = os.path.join(cfg.output_dir, PROGRESS_DIR)
    if state.is_main_process and os.path.isdir(progress_root) and not os.listdir(progress_root):
        os.rmdir(progress_root)
    if cfg.pairwise_dir is not None and state.is_main_process:
        stats.pairs_written = export_pairwise(cfg.output_dir, cfg.pairwise_dir, cfg.pairwise_mode)
        logger.info("wrote %d %s pairs to %s", stats.pairs_written, cfg.pairwise_mode, cfg.pairwise_dir)
    state.wait_for_everyone()
    return stats


def _write_shard(cfg: SynthConfig, ch: _Chunk) -> None:
    scores = np.stack([np.load(ch.scores_path(r)) for r in range(len(cfg.rewards))], axis=1)  # (P, n, k)
    phi = win_count_scores(scores)
    rank = ranks_from_phi(phi)
    gen_ids = [cfg.generators[g].id for g, _ in ch.slots]
    rows = []
    for pi, p in enumerate(ch.prompts):
        seeds = [cfg.generators[g].seeds(p.index)[j] for g, j in ch.slots]
        if len(set(zip(gen_ids, seeds))) != len(seeds):
            raise RuntimeError(f"prompt id {p.prompt_id!r}: duplicate (generator, seed) pairs {list(zip(gen_ids, seeds))}")
        images = []
        for g, j in ch.slots:
            with open(ch.image_path(g, p, j), "rb") as f:
                images.append(f.read())
        rows.append({
            "prompt": p.text,
            "prompt_id": p.prompt_id,
            "images": images,
            "generator_ids": gen_ids,
            "seeds": seeds,
            "reward_names": [r.id for r in cfg.rewards],
            "scores": scores[pi].tolist(),
            "phi": phi[pi].tolist(),
            "rank": rank[pi].tolist(),
        })
    write_atomic(rows_to_table(rows), ch.shard_path)


def config_from_dict(d: dict) -> SynthConfig:
    """Build a SynthConfig from plain data (YAML/JSON): generators/rewards may be spec strings or dicts."""
    d = dict(d)
    d["generators"] = [GeneratorSpec(**g) if isinstance(g, dict) else g for g in d.get("generators", [])]
    d["rewards"] = [RewardSpec(**r) if isinstance(r, dict) else r for r in d.get("rewards", [])]
    known = {f.name for f in dataclasses.fields(SynthConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown synth config key(s) {unknown}; known: {sorted(known)}")
    return SynthConfig(**d)
