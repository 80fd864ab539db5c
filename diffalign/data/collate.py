"""Stack groups into the training batch of INTERFACES.md ("Training batch")."""

from __future__ import annotations

import torch

from diffalign.data.errors import DataError


def collate_groups(examples: list[dict]) -> dict:
    """B groups of k -> the batch dict.

    pixel_values float32 (B, k, 3, H, W) in [-1, 1] (or, from the cache, latents (B, k, C, h, w) and
    text: dict of tensors with first dim B); scores float32 (B, k); prompts, prompt_ids, user_ids: lists (B);
    original_sizes, crop_top_lefts: int64 (B, k, 2) as (h, w) and (top, left).
    """
    if not examples:
        raise ValueError("collate_groups got an empty list of examples.")
    ks = {int(example["scores"].shape[0]) for example in examples}
    if len(ks) != 1:
        raise DataError(
            f"groups in one batch have different sizes k={sorted(ks)}.",
            column="images",
            fix="use one k for the whole dataset (RankedDataset(max_k=...) sub-samples to a common k).",
        )
    batch: dict = {}
    for key in ("pixel_values", "latents"):
        if key in examples[0]:
            shapes = {tuple(example[key].shape) for example in examples}
            if len(shapes) != 1:
                raise DataError(
                    f"{key} shapes differ within a batch: {sorted(shapes)}.",
                    fix="preprocess every image to the same resolution (one ImageTransform for the dataset).",
                )
            batch[key] = torch.stack([example[key] for example in examples])
    if "pixel_values" in batch:
        batch["pixel_values"] = batch["pixel_values"].to(torch.float32)
    batch["scores"] = torch.stack([example["scores"] for example in examples]).to(torch.float32)
    batch["prompts"] = [example["prompt"] for example in examples]
    batch["prompt_ids"] = [example["prompt_id"] for example in examples]
    batch["user_ids"] = [example.get("user_id") for example in examples]
    batch["original_sizes"] = torch.stack([example["original_sizes"] for example in examples]).to(torch.int64)
    batch["crop_top_lefts"] = torch.stack([example["crop_top_lefts"] for example in examples]).to(torch.int64)
    if "text" in examples[0]:
        batch["text"] = {key: torch.stack([example["text"][key] for example in examples]) for key in examples[0]["text"]}
    return batch
