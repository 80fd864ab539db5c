"""Pairwise preferences in the Pick-a-Pic v2 schema, as groups of k=2 with the preferred image first.

| column  | type            | meaning                                              |
|---------|-----------------|------------------------------------------------------|
| caption | string          | the prompt                                           |
| jpg_0   | binary          | encoded image (JPEG/PNG bytes)                       |
| jpg_1   | binary          | encoded image                                        |
| label_0 | float           | 1.0: jpg_0 preferred, 0.0: jpg_1 preferred, 0.5: tie |
| user_id | int or string   | optional: who judged (for PPD)                       |
| prompt_id | string or int | optional: stable prompt id (else a hash of caption)  |

Ties are dropped by default (their count is logged and kept in `dropped_ties`). With `keep_ties=True` a tie is
kept in the stored order with scores [0.5, 0.5] (the DPO objective then takes label 0.5).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from diffalign.data.base import GroupDataset, bad_row_fix, prompt_hash
from diffalign.data.errors import DataError
from diffalign.data.sources import arrow_column, blank_text_rows, is_image, is_number, is_string

logger = logging.getLogger("diffalign.data")

PAIRWISE_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")


class PairwiseDataset(GroupDataset):
    """Pick-a-Pic v2 style pairs. Items: pixel_values (2, 3, R, R), scores [1, 0] (or [0.5, 0.5] for kept ties)."""

    schema = "pairwise"
    k = 2

    def __init__(self, source: Any, *, keep_ties: bool = False, **kwargs):
        self.keep_ties = bool(keep_ties)
        self.dropped_ties = 0
        super().__init__(source, **kwargs)

    def _check_schema(self) -> None:
        self._require_columns(PAIRWISE_COLUMNS, "pairwise (Pick-a-Pic v2)", "ranked Syn-Pic data goes to RankedDataset.")
        self._require_type("caption", is_string(self.columns["caption"]), "string")
        for name in ("jpg_0", "jpg_1"):
            self._require_type(name, is_image(self.columns[name]), "binary (encoded image bytes)")
        self._require_type("label_0", is_number(self.columns["label_0"]), "float (1.0, 0.0 or 0.5)")
        for name in ("user_id", "prompt_id"):
            if name in self.columns:
                t = self.columns[name]
                self._require_type(name, is_string(t) or pa.types.is_integer(t), "string or integer")

    def _check_rows(self, keep: np.ndarray, issues: list[DataError]) -> None:
        label = arrow_column(self.hf, "label_0").cast(pa.float64()).to_numpy()  # nulls -> NaN
        valid = (label == 0.0) | (label == 1.0) | (label == 0.5)
        for row in np.flatnonzero(~valid):
            value = "null" if np.isnan(label[row]) else f"{label[row]:g}"
            issues.append(
                DataError(
                    f"label_0 is {value}; it must be 1.0 (jpg_0 preferred), 0.0 (jpg_1 preferred) or 0.5 (tie).",
                    row=int(row),
                    column="label_0",
                    fix=bad_row_fix(),
                )
            )
        for name in ("caption", "jpg_0", "jpg_1"):
            nulls = pc.is_null(arrow_column(self.hf, name)).to_numpy(zero_copy_only=False)
            for row in np.flatnonzero(nulls):
                issues.append(DataError("value is null.", row=int(row), column=name, fix=bad_row_fix()))
        for row in blank_text_rows(arrow_column(self.hf, "caption")):
            issues.append(DataError("caption is empty.", row=int(row), column="caption", fix=bad_row_fix()))
        self._drop_ties(keep, label == 0.5, "tied pairs (label_0 == 0.5)")

    def _read_columns(self) -> list[str]:
        return list(PAIRWISE_COLUMNS) + [name for name in ("user_id", "prompt_id") if name in self.columns]

    def _parse_row(self, row: int, values: dict, rng: np.random.Generator) -> dict:
        label = values["label_0"]
        if label == 0.0:  # jpg_1 preferred: swap so that column 0 is always the preferred image
            images, scores = [(values["jpg_1"], "jpg_1"), (values["jpg_0"], "jpg_0")], [1.0, 0.0]
        elif label == 1.0:
            images, scores = [(values["jpg_0"], "jpg_0"), (values["jpg_1"], "jpg_1")], [1.0, 0.0]
        else:
            images, scores = [(values["jpg_0"], "jpg_0"), (values["jpg_1"], "jpg_1")], [0.5, 0.5]
        caption = values["caption"]
        prompt_id = values.get("prompt_id")
        user_id = values.get("user_id")
        return {
            "images": images,
            "scores": scores,
            "prompt": caption,
            "prompt_id": prompt_hash(caption) if prompt_id is None else str(prompt_id),
            "user_id": None if user_id is None else str(user_id),
        }

    def options(self) -> dict:
        return {**super().options(), "keep_ties": self.keep_ties}
