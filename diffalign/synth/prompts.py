"""Prompt sources for the generator: a text file (one prompt a line), JSONL (a field), or an HF dataset column.

Each prompt keeps its position in the source (`index`) and a stable string id (`prompt_id`): the value of
`id_field` when given, else the position. Seeds derive from `index`, so they do not depend on how the
prompts are split into chunks or processes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from diffalign._jsonl import iter_jsonl

CLIP_MAX_TOKENS = 77


@dataclass(frozen=True)
class Prompt:
    index: int
    prompt_id: str
    text: str


def load_prompts(source: str, field: str = "prompt", id_field: str | None = None, split: str = "train",
                 limit: int | None = None) -> list[Prompt]:
    """`source`: `*.txt`, `*.jsonl`, or `hf:<hub id or save_to_disk folder>` (column `field`, split `split`)."""
    if source.startswith("hf:"):
        rows = _hf_rows(source[3:], split)
        texts, ids = _column(rows, field, id_field, source)
    elif source.endswith((".jsonl", ".json")):
        if not os.path.isfile(source):
            raise FileNotFoundError(f"prompt file {source!r} does not exist")
        rows = [row for _, row in iter_jsonl(source, "{where} is not valid JSON: {error}")]
        texts, ids = _column(rows, field, id_field, source)
    elif source.endswith(".txt"):
        if not os.path.isfile(source):
            raise FileNotFoundError(f"prompt file {source!r} does not exist")
        with open(source, encoding="utf-8") as f:
            texts = f.read().splitlines()
        ids = [str(i) for i in range(len(texts))]
    else:
        raise ValueError(f"prompt source {source!r}: use a .txt file (one prompt a line), a .jsonl file "
                         "(with --prompt_field), or hf:<dataset id or folder> (with --prompt_field, --prompt_split)")
    prompts = [Prompt(i, pid, t) for i, (pid, t) in enumerate(zip(ids, texts))]
    if limit is not None:
        prompts = prompts[:limit]
    if not prompts:
        raise ValueError(f"prompt source {source!r} holds no prompts")
    seen: dict[str, int] = {}
    for p in prompts:
        if p.prompt_id in seen:
            raise ValueError(f"prompt id {p.prompt_id!r} appears twice (rows {seen[p.prompt_id]} and {p.index}) in "
                             f"{source!r}; ids must be unique (choose another --prompt_id_field or none)")
        seen[p.prompt_id] = p.index
    return prompts


def _hf_rows(name: str, split: str):
    import datasets

    if os.path.isdir(name) and (os.path.exists(os.path.join(name, "dataset_info.json"))
                                or os.path.exists(os.path.join(name, "dataset_dict.json"))):
        ds = datasets.load_from_disk(name)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"dataset {name!r} has splits {list(ds)}, not {split!r}; pass --prompt_split")
            ds = ds[split]
        return ds
    return datasets.load_dataset(name, split=split)


def _column(rows, field: str, id_field: str | None, source: str):
    texts, ids = [], []
    for i, row in enumerate(rows):
        if field not in row:
            raise ValueError(f"row {i} of {source!r} has no field {field!r} (fields: {sorted(row)}); "
                             "pass --prompt_field")
        if id_field is not None and id_field not in row:
            raise ValueError(f"row {i} of {source!r} has no id field {id_field!r} (fields: {sorted(row)})")
        text = row[field]
        if not isinstance(text, str):
            raise ValueError(f"row {i} of {source!r}: field {field!r} is a {type(text).__name__}, not a string")
        texts.append(text)
        ids.append(str(row[id_field]) if id_field is not None else str(i))
    return texts, ids


def find_bad_prompts(prompts: list[Prompt], tokenizer=None, max_tokens: int = CLIP_MAX_TOKENS):
    """[(prompt, reason)] for empty prompts and prompts longer than the CLIP tokenizer's limit (with BOS/EOS)."""
    if tokenizer is None:
        from diffalign.tokenization import clip_tokenizer

        tokenizer = clip_tokenizer()
    bad = []
    non_empty = [p for p in prompts if p.text.strip()]
    bad += [(p, "empty") for p in prompts if not p.text.strip()]
    if non_empty:
        lengths = [len(ids) for ids in tokenizer([p.text for p in non_empty], truncation=False)["input_ids"]]
        bad += [(p, f"{n} tokens > {max_tokens}") for p, n in zip(non_empty, lengths) if n > max_tokens]
    return sorted(bad, key=lambda b: b[0].index)


def check_prompts(prompts: list[Prompt], skip_bad_prompts: bool = False, tokenizer=None):
    """Returns (kept prompts, skipped bad prompts). Raises on bad prompts unless `skip_bad_prompts`."""
    bad = find_bad_prompts(prompts, tokenizer)
    if bad and not skip_bad_prompts:
        listed = "; ".join(f"#{p.index} (id {p.prompt_id!r}, {p.text[:40]!r}): {why}" for p, why in bad[:10])
        more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise ValueError(f"{len(bad)} bad prompt(s): {listed}{more}. Fix or remove them, "
                         "or pass --skip_bad_prompts to skip them (the count is reported).")
    bad_idx = {p.index for p, _ in bad}
    return [p for p in prompts if p.index not in bad_idx], bad
