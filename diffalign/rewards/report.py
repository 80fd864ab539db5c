"""Scoring sets of images with several reward models: mean +- standard error per reward, and the win rate of
one model over another (per prompt, ties count half). Used by `eval/rewards.py`."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np

from diffalign.evaluation.stats import wins


class ImageFiles(Sequence):
    """Image files, decoded only when a reward asks for them (a batch at a time): a folder is never held in
    memory at once. A file that cannot be decoded raises ValueError naming it."""

    def __init__(self, paths: Sequence[str]):
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self._open(p) for p in self.paths[index]]
        return self._open(self.paths[index])

    @staticmethod
    def _open(path: str):
        from PIL import Image, UnidentifiedImageError

        from diffalign.data.transforms import to_rgb

        try:
            with Image.open(path) as im:
                im.load()
                return to_rgb(im)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise ValueError(f"{path} is not a readable image ({type(e).__name__}: {e})") from None


def load_image_folder(folder: str):
    """Images and prompts from `folder/metadata.jsonl` (lines {"file_name": ..., "prompt": ...}, the HF
    imagefolder convention). Returns (keys, images, prompts) in file order; keys are the file names and
    images an `ImageFiles` sequence (decoded on access)."""
    from diffalign._jsonl import iter_jsonl

    meta = os.path.join(folder, "metadata.jsonl")
    if not os.path.isfile(meta):
        raise FileNotFoundError(f"{meta} is missing: an image folder needs metadata.jsonl with one line "
                                '{"file_name": "0001.png", "prompt": "..."} per image')
    keys, paths, prompts = [], [], []
    for line_no, row in iter_jsonl(meta, '{where} is not valid JSON ({error}); each line is {{"file_name": ..., "prompt": ...}}'):
        if not isinstance(row, dict) or "file_name" not in row or "prompt" not in row:
            raise ValueError(f"{meta}:{line_no} needs 'file_name' and 'prompt', has {sorted(row) if isinstance(row, dict) else row!r}")
        path = os.path.join(folder, row["file_name"])
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{meta}:{line_no} names {row['file_name']!r}, which is not in {folder}")
        keys.append(row["file_name"])
        paths.append(path)
        prompts.append(row["prompt"])
    if not keys:
        raise ValueError(f"{meta} lists no images")
    return keys, ImageFiles(paths), prompts


def save_image_folder(folder: str, keys: Sequence[str], images, prompts: Sequence[str]) -> None:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "metadata.jsonl"), "w", encoding="utf-8") as f:
        for key, image, prompt in zip(keys, images, prompts):
            image.save(os.path.join(folder, key))
            f.write(json.dumps({"file_name": key, "prompt": prompt}) + "\n")


def score_all(reward_models: dict, images, prompts: Sequence[str], batch_size: int | None = None) -> dict:
    """{reward id: float64 array (N,)}; reward models are used one after another."""
    return {rid: model.score(images, list(prompts), batch_size=batch_size).detach().double().cpu().numpy()
            for rid, model in reward_models.items()}


def summarize(scores: dict) -> dict:
    """{reward id: {"mean", "stderr", "n"}}; stderr = sample std (ddof 1) / sqrt(n), 0 for n = 1."""
    from diffalign.evaluation.stats import mean_se

    out = {}
    for rid, s in scores.items():
        mean, stderr = mean_se(s)
        n = len(np.asarray(s).ravel())
        out[rid] = {"mean": mean, "stderr": stderr if n > 1 else 0.0, "n": n}
    return out


def win_rates(scores_a: dict, scores_b: dict) -> dict:
    """Per reward: wins, losses, ties of A over B on matched items, and win_rate = (wins + ties / 2) / n."""
    out = {}
    for rid in scores_a:
        a, b = np.asarray(scores_a[rid]), np.asarray(scores_b[rid])
        if a.shape != b.shape:
            raise ValueError(f"reward {rid!r}: {len(a)} scores for A but {len(b)} for B; compare matched sets")
        won, lost = int((a > b).sum()), int((a < b).sum())
        out[rid] = {"win_rate": float(wins(a, b).mean()), "wins": won, "losses": lost, "ties": len(a) - won - lost,
                    "n": len(a)}
    return out


def format_summary_table(summaries: dict) -> str:
    """summaries: {model name: summarize(...)} -> markdown table, one row per reward, one column per model."""
    models = list(summaries)
    rewards = list(dict.fromkeys(r for s in summaries.values() for r in s))
    lines = ["| reward | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
    for rid in rewards:
        cells = [f"{summaries[m][rid]['mean']:.4f} ± {summaries[m][rid]['stderr']:.4f}" for m in models]
        lines.append(f"| {rid} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_win_table(rates: dict, name_a: str, name_b: str) -> str:
    lines = [f"| reward | win rate {name_a} vs {name_b} | wins | losses | ties |", "|---|---|---|---|---|"]
    for rid, r in rates.items():
        lines.append(f"| {rid} | {r['win_rate']:.3f} | {r['wins']} | {r['losses']} | {r['ties']} |")
    return "\n".join(lines)


def generate_set(spec, prompts, device, save_dir: str | None = None):
    """Images of one generator spec (see diffalign.synth.GeneratorSpec) for `prompts` (diffalign.synth.Prompt).
    Keys are '<prompt index>-<j>.png', the same for every generator, so two models can be matched."""
    from diffalign.synth.specs import generate_images, load_pipeline

    pipe = load_pipeline(spec, device)
    jobs = [(p, j, seed) for p in prompts for j, seed in enumerate(spec.seeds(p.index))]
    keys, images, texts = [], [], []
    for b in range(0, len(jobs), spec.batch_size):
        batch = jobs[b : b + spec.batch_size]
        images += generate_images(pipe, spec, [p.text for p, _, _ in batch], [s for _, _, s in batch])
        keys += [f"{p.index:05d}-{j}.png" for p, j, _ in batch]
        texts += [p.text for p, _, _ in batch]
    del pipe
    if save_dir is not None:
        save_image_folder(save_dir, keys, images, texts)
    return keys, images, texts


def evaluate_sets(sets: dict, reward_specs, device=None, batch_size: int = 16) -> dict:
    """sets: {name: (keys, images, prompts)}; reward_specs: diffalign.synth.RewardSpec list.

    Returns {"summary": {set: {reward: mean/stderr/n}}, "win_rates": {...} when there are two sets}.
    Reward models are loaded one at a time and score every set before the next loads."""
    import gc

    from diffalign import rewards as registry

    names = list(sets)
    if len(names) == 2:
        ka, kb = sets[names[0]][0], sets[names[1]][0]
        if sorted(ka) != sorted(kb):
            only = sorted(set(ka) ^ set(kb))[:5]
            raise ValueError(f"{names[0]!r} and {names[1]!r} hold different images (e.g. {only}); a win rate "
                             "needs the same file names / prompts in both")
    scores = {name: {} for name in names}
    for spec in reward_specs:
        kwargs = {"batch_size": batch_size, **spec.kwargs}
        if device is not None:
            kwargs.setdefault("device", device)
        model = registry.load(spec.name, **kwargs)
        for name in names:
            _keys, images, prompts = sets[name]
            scores[name].update(score_all({spec.id: model}, images, prompts))
        del model
        gc.collect()
    result = {"summary": {name: summarize(scores[name]) for name in names}}
    if len(names) == 2:
        a, b = names
        order = {k: i for i, k in enumerate(sets[b][0])}
        perm = np.array([order[k] for k in sets[a][0]])  # align B to A's order
        result["win_rates"] = {"a": a, "b": b,
                               "per_reward": win_rates(scores[a], {r: s[perm] for r, s in scores[b].items()})}
    return result
