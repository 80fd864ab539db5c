"""Preference data: pairwise (Pick-a-Pic v2 schema) and ranked (Syn-Pic schema) datasets, preprocessing,
the collator that produces the training batch, and the latent + text-embedding cache. See docs/data.md."""

from __future__ import annotations

from typing import Any

from diffalign.data.base import GroupDataset, prompt_hash
from diffalign.data.cache import CachedDataset, build_cache, rows_for_rank, shards_for_rank
from diffalign.data.collate import collate_groups
from diffalign.data.errors import CacheMismatchError, DataError
from diffalign.data.pairwise import PAIRWISE_COLUMNS, PairwiseDataset
from diffalign.data.ranked import RANKED_COLUMNS, RankedDataset
from diffalign.data.sources import open_source
from diffalign.data.transforms import ImageTransform, decode_image


def detect_schema(columns) -> str:
    """'pairwise' for Pick-a-Pic columns, 'ranked' for Syn-Pic columns."""
    names = set(columns)
    if {"jpg_0", "jpg_1", "label_0"} <= names:
        return "pairwise"
    if "images" in names and "phi" in names:
        return "ranked"
    raise DataError(
        f"cannot tell the schema from the columns {sorted(names)}.",
        fix=f"pairwise data needs {list(PAIRWISE_COLUMNS)}; ranked data needs {list(RANKED_COLUMNS)} (see docs/data.md).",
    )


def load_preference_dataset(
    source: Any, schema: str = "auto", *, split: str = "train", cache_dir: str | None = None, **kwargs
) -> GroupDataset:
    """Open `source` and build the dataset for its schema. kwargs go to PairwiseDataset / RankedDataset
    (resolution, crop, random_flip, seed, skip_bad_rows, keep_ties, max_k for lists)."""
    from diffalign.data.sources import _describe, arrow_columns

    name = _describe(source)
    hf = open_source(source, split=split, cache_dir=cache_dir)
    if schema == "auto":
        schema = detect_schema(arrow_columns(hf))
    if schema == "pairwise":
        kwargs.pop("max_k", None)
        return PairwiseDataset(hf, source_name=name, **kwargs)
    if schema == "ranked":
        return RankedDataset(hf, source_name=name, **kwargs)
    raise ValueError(f"schema must be 'auto', 'pairwise' or 'ranked', got {schema!r}.")


__all__ = [
    "CacheMismatchError",
    "CachedDataset",
    "DataError",
    "GroupDataset",
    "ImageTransform",
    "PairwiseDataset",
    "RankedDataset",
    "build_cache",
    "collate_groups",
    "decode_image",
    "detect_schema",
    "load_preference_dataset",
    "open_source",
    "prompt_hash",
    "rows_for_rank",
    "shards_for_rank",
]
