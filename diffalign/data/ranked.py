"""Ranked lists in the Syn-Pic schema (written by `diffalign synth`), as groups of k images with scores = phi.

One row per prompt (see INTERFACES.md): prompt, prompt_id, images (k PNG bytes), generator_ids, seeds,
reward_names (n), scores (n x k raw rewards), phi (k win-count scores in [0, 1]), rank (k, 1 = best).
The image order is kept as stored; objectives rank by `scores` (phi), so no reordering is needed here.
With `max_k`, rows with more than `max_k` images are sub-sampled (a seeded random subset, stored order kept).
Lists whose phi are all equal rank nothing (RankDPO gives them zero weight); like tied pairs they are dropped by
default and counted in `dropped_ties` (`keep_ties=True` keeps them).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from diffalign.data.base import GroupDataset, bad_row_fix, prompt_hash
from diffalign.data.errors import SKIP_HINT, DataError
from diffalign.data.sources import arrow_column, blank_text_rows, is_image, is_number, is_string, list_of

RANKED_COLUMNS = ("prompt", "images", "phi")


def _lengths(column: pa.ChunkedArray) -> np.ndarray:
    """Per-row list length, -1 for a null list (touches only the offsets, not the image bytes)."""
    lengths = pc.list_value_length(column).fill_null(-1)
    return lengths.to_numpy().astype(np.int64)


def _flag_rows(issues: list[DataError], rows: np.ndarray, column: str, message, fix: str) -> None:
    """Append one DataError per bad row; `message(row)` words what is wrong with that row.

    The row checks find their bad rows vectorised; reporting them all here keeps every issue in the one
    shape that `_apply_issues` sorts, raises or skips.
    """
    issues.extend(DataError(message(row), row=int(row), column=column, fix=fix) for row in rows)


class RankedDataset(GroupDataset):
    """Syn-Pic style ranked groups. Items: pixel_values (k, 3, R, R), scores = phi (k,)."""

    schema = "ranked"

    def __init__(self, source: Any, *, max_k: int | None = None, keep_ties: bool = False, **kwargs):
        if max_k is not None and int(max_k) < 2:
            raise ValueError(f"max_k must be >= 2 (a group needs at least two images), got {max_k}.")
        self.max_k = None if max_k is None else int(max_k)
        self.k = 0
        self.keep_ties = bool(keep_ties)
        self.dropped_ties = 0
        super().__init__(source, **kwargs)

    def _check_schema(self) -> None:
        self._require_columns(RANKED_COLUMNS, "ranked (Syn-Pic)", "Pick-a-Pic pairs go to PairwiseDataset.")
        c = self.columns
        self._require_type("prompt", is_string(c["prompt"]), "string")
        self._require_type("images", list_of(c["images"], is_image), "list<binary> (k encoded images)")
        self._require_type("phi", list_of(c["phi"], is_number), "list<float32> (k scores in [0, 1])")
        if "rank" in c:
            self._require_type("rank", list_of(c["rank"], pa.types.is_integer), "list<int32>")
        if "scores" in c:
            self._require_type("scores", list_of(c["scores"], lambda t: list_of(t, is_number)), "list<list<float32>>")
        for name in ("prompt_id", "user_id"):
            if name in c:
                self._require_type(name, is_string(c[name]) or pa.types.is_integer(c[name]), "string or integer")

    def _check_rows(self, keep: np.ndarray, issues: list[DataError]) -> None:
        n_images = _lengths(arrow_column(self.hf, "images"))
        effective = n_images if self.max_k is None else np.minimum(n_images, self.max_k)
        null_images = np.flatnonzero(n_images < 0)
        _flag_rows(issues, null_images, "images", lambda row: "images is null.", bad_row_fix())
        counts = np.bincount(effective[effective >= 0]) if (effective >= 0).any() else np.zeros(1, dtype=np.int64)
        self.k = int(np.argmax(counts))  # the most common group size; rows that differ are reported
        if self.k < 2:
            raise DataError(
                f"groups have k={self.k} images (most common); ranking needs k >= 2.",
                column="images",
                fix="regenerate the data with at least two images per prompt.",
            )
        _flag_rows(
            issues,
            np.flatnonzero((effective >= 0) & (effective != self.k)),
            "images",
            lambda row: f"k mismatch: this row has {n_images[row]} images but the other rows have k={self.k}.",
            f"regenerate the row, set max_k=<smallest k> to sub-sample every row to the same size, {SKIP_HINT}.",
        )
        null_prompts = np.flatnonzero(pc.is_null(arrow_column(self.hf, "prompt")).to_numpy(zero_copy_only=False))
        _flag_rows(issues, null_prompts, "prompt", lambda row: "prompt is null.", bad_row_fix())
        _flag_rows(issues, blank_text_rows(arrow_column(self.hf, "prompt")), "prompt", lambda row: "prompt is empty.",
                   bad_row_fix())

        phi = arrow_column(self.hf, "phi").combine_chunks()
        phi_len = _lengths(pa.chunked_array([phi]))
        _flag_rows(
            issues,
            np.flatnonzero((phi_len != n_images) & (n_images >= 0)),
            "phi",
            lambda row: f"phi has {phi_len[row] if phi_len[row] >= 0 else 'null'} values for {n_images[row]} images.",
            f"write one phi per image, {SKIP_HINT}.",
        )
        values = pc.list_flatten(phi).cast(pa.float64()).to_numpy(zero_copy_only=False)
        parents = pc.list_parent_indices(phi).to_numpy()
        out_of_range = ~((values >= 0.0) & (values <= 1.0))  # NaN and null (NaN here) fail too
        _flag_rows(
            issues,
            np.unique(parents[out_of_range]),
            "phi",
            lambda row: "phi must lie in [0, 1] (win-count scores); "
            f"found {values[out_of_range & (parents == row)].tolist()}.",
            f"recompute phi with diffalign.synth.win_count_scores, {SKIP_HINT}.",
        )
        lo = np.full(len(phi), np.inf)
        hi = np.full(len(phi), -np.inf)
        np.minimum.at(lo, parents, values)
        np.maximum.at(hi, parents, values)
        self._drop_ties(keep, (phi_len >= 2) & (lo == hi), "all-tied lists (every phi equal)")
        if "rank" in self.columns:
            rank_len = _lengths(arrow_column(self.hf, "rank"))
            _flag_rows(
                issues,
                np.flatnonzero((rank_len >= 0) & (rank_len != n_images) & (n_images >= 0)),
                "rank",
                lambda row: f"rank has {rank_len[row]} values for {n_images[row]} images.",
                f"write one rank per image, {SKIP_HINT}.",
            )
            ranks = arrow_column(self.hf, "rank").combine_chunks()
            rank_values = pc.list_flatten(ranks).cast(pa.int64()).fill_null(0).to_numpy(zero_copy_only=False)
            owners = pc.list_parent_indices(ranks).to_numpy()
            size = rank_len[owners]
            # A permutation of 1..k: in range, and no value twice in a row.
            bad = (rank_values < 1) | (rank_values > size)
            keys = owners.astype(np.int64) * (int(rank_len.max(initial=0)) + 1) + np.clip(rank_values, 0, None)
            _, first, counts = np.unique(keys, return_index=True, return_counts=True)
            bad[first[counts > 1]] = True
            _flag_rows(
                issues,
                np.unique(owners[bad]),
                "rank",
                lambda row: f"rank {ranks[int(row)].as_py()} is not a permutation of 1..{rank_len[row]} "
                "(1 = best, every image its own rank).",
                f"recompute rank with diffalign.synth.ranks_from_phi, {SKIP_HINT}.",
            )
        if "scores" in self.columns:
            scores = arrow_column(self.hf, "scores").combine_chunks()
            inner_len = _lengths(pa.chunked_array([pc.list_flatten(scores)]))
            score_parents = pc.list_parent_indices(scores).to_numpy()
            wrong = inner_len != n_images[score_parents]
            _flag_rows(
                issues,
                np.unique(score_parents[wrong]),
                "scores",
                lambda row: f"scores must be n_rewards x k; a reward row has "
                f"{inner_len[wrong & (score_parents == row)][0]} values for {n_images[row]} images.",
                f"write one score per image for every reward, {SKIP_HINT}.",
            )

    def _read_columns(self) -> list[str]:
        optional = ("prompt_id", "user_id", "rank", "scores", "reward_names", "generator_ids", "seeds")
        return list(RANKED_COLUMNS) + [name for name in optional if name in self.columns]

    def _parse_row(self, row: int, values: dict, rng: np.random.Generator) -> dict:
        images, phi = values["images"], values["phi"]
        keep = list(range(len(images)))
        if len(images) > self.k:  # max_k: a seeded random subset, stored order kept
            keep = sorted(rng.choice(len(images), size=self.k, replace=False).tolist())
        prompt_id, user_id = values.get("prompt_id"), values.get("user_id")
        group = {
            "images": [(images[i], f"images[{i}]") for i in keep],
            "scores": [float(phi[i]) for i in keep],
            "prompt": values["prompt"],
            "prompt_id": prompt_hash(values["prompt"]) if prompt_id is None else str(prompt_id),
            "user_id": None if user_id is None else str(user_id),
            "image_indices": keep,
        }
        if values.get("scores") is not None:  # raw rewards, kept for analysis (not part of the training batch)
            group["reward_scores"] = [[float(r[i]) for i in keep] for r in values["scores"]]
            group["reward_names"] = values.get("reward_names")
        return group

    def options(self) -> dict:
        return {**super().options(), "max_k": self.max_k, "keep_ties": self.keep_ties}
