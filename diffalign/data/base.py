"""What pairwise and ranked datasets share: eager column checks, lazy image decoding, bad-row policy, transforms.

An item is one *group*: k images of one prompt with scores in [0, 1] (higher is better). Pairs are groups of
k=2 with the preferred image first. `collate_groups` stacks items into the training batch of INTERFACES.md.

Validation is split by cost. Columns (presence, types, labels, k, phi) are checked eagerly when the dataset is
built: they are cheap Arrow reads. Images are decoded lazily, on access, with an error naming the row and column.
With `skip_bad_rows=True` bad rows are skipped and counted instead (`dataset.skipped_rows`, `dataset.bad_rows`);
a row found bad on access is replaced by the next good row, so batches keep their size.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import numpy as np
import torch

from diffalign.data.errors import SKIP_HINT, DataError
from diffalign.data.sources import _describe, arrow_columns, arrow_row, open_source
from diffalign.data.transforms import ImageTransform, decode_image, item_rng

logger = logging.getLogger("diffalign.data")


def prompt_hash(prompt: str) -> str:
    """Stable prompt id for data that has none."""
    return hashlib.sha1(prompt.encode("utf-8")).hexdigest()[:16]


class GroupDataset(torch.utils.data.Dataset):
    """Base class; subclasses define the schema checks (`_check_schema`, `_check_rows`) and `_parse_row`."""

    schema: str = ""
    keep_ties: bool = False  # subclasses with tie semantics take it as an argument
    dropped_ties: int = 0  # tied groups dropped at load (see `_drop_ties`)

    def __init__(
        self,
        source: Any,
        *,
        resolution: int = 1024,
        crop: str = "center",
        random_flip: bool = False,
        seed: int = 0,
        skip_bad_rows: bool = False,
        split: str = "train",
        cache_dir: str | None = None,
        source_name: str | None = None,
    ):
        self.source = source_name or _describe(source)
        self.hf = open_source(source, split=split, cache_dir=cache_dir)
        self.transform = ImageTransform(resolution, crop, random_flip)
        self.seed = int(seed)
        self.epoch = 0
        self.skip_bad_rows = bool(skip_bad_rows)
        self.bad_rows: dict[int, str] = {}  # source row -> why it was skipped
        self.columns = arrow_columns(self.hf)
        self.num_source_rows = len(self.hf)
        if self.num_source_rows == 0:
            raise DataError(f"the data source {self.source} has no rows.", fix="point at a non-empty dataset.")
        self._check_schema()
        keep = np.ones(self.num_source_rows, dtype=bool)
        issues: list[DataError] = []
        self._check_rows(keep, issues)
        self._apply_issues(keep, issues)
        self.rows = np.flatnonzero(keep)
        if len(self.rows) == 0:
            raise DataError(
                f"no usable rows left in {self.source} ({self.num_source_rows} rows, {len(self.bad_rows)} bad, "
                f"{self.dropped_ties} tied).",
                fix="check the data; see dataset.bad_rows for the reasons (keep_ties=True keeps tied groups).",
            )
        self._view = self.hf.with_format("arrow", columns=self._read_columns())
        if self.bad_rows:
            first = min(self.bad_rows)
            logger.warning(
                "skip_bad_rows: skipped %d of %d rows of %s (first: %s)",
                len(self.bad_rows),
                self.num_source_rows,
                self.source,
                self.bad_rows[first],
            )

    # ---- subclass hooks -------------------------------------------------------------------------------------
    def _check_schema(self) -> None:
        raise NotImplementedError

    def _check_rows(self, keep: np.ndarray, issues: list[DataError]) -> None:
        raise NotImplementedError

    def _read_columns(self) -> list[str]:
        raise NotImplementedError

    def _parse_row(self, row: int, values: dict, rng: np.random.Generator) -> dict:
        """Return {"images": [(value, column_label)], "scores": [...], "prompt", "prompt_id", "user_id"}."""
        raise NotImplementedError

    # ---- shared checks --------------------------------------------------------------------------------------
    def _require_columns(self, required: tuple[str, ...], what: str, other_hint: str) -> None:
        for name in required:
            if name not in self.columns:
                raise DataError(
                    f"missing column. The {what} schema needs columns {list(required)}; {self.source} has {sorted(self.columns)}.",
                    column=name,
                    fix=f"rename the column (datasets: ds.rename_column(old, {name!r})) or point at the right data; {other_hint}",
                )

    def _require_type(self, name: str, ok: bool, expected: str) -> None:
        if not ok:
            raise DataError(
                f"has Arrow type {self.columns[name]}, expected {expected}.",
                column=name,
                fix=f"cast the column to {expected} (e.g. ds.cast_column) before training.",
            )

    def _apply_issues(self, keep: np.ndarray, issues: list[DataError]) -> None:
        if not issues:
            return
        issues.sort(key=lambda e: (e.row, e.column or ""))
        if not self.skip_bad_rows:
            raise issues[0]
        for issue in issues:
            keep[issue.row] = False
            self.bad_rows.setdefault(int(issue.row), str(issue))

    def _drop_ties(self, keep: np.ndarray, ties: np.ndarray, what: str) -> None:
        """Drop tied groups (no preference, zero loss) unless `keep_ties`; the count is kept in `dropped_ties`."""
        if self.keep_ties:
            return
        self.dropped_ties = int(ties.sum())
        keep &= ~ties
        if self.dropped_ties:
            logger.info("dropped %d %s of %d rows; pass keep_ties=True to keep them", self.dropped_ties, what, self.num_source_rows)

    # ---- access ---------------------------------------------------------------------------------------------
    @property
    def skipped_rows(self) -> int:
        """How many source rows were skipped as bad (eagerly at load, plus any found while decoding)."""
        return len(self.bad_rows)

    def set_epoch(self, epoch: int) -> None:
        """Random crops/flips/sub-samples depend on (seed, epoch, row): call once per epoch for fresh draws."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.rows)

    def raw_group(self, index: int) -> dict:
        """Group `index` (position in this dataset) with decoded PIL images, no resizing; raises DataError."""
        row = int(self.rows[index])
        rng = item_rng(self.seed, self.epoch, row)
        return self._raw_from_row(row, rng)

    def _raw_from_row(self, row: int, rng: np.random.Generator) -> dict:
        values = arrow_row(self._view, row, self._read_columns())
        group = self._parse_row(row, values, rng)
        group["images"] = [decode_image(value, row=row, column=label) for value, label in group["images"]]
        group["row"] = row
        return group

    def load_group(self, index: int) -> dict:
        """Group `index` preprocessed for training; raises DataError on a bad row whatever skip_bad_rows says."""
        row = int(self.rows[index])
        rng = item_rng(self.seed, self.epoch, row)
        group = self._raw_from_row(row, rng)
        pixels, sizes, crops = [], [], []
        for image in group.pop("images"):
            tensor, size, crop = self.transform(image, rng)
            pixels.append(tensor)
            sizes.append(size)
            crops.append(crop)
        group["pixel_values"] = torch.stack(pixels)
        group["scores"] = torch.tensor(group["scores"], dtype=torch.float32)
        group["original_sizes"] = torch.tensor(sizes, dtype=torch.int64)
        group["crop_top_lefts"] = torch.tensor(crops, dtype=torch.int64)
        return group

    def __getitem__(self, index: int) -> dict:
        n = len(self.rows)
        for attempt in range(n):
            position = (int(index) + attempt) % n
            row = int(self.rows[position])
            if row in self.bad_rows:
                continue
            try:
                return self.load_group(position)
            except DataError as error:
                if not self.skip_bad_rows:
                    raise
                self.mark_bad(row, error)
        raise DataError(f"every row of {self.source} is bad ({len(self.bad_rows)} skipped).", fix="check dataset.bad_rows.")

    def mark_bad(self, row: int, error: Exception) -> None:
        """Record a row found bad on access (skip_bad_rows=True). In DataLoader workers the count is per worker."""
        self.bad_rows.setdefault(int(row), str(error))
        logger.warning("skip_bad_rows: skipping row %d (%d skipped so far): %s", row, len(self.bad_rows), error)

    # ---- identity -------------------------------------------------------------------------------------------
    def options(self) -> dict:
        return {"seed": self.seed, **self.transform.config()}

    def fingerprint(self) -> dict:
        """What a cache built from this dataset depends on (compared when a cache is resumed or loaded)."""
        return {
            "schema": self.schema,
            "source": self.source,
            "num_source_rows": self.num_source_rows,
            "num_rows": len(self.rows),
            "k": self.k,
            "options": self.options(),
        }

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(source={self.source!r}, rows={len(self)}, k={self.k}, "
            f"skipped_rows={self.skipped_rows}, transform={self.transform})"
        )


def bad_row_fix() -> str:
    return f"fix or drop the row, {SKIP_HINT}."
